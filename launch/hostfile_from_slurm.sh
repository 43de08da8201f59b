#!/usr/bin/env bash
# Write a deepspeed hostfile for the current SLURM allocation and print its path.
#   export HOSTFILE=$(bash launch/hostfile_from_slurm.sh) MASTER_ADDR=$(scontrol show hostnames | head -1)
set -euo pipefail
out=${1:-${TMPDIR:-/tmp}/hostfile.$SLURM_JOB_ID}
scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=${SLURM_GPUS_ON_NODE:-8}/" > "$out"
echo "$out"
