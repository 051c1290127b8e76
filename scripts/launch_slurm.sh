#!/usr/bin/env bash
# Several GPU nodes under Slurm: one task per GPU, NCCL; fairseq finds its rank, device and
# the rendezvous host from Slurm's variables.
#
#   sbatch --nodes 2 --ntasks-per-node 8 --gpus-per-node 8 --cpus-per-task 10 \
#       scripts/launch_slurm.sh train DATA_BIN --user-dir moe_plugin --arch switch_lm ... \
#       --moe-expert-parallel --save-dir /shared/checkpoints/run1
#   (or, inside an salloc allocation: scripts/launch_slurm.sh train DATA_BIN ...)
#   sbatch ... scripts/launch_slurm.sh eval_lm DATA_BIN --user-dir moe_plugin \
#       --path /shared/checkpoints/run1/checkpoint_last-rank-{RANK}.pt
#
# The first word is a fairseq_cli module (train, eval_lm, ...) or a console script name.
# "{RANK}" in the arguments becomes each task's rank (SLURM_PROCID). World size = nodes x
# tasks per node; this script adds --distributed-world-size and --distributed-port (fairseq
# then builds tcp://FIRST_NODE:PORT from SLURM_STEP_NODELIST, rank = SLURM_PROCID, device =
# SLURM_LOCALID) and, for train with --moe-expert-parallel and no --ddp-backend,
# --ddp-backend legacy_ddp. Before train it picks the checkpoint to resume from as
# scripts/launch_cpu.sh does (the save dir must be on a filesystem every node sees).
# srun --kill-on-bad-exit stops every task when one fails.
#
# Environment: PYTHON (default python), SRUN (default srun), MASTER_PORT (default: derived
# from SLURM_JOB_ID), MOE_DRY_RUN=1 prints the srun command instead of running it.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    sed -n '2,22p' "$0" >&2
    exit 2
fi
CMD=$1
shift
PYTHON=${PYTHON:-python}
SRUN=${SRUN:-srun}
MODULE=${CMD#fairseq-}
MODULE=${MODULE//-/_}
NNODES=${SLURM_NNODES:?launch_slurm.sh: run it with sbatch or inside salloc (SLURM_NNODES is not set)}
if [[ -n "${SLURM_NTASKS_PER_NODE:-}" ]]; then
    PER_NODE=${SLURM_NTASKS_PER_NODE%%(*}  # "8(x2)" -> 8
else
    PER_NODE=$((${SLURM_NTASKS:?launch_slurm.sh: set --ntasks-per-node} / NNODES))
fi
WORLD=$((NNODES * PER_NODE))
PORT=${MASTER_PORT:-$((10000 + ${SLURM_JOB_ID:-0} % 50000))}

ARGS=("$@")
# has_arg/arg_value copy scripts/_launch_lib.sh's: sbatch runs this script from a spool directory, without that file
has_arg() { local a; for a in "${ARGS[@]}"; do [[ "$a" == "$1" || "$a" == "$1="* ]] && return 0; done; return 1; }
arg_value() {
    local i v="$2"
    for ((i = 0; i < ${#ARGS[@]}; i++)); do
        case "${ARGS[$i]}" in
            "$1") v="${ARGS[$((i + 1))]:-}" ;;
            "$1="*) v="${ARGS[$i]#*=}" ;;
        esac
    done
    echo "$v"
}

EXTRA=(--distributed-world-size "$WORLD" --distributed-port "$PORT")
if [[ "$MODULE" == train ]]; then
    if has_arg --moe-expert-parallel && ! has_arg --ddp-backend; then
        EXTRA+=(--ddp-backend legacy_ddp)
    fi
    SAVE_DIR=$(arg_value --save-dir checkpoints)
    if [[ -d "$SAVE_DIR" ]] && ! has_arg --restore-file && ! has_arg --no-save && [[ -z "${MOE_DRY_RUN:-}" ]]; then
        RESTORE=$("$PYTHON" -W ignore -m moe_plugin.tools.reshard --resume "$SAVE_DIR" --world-size "$WORLD")
        if [[ -n "$RESTORE" && "$(basename "$RESTORE")" != checkpoint_last.pt ]]; then
            echo "launch_slurm.sh: checkpoint_last is missing or broken; resuming from $RESTORE" >&2
            EXTRA+=(--restore-file "$RESTORE")
        fi
    fi
fi

CMDLINE=("$SRUN" --kill-on-bad-exit=1 --nodes "$NNODES" --ntasks-per-node "$PER_NODE"
         bash -c 'a=("$@"); exec "${a[@]//\{RANK\}/$SLURM_PROCID}"' _ "$PYTHON" -m "fairseq_cli.$MODULE" "${ARGS[@]}" "${EXTRA[@]}")
if [[ -n "${MOE_DRY_RUN:-}" ]]; then
    printf '%q ' "${CMDLINE[@]}"
    echo
    exit 0
fi
exec "${CMDLINE[@]}"
