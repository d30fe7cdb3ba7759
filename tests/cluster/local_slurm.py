"""A real two-node Slurm 22.05 cluster on this one host: the `cluster` test tier runs `slurm/*.sbatch` on
it, and anyone can bring it up to debug their own batch scripts (slurm/README.md).

    sudo python -m tests.cluster.local_slurm up [--dir /tmp/bt-slurm]   # prints `export SLURM_CONF=...`
    sudo python -m tests.cluster.local_slurm down [--dir /tmp/bt-slurm]

What it is: Debian's slurmctld and two slurmd (`slurmd -N bt-node0|bt-node1`, built with MULTIPLE_SLURMD)
with the same NodeHostname, NodeAddr 127.0.0.1 and a port each, so a `--nodes=2` job gets SLURM_NODEID 0
and 1 and two SLURMD_NODENAMEs. Each slurmd runs in its own mount namespace with a private /dev/shm, so its
jobs see the shared memory of their own node only, as on separate machines (MosaicML streaming coordinates
the ranks of a node through /dev/shm); the rest of the file system, /tmp included, is shared like a
cluster's shared file system. No munge daemon (auth/none, cred/none: one host trusts itself), no
accounting, no cgroups (proctrack/linuxproc, task/none); `SlurmdParameters=config_overrides` lets each
node declare more CPUs than the host has, so the shipped `--cpus-per-task=12` fits. `AuthInfo=
cred_expire=10` shortens the hold before a requeued job may start again from ~143 s to ~11 s. slurmctld
checks `--signal` warnings and time limits only every ~30 s.

Needs root: apt-get installs the packages when missing, the node names get an /etc/hosts line (so that a
job's MASTER_ADDR, the first node's name, resolves), and the private /dev/shm is a mount. Tear-down cancels
the jobs, then SIGKILLs by PID whatever is left in the nodes' mount namespaces (slurmstepd ignores
SIGTERM) and the controller.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from blip_train.distributed.env import free_port

NODES = ("bt-node0", "bt-node1")
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
COMMANDS = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")
HOSTS_FILE = Path("/etc/hosts")
CPUS_PER_NODE = 48
"""Declared, not real: jobs share the host's cores. Room for a few jobs of --cpus-per-task=12 at once."""


class ClusterUnavailable(RuntimeError):
    """This host cannot run the cluster; the message says why in one line (the tier skips with it)."""


def ensure_packages() -> None:
    """Install Slurm with apt-get unless its commands are all on PATH; ClusterUnavailable when impossible."""
    if all(shutil.which(c) for c in COMMANDS):
        return
    if os.geteuid() != 0:
        raise ClusterUnavailable(f"Slurm is not installed, and installing it (apt-get install {' '.join(PACKAGES)}) "
                                 "needs root")
    if shutil.which("apt-get") is None:
        raise ClusterUnavailable("Slurm is not installed and this host has no apt-get to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", *PACKAGES]
    r = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:  # a fresh machine's package lists may be missing or stale
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True, timeout=900)
        r = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0 or not all(shutil.which(c) for c in COMMANDS):
        last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ClusterUnavailable(f"apt-get install {' '.join(PACKAGES)} failed: {last}")


def ensure_hosts_line(nodes: tuple[str, ...] = NODES) -> None:
    """Make the node names resolve to 127.0.0.1 (one /etc/hosts line, added once and left in place)."""
    missing = [n for n in nodes if not _resolves(n)]
    if missing:
        with HOSTS_FILE.open("a") as f:
            f.write(f"127.0.0.1 {' '.join(missing)}  # blip-train local Slurm cluster (tests/cluster)\n")


def _resolves(name: str) -> bool:
    try:
        return socket.gethostbyname(name) == "127.0.0.1"
    except OSError:
        return False


def _mount_namespace(pid: int) -> Optional[str]:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def check_private_shm() -> None:
    """A process in a new mount namespace can mount its own /dev/shm, or ClusterUnavailable."""
    if shutil.which("unshare") is None:
        raise ClusterUnavailable("unshare (util-linux) is missing: the nodes need their own /dev/shm")
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                        "mount -t tmpfs -o size=1m tmpfs /dev/shm"], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise ClusterUnavailable(f"cannot give a node its own /dev/shm (unshare --mount; mount -t tmpfs): "
                                 f"{r.stderr.strip() or r.returncode}")


