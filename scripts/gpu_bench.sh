#!/usr/bin/env bash
# The GPU measurements of docs/performance.md in one run (about 6 minutes on one H200-class
# device): the layer suite in bf16 with torch._grouped_mm (the CUDA default expert path), peak
# memory over the dense FFN's, and the end-to-end suite in bf16 for the dense baseline and the
# main archs. Writes results/bench-gpu/{layer,e2e}.{jsonl,md}; every figure is a ratio to a
# baseline measured in the same run, with the device name on the first line of each file.
#
#   bash scripts/gpu_bench.sh            # from the repository root, with the venv of `make install`
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT_DIR:-results/bench-gpu}
mkdir -p "$OUT"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(), torch.__version__)"
# the layer: every router, D=1024, F=4096, bf16, T in {8192, 32768}, E in {16, 64}
timeout 240 "$PY" scripts/bench.py --suite layer --device cuda --dtype bf16 --D 1024 --F 4096 \
    --T 8192,32768 --E 16,64 --reps 20 --jsonl "$OUT/layer.jsonl" --markdown "$OUT/layer.md"
# end to end: fairseq-train --bf16 words/s over dense_lm at equal active FLOPs per token
timeout 300 "$PY" scripts/bench.py --suite e2e --device cuda --dtype bf16 --e2e-dim 512 --e2e-updates 50 \
    --archs dense_lm,switch_lm,gshard_lm,hash_lm,base_lm,hyper_lm,sam_lm \
    --jsonl "$OUT/e2e.jsonl" --markdown "$OUT/e2e.md"
cat "$OUT/layer.md" "$OUT/e2e.md"
