# The two README commands. Each creates .venv (Python 3.11) if missing and installs the package.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEVICE ?= cpu

.PHONY: install lint test demo bench gpu-check clean cluster-rehearsal

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

# infra/'s shape on this machine with the real engines and four faults (infra/README.md,
# "Rehearsed on one machine"); `make test` runs it too (tests/cluster/, marker `cluster`).
cluster-rehearsal: $(STAMP)
	$(BIN)/python -m pytest tests/cluster -m cluster -v

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run --device $(DEVICE)

# The VOC recipe's VGG16 on one GPU, bf16 vs float32, ours vs torchvision (< 10 min); CPU: tiny size.
gpu-check: $(STAMP)
	$(BIN)/python -m benchmarks.gpu_check

clean:
	rm -rf runs ray_results mlflow.db mlruns .pytest_cache
