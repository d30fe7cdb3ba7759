"""Streaming readers of schema splits, mixtures, and the train / eval loader builders.

`build_train_loader(cfg.data, micro_batch_size, collate_fn, kind)` returns a `StreamingDataLoader`
whose `state_dict()` / `load_state_dict()` give exact mid-epoch resume (see README.md here).
Each rank reads a disjoint part of every epoch; samples are decoded and transformed in the
DataLoader workers; a sample whose image bytes do not decode is replaced by the next sample of
the same stream and counted in `dataset.num_corrupt` (shared by all workers of the rank).
"""
from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist
from streaming import Stream, StreamingDataLoader, StreamingDataset

from blip_train.config.loading import ConfigError, parse_cache_limit
from blip_train.config.schema import DataConfig, StreamConfig
from blip_train.data.audio import model_audio_features
from blip_train.data.collate import collate_samples
from blip_train.data.device import build_train_transform, check_gpu_decode
from blip_train.data.images import CorruptImageError
from blip_train.data.points import model_point_features
from blip_train.data.shared_memory import build_streaming_dataset
from blip_train.data.schema import SCHEMA_FILE, SchemaError, draw_caption, verify_split
from blip_train.data.transforms import build_transform
from blip_train.data.video import clip_frames

InputReader = Callable[[dict], torch.Tensor]
"""A row → the encoder input of a modality other than images (data.audio.AudioFeatures, data.points.PointFeatures),
with a `kind` attribute naming what it reads in logs."""


def model_input_reader(model: Any) -> Optional[InputReader]:
    """How a run's model (`model`: the config's ModelConfig) reads a row when its modality is not images (audio
    features, point clouds); None for images and video."""
    return model_audio_features(model) or model_point_features(model)


logger = logging.getLogger(__name__)

BALANCES = ("size", "sqrt", "uniform")


