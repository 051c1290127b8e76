"""Balancing methods beyond the four papers, on one path: Switch's auxiliary loss (micro- and
global-batch), auxiliary-loss-free bias balancing, Sinkhorn (S-BASE), BASE, and shared +
routed experts, at equal active FLOPs per token.

Sources: Switch Transformer (Fedus et al. 2021); Loss-Free Balancing (Wang et al. 2024,
arXiv 2408.15664) and DeepSeek-V3 (arXiv 2412.19437); global-batch load balancing (Qiu et
al. 2025, arXiv 2501.11873); S-BASE (Clark et al. 2022, arXiv 2202.01169); BASE layers
(Lewis et al. 2021); DeepSeekMoE shared experts (Dai et al. 2024, arXiv 2401.06066).
docs/balancing.md describes each method, its options and what differs from the public code.

Every routed run is top-1 over E experts of hidden size F (so one expert's FLOPs per
token), with the same capacity factor 1.25 (BASE assigns exactly T/E tokens per expert and
has none), so "% dropped" compares the balance each method reaches; the shared + routed run
has one always-active expert of F/2 beside routed experts of F/2 (the same active FLOPs).
BASE adds its own block (its FLOPs ratio is printed and marked in the report's "All runs"
table). Every run takes its updates as ``--update-freq 4`` micro-batches of 512 tokens at
the tiny scale (2048 tokens per update, as the other tiny reproductions), so that the global
batch differs from the micro-batch.

At the tiny scale the bias update rate is 0.01 instead of the papers' 0.001: the papers run
10^4-10^5 updates, this one 150, and at 0.001 the bias could move by at most 0.15 (the
sigmoid scores span 0..1). The mini and paper scales use 0.001.

Claims (verdicts at this scale; "matches or beats" and "at least as good" are judged as
beats-beyond-the-spread = holds, within the spread = inconclusive, worse = does not hold):
loss-free balancing matches or beats the aux loss (test perplexity) at better balance (load
max/mean at the end of training); global-batch balance beats micro-batch balance; S-BASE is
at least as good as Switch.
"""

import json
import math
import os
from typing import List, Optional

from moe_plugin.experiments import _plan as P
from moe_plugin.experiments import register_experiment
from moe_plugin.tools import report as T
from moe_plugin.tools import stats
from moe_plugin.tools.stats import Claim

NAME = "balancing"

PAPER = {
    "source": "Wang et al. 2024 Table 2 (loss-free vs aux loss, 1B/3B models on 100B/200B tokens); Qiu et al. "
              "2025 (global vs micro-batch balance); Clark et al. 2022 (S-BASE): qualitative claims only here",
    "verified": False,
}

CLAIMS = [
    Claim("Loss-free balancing matches or beats Switch's auxiliary loss (test perplexity)",
          a=("loss_free",), b=("switch",)),
    Claim("Loss-free balancing balances better than the auxiliary loss (load max/mean at the end of training)",
          a=("loss_free",), b=("switch",), metric="load_max_end", spec=".3f"),
    Claim("Global-batch balance beats micro-batch balance (test perplexity)", a=("switch_global",), b=("switch",)),
    Claim("S-BASE (Sinkhorn) is at least as good as Switch (test perplexity)", a=("sinkhorn",), b=("switch",)),
]

SIZES = {
    "paper": dict(d=1024, layers=24, heads=16, ffn=4096, experts=64),
    "mini": dict(d=512, layers=6, heads=8, ffn=2048, experts=16),
    "tiny": dict(d=64, layers=4, heads=4, ffn=256, experts=8),
}
#: --moe-router-bias-update-rate per scale (module docstring)
BIAS_RATE = {"paper": 1e-3, "mini": 1e-3, "tiny": 1e-2}
CAPACITY = "1.25"


def _floor(run: dict) -> Optional[float]:
    """The true source's test cross-entropy (nats/token) from the corpus's truth.json, if any."""
    path = run["meta"].get("truth")
    if not path:
        return None
    path = path if os.path.isabs(path) else os.path.join(P.ROOT, path)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return float(json.load(f)["test"]["cross_entropy_nats"])


def _per_seed(run: dict, fn):
    seeds = run.get("seeds") or [run]
    vals = [(fn(r), r.get("seed")) for r in seeds]
    vals = [(v, s) for v, s in vals if v is not None and not math.isnan(v)]
    if not vals:
        return None
    return stats.aggregate([v for v, _ in vals], [s if s is not None else i for i, (_, s) in enumerate(vals)])


