"""Step 0 of sparse upcycling per arch: fairseq-eval-lm of a dense_lm checkpoint and of each arch
upcycled from it (no training in between), as a markdown table (docs/upcycling.md).

    .venv/bin/python scripts/upcycle_step0.py --dense CKPT --data DATA_BIN [--archs a,b] [--experts 8]
"""

import argparse
import os
import re
import sys
import tempfile

from moe_plugin.models.archs import ARCHS
from moe_plugin.routing import ROUTER_REGISTRY
from moe_plugin.tools import commands, upcycle

def eval_loss(data_bin: str, ckpt: str, extra) -> float:
    out = commands.run([sys.executable, "-m", "fairseq_cli.eval_lm", data_bin, "--user-dir", "moe_plugin", "--path",
                        ckpt, "--cpu", "--gen-subset", "test", "--num-workers", "0", *extra]).stdout
    return float(re.findall(r"Loss \(base 2\): ([\d.]+)", out)[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dense", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--archs", default=",".join(sorted(ARCHS)))
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--eval-args", default="--tokens-per-sample 64 --context-window 32 --max-tokens 4096",
                   help="fairseq-eval-lm options (default: the tiny reproductions')")
    a = p.parse_args(argv)
    extra = a.eval_args.split()
    dense = eval_loss(a.data, a.dense, extra)
    print(f"dense_lm {a.dense}: test loss {dense:.4f} bits/token\n")
    print("| arch | test loss at step 0 (bits/token) | minus dense_lm's |\n|---|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in a.archs.split(","):
            moe = ["--moe-expert-count", str(a.experts)]
            if getattr(ROUTER_REGISTRY[ARCHS[arch][0]], "arch_schedule", "none") != "none":
                moe += ["--moe-top-k-schedule-updates", "1"]  # a training K schedule; step 0 evaluates at eval K
            try:
                out = upcycle.upcycle(a.dense, arch, os.path.join(tmp, f"{arch}.pt"), moe, data=a.data,
                                      log=lambda *_: None)
            except upcycle.UpcycleError as e:  # base_lm: its BASE block has no dense counterpart
                print(f"| {arch} | refused: {e} | - |", flush=True)
                continue
            overrides = ["--model-overrides", "{'expert_choice_allow_future_leak': True}"] \
                if ARCHS[arch][0] == "expert_choice" else []
            loss = eval_loss(a.data, out, extra + overrides)
            print(f"| {arch} | {loss:.4f} | {loss - dense:+.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