class SchemaDataset(StreamingDataset):
    """A StreamingDataset over schema splits that decodes and transforms images, skipping corrupt ones.

    Subclasses choose the returned fields in `format_sample`. Keyword arguments go to
    `streaming.StreamingDataset` (streams or local/remote, batch_size, shuffle, shuffle_seed, ...).
    """

    # A run of this many undecodable samples in a row means the split itself is broken.
    max_consecutive_corrupt = 100

    def __init__(self, *, transform: Callable[..., Any], frames: int = 0, reader: Optional[InputReader] = None,
                 **kwargs: Any) -> None:
        """frames: video samples of this many frames (model.video_frames): pixel_values (frames, 3, S, S), every
        frame with the same crop and flip; 0: images (a video row gives its first frame).
        reader: another modality's samples (`model_input_reader`): pixel_values is then what the reader makes of
        the row, the encoder's input (audio: the clip's normalised filterbank segments (segments, frames, bins)
        from the stored waveform; 3d: the cloud's points (num_points, channels))."""
        super().__init__(**kwargs)
        self.transform = transform
        self.frames = frames
        self.reader = reader
        # Lives in shared memory so that the counts of all DataLoader workers add up where the
        # trainer reads them (the main process of the rank).
        self._num_corrupt = mp.Value("q", 0)
        self.stream_info: list[dict[str, Any]] = []
        """Per-stream name, local, samples, proportion and samples drawn per epoch (set by the builders)."""

    @property
    def num_corrupt(self) -> int:
        """Samples skipped so far on this rank because their image could not be decoded."""
        return int(self._num_corrupt.value)

    def _stream_range(self, sample_id: int) -> tuple[int, int, int]:
        """(stream index, first sample id of the stream, its sample count) of a sample."""
        offsets = np.asarray(self.sample_offset_per_stream)
        stream_id = int(np.searchsorted(offsets, sample_id, side="right") - 1)
        return stream_id, int(offsets[stream_id]), int(self.samples_per_stream[stream_id])

    def __getitem__(self, sample_id: int) -> dict[str, Any]:
        # Replacement stays inside the sample's own stream, so mixture proportions are unchanged.
        stream, start, count = self._stream_range(int(sample_id))
        for attempt in range(min(self.max_consecutive_corrupt, count)):
            sid = start + (int(sample_id) - start + attempt) % count
            seed = self._sample_seed(sid)
            row = draw_caption(self.get_item(sid), seed)  # CapFilt rows: one of the image's kept captions
            try:
                # The transform decodes the stored bytes itself: the crop it draws decides how small a
                # JPEG may decode. Only undecodable bytes raise CorruptImageError; a bug in a transform
                # raises anything else, and surfaces.
                pixel_values = self.decode_pixels(row, seed)
            except CorruptImageError as e:
                with self._num_corrupt.get_lock():
                    self._num_corrupt.value += 1
                logger.warning("skipping sample %d (image_id %s, dataset %s): undecodable %s (%s)", sid,
                               row.get("image_id"), row.get("dataset"), self.reader.kind if self.reader else "image", e)
                continue
            # `stream`: converters number image ids from 0 in every split, so an id is only unique
            # together with its stream (the stage-1 collator combines the two).
            return {**self.format_sample(row, pixel_values), "draw_seed": seed, "stream": stream}
        raise RuntimeError(f"{min(self.max_consecutive_corrupt, count)} consecutive samples from {sample_id} "
                           "have undecodable images: the split is broken, re-run its converter")

    def decode_pixels(self, row: dict[str, Any], seed: int) -> Any:
        """The row's image through the transform, or (self.frames) its video frames, all drawn with the same seed:
        one crop and flip for the whole clip, as a clip is one view; or (self.reader) the other modality's input."""
        if self.reader is not None:
            return self.reader(row)
        if not self.frames:
            return self.transform(row["image"], torch.Generator().manual_seed(seed))
        frames = clip_frames(row)
        if len(frames) != self.frames:
            raise ValueError(f"model.video_frames={self.frames}, but a row of dataset {row.get('dataset', '?')!r} "
                             f"holds {len(frames)} frame(s): convert it with tools/convert_video_qa.py --frames "
                             f"{self.frames}")
        return torch.stack([self.transform(f, torch.Generator().manual_seed(seed)) for f in frames])

    def _sample_seed(self, sample_id: int) -> int:
        """Seed of a sample's randomness as a function of (seed, epoch, sample), never of worker or global RNG.

        A resumed run then crops and flips every sample, and draws its text randomness (T5 split point,
        instruction template; the collators read `draw_seed`), exactly as the uninterrupted run would,
        whatever the number of workers; the global RNG (dropout, ITM negatives) is left to the model.
        """
        epoch = max(0, self.next_epoch - 1)  # next_epoch is advanced when an epoch's iteration starts
        return (self.shuffle_seed * 1_000_003 + epoch * 2_147_483_629 + sample_id) % (2**63 - 1)

    def format_sample(self, row: dict[str, Any], pixel_values: torch.Tensor) -> dict[str, Any]:
        """Every schema field but the encoded image, plus the transformed pixels (subclasses pick fields)."""
        return {"pixel_values": pixel_values, **{k: v for k, v in row.items() if k != "image"}}


class ImageTextDataset(SchemaDataset):
    """Image-caption pairs (stage 1 / stage 2): pixel_values, caption, image_id, noisy, dataset."""

    def format_sample(self, row: dict[str, Any], pixel_values: torch.Tensor) -> dict[str, Any]:
        caption = row["caption"] or (row["captions"][0] if row["captions"] else "")
        return {"pixel_values": pixel_values, "caption": caption, "captions": list(row["captions"]),
                "image_id": int(row["image_id"]), "noisy": int(row["noisy"]), "dataset": row["dataset"]}


