#!/usr/bin/env bash
# Tokenizer ablation grid (experiments/ablate.py): each cell is trained through the deepspeed launcher.
#   NGPU=8 bash launch/ablate.sh --grid paper --base-preset large --data.shards '/data/{00000000..00140146}.tar' \
#       --eval-images /data/imagenet/val --zeroshot-dir /data/imagenet/val --classnames imagenet \
#       --inception-weights external/weights-inception-2015-12-05-6726825d.pth \
#       --loss.lpips-weights external/lpips_with_vgg.pth --gan.dino-weights external/dinov2_vits14_pretrain.pth
# CPU (no launcher): LAUNCHER=none bash launch/ablate.sh --grid cpu --jobs 2 --out-dir runs/ablate
# Multi-node: LAUNCHER_ARGS="--hostfile /job/hostfile --num_nodes 2".
set -euo pipefail
exec "${PYTHON:-python}" -m experiments.ablate --launcher "${LAUNCHER:-deepspeed}" --ngpu "${NGPU:-8}" \
    --launcher-args="${LAUNCHER_ARGS:-}" "$@"
