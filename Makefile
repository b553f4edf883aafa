# The two commands of the README: `make demo` (set up, start the embedded stack, run the quickstart
# example end to end) and `make test` (set up, run the whole test suite). Both install what they
# need into .venv on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
QUIET := 2>&1 | grep -v -e "^WARNING: Location" -e "^$$" || true

.PHONY: setup demo up test test-unit lint bench-api wheel-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements/oracles.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install --upgrade pip $(QUIET)
	# CPU torch from local disk first: an unpinned torch would pull a multi-GB CUDA build.
	$(PIP) install torch==2.13.0 $(QUIET)
	# Everything, editable: the core (control plane), the cluster extra (what Ray jobs run and what
	# `orchestra up` starts) and the dev tools. `pip install .` alone is the torch-free core (README).
	$(PIP) install -e ".[cluster,dev]" $(QUIET)
	# Test oracles only, without their torchvision/torchaudio dependencies (see requirements/oracles.txt).
	$(PIP) install --no-deps -r requirements/oracles.txt $(QUIET)
	$(BIN)/python -c "import torch, ray, mlflow, deepspeed, fastapi; assert torch.__version__.startswith('2.13.0')"
	touch $@

demo: setup
	$(BIN)/orchestra up --home .orchestra/demo --port 8000 --run examples/quickstart.yaml --exit

up: setup
	$(BIN)/orchestra up --home .orchestra/home --port 8000

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15

test-unit: setup
	$(BIN)/python -m pytest -q tests/unit

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy api service workers algorithms

bench-api: setup
	$(BIN)/python bench/api_load.py

# The built wheel, core only, with its dependencies from the package index (network, minutes);
# `make test` runs the same checks with the dependencies linked from .venv.
wheel-check: setup
	bash .ci/wheel-check

clean:
	rm -rf .orchestra .pytest_cache .mypy_cache .ruff_cache