class VQADataset(SchemaDataset):
    """Question-answer samples: pixel_values, question, answer, answers, question_id, image_id, task, ..."""

    def format_sample(self, row: dict[str, Any], pixel_values: torch.Tensor) -> dict[str, Any]:
        return {"pixel_values": pixel_values, "question": row["question"], "answer": row["answer"],
                "answers": list(row["answers"]), "question_id": int(row["question_id"]),
                "image_id": int(row["image_id"]), "task": row["task"], "dataset": row["dataset"],
                "caption": row["caption"]}


class InstructDataset(VQADataset):
    """Instruction tuning: like VQADataset, but caption-only rows (question "") answer with their caption.

    The instruction for such rows is chosen by the instruction-template layer from `task`.
    """

    def format_sample(self, row: dict[str, Any], pixel_values: torch.Tensor) -> dict[str, Any]:
        sample = super().format_sample(row, pixel_values)
        if not sample["question"] and not sample["answer"]:
            sample["answer"] = sample["caption"]
        return sample


DATASET_KINDS: dict[str, type[SchemaDataset]] = {
    "caption": ImageTextDataset, "vqa": VQADataset, "instruct": InstructDataset}


def ensure_local_world_size() -> int:
    """Export LOCAL_WORLD_SIZE (streaming needs it; the deepspeed launcher does not set it).

    Without it, one node is assumed: LOCAL_WORLD_SIZE = WORLD_SIZE.
    """
    if "LOCAL_WORLD_SIZE" not in os.environ:
        os.environ["LOCAL_WORLD_SIZE"] = os.environ.get("WORLD_SIZE", "1")
        logger.info("LOCAL_WORLD_SIZE unset; assuming a single node: %s", os.environ["LOCAL_WORLD_SIZE"])
    return int(os.environ["LOCAL_WORLD_SIZE"])


def job_cache_dir(cache_root: str, name: str) -> str:
    """`<root>/<job id>/<name>`: two jobs never share a streaming cache (a requeued job reuses its own)."""
    root = cache_root or os.path.join(tempfile.gettempdir(), "blip_train_cache")
    job = (os.environ.get("SLURM_JOB_ID") or
           (os.environ.get("TORCHELASTIC_RUN_ID") if os.environ.get("TORCHELASTIC_RUN_ID") not in (None, "none")
            else None) or f"port{os.environ.get('MASTER_PORT', '0')}-ppid{os.getppid()}")
    return os.path.join(root, f"job-{job}", name)


def job_cache_root(cache_root: str) -> Path:
    """This job's folder of remote-stream caches on this node (`job_cache_dir` without the stream name)."""
    return Path(job_cache_dir(cache_root, "_")).parent


def remove_job_cache(cfg: DataConfig) -> Optional[Path]:
    """Delete this job's remote-stream cache once every rank has stopped reading (a collective: all ranks
    call it; the first rank of each node deletes). Returns the folder removed on this rank, if any."""
    from streaming.base.distributed import get_local_world_size, get_rank

    if not any(s.remote for s in cfg.train):
        return None
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank reads from the cache any more
    folder = job_cache_root(cfg.cache_dir)
    removed = None
    if get_rank() % get_local_world_size() == 0 and folder.is_dir():
        shutil.rmtree(folder, ignore_errors=True)
        removed = folder
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return removed


def _fetch_metadata(local: str, remote: str) -> None:
    """Download index.json and the schema sidecar of a remote split so they can be checked and counted."""
    from streaming.base.storage import CloudDownloader

    downloader = CloudDownloader.get(remote)
    for name in ("index.json", SCHEMA_FILE):
        dest = os.path.join(local, name)
        if not os.path.exists(dest):
            tmp = f"{dest}.tmp-{os.getpid()}"  # ranks of a node may race: each writes its own file
            downloader.download(f"{remote.rstrip('/')}/{name}", tmp, 60)
            os.replace(tmp, dest)


