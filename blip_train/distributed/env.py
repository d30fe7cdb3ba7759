"""Which rank am I? Rank discovery for every launcher we support, in one place.

The same `python -m blip_train.train` runs under four launchers; each describes the world differently:

| launcher | what it sets | what we read |
|---|---|---|
| `torchrun` (also `srun ... torchrun`, one per node) | RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_* | those |
| `deepspeed` (pdsh or `--no_ssh`) | RANK, LOCAL_RANK, WORLD_SIZE, MASTER_*, CROSS_RANK, CROSS_SIZE, LOCAL_SIZE; NOT LOCAL_WORLD_SIZE | LOCAL_SIZE (else WORLD_SIZE // CROSS_SIZE), CROSS_RANK |
| `srun` one task per GPU (also `deepspeed --launcher slurm`) | SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, SLURM_*TASKS_PER_NODE, SLURM_NODEID, nodelist | those; MASTER_ADDR = first host; MASTER_PORT from the job id |
| nothing | - | rank 0 of 1 on 127.0.0.1, a free port |

Launcher variables win over SLURM's: under `srun ... torchrun` SLURM_PROCID is the node's index and
SLURM_NTASKS the number of nodes, while RANK/WORLD_SIZE describe the real world.

`export_environment` writes the result back as the torch.distributed variables, because DeepSpeed
(which otherwise tries MPI discovery) and MosaicML streaming (which needs LOCAL_WORLD_SIZE) read them.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from typing import List, Mapping, MutableMapping, Optional

LAUNCHERS = ("torchrun", "deepspeed", "slurm", "single")
EXPORTED_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

# torch.distributed.run always sets these next to RANK; a manually exported LOCAL_WORLD_SIZE counts too.
_TORCHRUN_MARKERS = ("TORCHELASTIC_RUN_ID", "GROUP_RANK", "LOCAL_WORLD_SIZE")
# deepspeed.launcher.launch sets these (deepspeed.constants CROSS_RANK / CROSS_SIZE) and LOCAL_SIZE.
_DEEPSPEED_MARKERS = ("CROSS_SIZE", "LOCAL_SIZE")

SLURM_PORT_BASE = 10000
SLURM_PORT_SPAN = 20000
"""MASTER_PORT under SLURM = 10000 + job_id % 20000; slurm/launch.sh uses the same formula."""


class DistEnvError(RuntimeError):
    """The launcher environment is inconsistent; the message is one line naming the variables."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    master_addr: str
    master_port: int
    launcher: str
    """torchrun | deepspeed | slurm | single: where the numbers came from (for logs)."""

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


def discover_environment(environ: Mapping[str, str] = os.environ) -> DistEnv:
    """Map the launcher's variables to one `DistEnv`; raise `DistEnvError` when they contradict."""
    if "RANK" in environ or "WORLD_SIZE" in environ:
        if any(k in environ for k in _TORCHRUN_MARKERS):
            env = _from_torchrun(environ)
        elif any(k in environ for k in _DEEPSPEED_MARKERS):
            env = _from_deepspeed(environ)
        elif "SLURM_PROCID" in environ:
            # RANK/WORLD_SIZE without a known launcher, inside a SLURM step: both must tell the same story.
            env = _from_slurm(environ)
            _check_agrees(environ, "WORLD_SIZE", env.world_size, "SLURM_NTASKS")
            _check_agrees(environ, "RANK", env.rank, "SLURM_PROCID")
        else:
            env = _from_bare_rank_vars(environ)
    elif "SLURM_PROCID" in environ and ("SLURM_NTASKS" in environ or "SLURM_NPROCS" in environ):
        env = _from_slurm(environ)
    else:
        env = _single(environ)
    _validate(env)
    return env


def export_environment(env: DistEnv) -> None:
    """Write the torch.distributed variables DeepSpeed and MosaicML streaming read into os.environ."""
    os.environ.update(RANK=str(env.rank), LOCAL_RANK=str(env.local_rank), WORLD_SIZE=str(env.world_size),
                      LOCAL_WORLD_SIZE=str(env.local_world_size), MASTER_ADDR=env.master_addr,
                      MASTER_PORT=str(env.master_port))


