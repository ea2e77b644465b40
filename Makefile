# The two README commands. Each creates .venv (Python 3.11) if missing and installs the package.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEVICE ?= cpu

.PHONY: install lint test demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --progress-bar off -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/frcnn-jobs demo --workdir runs/demo

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run --device $(DEVICE)

clean:
	rm -rf runs ray_results mlflow.db mlruns .pytest_cache
