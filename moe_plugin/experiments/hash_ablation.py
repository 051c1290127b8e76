"""Hash layers (Roller et al., NeurIPS 2021): the hash-function ablation and Hash vs Switch vs BASE.

Part 1, the ablation: one Hash layer (hash_lm's default place, 0-based layer
floor(7 L / 11), the authors' layer 7 of 11) with E1 experts and every hash function of the
paper: balanced, random, clustered and dispersed (k-means over the input embeddings of a
dense baseline trained first, ``python -m moe_plugin.tools.hash_kmeans``), position, bigram,
previous token, and the oracle future token (a cheating diagnostic: fairseq-eval-lm
refuses it, so its row shows the validation perplexity of the training log only).

Part 2: Hash (balanced) against Switch (the same single MoE layer) and BASE (one BASE
layer) at two expert counts E1 < E2 (the paper: 64 and 128).

Scales: ``paper`` = d=1024, 11 layers, 16 heads, FFN 4096, E 64 / 128, 32 GPUs (4 nodes x
8, Slurm, expert parallel), WikiText-103 (the paper's pushshift.io Reddit is not public in
that form; the paper notes Hash lost to Switch on WikiText-103's 267K vocabulary);
``mini`` = one GPU, d=512, 6 layers, E 16 / 32, WikiText-103; ``tiny`` = CPU, d=64,
4 layers, E 8 / 16, the synthetic corpus. Paper numbers (unverified transcription):
``PAPER`` below. Differences: docs/reproduction.md.
"""

import os
from typing import List

from moe_plugin.models.archs import DENSE_ARCH
from moe_plugin.experiments import _plan as P
from moe_plugin.experiments import register_experiment
from moe_plugin.tools import report as T
from moe_plugin.tools.stats import Claim

NAME = "hash_ablation"

#: the paper's published numbers (``table`` prints them beside ours)
PAPER = {
    "source": "Roller et al. 2021, pushshift.io Reddit test perplexity (third-party transcription, unverified)",
    "verified": False,
    "ablation": {"balanced": 23.23, "random": 23.27, "dispersed": 23.22, "clustered": 23.99, "bigram": 24.28,
                 "previous": 24.22, "position": 25.14, "oracle": 1.97},
    "experts": {"hash": {64: 23.23, 128: 22.95}, "switch": {64: 23.73, 128: 23.58}},
}


