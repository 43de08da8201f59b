#!/usr/bin/env bash
# The embedded end-to-end demo (experiments/demo.py): toy data -> tokenizer -> codes -> MLLM stage 1 and 2 ->
# export -> chat -> quality report. CPU-only machines use 2 local ranks on gloo.
#   bash launch/demo.sh --out runs/demo [--quick] [--fresh]
set -euo pipefail
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi
exec python -m experiments.demo "$@"
