#!/usr/bin/env python3
"""SAM (sam_lm) with K = 1, 2, 4 against switch_lm and gshard_lm on the synthetic corpus.

Equal budget: every run has the same Transformer, the same number of updates of the same
batch, the same E experts in the same layers, and the same active FFN compute per token
(an arch that activates K experts gets experts of hidden size F/K, as ``make demo`` does).
Steps:
1. data-prep/synthetic.py (small corpus, ``--train-tokens``) + fairseq-preprocess;
2. fairseq-train for each run, one after the other, each with OMP_NUM_THREADS=1 (its
   words/s depends on what else the machine runs meanwhile);
3. fairseq-eval-lm on the valid set;
4. an interleaved fwd+bwd benchmark of one MoE layer per run in one process (ratios to
   Switch measured side by side, so they survive a busy machine);
5. a Markdown table (stdout and ``--out``/results.md, plus results.json).

Run: ``python scripts/compare_sam.py`` (9 to 11 minutes on a shared 2-core CPU container;
``--with-hetu`` adds a K = 2 run with Hetu's SAM-gate formulation);
``--bench-only --embed-dim 256 --ffn-dim 1024 --max-tokens 4096`` runs only the layer benchmark.
"""

import argparse
import json
import os
import re
import shutil
import sys
import time

from moe_plugin.tools.commands import ROOT
from moe_plugin.tools.commands import run as run_command

#: (label, arch, K, extra fairseq-train flags)
RUNS = [
    ("switch_lm (top-1)", "switch_lm", 1, []),
    ("gshard_lm (top-2)", "gshard_lm", 2, []),
    ("sam_lm K=1", "sam_lm", 1, ["--moe-top-k", "1"]),
    ("sam_lm K=2", "sam_lm", 2, ["--moe-top-k", "2"]),
    ("sam_lm K=4", "sam_lm", 4, ["--moe-top-k", "4"]),
]


#: Hetu's SAM gate formulation (docs/sam.md): its losses, their weights (1, and no group
#: loss), router bias, init and capacity rounding; capacity factors stay the common ones so
#: that only the formulation differs from "sam_lm K=2". Opt-in: --with-hetu.
HETU_FLAGS = ["--sam-expert-balance", "global", "--sam-balance-slots", "all", "--sam-align-reduction", "sum",
              "--sam-align-detach-kth", "--sam-router-bias", "--moe-router-init", "xavier",
              "--sam-capacity-rounding", "per_slot", "--moe-loss-weights", "balance_group=0,balance_expert=1,align=1"]
HETU_RUN = ("sam_lm K=2 Hetu formulation", "sam_lm", 2, ["--moe-top-k", "2", *HETU_FLAGS])


def run(cmd, log_path):
    """One command with one thread (moe_plugin.tools.commands.run); returns its output."""
    return run_command(cmd, log=log_path, env={"OMP_NUM_THREADS": "1"}).stdout


