"""The training loop: batch → engine(batch) → backward → step → maybe log / save / stop.

All set-up lives in `build_*` functions; this file only runs them in order and loops. Every rank
executes the same sequence of collectives (loss reduction on logging steps, the preemption vote each
step, saves), so ZeRO-3 and gloo/NCCL never wait on a rank that took another branch.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from blip_train.config import (ConfigError, ExperimentConfig, check_input_paths, check_output_dir, config_to_dict,
                               config_warnings)
from blip_train.config.changes import check_resume_config, record_config
from blip_train.config.validate import check_queue_fits_world
from blip_train.data.datasets import check_canonical_nodes, check_local_splits, check_remote_splits, remove_job_cache
from blip_train.data.device import finish_batch
from blip_train.distributed.env import discover_environment, export_environment
from blip_train.distributed.preemption import PreemptionHandler, start_resource_tracker
from blip_train.distributed.process_group import all_reduce_max_bool, describe_placement, init_distributed, print0
from blip_train.distributed.world import build_world_info
from blip_train.distributed.zero import hf_zero3_loading
from blip_train.evaluation.in_training import check_eval_split, evaluate_during_training
from blip_train.models.llm_bridge import llm_dtype
from blip_train.training.checkpoint import (TrainState, convert_to_universal, find_resume_tag, load_checkpoint,
                                            read_meta, save_checkpoint)
from blip_train.training.console import mirror_console, quiet_deepspeed, without_build_chatter
from blip_train.training.engine import apply_lr_, apply_parameter_bounds_, build_ds_config, build_engine, lr_at
from blip_train.training.flops import build_flops_counter
from blip_train.training.host_memory import MemoryTrace, keep_allocator_lean
from blip_train.training.metrics import MetricLogger, start_wandb
from blip_train.training.momentum import has_momentum, update_momentum_
from blip_train.training.seeding import seed_everything
from blip_train.training.stages import build_stage, describe_parameters


class NonFiniteLossError(RuntimeError):
    pass


def _any_rank(flag: bool) -> bool:
    """True on every rank if it is True on any rank (a vote all ranks take part in; on the device NCCL needs)."""
    return all_reduce_max_bool(flag)


def _forever(loader) -> Iterator[dict]:
    """Epoch after epoch; the streaming loader's state_dict knows the epoch and position."""
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise RuntimeError("the training data yielded no batch (is data.train empty or smaller than one batch?)")


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def train_step(engine, batches: Iterator[dict], cfg: ExperimentConfig, state: TrainState,
               logger: MetricLogger) -> None:
    """One optimizer step over grad_accum_steps micro-batches; a non-finite micro-batch is skipped on all ranks."""
    done, bad_in_row = 0, 0
    apply_lr_(engine.optimizer, state.step, cfg)  # from the step counter: exact on resume, after skipped steps
    momentum = has_momentum(engine.module)
    if momentum:
        engine.module.train_step = state.step  # the distillation weight ramps with it
    timer = logger.timer  # phase laps; no device sync here (see StepTimer)
    while done < cfg.train.grad_accum_steps:
        timer.start()
        host_batch = next(batches)
        logger.add_work(host_batch)  # tokens and FLOPs from the host-side batch: no device sync
        # Images arrive as uint8 (or encoded, data.decode=gpu): the data layer finishes them on the device.
        batch = finish_batch(_to_device(host_batch, engine.device))
        timer.lap("data")
        losses = engine(batch)
        timer.lap("forward")
        if _any_rank(not math.isfinite(float(losses["loss"].detach()))):
            bad_in_row += 1
            state.bad_steps_total += 1
            print0(f"step {state.step + 1}: non-finite loss on some rank; batch skipped ({bad_in_row} in a row)")
            if bad_in_row >= cfg.train.max_bad_steps:
                raise NonFiniteLossError(
                    f"{bad_in_row} consecutive non-finite losses at step {state.step + 1}; aborting "
                    "(lower optim.lr, check the data, or raise train.max_bad_steps)")
            continue
        bad_in_row = 0
        engine.backward(losses["loss"])
        timer.lap("backward")
        engine.step()  # applies the optimizer only at the accumulation boundary
        timer.lap("step")
        logger.add_losses(losses)
        done += 1
    apply_parameter_bounds_(engine.module)  # after the optimizer step: on its fp32 masters too
    if momentum:
        update_momentum_(engine.module, cfg.model.momentum.decay)
    state.step += 1
    state.samples_seen += cfg.train.micro_batch_size * cfg.train.grad_accum_steps * engine.world_size


