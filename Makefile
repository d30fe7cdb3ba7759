# blip-train — make setup | make test | make demo | make bench
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test test-fast test-dist test-cluster demo bench scale clean

$(VENV)/.installed: setup.py
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install --upgrade pip
	$(VPY) -m pip install -e '.[dev]'
	$(VPY) -m pip check
	touch $@

setup: $(VENV)/.installed

test: $(VENV)/.installed
	$(VPY) -m pytest -q tests

test-fast: $(VENV)/.installed
	$(VPY) -m pytest -q tests -m "not dist and not e2e and not cluster"

# Real services on this host: a 2-node Slurm cluster (apt-get installs it; needs root).
# `make test` runs them too, or says in its summary why they were skipped.
test-cluster: $(VENV)/.installed
	$(VPY) -m pytest -q tests -m cluster

# SEEDS=1,2 also trains every stage with those run.seed values and reports the spread.
demo: $(VENV)/.installed
	$(VPY) -m blip_train.demo --out runs/demo $(if $(SEEDS),--seeds $(SEEDS))

bench: $(VENV)/.installed
	$(VPY) bench/run.py

# The paper recipes at their true sizes on 2 CPU ranks (hours; not part of `make test`).
# RECIPES=blip2_stage1_vitg,blip2_stage2_opt2.7b picks some.
scale: $(VENV)/.installed
	$(VPY) bench/scale.py $(if $(RECIPES),--recipes $(RECIPES))

clean:
	rm -rf runs/ .pytest_cache
