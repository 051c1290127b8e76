#!/usr/bin/env bash
# W local CPU processes over gloo running one fairseq command (fairseq's spawner starts no
# process on CPU, so each rank is started here with --distributed-no-spawn).
#
#   scripts/launch_cpu.sh W train   DATA_BIN --user-dir moe_plugin --arch switch_lm ... --moe-expert-parallel
#   scripts/launch_cpu.sh W eval_lm DATA_BIN --user-dir moe_plugin --path SAVE/checkpoint_last-rank-{RANK}.pt
#
# W: number of ranks. The second word is a fairseq_cli module (train, eval_lm, validate,
# generate) or a console script name (fairseq-train, ...). Every "{RANK}" in the arguments
# becomes the rank number (eval_lm needs the per-rank --path; it has no --checkpoint-suffix).
#
# Added to every rank: --cpu --distributed-world-size W --distributed-rank R
#   --distributed-backend gloo --distributed-init-method tcp://127.0.0.1:PORT --distributed-no-spawn
# and, for train with --moe-expert-parallel and no --ddp-backend, --ddp-backend legacy_ddp.
#
# Resume (train): before starting, `python -m moe_plugin.tools.reshard --resume SAVE_DIR
# --world-size W` picks the newest complete checkpoint set whose shards agree (a run killed
# while writing leaves a truncated or half-written set: it is skipped); when that is not
# checkpoint_last, --restore-file is added. A newer set written for another world size
# stops the launch with the reshard command to run.
#
# Output: rank 0 on this terminal, rank R > 0 in $MOE_LOG_DIR/rank-R.log (default: a
# temporary directory, printed). If a rank fails, the others are stopped and the exit
# status is the failing rank's. Environment: MASTER_PORT (default: a free port),
# PYTHON (default: python), MOE_LOG_DIR, OMP_NUM_THREADS (default 1).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_launch_lib.sh"

if [[ $# -lt 2 ]]; then
    sed -n '2,24p' "$0" >&2
    exit 2
fi
W=$1
CMD=$2
shift 2
need_positive_int W "$W"
PYTHON=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
MODULE=$(fairseq_module "$CMD")
FREE_PORT='import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
PORT=${MASTER_PORT:-$(python3 -c "$FREE_PORT" 2> /dev/null || "$PYTHON" -c "$FREE_PORT")}
LOG_DIR=${MOE_LOG_DIR:-$(mktemp -d -t moe_launch.XXXXXX)}
mkdir -p "$LOG_DIR"

ARGS=("$@")

EXTRA=(--cpu --distributed-world-size "$W" --distributed-backend gloo
       --distributed-init-method "tcp://127.0.0.1:$PORT" --distributed-no-spawn)
if [[ "$MODULE" == train ]]; then
    if has_arg --moe-expert-parallel && ! has_arg --ddp-backend; then
        EXTRA+=(--ddp-backend legacy_ddp)
    fi
    SAVE_DIR=$(arg_value --save-dir checkpoints)
    if [[ -d "$SAVE_DIR" ]] && ! has_arg --restore-file && ! has_arg --no-save; then
        RESTORE=$("$PYTHON" -W ignore -m moe_plugin.tools.reshard --resume "$SAVE_DIR" --world-size "$W" 2> "$LOG_DIR/resume.err") || {
            cat "$LOG_DIR/resume.err" >&2
            exit 2
        }
        if [[ -n "$RESTORE" && "$(basename "$RESTORE")" != checkpoint_last.pt ]]; then
            echo "launch_cpu.sh: checkpoint_last is missing or broken; resuming from $RESTORE" >&2
            EXTRA+=(--restore-file "$RESTORE")
        fi
    fi
fi

PIDS=()
kill_tree() {  # a rank and everything it started (data loader workers, ...)
    local c
    for c in $(ps -o pid= --ppid "$1" 2> /dev/null); do kill_tree "$c"; done
    kill "$1" 2> /dev/null || true
}
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill_tree "$p"; done
}
trap 'cleanup; exit 130' INT TERM

for ((r = 0; r < W; r++)); do
    RANK_ARGS=("${ARGS[@]//\{RANK\}/$r}")
    if [[ $r -eq 0 ]]; then
        "$PYTHON" -m "fairseq_cli.$MODULE" "${RANK_ARGS[@]}" "${EXTRA[@]}" --distributed-rank "$r" &
    else
        "$PYTHON" -m "fairseq_cli.$MODULE" "${RANK_ARGS[@]}" "${EXTRA[@]}" --distributed-rank "$r" \
            > "$LOG_DIR/rank-$r.log" 2>&1 &
    fi
    PIDS+=($!)
done
[[ $W -gt 1 ]] && echo "launch_cpu.sh: $W ranks on port $PORT; logs of ranks 1..$((W - 1)) in $LOG_DIR" >&2

status=0
declare -A DONE=()
while [[ ${#DONE[@]} -lt $W ]]; do
    for p in "${PIDS[@]}"; do
        [[ -n "${DONE[$p]:-}" ]] && continue
        kill -0 "$p" 2> /dev/null && continue
        set +e
        wait "$p"
        rc=$?
        set -e
        DONE[$p]=$rc
        if [[ $rc -ne 0 && $status -eq 0 ]]; then
            status=$rc
            echo "launch_cpu.sh: a rank exited with status $rc; stopping the others (logs in $LOG_DIR)" >&2
            cleanup
        fi
    done
    [[ ${#DONE[@]} -lt $W ]] && sleep 0.5
done
exit $status
