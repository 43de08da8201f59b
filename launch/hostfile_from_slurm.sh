#!/usr/bin/env bash
# Write a deepspeed hostfile for the current SLURM allocation ("host slots=N" per node) and print its path.
#   export HOSTFILE=$(bash launch/hostfile_from_slurm.sh)
#   export MASTER_ADDR=$(head -1 "$HOSTFILE" | cut -d' ' -f1)   (a second line: in one `export`, $HOSTFILE is
#                                                                 expanded before it is set)
# Slots: SLURM_GPUS_ON_NODE, else SLURM_NTASKS_PER_NODE. Uses scontrol when present, else reads the
# compressed node list itself (runtime/slurm.py, standard library only). Optional argument: the file.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" -m runtime.slurm ${1:+--out "$1"}
