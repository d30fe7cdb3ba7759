"""The device end of the image pipeline: uint8 batches normalised on the device, data.decode=gpu (the encoded
path, exercised on the CPU with torchvision's CPU decoder; nvJPEG in the gpu-marked test), its refusal
without CUDA, and data.num_workers=auto."""
from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from blip_train.config import ConfigError, load_config
from blip_train.config.schema import DataConfig, StreamConfig
from blip_train.data.collate import collate_samples
from blip_train.data.datasets import build_train_loader, resolve_num_workers
from blip_train.data.device import (EncodedCrop, GpuDecodeTransform, build_train_transform, check_gpu_decode,
                                    collate_images, finish_batch)
from blip_train.data.schema import write_split
from blip_train.data.synthetic import make_sample
from blip_train.data.transforms import TrainTransform, normalize_pixels
from tests.unit.test_data_transforms import jpeg, photo


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _samples(transform, images, seed=0):
    return [{"pixel_values": transform(data, torch.Generator().manual_seed(seed + i)), "image_id": i}
            for i, data in enumerate(images)]


def test_gpu_transform_leaves_jpegs_encoded_with_the_cpu_paths_draws():
    data = jpeg(photo(800, 600))
    enc = GpuDecodeTransform(64)(data, torch.Generator().manual_seed(7))
    assert isinstance(enc, EncodedCrop) and (enc.width, enc.height, enc.size) == (800, 600, 64)
    assert enc.spec == TrainTransform(64).draw(800, 600, torch.Generator().manual_seed(7))
    assert GpuDecodeTransform(64)(_png(photo(80, 60)), torch.Generator()).dtype == torch.uint8  # PNG: CPU
    cut = GpuDecodeTransform(64)
    with pytest.raises(Exception, match="."):  # cut short: decoded here, so the reader counts it corrupt
        cut(data[: len(data) // 2], torch.Generator())
    assert isinstance(build_train_transform(64, 0.5, True, "cpu"), TrainTransform)
    with pytest.raises(ValueError, match="data.decode"):
        build_train_transform(64, 0.5, True, "tpu")


def test_encoded_batch_decodes_to_the_cpu_paths_crops():
    """The same images through data.decode=gpu (decoded here by torchvision on the CPU: the code of the GPU
    path but the device) and through the CPU path: same crops and flips, pixels within a few grey levels."""
    images = [jpeg(photo(1200, 900)), _png(photo(100, 140)), jpeg(photo(640, 480)), jpeg(photo(500, 700))]
    cpu = collate_samples(_samples(TrainTransform(224), images))
    gpu = collate_samples(_samples(GpuDecodeTransform(224), images))
    assert cpu["pixel_values"].dtype == gpu["pixel_values"].dtype == torch.uint8
    assert gpu["jpeg_crops"].rows == [0, 2, 3] and "jpeg_crops" not in cpu
    assert torch.equal(gpu["pixel_values"][1], cpu["pixel_values"][1])  # the PNG went through the CPU path
    done_cpu, done_gpu = finish_batch(cpu), finish_batch(gpu)
    assert "jpeg_crops" not in done_gpu and done_gpu["image_id"].tolist() == [0, 1, 2, 3]
    assert done_cpu["pixel_values"].dtype == done_gpu["pixel_values"].dtype == torch.float32
    grey_level = 1 / 255 / 0.27  # in normalised units
    diff = (done_cpu["pixel_values"] - done_gpu["pixel_values"]).abs().mean(dim=(1, 2, 3))  # (B,)
    assert diff.max() < 3 * grey_level, diff
    # all encoded: the batch still knows its crop size
    only = collate_images(_samples(GpuDecodeTransform(32), [images[0], images[2]]))
    assert finish_batch(only)["pixel_values"].shape == (2, 3, 32, 32)


def test_finish_batch_normalises_uint8_and_passes_floats():
    px = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    out = finish_batch({"pixel_values": px, "text_ids": torch.ones(2, 3, dtype=torch.long)})
    assert torch.equal(out["pixel_values"], normalize_pixels(px)) and out["text_ids"].dtype == torch.long
    floats = torch.randn(2, 3, 8, 8)
    assert finish_batch({"pixel_values": floats})["pixel_values"] is floats


def test_gpu_decode_is_refused_in_one_line_without_cuda(tmp_path):
    with pytest.raises(ConfigError, match=r"^data.decode: gpu needs a CUDA device .*use data.decode=cpu\)$"):
        load_config(None, ["run.device=cpu", "data.decode=gpu"])
    with pytest.raises(ConfigError, match="data.decode: 'nvjpeg' is not one of cpu, gpu"):
        load_config(None, ["data.decode=nvjpeg"])
    with pytest.raises(ConfigError, match=r"^data.decode: gpu needs a CUDA device \(this run is on cpu\)"):
        check_gpu_decode(torch.device("cpu"))
    if not torch.cuda.is_available():
        split = tmp_path / "s"
        write_split(split, (make_sample(i, seed=0, image_size=16) for i in range(8)))
        cfg = DataConfig(train=[StreamConfig(local=str(split))], image_size=16, num_workers=0, decode="gpu")
        with pytest.raises(ConfigError, match="^data.decode: gpu needs a CUDA device"):
            build_train_loader(cfg, 4)


def test_loader_batches_are_uint8_and_the_same_through_both_decoders(tmp_path):
    split = tmp_path / "s"
    write_split(split, (make_sample(i, seed=0, image_size=48) for i in range(12)))
    cfg = DataConfig(train=[StreamConfig(local=str(split))], image_size=32, num_workers=0)
    cpu = next(iter(build_train_loader(cfg, 6)))
    loader = build_train_loader(cfg, 6)
    loader.dataset.transform = GpuDecodeTransform(32)  # what data.decode=gpu builds, decoded here on the CPU
    gpu = next(iter(loader))
    assert cpu["pixel_values"].dtype == torch.uint8 and cpu["image_id"].tolist() == gpu["image_id"].tolist()
    assert len(gpu["jpeg_crops"].rows) == 6
    diff = (finish_batch(cpu)["pixel_values"] - finish_batch(gpu)["pixel_values"]).abs().mean()
    assert diff < 3 / 255 / 0.27


@pytest.mark.gpu
def test_nvjpeg_decode_matches_the_cpu_path_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    device = torch.device("cuda", torch.cuda.current_device())
    check_gpu_decode(device)
    images = [jpeg(photo(1600, 1200)), jpeg(photo(640, 480)), _png(photo(90, 120)), jpeg(photo(700, 1000))] * 8
    cpu = finish_batch(collate_samples(_samples(TrainTransform(224), images)))["pixel_values"]
    gpu_batch = collate_samples(_samples(GpuDecodeTransform(224), images))
    on_device = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in gpu_batch.items()}
    gpu = finish_batch(on_device)["pixel_values"]
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32 and gpu.shape == (32, 3, 224, 224)
    diff = (gpu.cpu() - cpu).abs().mean(dim=(1, 2, 3))  # (B,) in normalised units
    grey_level = 1 / 255 / 0.27
    # The CPU path decodes at 1/2 where the crop allows and rounds that box to whole decoded pixels (within
    # one stored pixel of the drawn box): a sub-pixel shift, up to ~6 grey levels on one crop of this sharp
    # photo; the GPU decodes at full size and resizes the exact box.
    assert diff.mean() < 3 * grey_level and diff.max() < 8 * grey_level, diff


def test_num_workers_auto_follows_the_cpus_of_the_rank():
    assert resolve_num_workers(3, 8, environ={}, cpus=64) == 3
    assert resolve_num_workers(0, 8, environ={}, cpus=64) == 0
    # torchrun / deepspeed launcher / no launcher: the node's ranks share the CPUs
    assert resolve_num_workers("auto", 8, environ={"TORCHELASTIC_RUN_ID": "x"}, cpus=96) == 11
    assert resolve_num_workers("auto", 1, environ={}, cpus=2) == 1
    assert resolve_num_workers("auto", 4, environ={}, cpus=2) == 1  # at least one
    assert resolve_num_workers("auto", 1, environ={}, cpus=256) == 16  # capped
    # srun one task per rank: SLURM_CPUS_PER_TASK is this rank's own
    slurm = {"SLURM_CPUS_PER_TASK": "12", "SLURM_PROCID": "3"}
    assert resolve_num_workers("auto", 8, environ=slurm, cpus=12) == 11
    # srun + torchrun: one task per node shared by its ranks
    assert resolve_num_workers("auto", 8, environ={**slurm, "SLURM_CPUS_PER_TASK": "96", "GROUP_RANK": "0"},
                               cpus=96) == 11


def test_num_workers_config_takes_a_count_or_auto():
    assert load_config(None, []).data.num_workers == "auto"
    assert load_config(None, ["data.num_workers=4"]).data.num_workers == 4
    with pytest.raises(ConfigError, match="data.num_workers: expected a number of workers or auto, got 'many'"):
        load_config(None, ["data.num_workers=many"])
    with pytest.raises(ConfigError, match="data.num_workers: must be >= 0"):
        load_config(None, ["data.num_workers=-2"])
    with pytest.raises(ConfigError, match="data.num_workers: expected int or str"):
        load_config(None, ["data.num_workers=[1]"])
