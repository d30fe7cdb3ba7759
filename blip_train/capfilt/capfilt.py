"""CapFilt with one BLIP-2 stage-1 / BLIP model (its ITG pass or decoder captions, its ITM/ITC heads filter), or
with a separate captioner (BLIP's CapFilt: a decoder fine-tuned on captions, a filter fine-tuned on retrieval).

For each image (BLIP; BLIP-2 §3.4):
1. caption: `num_captions` synthetic captions by nucleus sampling (or greedy) through ITG;
2. score: the web caption and every synthetic one get an ITM match probability (softmax of the
   2-way head, so one threshold means the same thing for every model) and an ITC similarity
   (cosine, max over the query tokens, no temperature);
3. select: a caption passes the filter when P(match) >= itm_threshold (BLIP's filter: the ITM head
   says "matched") and, if itc_threshold is set, its ITC similarity >= itc_threshold. The web
   caption is kept when it passes; synthetic captions are ranked by ITC (BLIP-2 ranked by CLIP
   score; ITC is this model's own image-text similarity), the top `keep_top` distinct ones are
   taken, and each is kept when it passes too.

The ITM head is trained on one positive per two negatives, so its probabilities carry a 1/3 prior;
a well-trained model is confident either way, an under-trained one is not (the report's histograms
show where to put the thresholds, see README.md).

Everything here is a function of (settings, chunk of samples, generator): `process_chunk` gives the
same rows whichever rank runs it, which is what makes sharded and resumed runs equal to one run.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from blip_train.capfilt.report import CapFiltStats
from blip_train.data.collate import pre_caption
from blip_train.data.images import EVAL_DCT_SCALES, CorruptImageError, decode_rgb_array
from blip_train.data.schema import COLUMNS, DRAW_CAPTION_SOURCE
from blip_train.data.transforms import EVAL_REDUCING_GAP, build_transform, normalize_pixels, resize_box

SAMPLING = ("nucleus", "greedy")
CAPFILT_SOURCE = DRAW_CAPTION_SOURCE
"""`source` of an output row: one row per image, its kept captions in `captions` (readers draw one per visit)."""
EXTRA_COLUMNS = {"orig_index": "int", "caption_sources": "json", "itm_scores": "json", "itc_scores": "json"}
"""Provenance columns CapFilt adds to the schema: the sample's index in the input split and, per kept
caption (in `captions` order), whether it is the web or a synthetic one and its ITM / ITC scores."""


@dataclass(frozen=True)
class CapFiltSettings:
    """Everything that decides CapFilt's output; a resumed run must use the same values."""

    image_size: int
    """Pixels of the model's input (the run's model.vision.image_size)."""
    max_txt_len: int
    """Tokens of text the ITM/ITC heads read (the run's model.max_txt_len)."""
    num_captions: int = 10
    """Synthetic captions sampled per image (0: filter the web captions only)."""
    keep_top: int = 2
    """Synthetic captions per image that may be kept: the top ones by ITC that also pass ITM."""
    itm_threshold: float = 0.5
    """Minimum ITM match probability for a caption (web or synthetic) to be kept."""
    itc_threshold: Optional[float] = None
    """Minimum ITC similarity (cosine, max over queries) to be kept as well; None: no ITC filter."""
    sampling: str = "nucleus"
    """nucleus | greedy (greedy gives one distinct caption per image)."""
    top_p: float = 0.9
    """Nucleus sampling mass."""
    max_len: int = 30
    """Generated tokens per caption, [DEC] included."""
    seed: int = 0
    """Seed of the caption sampling; each chunk draws from its own generator seeded by (seed, chunk)."""
    chunk_size: int = 256
    """Input samples per work unit (one output part, one completion marker)."""
    batch_size: int = 16
    """Images per forward pass."""
    min_keep: float = 0.05
    """Least share of the input's decodable images that must keep a caption; less is an error (thresholds
    that keep almost nothing are a mistake, never a dataset)."""

    def __post_init__(self) -> None:
        checks = [
            (self.num_captions >= 0, "num_captions must be >= 0"),
            (self.keep_top >= 0, "keep_top must be >= 0"),
            (0.0 <= self.itm_threshold <= 1.0, "itm_threshold is a probability, in [0, 1]"),
            (self.itc_threshold is None or -1.0 <= self.itc_threshold <= 1.0, "itc_threshold is a cosine, in [-1, 1]"),
            (self.sampling in SAMPLING, f"sampling must be one of {SAMPLING}"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (self.max_len >= 2, "max_len must be >= 2 ([DEC] and one token)"),
            (self.chunk_size >= 1 and self.batch_size >= 1, "chunk_size and batch_size must be >= 1"),
            (0.0 <= self.min_keep <= 1.0, "min_keep is a share of the input, in [0, 1]"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"capfilt: {msg}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Captioner:
    """The model that writes the synthetic captions when it is not the filter (BLIP's CapFilt). Its ids are
    decoded with its own tokenizer and the text re-tokenised by the filter's: the two may be different families."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    image_size: int
    """Pixels of the captioner's input (its run's model.vision.image_size)."""
    run: str = ""
    """Its checkpoint (resolved step dir): recorded in the report and in the identity a resumed run must match."""

    def identity(self) -> dict[str, Any]:
        return {"checkpoint": self.run, "image_size": self.image_size}


@dataclass(frozen=True)
class Candidate:
    """One caption of one image with its scores."""

    text: str
    source: str  # "web" | "synthetic"
    itm: float = 0.0
    itc: float = 0.0


def decode_captions(tokenizer: PreTrainedTokenizerBase, ids: torch.Tensor) -> list[str]:
    """(N, L) generated ids ([DEC] first, [SEP]-terminated) → cleaned caption strings."""
    sep = tokenizer.sep_token_id
    texts = []
    for row in ids[:, 1:].tolist():
        row = row[:row.index(sep)] if sep in row else row
        texts.append(pre_caption(tokenizer.decode(row, skip_special_tokens=True)))
    return texts


@torch.no_grad()
def score_captions(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, image_embeds: torch.Tensor,
                   image_feats: torch.Tensor, texts: Sequence[str], owner: Sequence[int],
                   max_txt_len: int) -> tuple[list[float], list[float]]:
    """ITM probability and ITC similarity of each (image owner[j], texts[j]) pair.

    image_embeds (B, Nimg, W) and image_feats (B, Nq, E) come from `encode_image`. Text is padded to
    max_txt_len (not to the longest in the batch), so a pair's score does not depend on its batch.
    """
    tok = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_txt_len,
                    return_tensors="pt")
    device = image_embeds.device
    ids, mask = tok["input_ids"].to(device), tok["attention_mask"].to(device)  # (N, T)
    idx = torch.tensor(list(owner), dtype=torch.long, device=device)  # (N,)
    itm = model.itm_scores(image_embeds[idx], ids, mask, probability=True)  # (N,)
    text_feat = model.encode_text(ids, mask).float()  # (N, E)
    itc = torch.einsum("nqe,ne->nq", image_feats[idx].float(), text_feat).amax(-1)  # (N, Nq) → (N,)
    return itm.float().cpu().tolist(), itc.cpu().tolist()


def eval_pixels_at_sizes(data: bytes, sizes: Sequence[int]) -> list[torch.Tensor]:
    """Evaluation pixels (3, S, S) of one stored image for each S in `sizes`, from a single decode.

    The decode is EvalTransform's for the largest size (a DCT reduction down to twice it), so that size's
    pixels equal `build_transform(S, train=False)(data)` and the smaller ones are resized from at least as
    many pixels as their own decode would keep. CorruptImageError when the bytes do not decode.
    """
    largest = max(sizes)
    pixels = decode_rgb_array(data, min_width=EVAL_REDUCING_GAP * largest, min_height=EVAL_REDUCING_GAP * largest,
                              scales=EVAL_DCT_SCALES)  # (H, W, 3) uint8
    box = (0, 0, pixels.shape[1], pixels.shape[0])
    return [normalize_pixels(resize_box(pixels, box, s)).contiguous() for s in sizes]


def passes(cand: Candidate, itm_threshold: float, itc_threshold: Optional[float] = None) -> bool:
    """The filter: ITM match probability >= itm_threshold and, when set, ITC similarity >= itc_threshold."""
    return cand.itm >= itm_threshold and (itc_threshold is None or cand.itc >= itc_threshold)


def select_captions(web: Optional[Candidate], synthetic: Sequence[Candidate], keep_top: int,
                    itm_threshold: float, itc_threshold: Optional[float] = None
                    ) -> tuple[list[Candidate], list[Candidate]]:
    """(kept, candidates): the web caption if it passes the filter, then the top `keep_top` synthetic
    captions by ITC (ties keep sampling order) that pass; `candidates` are that top-k before the filter."""
    kept = [web] if web is not None and passes(web, itm_threshold, itc_threshold) else []
    ranked = sorted(range(len(synthetic)), key=lambda j: -synthetic[j].itc)  # stable: ties by sample order
    candidates = [synthetic[j] for j in ranked[:keep_top]]
    kept += [c for c in candidates if passes(c, itm_threshold, itc_threshold)]
    return kept, candidates


def output_row(row: dict[str, Any], index: int, kept: Sequence[Candidate]) -> dict[str, Any]:
    """One row per image, as BLIP-2 stored its selection: the kept captions together in `captions` (web
    first, then synthetic ones by ITC rank), `caption` the first of them; readers draw one caption per
    visit (`blip_train.data.schema.draw_caption`), so an image with more kept captions is not seen more often.

    Caption-task rows whose answer is their caption (captioning targets) answer with the kept captions
    too; other rows keep their question/answer. `noisy` is 1 only when a web caption known to be wrong
    was kept (synthetic captions are not known to be wrong).
    """
    texts = [c.text for c in kept]
    out = {k: row[k] for k in COLUMNS if k in row}
    out["caption"], out["captions"] = texts[0], texts
    if row.get("task") == "caption" and row.get("answer") == row.get("caption"):
        out["answer"], out["answers"] = texts[0], texts
    out["source"] = CAPFILT_SOURCE
    out["noisy"] = int(row.get("noisy", 0)) if kept[0].source == "web" else 0
    out.update(orig_index=int(index), caption_sources=[c.source for c in kept],
               itm_scores=[float(c.itm) for c in kept], itc_scores=[float(c.itc) for c in kept])
    return out


@torch.no_grad()
def process_chunk(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                  samples: Sequence[tuple[int, dict[str, Any]]], settings: CapFiltSettings,
                  generator: Optional[torch.Generator] = None,
                  captioner: Optional[Captioner] = None) -> tuple[list[dict[str, Any]], CapFiltStats]:
    """Caption, score and select for (input index, row) samples; returns output rows (input order) and stats.

    `model` (with `tokenizer`) is the filter, and the captioner too unless `captioner` is given. `generator`
    (on the models' device) drives nucleus sampling; seed it from the chunk, not the rank.
    """
    stats = CapFiltStats()
    rows: list[dict[str, Any]] = []
    captioner = captioner or Captioner(model, tokenizer, settings.image_size)
    one_size = captioner.image_size == settings.image_size
    transform = build_transform(settings.image_size, train=False)
    device = next(model.parameters()).device
    top_p = settings.top_p if settings.sampling == "nucleus" else None
    k = settings.num_captions
    for start in range(0, len(samples), settings.batch_size):
        batch, pixels, cap_pixels = [], [], []
        for index, row in samples[start:start + settings.batch_size]:
            stats.add("images")
            try:  # decodes; only bad bytes raise CorruptImageError
                if one_size:
                    pixels.append(transform(row["image"]))
                else:
                    for_filter, for_captioner = eval_pixels_at_sizes(row["image"],
                                                                     (settings.image_size, captioner.image_size))
                    pixels.append(for_filter)
                    cap_pixels.append(for_captioner)
            except CorruptImageError:  # one bad image must not stop the run; a transform bug must
                stats.add("undecodable")
                continue
            batch.append((index, row))
        if not batch:
            continue
        px = torch.stack(pixels).to(device)  # (B, 3, H, W)
        image_embeds, image_feats = model.encode_image(px)  # (B, Nimg, W), (B, Nq, E)
        sampled: list[str] = []
        if k:
            cap_px = px if one_size else torch.stack(cap_pixels).to(device)  # (B, 3, Hc, Wc)
            cap_tok = captioner.tokenizer
            ids = captioner.model.generate_captions(cap_px, cap_tok.bos_token_id, cap_tok.sep_token_id,
                                                    cap_tok.pad_token_id, max_len=settings.max_len, top_p=top_p,
                                                    num_captions=k, generator=generator)  # (B*k, max_len), image-major
            # Text, not ids, crosses to the filter: score_captions re-tokenises with the filter's tokenizer.
            sampled = decode_captions(cap_tok, ids)

        # Candidates per image: the web caption (if any) and the distinct non-empty sampled ones.
        texts, owner, per_image = [], [], []
        for b, (_, row) in enumerate(batch):
            web = pre_caption(row.get("caption") or "")
            seen = {web} if web else set()
            synth = []
            for text in sampled[b * k:(b + 1) * k]:
                if not text:
                    stats.add("synthetic_empty")
                elif text in seen:
                    stats.add("synthetic_duplicates")
                else:
                    seen.add(text)
                    synth.append(text)
            stats.add("synthetic_generated", k)
            per_image.append((web, synth))
            for text in ([web] if web else []) + synth:
                texts.append(text)
                owner.append(b)
        itm, itc = score_captions(model, tokenizer, image_embeds, image_feats, texts, owner, settings.max_txt_len)

        j = 0
        for (index, row), (web_text, synth) in zip(batch, per_image):
            web = None
            if web_text:
                # The kept web caption is the original text; scoring read its cleaned form.
                web = Candidate(row["caption"], "web", itm[j], itc[j])
                j += 1
            cands = [Candidate(t, "synthetic", itm[j + n], itc[j + n]) for n, t in enumerate(synth)]
            j += len(synth)
            kept, top = select_captions(web, cands, settings.keep_top, settings.itm_threshold,
                                        settings.itc_threshold)
            _count(stats, row, web, kept, top, cands)
            if kept:
                rows.append(output_row(row, index, kept))
                stats.add("captions_kept", len(kept))
    stats.add("rows", len(rows))
    return rows, stats


def _count(stats: CapFiltStats, row: dict[str, Any], web: Optional[Candidate], kept: list[Candidate],
           top: list[Candidate], synthetic: list[Candidate]) -> None:
    """Add one image's outcome to the counters and histograms."""
    h = stats.histograms
    if web is None:
        stats.add("web_empty")
    else:
        web_kept = bool(kept) and kept[0] is web
        stats.add("web_kept" if web_kept else "web_dropped")
        flag = "noisy" if int(row.get("noisy", 0)) else "clean"
        stats.add(f"{flag}_web")
        if web_kept == (flag == "clean"):  # a clean caption kept, or a noisy one dropped
            stats.add("clean_web_kept" if flag == "clean" else "noisy_web_dropped")
        h[f"itm_web_{flag}"].add([web.itm])
        h[f"itc_web_{flag}"].add([web.itc])
    stats.add("synthetic_candidates", len(top))
    stats.add("synthetic_kept", sum(c.source == "synthetic" for c in kept))
    h["itm_synthetic"].add([c.itm for c in synthetic])
    h["itc_synthetic"].add([c.itc for c in synthetic])
