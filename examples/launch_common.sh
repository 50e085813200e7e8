# Shared by examples/run_*.sh (sourced, not run): resolve the cluster layout, check the inputs,
# print or run the torchrun command. A run script sets RECIPE_CONFIG (its default recipe) and
# WEIGHTS_VAR (the name of the variable holding the teacher's path), then calls `launch "$@"`.
#
# Arguments: [--dry-run] [key.sub=value ...]   (overrides passed on to `phased-dmd train`)
#
# Variables (defaults in brackets):
#   $WEIGHTS_VAR     the teacher: a Hugging Face folder or a converted checkpoint (required)
#   PROMPT_CACHE     the prompt-embedding cache written by `phased-dmd encode-prompts` (required)
#   CONFIG           the recipe [the script's own]
#   OUTPUT           run folder: metrics, TensorBoard, checkpoints/ [runs/<recipe name>]
#   NNODES           nodes [SLURM_NNODES, else 1]
#   NODE_RANK        this node's rank [SLURM_NODEID, else 0]
#   GPUS_PER_NODE    [SLURM_GPUS_ON_NODE, else the GPUs nvidia-smi lists]
#   MASTER_ADDR      rank 0's host [first host of SLURM_JOB_NODELIST, else 127.0.0.1 on one node]
#   MASTER_PORT      [29500]
#   PYTHON           [python3]
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT
#                    seconds torchrun gives its workers between passing SIGTERM on to them and
#                    SIGKILL [300]: room for the sub-update under way and the checkpoint save
#   DRY_RUN=1        same as --dry-run: print the resolved config, the memory estimate and the
#                    command, and launch nothing
#
# Exported for the training processes: CUDA_DEVICE_MAX_CONNECTIONS=1, which megatron's
# tensor-/sequence-parallel layers rely on to overlap their communication with compute; and
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT, read by torchrun itself.
#
# Without CUDA (no GPU, or CUDA_VISIBLE_DEVICES="") the ranks run on CPU over gloo: give
# GPUS_PER_NODE as the number of processes per node (there is no nvidia-smi to count them).

launch_fail() {
    echo "$(basename "$0"): error: $*" >&2
    exit 2
}

launch_note() {
    echo "$(basename "$0"): $*" >&2
}

# The first host of a SLURM node list ("gpu[01-04]" -> gpu01).
slurm_first_host() {
    if command -v scontrol >/dev/null 2>&1; then
        scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1
    elif [[ "$SLURM_JOB_NODELIST" != *[\[,]* ]]; then
        echo "$SLURM_JOB_NODELIST"
    fi
}

count_gpus() {
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L | grep -c '^GPU'
    fi
}

require_positive_int() {  # name value
    [[ "$2" =~ ^[0-9]+$ && "$2" -ge 1 ]] || launch_fail "$1 must be a positive integer, got '$2'"
}

resolve_cluster() {
    NNODES=${NNODES:-${SLURM_NNODES:-1}}
    NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
    GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-$(count_gpus)}}
    MASTER_PORT=${MASTER_PORT:-29500}
    [[ -n "$GPUS_PER_NODE" ]] || launch_fail "GPUS_PER_NODE is not set and neither SLURM_GPUS_ON_NODE nor nvidia-smi tells it"
    require_positive_int NNODES "$NNODES"
    require_positive_int GPUS_PER_NODE "$GPUS_PER_NODE"
    [[ "$NODE_RANK" =~ ^[0-9]+$ && "$NODE_RANK" -lt "$NNODES" ]] \
        || launch_fail "NODE_RANK must be in 0..$((NNODES - 1)) for NNODES=$NNODES, got '$NODE_RANK'"
    if [[ -z "${MASTER_ADDR:-}" ]]; then
        if [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then
            MASTER_ADDR=$(slurm_first_host)
            [[ -n "$MASTER_ADDR" ]] || launch_fail "cannot tell the first host of SLURM_JOB_NODELIST='$SLURM_JOB_NODELIST' without scontrol: set MASTER_ADDR"
        elif [[ "$NNODES" -eq 1 ]]; then
            MASTER_ADDR=127.0.0.1
        else
            launch_fail "MASTER_ADDR must be set for a launch on $NNODES nodes (the host of node rank 0)"
        fi
    fi
}

