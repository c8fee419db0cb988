# The two newcomer commands are `make main` and `make test`; both set themselves up.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# CPU build of torch (pinned for installs on CPU machines; the package accepts any torch >= 2.1)
TORCH  ?= torch==2.13.0

# the runs drawn by `make main`'s report (Static vs RigL, SET, and RigL uniform vs ERK at 90%)
MAIN_REPORT_RUNS := static-erk-s0.9-1x-seed0 set-erk-s0.9-1x-seed0 rigl-erk-s0.9-1x-seed0 \
	rigl-uniform-s0.9-1x-seed0

.PHONY: setup main test test-all lint format bench bench-big clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[experiments,sparse,integrations,dev]"
	touch $(STAMP)

main: setup  ## the default experiment: MNIST-1D comparison table and plots under results/main
	$(BIN)/rigl compare --preset main --out results/main
	$(BIN)/rigl report $(addprefix results/main/runs/,$(MAIN_REPORT_RUNS)) --out results/main/report

test: setup  ## the default test suite (slow tests excluded)
	$(BIN)/python -m pytest

test-all: setup
	$(BIN)/python -m pytest -m ""

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: setup
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

bench: setup  ## benchmarks; results are written under benchmarks/results/
	$(BIN)/python benchmarks/bench_topology_update.py
	$(BIN)/python benchmarks/bench_method_step.py
	$(BIN)/python benchmarks/bench_sparse_kernels.py
	$(BIN)/python benchmarks/bench_sparse_update.py
	$(BIN)/python benchmarks/bench_mnist5k_backends.py
	$(BIN)/python benchmarks/bench_char_gpt_backends.py

bench-big: setup  ## networks whose dense form does not fit in memory (about an hour)
	$(BIN)/python benchmarks/big_sparse.py --config configs/big_sparse.yaml
	$(BIN)/python benchmarks/bench_scaling.py
	$(BIN)/python benchmarks/bench_equal_params.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info
