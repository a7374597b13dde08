# `make train` and `make test` install whatever is missing first (into .venv).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first, only where none is importable: on a GPU machine with torch
# already installed nothing changes; `make install TORCH_SPEC=torch` picks PyPI's default.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed-stamp
ARGS ?=
PYTEST_ARGS ?=

.PHONY: bench bench-speed bench-speed-avx2 gpu-check help install train eval predict export test test-heavy test-full test-slurm lint format clean clean-logs clean-cache demo-data

help:  ## show the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-17s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements.txt
	@touch $(STAMP)

install: $(STAMP)  ## create .venv and install the package with dev extras

train: install  ## train the default experiment (ARGS="experiment=sst2 ...")
	$(PY) -m nlp_transfer.train $(ARGS)

eval: install  ## evaluate a checkpoint: ARGS="ckpt_path=<ckpt> split=test"
	$(PY) -m nlp_transfer.eval $(ARGS)

predict: install  ## predict: ARGS="ckpt_path=<ckpt> input=<file or ->"
	$(PY) -m nlp_transfer.predict $(ARGS)

export: install  ## export for transformers: ARGS="ckpt_path=<ckpt> output_dir=<dir>"
	$(PY) -m nlp_transfer.export $(ARGS)

test: install  ## fast tests (under ~8 minutes on 2 CPU cores)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-heavy: install  ## multi-process and CLI tests of the tiny model (about 5 minutes; CI runs them)
	$(PY) -m pytest -q -m heavy $(PYTEST_ARGS)

test-full: install  ## every test, including slow ones (real MiniLM, real data, DDP)
	$(PY) -m pytest -q -m "not slurm" $(PYTEST_ARGS)

# SLURM_LOCAL_ARGS=--install: apt-get the packages first (CI)
test-slurm: install  ## SLURM tests on a local single-node cluster (scripts/slurm_local.sh; 5-15 min)
	scripts/slurm_local.sh $(SLURM_LOCAL_ARGS) up
	SLURM_CONF=$$(scripts/slurm_local.sh env | sed 's/^export SLURM_CONF=//') \
		$(PY) -m pytest -q -m slurm -s --durations=0 tests/test_slurm.py $(PYTEST_ARGS)

bench: install  ## HF Trainer vs template: CoNLL-2003 full, SST-2, frozen (~20 min on 2 CPU cores)
	$(PY) benchmarks/hf_vs_template.py --task conll2003 --max-train 14041 --omp-wait-policy default \
		--template-variant "data.length_grouping=false optimizer.fused=false" \
		--template-variant defaults --template-variant "optimizer=lazy_adamw"
	$(PY) benchmarks/hf_vs_template.py --task sst2 --max-train 8000 --omp-wait-policy default
	$(PY) benchmarks/hf_vs_template.py --task sst2 --max-train 8000 --lr 1e-3 \
		--omp-wait-policy default --hf-variant bf16_frozen --hf-variant bf16_grouped_frozen \
		--template-variant "strategy=frozen features.cache=true"

bench-speed: install  ## each speed mechanism on/off on this machine (CoNLL-2003 x 3,000, 3 rounds)
	$(PY) benchmarks/speed_mechanisms.py --task conll2003 --max-train 3000 --repeat 3

# oneDNN, ATen and MKL limited to AVX2: a CPU with AVX-512/AMX measured as the AVX2 kind
# (all three are needed: fp32 matmuls are MKL's, which ignores the oneDNN limit)
AVX2_ENV := ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2

bench-speed-avx2: install  ## bench-speed as on a CPU without native bf16 (AVX2 emulated)
	$(AVX2_ENV) $(PY) benchmarks/speed_mechanisms.py --task conll2003 --max-train 3000 --repeat 3 \
		-- --omp-wait-policy=default

gpu-check: install  ## the GPU check (< 8 min on one CUDA GPU); ARGS="--dry-run" on any machine
	bash benchmarks/gpu_check.sh $(ARGS)

lint: install  ## ruff lint + format check
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts

format: install  ## ruff fix + format
	$(VENV)/bin/ruff check --fix src tests benchmarks scripts
	$(VENV)/bin/ruff format src tests benchmarks scripts

demo-data: install  ## regenerate the bundled demo datasets (data/demo)
	$(PY) scripts/make_demo_data.py

clean:  ## remove build and test caches (never runs, logs or checkpoints)
	rm -rf build dist .pytest_cache .ruff_cache src/*.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -print -exec rm -rf {} +

clean-cache:  ## remove tokenization and feature caches (the user cache folder, see README)
	@root="$$($(PY) -c 'from nlp_transfer.utils.resolvers import cache_root; print(cache_root())')"; \
	echo "removing $$root/tokenized and $$root/features"; \
	rm -rf "$$root/tokenized" "$$root/features"
	rm -rf .cache  # where caches were kept before they moved out of the repository

clean-logs:  ## DELETE all runs under logs/ (checkpoints, metrics): asks first
	@read -p "Delete every run under logs/ (checkpoints and metrics)? [y/N] " ans && [ "$$ans" = y ] && rm -rf logs || echo "kept logs/"