def cuda_device_index(local_rank: int, local_world_size: int, device_count: int,
                      visible: Optional[str] = None) -> int:
    """This task's CUDA device among the ones it sees.

    Every GPU of the node visible (torchrun, the deepspeed launcher, `srun` with shared GPUs): the
    node-local rank. Exactly one visible (`srun --gpus-per-task=1`, or a per-task CUDA_VISIBLE_DEVICES):
    device 0, whatever the local rank. Anything in between cannot be mapped safely and is refused.
    `visible`: CUDA_VISIBLE_DEVICES, for the message.
    """
    shown = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
    if device_count < 1:
        raise DistEnvError(f"no CUDA device visible to this task{shown}; run.device=cpu runs without one")
    if device_count == 1:
        return 0
    if device_count >= local_world_size:
        return local_rank
    raise DistEnvError(f"{local_world_size} tasks on this node but this task sees {device_count} GPUs{shown}: "
                       "give every task all of the node's GPUs or exactly one (srun --gpus-per-task=1)")


def select_cuda_device(env: DistEnv, device_count: int, environ: MutableMapping[str, str] = os.environ) -> int:
    """`cuda_device_index` for `env`, and LOCAL_RANK set to it: DeepSpeed picks its device from LOCAL_RANK
    (the engine's `set_device`, zero.Init), which under `--gpus-per-task=1` would name a GPU the task
    cannot see. The node-local rank stays in `env.local_rank` (and SLURM_LOCALID); streaming does not
    need LOCAL_RANK: it takes the node layout from RANK and LOCAL_WORLD_SIZE."""
    device = cuda_device_index(env.local_rank, env.local_world_size, device_count,
                               environ.get("CUDA_VISIBLE_DEVICES"))
    environ["LOCAL_RANK"] = str(device)
    return device


# ----------------------------------------------------------------------------------------- launchers

