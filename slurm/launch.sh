#!/usr/bin/env bash
# The one launch helper: starts `python -m blip_train.train` on every GPU of a SLURM job, and turns
# SLURM's preemption warning into "save, exit, requeue". Called by slurm/*.sbatch; see slurm/README.md.
#
#   CONFIG=blip2_stage1_vitg bash slurm/launch.sh [--set key=value ...]    (inside a job, repo root)
#
# Environment (default in brackets):
#   CONFIG           recipe name or YAML path passed to --config (required)
#   MODE             srun      one task per GPU: srun python -m blip_train.train  [default]
#                    per-node  one torchrun per node (c10d rendezvous on MASTER_ADDR:MASTER_PORT)
#                    deepspeed one `deepspeed --no_ssh` launcher per node, from a generated hostfile
#   GPUS_PER_NODE    [8]               NNODES [SLURM_NNODES]
#   PYTHON           [python]          TORCHRUN [torchrun]      DEEPSPEED [deepspeed]
#   MASTER_ADDR      [first host of SLURM_JOB_NODELIST]
#   MASTER_PORT      [10000 + SLURM_JOB_ID % 20000] (blip_train/distributed/env.py derives the same port)
#   HOSTFILE         deepspeed mode [logs/hostfile-$SLURM_JOB_ID], must be on a shared filesystem
#   REQUEUE_ON_TERM  1: also requeue after SIGTERM (scancel, node failure) [0: only after USR1]
set -euo pipefail

: "${CONFIG:?set CONFIG to a recipe name or a YAML path}"
: "${SLURM_JOB_ID:?not inside a SLURM job: submit with sbatch slurm/<stage>.sbatch}"
: "${SLURM_JOB_NODELIST:?SLURM_JOB_NODELIST is not set}"
MODE=${MODE:-srun}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-${SLURM_NNODES:-1}}
PYTHON=${PYTHON:-python}
TORCHRUN=${TORCHRUN:-torchrun}
DEEPSPEED=${DEEPSPEED:-deepspeed}
CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}

# ---------------------------------------------------------------- NCCL and threads: the one place for them
# Turn a hung collective (a dead rank) into an error after the process-group timeout instead of a
# silent hang; the two names cover torch before and after 2.2.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}   # INFO prints the chosen transports when debugging a slow job
# Cluster-specific; NCCL's autodetection is usually right. Uncomment and adapt when it is not:
# export NCCL_SOCKET_IFNAME=ib0          # interface for bootstrap/socket traffic (or ^lo,docker0)
# export NCCL_IB_HCA=mlx5                # InfiniBand adapters to use
# export NCCL_IB_GID_INDEX=3             # RoCE clusters
# export NCCL_IB_TIMEOUT=22              # longer IB retry timeout on congested fabrics
# export NCCL_IB_DISABLE=1               # no InfiniBand: sockets only
# One intra-op thread per rank (torchrun's default): decoding happens in DataLoader workers.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# ---------------------------------------------------------------- rendezvous
mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
if ((${#HOSTS[@]} < NNODES)); then
    echo "launch.sh: NNODES=$NNODES but the job has ${#HOSTS[@]} node(s): ${HOSTS[*]}" >&2
    exit 2
fi
# Rank 0 runs on the first node and hosts the rendezvous store.
MASTER_ADDR=${MASTER_ADDR:-${HOSTS[0]}}
MASTER_PORT=${MASTER_PORT:-$((10000 + SLURM_JOB_ID % 20000))}
export MASTER_ADDR MASTER_PORT

TRAIN_ARGS=(--config "$CONFIG" "$@")
# Launchers (torchrun, deepspeed) must survive the USR1 that the step's workers turn into "save and
# stop": SLURM signals every process of the step, and their default USR1 action is to die. An ignored
# signal stays ignored across exec; the trainer installs its own handler.
# shellcheck disable=SC2016  # "$@" belongs to the inner bash
IGNORE_USR1=(bash -c 'trap "" USR1; exec "$@"' ignore-usr1)

case "$MODE" in
srun)
    CMD=(srun --kill-on-bad-exit=1 --nodes="$NNODES" --ntasks=$((NNODES * GPUS_PER_NODE))
         --ntasks-per-node="$GPUS_PER_NODE" --cpus-per-task="$CPUS_PER_TASK"
         "$PYTHON" -m blip_train.train "${TRAIN_ARGS[@]}")
    ;;
per-node)
    CMD=(srun --kill-on-bad-exit=1 --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1
         --cpus-per-task=$((CPUS_PER_TASK * GPUS_PER_NODE))
         "${IGNORE_USR1[@]}"
         "$TORCHRUN" --nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE" --rdzv_backend c10d
         --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$SLURM_JOB_ID" --rdzv_conf is_host=0
         -m blip_train.train "${TRAIN_ARGS[@]}")
    ;;
deepspeed)
    HOSTFILE=${HOSTFILE:-logs/hostfile-$SLURM_JOB_ID}
    mkdir -p "$(dirname "$HOSTFILE")"
    for host in "${HOSTS[@]:0:NNODES}"; do
        echo "$host slots=$GPUS_PER_NODE"
    done >"$HOSTFILE"
    # --no_ssh: each node's launcher runs inside this SLURM step (so signals and --kill-on-bad-exit
    # reach it) instead of pdsh over ssh; its node rank is SLURM_NODEID, read on that node.
    # --no_local_rank: our entry point takes its rank from the environment, not from --local_rank.
    # shellcheck disable=SC2016  # $SLURM_NODEID must expand on each node, not here
    CMD=(srun --kill-on-bad-exit=1 --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1
         --cpus-per-task=$((CPUS_PER_TASK * GPUS_PER_NODE))
         bash -c 'trap "" USR1; exec "$1" --node_rank="$SLURM_NODEID" "${@:2}"' ignore-usr1
         "$DEEPSPEED" --hostfile "$HOSTFILE" --no_ssh --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
         --no_local_rank --module blip_train.train "${TRAIN_ARGS[@]}")
    ;;
