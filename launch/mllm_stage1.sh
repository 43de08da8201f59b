#!/usr/bin/env bash
# Stage two, step 1 (unified pretrain) with the deepspeed launcher (mllm/train.py --stage pretrain).
#   NGPU=8 bash launch/mllm_stage1.sh --llama-dir ckpt/Llama-2-7b-hf --tokenizer ckpt/unitok_tokenizer.pth \
#       --data-root /data --run-dir runs/mllm_stage1
# Multi-node (ssh, or one launcher per node with NODE_RANK) and CPU: see launch/deepspeed_env.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/deepspeed_env.sh"
ds_launch 29500 --module mllm.train --stage pretrain "$@"