def _from_torchrun(environ: Mapping[str, str]) -> DistEnv:
    world = _int(environ, "WORLD_SIZE")
    rank = _int(environ, "RANK")
    local_world = _int(environ, "LOCAL_WORLD_SIZE", default=world)
    node_rank = _int(environ, "GROUP_RANK", default=_int(environ, "NODE_RANK", default=rank // max(local_world, 1)))
    return DistEnv(rank=rank, local_rank=_int(environ, "LOCAL_RANK", default=rank % max(local_world, 1)),
                   world_size=world, local_world_size=local_world, node_rank=node_rank,
                   master_addr=environ.get("MASTER_ADDR", ""), master_port=_int(environ, "MASTER_PORT", default=0),
                   launcher="torchrun")


def _from_deepspeed(environ: Mapping[str, str]) -> DistEnv:
    world = _int(environ, "WORLD_SIZE")
    rank = _int(environ, "RANK")
    # The deepspeed launcher knows how many processes it started on this node (LOCAL_SIZE) but does not
    # export it as LOCAL_WORLD_SIZE. Without LOCAL_SIZE, assume equal nodes: WORLD_SIZE // CROSS_SIZE.
    if "LOCAL_SIZE" in environ:
        local_world = _int(environ, "LOCAL_SIZE")
    else:
        nodes = _int(environ, "CROSS_SIZE")
        if nodes <= 0 or world % nodes:
            raise DistEnvError(f"WORLD_SIZE={world} is not divisible by CROSS_SIZE={nodes} and LOCAL_SIZE is unset")
        local_world = world // nodes
    node_rank = _int(environ, "CROSS_RANK", default=rank // max(local_world, 1))
    return DistEnv(rank=rank, local_rank=_int(environ, "LOCAL_RANK"), world_size=world, local_world_size=local_world,
                   node_rank=node_rank, master_addr=environ.get("MASTER_ADDR", ""),
                   master_port=_int(environ, "MASTER_PORT", default=0), launcher="deepspeed")


def _from_slurm(environ: Mapping[str, str]) -> DistEnv:
    ntasks_var = "SLURM_NTASKS" if "SLURM_NTASKS" in environ else "SLURM_NPROCS"
    world = _int(environ, ntasks_var)
    rank = _int(environ, "SLURM_PROCID")
    node_rank = _int(environ, "SLURM_NODEID", default=0)
    local_world = _slurm_local_world_size(environ, node_rank, world)
    master_addr = environ.get("MASTER_ADDR") or _first_host(environ)
    if "MASTER_PORT" in environ:
        port = _int(environ, "MASTER_PORT")
    elif "SLURM_JOB_ID" in environ:
        port = slurm_master_port(environ["SLURM_JOB_ID"])
    else:
        raise DistEnvError("SLURM step without SLURM_JOB_ID or MASTER_PORT: cannot choose MASTER_PORT")
    return DistEnv(rank=rank, local_rank=_int(environ, "SLURM_LOCALID", default=0), world_size=world,
                   local_world_size=local_world, node_rank=node_rank, master_addr=master_addr, master_port=port,
                   launcher="slurm")


def _from_bare_rank_vars(environ: Mapping[str, str]) -> DistEnv:
    # RANK/WORLD_SIZE from an unknown launcher: without LOCAL_WORLD_SIZE we cannot know the node layout,
    # and guessing wrong silently breaks per-node data caches, so only one rank is accepted.
    world = _int(environ, "WORLD_SIZE", default=1)
    if world != 1:
        raise DistEnvError(f"RANK/WORLD_SIZE={world} set without LOCAL_WORLD_SIZE by an unknown launcher; "
                           "set LOCAL_WORLD_SIZE (or launch with torchrun/deepspeed/srun)")
    return DistEnv(rank=_int(environ, "RANK", default=0), local_rank=_int(environ, "LOCAL_RANK", default=0),
                   world_size=1, local_world_size=1, node_rank=0,
                   master_addr=environ.get("MASTER_ADDR") or "127.0.0.1",
                   master_port=_int(environ, "MASTER_PORT", default=0) or free_port(), launcher="torchrun")


def _single(environ: Mapping[str, str]) -> DistEnv:
    return DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, node_rank=0,
                   master_addr=environ.get("MASTER_ADDR") or "127.0.0.1",
                   master_port=_int(environ, "MASTER_PORT", default=0) or free_port(), launcher="single")


# ------------------------------------------------------------------------------------- SLURM parsing

def slurm_master_port(job_id: str) -> int:
    """Port every task of a job derives alike: 10000 + job_id % 20000 (requeued jobs keep their id)."""
    digits = re.match(r"\d+", job_id)
    if digits is None:
        raise DistEnvError(f"SLURM_JOB_ID={job_id!r} is not a job number; set MASTER_PORT")
    return SLURM_PORT_BASE + int(digits.group()) % SLURM_PORT_SPAN


def parse_tasks_per_node(value: str) -> List[int]:
    """Expand SLURM's compressed task counts: '4(x2),3' -> [4, 4, 3]."""
    counts: List[int] = []
    for item in value.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if m is None:
            raise DistEnvError(f"cannot parse SLURM tasks-per-node value {value!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def expand_nodelist(nodelist: str) -> List[str]:
    """Expand a SLURM hostlist: 'gpu[01-03,07],cpu5' -> gpu01 gpu02 gpu03 gpu07 cpu5 (zero padding kept).

    Several bracket groups in one name expand as a product, as `scontrol show hostnames` does.
    """
    hosts: List[str] = []
    for item in _split_top_level(nodelist):
        hosts += _expand_host(item)
    return hosts


def _split_top_level(text: str) -> List[str]:
    # Commas inside brackets separate ranges, commas outside separate hosts.
    items, depth, current = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise DistEnvError(f"unbalanced ']' in SLURM nodelist {text!r}")
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    if depth != 0:
        raise DistEnvError(f"unbalanced '[' in SLURM nodelist {text!r}")
    items.append(current)
    return [i.strip() for i in items if i.strip()]


def _expand_host(pattern: str) -> List[str]:
    m = re.match(r"([^\[]*)\[([^\]]*)\](.*)", pattern)
    if m is None:
        return [pattern]
    prefix, ranges, rest = m.groups()
    suffixes = _expand_host(rest) if rest else [""]
    hosts = []
    for part in ranges.split(","):
        bounds = re.fullmatch(r"\s*(\d+)(?:-(\d+))?\s*", part)
        if bounds is None:
            raise DistEnvError(f"cannot parse range {part!r} in SLURM nodelist {pattern!r}")
        lo, hi = bounds.group(1), bounds.group(2) or bounds.group(1)
        width = len(lo)  # "01-03" keeps two digits
        for n in range(int(lo), int(hi) + 1):
            hosts += [f"{prefix}{n:0{width}d}{s}" for s in suffixes]
    return hosts


def _slurm_local_world_size(environ: Mapping[str, str], node_rank: int, world: int) -> int:
    # Per-node lists (step first: a step may use fewer tasks than the job) handle uneven layouts.
    for var in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if var in environ:
            counts = parse_tasks_per_node(environ[var])
            if node_rank >= len(counts):
                raise DistEnvError(f"SLURM_NODEID={node_rank} is outside {var}={environ[var]!r}")
            return counts[node_rank]
    if "SLURM_NTASKS_PER_NODE" in environ:
        return _int(environ, "SLURM_NTASKS_PER_NODE")
    nodes = _int(environ, "SLURM_NNODES", default=1)
    if world % nodes:
        raise DistEnvError(f"SLURM_NTASKS={world} not divisible by SLURM_NNODES={nodes} and no SLURM_TASKS_PER_NODE")
    return world // nodes


def _first_host(environ: Mapping[str, str]) -> str:
    # Rank 0 (which hosts the rendezvous store) runs on the first node of its step's list.
    for var in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        if environ.get(var):
            try:
                return expand_nodelist(environ[var])[0]
            except (DistEnvError, IndexError):
                fallback = _scontrol_first_host(environ[var])
                if fallback:
                    return fallback
                raise
    raise DistEnvError("SLURM step without MASTER_ADDR or SLURM_JOB_NODELIST: cannot find the master host")


def _scontrol_first_host(nodelist: str) -> Optional[str]:
    # Only for hostlist syntax our parser does not know; never required.
    if shutil.which("scontrol") is None:
        return None
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0] if out else None


# ------------------------------------------------------------------------------------------- checks

def _validate(env: DistEnv) -> None:
    if env.world_size < 1:
        raise DistEnvError(f"world size {env.world_size} < 1 ({env.launcher} variables)")
    if not 0 <= env.rank < env.world_size:
        raise DistEnvError(f"rank {env.rank} is outside world size {env.world_size} ({env.launcher} variables)")
    if not 1 <= env.local_world_size <= env.world_size:
        raise DistEnvError(f"local world size {env.local_world_size} is outside 1..{env.world_size} "
                           f"({env.launcher} variables)")
    if not 0 <= env.local_rank < env.local_world_size:
        raise DistEnvError(f"local rank {env.local_rank} is outside local world size {env.local_world_size} "
                           f"({env.launcher} variables)")
    if env.world_size > 1 and not env.master_addr:
        raise DistEnvError(f"world size {env.world_size} but MASTER_ADDR is not set ({env.launcher} variables)")
    if env.world_size > 1 and not 0 < env.master_port < 65536:
        raise DistEnvError(f"world size {env.world_size} but MASTER_PORT={env.master_port} is not a valid port")


def _check_agrees(environ: Mapping[str, str], var: str, slurm_value: int, slurm_var: str) -> None:
    if var in environ and _int(environ, var) != slurm_value:
        raise DistEnvError(f"{var}={environ[var]} disagrees with {slurm_var}={slurm_value}; "
                           f"unset {var} or launch through torchrun")


def _int(environ: Mapping[str, str], var: str, default: Optional[int] = None) -> int:
    if var not in environ or environ[var] == "":
        if default is None:
            raise DistEnvError(f"{var} is not set")
        return default
    try:
        return int(environ[var])
    except ValueError:
        raise DistEnvError(f"{var}={environ[var]!r} is not an integer") from None


def free_port() -> int:
    """A TCP port on 127.0.0.1 free right now (the launchers, the demo and the test services pick theirs here)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
