# Sourced by launch/*.sh: run the `deepspeed` launcher with the cluster layout taken from the environment.
#   NGPU         processes per node (default: the hostfile's slots, else every GPU of this machine)
#   HOSTFILE     lines "host slots=N" (default /job/hostfile; a missing file means this node only)
#   NNODES       nodes of the hostfile to use (default -1: all)
#   MASTER_ADDR  address of node 0 (default: DeepSpeed's own, 127.0.0.1 on one node and node 0's
#                `hostname -I` over ssh for a hostfile); MASTER_PORT its port (default: the script's)
#   NODE_RANK    set it to start one launcher per node without ssh (DeepSpeed's --no_ssh): run the same
#                command on every node with the same HOSTFILE, NODE_RANK=0..N-1 and node 0's MASTER_ADDR
#                (required). Unset: the launcher on node 0 starts the other nodes over ssh/pdsh. pdsh hands
#                the other nodes one shell string: the arguments are quoted for it here (a '/data/{0..9}.tar'
#                pattern reaches the ranks as written), and this shell's WANDB_*, HF_*, OMP_NUM_THREADS,
#                DS_ACCELERATOR, GLOO_*, TORCH_*, LD_LIBRARY_PATH, ... go into a DS_ENV_FILE (DeepSpeed itself
#                passes on only PYTHON*, NCCL*, UCX*, MV2*, MLFLOW*), unless DS_ENV_FILE is already set.
#   CUDA_VISIBLE_DEVICES  on one node (no hostfile): the GPUs used (the first NGPU of them). DeepSpeed drops
#                it when given --num_gpus and numbers the GPUs 0..N-1, so they are passed as --include.
#   LAUNCHER_ARGS  other options of the deepspeed launcher, split as a shell would (quotes, no expansion), e.g.
#                "--exclude node-b:0,1", "--bind_cores_to_rank", or "--launcher openmpi --launcher_args
#                '-x NCCL_DEBUG=INFO'" (runtime/launcher_args.py). The layout options above come from the
#                environment only (given here they are refused). With a --launcher other than pdsh the arguments
#                are not quoted for a shell and no DS_ENV_FILE is written (DeepSpeed hands mpirun/srun a list:
#                pass variables with their -x/--export), and the job is stopped through them (scancel).
# CPU-only machines: DS_ACCELERATOR=cpu. SLURM: launch/slurm.sbatch runs any launch/*.sh this way.
# Stopping: on one node (and with NODE_RANK) the launcher runs under runtime/guard.py, which holds this script's
# pid: a SIGTERM to it (`kill PID`) reaches every rank, which saves its step and exits (the deepspeed runner
# alone passes no signal on in that mode: its ranks trained on, orphaned); Ctrl-C stops the ranks as before.
# Failures: a rank that dies (kill -9, OOM, a crash) makes the others fail in their next collective and
# every launcher exits, so the whole job stops. A node that drops off the network without closing its
# connections is noticed after the trainers' --dist-timeout-min (default 30); extraction and packing
# wait up to --barrier-timeout-min (default 24 h) at their final barrier, where ranks may end hours apart.
_DS_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

