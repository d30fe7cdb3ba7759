"""After `make demo`: tools/export_hf.py on each generative demo stage writes a folder that transformers
loads (no missing / unexpected keys) and generates from with its saved processor. Skipped for stages
the demo has not produced (runs/demo/<stage>/checkpoints)."""
from __future__ import annotations

import io
import subprocess
import sys

import pytest

from tests.conftest import REPO, clean_env

pytestmark = [pytest.mark.dist, pytest.mark.e2e]
DEMO = REPO / "runs" / "demo"


@pytest.mark.parametrize("stage", ["stage2_opt", "stage2_t5", "instruct_llama", "instruct_t5"])
def test_demo_checkpoint_exports_and_generates(stage, tmp_path):
    import torch
    from PIL import Image
    from streaming import StreamingDataset
    from transformers import AutoConfig, AutoProcessor

    from tests.parity.test_export_hf_models import load_hf

    run = DEMO / stage
    if not (run / "checkpoints" / "latest").is_file():
        pytest.skip(f"{run} has no checkpoint (run `make demo` first)")
    out = tmp_path / stage
    r = subprocess.run([sys.executable, str(REPO / "tools" / "export_hf.py"), "--checkpoint", str(run),
                        "--out", str(out)], capture_output=True, text=True, env=clean_env(), cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    model = load_hf(out)
    assert AutoConfig.from_pretrained(out).architectures[0] == type(model).__name__
    processor = AutoProcessor.from_pretrained(str(out))
    val = StreamingDataset(local=str(DEMO / "data" / "val"), shuffle=False, batch_size=1)
    image = Image.open(io.BytesIO(val[0]["image"]))  # MDS stores the encoded image bytes
    text = "What is in the picture?" if stage.startswith("instruct") else ""
    inputs = processor(images=[image.convert("RGB")], text=[text], return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=12, num_beams=2)
    words = processor.batch_decode(ids, skip_special_tokens=True)
    assert len(words) == 1 and words[0].strip(), words
