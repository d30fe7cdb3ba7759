"""Caption tokenisation the way the COCO caption evaluation does it, without Java.

The COCO pipeline (coco-caption / pycocoevalcap) runs Stanford CoreNLP 3.4.1's PTBTokenizer with
`-preserveLines -lowerCase` over every caption and then drops the tokens in `COCO_PUNCTUATION`.
BLEU and CIDEr are computed on the resulting space-joined strings, so the tokenisation decides which
n-grams exist: "man's" must become "man 's", "don't" must become "do n't", a final "." must vanish,
but "mr." and "3,000" must stay whole.

This is a rule-based re-implementation of the parts of the PTB lexer that matter for captions:
clitics, punctuation splitting, bracket escapes, quotes, abbreviations, numbers and currency. It
matches the Java tokenizer on the cases in tests/unit/test_caption_metrics.py (outputs recorded
from the real pipeline). Known gaps, all rare in captions: the Java lexer decides "a." vs "a ." at a
line end by peeking at the *next* caption in the batch (we keep the initial); "y'all", "'tis",
"rock'n'roll" are left whole; runs of dots inside a word ("k...l") are left whole.
"""
from __future__ import annotations

import re

# The removal list of the COCO pipeline. It is compared after lowercasing, so "-LRB-" etc. never
# match the lowercased "-lrb-" the tokenizer emits: brackets survive as tokens in the reference
# implementation, and we keep them too so that scores agree.
COCO_PUNCTUATION = frozenset({"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?",
                              "!", ",", ":", "-", "--", "...", ";"})

# The Java lexer normalises these characters before splitting (curly quotes to ASCII, dashes to
# "--", the ellipsis to "...", euro to "$" and pound to "#", as PTB-3 escaping does).
_CHAR_MAP = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'",
                           "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u2013": " -- ",
                           "\u2014": " -- ", "\u2026": " ... ", "\u20ac": "$", "\u00a3": "#",
                           "\u00a0": " ", "\t": " ", "\n": " ", "\r": " "})

_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}

# Characters that always stand alone, wherever they occur ("x+y" -> "x + y", "a&b" -> "a & b").
_ALWAYS_SPLIT = re.compile(r"""(--+|``|''|"|[()\[\]{}+=<>~^|*&])""")

# Abbreviations whose final period the lexer keeps in the middle of a line (recorded from the
# Java tokenizer). Words like "approx.", "fig.", "sat." are NOT in its list and get split.
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr vs etc inc ltd co corp jan feb mar apr jun jul aug sep sept oct nov dec "
    "mon tue tues wed thu thurs fri ave blvd mt ft rd prof gen sen rep gov capt lt col sgt supt "
    "est dept univ sq bros ph.d cf al hon messrs mme mlle tel wm".split())
_ACRONYM = re.compile(r"[a-z](\.[a-z])+")                       # u.s, e.g, a.m, u.s.a

# Clitics split off the end of a word, PTB style: "don't" -> "do n't", "i'd've" -> "i 'd 've".
_CLITIC = re.compile(r"^(.+)(n't|'s|'re|'ll|'ve|'m|'d)$", re.IGNORECASE)
# Whole words the lexer splits into two tokens.
_SPLIT_WORDS = {"cannot": ("can", "not"), "'tis": ("'t", "is"), "'twas": ("'t", "was"),
                "y'all": ("y'", "all"), "gonna": ("gon", "na"), "wanna": ("wan", "na"),
                "gotta": ("got", "ta"), "gimme": ("gim", "me"), "lemme": ("lem", "me")}
# Words starting with an apostrophe that are words, not an opening quote.
# Standalone clitics ("man 's") also count: the lexer keeps them whole after a space.
_APOSTROPHE_WORDS = re.compile(r"'(em|cause|n|\d+s|tis|twas|s|re|ll|ve|m|d)", re.IGNORECASE)
_INNER_N = re.compile(r"^(\w+)('n')(\w+)$", re.IGNORECASE)      # "rock'n'roll" -> "rock 'n' roll"

_TIME_SUFFIX = re.compile(r"^(\d+:\d+)(am|pm)$", re.IGNORECASE)   # "10:00am" -> "10:00 am"