ds_launch() {
    local port=$1
    shift
    local hostfile=${HOSTFILE:-/job/hostfile}
    local args=(--hostfile "$hostfile" --master_port "${MASTER_PORT:-$port}")
    if [[ -n "${NGPU:-}" && ! "$NGPU" =~ ^[1-9][0-9]*$ ]]; then  # 0 started no rank and exited 0
        echo "deepspeed_env.sh: NGPU=$NGPU; give the processes per node as a positive number" >&2
        exit 2
    fi
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
        args+=(--num_nodes "${NNODES:--1}")
        [[ -z "${NGPU:-}" ]] || args+=(--num_gpus "$NGPU")  # unset: the hostfile's slots or the GPU count
    fi
    if ! command -v python3 > /dev/null; then
        echo "deepspeed_env.sh: python3 is not on PATH (activate the environment that has deepspeed)" >&2
        exit 2
    fi
    # LAUNCHER_ARGS split, its --launcher, and the hosts DeepSpeed will use: each NUL-terminated, then "ok"
    local out=() w reserved=0
    [[ -z "${NGPU:-}" && " ${args[*]} " != *" --include "* ]] || reserved=1
    while IFS= read -r -d '' w; do out+=("$w"); done < <(python3 -I "$_DS_ROOT/runtime/launcher_args.py" \
        "${LAUNCHER_ARGS:-}" "$hostfile" "${NNODES:--1}" "$reserved")
    [[ ${#out[@]} -ge 3 && ${out[${#out[@]}-1]} == ok ]] || exit 2  # it said why
    local n=${#out[@]}
    local launcher=${out[n-3]} hosts=${out[n-2]}
    args+=(${out[@]+"${out[@]:0:n-3}"})
    local guard=(python3 -I "$_DS_ROOT/runtime/guard.py")
    if [[ -n "${NODE_RANK:-}" ]]; then
        args+=(--no_ssh --node_rank "$NODE_RANK")
    elif (( hosts > 1 )) && [[ $launcher != pdsh ]]; then
        guard=()  # the runner starts the nodes through mpirun/srun; stop the job with their own means (scancel)
    elif (( hosts > 1 )); then
        _DS_ARGS=("$@")
        _ds_pdsh_setup || exit 2
        set -- "${_DS_QUOTED[@]}"
        guard=()  # the runner stops the nodes itself over pdsh (SIGTERM, then its pkill on every node)
    fi
    exec ${guard[@]+"${guard[@]}"} deepspeed "${args[@]}" "$@"
}

_ds_pdsh_setup() {  # _DS_ARGS -> _DS_QUOTED; DS_ENV_FILE exported
    # pdsh runs `cd CWD; python -m deepspeed.launcher.launch ARGS` through each node's shell, and DeepSpeed
    # quotes only arguments that hold a space ("..."): a bare one was brace-, glob- and $-expanded there
    # ('/data/{00000000..00140146}.tar' became 140147 words and an "Argument list too long").
    if [[ "$PWD" =~ [[:space:]] ]]; then
        echo "deepspeed_env.sh: the working directory '$PWD' holds a space, which DeepSpeed's pdsh command does" \
             "not quote (the nodes would run in \$HOME): start from another folder" >&2
        return 1
    fi
    local a
    _DS_QUOTED=()
    for a in "${_DS_ARGS[@]}"; do
        if [[ $a == *" "* ]]; then  # DeepSpeed wraps it in "..." (escaping "): what expands inside is escaped
            a=${a//\\/\\\\}; a=${a//\$/\\\$}; a=${a//\`/\\\`}
            _DS_QUOTED+=("$a")
        else
            _DS_QUOTED+=("$(printf '%q' "$a")")
        fi
    done
    [[ -z "${DS_ENV_FILE:-}" ]] || return 0  # the user's own file
    local file name v
    file=$(mktemp "${TMPDIR:-/tmp}/deepspeed_env.XXXXXX")
    {   # DeepSpeed reads KEY=VALUE lines into `export KEY=VALUE;` of the pdsh command, a value with other
        # characters than [\w@%+=:,./-] in "...": what expands inside those is escaped
        for name in $(compgen -e); do
            v=${!name}
            if [[ $name =~ ^(WANDB_|HF_|HUGGINGFACE_|TRANSFORMERS_|TOKENIZERS_|GLOO_|TORCH_|OMP_|MKL_|DS_ACCELERATOR$|LD_LIBRARY_PATH$|CUDA_HOME$) && $v != *$'\n'* ]]; then
                v=${v//\\/\\\\}; v=${v//\$/\\\$}; v=${v//\`/\\\`}; v=${v//\"/\\\"}
                printf '%s=%s\n' "$name" "$v"
            fi
        done
        cat ~/.deepspeed_env ./.deepspeed_env 2>/dev/null | grep -vE '^[[:space:]]*$' || true  # DeepSpeed's own
    } > "$file"
    export DS_ENV_FILE=$file
}
