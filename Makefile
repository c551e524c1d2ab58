# pagechat: `make run` serves Qwen3-4B-Instruct-2507, `make demo` a tiny random checkpoint offline,
# `make test` runs the suite. Each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Without a GPU, pin the CPU wheel (a bare `torch` may pull a multi-GB CUDA build).
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.6" || echo "torch==2.13.0")
HOST ?= 127.0.0.1
PORT ?= 8000
DEMO_DIR ?= $(HOME)/.cache/pagechat/tiny-qwen3

.PHONY: run demo test test-avx2 test-avx2-cpu lint bench clean install gpu-wheels gpu-check bench-peers-install bench-peers

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	PAGECHAT_MODEL=$${PAGECHAT_MODEL:-Qwen/Qwen3-4B-Instruct-2507} \
	  $(PY) -m app --host $(HOST) --port $(PORT)

demo: $(VENV)/.installed
	test -f $(DEMO_DIR)/model.safetensors || $(PY) -m engine.tiny $(DEMO_DIR) --shape tiny
	PAGECHAT_MODEL=$(DEMO_DIR) PAGECHAT_DEMO=1 $(PY) -m app --host $(HOST) --port $(PORT)

# Two parts: the suite on TEST_WORKERS pytest-xdist workers (a file's tests stay on one worker;
# about 0.7x the time of one process on 2 cores, whose CPU a single process leaves half idle
# while servers start and browsers wait), then the `timing` tests, which compare latencies they
# measure, alone on the machine. TEST_WORKERS=0 runs the first part in one process.
TEST_WORKERS ?= 2
test: lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow and not timing"
	$(PY) -m pytest -q -m "timing and not slow"

# The suite as an AVX2-only x86 CPU runs it, on an AVX512 one: torch dispatching AVX2 code,
# oneDNN limited to AVX2 (no native bf16: it refuses bf16 inner products, as there), the
# engine's kernels built for x86-64-v3. Not part of `make test` (it takes as long again).
test-avx2:
	ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 PAGECHAT_KERNEL_MARCH=x86-64-v3 \
	  $(MAKE) test

# The CPU-dependent tests on an emulated AVX2-only CPU (.ci/avx2-cpu: QEMU user mode, AMD EPYC
# Rome; torch, oneDNN and the kernels see no AVX-512 at all). About 18 minutes on 2 cores;
# `make test` runs its linear-layer part (tests/test_avx2_cpu.py).
test-avx2-cpu: $(VENV)/.installed
	VENV=$(VENV) .ci/avx2-cpu

# ruff, then mypy over engine/, app/ and bench/ (settings in pyproject.toml).
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: $(VENV)/.installed
	$(PY) -m bench.throughput
	$(PY) -m bench.multi_turn
	$(PY) -m bench.long_doc

# GPU check (bench/gpu_check.py). On a machine with network: `make gpu-wheels` fetches the
# packages the offline GPU machine lacks into .whl/ (git-ignored; carry it there). On the GPU
# machine, with its own python3 (no venv): `make gpu-check GPU_CHECK_OUT=DIR`, 8 minutes on an H100.
GPU_WHEELS ?= .whl
GPU_CHECK_OUT ?= gpu-check-out
gpu-wheels: $(VENV)/.installed
	$(PY) -m bench.gpu_check --download-wheels $(GPU_WHEELS)

gpu-check:
	PAGECHAT_COMMIT=$${PAGECHAT_COMMIT:-$$(git rev-parse --short HEAD 2>/dev/null || echo unknown)} \
	  $(PYTHON) -m bench.gpu_check --wheels $(GPU_WHEELS) --out $(GPU_CHECK_OUT)

# Peers side by side on this CPU (bench/peers.py), not part of `make test`: vLLM's CPU build and
# llama-cpp-python go into their own venvs under ~/.cache/pagechat/peer-venvs (~3.4 GB; the
# llama.cpp build takes ~10 min on 2 cores), then the checkpoint is converted to GGUF.
bench-peers-install: $(VENV)/.installed
	$(PY) -m bench.peers install vllm llama
	$(PY) -m bench.peers gguf

bench-peers: $(VENV)/.installed
	$(PY) -m bench.peers run

clean:
	rm -rf $(VENV) .pytest_cache
