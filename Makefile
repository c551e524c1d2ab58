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

.PHONY: run demo test lint bench clean install

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

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

bench: $(VENV)/.installed
	$(PY) -m bench.throughput
	$(PY) -m bench.multi_turn
	$(PY) -m bench.long_doc

clean:
	rm -rf $(VENV) .pytest_cache
