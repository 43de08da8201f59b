#!/usr/bin/env bash
# Create or update .venv/ at the project root. Re-installs when pyproject.toml's content, the torch pair or the
# venv's Python changed; the stamp is written only after every pip step succeeded and the floors check out
# (a failed or interrupted install is redone by the next run).
# torch/torchvision are pinned to the pair that is on local disk on the project's CPU machines
# (a CUDA build that runs on CPU); override with TORCH_SPEC for other machines (remembered by the venv).
# The venv's Python: $PYTHON if set, else the first of python3, python3.13, python3.12, python3.11 that is
# as new as pyproject.toml's requires-python (Ubuntu 22.04's python3 is 3.10, too old for transformers 5.24).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
STAMP=$VENV/.installed
DEFAULT_TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"
MIN_PY=$(sed -n 's/^requires-python = ">=\([0-9]*\.[0-9]*\)".*/\1/p' pyproject.toml)
[[ -n $MIN_PY ]] || { echo "[setup] no requires-python = \">=X.Y\" in pyproject.toml" >&2; exit 1; }
trap 'echo "[setup] interrupted: run again to finish" >&2; exit 130' INT TERM

new_enough() {  # $1: a Python interpreter -> whether it is at least $MIN_PY
    local v
    v=$("$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || return 1
    [[ $(printf '%s\n%s\n' "$MIN_PY" "$v" | sort -V | head -1) == "$MIN_PY" ]]
}

# One set-up at a time per checkout (`make test` and `make demo` started together, `make -j`).
if command -v flock >/dev/null 2>&1; then
    exec 9>".venv.lock"        # beside .venv (which may be removed below)
    flock 9
fi

# A .venv that cannot run pip cannot be repaired in place: an interrupted `python -m venv`, Debian/Ubuntu without
# python3.X-venv (venv leaves bin/python and no pip), an interpreter removed or swapped for another minor version
# by a system upgrade (its lib/pythonX.Y/site-packages is then not the one the venv has).
if [[ -e $VENV || -L $VENV ]] && ! "$VENV/bin/python" -c 'import pip' >/dev/null 2>&1; then
    echo "[setup] $VENV is incomplete or its Python is gone or changed: recreating it"
    rm -rf "$VENV"
fi
if [[ ! -e $VENV ]]; then
    py=""
    if [[ -n ${PYTHON:-} ]]; then candidates=("$PYTHON"); else candidates=(python3 python3.13 python3.12 python3.11); fi
    for c in "${candidates[@]}"; do
        if command -v "$c" >/dev/null 2>&1 && new_enough "$c"; then py=$c; break; fi
    done
    if [[ -z $py ]]; then
        echo "[setup] the project needs Python >= $MIN_PY (pyproject.toml; transformers 5.24 requires 3.11);" \
             "missing or older: ${candidates[*]}. Install Python $MIN_PY or" \
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

# The torch pair: $TORCH_SPEC when set (remembered), else the one this venv was set up with, else the default.
if [[ -n ${TORCH_SPEC:-} ]]; then torch_src=env
elif [[ -f $VENV/torch_spec ]]; then TORCH_SPEC=$(<"$VENV/torch_spec"); torch_src=kept
else TORCH_SPEC=$DEFAULT_TORCH_SPEC; torch_src=default; fi
[[ $torch_src == default ]] && torch_key="default:$TORCH_SPEC" || torch_key="chosen:$TORCH_SPEC"
want="pyproject $(cksum < pyproject.toml) | torch $torch_key | python $("$VENV/bin/python" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3], sys.base_prefix)')"

if [[ ! -f $STAMP || $(<"$STAMP") != "$want" ]]; then
    rm -f "$STAMP"
    echo "[setup] installing dependencies into $VENV (first run takes a few minutes)"
    pip_q() {  # pip's own exit status survives the filter (pipefail); grep finding nothing is not a failure
        "$VENV/bin/python" -m pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
    }
    fail() { echo "[setup] $1 failed: $VENV is not up to date; fix the cause above and run again" >&2; exit 1; }
    pip_q --upgrade pip || fail "upgrading pip"
    # shellcheck disable=SC2086
    pip_q $TORCH_SPEC || fail "installing TORCH_SPEC ($TORCH_SPEC)"
    pip_q -e ".[dev,web]" || fail "pip install -e .[dev,web]"
    # Outside the checkout, so unitok/mllm/runtime must come from the editable install; every floor of pyproject.toml.
    (cd / && "$OLDPWD/$VENV/bin/python" -c "from runtime.requirements import declared, require; require(*declared())
import torch, torchvision, deepspeed, transformers, open_clip, lpips, webdataset, unitok, mllm") \
        || fail "the dependency check"
    [[ $torch_src == default ]] && rm -f "$VENV/torch_spec" || printf '%s\n' "$TORCH_SPEC" > "$VENV/torch_spec"
    printf '%s\n' "$want" > "$STAMP"
fi
