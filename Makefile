# The two commands a new user runs: `make demo` (set up, then the main job) and `make test`.
SHELL := /bin/bash
VENV := .venv
export VLLM_CPU_OMP_THREADS_BIND ?= 0-1
export VLLM_CPU_KVCACHE_SPACE ?= 4
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-all bench clean

# demo sets up only what the demo needs (packages, the served model); test adds the test models and services.
setup:
	@bash scripts/setup.sh test

demo:
	@bash scripts/setup.sh demo
	$(VENV)/bin/kvcat demo

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q

test-all: setup
	$(VENV)/bin/python -m pytest -q -m ''

clean:
	rm -rf $(VENV) build *.egg-info
