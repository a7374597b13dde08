#!/usr/bin/env bash
# GPU check of the template on one CUDA GPU, designed to finish in under 8 minutes:
#   bash benchmarks/gpu_check.sh [--data-dir DIR_WITH_conll2003] [--out-dir DIR]
#   bash benchmarks/gpu_check.sh --dry-run        # print and validate the plan (any machine)
# Installs only from the package registries (PyPI): torch if none is importable (PyPI's
# default build, CUDA on Linux), then this package with its dev extras. PYTHON picks the
# interpreter (default: .venv/bin/python if present, else python3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
dry_run=false
for arg in "$@"; do [[ "$arg" == --dry-run ]] && dry_run=true; done
if ! $dry_run; then
  "$PYTHON" -c "import torch" 2>/dev/null || "$PYTHON" -m pip install -q torch
  "$PYTHON" -c "import nlp_transfer, pytest, hydra_plugins.hydra_submitit_launcher" 2>/dev/null \
    || "$PYTHON" -m pip install -q -e ".[dev,sweeps]"
fi
export TOKENIZERS_PARALLELISM=false WANDB_MODE=offline
exec "$PYTHON" benchmarks/gpu_check.py "$@"
