#!/usr/bin/env bash
# Stage one: train the UniTok tokenizer (unitok/train.py) with the deepspeed launcher.
#   NGPU=8 bash launch/tokenizer.sh --preset large --data.shards '/data/{00000000..00140146}.tar' \
#       --loss.lpips-weights external/vgg16.pth --gan.dino-weights external/dinov2_vits14_pretrain.pth
# Multi-node (ssh, or one launcher per node with NODE_RANK) and CPU: see launch/deepspeed_env.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/deepspeed_env.sh"
ds_launch 29500 --module unitok.train "$@"
