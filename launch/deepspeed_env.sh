# Sourced by launch/*.sh: run the `deepspeed` launcher with the cluster layout taken from the environment.
#   NGPU         processes per node (default 8)
#   HOSTFILE     lines "host slots=N" (default /job/hostfile; a missing file means this node only)
#   NNODES       nodes of the hostfile to use (default -1: all)
#   MASTER_ADDR  address of node 0 (default: DeepSpeed's own, 127.0.0.1 on one node and node 0's
#                `hostname -I` over ssh for a hostfile); MASTER_PORT its port (default: the script's)
#   NODE_RANK    set it to start one launcher per node without ssh (DeepSpeed's --no_ssh): run the same
#                command on every node with the same HOSTFILE, NODE_RANK=0..N-1 and node 0's MASTER_ADDR
#                (required). Unset: the launcher on node 0 starts the other nodes over ssh/pdsh.
#   CUDA_VISIBLE_DEVICES  on one node (no hostfile): the GPUs used (the first NGPU of them). DeepSpeed drops
#                it when given --num_gpus and numbers the GPUs 0..N-1, so they are passed as --include.
# CPU-only machines: DS_ACCELERATOR=cpu. SLURM: launch/slurm.sbatch runs any launch/*.sh this way.
# Failures: a rank that dies (kill -9, OOM, a crash) makes the others fail in their next collective and
# every launcher exits, so the whole job stops. A node that drops off the network without closing its
# connections is noticed after the trainers' --dist-timeout-min (default 30); extraction and packing
# wait up to --barrier-timeout-min (default 24 h) at their final barrier, where ranks may end hours apart.
ds_launch() {
    local port=$1
    shift
    local hostfile=${HOSTFILE:-/job/hostfile}
    local args=(--hostfile "$hostfile" --master_port "${MASTER_PORT:-$port}")
    # A fixed 127.0.0.1 sent every node of a pdsh launch to its own loopback: only an explicit one is passed
    if [[ -n "${MASTER_ADDR:-}" ]]; then
        args+=(--master_addr "$MASTER_ADDR")
    elif [[ -n "${NODE_RANK:-}" ]]; then
        echo "deepspeed_env.sh: NODE_RANK=$NODE_RANK (a launcher per node) needs MASTER_ADDR, node 0's address" >&2
        exit 2
    fi
    if [[ ! -f "$hostfile" && -n "${CUDA_VISIBLE_DEVICES:-}" && -z "${NODE_RANK:-}" ]]; then
        local gpus
        IFS=, read -ra gpus <<< "$CUDA_VISIBLE_DEVICES"
        gpus=("${gpus[@]:0:${NGPU:-${#gpus[@]}}}")
        args+=(--include "localhost:$(IFS=,; echo "${gpus[*]}")")
    else
        args+=(--num_nodes "${NNODES:--1}" --num_gpus "${NGPU:-8}")
    fi
    if [[ -n "${NODE_RANK:-}" ]]; then
        args+=(--no_ssh --node_rank "$NODE_RANK")
    fi
    exec deepspeed "${args[@]}" "$@"
}
