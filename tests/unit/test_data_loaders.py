"""Readers and loader builders: exact resume, mixtures, corrupt samples, schema refusal, sample kinds."""
from __future__ import annotations

import gc
import json
import os
from collections import Counter

import pytest

from blip_train.config.schema import DataConfig, StreamConfig
from blip_train.data.datasets import (build_eval_loader, build_train_loader, ensure_local_world_size,
                                      mixture_proportions)
from blip_train.data.schema import SCHEMA_FILE, SchemaError, write_split
from blip_train.data.synthetic import make_sample


def _split(path, n, dataset="synthetic_shapes", corrupt=(), start=0):
    def rows():
        for i in range(start, start + n):
            s = make_sample(i, seed=0, image_size=16)
            s["dataset"] = dataset
            if i in corrupt:
                s["image"] = b"\xff\xd8 definitely not a jpeg"
            yield s
    write_split(path, rows())
    return str(path)


def _cfg(*locals_, balance="size", workers=1, **kw):
    return DataConfig(train=[StreamConfig(local=p, **kw) for p in locals_], balance=balance, image_size=16,
                      num_workers=workers)


def _ids(loader, max_batches=None):
    out = []
    for i, batch in enumerate(loader):
        out += batch["image_id"].tolist()
        if max_batches is not None and i + 1 == max_batches:
            break  # before fetching the next batch: the loader counts what it has yielded
    return out


@pytest.fixture(scope="module")
def split40(tmp_path_factory):
    return _split(tmp_path_factory.mktemp("d") / "train", 40)


def test_resume_mid_epoch_equals_uninterrupted(split40):
    cfg = _cfg(split40)
    full = _ids(build_train_loader(cfg, 4))
    assert sorted(full) == list(range(40)) and full != sorted(full)  # one shuffled epoch

    first = build_train_loader(cfg, 4)
    part = _ids(first, max_batches=3)
    state = first.state_dict()
    del first
    gc.collect()
    resumed = build_train_loader(cfg, 4)
    resumed.load_state_dict(state)
    rest = _ids(resumed)
    assert part + rest == full


def test_sample_randomness_follows_seed_epoch_and_sample_not_workers(split40):
    """Pixels and `draw_seed` (the collators' text randomness) of each sample are the same whether
    0 or 2 workers read it, and change with the epoch (fresh augmentation)."""
    def by_image(loader):
        out = []
        for _ in range(2):  # two epochs
            epoch = {}
            for b in loader:
                for i, seed, px in zip(b["image_id"].tolist(), b["draw_seed"].tolist(), b["pixel_values"]):
                    epoch[i] = (seed, px)
            out.append(epoch)
        return out

    main = by_image(build_train_loader(_cfg(split40, workers=0), 4))
    workers = by_image(build_train_loader(_cfg(split40, workers=2), 4))
    for a, b in zip(main, workers):
        assert a.keys() == b.keys() == set(range(40))
        assert all(a[i][0] == b[i][0] and (a[i][1] == b[i][1]).all() for i in a)
    assert all(main[0][i][0] != main[1][i][0] for i in main[0])


def test_mixture_sqrt_proportions(tmp_path):
    a = _split(tmp_path / "a", 36, dataset="A")
    b = _split(tmp_path / "b", 9, dataset="B", start=100)
    loader = build_train_loader(_cfg(a, b, balance="sqrt", workers=0), 5)
    info = {i["name"]: i for i in loader.dataset.stream_info}
    assert info["a"]["samples"] == 36 and info["b"]["samples"] == 9
    assert info["a"]["proportion"] == pytest.approx(2 / 3) and info["b"]["proportion"] == pytest.approx(1 / 3)
    counts = Counter(d for batch in loader for d in batch["dataset"])
    assert sum(counts.values()) == 45
    assert abs(counts["A"] - 30) <= 1 and abs(counts["B"] - 15) <= 1
    assert abs(info["a"]["per_epoch"] - 30) <= 1

    uniform = build_train_loader(_cfg(a, b, balance="uniform", workers=0), 5)
    counts = Counter(d for batch in uniform for d in batch["dataset"])
    assert abs(counts["A"] - 22.5) <= 1 and abs(counts["B"] - 22.5) <= 1