class LocalSlurmCluster:
    """Config, daemons and job helpers of one local cluster rooted at `root` (state, spool, logs, slurm.conf)."""

    def __init__(self, root: Path, nodes: tuple[str, ...] = NODES, cpus_per_node: int = CPUS_PER_NODE,
                 shm_size: str = "2g") -> None:
        self.root = Path(root)
        self.nodes = nodes
        self.cpus_per_node = cpus_per_node
        self.shm_size = shm_size
        self.conf = self.root / "slurm.conf"
        self.pids_file = self.root / "pids.json"
        self._procs: list[subprocess.Popen] = []

    # ----------------------------------------------------------------------------------- set-up, tear-down

    def write_config(self) -> None:
        r = self.root
        for d in ("state", "spool", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        host = socket.gethostname().split(".")[0]
        lines = [
            "ClusterName=blip-train-local",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/none", "CredType=cred/none",
            "AuthInfo=cred_expire=10",  # a requeued job may start again after ~11 s instead of ~143 s
            f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/slurmctld.pid", f"SlurmdPidFile={r}/slurmd.%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log", f"SlurmdLogFile={r}/log/slurmd.%n.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/builtin", "MpiDefault=none", "MailProg=/bin/true",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "SlurmdParameters=config_overrides",  # declare more CPUs than the host has
            "ReturnToService=2", "KillWait=5", "InactiveLimit=0", "MinJobAge=600",
        ]
        for node in self.nodes:
            lines.append(f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={free_port()} "
                         f"CPUs={self.cpus_per_node} State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 60.0, detach: bool = False) -> None:
        """Write the config and start the controller and one slurmd per node; return once every node is idle.

        detach: the daemons outlive this process (the `up` command); otherwise they are its children."""
        ensure_packages()
        if os.geteuid() != 0:
            raise ClusterUnavailable("the local cluster needs root (slurmd, /etc/hosts, mounting a node's /dev/shm)")
        check_private_shm()
        ensure_hosts_line(self.nodes)
        self.write_config()
        env = dict(os.environ, SLURM_CONF=str(self.conf))
        out = open(self.root / "log" / "daemons.out", "ab")
        try:
            self._procs.append(subprocess.Popen(["slurmctld", "-D", "-f", str(self.conf)], env=env, stdout=out,
                                                stderr=subprocess.STDOUT, start_new_session=detach))
            # `unshare` execs the shell, which mounts the node's own /dev/shm and execs slurmd: one PID.
            mount = f"mount -t tmpfs -o size={self.shm_size},mode=1777 tmpfs /dev/shm && exec \"$@\""
            for node in self.nodes:
                self._procs.append(subprocess.Popen(
                    ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount, "sh",
                     "slurmd", "-D", "-f", str(self.conf), "-N", node],
                    env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=detach))
        finally:
            out.close()
        self.pids_file.write_text(json.dumps({"slurmctld": self._procs[0].pid,
                                              "slurmd": [p.pid for p in self._procs[1:]]}))
        deadline = time.monotonic() + timeout
        while True:
            states = self.node_states()
            if states == {n: "idle" for n in self.nodes}:
                return
            dead = [p.args for p in self._procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the local Slurm cluster did not come up (nodes {states}, exited: {dead}):\n"
                                   + self.log_tail())
            time.sleep(0.5)

    def stop(self) -> None:
        """Cancel every job, then SIGKILL by PID what is left: the processes in the nodes' mount namespaces
        (slurmd, slurmstepd, job processes; slurmstepd ignores SIGTERM) and the controller with its helper."""
        pids = json.loads(self.pids_file.read_text()) if self.pids_file.is_file() else {"slurmctld": None, "slurmd": []}
        if pids["slurmctld"] and _alive(pids["slurmctld"]):
            jobs = self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()
            if jobs:
                self.run(["scancel", *jobs], check=False)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and self.run(["squeue", "-h"], check=False).stdout.strip():
                    time.sleep(0.5)
        own = _mount_namespace(os.getpid())
        namespaces = {ns for ns in (_mount_namespace(p) for p in pids["slurmd"]) if ns and ns != own}
        victims = {p for p in pids["slurmd"] if _alive(p)}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and _mount_namespace(int(entry.name)) in namespaces:
                victims.add(int(entry.name))
        if pids["slurmctld"] and _alive(pids["slurmctld"]):
            victims.add(pids["slurmctld"])
            victims.update(_children(pids["slurmctld"]))  # slurmscriptd
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self._procs:
            proc.wait(timeout=30)
        self._procs.clear()
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in victims) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.pids_file.unlink(missing_ok=True)

    def __enter__(self) -> "LocalSlurmCluster":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------------------------- using it

    def env(self, base: Optional[dict] = None) -> dict:
        """`base` (default: this process's environment) with SLURM_CONF pointing at this cluster."""
        return dict(os.environ if base is None else base, SLURM_CONF=str(self.conf))

    def run(self, args: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        r = subprocess.run(args, env=kwargs.pop("env", self.env()), capture_output=True, text=True,
                           timeout=kwargs.pop("timeout", 60), **kwargs)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def node_states(self) -> dict[str, str]:
        r = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False)
        return dict(line.split() for line in r.stdout.splitlines() if len(line.split()) == 2)

    def node_pid(self, node: str) -> int:
        """PID of a node's slurmd (its mount namespace is the node's)."""
        return json.loads(self.pids_file.read_text())["slurmd"][self.nodes.index(node)]

    def sbatch(self, script: str | os.PathLike, *args: str, options: tuple[str, ...] = (), env: dict,
               cwd: str | os.PathLike) -> int:
        """`sbatch [options] script args...` from `cwd` (the job's SLURM_SUBMIT_DIR); returns the job id."""
        r = self.run(["sbatch", "--parsable", *options, str(script), *args], env=self.env(env), cwd=cwd)
        return int(r.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, NodeList, RunTime, ...)."""
        r = self.run(["scontrol", "show", "job", "-o", str(job_id)])
        return dict(re.findall(r"(\w+)=(\S*)", r.stdout))

    def wait_job(self, job_id: int, done: Callable[[dict], bool], timeout: float, what: str = "") -> dict:
        """Poll `scontrol show job` until `done(info)`; AssertionError with the job and log tail on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if done(info):
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id}: timed out after {timeout:.0f} s waiting for {what or done}; "
                                     f"state {info.get('JobState')} ({info.get('Reason')}), restarts "
                                     f"{info.get('Restarts')}\n" + self.log_tail())
            time.sleep(0.3)

    def log_tail(self, lines: int = 15) -> str:
        out = []
        for log in sorted((self.root / "log").glob("*")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(out)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").is_dir() and "zombie" not in _status(pid)


def _status(pid: int) -> str:
    try:
        return next((line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                     if line.startswith("State:")), "")
    except OSError:
        return ""


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.cluster.local_slurm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("up", "down"))
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "bt-slurm"),
                   help="state, spool, logs and slurm.conf of the cluster [%(default)s]")
    args = p.parse_args(argv)
    cluster = LocalSlurmCluster(Path(args.dir))
    if args.command == "down":
        cluster.stop()
        print(f"stopped the local cluster of {cluster.conf}")
        return 0
    if cluster.pids_file.is_file():
        print(f"{args.dir} already holds a running cluster: `down` it first", file=sys.stderr)
        return 1
    try:
        cluster.start(detach=True)
    except ClusterUnavailable as e:
        print(f"cannot start a local Slurm cluster here: {e}", file=sys.stderr)
        return 1
    print(f"2 nodes up ({', '.join(cluster.nodes)}); logs in {cluster.root / 'log'}. In your shell:\n"
          f"  export SLURM_CONF={cluster.conf}\n  sinfo")
    return 0


if __name__ == "__main__":
    sys.exit(main())