def keep_global_batch(cfg: ExperimentConfig, meta: dict, world_size: int) -> None:
    """On elastic resume, change gradient accumulation so the global batch stays what it was."""
    saved = meta.get("global_batch")
    per_step = cfg.train.micro_batch_size * world_size
    if saved is None or saved == per_step * cfg.train.grad_accum_steps:
        return
    if saved % per_step:
        raise ConfigError(f"train.micro_batch_size: the checkpoint's global batch {saved} is not a multiple of "
                          f"micro_batch_size {cfg.train.micro_batch_size} x {world_size} ranks; pick a micro batch "
                          "that divides it")
    print0(f"train.grad_accum_steps: {cfg.train.grad_accum_steps} -> {saved // per_step} to keep the global batch "
           f"at {saved} on {world_size} ranks")
    cfg.train.grad_accum_steps = saved // per_step
    cfg.train.global_batch_size = 0


@dataclass
class RunPlan:
    """What the checks before any process group decided about a run."""
    ds_config: dict
    resume_tag: str | None
    elastic: bool
    """The checkpoint was saved on another number of ranks (resumed through DeepSpeed's universal format)."""
    config_changes: list[str]
    """Meaning changes a resume was allowed to make (--allow-config-change)."""


def plan_run(cfg: ExperimentConfig, world_size: int, on_cuda: bool, allow_config_change: bool = False,
             is_main: bool = True, num_nodes: int = 1) -> RunPlan:
    """Every check that needs no process group, cheapest first, so a bad run fails in seconds: input paths,
    the output directory, the checkpoint to resume (the newest whole one: a damaged newer one is named and
    skipped) and its recorded config, batch arithmetic and the DeepSpeed template, the local data splits, the
    remote ones' index (fetched into the job's cache), the job's node count against data.num_canonical_nodes,
    an `init_from` checkpoint. Raises ConfigError."""
    out = Path(cfg.run.output_dir)
    check_input_paths(cfg)
    check_output_dir(out)
    ckpt_dir = out / "checkpoints"
    tag = find_resume_tag(ckpt_dir, verify=True, report=lambda line: print(line, flush=True) if is_main else None)
    meta = read_meta(ckpt_dir / tag) if tag is not None else {}
    elastic = tag is not None and meta["world_size"] != world_size
    if elastic:
        keep_global_batch(cfg, meta, world_size)
    ds_config = build_ds_config(cfg, world_size, on_cuda)
    check_queue_fits_world(cfg, world_size)
    changes = []
    if tag is not None:
        global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * world_size
        changes = check_resume_config(out, cfg, meta.get("global_batch"), global_batch, allow_config_change)
    check_local_splits(cfg.data)
    check_remote_splits(cfg.data)
    check_canonical_nodes(cfg.data, num_nodes)
    check_init_from(cfg)
    return RunPlan(ds_config, tag, elastic, changes)


def check_init_from(cfg: ExperimentConfig) -> None:
    """A `model.init_from` run or checkpoint of ours must be whole (every file, CRC-checked): found out at
    start, not as a traceback on every rank after the model is built."""
    from blip_train.interop.weights_io import is_weights_file, is_weights_folder
    from blip_train.training.checkpoint import CheckpointError
    from blip_train.training.weights import resolve_checkpoint

    path = cfg.model.init_from
    if not path or is_weights_folder(path) or is_weights_file(path):
        return
    try:
        resolve_checkpoint(path)
    except (CheckpointError, FileNotFoundError) as e:
        raise ConfigError(f"model.init_from: {e}") from None


