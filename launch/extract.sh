#!/usr/bin/env bash
# Pre-tokenise image shards into code shards on every GPU of every node (unitok/extract.py).
#   NGPU=8 bash launch/extract.sh --tokenizer ckpt/unitok --input 'raw/{00000..00999}.tar' --output codes/
# Multi-node: HOSTFILE (lines "ip slots=8"; missing file = this node only), NNODES, MASTER_ADDR,
# MASTER_PORT. CPU-only machines: DS_ACCELERATOR=cpu.
set -euo pipefail
exec deepspeed --hostfile "${HOSTFILE:-/job/hostfile}" --num_nodes "${NNODES:--1}" --num_gpus "${NGPU:-8}" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29501}" \
    --module unitok.extract "$@"
