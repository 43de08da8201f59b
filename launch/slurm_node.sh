#!/usr/bin/env bash
# One node's task of launch/slurm.sbatch (srun runs it once per node): lay out the node from SLURM's
# variables and run the given launch/*.sh, passing SLURM's stop signals on to its whole process tree.
#   srun --ntasks-per-node=1 bash launch/slurm_node.sh launch/mllm_stage1.sh ARGS
# Layout: the same hostfile on every node (launch/hostfile_from_slurm.sh), NODE_RANK from SLURM_NODEID,
# node 0 as MASTER_ADDR, the hostfile's slots as NGPU (launch/deepspeed_env.sh reads them).
#
# Signals. SLURM signals only the task's own process (this script) unless the cluster sets cgroup.conf's
# SignalChildrenProcesses=yes, and once that process exits it kills whatever is left of the task. Run
# directly, the deepspeed launcher died of the SIGTERM, so the ranks were killed mid-save or never heard
# of it. So this script stays up: it runs the launcher in its own process group with SIGTERM and SIGUSR1
# ignored (ignored signals stay ignored across exec: the launcher keeps waiting for its ranks; deepspeed's
# launch.py handles SIGTERM itself, SIGTERM to the ranks then SIGKILL 30 s later), sends each signal it
# receives to that whole group, where the ranks catch it (finish the step, save, exit 128 + signal;
# runtime/run.py StopSignals), and exits with the launcher's status once the launcher is done.
set -euo pipefail
: "${SLURM_NODEID:?run this under srun (SLURM_NODEID is not set)}"
HOSTFILE=$(bash launch/hostfile_from_slurm.sh)
MASTER_ADDR=$(head -1 "$HOSTFILE" | cut -d" " -f1)
NGPU=$(head -1 "$HOSTFILE" | sed "s/.*slots=//")
export HOSTFILE MASTER_ADDR NGPU NODE_RANK=$SLURM_NODEID

group=
forward() { [[ -z "$group" ]] || kill -s "$1" -- "-$group" 2>/dev/null || true; }
trap 'forward TERM' TERM
trap 'forward USR1' USR1
# A background command is no process-group leader here, so setsid runs it in place: $! is its pid and group.
setsid bash -c 'trap "" TERM USR1; exec bash "$@"' bash "$@" &
group=$!
while kill -0 "$group" 2>/dev/null; do
    wait "$group" || true  # returns early (> 128) whenever a trapped signal arrives: wait on
done
wait "$group"  # the launcher's exit status (bash keeps it once the child is reaped)
