# The two README commands. Each creates .venv (Python 3.11) if missing and installs the package.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEVICE ?= cpu

.PHONY: install lint test test-fast test-integration test-cluster demo bench gpu-check clean cluster-rehearsal

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --progress-bar off -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

# Test tiers (pyproject.toml's markers): unit (no Ray, MLflow or servers; under 2 minutes), then
# integration, then the cluster rehearsal. `make test` (what CI runs) is ruff and all three.
test: lint test-fast test-integration test-cluster

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration and not cluster"

test-integration: $(STAMP)
	$(BIN)/python -m pytest -q -m integration

test-cluster: $(STAMP)
	$(BIN)/python -m pytest -q -m cluster

demo: $(STAMP)
	$(BIN)/frcnn-jobs demo --workdir runs/demo

# infra/'s shape on one machine with the real engines and four faults (infra/README.md);
# `make test-cluster` (and so `make test`) runs it too (tests/cluster/, marker `cluster`).
cluster-rehearsal: $(STAMP)
	$(BIN)/python -m pytest tests/cluster -m cluster -v

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run --device $(DEVICE)

# The VOC recipe's VGG16 on one GPU, bf16 vs float32, ours vs torchvision (< 10 min); CPU: tiny size.
gpu-check: $(STAMP)
	$(BIN)/python -m benchmarks.gpu_check

clean:
	rm -rf runs ray_results mlflow.db mlruns .pytest_cache
