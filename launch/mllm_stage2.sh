#!/usr/bin/env bash
# Stage two, step 2 (instruction finetune) from the stage-1 export (mllm/train.py --stage finetune).
#   NGPU=8 bash launch/mllm_stage2.sh --init-from runs/mllm_stage1/export --data-root /data \
#       --run-dir runs/mllm_stage2
# Multi-node (ssh, or one launcher per node with NODE_RANK) and CPU: see launch/deepspeed_env.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/deepspeed_env.sh"
ds_launch 29500 --module mllm.train --stage finetune "$@"
