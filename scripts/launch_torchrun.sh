#!/usr/bin/env bash
# One GPU node: NGPU processes (one per GPU, NCCL) started by torchrun.
#
#   scripts/launch_torchrun.sh NGPU train   DATA_BIN --user-dir moe_plugin --arch switch_lm ... --moe-expert-parallel
#   scripts/launch_torchrun.sh NGPU eval_lm DATA_BIN --user-dir moe_plugin --path SAVE/checkpoint_last-rank-{RANK}.pt
#
# The second word is a fairseq_cli module (train, eval_lm, validate, ...) or a console
# script name (fairseq-train, ...). "{RANK}" in the arguments becomes each process's rank.
# fairseq reads torchrun's MASTER_ADDR/MASTER_PORT/WORLD_SIZE/RANK (env:// init, one
# device per rank, no spawning); this script adds --distributed-world-size NGPU and, for
# train with --moe-expert-parallel and no --ddp-backend, --ddp-backend legacy_ddp.
# Before train it picks the checkpoint to resume from exactly as scripts/launch_cpu.sh
# does (python -m moe_plugin.tools.reshard --resume).
#
# Environment: PYTHON (default python), TORCHRUN (default torchrun; --standalone picks a
# free port), MOE_DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_launch_lib.sh"

if [[ $# -lt 2 ]]; then
    sed -n '2,18p' "$0" >&2
    exit 2
fi
NGPU=$1
CMD=$2
shift 2
need_positive_int NGPU "$NGPU"
PYTHON=${PYTHON:-python}
TORCHRUN=${TORCHRUN:-torchrun}
MODULE=$(fairseq_module "$CMD")
ARGS=("$@")

EXTRA=(--distributed-world-size "$NGPU")
if [[ "$MODULE" == train ]]; then
    if has_arg --moe-expert-parallel && ! has_arg --ddp-backend; then
        EXTRA+=(--ddp-backend legacy_ddp)
    fi
    SAVE_DIR=$(arg_value --save-dir checkpoints)
    if [[ -d "$SAVE_DIR" ]] && ! has_arg --restore-file && ! has_arg --no-save && [[ -z "${MOE_DRY_RUN:-}" ]]; then
        RESTORE=$("$PYTHON" -W ignore -m moe_plugin.tools.reshard --resume "$SAVE_DIR" --world-size "$NGPU")
        if [[ -n "$RESTORE" && "$(basename "$RESTORE")" != checkpoint_last.pt ]]; then
            echo "launch_torchrun.sh: checkpoint_last is missing or broken; resuming from $RESTORE" >&2
            EXTRA+=(--restore-file "$RESTORE")
        fi
    fi
fi

# each process substitutes its own rank for {RANK} (torchrun sets RANK)
CMDLINE=("$TORCHRUN" --standalone --nproc_per_node "$NGPU" --no-python
         bash -c 'a=("$@"); exec "${a[@]//\{RANK\}/$RANK}"' _ "$PYTHON" -m "fairseq_cli.$MODULE" "${ARGS[@]}" "${EXTRA[@]}")
if [[ -n "${MOE_DRY_RUN:-}" ]]; then
    printf '%q ' "${CMDLINE[@]}"
    echo
    exit 0
fi
exec "${CMDLINE[@]}"
