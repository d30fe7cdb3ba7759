"""Caption metrics as the COCO caption evaluation (coco-caption / pycocoevalcap) computes them.

Inputs are raw strings keyed by image id: one prediction per id, one or more references per id.
With `tokenize=True` (the default) every string first goes through `ptb_tokenize`, as the COCO
pipeline does before scoring; pass `tokenize=False` for text that is already tokenised.

Scales follow pycocoevalcap: CIDEr-D is returned as computed (e.g. 1.216), papers print it ×100
(121.6); BLEU is in [0, 1].

CIDEr-D (Vedantam et al. 2015, in the form pycocoevalcap names "CIDEr"): for n = 1..4, TF-IDF
vectors of n-gram counts, with document frequency counted over the reference sets of the
evaluated images; the candidate's weights are clipped by the reference's; each cosine term is
multiplied by a Gaussian length penalty exp(-Δ²/2σ²), σ = 6; the mean over n, averaged over the
references, is scaled by 10.

BLEU (Papineni et al. 2002) is corpus-level, with the closest reference length per image for the
brevity penalty and the tiny additive constants of coco-caption's scorer (so that a zero n-gram
count gives ~0 instead of a math error).
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Hashable, Mapping, Sequence

from blip_train.evaluation.ptb_tokenize import ptb_tokenize

NGram = tuple[str, ...]

# coco-caption's BLEU adds these to every ratio; they decide the value when a count is zero.
_BLEU_TINY = 1e-15
_BLEU_SMALL = 1e-9


def _check_inputs(predictions: Mapping[Hashable, str],
                  references: Mapping[Hashable, Sequence[str]]) -> None:
    """Fail with the offending ids rather than scoring a partial or mismatched set."""
    missing = [k for k in references if k not in predictions]
    extra = [k for k in predictions if k not in references]
    if missing or extra:
        raise ValueError(f"predictions and references must have the same ids; missing predictions "
                         f"for {missing[:5]}, no references for {extra[:5]}")
    empty = [k for k, refs in references.items() if len(refs) == 0]
    if empty:
        raise ValueError(f"every id needs at least one reference; none for {empty[:5]}")
    if not references:
        raise ValueError("no captions to score")


def _prepare(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]],
             tokenize: bool) -> tuple[list[Hashable], list[list[str]], list[list[list[str]]]]:
    """(ids in reference order, candidate tokens, reference tokens), tokenised if asked."""
    _check_inputs(predictions, references)
    norm = ptb_tokenize if tokenize else (lambda s: s)
    ids = list(references)
    cands = [norm(predictions[i]).split() for i in ids]
    refs = [[norm(r).split() for r in references[i]] for i in ids]
    return ids, cands, refs


def _ngram_counts(words: list[str], n: int) -> Counter[NGram]:
    """Counts of all 1..n-grams of a token list."""
    return Counter(tuple(words[i:i + k])
                   for k in range(1, n + 1) for i in range(len(words) - k + 1))


# ----------------------------------------------------------------------------------------- CIDEr-D

def _tfidf(counts: Counter[NGram], doc_freq: Counter[NGram], log_num_docs: float,
           n: int) -> tuple[list[dict[NGram, float]], list[float], int]:
    """Per-order TF-IDF vectors, their L2 norms, and the length used by the length penalty.

    The length is the number of bigrams, not words: that is what the reference implementation
    measures (an off-by-one in its order index). The difference of two lengths equals the
    difference of word counts whenever both sentences have at least one word, and we keep the
    bigram count so that empty and one-word captions also score exactly as in the reference.
    """
    vecs: list[dict[NGram, float]] = [{} for _ in range(n)]
    for gram, tf in counts.items():
        # n-grams absent from every reference set get df = 1 (log 1 = 0), i.e. the largest idf.
        vecs[len(gram) - 1][gram] = tf * (log_num_docs - math.log(max(1.0, doc_freq[gram])))
    norms = [math.sqrt(sum(w * w for w in v.values())) for v in vecs]
    length = sum(tf for gram, tf in counts.items() if len(gram) == 2)
    return vecs, norms, length


def cider_d(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]],
            n: int = 4, sigma: float = 6.0,
            tokenize: bool = True) -> tuple[float, dict[Hashable, float]]:
    """CIDEr-D over a set of images: (mean score, {id: score}).

    The idf comes from the references of exactly this set, so a score depends on which images are
    evaluated together (as in the reference implementation). With a single image every reference
    n-gram has idf log(1/1) = 0 and the score is 0.
    """
    ids, cands, refs = _prepare(predictions, references, tokenize)
    ref_counts = [[_ngram_counts(r, n) for r in rs] for rs in refs]
    # Document = the reference set of one image: an n-gram counts once per image that has it.
    doc_freq: Counter[NGram] = Counter()
    for counts in ref_counts:
        doc_freq.update(set().union(*counts))
    log_num_docs = math.log(float(len(ids)))

    per_id: dict[Hashable, float] = {}
    for image_id, cand, rcounts in zip(ids, cands, ref_counts):
        vec, norm, length = _tfidf(_ngram_counts(cand, n), doc_freq, log_num_docs, n)
        total = [0.0] * n
        for rc in rcounts:
            rvec, rnorm, rlength = _tfidf(rc, doc_freq, log_num_docs, n)
            penalty = math.exp(-((length - rlength) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                # "-D" clipping: a candidate n-gram repeated more than in the reference earns
                # no more than the reference's weight.
                dot = sum(min(w, rvec[k].get(g, 0.0)) * rvec[k].get(g, 0.0)
                          for g, w in vec[k].items())
                if norm[k] != 0 and rnorm[k] != 0:
                    dot /= norm[k] * rnorm[k]
                total[k] += dot * penalty
        per_id[image_id] = 10.0 * (sum(total) / n) / len(rcounts)
    return sum(per_id.values()) / len(per_id), per_id


# -------------------------------------------------------------------------------------------- BLEU

def bleu(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]],
         n: int = 4, tokenize: bool = True) -> dict[str, float]:
    """Corpus BLEU-1..n: {"bleu_1": x, ..., "bleu_n": y}.

    Clipped n-gram matches and candidate n-gram totals are summed over all images before the
    precisions are formed; the brevity penalty compares the total candidate length with the sum,
    over images, of the reference length closest to the candidate's (shorter one on a tie).
    """
    _, cands, refs = _prepare(predictions, references, tokenize)
    correct = [0] * n
    guess = [0] * n
    cand_len = 0
    ref_len = 0
    for cand, rs in zip(cands, refs):
        counts = _ngram_counts(cand, n)
        max_ref: Counter[NGram] = Counter()
        for r in rs:
            max_ref |= _ngram_counts(r, n)                    # element-wise max over references
        for gram, c in counts.items():
            correct[len(gram) - 1] += min(c, max_ref[gram])
        for k in range(n):
            guess[k] += max(0, len(cand) - k)
        cand_len += len(cand)
        ref_len += min((abs(len(r) - len(cand)), len(r)) for r in rs)[1]

    scores: dict[str, float] = {}
    log_precision_sum = 0.0
    ratio = (cand_len + _BLEU_TINY) / (ref_len + _BLEU_SMALL)
    brevity = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    for k in range(n):
        log_precision_sum += math.log((correct[k] + _BLEU_TINY) / (guess[k] + _BLEU_SMALL))
        # Geometric mean of the first k+1 precisions, as coco-caption forms it.
        scores[f"bleu_{k + 1}"] = brevity * math.exp(log_precision_sum / (k + 1))
    return scores


def caption_metrics(predictions: Mapping[Hashable, str],
                    references: Mapping[Hashable, Sequence[str]]) -> dict[str, float]:
    """CIDEr-D and BLEU-1..4, tokenising once: {"cider": x, "bleu_1": ..., "bleu_4": ...}."""
    _check_inputs(predictions, references)
    preds = {k: ptb_tokenize(v) for k, v in predictions.items()}
    refs = {k: [ptb_tokenize(r) for r in rs] for k, rs in references.items()}
    cider, _ = cider_d(preds, refs, tokenize=False)
    return {"cider": cider, **bleu(preds, refs, tokenize=False)}
