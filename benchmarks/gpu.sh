#!/usr/bin/env bash
# GPU benchmark in one go (target: at most 8 minutes on one H100): installs what it needs into a
# fresh virtual environment (a CUDA build of torch from PyPI unless one is importable already),
# then prints the benchmark table of benchmarks/run.py on the GPU.
#   bash benchmarks/gpu.sh [extra args for run.py]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${DODNET_GPU_VENV:-.venv-gpu}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv --system-site-packages "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  "$VENV/bin/pip" install --quiet "torch>=2.4,<3"
fi
"$VENV/bin/pip" install --quiet -e ".[bench]"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 470 "$VENV/bin/python" benchmarks/run.py --device cuda --precision bf16 --repeats 5 "$@"
