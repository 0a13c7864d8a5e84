#!/usr/bin/env bash
# Create or reuse .venv (with system site packages, so a sourced ROS 2 distro wins) and
# install only what is missing: ROS 2 wheels when rclpy is not importable, a CPU torch when no
# torch is importable (a vehicle keeps its CUDA build), then this package in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv (--system-site-packages)"
  "$PY" -m venv --system-site-packages .venv
fi
VPY=.venv/bin/python

pip_install() {
  # pip's notes about this machine's local wheel folders are noise; keep its exit status
  "$VPY" -m pip --disable-pip-version-check -q install "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }
  return "${PIPESTATUS[0]}"
}

if ! "$VPY" -c "import rclpy" 2>/dev/null; then
  echo "[setup] rclpy not importable: installing the ROS 2 Kilted wheels from PyPI"
  pip_install ros-rclpy ros-rmw-fastrtps-cpp ros-sensor-msgs ros-std-msgs ros-diagnostic-msgs
fi
if ! "$VPY" -c "import torch" 2>/dev/null; then
  echo "[setup] torch not importable: installing the CPU build torch==2.13.0"
  pip_install torch==2.13.0
fi
stamp=.venv/.cvseg_installed
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ] || [ package.xml -nt "$stamp" ]; then
  echo "[setup] installing cvseg_ros (editable) and its Python dependencies"
  pip_install -e ".[test]"
  touch "$stamp"
fi
