"""Sparse upcycling (Komatsuzaki et al. 2022, arXiv 2212.05055): does starting a top-1 MoE from a
dense checkpoint pay, at equal total updates and equal active FLOPs per token?

``dense_start`` (dense_lm) trains N updates; ``python -m moe_plugin.tools.upcycle`` turns its last
checkpoint into a switch_lm and a hash_lm checkpoint (every expert a copy of its layer's dense
FFN), each of which trains M more updates (``fairseq-train --finetune-from-model``: a fresh
optimizer and learning-rate warmup). They are compared with the same archs trained N + M updates
from scratch and with dense_lm trained N + M updates. Every MoE run is top-1 over experts of the
dense FFN's hidden size, so its active FLOPs per token equal dense_lm's (the report's "All runs"
table prints the ratio).

Claims: upcycling beats training the MoE from scratch at equal total updates (Switch; Hash), and
the upcycled MoE beats continuing the dense model (dense_lm trained N + M updates).
"""

import os
from typing import List

from moe_plugin.experiments import _plan as P
from moe_plugin.experiments import register_experiment
from moe_plugin.tools import report as T
from moe_plugin.tools.stats import Claim

NAME = "upcycling"

PAPER = {
    "source": "Komatsuzaki et al. 2022, Sparse Upcycling (arXiv 2212.05055), Figs. 2-3: upcycled T5/ViT models "
              "beat both their dense continuation and MoE models trained from scratch for the same extra "
              "compute; qualitative claims only here",
    "verified": False,
}

CLAIMS = [
    Claim("Upcycled Switch beats Switch trained from scratch for the same total updates (test perplexity)",
          a=("switch_up",), b=("switch_scratch",)),
    Claim("Upcycled Hash beats Hash trained from scratch for the same total updates (test perplexity)",
          a=("hash_up",), b=("hash_scratch",)),
    Claim("The upcycled MoE beats continuing the dense model for the same total updates (test perplexity)",
          a=("switch_up", "hash_up"), b=("dense",)),
]

SIZES = {
    "paper": dict(d=1024, layers=24, heads=16, ffn=4096, experts=32),
    "mini": dict(d=512, layers=6, heads=8, ffn=2048, experts=16),
    "tiny": dict(d=64, layers=4, heads=4, ffn=256, experts=8),
}
#: the share of the total updates the dense start trains before upcycling (the rest: M)
DENSE_SHARE = 0.5


def table(runs: List[dict]) -> List[str]:
    u = T.unit_name(runs[0]["unit"]) if runs else "ppl"
    lines = ["### Sparse upcycling at equal total updates and equal active FLOPs per token", "",
             f"| Model | updates (dense + MoE) | test {u} |", "|---|---|---:|"]
    for r in runs:
        m = r["meta"]
        if r["status"] == "not run":
            lines.append(f"| {r['label']} | {m.get('schedule', '-')} | not run |")
            continue
        lines.append(f"| {r['label']} | {m.get('schedule', '-')} | {T.fmt(T.metric_value(r, 'eval', 'test'), '.3f')} |")
    lines += ["", "Figures: mean ± sample std over the seeds. An upcycled run starts from the dense start's last "
              "checkpoint of the same seed (every expert a copy of its layer's dense FFN, the router freshly "
              "initialised) with a fresh optimizer and warmup. FLOPs/token and parameters: the \"All runs\" "
              "table.", ""]
    return lines


@register_experiment(NAME, table=table, paper=PAPER)
def build_plan(scale, args):
    sz = SIZES[scale]
    hp, dataset, adaptive, launcher = P.word_level_setting(scale, args, {
        "paper": dict(updates=50000, validate_every=2500, save_every=25000),
        "mini": dict(updates=4000, validate_every=500, save_every=2000),
        "tiny": dict(updates=200, validate_every=20, save_every=50),
    }, nodes=1, gpus_per_node=8)
    total = int(hp["updates"])
    N = max(1, int(total * DENSE_SHARE))
    M = total - N
    E, F = sz["experts"], sz["ffn"]
    model = P.model_flags(sz["d"], sz["layers"], sz["heads"], F, adaptive)
    moe = {"switch_lm": ["--moe-expert-count", str(E), "--moe-freq", "2"],
           "hash_lm": ["--moe-expert-count", str(E), "--moe-freq", "2", "--hash-type", "balanced"]}
    out = args.out
    start_ckpt = os.path.join(out, "dense_start", "checkpoints", "checkpoint_last.pt")
    ds = P.dataset_for(dataset, scale, args.data_root)

    def updates(n):  # after the plan's training flags: this run's own length
        return ["--max-update", str(n)]

    runs = [
        P.Run("dense_start", f"Dense, {N} updates (the upcycling start)", P.DENSE_ARCH, dataset, model,
              meta=dict(router="dense", max_update=N, schedule=f"{N} + 0"), extra_train_args=updates(N)),
        P.Run("dense", f"Dense, {total} updates", P.DENSE_ARCH, dataset, model,
              meta=dict(router="dense", max_update=total, schedule=f"{total} + 0"), extra_train_args=updates(total)),
    ]
    for arch, short, label in (("switch_lm", "switch", "Switch"), ("hash_lm", "hash", "Hash (balanced)")):
        runs.append(P.Run(f"{short}_scratch", f"{label} from scratch, {total} updates", arch, dataset,
                          model + moe[arch], meta=dict(router=short, experts=E, max_update=total,
                                                       schedule=f"0 + {total}"), extra_train_args=updates(total)))
        upcycled = os.path.join(out, f"{short}_up", "upcycled.pt")
        run = P.Run(f"{short}_up", f"{label} upcycled from the dense start, {M} more updates", arch, dataset,
                    model + moe[arch], meta=dict(router=short, experts=E, max_update=M, schedule=f"{N} + {M}"),
                    extra_train_args=updates(M) + ["--finetune-from-model", upcycled])
        run.pre.append(("upcycle", ["python", "-m", "moe_plugin.tools.upcycle", "--dense", start_ckpt, "--arch", arch,
                                    "--out", upcycled, "--data", ds.data_bin, *moe[arch]]))
        run.needs.append("dense_start")
        runs.append(run)
    plan = P.Plan(NAME, scale, "Sparse upcycling: dense start -> top-1 MoE vs MoE from scratch vs dense "
                  "(Komatsuzaki et al. 2022)", runs, {dataset: ds}, hp, launcher,
                  device="cpu" if scale == "tiny" else "gpu", out=out)
    plan.notes.append(f"{total} updates in all: dense start {N}, then {M} for the upcycled runs; E={E} experts of "
                      f"hidden {F} (the dense FFN's) in every 2nd layer, top-1; every worker holds every expert "
                      "(upcycle, then reshard for expert parallelism: docs/upcycling.md)")
    return plan
