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

.PHONY: demo test venv venv-dev dvc-yaml lint bench bench-gpu clean

# Two stamps: the pipeline's dependencies (all `make demo` needs) and the dev extras on top (`make test`, `make bench`:
# pytest, lm-eval, triton, megatron-core, trl, tiktoken; no DAG stage imports them; measured here: ~35 s of ~190 s).
venv: $(VENV)/.installed
venv-dev: $(VENV)/.installed-dev

# torch first, from the local CPU wheel (a plain resolve would pull a multi-GB CUDA build).
$(VENV)/.installed: pyproject.toml constraints.txt
	@# bubblewrap isolates the code sandbox (stages/verifiers/sandbox.py); without it the sandbox says it falls back
	command -v bwrap >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq bubblewrap; } \
	  || echo "bwrap not installed (needs root): the code sandbox will use its fallback layers"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

demo: venv
	@start=$$(date +%s); \
	snakemake -c$(CORES) --config scale=$(SCALE) && \
	echo "" && echo "Pipeline finished in $$(( $$(date +%s) - start )) s at scale '$(SCALE)'." && \
	$(BIN)/python -m tools.where --scale $(SCALE)

test: venv-dev
	$(BIN)/python -m pytest -q

dvc-yaml: venv
	$(BIN)/python -m tools.gen_dvc

lint: venv
	snakemake --lint

bench: venv-dev
	$(BIN)/python bench/bench_data.py
	$(BIN)/python bench/bench_dedup.py
	$(BIN)/python bench/bench_train.py
	$(BIN)/python bench/bench_generate.py
	$(BIN)/python bench/bench_rollout.py
	$(BIN)/python bench/bench_sandbox.py

# On a GPU node with requirements-gpu.txt installed: fused kernels vs eager / torch.compile / liger, and the
# 3b-layer training smoke test of the Megatron and FSDP2 backends (tokens/s, MFU), and RL rollouts on our engine vs
# vLLM with one weight sync.
bench-gpu: venv-dev
	$(BIN)/python bench/bench_kernels.py
	$(BIN)/python bench/gpu_smoke_scaleout.py
	$(BIN)/python bench/gpu_smoke_rl.py

clean:
	rm -rf artifacts checkpoints logs dvclive .snakemake
