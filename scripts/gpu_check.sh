#!/usr/bin/env bash
# The GPU check in one command (cvseg_ros/tools/gpu_check.py): on a fresh machine with CUDA,
# install what is missing, then run the CUDA tests, compare CUDA with CPU masks, time the I and P
# rounds, profile a P round and load the node with 8 cameras at 1280x720; one JSON.
#   scripts/gpu_check.sh [--json out/gpu_check.json] [--clip VIDEO] [--dry-run]
# --dry-run: on the CPU, the GPU formulations forced, small and short (the tests run it).
set -euo pipefail
cd "$(dirname "$0")/.."
dry=0
for arg in "$@"; do [ "$arg" = "--dry-run" ] && dry=1; done
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[gpu-check] creating .venv (--system-site-packages: an installed CUDA torch is used)"
  "$PY" -m venv --system-site-packages .venv
fi
VPY=.venv/bin/python
if [ "$dry" = 0 ] && ! "$VPY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  if "$VPY" -c "import torch" 2>/dev/null; then
    echo "[gpu-check] the installed torch sees no GPU: $("$VPY" -c 'import torch; print(torch.__version__, torch.version.cuda)')"
  fi
  echo "[gpu-check] installing a CUDA build of torch from PyPI (unpinned)"
  "$VPY" -m pip --disable-pip-version-check -q install --upgrade torch
fi
bash scripts/setup_venv.sh      # ROS 2 wheels, torch only where none is importable, this package
exec "$VPY" -m cvseg_ros.tools.cli gpu-check "$@"
