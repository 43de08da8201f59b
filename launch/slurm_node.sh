#!/usr/bin/env bash
# One node's task of launch/slurm.sbatch (srun runs it once per node): lay out the node from SLURM's
# variables and run the given launch/*.sh, passing SLURM's stop signals on to its whole process tree.
#   srun --ntasks-per-node=1 bash launch/slurm_node.sh launch/mllm_stage1.sh ARGS
# Layout: the same hostfile on every node (launch/hostfile_from_slurm.sh), NODE_RANK from SLURM_NODEID,
# node 0 as MASTER_ADDR, the hostfile's slots as NGPU (launch/deepspeed_env.sh reads them).
#
# Signals. SLURM signals only the task's own process (this script) unless the cluster sets cgroup.conf's
# SignalChildrenProcesses=yes, and once that process exits it kills whatever is left of the task. Run as
# the task, the deepspeed launcher died of the SIGTERM, so the ranks were killed mid-save or never heard
# of it. So this script stays up: it runs the launcher in its own process group with SIGTERM and SIGUSR1
# ignored (ignored signals stay ignored across exec: the launcher keeps waiting for its ranks; deepspeed's
# launch.py handles SIGTERM itself, SIGTERM to the ranks then SIGKILL 30 s later), sends each signal it
# receives to that whole group, where the ranks catch it (finish the step, save, exit 128 + signal;
# runtime/run.py StopSignals), and exits with the launcher's status once the launcher is done. A rank
# inherits SIGUSR1 ignored until its training loop starts, so a warning is sent again every 10 s until
# the launcher exits (repeats change nothing once caught). Under proctrack/pgid (SLURM kills by process
# group) a SIGKILL of this script alone would leave the launcher's group running; proctrack/cgroup kills all.
set -euo pipefail
set +o posix  # the last `wait` reads the status bash kept for a reaped child (POSIX mode forgets it)
: "${SLURM_NODEID:?run this under srun (SLURM_NODEID is not set)}"
HOSTFILE=$(bash "$(dirname "${BASH_SOURCE[0]}")/hostfile_from_slurm.sh")
MASTER_ADDR=$(head -1 "$HOSTFILE" | cut -d" " -f1)
NGPU=$(head -1 "$HOSTFILE" | sed "s/.*slots=//")
export HOSTFILE MASTER_ADDR NGPU NODE_RANK=$SLURM_NODEID
# DeepSpeed's launcher sets each rank's CUDA_VISIBLE_DEVICES to the hostfile's slots 0..NGPU-1: where SLURM gave
# this job other GPUs of a shared node (no device cgroup), the ranks would run on another job's GPUs
if [[ "${CUDA_VISIBLE_DEVICES:-}" =~ ^[0-9]+(,[0-9]+)*$ && "$CUDA_VISIBLE_DEVICES" != "$(seq -s, 0 $((NGPU - 1)))" ]]; then
    echo "slurm_node.sh: SLURM gave this job GPUs $CUDA_VISIBLE_DEVICES of $(hostname), and DeepSpeed's launcher" \
         "would use GPUs 0-$((NGPU - 1)): request whole nodes (sbatch --exclusive) or have the cluster constrain" \
         "devices (cgroup.conf ConstrainDevices=yes)" >&2
    exit 2
fi

group=
warned=0
repeater=
forward() { [[ -z "$group" ]] || kill -s "$1" -- "-$group" 2>/dev/null || true; }
repeat_warning() {  # in the background, every 10 s until stopped: ranks still starting had SIGUSR1 ignored
    [[ -z "$group" || -n "$repeater" ]] && return
    (
        trap 'kill "$pause" 2>/dev/null; wait "$pause"; exit 0' TERM
        trap '' USR1  # where SLURM signals every process of the task, the warning must not end the repeats
        while true; do
            sleep 10 &
            pause=$!
            wait "$pause"
            forward USR1
        done
    ) &
    repeater=$!
}
trap 'forward TERM' TERM
trap 'warned=1; forward USR1; repeat_warning' USR1
# A background command is no process-group leader here, so setsid runs it in place: $! is its pid and group.
setsid bash -c 'trap "" TERM USR1; exec bash "$@"' bash "$@" &
group=$!
[[ $warned == 0 ]] || { forward USR1; repeat_warning; }  # a warning before the launcher existed
while kill -0 "$group" 2>/dev/null; do
    wait "$group" || true  # returns early (> 128) whenever a trapped signal arrives: wait on
done
[[ -z "$repeater" ]] || { kill "$repeater" 2>/dev/null; wait "$repeater"; } || true
wait "$group"  # the launcher's exit status (bash keeps it once the child is reaped)