def test_mixture_weights():
    assert mixture_proportions([100, 25], [0, 0], "sqrt") == pytest.approx([2 / 3, 1 / 3])
    assert mixture_proportions([100, 25], [0, 0], "size") == pytest.approx([0.8, 0.2])
    assert mixture_proportions([100, 25], [0, 0], "uniform") == pytest.approx([0.5, 0.5])
    assert mixture_proportions([100, 25, 4], [0.4, 0, 0], "sqrt") == pytest.approx([0.4, 0.6 * 5 / 7, 0.6 * 2 / 7])
    assert mixture_proportions([1, 1], [3, 1], "size") == pytest.approx([0.75, 0.25])
    with pytest.raises(ValueError, match="data.balance"):
        mixture_proportions([1], [0], "log")
    with pytest.raises(ValueError, match="leave room"):
        mixture_proportions([1, 1], [1.0, 0], "size")


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_samples_are_skipped_and_counted(tmp_path, workers):
    split = _split(tmp_path / "c", 20, corrupt=(5, 12))
    loader = build_train_loader(_cfg(split, workers=workers), 4)
    ids = Counter(_ids(loader))
    assert sum(ids.values()) == 20 and 5 not in ids and 12 not in ids
    assert ids[6] == 2 and ids[13] == 2  # replaced by the next sample of the stream
    assert loader.dataset.num_corrupt == 2


def test_image_ids_are_unique_across_the_streams_of_a_mixture(tmp_path, tiny_assets):
    """Both splits number their images 0..n-1: in a mixture, equal raw ids of two streams are two images."""
    from blip_train.data.collate import Stage1Collator
    from blip_train.data.tokenizers import load_qformer_tokenizer
    from blip_train.models.stage1_losses import positive_mask
    from blip_train.models.world import WorldInfo

    a, b = _split(tmp_path / "a", 12, dataset="a"), _split(tmp_path / "b", 12, dataset="b")
    loader = build_train_loader(_cfg(a, b, workers=0), 24, collate_fn=list)
    samples = next(iter(loader))
    assert {s["dataset"] for s in samples} == {"a", "b"}
    ids = Stage1Collator(load_qformer_tokenizer(tiny_assets / "qformer_tokenizer"))(samples)["image_ids"]
    key = {(s["dataset"], s["image_id"]): int(i) for s, i in zip(samples, ids)}
    assert len(set(key.values())) == len(key) == 24  # 12 raw ids, each shown once per stream
    pos = positive_mask(WorldInfo(), len(samples), ids.device, ids)
    assert pos.sum().item() == 24  # every sample is only its own positive


def test_a_transform_bug_raises_instead_of_counting_corrupt_images(tmp_path):
    split = _split(tmp_path / "b", 8)
    loader = build_train_loader(_cfg(split, workers=0), 4)

    def broken(image, generator):  # a code bug, not bad bytes
        raise TypeError("transform bug")

    loader.dataset.transform = broken
    with pytest.raises(TypeError, match="transform bug"):
        next(iter(loader))
    assert loader.dataset.num_corrupt == 0


def test_loader_refuses_split_without_schema(tmp_path):
    split = _split(tmp_path / "s", 4)
    os.remove(os.path.join(split, SCHEMA_FILE))
    with pytest.raises(SchemaError, match=f"{split}: missing {SCHEMA_FILE}"):
        build_train_loader(_cfg(split), 2)


def test_eval_loader_and_sample_kinds(split40):
    cfg = DataConfig(val=split40, image_size=16, num_workers=0)
    vqa = build_eval_loader(cfg, 8, kind="vqa")
    batches = list(vqa)
    assert [i for b in batches for i in b["image_id"].tolist()] == list(range(40))  # in order, nothing dropped
    b = batches[0]
    assert b["pixel_values"].shape == (8, 3, 16, 16)
    assert len(b["answers"]) == 8 and all(isinstance(q, str) and q for q in b["question"])
    cap = next(iter(build_eval_loader(cfg, 4, kind="caption")))
    assert set(cap) == {"pixel_values", "caption", "captions", "image_id", "noisy", "dataset", "draw_seed", "stream"}
    inst = next(iter(build_eval_loader(cfg, 4, kind="instruct")))
    assert all(inst["answer"]) and all(inst["question"])
    with pytest.raises(ValueError, match="kind must be one of"):
        build_eval_loader(cfg, 4, kind="retrieval")


