# posttrain: `make demo` runs the main job, `make test` runs the tests. Both install first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
# A GPU is "present" when nvidia-smi lists one; then a CUDA wheel is installed, else the CPU one.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow test-all lint format bench bench-probe bench-quick clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
ifeq ($(HAS_GPU),1)
	# PyPI's Linux torch wheel is the CUDA build.
	$(PIP) install -q "torch==$(TORCH_VERSION)"
else
	# The CPU build: the local wheel where one lies on disk, else PyTorch's CPU index. An
	# unpinned torch from PyPI would be a multi-GB CUDA build.
	$(PIP) install -q "torch==$(TORCH_VERSION)+cpu" || \
	  $(PIP) install -q "torch==$(TORCH_VERSION)" --index-url https://download.pytorch.org/whl/cpu
endif
	$(PIP) install -q -e ".[dev]"
	@touch $(STAMP)

demo: install
	$(VENV)/bin/posttrain demo --out demo_out --stages sft,grpo

test: install
	$(PY) -m pytest -q -m "not slow"

test-slow: install
	$(PY) -m pytest -q -m slow

test-all: install
	$(PY) -m pytest -q

# Benchmarks against TRL (bench/README.md). TRL and matplotlib come from the `bench` extra, never
# a runtime dependency; the constraint keeps the torch build installed above (2.13.0+cpu matches
# ==2.13.0) so that resolving TRL can never swap it for another torch.
# `make bench` runs every case (shared-prompt, long, bigvocab, rollout; bench/README.md) in ABBA
# pairs and rewrites bench/results/latest.jsonl; it probes both sides' candidate configurations
# on sft_long (TRL: padding-free, packing, micro-batches, fp32) and takes the first candidate
# elsewhere (to keep within the 40-minute budget; the last full run took 30 min, see README);
# `make bench-probe` probes every case. `python -m bench.report --readme` then
# regenerates the README's performance table from the results.
BENCH_PROBE_CASES = sft_long
bench: install
	$(PIP) install -q -e ".[bench]" -c <(echo "torch==$(TORCH_VERSION)")
	$(PY) -m bench --select probe --probe $(BENCH_PROBE_CASES)

bench-probe: install
	$(PIP) install -q -e ".[bench]" -c <(echo "torch==$(TORCH_VERSION)")
	$(PY) -m bench --select probe

bench-quick: install
	$(PIP) install -q -e ".[bench]" -c <(echo "torch==$(TORCH_VERSION)")
	$(PY) -m bench --quick

lint: install
	$(VENV)/bin/ruff check posttrain tests bench
	$(VENV)/bin/ruff format --check posttrain tests bench

format: install
	$(VENV)/bin/ruff format posttrain tests bench
	$(VENV)/bin/ruff check --fix posttrain tests bench

clean:
	rm -rf demo_out runs .pytest_cache
