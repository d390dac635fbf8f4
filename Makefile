# rfd — `make help` lists the targets. Everything installs into .venv from the project's own files.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
export WANDB_SILENT := true

.PHONY: help setup data demo test test-fast bench lint format clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*?## "}{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP) ## create .venv and install rfd with its dev tools

data: $(STAMP) ## install the embedded Fashion-MNIST data when missing
	@$(PY) -m rfd.data --check >/dev/null 2>&1 && echo "Fashion-MNIST: found" || { \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "Fashion-MNIST: installing Debian package dataset-fashion-mnist"; \
	    (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null)) || true; \
	  fi; \
	  $(PY) -m rfd.data --check >/dev/null 2>&1 || $(PY) -m rfd.data --download; }

demo: data ## set-up + the main job on the embedded default (CPU)
	$(PY) demo.py

test: data ## set-up + the test suite
	$(PY) -m pytest -q

bench: data ## attack-efficiency benchmark: one process, then one per core (ratios measured in each run)
	$(PY) benchmarks/bench_attacks.py --procs 1
	$(PY) benchmarks/bench_attacks.py --procs auto

lint: $(STAMP) ## ruff lint + format check
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP) ## ruff format + autofix
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean: ## remove runs and caches (keeps .venv)
	rm -rf runs .pytest_cache .ruff_cache .hypothesis
