# Both targets bootstrap their own virtual environment on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CIFAR_DIR ?= $(or $(CIFAR10_DIR),$(abspath ../shared/data/cifar10/plain))

.PHONY: venv test test-fast lint demo bench clean

$(BIN)/timm-skipnet: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(BIN)/timm-skipnet

lint: venv
	$(BIN)/ruff check timm_skipnet tests examples

# Everything (what CI runs), in TEST_WORKERS pytest-xdist processes of one thread each (tests that share a module
# result stay together: --dist loadgroup); --durations names the slowest. test-fast leaves out the tests marked slow
# (whole-split evaluation, training runs, subprocesses) for the edit-test loop.
TEST_WORKERS ?= 2
PYTEST := HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

test: venv lint
	$(PYTEST) --durations=15 tests

test-fast: venv lint
	$(PYTEST) -m "not slow" tests

# The main job: evaluate the shipped SkipNet-38 (accuracy, exact MACs, measured speed-up), then turn the gates-open
# ResNet-38 into a SkipNet with the hybrid trainer (rl, then a short ft), ending with the comparison table.
demo: venv
	CIFAR10_DIR=$(CIFAR_DIR) $(BIN)/python examples/demo.py

bench: venv
	$(BIN)/timm-skipnet bench --model skipnet_resnet50 --batch-sizes 1 8 64

clean:
	rm -rf $(VENV)  # never runs/: it holds the training runs the report reads
