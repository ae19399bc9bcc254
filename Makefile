# make run | test | test-all | test-gpu | bench | bench-serve | lint | format | clean
# Each target installs what it needs first (a virtualenv in $(VENV), rebuilt when pyproject.toml changes).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
# pinned so that every machine trains with the same kernels; override, e.g. make test TORCH_PKGS=torch
TORCH_PKGS ?= torch==2.14.1 torchvision==0.29.1
DEEPSPEED_PKG ?= deepspeed==0.19.8
BIN := $(VENV)/bin
TEST_ENV := WANDB_MODE=offline HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# the CPU suites run in this many processes (pytest-xdist; an idle one takes tests queued for a busy one):
# two halve the fast suite's time on a 2-core machine, where much of a test waits on the processes it starts;
# TEST_WORKERS=0 runs them in this one process
TEST_WORKERS ?= 2
PARALLEL := -n $(TEST_WORKERS) --dist worksteal

.PHONY: install browser run test test-all test-gpu bench bench-serve lint format clean clean-outputs

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(MAKE) browser
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(TORCH_PKGS)
	$(BIN)/pip install -e '.[dev,sweeps,slurm]'
	# DeepSpeed ships as source that imports torch to build: against the torch above, no compiled ops
	DS_BUILD_OPS=0 $(BIN)/pip install --no-build-isolation $(DEEPSPEED_PKG)
	touch $@

# the page test drives Debian's chromium (never a browser downloaded at run time); installed when missing
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif command -v apt-get >/dev/null; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		{ $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver; } \
			|| echo "WARNING: apt-get could not install chromium chromium-driver: the page test will fail"; \
	else echo "chromium and chromedriver are missing and apt-get is not here: install them, or the page test fails"; fi

run: $(VENV)/.installed
	$(BIN)/python -m pipeline +experiment=lora_qkv

test: $(VENV)/.installed
	$(TEST_ENV) $(BIN)/python -m pytest -q $(PARALLEL)

test-all: $(VENV)/.installed
	$(TEST_ENV) $(BIN)/python -m pytest -q -m "not gpu" $(PARALLEL)

# on a CUDA machine: the compiled training path, CUDA-graph decode and accelerate's FSDP on the tiny twin
test-gpu: $(VENV)/.installed
	$(TEST_ENV) $(BIN)/python -m pytest -q -m gpu tests/entry/test_gpu.py

bench: $(VENV)/.installed
	$(BIN)/python bench/bench.py

# requests/s and tokens/s of `stages=[serve]` at 1, 8 and 32 concurrent clients against one at a time
bench-serve: $(VENV)/.installed
	$(BIN)/python bench/serve_bench.py

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

format: $(VENV)/.installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# caches only; runs under outputs/ are kept (see clean-outputs)
clean:
	rm -rf .pytest_cache .ruff_cache *.egg-info build dist
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

clean-outputs:
	rm -rf outputs multirun
