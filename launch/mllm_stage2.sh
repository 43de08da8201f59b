#!/usr/bin/env bash
# Stage two, step 2 (instruction finetune) from the stage-1 export (mllm/train.py --stage finetune).
#   NGPU=8 bash launch/mllm_stage2.sh --init-from runs/mllm_stage1/export --data-root /data \
#       --run-dir runs/mllm_stage2
# Multi-node: HOSTFILE, NNODES, MASTER_ADDR, MASTER_PORT (as launch/mllm_stage1.sh).
set -euo pipefail
exec deepspeed --hostfile "${HOSTFILE:-/job/hostfile}" --num_nodes "${NNODES:--1}" --num_gpus "${NGPU:-8}" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
    --module mllm.train --stage finetune "$@"