def metric(line, name):
    m = re.search(rf"\| {name} ([-\d.]+)", line)
    return float(m.group(1)) if m else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "results", "compare_sam"))
    p.add_argument("--train-tokens", type=int, default=300_000)
    p.add_argument("--vocab-size", type=int, default=200)
    p.add_argument("--domains", type=int, default=4)
    p.add_argument("--domain-vocab", type=int, default=40)
    p.add_argument("--shared-vocab", type=int, default=10)
    p.add_argument("--max-update", type=int, default=300)
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--tokens-per-sample", type=int, default=64)
    p.add_argument("--embed-dim", type=int, default=64)
    p.add_argument("--ffn-dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--sam-groups", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--bench-rounds", type=int, default=30, help="rounds of the interleaved MoE-layer benchmark (0 = skip)")
    p.add_argument("--bench-only", action="store_true",
                   help="only the interleaved MoE-layer benchmark at the given sizes (e.g. --embed-dim 256 "
                   "--ffn-dim 1024 --max-tokens 4096); prints ms and the ratio to switch")
    p.add_argument("--runs", default="all", help="comma-separated labels' archs+K, e.g. 'sam_lm K=2' (default all)")
    p.add_argument("--with-hetu", action="store_true",
                   help="add a SAM K=2 run with Hetu's SAM-gate formulation (losses, weights, bias, init, capacity "
                   "rounding; docs/sam.md), about 2 more minutes")
    args = p.parse_args(argv)
    py = sys.executable
    if args.bench_only:
        bench = layer_bench(args, max(args.bench_rounds, 2))
        base = bench[RUNS[0][0]]
        print(f"MoE layer fwd+bwd, T={args.max_tokens} D={args.embed_dim} F={args.ffn_dim}/K E={args.experts} "
              f"G={args.sam_groups}, median of {args.bench_rounds} interleaved rounds, 1 thread:")
        for label, v in bench.items():
            print(f"  {label:20s} {1000 * v:8.1f} ms  {v / base:.2f}x switch")
        return
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()

    data = os.path.join(args.out, "data")
    data_bin = os.path.join(data, "data-bin")
    if not os.path.exists(os.path.join(data_bin, "dict.txt")):
        run([py, "data-prep/synthetic.py", "--out", data, "--seed", str(args.seed),
             "--train-tokens", str(args.train_tokens), "--valid-tokens", "20000", "--test-tokens", "20000",
             "--vocab-size", str(args.vocab_size), "--domains", str(args.domains),
             "--domain-vocab", str(args.domain_vocab), "--shared-vocab", str(args.shared_vocab)],
            os.path.join(args.out, "synthetic.log"))
        run([py, "-m", "fairseq_cli.preprocess", "--only-source", "--trainpref", f"{data}/train.txt",
             "--validpref", f"{data}/valid.txt", "--testpref", f"{data}/test.txt", "--destdir", data_bin,
             "--workers", "1"], os.path.join(args.out, "preprocess.log"))
    truth = json.load(open(os.path.join(data, "truth.json")))

    common = [
        data_bin, "--task", "language_modeling", "--user-dir", os.path.join(ROOT, "moe_plugin"), "--cpu",
        "--criterion", "moe_cross_entropy", "--seed", str(args.seed), "--num-workers", "0",
        "--decoder-layers", str(args.layers), "--decoder-embed-dim", str(args.embed_dim),
        "--decoder-ffn-embed-dim", str(args.ffn_dim), "--decoder-attention-heads", "4",
        "--decoder-input-dim", str(args.embed_dim), "--decoder-output-dim", str(args.embed_dim),
        "--share-decoder-input-output-embed", "--dropout", str(args.dropout),
        "--tokens-per-sample", str(args.tokens_per_sample), "--max-tokens", str(args.max_tokens),
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", str(args.lr),
        "--lr-scheduler", "inverse_sqrt", "--warmup-updates", str(max(args.max_update // 10, 1)),
        "--clip-norm", "1.0", "--max-update", str(args.max_update), "--log-format", "simple",
        "--log-interval", str(max(args.max_update // 4, 1)), "--disable-validation", "--no-epoch-checkpoints",
        "--moe-expert-count", str(args.experts),
    ]
    wanted = None if args.runs == "all" else set(s.strip() for s in args.runs.split(","))
    rows = []
    for label, arch, k, extra in RUNS + ([HETU_RUN] if args.with_hetu else []):
        if wanted is not None and label not in wanted and arch not in wanted:
            continue
        t0 = time.time()
        save = os.path.join(args.out, "checkpoints", re.sub(r"\W+", "_", label))
        flags = ["--arch", arch, "--save-dir", save, "--moe-expert-ffn-dim", str(max(args.ffn_dim // k, 1)), *extra]
        if arch == "sam_lm":
            flags += ["--sam-groups", str(args.sam_groups)]
        shutil.rmtree(save, ignore_errors=True)  # never resume an older run's checkpoint
        print(f"[compare_sam] {label}: training {args.max_update} updates", flush=True)
        log = run([py, "-m", "fairseq_cli.train", *common, *flags], os.path.join(args.out, f"train_{os.path.basename(save)}.log"))
        line = [l for l in log.splitlines() if "| train |" in l][-1]
        row = {"label": label, "arch": arch, "K": k, "flags": " ".join(flags[4:]),
               "wps": metric(line, "wps"), "dropped": metric(line, "moe_dropped"),
               "load_max": metric(line, "moe_load_max")}
        # SAM's own metrics of the last MoE layer (decoder layer L-1 with --moe-freq 2)
        last = args.layers - 1
        for name in ("topk_in_group", "xdev_frac", "topk_xdev_frac", "group_load_max"):
            row[name] = metric(line, f"moe_l{last}_{name}")
        ev = run([py, "-m", "fairseq_cli.eval_lm", data_bin, "--user-dir", os.path.join(ROOT, "moe_plugin"),
                  "--path", os.path.join(save, "checkpoint_last.pt"), "--cpu", "--gen-subset", "valid",
                  "--tokens-per-sample", str(args.tokens_per_sample), "--context-window", str(args.tokens_per_sample // 2),
                  "--max-tokens", "4096"], os.path.join(args.out, f"eval_{os.path.basename(save)}.log"))
        ppl = re.findall(r"Perplexity: ([\d.]+)", ev)
        row["valid_ppl"] = float(ppl[-1]) if ppl else None
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        print(f"[compare_sam] {label}: valid ppl {row['valid_ppl']}, train wps {row['wps']} [{row['seconds']}s]", flush=True)

    if args.bench_rounds > 0:
        bench = layer_bench(args, args.bench_rounds)
        for r in rows:  # the Hetu run has the K=2 layer's cost: not benchmarked separately
            r["layer_ms"] = 1000 * bench[r["label"]] if r["label"] in bench else None
    args.load_average = os.getloadavg()  # the machine is shared: say how busy it was
    md = render(rows, truth, args, time.time() - t_start)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "rows": rows, "truth": truth}, f, indent=2)
    print(md)


def layer_bench(args, rounds: int):
    """Median fwd+bwd seconds of one MoE layer per run (same D, E, F/K, T), interleaved
    round-robin in this process so a busy shared machine slows every run alike."""
    import dataclasses
    import statistics

    import torch

    from moe_plugin import config
    from moe_plugin.moe_layer import build_moe_layer
    from moe_plugin.models.archs import ARCHS

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    T, D = args.max_tokens, args.embed_dim
    layers = {}
    for label, arch, k, _ in RUNS:
        router = {"switch_lm": "switch", "gshard_lm": "gshard", "sam_lm": "sam"}[arch]
        extra = {"moe_top_k": k, "sam_groups": args.sam_groups} if router == "sam" else {}
        # the arch's defaults (as --arch gives them), then this run's sizes
        known = {f.name for f in dataclasses.fields(config.MoEConfig)}
        values = {k_: v for k_, v in ARCHS[arch][1].items() if k_ in known}
        values.update(moe_router=router, moe_expert_count=args.experts, moe_expert_ffn_dim=max(args.ffn_dim // k, 1),
                      **extra)
        cfg = config.MoEConfig(**values)
        config.validate(cfg)
        layers[label] = build_moe_layer(cfg, D, args.ffn_dim).train()
    x = torch.randn(T, D, requires_grad=True)
    times = {label: [] for label in layers}
    for _ in range(rounds):
        for label, layer in layers.items():
            t0 = time.perf_counter()
            layer(x).sum().backward()
            times[label].append(time.perf_counter() - t0)
    return {label: statistics.median(v[1:]) for label, v in times.items()}


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def render(rows, truth, args, seconds):
    base = next((r["wps"] for r in rows if r["arch"] == "switch_lm" and r["wps"]), None)
    base_ms = next((r.get("layer_ms") for r in rows if r["arch"] == "switch_lm"), None)
    lines = [
        f"{args.layers} layers, d={args.embed_dim}, FFN {args.ffn_dim}, {args.experts} experts in every 2nd layer "
        f"(expert hidden size {args.ffn_dim}/K), SAM groups G={args.sam_groups}; {args.max_update} updates of "
        f"{args.max_tokens} tokens, seed {args.seed}, OMP_NUM_THREADS=1. Synthetic corpus of "
        f"{args.train_tokens:,} training tokens (vocabulary {args.vocab_size}, {args.domains} domains of "
        f"{args.domain_vocab} words, {args.shared_vocab} shared); true-source valid perplexity {truth['valid']['perplexity']:.3f}. "
        f"Total {seconds / 60:.1f} min; load average at the end {args.load_average[0]:.1f} (1 min) / "
        f"{args.load_average[2]:.1f} (15 min) on {os.cpu_count()} cores.",
        "",
        "| run | valid ppl | train words/s | vs switch | MoE layer fwd+bwd ms (vs switch) | % dropped | load max/mean | topk in group | xdev/token (SAM) | xdev/token (plain top-K) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = r["wps"] / base if base and r["wps"] else None
        ms = r.get("layer_ms")
        bench = f"{ms:.1f} ({ms / base_ms:.2f})" if ms and base_ms else "-"
        lines.append(
            f"| {r['label']} | {fmt(r['valid_ppl'], '.3f')} | {fmt(r['wps'], '.0f')} | {fmt(ratio, '.2f')} | {bench} | "
            f"{fmt(r['dropped'], '.2f')} | {fmt(r['load_max'], '.3f')} | {fmt(r['topk_in_group'], '.3f')} | "
            f"{fmt(r['xdev_frac'], '.3f')} | {fmt(r['topk_xdev_frac'], '.3f')} |"
        )
    lines += ["", "valid ppl: fairseq-eval-lm on the valid split (context window tokens-per-sample/2); train words/s, "
              "% dropped, load and the SAM metrics (last MoE layer): the fairseq-train log's epoch average; "
              "MoE layer ms: median of an interleaved fwd+bwd benchmark of one layer on "
              f"{args.max_tokens} tokens in one process (robust to the shared machine's load).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