check_inputs() {
    [[ -f "$CONFIG" ]] || launch_fail "CONFIG=$CONFIG: no such file"
    local weights=${!WEIGHTS_VAR:-}
    [[ -n "$weights" ]] || launch_fail "$WEIGHTS_VAR is not set: the teacher's Hugging Face folder or converted checkpoint"
    [[ -d "$weights" ]] || launch_fail "$WEIGHTS_VAR=$weights: no such directory (the teacher's Hugging Face folder or converted checkpoint)"
    [[ -n "${PROMPT_CACHE:-}" ]] || launch_fail "PROMPT_CACHE is not set: the prompt-embedding cache written by 'phased-dmd encode-prompts'"
    [[ -d "$PROMPT_CACHE" ]] || launch_fail "PROMPT_CACHE=$PROMPT_CACHE: no such directory"
    [[ -f "$PROMPT_CACHE/prompts.json" ]] || launch_fail "PROMPT_CACHE=$PROMPT_CACHE is not a prompt cache: prompts.json is missing (write one with 'phased-dmd encode-prompts')"
}

# Tensor parallel x Ulysses ranks hold one model replica: they must fit the GPUs, a whole number of times.
check_parallel_fit() {  # tensor_parallel ulysses_parallel
    local tp=$1 ulysses=$2 world=$((NNODES * GPUS_PER_NODE))
    local replica=$((tp * ulysses))
    if (( replica > world )); then
        launch_fail "parallel.tensor_parallel=$tp x parallel.ulysses_parallel=$ulysses = $replica GPUs per model replica, but the launch has $world ($NNODES node(s) x $GPUS_PER_NODE GPUs)"
    fi
    if (( world % replica != 0 )); then
        launch_fail "parallel.tensor_parallel=$tp x parallel.ulysses_parallel=$ulysses = $replica does not divide the $world GPUs ($NNODES node(s) x $GPUS_PER_NODE GPUs)"
    fi
    if (( replica > GPUS_PER_NODE || GPUS_PER_NODE % replica != 0 )); then
        launch_note "warning: a model replica of $replica GPUs does not fit evenly in a node of $GPUS_PER_NODE GPUs: part of its tensor-parallel and Ulysses traffic crosses nodes"
    fi
}

# One hardware work queue from the host to each GPU: kernels of all streams start in the order
# they are issued, so that megatron's layers can issue a collective first and overlap it with
# the compute issued after it (megatron-LM sets the same for TP/SP runs). Another value only
# loses that overlap, so a value left in the environment is replaced, with a note.
#
# On SIGTERM (preemption, a time limit) torchrun passes the signal on to every worker, waits
# for them, and SIGKILLs the ones still running after its shutdown timeout. torch 2.13 reads
# that timeout from `--shutdown-timeout`, else from TORCH_ELASTIC_SHUTDOWN_TIMEOUT, else 30 s
# (torch/distributed/launcher/api.py LaunchConfig.__post_init__; the agent's _shutdown ->
# PContext.close(death_sig, timeout) in torch/distributed/elastic/). 30 s is less than a
# sub-update at 720p plus a save of the roles, after which the trainer stops (distill/trainer.py).
# The variable, not the option, so that a torch without the setting ignores it (and keeps its
# 30 s) instead of refusing the option. The cluster's own grace before its SIGKILL (SLURM's
# KillWait, Kubernetes' terminationGracePeriodSeconds) must be as long.
set_launch_environment() {
    if [[ -n "${CUDA_DEVICE_MAX_CONNECTIONS:-}" && "$CUDA_DEVICE_MAX_CONNECTIONS" != 1 ]]; then
        launch_note "CUDA_DEVICE_MAX_CONNECTIONS=$CUDA_DEVICE_MAX_CONNECTIONS replaced by 1 (megatron's overlap needs it)"
    fi
    export CUDA_DEVICE_MAX_CONNECTIONS=1
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}
    require_positive_int TORCH_ELASTIC_SHUTDOWN_TIMEOUT "$TORCH_ELASTIC_SHUTDOWN_TIMEOUT"
}

