# The two entry points of the README: `make run` and `make test`.
# Both create the virtual environment on first use and reinstall when pyproject.toml changes.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test test-fast test-all docs bench gpu-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[test]'
	touch $@

# The main job on the embedded default: Downpour SGD (2 replicas, 2 parameter-server shards on a
# local Ray) training a ResNet-20 on the 8x8 digits, about a minute.
run: $(STAMP)
	$(BIN)/distbelief train --recipe digits-downpour

# The tiers (tests/conftest.py): `test` is what CI runs, every mode end to end through Ray but
# not the slow tier (kills, node loss, SIGKILL, the real CIFAR-10, long learning runs);
# `test-fast` the pure tests (no Ray, no child process) while one edits; `test-all` everything.
# The slowest durations are printed for the next trim.
test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" --durations=25

test-fast: $(STAMP)
	$(BIN)/python -m pytest --pure --durations=10

test-all: $(STAMP)
	$(BIN)/python -m pytest --durations=25

# The documentation site (docs/, mkdocs.yml) into site/, strictly: a broken link fails it.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_models.py
	$(BIN)/python benchmarks/bench_trainer.py
	$(BIN)/python benchmarks/bench_ps.py
	$(BIN)/python benchmarks/bench_downpour.py --amortize
	$(BIN)/python benchmarks/bench_sandblaster.py

# The one GPU check (benchmarks/gpu_check.py): under 8 minutes on one H100/H200, results in
# gpu-check.md. `benchmarks/gpu_check.sh --cpu-dry-run` runs it anywhere at tiny sizes.
gpu-check: $(STAMP)
	benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) .pytest_cache src/*.egg-info site
