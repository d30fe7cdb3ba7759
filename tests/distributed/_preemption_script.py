"""Run under torchrun (2 ranks, gloo): only rank 1 is signalled; both ranks must agree to stop."""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from blip_train.distributed import PreemptionHandler, barrier, destroy_distributed, discover_environment, init_distributed


def main(out_dir: Path) -> None:
    env = discover_environment()
    init_distributed(env, timeout_minutes=2)
    handler = PreemptionHandler().install()
    before = handler.should_stop()  # nobody signalled yet: every rank says go on
    barrier()
    if env.rank == 1:
        os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while not handler.requested and time.monotonic() < deadline:
            time.sleep(0.01)
    after = handler.should_stop()
    out = {"before": before, "after": after, "requested": handler.requested, "signal": handler.signal_name,
           "again": handler.should_stop()}
    handler.uninstall()
    (out_dir / f"rank{env.rank}.json").write_text(json.dumps(out))
    destroy_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