def _keeps_period(base: str, next_chunk: str) -> bool:
    """Whether "base." stays one token (an abbreviation) rather than "base" + ".".

    After a known abbreviation the lexer keeps the period even at a sentence end (it then adds a
    separate "." that the COCO filter drops anyway). A lone letter is an initial ("j. smith",
    "A. B.") unless a capitalised word follows, which marks a sentence end ("a. The").
    """
    low = base.lower()
    if low in _ABBREVIATIONS or _ACRONYM.fullmatch(low):
        return True
    if len(low) == 1 and low.isalpha():
        return not (next_chunk[:1].isupper() and len(next_chunk.rstrip(".")) > 1)
    return low == "no" and next_chunk[:1].isdigit()              # "no. 5", but "no." alone splits


def _split_middle(word: str) -> list[str]:
    """Split a chunk whose leading and trailing punctuation has already been peeled."""
    if not word:
        return []
    if word.lower() in _SPLIT_WORDS:
        return list(_SPLIT_WORDS[word.lower()])
    pair = _TIME_SUFFIX.match(word) or _INNER_N.match(word)
    if pair:
        return list(pair.groups())
    # Commas and colons split unless they sit between digits ("3,000", "3:30" stay whole).
    parts = re.split(r"((?<!\d)[,:]|[,:](?!\d))", word)
    if len(parts) > 1:
        return [t for p in parts for t in (_split_middle(p) if p not in (",", ":") else [p])]
    # The lexer attaches an inner semicolon to the following text ("c;d" -> "c ;d").
    if ";" in word[1:]:
        i = word.index(";", 1)
        return _split_middle(word[:i]) + [word[i:]]
    clitics: list[str] = []
    while True:
        m = _CLITIC.match(word)                                   # greedy: last clitic first
        if not m:
            break
        clitics.insert(0, m.group(2))
        word = m.group(1)
    return [word] + clitics


def _split_chunk(chunk: str, next_chunk: str) -> list[str]:
    """Tokenise one whitespace-free chunk; `next_chunk` is the following one ('' at line end)."""
    if chunk in _BRACKETS:
        return [_BRACKETS[chunk]]
    if _ALWAYS_SPLIT.fullmatch(chunk):
        return ["``" if chunk in ('"', "``", "''") else chunk]
    head: list[str] = []
    tail: list[str] = []
    while chunk:                                                  # peel leading punctuation
        if chunk[0] == "'" and len(chunk) > 1 and not _APOSTROPHE_WORDS.fullmatch(chunk):
            head.append("`")
            chunk = chunk[1:]
        elif chunk[0] in ",;:-" and len(chunk) > 1:
            head.append(chunk[0])
            chunk = chunk[1:]
        elif chunk[0] in "$#" and chunk[1:2].isdigit():
            head.append(chunk[0])
            chunk = chunk[1:]
        elif chunk[0] == "." and len(chunk) > 1 and not chunk[1].isdigit() and chunk[1] != ".":
            head.append(".")
            chunk = chunk[1:]
        else:
            break
    while chunk:                                                  # peel trailing punctuation
        if m := re.search(r"[?!]+$", chunk):
            if m.start() == 0:
                break
            tail.insert(0, m.group())
            chunk = chunk[:m.start()]
        elif m := re.search(r"\.\.+$", chunk):
            # Every dot run is dropped later, so its exact split ("..", ". .", "...") is moot.
            tail.insert(0, "...")
            chunk = chunk[:m.start()]
        elif len(chunk) > 1 and (chunk[-1] in ",;:%-'"
                                 or chunk[-1] == "$" and chunk[-2].isdigit()):   # "5$", not "us$"
            tail.insert(0, chunk[-1])                             # "girls'" -> "girls" "'"
            chunk = chunk[:-1]
        elif len(chunk) > 1 and chunk[-1] == ".":
            if _keeps_period(chunk[:-1], next_chunk):
                break
            tail.insert(0, ".")
            chunk = chunk[:-1]
        else:
            break
    return head + _split_middle(chunk) + tail


def ptb_tokenize(text: str) -> str:
    """Lowercased PTB tokens of one caption, COCO punctuation removed, joined by single spaces.

    >>> ptb_tokenize("The man's hat isn't red; it's blue!")
    "the man 's hat is n't red it 's blue"
    """
    text = _ALWAYS_SPLIT.sub(r" \1 ", text.translate(_CHAR_MAP))
    chunks = text.split()
    tokens: list[str] = []
    for i, chunk in enumerate(chunks):
        tokens.extend(_split_chunk(chunk, chunks[i + 1] if i + 1 < len(chunks) else ""))
    # Lowercase first, then filter: this order is what lets "-lrb-" through in the reference.
    return " ".join(t for t in (t.lower() for t in tokens) if t and t not in COCO_PUNCTUATION)