def test_local_world_size_defaults_to_world_size(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert ensure_local_world_size() == 3 and os.environ["LOCAL_WORLD_SIZE"] == "3"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert ensure_local_world_size() == 2


def test_remote_stream_gets_a_per_job_cache(split40, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    cfg = DataConfig(train=[StreamConfig(remote=split40, name="syn")], cache_dir=str(tmp_path), image_size=16,
                     num_workers=0)
    loader = build_train_loader(cfg, 8)
    cache = tmp_path / "job-4242" / "syn"
    assert loader.dataset.stream_info[0]["local"] == str(cache) and (cache / SCHEMA_FILE).is_file()
    assert sorted(_ids(loader)) == list(range(40))
    assert any(p.name.endswith(".mds") for p in cache.iterdir())  # shards were fetched into the cache


def test_only_segments_no_process_holds_are_stale():
    """Streaming's segments of a live dataset (mapped here) stay; a prefix nobody holds is stale as a whole;
    files that are not streaming's are never touched. Prefixes far above any a real run reaches."""
    from multiprocessing import shared_memory

    from blip_train.data.shared_memory import SHM_DIR, stale_streaming_segments

    live = [shared_memory.SharedMemory(f"987650_{n}", create=True, size=8) for n in ("locals", "barrier")]
    dead = [shared_memory.SharedMemory(f"987651_{n}", create=True, size=8) for n in ("locals", "next_epoch")]
    other = shared_memory.SharedMemory("987652_not_streaming", create=True, size=8)
    half = shared_memory.SharedMemory("987653_locals", create=True, size=8)
    other.close()
    try:
        for shm in dead:
            shm.close()  # the process that made them is gone: nothing maps them any more
        stale = {p.name for p in stale_streaming_segments() if p.name.startswith("98765")}
        assert stale == {"987651_locals", "987651_next_epoch"}
        half.close()
        stale = {p.name for p in stale_streaming_segments() if p.name.startswith("98765")}
        assert stale == {"987651_locals", "987651_next_epoch", "987653_locals"}
        assert all(p.parent == SHM_DIR for p in stale_streaming_segments())
    finally:
        for shm in live + dead + [other, half]:
            shm.close()
            shm.unlink()


def test_datasets_opened_inside_release_their_shared_memory_and_others_stay(split40):
    """`releasing_streaming_memory` closes (and unlinks) what the datasets built inside opened; a dataset built
    before it keeps working, and the next one built inside reads the same rows."""
    from streaming import StreamingDataset

    from blip_train.data.shared_memory import build_streaming_dataset, releasing_streaming_memory

    def handles():  # (open descriptors, shared-memory segments mapped by this process)
        maps = open("/proc/self/maps").read().splitlines()
        return len(os.listdir("/proc/self/fd")), sorted(m.split("/dev/shm/")[1] for m in maps if "/dev/shm/" in m)

    def open_split():
        return build_streaming_dataset(lambda: StreamingDataset(local=split40, shuffle=False, batch_size=1))

    kept = open_split()
    before = handles()
    for _ in range(3):
        with releasing_streaming_memory():
            ids = [open_split()[i]["image_id"] for i in range(3)]
            inside = handles()
        made = set(inside[1]) - set(before[1])
        assert ids == [0, 1, 2] and inside[0] > before[0] and made
        assert handles() == before and not any(os.path.exists(f"/dev/shm/{n}") for n in made)
    assert kept[39]["image_id"] == 39


def _sharded_split(path, n, image_size=16, shard_bytes=8000):
    """A split of many small shards; returns (path, bytes of the largest shard, bytes of the split:
    index and shards)."""
    write_split(path, (make_sample(i, seed=0, image_size=image_size) for i in range(n)), size_limit=shard_bytes)
    shards = json.loads((path / "index.json").read_text())["shards"]
    sizes = [s["raw_data"]["bytes"] for s in shards]
    return str(path), max(sizes), sum(sizes) + (path / "index.json").stat().st_size


def test_remote_split_larger_than_the_cache_limit_is_read_whole(tmp_path, monkeypatch):
    """The cache never holds more than data.cache_limit, least recently used shards are evicted and fetched
    again, and each epoch still reads every sample exactly once. The limit leaves room for what the reader
    has in flight: 8 x batch samples ahead (streaming's predownload), each possibly in another shard.
    Streaming counts a shard against the limit only once it is downloaded, so two downloads that start
    together each find room for one shard: the disk can exceed the limit by one shard per concurrent
    download beyond the first (here the worker's reader and its predownload thread: one shard)."""
    monkeypatch.setenv("SLURM_JOB_ID", "4343")
    remote, largest, total = _sharded_split(tmp_path / "remote", 400)
    index = (tmp_path / "remote" / "index.json").stat().st_size
    limit = index + (8 * 4 + 8) * largest
    assert limit < 0.6 * total
    cfg = DataConfig(train=[StreamConfig(remote=remote, name="syn")], cache_dir=str(tmp_path / "cache"),
                     cache_limit=str(limit), image_size=16, num_workers=1)
    loader = build_train_loader(cfg, 4)
    cache = tmp_path / "cache" / "job-4343" / "syn"
    for _ in range(2):  # the second epoch reads shards the first one evicted
        assert sorted(_ids(loader)) == list(range(400))
        cached = [p.stat().st_size for p in cache.iterdir() if p.name.endswith(".mds")]
        assert index + sum(cached) <= limit + largest
        assert len(cached) < len(json.loads((cache / "index.json").read_text())["shards"])


def test_cache_limit_is_checked(tmp_path, split40, monkeypatch):
    from blip_train.config import load_config
    from blip_train.config.loading import ConfigError as LoadingError

    monkeypatch.setenv("SLURM_JOB_ID", "4344")
    remote, largest, _ = _sharded_split(tmp_path / "remote", 40)
    index = (tmp_path / "remote" / "index.json").stat().st_size
    cfg = DataConfig(train=[StreamConfig(remote=remote, name="syn")], cache_dir=str(tmp_path / "cache"),
                     cache_limit=str(index + 2 * largest), image_size=16, num_workers=0)
    with pytest.raises(LoadingError, match="data.cache_limit: Cache limit .* is too low"):
        build_train_loader(cfg, 4)
    with pytest.raises(LoadingError, match="data.cache_limit: data.train\\[1\\] .* is not remote"):
        load_config(None, [f"data.train=[{{remote: {remote}}}, {{local: {split40}}}]", "data.cache_limit=10gb"])
    with pytest.raises(LoadingError, match="data.cache_limit: '10 gigs' is not a size"):
        load_config(None, [f"data.train=[{{remote: {remote}}}]", "data.cache_limit=10 gigs"])
    assert load_config(None, [f"data.train=[{{remote: {remote}}}]", "data.cache_limit=2000000000"]).data.cache_limit \
        == "2000000000"


def test_canonical_nodes_come_from_the_config_and_must_fit_the_node_count(split40):
    """Streaming's default, the number of physical nodes, would tie the order to the job's layout (the
    cluster tier reads the same order on 1 node x 2 ranks and 2 nodes x 1 rank); the key reaches streaming,
    a node count it cannot be spread over is refused naming it, and changing it on resume is a meaning change."""
    from blip_train.config import ConfigError, config_to_dict, load_config
    from blip_train.config.changes import meaning_changes
    from blip_train.data.datasets import check_canonical_nodes

    loader = build_train_loader(_cfg(split40), 4)
    assert sorted(_ids(loader)) == list(range(40)) and loader.dataset.num_canonical_nodes == 1
    assert loader.state_dict()["num_canonical_nodes"] == 1  # saved with the position: a resume keeps it
    four = DataConfig(train=[StreamConfig(local=split40)], image_size=16, num_workers=0, num_canonical_nodes=4)
    assert build_train_loader(four, 4).dataset.num_canonical_nodes == 4
    for nodes in (1, 2, 4, 8):
        check_canonical_nodes(four, nodes)
    with pytest.raises(ConfigError, match=r"^data.num_canonical_nodes: 4 canonical nodes .* 3 nodes"):
        check_canonical_nodes(four, 3)
    with pytest.raises(ConfigError, match="data.num_canonical_nodes: must be > 0"):
        load_config(None, ["data.num_canonical_nodes=0"])
    recorded = config_to_dict(load_config(None, [f"data.train=[{{local: {split40}}}]"]))
    changed = load_config(None, [f"data.train=[{{local: {split40}}}]", "data.num_canonical_nodes=2"])
    assert meaning_changes(recorded, changed) == ["data.num_canonical_nodes: 1 -> 2"]
