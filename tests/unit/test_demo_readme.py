"""README.md's demo results are written from a run's summary.json, between markers, never by hand."""
from __future__ import annotations

import pytest

from blip_train.demo.readme import BEGIN, END, render_results, update_readme
from tests.conftest import REPO


def summary() -> dict:
    def stage(steps, loss0, loss1, name, trained, untrained, chance):
        return {"world_size": 2, "zero_stage": 3, "steps": steps, "initial_loss": loss0, "final_loss": loss1,
                "checkpoint": f"runs/demo/x/checkpoints/step_{steps:07d}", "train_seconds": steps * 1.2,
                "metrics": {"primary": {"name": name, "trained": trained, "untrained": untrained, "chance": chance}}}
    return {"wall_seconds": 780.0,
            "stages": {"stage1": stage(400, 11.321, 4.468, "text->image R@1 (%)", 10.64, 0.45, 0.4545),
                       "instruct_t5": stage(300, 1.02, 0.42, "VQA accuracy (%)", 41.1, 24.7, 12.3),
                       "finetune_retrieval": stage(100, 6.2, 4.9, "text->image R@1 (%) (striped split)", 9.5, 4.0,
                                                   0.5)},
            "export": {"instruct_t5": {"class": "InstructBlipForConditionalGeneration", "missing_keys": 0,
                                       "unexpected_keys": 0, "generated": "red"}},
            "seeds": {"primary": {"seeds": [0, 1, 2], "stages": {
                "stage1": {"trained_min": 9.1, "trained_max": 11.0, "untrained_max": 0.9, "chance": 0.45}}}}}


def test_results_block_is_rendered_from_the_summary():
    text = render_results(summary())
    assert "(16 minutes of training over the 3 stages" in text  # (400 + 300 + 100) x 1.2 s: not the wall time
    assert "| `stage1` | 400 | 11.32 → 4.47 | text→image R@1 (%) | 10.6 | 0.5 | 0.5 |" in text
    assert "| `instruct_t5` | 300 | 1.02 → 0.42 | VQA accuracy (%) | 41.1 | 24.7 | 12.3 |" in text
    assert ("| `finetune_retrieval` | 100 | 6.20 → 4.90 | text→image R@1 (%) (striped split) | 9.5 | 4.0 | 0.5 |"
            in text)
    assert "Across run.seed 0, 1, 2 (primary): `stage1` trained 9.1–11.0 vs untrained ≤ 0.9" in text
    assert '"generated": "red"' in text and text.count("```") == 2


def test_update_replaces_only_the_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{BEGIN}\nold table\n{END}\nrest\n")
    assert update_readme(readme, summary())
    text = readme.read_text()
    assert text.startswith(f"intro\n{BEGIN}\nA run on this") and text.endswith(f"{END}\nrest\n") and "old" not in text
    assert not update_readme(readme, summary())  # unchanged: nothing written
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="no demo results block"):
        update_readme(readme, summary())


def test_the_projects_readme_has_the_block():
    text = (REPO / "README.md").read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1 and text.index(BEGIN) < text.index(END)
