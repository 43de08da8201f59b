#!/usr/bin/env bash
# Create or update .venv/ at the project root. Re-installs only when pyproject.toml changed.
# torch/torchvision are pinned to the pair that is on local disk on the project's CPU machines
# (a CUDA build that runs on CPU); override with TORCH_SPEC for other machines.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
STAMP=$VENV/.installed
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
if [[ ! -x $VENV/bin/python ]]; then
    echo "[setup] creating $VENV"
    python3 -m venv "$VENV"
fi
if [[ ! -f $STAMP || pyproject.toml -nt $STAMP ]]; then
    echo "[setup] installing dependencies into $VENV (first run takes a few minutes)"
    "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install -q $TORCH_SPEC 2>&1 | grep -v "^WARNING: Location" || true
    "$VENV/bin/python" -m pip install -q -e ".[dev,web]" 2>&1 | grep -v "^WARNING: Location" || true
    "$VENV/bin/python" -c "import torch, torchvision, deepspeed, transformers, open_clip, lpips, webdataset, unitok, mllm" \
        || { echo "[setup] dependency install failed" >&2; exit 1; }
    touch "$STAMP"
fi
