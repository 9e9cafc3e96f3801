# Two entry points that do their own setup: `make train` and `make test`.
# A machine without an NVIDIA driver gets the CPU wheel of torch (small, no CUDA);
# a machine with one gets PyPI's CUDA build. Override with `make TORCH=... train`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
HAS_NVIDIA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo yes)

ifeq ($(HAS_NVIDIA),yes)
TORCH ?= torch==$(TORCH_VERSION)
INSTALL_TORCH = $(BIN)/pip install "$(TORCH)"
else
TORCH ?= torch==$(TORCH_VERSION)+cpu
# Look for the CPU wheel locally first (a wheel cache or a mirror), then on PyTorch's CPU index.
INSTALL_TORCH = $(BIN)/pip install "$(TORCH)" 2>/dev/null || \
	$(BIN)/pip install "$(TORCH)" --index-url $(TORCH_CPU_INDEX) --extra-index-url https://pypi.org/simple
endif

.PHONY: setup train test test-all lint clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(INSTALL_TORCH)
	$(BIN)/pip install -e ".[dev]"
	@# an older .venv's hydra-optuna-sweeper would register the same hydra/sweeper=optuna
	-$(BIN)/pip uninstall -q -y hydra-optuna-sweeper 2>/dev/null
	touch $@

## Train the default experiment (the tutorial's bigram on tiny Shakespeare); pass ARGS="..." for overrides.
train: setup
	$(BIN)/lmlab-train $(ARGS)

## The fast, offline test suite (slow end-to-end tests: make test-all).
test: setup
	$(BIN)/python -m pytest $(ARGS)

test-all: setup
	$(BIN)/python -m pytest -m "slow or not slow" $(ARGS)

lint: setup
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