def describe_streams(loader) -> str:
    """One line per training stream: name, samples, share of the mixture, samples drawn per epoch, where."""
    lines = [f"  {i['name']:<20} {i['samples']:>12,d} samples  share {i['proportion']:.3f}  "
             f"{i.get('per_epoch', i['samples']):>12,d} per epoch  {i['remote'] or i['local']}"
             for i in loader.dataset.stream_info]
    return "data.train:\n" + "\n".join(lines)


def train(cfg: ExperimentConfig, allow_config_change: bool = False) -> dict:
    """Run (or resume) one experiment to train.max_steps. Returns a summary dict on every rank.

    allow_config_change: resume even though the config changes what the run means (see config/changes.py).
    """
    # First: the checks below may already open streaming's shared memory, which starts the tracker.
    start_resource_tracker()
    keep_allocator_lean()  # before the towers are read: freed weight buffers go back to the kernel
    env = discover_environment()
    export_environment(env)
    on_cuda = cfg.run.device == "cuda" or (cfg.run.device == "auto" and torch.cuda.is_available())
    quiet_deepspeed("cuda" if on_cuda else "cpu")
    out = Path(cfg.run.output_dir)
    with mirror_console(out / "train.log", enabled=env.rank == 0):
        return _train(cfg, env, on_cuda, plan_run(cfg, env.world_size, on_cuda, allow_config_change, env.rank == 0,
                                                  env.num_nodes))


