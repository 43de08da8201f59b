# Sourced by launch/*.sh: run the `deepspeed` launcher with the cluster layout taken from the environment.
#   NGPU         processes per node (default 8)
#   HOSTFILE     lines "host slots=N" (default /job/hostfile; a missing file means this node only)
#   NNODES       nodes of the hostfile to use (default -1: all)
#   MASTER_ADDR  address of node 0 (default 127.0.0.1); MASTER_PORT its port (default: the script's)
#   NODE_RANK    set it to start one launcher per node without ssh (DeepSpeed's --no_ssh): run the same
#                command on every node with the same HOSTFILE, NODE_RANK=0..N-1 and node 0's MASTER_ADDR.
#                Unset: the launcher on node 0 starts the other nodes over ssh/pdsh.
# CPU-only machines: DS_ACCELERATOR=cpu. SLURM: launch/slurm.sbatch runs any launch/*.sh this way.
# Failures: a rank that dies (kill -9, OOM, a crash) makes the others fail in their next collective and
# every launcher exits, so the whole job stops. A node that drops off the network without closing its
# connections is noticed after the trainers' --dist-timeout-min (default 30); extraction and packing
# wait up to --barrier-timeout-min (default 24 h) at their final barrier, where ranks may end hours apart.
ds_launch() {
    local port=$1
    shift
    local args=(--hostfile "${HOSTFILE:-/job/hostfile}" --num_nodes "${NNODES:--1}" --num_gpus "${NGPU:-8}"
                --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-$port}")
    if [[ -n "${NODE_RANK:-}" ]]; then
        args+=(--no_ssh --node_rank "$NODE_RANK")
    fi
    exec deepspeed "${args[@]}" "$@"
}
