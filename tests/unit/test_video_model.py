"""Video through the LLM stages (model.video_frames): each frame through the ViT and the Q-Former, a learned
frame-position embedding added to its query outputs, the frames' queries concatenated in time order; the
reader gives every frame of a clip the same crop."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from blip_train.models.llm_bridge import Blip2LLM, load_llm
from tests.unit.test_llm_bridge import bridge_config, llm_dirs, make_batch  # noqa: F401 (fixture)

FRAMES = 3


def build_video(kind: str, llm_dirs, frames: int = FRAMES) -> Blip2LLM:  # noqa: F811
    cfg = replace(bridge_config("instruct", str(llm_dirs[kind])), video_frames=frames)
    torch.manual_seed(0)
    return Blip2LLM(cfg, load_llm(cfg.llm, "cpu"), device_type="cpu").eval()


def test_a_single_frame_video_is_the_image_path(llm_dirs):  # noqa: F811
    """With the frame embeddings at their start (zeros), one frame gives exactly the image's soft prompt; with
    several frames, each frame's queries follow in time order, shifted by that frame's embedding."""
    model = build_video("llama", llm_dirs)
    batch = make_batch(bridge_config("instruct"), decoder_only=True, instruct=True)
    px, ids, mask = batch["pixel_values"], batch["qformer_input_ids"], batch["qformer_attention_mask"]
    with torch.no_grad():
        image = model.soft_prompt(px, ids, mask)  # (B, Nq, H)
        one = model.soft_prompt(px[:, None], ids, mask)
        assert torch.equal(one, image)
        model.frame_pos.normal_()
        clip = torch.stack([px, px.flip(-1), px], dim=1)  # (B, 3, 3, H, W)
        video = model.soft_prompt(clip, ids, mask)  # (B, 3*Nq, H)
    nq = image.shape[1]
    assert video.shape == (px.shape[0], FRAMES * nq, image.shape[2])
    with torch.no_grad():
        for f in range(FRAMES):
            frame = model.soft_prompt(clip[:, f], ids, mask)  # the frame alone, as an image
            shift = model.llm_proj.weight @ model.frame_pos[f]  # the embedding through the projection
            assert torch.allclose(video[:, f * nq:(f + 1) * nq], frame + shift, atol=1e-5), f
    # The same frame at another place in the clip reads differently: the order is seen.
    assert not torch.allclose(video[:, :nq], video[:, 2 * nq:])


def test_video_trains_the_frame_embeddings_and_refuses_too_many_frames(llm_dirs):  # noqa: F811
    model = build_video("llama", llm_dirs).train()
    batch = make_batch(bridge_config("instruct"), decoder_only=True, instruct=True)
    px = batch["pixel_values"]
    batch["pixel_values"] = torch.stack([px, px.roll(1, -1), px.roll(2, -1)], dim=1)
    model(batch)["loss"].backward()
    assert model.frame_pos.grad is not None and (model.frame_pos.grad.abs().sum(1) > 0).all()
    with pytest.raises(ValueError, match=r"4 video frames per sample, this model takes 3 \(model.video_frames\)"):
        model.soft_prompt(torch.zeros(1, 4, *px.shape[1:]), batch["qformer_input_ids"][:1],
                          batch["qformer_attention_mask"][:1])
    image_model = Blip2LLM(bridge_config("instruct", str(llm_dirs["llama"])),
                           load_llm(bridge_config("instruct", str(llm_dirs["llama"])).llm, "cpu"), device_type="cpu")
    assert image_model.frame_pos is None and "frame_pos" not in dict(image_model.named_parameters())


def test_reader_gives_every_frame_of_a_clip_the_same_crop(tmp_path):
    """A clip of one picture repeated: the training transform's random crop and flip are drawn once per clip, so
    all frames come out identical; and a row with another number of frames is refused naming the flag."""
    import io

    import numpy as np
    from PIL import Image

    from blip_train.data.datasets import SchemaDataset
    from blip_train.data.device import build_train_transform
    from blip_train.data.schema import write_split
    from blip_train.data.video import VIDEO_COLUMNS

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
    jpeg = buf.getvalue()
    rows = [{"image": jpeg, "frames": jpeg * 2, "frame_sizes": [len(jpeg)] * 2, "frame_times": [0.5, 1.5, 2.5],
             "image_id": i, "question": "q", "answer": "a", "answers": ["a"], "task": "vqa"} for i in range(4)]
    write_split(tmp_path / "clips", rows, extra_columns=VIDEO_COLUMNS)
    transform = build_train_transform(32, 0.3, True, "cpu")
    ds = SchemaDataset(local=str(tmp_path / "clips"), transform=transform, frames=3, batch_size=1, shuffle=False)
    for i in range(4):
        px = ds[i]["pixel_values"]
        assert px.shape == (3, 3, 32, 32) and torch.equal(px[0], px[1]) and torch.equal(px[1], px[2])
    with pytest.raises(ValueError, match="--frames 4"):
        SchemaDataset(local=str(tmp_path / "clips"), transform=transform, frames=4, batch_size=1, shuffle=False)[0]