def table(runs: List[dict]) -> List[str]:
    paper = PAPER
    u = T.unit_name(runs[0]["unit"]) if runs else "ppl"
    abl = [r for r in runs if r["group"] == "ablation"]
    lines = [f"### Hash-function ablation ({len(abl)} runs)", "",
             f"| Hash function | experts | valid {u} | test {u} | load max/mean (valid) | paper test ppl "
             f"(Reddit; {'verified' if paper['verified'] else 'unverified'}) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in abl:
        h = r["meta"].get("hash_type")
        p = paper["ablation"].get(h) if h else None
        if r["status"] == "not run":
            lines.append(f"| {r['label']} | {r['meta'].get('experts', '-')} | not run | - | - | {T.fmt(p)} |")
            continue
        test = T.metric_value(r, "eval", "test")
        note = " (eval-lm refuses the oracle)" if h == "oracle" else ""
        lines.append(f"| {r['label']} | {r['meta'].get('experts', '-')} | {T.fmt(T.metric_value(r), '.3f')} | "
                     f"{T.fmt(test, '.3f')}{note} | {T.fmt(r['valid_final'].get('moe_load_max'), '.2f')} | {T.fmt(p)} |")
    exp_runs = [r for r in runs if r["meta"].get("experts") and r["meta"].get("router") in ("hash", "switch", "base")
                and (r["group"] == "experts" or r["meta"].get("hash_type") == "balanced")]
    Es = sorted({int(r["meta"]["experts"]) for r in exp_runs})
    if Es:
        pE = sorted({e for d in paper["experts"].values() for e in d})
        lines += ["", "### Hash vs Switch vs BASE at two expert counts", "",
                  "| Model | " + " | ".join(f"E={e}: test {u} (ours)" for e in Es) + " | " +
                  " | ".join(f"paper E={e} (unverified)" for e in pE) + " |",
                  "|---|" + "---:|" * (len(Es) + len(pE))]
        for router, label in (("hash", "Hash (balanced)"), ("switch", "Switch"), ("base", "BASE")):
            cells = []
            for e in Es:
                r = next((x for x in exp_runs if x["meta"]["router"] == router and int(x["meta"]["experts"]) == e),
                         None)
                cells.append("not run" if r is None or r["status"] == "not run" else
                             T.fmt(T.metric_value(r, "eval", "test"), ".3f"))
            pcells = [T.fmt(paper["experts"].get(router, {}).get(e)) for e in pE]
            lines.append(f"| {label} | " + " | ".join(cells + pcells) + " |")
    lines.append("")
    return lines


HASH_TYPES = ("balanced", "random", "clustered", "dispersed", "position", "bigram", "previous", "oracle")

SIZES = {
    "paper": dict(d=1024, layers=11, heads=16, ffn=4096, experts=(64, 128)),
    "mini": dict(d=512, layers=6, heads=8, ffn=2048, experts=(16, 32)),
    "tiny": dict(d=64, layers=4, heads=4, ffn=256, experts=(8, 16)),
}


def _claims(scale):
    E1, E2 = SIZES[scale]["experts"]
    return [
        Claim("Balanced and random hashes beat the clustered, bigram, previous-token and position hashes",
              a=("hash_balanced", "hash_random"), b=("hash_clustered", "hash_bigram", "hash_previous", "hash_position")),
        Claim(f"Hash (balanced) beats Switch with the same single MoE layer (E={E1} and E={E2})",
              a=("hash_balanced", f"hash_E{E2}"), b=(f"switch_E{E1}", f"switch_E{E2}"), paired=True),
    ]


#: the paper's qualitative claims per scale (run names carry the scale's expert counts); the
#: report ends the tables with their verdicts (moe_plugin.tools.stats)
CLAIMS = {scale: _claims(scale) for scale in SIZES}


def hash_layer(layers: int) -> int:
    """hash_lm's default MoE layer (moe_plugin/routing/hashed.py): floor(7 L / 11)."""
    return (7 * layers) // 11


@register_experiment(NAME, table=table, paper=PAPER)
def build_plan(scale, args):
    sz = SIZES[scale]
    hp, dataset, adaptive, launcher = P.word_level_setting(scale, args, {
        "paper": dict(tokens_per_sample=512, max_tokens=4096, update_freq=1, lr=5e-4, warmup=4000, updates=50000,
                      validate_every=2500, save_every=25000),
        "mini": dict(updates=2000, validate_every=250, save_every=1000),
        "tiny": dict(updates=120, warmup=12, validate_every=20, save_every=60),
    }, nodes=4, gpus_per_node=8)
    E1, E2 = sz["experts"]
    layer = str(hash_layer(sz["layers"]))
    # adaptive softmax but a plain input embedding: the k-means tables cluster its rows
    model = P.model_flags(sz["d"], sz["layers"], sz["heads"], sz["ffn"], adaptive, adaptive_input=False)
    ep = ["--moe-expert-parallel", "--ddp-backend", "legacy_ddp"] if scale == "paper" else []
    out = args.out
    data_bin = P.dataset_for(dataset, scale, args.data_root).data_bin
    dense_ckpt = os.path.join(out, "dense", "checkpoints", "checkpoint_last.pt")

    def hash_run(htype, E, name=None, group="ablation"):
        flags = model + ["--moe-expert-count", str(E), "--moe-layers", layer, "--hash-type", htype] + ep
        label = f"Hash ({htype})" if group == "ablation" else f"Hash ({htype}, E={E})"
        run = P.Run(name or f"hash_{htype}", label, "hash_lm", dataset, flags, group=group,
                    meta=dict(hash_type=htype, experts=E, router="hash"))
        if htype in ("clustered", "dispersed"):
            table_path = os.path.join(out, run.name, f"{htype}_table.txt")
            run.args += ["--hash-table", table_path]
            run.pre.append(("kmeans", ["python", "-m", "moe_plugin.tools.hash_kmeans", dense_ckpt, "--experts",
                                       str(E), "--type", htype, "--out", table_path, "--dict",
                                       os.path.join(data_bin, "dict.txt")]))
            run.needs.append("dense")
        if htype == "oracle":
            run.evals = []  # fairseq-eval-lm refuses the oracle: validation loss of the train log only
        return run

    runs = [P.Run("dense", "Dense (no MoE)", DENSE_ARCH, dataset, model, group="ablation",
                  meta=dict(router="dense"))]
    runs += [hash_run(h, E1) for h in HASH_TYPES]
    for E in (E1, E2):
        if E != E1:
            runs.append(hash_run("balanced", E, name=f"hash_E{E}", group="experts"))
        runs.append(P.Run(f"switch_E{E}", f"Switch (E={E})", "switch_lm", dataset,
                          model + ["--moe-expert-count", str(E), "--moe-layers", layer] + ep, group="experts",
                          meta=dict(router="switch", experts=E)))
        runs.append(P.Run(f"base_E{E}", f"BASE (E={E})", "base_lm", dataset,
                          model + ["--moe-expert-count", str(E), "--base-layers", "1", "--base-sublayers", "1"] + ep,
                          group="experts", meta=dict(router="base", experts=E)))
    datasets = {dataset: P.dataset_for(dataset, scale, args.data_root)}
    plan = P.Plan(NAME, scale, "Hash layers: hash-function ablation and Hash vs Switch vs BASE "
                  "(Roller et al. 2021)", runs, datasets, hp, launcher,
                  device="cpu" if scale == "tiny" else "gpu", out=args.out)
    plan.notes.append(f"one MoE layer at 0-based decoder layer {layer} of {sz['layers']}; experts E1={E1}, E2={E2}; "
                      "the Hash (balanced) row of the ablation is also the E1 cell of Hash vs Switch vs BASE")
    return plan