def mixture_proportions(sizes: list[int], explicit: list[float], balance: str) -> list[float]:
    """Stream shares summing to 1: the rest (1 - explicit) is split ∝ size | sqrt(size) | 1 among
    streams without a proportion; when every stream has one they are relative weights (as in streaming)."""
    if balance not in BALANCES:
        raise ValueError(f"data.balance must be one of {BALANCES}, got {balance!r}")
    fixed = sum(p for p in explicit if p > 0)
    implicit = [i for i, p in enumerate(explicit) if p <= 0]
    if implicit and fixed >= 1:
        raise ValueError(f"data.train proportions sum to {fixed:g}; with streams that have no proportion "
                         "they must leave room (sum < 1) for them")
    weight = {"size": float, "sqrt": math.sqrt, "uniform": lambda n: 1.0}[balance]
    raw = [weight(sizes[i]) for i in implicit]
    rest = (1.0 - fixed) if fixed > 0 else 1.0
    out = list(explicit)
    for i, w in zip(implicit, raw):
        out[i] = rest * w / sum(raw)
    total = sum(out)
    return [p / total for p in out]


def check_local_splits(cfg: DataConfig) -> None:
    """Refuse missing or non-schema local training splits before any work (ConfigError naming the key).

    Remote streams: `check_remote_splits`.
    """
    for i, sc in enumerate(cfg.train):
        if sc.local and not sc.remote:
            try:
                verify_split(sc.local)
            except SchemaError as e:
                raise ConfigError(f"data.train[{i}].local: {e}") from None


def check_remote_splits(cfg: DataConfig) -> None:
    """Fetch the index of every remote training split into this job's cache now, before any process group: a
    missing bucket, refused credentials or an unreachable endpoint is one line naming the key (ConfigError), not
    a traceback on every rank once the loader starts. Credentials come from the environment only (boto3's chain
    for s3://: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE); no message repeats them."""
    for i, sc in enumerate(cfg.train):
        if not sc.remote:
            continue
        local = sc.local or job_cache_dir(cfg.cache_dir, _stream_name(sc))
        try:
            _fetch_metadata(local, sc.remote)
        except Exception as e:  # any failure to read it is the same answer for the user: this key, this reason
            raise ConfigError(f"data.train[{i}].remote: cannot read {sc.remote}: {_remote_error(sc.remote, e)}"
                              ) from None
        try:
            verify_split(local)
        except SchemaError as e:
            raise ConfigError(f"data.train[{i}].remote: {e}") from None


