"""tools/make_qformer_tokenizer.py: a Q-Former tokenizer trained on a split's texts or a text file, or made from
a BERT vocab.txt, loads as training loads it ([DEC] added); bad input is one line, exit 2, nothing written."""
from __future__ import annotations

import json
import subprocess
import sys

from blip_train.data.schema import write_split
from blip_train.data.synthetic import make_sample
from blip_train.data.tokenizers import load_qformer_tokenizer
from tests.conftest import REPO, clean_env

TOOL = REPO / "tools" / "make_qformer_tokenizer.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], env=clean_env(), capture_output=True, text=True,
                          timeout=300)


def test_from_a_split_a_text_file_and_a_vocab(tmp_path):
    write_split(tmp_path / "split", (make_sample(i, seed=0, image_size=16) for i in range(30)))
    r = _run("--from-text", str(tmp_path / "split"), "--vocab-size", "200", "--out", str(tmp_path / "tok"))
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    tok = load_qformer_tokenizer(tmp_path / "tok")
    assert summary["tokens"] == len(tok) and "[DEC]" in tok.get_vocab() and len(tok) <= 201
    caption = make_sample(0, seed=0, image_size=16)["caption"]
    pieces = tok.tokenize(caption)
    assert "[UNK]" not in pieces and tok.convert_tokens_to_string(pieces) == caption.lower()

    (tmp_path / "texts.txt").write_text("the red square\n\nthe blue circle\n")
    assert _run("--from-text", str(tmp_path / "texts.txt"), "--vocab-size", "60", "--out",
                str(tmp_path / "tok2")).returncode == 0
    assert load_qformer_tokenizer(tmp_path / "tok2").tokenize("the blue square") == ["the", "blue", "square"]

    vocab = [line for line in (tmp_path / "tok" / "vocab.txt").read_text().splitlines()]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    r = _run("--vocab", str(tmp_path / "vocab.txt"), "--out", str(tmp_path / "tok3"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert load_qformer_tokenizer(tmp_path / "tok3").tokenize(caption) == pieces


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "taken").mkdir()
    for args, says in ((("--from-text", str(tmp_path / "gone")), "no such MDS split or text file"),
                       (("--from-text", str(tmp_path / "empty.txt")), "no texts to train on"),
                       (("--from-text", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "taken")),
                        "exists; pass --overwrite")):
        out = [] if "--out" in args else ["--out", str(tmp_path / "tok")]
        r = _run(*args, *out)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and says in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "taken"]
