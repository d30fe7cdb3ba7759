"""tools/answer_list.py: the most frequent training answers as eval.answer_list reads them."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO, clean_env


def _tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "answer_list.py"), *args], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=300)


def test_most_frequent_answers_first_from_annotations_and_splits(tmp_path, tiny_assets):
    from blip_train.evaluation.generative_eval import read_answer_list
    from tests.helpers.tiny_run import make_tiny_assets

    anns = [{"multiple_choice_answer": a, "answers": []} for a in ["yes"] * 3 + ["2"] * 2 + [" t-shirt "]]
    (tmp_path / "a.json").write_text(json.dumps({"annotations": anns}))
    r = _tool("--annotations", str(tmp_path / "a.json"), "--top", "2", "--out", str(tmp_path / "list.json"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "list.json").read_text()) == ["yes", "2"]
    assert json.loads(r.stdout.strip().splitlines()[-1])["questions_covered"] == 5
    assert read_answer_list(str(tmp_path / "list.json")) == ["yes", "2"]

    val = str(make_tiny_assets(tiny_assets)["data"] / "val")
    r = _tool("--annotations", str(tmp_path / "a.json"), "--data", val, "--out", str(tmp_path / "both.json"))
    assert r.returncode == 0, r.stderr
    both = json.loads((tmp_path / "both.json").read_text())
    assert both[0] == "yes" and "t-shirt" in both and len(both) > 3 and len(set(both)) == len(both)

    refused = _tool("--annotations", str(tmp_path / "a.json"), "--out", str(tmp_path / "list.json"))
    assert refused.returncode == 2 and "exists" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    (tmp_path / "bad.json").write_text(json.dumps([1, 2]))
    bad = _tool("--annotations", str(tmp_path / "bad.json"), "--out", str(tmp_path / "x.json"))
    assert bad.returncode == 2 and "expected a VQA annotations file" in bad.stderr and not (tmp_path / "x.json").exists()
