# ettin: `make setup` builds .venv from nothing; `make test` runs every test tier that runs here;
# `make test-fast` the unit tier only (no slow, distributed or slurm tests); `make check` lints.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch is pinned to the build on this machine's disk (constraints.txt); an open range could pull
# a multi-GB CUDA wheel from the registry.
PIP    := $(BIN)/python -m pip install --quiet --constraint constraints.txt

.PHONY: setup check fix test test-fast demo bench gpu-check clean

# make slurm-up / make slurm-down: a real Slurm cluster on this machine (slurm/local/)
include slurm/local/Makefile.inc

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.14.1 torchvision==0.29.1
	$(PIP) --editable '.[dev]'
	touch $@

# Lint and format check (ruff, configured in pyproject.toml); CI runs it before the tests.
check: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Apply ruff's safe fixes and format in place.
fix: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: setup
	$(BIN)/python -m pytest -q tests

# The markers are registered in pyproject.toml ([tool.pytest.ini_options]).
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not distributed and not slurm" tests

demo: setup
	$(BIN)/ettin demo --out demo_out

bench: setup
	$(BIN)/python benchmarks/bench_train_step.py
	$(BIN)/python benchmarks/bench_loader.py
	$(BIN)/python benchmarks/bench_prepare.py

# The GPU acceptance run (benchmarks/gpu_check.py): one markdown table in $(OUT). GPU machines
# may have no registry, so it uses .venv when there is one and the machine's python3 otherwise.
# SMOKE=1 runs it on tiny shapes on the CPU (CI does, through tests/test_benchmarks.py).
OUT ?= gpu_check_out
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
gpu-check:
	PYTHONPATH=src $(GPU_PYTHON) benchmarks/gpu_check.py --out $(OUT) $(if $(SMOKE),--smoke)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
