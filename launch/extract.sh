#!/usr/bin/env bash
# Pre-tokenise image shards into code shards on every GPU of every node (unitok/extract.py).
#   NGPU=8 bash launch/extract.sh --tokenizer ckpt/unitok --input 'raw/{00000..00999}.tar' --output codes/
# Multi-node (ssh, or one launcher per node with NODE_RANK) and CPU: see launch/deepspeed_env.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/deepspeed_env.sh"
ds_launch 29501 --module unitok.extract "$@"
