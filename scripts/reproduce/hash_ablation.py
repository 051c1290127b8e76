#!/usr/bin/env python3
"""Hash layers (Roller et al., NeurIPS 2021): the hash-function ablation and Hash vs Switch vs BASE.

Part 1, the ablation: one Hash layer (hash_lm's default place, 0-based layer
floor(7 L / 11), the authors' layer 7 of 11) with E1 experts and every hash function of the
paper: balanced, random, clustered and dispersed (k-means over the input embeddings of a
dense baseline trained first, ``scripts/hash_kmeans_table.py``), position, bigram,
previous token, and the oracle future token (a cheating diagnostic: fairseq-eval-lm
refuses it, so its row shows the validation perplexity of the training log only).

Part 2: Hash (balanced) against Switch (the same single MoE layer) and BASE (one BASE
layer) at two expert counts E1 < E2 (the paper: 64 and 128).

Scales: ``paper`` = d=1024, 11 layers, 16 heads, FFN 4096, E 64 / 128, 32 GPUs (4 nodes x
8, Slurm, expert parallel), WikiText-103 (the paper's pushshift.io Reddit is not public in
that form; the paper notes Hash lost to Switch on WikiText-103's 267K vocabulary);
``mini`` = one GPU, d=512, 6 layers, E 16 / 32, WikiText-103; ``tiny`` = CPU, d=64,
4 layers, E 8 / 16, the synthetic corpus. Paper numbers (unverified transcription):
moe_plugin/tools/report.py. Differences: docs/reproduction.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from moe_plugin.experiments import runner as R  # noqa: E402

SCRIPT = "hash_ablation"
HASH_TYPES = ("balanced", "random", "clustered", "dispersed", "position", "bigram", "previous", "oracle")

SIZES = {
    "paper": dict(d=1024, layers=11, heads=16, ffn=4096, experts=(64, 128)),
    "mini": dict(d=512, layers=6, heads=8, ffn=2048, experts=(16, 32)),
    "tiny": dict(d=64, layers=4, heads=4, ffn=256, experts=(8, 16)),
}


def hash_layer(layers: int) -> int:
    """hash_lm's default MoE layer (moe_plugin/routing/hashed.py): floor(7 L / 11)."""
    return (7 * layers) // 11


def build_plan(scale, args):
    sz = SIZES[scale]
    if scale == "paper":
        hp = R.hp_for(scale, args, tokens_per_sample=512, max_tokens=4096, update_freq=1, lr=5e-4, warmup=4000,
                      updates=50000, validate_every=2500, save_every=25000)
        dataset, adaptive = "wikitext-103", R.WT103_ADAPTIVE
        launcher = R.launcher_for(scale, nodes=4, gpus_per_node=8)
    elif scale == "mini":
        hp = R.hp_for(scale, args, updates=2000, validate_every=250, save_every=1000)
        dataset, adaptive = "wikitext-103", R.WT103_ADAPTIVE
        launcher = R.launcher_for(scale)
    else:
        hp = R.hp_for(scale, args, updates=120, warmup=12, validate_every=20, save_every=60)
        dataset, adaptive = "synthetic", None
        launcher = R.launcher_for(scale)
    E1, E2 = sz["experts"]
    layer = str(hash_layer(sz["layers"]))
    # adaptive softmax but a plain input embedding: the k-means tables cluster its rows
    model = R.model_flags(sz["d"], sz["layers"], sz["heads"], sz["ffn"], adaptive, adaptive_input=False)
    ep = ["--moe-expert-parallel", "--ddp-backend", "legacy_ddp"] if scale == "paper" else []
    out = args.out
    data_bin = R.dataset_for(dataset, scale, args.data_root).data_bin
    dense_ckpt = os.path.join(out, "dense", "checkpoints", "checkpoint_last.pt")

    def hash_run(htype, E, name=None, group="ablation"):
        flags = model + ["--moe-expert-count", str(E), "--moe-layers", layer, "--hash-type", htype] + ep
        label = f"Hash ({htype})" if group == "ablation" else f"Hash ({htype}, E={E})"
        run = R.Run(name or f"hash_{htype}", label, "hash_lm", dataset, flags, group=group,
                    meta=dict(hash_type=htype, experts=E, router="hash"))
        if htype in ("clustered", "dispersed"):
            table = os.path.join(out, run.name, f"{htype}_table.txt")
            run.args += ["--hash-table", table]
            run.pre.append(("kmeans", ["python", "scripts/hash_kmeans_table.py", dense_ckpt, "--experts", str(E),
                                       "--type", htype, "--out", table, "--dict",
                                       os.path.join(data_bin, "dict.txt")]))
            run.needs.append("dense")
        if htype == "oracle":
            run.evals = []  # fairseq-eval-lm refuses the oracle: validation loss of the train log only
        return run

    runs = [R.Run("dense", "Dense (no MoE)", R.DENSE_ARCH, dataset, model, group="ablation",
                  meta=dict(router="dense"))]
    runs += [hash_run(h, E1) for h in HASH_TYPES]
    for E in (E1, E2):
        if E != E1:
            runs.append(hash_run("balanced", E, name=f"hash_E{E}", group="experts"))
        runs.append(R.Run(f"switch_E{E}", f"Switch (E={E})", "switch_lm", dataset,
                          model + ["--moe-expert-count", str(E), "--moe-layers", layer] + ep, group="experts",
                          meta=dict(router="switch", experts=E)))
        runs.append(R.Run(f"base_E{E}", f"BASE (E={E})", "base_lm", dataset,
                          model + ["--moe-expert-count", str(E), "--base-layers", "1", "--base-sublayers", "1"] + ep,
                          group="experts", meta=dict(router="base", experts=E)))
    datasets = {dataset: R.dataset_for(dataset, scale, args.data_root)}
    plan = R.Plan(SCRIPT, scale, "Hash layers: hash-function ablation and Hash vs Switch vs BASE "
                  "(Roller et al. 2021)", runs, datasets, hp, launcher,
                  device="cpu" if scale == "tiny" else "gpu", out=args.out)
    plan.notes.append(f"one MoE layer at 0-based decoder layer {layer} of {sz['layers']}; experts E1={E1}, E2={E2}; "
                      "the Hash (balanced) row of the ablation is also the E1 cell of Hash vs Switch vs BASE")
    return plan


def main(argv=None):
    return R.main(SCRIPT, build_plan, __doc__, argv)


if __name__ == "__main__":
    main()