def _remote_error(remote: str, error: Exception) -> str:
    """What went wrong reading `remote`, in one line. For S3, streaming reports 403 and 404 alike as "not found"
    (a HEAD request has no error body): tell refused credentials, a missing bucket and a missing index apart."""
    status = getattr(error, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
    if remote.startswith("s3://") and status in (403, 404):
        where = os.environ.get("S3_ENDPOINT_URL") or "AWS S3"
        if status == 403:
            return (f"access denied by {where} (HTTP 403): check the credentials in the environment "
                    "(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE) and the bucket's permissions")
        bucket = remote[len("s3://"):].split("/", 1)[0]
        if not _s3_bucket_exists(bucket):
            return f"bucket {bucket!r} does not exist at {where}"
        return f"no index.json there at {where}: is it the folder of an MDS split?"
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def _s3_bucket_exists(bucket: str) -> bool:
    """False only when S3 says the bucket does not exist (HTTP 404); True when it exists or cannot be told."""
    from boto3.session import Session
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        Session().client("s3", endpoint_url=os.environ.get("S3_ENDPOINT_URL")).head_bucket(Bucket=bucket)
    except ClientError as e:
        return e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 404
    except BotoCoreError:
        pass
    return True


def _stream_name(sc: StreamConfig) -> str:
    """The stream's name in logs and in the cache: `name`, else the split folder's name."""
    return sc.name or Path((sc.local or sc.remote).rstrip("/")).name


def check_canonical_nodes(cfg: DataConfig, num_nodes: int) -> None:
    """Refuse a node count that streaming cannot map onto `data.num_canonical_nodes` (one must divide the other),
    before any work: streaming itself would only fail when the first batch is drawn."""
    ncn = cfg.num_canonical_nodes
    if num_nodes % ncn and ncn % num_nodes:
        raise ConfigError(f"data.num_canonical_nodes: {ncn} canonical nodes cannot be spread over this job's "
                          f"{num_nodes} nodes (one must divide the other); run on a node count that fits, or start "
                          "a new run with a value that fits every node count it will use")


def build_streams(streams: list[StreamConfig], balance: str, cache_dir: str = ""
                  ) -> tuple[list[Stream], list[dict[str, Any]]]:
    """Check every split's schema and build `streaming.Stream`s with mixture proportions.

    Returns the streams and, per stream, {name, local, remote, samples, proportion}.
    """
    if not streams:
        raise ValueError("data.train is empty: give at least one stream (local: <MDS split dir>)")
    info = []
    for sc in streams:
        if not sc.local and not sc.remote:
            raise ValueError("data.train[*] needs `local` (an MDS split directory) or `remote`")
        name = _stream_name(sc)
        local = sc.local
        if sc.remote:
            local = local or job_cache_dir(cache_dir, name)
            _fetch_metadata(local, sc.remote)
        info.append({"name": name, "local": local, "remote": sc.remote or None, "samples": verify_split(local),
                     "proportion": sc.proportion})
    props = mixture_proportions([i["samples"] for i in info], [i["proportion"] for i in info], balance)
    out = []
    for i, p in zip(info, props):
        i["proportion"] = p
        # One stream: no proportion, so an epoch is exactly that split once.
        kwargs = {"proportion": p} if len(info) > 1 else {}
        out.append(Stream(local=i["local"], remote=i["remote"], **kwargs))
    return out, info


MAX_AUTO_WORKERS = 16
"""Cap of data.num_workers=auto: each worker holds its own reader state and prefetched batches."""


def job_cpus(environ: Mapping[str, str] = os.environ) -> int:
    """CPUs this process may run on: its affinity mask, capped by SLURM_CPUS_PER_TASK where SLURM set one
    (a job without CPU binding sees every CPU of the node)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    slurm = environ.get("SLURM_CPUS_PER_TASK", "")
    return min(cpus, int(slurm)) if slurm.isdigit() and int(slurm) > 0 else cpus


def resolve_num_workers(value: int | str, local_world_size: int = 1,
                        environ: Mapping[str, str] = os.environ, cpus: Optional[int] = None) -> int:
    """data.num_workers as a number: itself, or for "auto" the CPUs of this rank less one (the rank's own
    process: the step, host-to-device copies), at least 1 and at most MAX_AUTO_WORKERS.

    A rank's CPUs are `job_cpus` split among the ranks that share them: under `srun` one task per rank
    (SLURM_CPUS_PER_TASK is per rank) nobody else; under torchrun / the deepspeed launcher (one launcher
    per node, or no SLURM at all) the node's LOCAL_WORLD_SIZE ranks.
    """
    if value != "auto":
        return int(value)
    cpus = job_cpus(environ) if cpus is None else cpus
    one_task_per_rank = "SLURM_CPUS_PER_TASK" in environ and "SLURM_PROCID" in environ and not any(
        k in environ for k in ("TORCHELASTIC_RUN_ID", "GROUP_RANK", "CROSS_SIZE", "LOCAL_SIZE"))
    per_rank = cpus if one_task_per_rank else cpus // max(1, local_world_size)
    return max(1, min(MAX_AUTO_WORKERS, per_rank - 1))


def _dataset_class(kind: str) -> type[SchemaDataset]:
    if kind not in DATASET_KINDS:
        raise ValueError(f"kind must be one of {sorted(DATASET_KINDS)}, got {kind!r}")
    return DATASET_KINDS[kind]


def build_train_loader(cfg: DataConfig, micro_batch_size: int, collate_fn: Optional[Callable] = None,
                       kind: str = "caption", frames: int = 0,
                       reader: Optional[InputReader] = None) -> StreamingDataLoader:
    """Shuffled, rank-disjoint, resumable loader over the `cfg.train` mixture (frames: video samples, reader: another
    modality's samples, see SchemaDataset).

    Per-stream sample counts and shares are logged and kept in `loader.dataset.stream_info`.
    """
    local_world_size = ensure_local_world_size()
    if cfg.decode == "gpu" and frames:
        raise ConfigError("data.decode: gpu decodes one JPEG per sample; video samples are decoded on the CPU")
    if cfg.decode == "gpu":
        check_gpu_decode(torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                         else torch.device("cpu"))
    streams, info = build_streams(cfg.train, cfg.balance, cfg.cache_dir)
    cache_limit = parse_cache_limit(cfg.cache_limit)
    transform = build_train_transform(cfg.image_size, cfg.crop_scale_min, cfg.hflip, cfg.decode)
    try:
        dataset = build_streaming_dataset(lambda: _dataset_class(kind)(
            streams=streams, transform=transform, frames=frames, reader=reader,
            batch_size=micro_batch_size, shuffle=True, shuffle_seed=cfg.shuffle_seed,
            num_canonical_nodes=cfg.num_canonical_nodes, cache_limit=cache_limit or None))
    except ValueError as e:  # streaming checks the limit against the shard sizes it just read
        if cache_limit and "cache limit" in str(e).lower():
            raise ConfigError(f"data.cache_limit: {e}") from None
        raise
    for i, stream in zip(info, dataset.streams):
        i["per_epoch"] = int(stream.choose)
        logger.info("data stream %s: %d samples, share %.3f, %d drawn per epoch (%s)",
                    i["name"], i["samples"], i["proportion"], i["per_epoch"], i["local"])
    dataset.stream_info = info
    workers = resolve_num_workers(cfg.num_workers, local_world_size)
    logger.info("data loader: %d worker(s) per rank (data.num_workers=%s), JPEGs decoded on the %s",
                workers, cfg.num_workers, cfg.decode)
    return StreamingDataLoader(dataset, batch_size=micro_batch_size, collate_fn=collate_fn or collate_samples,
                               num_workers=workers, drop_last=True,
                               # own generator: creating an iterator must not draw from the global RNG
                               generator=torch.Generator().manual_seed(cfg.shuffle_seed),
                               pin_memory=torch.cuda.is_available(),
                               persistent_workers=False)


def build_eval_loader(cfg: DataConfig, batch_size: int, collate_fn: Optional[Callable] = None,
                      kind: str = "caption", split: str = "", frames: int = 0) -> StreamingDataLoader:
    """In-order loader over `split` (default `cfg.val`) with the eval transform and no sample dropped.

    On several ranks streaming pads each rank's share to equal length by repeating samples:
    deduplicate by image_id / question_id before computing metrics.
    """
    split = split or cfg.val
    if not split:
        raise ValueError("data.val is empty: set it to the held-out MDS split directory")
    local_world_size = ensure_local_world_size()
    n = verify_split(split)
    dataset = build_streaming_dataset(lambda: _dataset_class(kind)(
        local=split, transform=build_transform(cfg.image_size, False), frames=frames, batch_size=batch_size,
        shuffle=False))
    dataset.stream_info = [{"name": Path(split).name, "local": split, "remote": None, "samples": n,
                            "proportion": 1.0, "per_epoch": n}]
    return StreamingDataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn or collate_samples,
                               num_workers=resolve_num_workers(cfg.num_workers, local_world_size), drop_last=False,
                               pin_memory=torch.cuda.is_available())
