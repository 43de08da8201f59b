#!/usr/bin/env bash
# MLLM benchmarks on every GPU of every node (mllm/evaluate): rank r answers questions r, r+W, ...;
# rank 0 gathers, scores and writes OUT/results.json.
#   NGPU=8 bash launch/evaluate.sh --task pope --model runs/mllm_stage2/export --tokenizer ckpt/unitok \
#       --questions pope/coco_pope_random.json --images coco/val2014 --out results/pope
# Multi-node (ssh, or one launcher per node with NODE_RANK) and CPU: see launch/deepspeed_env.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/deepspeed_env.sh"
ds_launch 29502 --module mllm.evaluate "$@"
