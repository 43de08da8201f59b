#!/usr/bin/env bash
# Create or update .venv/ at the project root. Re-installs only when pyproject.toml changed.
# torch/torchvision are pinned to the pair that is on local disk on the project's CPU machines
# (a CUDA build that runs on CPU); override with TORCH_SPEC for other machines.
# The venv's Python: $PYTHON if set, else the first of python3, python3.13, python3.12, python3.11 that is
# as new as pyproject.toml's requires-python (Ubuntu 22.04's python3 is 3.10, too old for transformers 5.24).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
STAMP=$VENV/.installed
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
MIN_PY=$(sed -n 's/^requires-python = ">=\([0-9]*\.[0-9]*\)".*/\1/p' pyproject.toml)
[[ -n $MIN_PY ]] || { echo "[setup] no requires-python = \">=X.Y\" in pyproject.toml" >&2; exit 1; }

new_enough() {  # $1: a Python interpreter -> whether it is at least $MIN_PY
    local v
    v=$("$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || return 1
    [[ $(printf '%s\n%s\n' "$MIN_PY" "$v" | sort -V | head -1) == "$MIN_PY" ]]
}

if [[ ! -x $VENV/bin/python ]]; then
    py=""
    candidates=${PYTHON:-python3 python3.13 python3.12 python3.11}
    for c in $candidates; do
        if command -v "$c" >/dev/null 2>&1 && new_enough "$c"; then py=$c; break; fi
    done
    if [[ -z $py ]]; then
        echo "[setup] the project needs Python >= $MIN_PY (pyproject.toml; transformers 5.24 requires 3.11);" \
             "missing or older: $candidates. Install Python $MIN_PY or" \
             "newer, or set PYTHON=/path/to/python$MIN_PY" >&2
        exit 1
    fi
    echo "[setup] creating $VENV with $py ($("$py" --version 2>&1))"
    "$py" -m venv "$VENV"
elif ! new_enough "$VENV/bin/python"; then
    echo "[setup] $VENV has $("$VENV/bin/python" --version 2>&1) and the project needs Python >= $MIN_PY" \
         "(pyproject.toml): remove $VENV and run again (set PYTHON to choose the interpreter)" >&2
    exit 1
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