def _train(cfg: ExperimentConfig, env, on_cuda: bool, plan: RunPlan) -> dict:
    out = Path(cfg.run.output_dir)
    ckpt_dir, tag = out / "checkpoints", plan.resume_tag
    with without_build_chatter():
        init_distributed(env, cfg.deepspeed.timeout_minutes, on_cuda)
    print0(describe_placement(env))
    trace = MemoryTrace(out / "memory" / f"rank{env.rank}.jsonl" if cfg.run.memory_trace else None)
    trace.mark("start")
    if cfg.eval.interval:
        # After the group exists: without one, streaming would open (and close) a group of its own on
        # the same port, racing ours. Still before anything expensive is built.
        check_eval_split(cfg)
    config_file = record_config(cfg, out) if env.rank == 0 else None
    for line in config_warnings(cfg) + [f"config changed on resume (allowed): {c}" for c in plan.config_changes]:
        print0(line)
    # Installed before the (slow) build so an early preemption signal cannot kill the process.
    preemption = PreemptionHandler()
    preemption.install()
    if plan.elastic:  # saved on another number of ranks: go through DeepSpeed's universal format
        print0(f"{ckpt_dir / tag} was saved on {read_meta(ckpt_dir / tag)['world_size']} ranks; this run has "
               f"{env.world_size}: converting to a universal checkpoint")
        convert_to_universal(ckpt_dir, tag)

    # Frozen HF LLMs load straight into ZeRO-3 partitions (kept alive for the whole run on purpose).
    hf_zero3 = None
    if cfg.model.arch in ("stage2", "instruct"):  # in the LLM's own dtype (model.llm.dtype), not the engine's
        hf_zero3 = hf_zero3_loading(plan.ds_config, cfg.deepspeed.zero_init,  # noqa: F841
                                    dtype=llm_dtype(cfg.model.llm.dtype, "cuda" if on_cuda else "cpu"))
    stage = build_stage(cfg, build_world_info(), on_cuda, plan.ds_config)
    trace.mark("built")
    print0(describe_parameters(stage.model))
    at_load = sum(p.ds_numel for p in stage.model.parameters() if hasattr(p, "ds_id"))
    if at_load:
        print0(f"ZeRO-3: {at_load:,d} parameters were partitioned as they were built (frozen towers)")
    engine, _ = build_engine(stage.model, cfg, env.world_size, on_cuda, ds_config=plan.ds_config,
                             extra_ds={"checkpoint": {"load_universal": True}} if plan.elastic else None)
    trace.mark("engine")
    loader = stage.build_train_loader()
    print0(describe_streams(loader))
    # After the builders, which initialise the model from run.seed on every rank (identical weights):
    # from here each rank draws its own dropout masks and ITM negatives. A resume restores these streams.
    seed_everything(cfg.run.seed, env.rank)

    state = TrainState()
    if tag is not None:
        state, data_state = load_checkpoint(engine, ckpt_dir, tag, frozen_sources=stage.frozen_sources)
        # A finished run has nothing to iterate: restoring the position would leave streaming's
        # resume buffer in shared memory, where the next job on the node would collide with it.
        if data_state is not None and state.step < cfg.train.max_steps:
            loader.load_state_dict(data_state)
        print0(f"resumed from {ckpt_dir / tag} at step {state.step}")
        trace.mark("resumed")
    samples_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * env.world_size
    wandb_run = start_wandb(out, cfg.run.wandb_project, config_to_dict(cfg)) if cfg.run.wandb and env.rank == 0 else None
    logger = MetricLogger(out, env.rank == 0, cfg.run.tensorboard, samples_per_step,
                          count_work=build_flops_counter(cfg.model, stage.model), device=engine.device,
                          total_steps=cfg.train.max_steps, wandb_run=wandb_run)
    logger.timer.on_lap = trace.mark
    meta = {"arch": cfg.model.arch, "frozen_sources": stage.frozen_sources, "global_batch": samples_per_step,
            "config_file": config_file.name if config_file is not None else None}
    history: list[dict] = []
    batches = _forever(loader)
    engine.train()
    logger.reset_clock(state.step)
    stopped_early, saved = False, tag
    try:
        while state.step < cfg.train.max_steps:
            train_step(engine, batches, cfg, state, logger)
            if state.step % cfg.train.log_interval == 0 or state.step in (1, cfg.train.max_steps):
                scalars = logger.log(state.step, lr_at(state.step - 1, cfg),  # the lr this step used
                                     {"data/skipped_samples": float(stage.skipped_samples())})
                history.append({"step": state.step, **scalars})
            stop = preemption.should_stop()
            # Saved before evaluating: a failing evaluation must not cost the steps since the last save.
            if stop or state.step % cfg.train.save_interval == 0 or state.step == cfg.train.max_steps:
                t0 = time.perf_counter()
                with logger.paused():
                    saved = save_checkpoint(engine, ckpt_dir, state, loader.state_dict(), meta,
                                            cfg.train.keep_last, cfg.train.keep_every)
                print0(f"checkpoint saved: {ckpt_dir / saved} ({time.perf_counter() - t0:.1f} s)")
                trace.mark("saved")
            if stop:
                print0(f"stop requested ({preemption.signal_name or 'signal on another rank'}): checkpoint saved at "
                       f"step {state.step}; run the same command to resume")
                stopped_early = True
                break
            if cfg.eval.interval and state.step % cfg.eval.interval == 0:
                with logger.paused():
                    scores, examples = evaluate_during_training(cfg, engine.module, stage.tokenizer)
                logger.log_scalars(state.step, scores)
                logger.log_examples(state.step, examples)  # TensorBoard pictures / tables (rank 0)
                print0(f"step {state.step:>7d} | " + " ".join(f"{k} {v:.2f}" for k, v in scores.items()))
    finally:
        preemption.uninstall()
        logger.close()
    if not cfg.data.keep_cache:
        batches.close()  # the loader's workers stop before their cache goes
        removed = remove_job_cache(cfg.data)
        if removed is not None:
            print(f"removed the job's remote-stream cache {removed} (data.keep_cache=false)", flush=True)
    if not stopped_early:
        print0(f"done: step {state.step}, checkpoint {ckpt_dir / saved if saved else '(none)'}")
    return {"step": state.step, "stopped_early": stopped_early, "history": history,
            "checkpoint": str(ckpt_dir), "world_size": env.world_size,
            "zero_stage": cfg.deepspeed.zero_stage, "engine": engine}
