#!/usr/bin/env bash
# Stage one: train the UniTok tokenizer (unitok/train.py) with the deepspeed launcher.
#   NGPU=8 bash launch/tokenizer.sh --preset large --data.shards '/data/{00000000..00140146}.tar' \
#       --loss.lpips-weights external/vgg16.pth --gan.dino-weights external/dinov2_vits14_pretrain.pth
# Multi-node: HOSTFILE (lines "ip slots=8"; missing file = this node only), NNODES, MASTER_ADDR,
# MASTER_PORT. CPU-only machines: DS_ACCELERATOR=cpu NGPU=2.
set -euo pipefail
exec deepspeed --hostfile "${HOSTFILE:-/job/hostfile}" --num_nodes "${NNODES:--1}" --num_gpus "${NGPU:-8}" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
    --module unitok.train "$@"