launch() {
    local dry_run=${DRY_RUN:-0} arg
    local -a user_overrides=()
    for arg in "$@"; do
        case "$arg" in
            --dry-run) dry_run=1 ;;
            -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
            *=*) user_overrides+=("$arg") ;;
            *) launch_fail "unexpected argument '$arg': give --dry-run and key.sub=value overrides" ;;
        esac
    done
    PYTHON=${PYTHON:-python3}
    CONFIG=${CONFIG:-$RECIPE_CONFIG}
    OUTPUT=${OUTPUT:-runs/$(basename "$CONFIG" .yaml)}
    check_inputs
    resolve_cluster

    local -a overrides=(
        "model.teacher_path=${!WEIGHTS_VAR}" "data.prompt_cache=$PROMPT_CACHE"
        "run.output_dir=$OUTPUT" "checkpoint.dir=$OUTPUT/checkpoints" "logging.tensorboard_dir=$OUTPUT/tensorboard"
        ${user_overrides[@]+"${user_overrides[@]}"}
    )
    local resolved sizes
    resolved=$("$PYTHON" -m phased_dmd_mega train --config "$CONFIG" "${overrides[@]}" --dry-run) || exit 2
    sizes=$(printf '%s\n' "$resolved" | "$PYTHON" -c 'import sys, yaml
cfg = yaml.safe_load(sys.stdin)
print(cfg["parallel"]["tensor_parallel"], cfg["parallel"]["ulysses_parallel"], cfg["data"]["batch_size"])') \
        || launch_fail "could not read the parallel sizes from the resolved config"
    local tp ulysses batch
    read -r tp ulysses batch <<< "$sizes"
    check_parallel_fit "$tp" "$ulysses"

    local -a command=(
        "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK"
        --nproc_per_node "$GPUS_PER_NODE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
        -m phased_dmd_mega train --config "$CONFIG" "${overrides[@]}"
    )
    set_launch_environment
    local world=$((NNODES * GPUS_PER_NODE))
    if [[ "$dry_run" == 1 || "$NODE_RANK" == 0 ]]; then
        if [[ "$dry_run" == 1 ]]; then
            echo "# resolved config ($CONFIG with overrides)"
            printf '%s\n' "$resolved"
        fi
        # The estimate needs no GPU: keep it off them (and quiet about megatron's missing GPU extras).
        CUDA_VISIBLE_DEVICES="" PYTHONWARNINGS=ignore \
            "$PYTHON" -m phased_dmd_mega.memory_estimate --config "$CONFIG" "${overrides[@]}" || exit 2
        echo "global batch: data.batch_size $batch x $((world / (tp * ulysses))) data-parallel ranks = $((batch * world / (tp * ulysses)))"
    fi
    if [[ "$dry_run" == 1 ]]; then
        echo "# launch environment"
        echo "export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$TORCH_ELASTIC_SHUTDOWN_TIMEOUT"
        echo "export CUDA_DEVICE_MAX_CONNECTIONS=$CUDA_DEVICE_MAX_CONNECTIONS"
        echo "# launch command (node $NODE_RANK of $NNODES; run the same on every node with its NODE_RANK)"
        printf '%q ' "${command[@]}"
        echo
        return 0
    fi
    mkdir -p "$OUTPUT"
    exec "${command[@]}"
}
