"""SAM, Switch and Mixture routing (Jiang et al., arXiv 2110.07431): activated experts K vs quality.

SAM with K = 1, 2, 4 experts per token chosen inside one group of experts (a device's
experts in expert-parallel runs), against Switch (top-1), GShard top-2, and flat top-K
over all experts (sam_lm with one group, which is plain top-K: moe_plugin/routing/sam.py)
with K = 2, 4. Every expert has the same size, so active compute grows with K (the paper's
question: is activating more experts worth it, and can it be had without more
communication?); ``--equal-compute`` instead gives experts hidden size F/K as
scripts/compare_sam.py does. The report shows valid/test perplexity, words/s, and the
routing metrics of SAM: the fraction of tokens sent to another device (``xdev_frac``; a
simulated G-device layout off expert parallelism), what flat top-K of the same router
would send (``topk_xdev_frac``), and how often the chosen group holds the global top-K.

Only the paper's abstract could be read: its model sizes, data and numbers are unknown
(docs/sam.md). Scales: ``paper`` = a GPT-2-small-sized model (d=768, 12 layers,
12 heads, FFN 3072) with 32 experts in every 2nd layer, 8 groups = 8 GPUs of one node
(torchrun, expert parallel), WikiText-103 -- our choice; ``mini`` = one GPU, d=512,
6 layers, 16 experts, 4 groups, WikiText-103; ``tiny`` = CPU, d=64, 4 layers, 8 experts,
2 groups, the synthetic corpus.
"""

from typing import List

from moe_plugin.experiments import _plan as P
from moe_plugin.experiments import register_experiment
from moe_plugin.tools import report as T
from moe_plugin.tools.stats import Claim

NAME = "sam_k_quality"

#: the paper's published numbers (``table`` prints them beside ours)
PAPER = {
    "source": "Jiang et al. 2021: no table could be read (only the abstract is available)",
    "verified": False,
}


#: the paper's qualitative claim, run names of this plan; the report ends the table with its
#: verdict (moe_plugin.tools.stats). At equal compute only under --equal-compute (experts of
#: hidden F/K): by default SAM K=k activates k experts of the same size as Switch's one, and the
#: claim is reported as not judged (``requires``) rather than compared at unequal compute.
CLAIMS = [
    Claim("SAM with K > 1 activated experts (K=2 and K=4) beats Switch (top-1) at equal compute",
          a=("sam_k2", "sam_k4"), b=("switch",), requires=(("equal_compute", True),)),
]


def table(runs: List[dict]) -> List[str]:
    u = T.unit_name(runs[0]["unit"]) if runs else "ppl"
    lines = ["### Activated experts K vs quality: SAM vs Switch vs top-K", "",
             f"| Model | K | groups | valid {u} | test {u} | words/s | tokens to another device per token | "
             "flat top-K would send | chosen group holds the global top-K |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        m = r["meta"]
        if r["status"] == "not run":
            lines.append(f"| {r['label']} | {m.get('K', '-')} | {m.get('groups', '-')} | not run | - | - | - | - | - |")
            continue
        v = r["valid_final"]
        # one group = one simulated device off expert parallelism: no traffic figure to show
        simulated_single = m.get("groups") == 1 and not (r.get("devices") or 1) > 1
        traffic = ["-", "-", "-"] if simulated_single else [
            T.fmt(T.layer_mean(v, "xdev_frac"), ".3f"), T.fmt(T.layer_mean(v, "topk_xdev_frac"), ".3f"),
            T.fmt(T.layer_mean(v, "topk_in_group"), ".3f")]
        lines.append(f"| {r['label']} | {m.get('K', '-')} | {m.get('groups', '-')} | {T.fmt(T.metric_value(r), '.3f')} | "
                     f"{T.fmt(T.metric_value(r, 'eval', 'test'), '.3f')} | {T.fmt(r['wps'], ',.0f')} | "
                     + " | ".join(traffic) + " |")
    lines += ["", "Device traffic (means over MoE layers of the valid log): the SAM router's "
              "`xdev_frac` / `topk_xdev_frac` / `topk_in_group` (moe_plugin/routing/sam.py; outside "
              "expert-parallel runs simulated with one group per device, so one-group rows show none). "
              f"Paper: {PAPER['source']}.", ""]
    return lines


SIZES = {
    "paper": dict(d=768, layers=12, heads=12, ffn=3072, experts=32, groups=8),
    "mini": dict(d=512, layers=6, heads=8, ffn=2048, experts=16, groups=4),
    "tiny": dict(d=64, layers=4, heads=4, ffn=256, experts=8, groups=2),
}


def add_arguments(p):
    p.add_argument("--equal-compute", action="store_true",
                   help="experts of hidden size F/K (equal active compute) instead of equal expert size")


@register_experiment(NAME, table=table, paper=PAPER, add_arguments=add_arguments)
def build_plan(scale, args):
    sz = SIZES[scale]
    hp, dataset, adaptive, launcher = P.word_level_setting(scale, args, {
        "paper": dict(tokens_per_sample=1024, max_tokens=8192, update_freq=1, lr=6e-4, warmup=2000, updates=50000,
                      validate_every=2500, save_every=25000, clip_norm=1.0),
        "mini": dict(updates=3000, validate_every=300, save_every=1500),
        "tiny": dict(updates=150),
    }, nodes=1, gpus_per_node=sz["groups"])
    E, G, F = sz["experts"], sz["groups"], sz["ffn"]
    model = P.model_flags(sz["d"], sz["layers"], sz["heads"], F, adaptive)
    ep = ["--moe-expert-parallel", "--ddp-backend", "legacy_ddp"] if scale == "paper" else []
    base = ["--moe-expert-count", str(E), "--moe-freq", "2"] + ep

    eq = bool(args.equal_compute)

    def expert_dim(k):
        return ["--moe-expert-ffn-dim", str(max(F // k, 1))] if args.equal_compute else []

    runs = [
        P.Run("switch", "Switch (top-1)", "switch_lm", dataset, model + base + expert_dim(1),
              meta=dict(kind="switch", K=1, groups=1, experts=E, equal_compute=eq)),
        P.Run("gshard_top2", "GShard top-2", "gshard_lm", dataset, model + base + expert_dim(2),
              meta=dict(kind="gshard", K=2, groups=1, experts=E, equal_compute=eq)),
    ]
    for k in (2, 4):
        runs.append(P.Run(f"topk_k{k}", f"flat top-{k}", "sam_lm", dataset,
                          model + base + ["--sam-groups", "1", "--moe-top-k", str(k)] + expert_dim(k),
                          meta=dict(kind="topk", K=k, groups=1, experts=E, equal_compute=eq)))
    for k in (1, 2, 4):
        runs.append(P.Run(f"sam_k{k}", f"SAM K={k}", "sam_lm", dataset,
                          model + base + ["--sam-groups", str(G), "--moe-top-k", str(k)] + expert_dim(k),
                          meta=dict(kind="sam", K=k, groups=G, experts=E, equal_compute=eq)))
    datasets = {dataset: P.dataset_for(dataset, scale, args.data_root)}
    plan = P.Plan(NAME, scale, "SAM: activated experts K vs quality, SAM vs Switch vs top-K (Jiang et al. 2021)",
                  runs, datasets, hp, launcher, device="cpu" if scale == "tiny" else "gpu", out=args.out)
    plan.notes.append(f"E={E} experts in every 2nd layer, SAM with G={G} groups of {E // G}; "
                      + ("experts of hidden size F/K (--equal-compute)" if args.equal_compute
                         else f"every expert of hidden size {F} (active compute grows with K)"))
    return plan
