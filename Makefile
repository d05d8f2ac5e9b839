# Two commands do all set-up on a fresh machine:
#   make demo   create .venv, install, run the whole DAG at the `tiny` scale, print where the results are
#   make test   create .venv, install, run the test suite (unit tests + one small end-to-end DAG run)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= 2
SCALE ?= $(shell grep -E '^scale:' params.yaml | awk '{print $$2}')
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: demo test venv dvc-yaml lint bench clean

venv: $(VENV)/.installed

# torch first, from the local CPU wheel (a plain resolve would pull a multi-GB CUDA build).
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

demo: venv
	@start=$$(date +%s); \
	snakemake -c$(CORES) --config scale=$(SCALE) && \
	echo "" && echo "Pipeline finished in $$(( $$(date +%s) - start )) s at scale '$(SCALE)'." && \
	$(BIN)/python -m tools.where --scale $(SCALE)

test: venv
	$(BIN)/python -m pytest -q

dvc-yaml: venv
	$(BIN)/python -m tools.gen_dvc

lint: venv
	snakemake --lint

bench: venv
	$(BIN)/python bench/bench_data.py
	$(BIN)/python bench/bench_train.py

clean:
	rm -rf artifacts checkpoints logs dvclive .snakemake
