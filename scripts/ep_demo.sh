#!/usr/bin/env bash
# Expert parallelism end to end on 2 CPU ranks, with the exact commands of docs/distributed.md:
# train with scripts/launch_cpu.sh (4 experts, 2 per rank), reshard the 2 shards to 1,
# evaluate in one process and on 2 ranks, print both losses and their difference.
#
#   scripts/ep_demo.sh [OUT_DIR]         (default results/ep_demo)
#
# Environment: ARCH (default base_lm when registered, else switch_lm), UPDATES (default 50),
# PYTHON (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/ep_demo}
PYTHON=${PYTHON:-.venv/bin/python}
export PYTHON OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONWARNINGS=ignore
UPDATES=${UPDATES:-50}
if [[ -z "${ARCH:-}" ]]; then
    ARCH=$("$PYTHON" -W ignore -c 'from moe_plugin.models.archs import ARCHS; print("base_lm" if "base_lm" in ARCHS else "switch_lm")' 2> /dev/null)
fi
mkdir -p "$OUT"
DATA=$OUT/data-bin
if [[ ! -d "$DATA" ]]; then
    "$PYTHON" data-prep/synthetic.py --out "$OUT/text" --train-tokens 20000 --valid-tokens 3000 \
        --test-tokens 3000 --vocab-size 300 --domains 3 --domain-vocab 60 --shared-vocab 15 > /dev/null
    "$PYTHON" -m fairseq_cli.preprocess --only-source --trainpref "$OUT/text/train.txt" \
        --validpref "$OUT/text/valid.txt" --testpref "$OUT/text/test.txt" --destdir "$DATA" --workers 1 > /dev/null 2>&1
fi
rm -rf "$OUT/ckpt" "$OUT/ckpt1"
MODEL=(--decoder-layers 2 --decoder-embed-dim 32 --decoder-ffn-embed-dim 64 --decoder-attention-heads 2
       --tokens-per-sample 32 --max-tokens 512 --moe-expert-count 4)

echo "== train: $ARCH, 4 experts, 2 ranks in expert-parallel mode ($UPDATES updates)"
scripts/launch_cpu.sh 2 train "$DATA" --task language_modeling --user-dir moe_plugin --arch "$ARCH" \
    --criterion moe_cross_entropy "${MODEL[@]}" --moe-expert-parallel --optimizer adam --lr 2e-3 \
    --max-update "$UPDATES" --save-dir "$OUT/ckpt" --no-epoch-checkpoints --log-format simple \
    --log-interval 10 --seed 1 --num-workers 0 > "$OUT/train.log" 2>&1
ls "$OUT/ckpt"

echo "== reshard 2 -> 1"
"$PYTHON" -m moe_plugin.tools.reshard --input "$OUT/ckpt/checkpoint_last.pt" --world-size 1 --output "$OUT/ckpt1" 2>&1 | grep -v tensorboardX

EVAL=("$DATA" --user-dir moe_plugin --tokens-per-sample 32 --max-tokens 512)
echo "== evaluate: 1 process (resharded) and 2 ranks (shards as trained)"
# --output-word-probs: every token's log-probability (6 decimals), for an exact comparison
"$PYTHON" -m fairseq_cli.eval_lm "${EVAL[@]}" --cpu --path "$OUT/ckpt1/checkpoint_last.pt" --output-word-probs > "$OUT/eval1.log" 2>&1
# fairseq-eval-lm prints rank 0's data shard only: run the 2 ranks once per shard
scripts/launch_cpu.sh 2 eval_lm "${EVAL[@]}" --path "$OUT/ckpt/checkpoint_last-rank-{RANK}.pt" --output-word-probs > "$OUT/eval2_shard0.log" 2>&1
scripts/launch_cpu.sh 2 eval_lm "${EVAL[@]}" --path "$OUT/ckpt/checkpoint_last-rank-{RANK}.pt" --output-word-probs --shard-id 1 > "$OUT/eval2_shard1.log" 2>&1

"$PYTHON" - "$OUT" <<'EOF'
import re, sys
out = sys.argv[1]
def read(name):
    text = open(f"{out}/{name}").read()
    loss = float(re.findall(r"Loss \(base 2\): ([\d.]+)", text)[-1])
    n = int(re.findall(r"Evaluated ([\d,]+) tokens", text)[-1].replace(",", ""))
    return loss, n
def word_probs(name):  # sample id -> list of natural-log probabilities
    out = {}
    for m in re.finditer(r"eval_lm[^\n]*? \| (\d+) (.*)|eval_lm:(\d+) (.*)", open(f"{out_dir}/{name}").read()):
        sid, rest = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        out[int(sid)] = [float(x) for x in re.findall(r"\[(-?[\d.]+)\]", rest)]
    return out
out_dir = out
l1, n1 = read("eval1.log")
(a, na), (b, nb) = read("eval2_shard0.log"), read("eval2_shard1.log")
l2 = (a * na + b * nb) / (na + nb)
p1 = word_probs("eval1.log")
p2 = {**word_probs("eval2_shard0.log"), **word_probs("eval2_shard1.log")}
assert p1.keys() == p2.keys() and p1, "word probabilities missing"
dmax = max(abs(x - y) for k in p1 for x, y in zip(p1[k], p2[k]))
import math
lp1 = -sum(map(sum, p1.values())) / sum(map(len, p1.values())) / math.log(2)
lp2 = -sum(map(sum, p2.values())) / sum(map(len, p2.values())) / math.log(2)
print(f"1 process, resharded checkpoint : loss {l1:.4f} (base 2) over {n1} tokens")
print(f"2 ranks, expert-parallel shards : loss {l2:.4f} (shard 0: {a:.4f} over {na}, shard 1: {b:.4f} over {nb})")
print(f"|difference| of printed losses  : {abs(l1 - l2):.1e} (each printed to 4 decimals)")
print(f"from per-token log-probabilities: loss {lp1:.6f} vs {lp2:.6f}, |difference| {abs(lp1 - lp2):.1e}; "
      f"largest per-token |difference| {dmax:.1e} (printed to 6 decimals)")
EOF
