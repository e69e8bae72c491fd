# The two entry points of the README: `make run` and `make test`.
# Both create the virtual environment on first use and reinstall when pyproject.toml changes.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test test-all bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[test]'
	touch $@

# The main job on the embedded default: Downpour SGD (2 replicas, 2 parameter-server shards on a
# local Ray) training a ResNet-20 on the 8x8 digits, about a minute.
run: $(STAMP)
	$(BIN)/distbelief train --recipe digits-downpour

# Everything but the tests marked slow (a few minutes each: kills, node loss, SIGKILL, real
# CIFAR-10); `make test-all` runs those too. The slowest durations are printed for the next trim.
test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" --durations=25

test-all: $(STAMP)
	$(BIN)/python -m pytest --durations=25

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_models.py
	$(BIN)/python benchmarks/bench_trainer.py
	$(BIN)/python benchmarks/bench_ps.py
	$(BIN)/python benchmarks/bench_downpour.py --amortize
	$(BIN)/python benchmarks/bench_sandblaster.py

clean:
	rm -rf $(VENV) .pytest_cache src/*.egg-info
