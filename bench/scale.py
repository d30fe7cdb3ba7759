"""`make scale`: every paper recipe at its true dimensions on 2 CPU ranks (see bench/scale/__init__.py).

    python bench/scale.py --list
    python bench/scale.py --recipes blip2_stage1_vitg,blip_pretrain_vitb_14m

The code lives in the package bench/scale/ (model.py: recipes and the memory model; towers.py: random towers
and data; run.py: running, tracing, the table); this file is the script entry. The package, not this file, is
what `import bench.scale` finds.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repo root

from bench.scale.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
