#!/usr/bin/env bash
# Stage two, step 1 (unified pretrain) with the deepspeed launcher (mllm/train.py --stage pretrain).
#   NGPU=8 bash launch/mllm_stage1.sh --llama-dir ckpt/Llama-2-7b-hf --tokenizer ckpt/unitok_tokenizer.pth \
#       --data-root /data --run-dir runs/mllm_stage1
# Multi-node: HOSTFILE (lines "ip slots=8"; see hostfile.example, hostfile_from_slurm.sh), NNODES,
# MASTER_ADDR, MASTER_PORT. CPU-only machines: DS_ACCELERATOR=cpu NGPU=2.
set -euo pipefail
exec deepspeed --hostfile "${HOSTFILE:-/job/hostfile}" --num_nodes "${NNODES:--1}" --num_gpus "${NGPU:-8}" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
    --module mllm.train --stage pretrain "$@"