def table(runs: List[dict]) -> List[str]:
    u = T.unit_name(runs[0]["unit"]) if runs else "ppl"
    lines = ["### Balancing methods at equal active compute", "",
             f"| Model | test {u} | gap to floor (nats/token) | load max/mean (end) | % dropped (end) | "
             "load max/mean (train mean) | words/s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        if r["status"] == "not run":
            lines.append(f"| {r['label']} | not run | - | - | - | - | - |")
            continue

        def gap(one):
            ppl, floor = stats.value_of(one, "test"), _floor(one)
            return None if ppl is None or floor is None else math.log(ppl) - floor

        def load_mean(one):
            pts = [v for layer in one.get("load_series", {}).values() for _, v in layer]
            return sum(pts) / len(pts) if pts else None

        lines.append(
            f"| {r['label']} | {T.fmt(T.metric_value(r, 'eval', 'test'), '.3f')} | {T.fmt(_per_seed(r, gap), '.4f')} | "
            f"{T.fmt(_per_seed(r, lambda one: stats.value_of(one, 'load_max_end')), '.3f')} | "
            f"{T.fmt(_per_seed(r, lambda one: stats.value_of(one, 'dropped_end')), '.2f')} | {T.fmt(_per_seed(r, load_mean), '.3f')} | "
            f"{T.fmt(r['wps'], ',.0f')} |")
    lines += ["", "Figures: mean ± sample std over the seeds. Gap to floor: ln(test ppl) minus the true source's "
              "test cross-entropy (truth.json of the synthetic corpus; '-' on other data). Load max/mean and % "
              "dropped at the end: the last logged training interval, the MoE layers' mean (BASE: its "
              "assignment is balanced by construction); train mean: over every logged interval. The per-run "
              "plots `load_<run>.png` show the load over training. FLOPs/token and parameters: the "
              "\"All runs\" table.", ""]
    return lines


@register_experiment(NAME, table=table, paper=PAPER)
def build_plan(scale, args):
    sz = SIZES[scale]
    hp, dataset, adaptive, launcher = P.word_level_setting(scale, args, {
        "paper": dict(updates=50000, validate_every=2500, save_every=25000),
        "mini": dict(updates=3000, validate_every=300, save_every=1500, max_tokens=2048, update_freq=4),
        "tiny": dict(max_tokens=512, update_freq=4),
    }, nodes=1, gpus_per_node=8)
    E, F = sz["experts"], sz["ffn"]
    model = P.model_flags(sz["d"], sz["layers"], sz["heads"], F, adaptive)
    ep = ["--moe-expert-parallel", "--ddp-backend", "legacy_ddp"] if scale == "paper" else []
    moe = ["--moe-expert-count", str(E), "--moe-freq", "2"] + ep
    cap = ["--moe-capacity-factor", CAPACITY]
    ds = P.dataset_for(dataset, scale, args.data_root)
    truth = os.path.join(os.path.dirname(ds.data_bin), "truth.json") if dataset == "synthetic" else None
    meta = dict(experts=E, truth=truth)
    rate = BIAS_RATE[scale]
    runs = [
        P.Run("switch", "Switch, aux loss (micro-batch)", "switch_lm", dataset, model + moe + cap,
              meta=dict(meta, method="aux_loss")),
        P.Run("switch_global", "Switch, aux loss (global batch)", "switch_lm", dataset,
              model + moe + cap + ["--moe-balance-scope", "global"], meta=dict(meta, method="aux_loss_global")),
        P.Run("loss_free", f"Loss-free bias (sigmoid, rate {rate:g})", "loss_free_lm", dataset,
              model + moe + cap + ["--moe-router-bias-update-rate", f"{rate:g}"],
              meta=dict(meta, method="loss_free")),
        P.Run("sinkhorn", "S-BASE (Sinkhorn)", "sbase_lm", dataset, model + moe + cap,
              meta=dict(meta, method="sinkhorn")),
        P.Run("base", "BASE", "base_lm", dataset,
              model + ["--moe-expert-count", str(E), "--base-layers", "1"] + ep, meta=dict(meta, method="base")),
        P.Run("shared", "Switch + 1 shared expert (F/2 each)", "switch_lm", dataset,
              model + moe + cap + ["--moe-expert-ffn-dim", str(F // 2), "--moe-shared-experts", "1",
                                   "--moe-shared-expert-ffn-dim", str(F // 2)],
              meta=dict(meta, method="shared")),
    ]
    plan = P.Plan(NAME, scale, "Balancing methods: aux loss (micro/global), loss-free bias, S-BASE, BASE, shared "
                  "experts", runs, {dataset: ds}, hp, launcher, device="cpu" if scale == "tiny" else "gpu",
                  out=args.out)
    plan.notes.append(f"E={E} experts of hidden {F} in every 2nd layer, top-1, capacity factor {CAPACITY} "
                      f"(BASE: balanced assignment); updates of --update-freq {hp['update_freq']} x "
                      f"{hp['max_tokens']} tokens; loss-free bias rate {rate:g}")
    return plan
