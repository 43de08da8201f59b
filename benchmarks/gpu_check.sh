#!/usr/bin/env bash
# The prepared GPU check: one table (tokenizer `large` train/encode/decode and memory, a 1B-class MLLM under
# ZeRO-3 with tokens/s and MFU, generation speed, flash-attn vs SDPA logits), at most 8 minutes on one H100/H200.
#   bash benchmarks/gpu_check.sh [--out runs/gpu_check]    on a GPU machine
#   bash benchmarks/gpu_check.sh --cpu                     tiny CPU mode (or GPU_CHECK_MODE=cpu)
# The steps live in benchmarks/gpu_check.py. PYTHON picks the interpreter (default: .venv/bin/python if present).
# A machine without internet and without the project's .venv (the device machines) takes the wheels that
# benchmarks/gpu_wheels.sh wrote into .whl/ on a machine with internet: installed into a private folder first.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [ "$PYTHON" = python3 ] && compgen -G ".whl/*.whl" > /dev/null; then
    site=${TMPDIR:-/tmp}/gpu_check_site
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH"  # (bin: the deepspeed launcher)
fi
exec "$PYTHON" benchmarks/gpu_check.py "$@"