*)
    echo "launch.sh: MODE must be srun, per-node or deepspeed, not '$MODE'" >&2
    exit 2
    ;;
esac

# ---------------------------------------------------------------- preemption
# SLURM sends USR1 to this shell (#SBATCH --signal=B:USR1@180). Forward it to srun, which relays it
# to every process of the job step; the trainer saves at the next step boundary and exits; then we
# requeue, and the requeued job resumes from run.output_dir.
CAUGHT=""
# shellcheck disable=SC2329  # invoked by the traps below
forward_signal() {
    [[ -n $CAUGHT ]] || CAUGHT=$1
    echo "launch.sh: caught SIG$1, forwarding it to the job step (srun pid $STEP_PID)" >&2
    kill -s "$1" "$STEP_PID" 2>/dev/null || true
}
trap 'forward_signal USR1' USR1
trap 'forward_signal TERM' TERM

# ---------------------------------------------------------------- per-node: the rendezvous store
# Every torchrun agent joins as a client of a store this shell hosts for the whole step: an agent-hosted
# store leaves with the first agent to finish and the others log tracebacks while closing the rendezvous
# (see blip_train/distributed/rendezvous_store.py). This shell runs on the first node, MASTER_ADDR.
STORE_PID=""
if [[ $MODE == per-node ]]; then
    STORE_READY=$(mktemp -u "${TMPDIR:-/tmp}/blip-rdzv-$SLURM_JOB_ID.XXXXXX")
    "$PYTHON" -m blip_train.distributed.rendezvous_store "$MASTER_PORT" "$STORE_READY" &
    STORE_PID=$!
    trap 'kill -9 "$STORE_PID" 2>/dev/null || true; rm -f "$STORE_READY"' EXIT
    for _ in $(seq 600); do
        [[ -e $STORE_READY ]] && break
        if ! kill -0 "$STORE_PID" 2>/dev/null; then
            echo "launch.sh: the rendezvous store did not start on $MASTER_ADDR:$MASTER_PORT (see above)" >&2
            exit 2
        fi
        sleep 0.1
    done
    [[ -e $STORE_READY ]] || { echo "launch.sh: the rendezvous store took over 60 s to start" >&2; exit 2; }
fi

# SLURM_RESTART_COUNT tells the attempts of a requeued job apart in its appended log.
echo "launch.sh: MODE=$MODE NNODES=$NNODES GPUS_PER_NODE=$GPUS_PER_NODE MASTER=$MASTER_ADDR:$MASTER_PORT" \
     "RESTART=${SLURM_RESTART_COUNT:-0}" >&2
echo "launch.sh: $(printf '%q ' "${CMD[@]}")" >&2
# In the background: bash runs traps only between commands, and `wait` is interruptible.
"${CMD[@]}" &
STEP_PID=$!
# A trapped signal makes `wait` return early; keep waiting until the step has really exited.
while kill -0 "$STEP_PID" 2>/dev/null; do
    wait "$STEP_PID" || true
done
STATUS=0
wait "$STEP_PID" || STATUS=$?

if [[ $CAUGHT == USR1 || ($CAUGHT == TERM && ${REQUEUE_ON_TERM:-0} == 1) ]]; then
    echo "launch.sh: job step exited with status $STATUS after SIG$CAUGHT; requeueing job $SLURM_JOB_ID" >&2
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$STATUS"
