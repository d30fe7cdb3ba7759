"""Host the rendezvous store of a multi-node torchrun launch for the whole job step.

    python -m blip_train.distributed.rendezvous_store PORT READY_FILE

torchrun's c10d rendezvous normally hosts its TCPStore inside the agent of the node named by
--rdzv_endpoint. That agent leaves as soon as the exit barrier lets it, taking the store with it, while the
other nodes' agents may still be waiting on the barrier or closing the rendezvous: they then log "Error
waiting on exit barrier" / "failed to shutdown the rendezvous" with a traceback, after a run that
succeeded (seen on a two-node Slurm job; the more nodes, the likelier). slurm/launch.sh therefore runs
this process on the first node before the job step and points every agent at it as a client
(--rdzv_conf is_host=0), so the store outlives every agent.

The store ignores the signals Slurm relays to the job (USR1 for preemption, TERM, INT, HUP): it must
answer the agents while they save and exit. launch.sh kills it once the step has ended.
"""
from __future__ import annotations

import signal
import sys
import time
from datetime import timedelta
from pathlib import Path


def host_store(port: int, ready_file: Path):
    """Bind the store on every interface at `port`, then create `ready_file` (launch.sh waits for it)."""
    from torch.distributed import TCPStore

    store = TCPStore("0.0.0.0", port, is_master=True, wait_for_workers=False, timeout=timedelta(minutes=30))
    ready_file.write_text(f"{port}\n")
    return store


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or not argv[0].isdigit():
        print("usage: python -m blip_train.distributed.rendezvous_store PORT READY_FILE", file=sys.stderr)
        return 2
    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    try:
        store = host_store(int(argv[0]), Path(argv[1]))
    except Exception as exc:  # a taken port, mostly: one line for the job log, launch.sh stops there
        print(f"rendezvous_store: cannot host the store on port {argv[0]}: {str(exc).splitlines()[0]}",
              file=sys.stderr)
        return 2
    while store is not None:  # serve from the store's own thread until launch.sh kills us
        time.sleep(3600)
    return 0


if __name__ == "__main__":
    sys.exit(main())
