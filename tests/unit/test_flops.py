"""FLOP counting (training/flops.py) against torch's own FlopCounterMode, and the throughput/MFU
scalars the MetricLogger derives from it.

FlopCounterMode counts every matmul and attention kernel that really runs, forward and backward; it
does not see the fused CPU SDPA kernel, so these models use the `math` attention backend (and HF's
eager attention). The analytic count leaves out only the ITC similarity einsums (tiny).
"""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from blip_train.models.stage1 import Blip2Stage1
from blip_train.training.flops import (batch_tokens, build_flops_counter, llm_shape, peak_flops, stage1_flops,
                                       vision_tokens, vit_forward_flops)
from blip_train.training.metrics import PHASES, MetricLogger, StepTimer
from tests.helpers.tiny import tiny_model_config
from tests.unit.test_memory_savers import _batch

B = 3


def _measured(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_frozen_vit_forward_is_2n_per_token_plus_attention():
    cfg = tiny_model_config(attention="math")
    model = Blip2Stage1(cfg, device_type="cpu")
    x = torch.randn(B, 3, cfg.vision.image_size, cfg.vision.image_size)
    with torch.no_grad():
        measured = _measured(lambda: model.visual_encoder(x))
    assert vit_forward_flops(cfg.vision, B) == measured


@pytest.mark.parametrize("vision_frozen", [True, False])
def test_stage1_step_matches_flop_counter(vision_frozen):
    cfg = tiny_model_config(attention="math")
    cfg.vision.frozen = vision_frozen
    model = Blip2Stage1(cfg, device_type="cpu").train()
    batch = _batch(cfg)
    measured = _measured(lambda: model(batch)["loss"].backward())
    parts = stage1_flops(cfg, B, cfg.max_txt_len)
    # a trained ViT's first conv needs no input gradient: autograd skips it, the 6N rule does not
    conv_input_grad = 0 if vision_frozen else 2 * B * (vision_tokens(cfg.vision) - 1) * 3 * 8 ** 2 * 32
    assert sum(parts.values()) - conv_input_grad == pytest.approx(measured, rel=1e-3)
    assert parts["qformer"] > parts["vision"] > 0


def test_stage1_counter_counts_tokens_from_the_host_batch():
    cfg = tiny_model_config()
    batch = _batch(cfg)
    tokens, flops = build_flops_counter(cfg, Blip2Stage1(cfg, device_type="cpu"))(batch)
    assert tokens == B * vision_tokens(cfg.vision) + int(batch["text_mask"].sum())
    assert flops == sum(stage1_flops(cfg, B, cfg.max_txt_len).values())


@pytest.mark.parametrize("arch,kind,rel,frames", [("stage2", "opt", 1e-6, 0), ("instruct", "llama", 1e-4, 0),
                                                  ("stage2", "t5", 0.02, 0), ("instruct", "llama", 1e-4, 3)])
def test_llm_stage_matches_flop_counter(arch, kind, rel, frames):
    """Frozen LLM: matmuls 4N (forward + input gradient), attention 3x. For T5 the first decoder
    layer's self-attention needs no gradient at all (its input is the label embedding), which the
    count ignores: within 2% at this tiny size, less for real captions. Video (frames): every frame through
    the ViT and the Q-Former, frames x queries into the LLM."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from blip_train.models.llm_bridge import Blip2LLM
    from tests.unit.test_llm_bridge import bridge_config, make_batch, tiny_llm_config

    cfg = bridge_config(arch)
    cfg.attention, cfg.video_frames = "math", frames
    cls = AutoModelForSeq2SeqLM if kind == "t5" else AutoModelForCausalLM
    torch.manual_seed(0)
    model = Blip2LLM(cfg, cls.from_config(tiny_llm_config(kind), attn_implementation="eager"), device_type="cpu")
    batch = make_batch(cfg, model.decoder_only, arch == "instruct")
    if frames:
        batch["pixel_values"] = torch.stack([batch["pixel_values"].roll(f, -1) for f in range(frames)], dim=1)
    measured = _measured(lambda: model(batch)["loss"].backward())
    tokens, flops = build_flops_counter(cfg, model)(batch)
    assert flops == pytest.approx(measured, rel=rel)
    assert llm_shape(model.llm).encoder_decoder == (kind == "t5")
    assert tokens == batch_tokens(batch, vision_tokens(cfg.vision), decoder_targets=kind == "t5") > 0


def test_no_peak_known_on_cpu():
    assert peak_flops(torch.device("cpu")) is None


def test_step_timer_splits_time_by_phase():
    import time

    timer = StepTimer(cuda=False)
    for _ in range(2):
        timer.start()
        for phase in PHASES:
            if phase == "forward":
                time.sleep(0.02)
            timer.lap(phase)
    totals = timer.totals()
    assert set(totals) == set(PHASES) and totals["forward"] >= 0.04  # both sleeps, in their phase
    assert all(totals[p] < totals["forward"] for p in PHASES if p != "forward")
    assert timer.totals() == {p: 0.0 for p in PHASES}  # reset after reading


def test_logger_reports_throughput_breakdown_and_memory(tmp_path):
    logger = MetricLogger(tmp_path, True, False, samples_per_step=4, count_work=lambda batch: (100, 1e9))
    logger.reset_clock()
    logger.timer.start()
    logger.add_work({})
    for phase in PHASES:
        logger.timer.lap(phase)
    logger.add_losses({"loss": torch.tensor(1.5)})
    s = logger.log(step=1, lr=1e-4)
    assert s["train/loss"] == 1.5
    assert {f"perf/time_{p}_s" for p in PHASES} <= set(s)
    assert s["perf/tokens_per_s"] == pytest.approx(100 / s["perf/step_time_s"], rel=1e-6)
    assert s["perf/tflops_per_rank"] == pytest.approx(1e9 / s["perf/step_time_s"] / 1e12, rel=1e-6)
    assert "perf/mfu" not in s  # no known peak on CPU
    assert s["perf/peak_mem_gib"] == s["mem/peak_gib_rank0"] > 0
    assert (tmp_path / "metrics.jsonl").read_text().count("perf/tokens_per_s") == 1


def test_bench_compares_the_same_work_as_the_reference():
    """`make bench` times ours against transformers on identical weights and inputs: on a tiny preset
    the compared losses must agree (the timing itself is never a test)."""
    from bench.common import Preset, time_side_by_side, train_step_fn
    from bench.stage1 import build_stage1_pair, make_stage1_batch, ours_itc_itm, reference_itc_itm
    from bench.stage2 import build_stage2_pair, make_stage2_batch, ours_stage2, reference_stage2

    cfg = tiny_model_config()
    llm = dict(vocab_size=64, hidden_size=24, num_hidden_layers=1, ffn_dim=48, num_attention_heads=4,
               max_position_embeddings=64, word_embed_proj_dim=24)
    preset = Preset("tiny", cfg, batch_size=4, text_len=cfg.max_txt_len, llm=llm)
    cpu = torch.device("cpu")
    ours, ref, temp = build_stage1_pair(preset, cpu)
    batch = make_stage1_batch(preset, cpu)
    step_ours = train_step_fn(ours, lambda: ours_itc_itm(ours, batch))
    step_ref = train_step_fn(ref, lambda: reference_itc_itm(ref, temp, batch, cfg.max_txt_len))
    assert step_ours().item() == pytest.approx(step_ref().item(), abs=1e-5)
    assert ours.qformer.layers[0].self_attn.query.weight.grad is not None
    times = time_side_by_side({"ours": step_ours, "ref": step_ref}, warmup=0, reps=2, sync=lambda: None)
    assert all(len(v) == 2 for v in times.values())
    ours2, ref2 = build_stage2_pair(preset, cpu)
    batch2 = make_stage2_batch(preset, cpu)
    assert ours_stage2(ours2, batch2).item() == pytest.approx(reference_stage2(ref2, batch2).item(), abs=1e-5)


def test_rates_count_optimizer_steps_not_micro_batches(tmp_path):
    # 3 micro-batches per optimizer step (grad_accum_steps=3), resumed at step 10, logged at step 12
    import time

    logger = MetricLogger(tmp_path, True, False, samples_per_step=12, count_work=None)
    logger.reset_clock(step=10)
    for micro in range(6):
        logger.timer.start()
        time.sleep(0.01)
        for phase in PHASES:
            logger.timer.lap(phase)
        logger.add_losses({"loss": torch.tensor(float(micro))})
    s = logger.log(step=12, lr=1e-4)
    assert s["train/loss"] == pytest.approx(2.5)  # mean over the 6 micro-batches
    elapsed = s["perf/step_time_s"] * 2
    assert elapsed >= 0.06  # two steps of three 10 ms micro-batches each
    assert s["perf/samples_per_s"] == pytest.approx(2 * 12 / elapsed, rel=1e-6)
    phase_sum = sum(s[f"perf/time_{p}_s"] for p in PHASES)
    # per optimizer step (three 10 ms micro-batches), not per micro-batch, and within the step's time
    assert 0.03 <= phase_sum <= s["perf/step_time_s"] * 1.001


def test_blip_vqa_step_matches_flop_counter():
    """BLIP's VQA objective: the trained ViT, the image-grounded encoder on the questions and the answer decoder
    on every answer row (cross-attending to the question), all 6N; the counter reads the shapes from the batch."""
    from dataclasses import replace

    from blip_train.models.blip import BlipPretrain
    from tests.unit.test_blip_model import TOKENS, blip_config
    from tests.unit.test_blip_vqa import vqa_batch

    cfg = replace(blip_config(), objective="vqa", attention="math")
    model = BlipPretrain(cfg, TOKENS).train()
    batch = vqa_batch()
    measured = _measured(lambda: model(batch)["loss"].backward())
    tokens, flops = build_flops_counter(cfg, model)(batch)
    conv_input_grad = 2 * 3 * (vision_tokens(cfg.vision) - 1) * 3 * 8 ** 2 * 32  # see the stage-1 test
    assert flops - conv_input_grad == pytest.approx(measured, rel=1e-3)
    assert tokens == 3 * vision_tokens(cfg.vision) + int(batch["question_mask"].sum() + batch["answer_mask"].sum())
