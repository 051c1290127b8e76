#!/usr/bin/env python3
"""make demo: every registered arch against the dense baseline dense_lm on the synthetic corpus.

1. Generates the synthetic corpus (data-prep/synthetic.py; its truth.json holds the exact
   perplexity of the generating source) and binarises it with fairseq-preprocess.
2. Trains the dense baseline ``dense_lm`` (the MoE archs' model without MoE layers, so
   the same embedding, normalisation and final LayerNorm; fairseq's ``transformer_lm``
   builds another model from the same flags: docs/fidelity.md, section dense) and every
   arch registered by a moe_plugin router (switch_lm, gshard_lm, and whatever later
   routers register) with the same shape and the same active FFN compute per token: an
   arch that activates K experts gets experts of hidden size F/K. Fixed number of updates
   on CPU.
3. Evaluates each checkpoint with fairseq-eval-lm on valid and test.
4. Prints and writes results/demo/results.md (and results.json).

Run as ``make demo``; ``python scripts/demo.py --help`` for the knobs.
"""

import argparse
import json
import logging
import os
import re
import shutil
import sys
import time
import warnings

from moe_plugin.tools import commands

ROOT = commands.ROOT


def sh(cmd, log_path=None, echo_prefix=None):
    """Run a command (moe_plugin.tools.commands.run), echoing fairseq's train/valid progress as
    ``PREFIX: train update N nll_loss(bits) L`` when ``echo_prefix`` is given; returns its output."""

    def progress(line):
        if not echo_prefix or not ("| train_inner |" in line or "| valid |" in line):
            return None
        m = re.search(r"num_updates[= ](\d+)", line)
        loss = re.search(r"nll_loss[= ]([\d.]+)", line)
        kind = "valid" if "| valid |" in line else "train"
        return (f"{echo_prefix}: {kind} update {m.group(1) if m else '?'} "
                f"nll_loss(bits) {loss.group(1) if loss else '?'}")

    return commands.run(cmd, log=log_path, echo=progress).stdout


def last_match(pattern, text, group=1, cast=float):
    ms = re.findall(pattern, text)
    return cast(ms[-1]) if ms else None


def quiet_imports():
    """fairseq and fairscale print warnings and INFO lines on import; the demo does not need them."""
    warnings.filterwarnings("ignore")
    logging.disable(logging.INFO)


def main(argv=None):
    quiet_imports()
    from moe_plugin.models.archs import ARCHS, DENSE_ARCH

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "results", "demo"))
    p.add_argument("--data", default=os.path.join(ROOT, "data", "synthetic"))
    p.add_argument("--archs", default="all", help="comma-separated subset, default: dense_lm + every registered arch")
    p.add_argument("--max-update", type=int, default=200)
    p.add_argument("--train-tokens", type=int, default=2_000_000)
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--ffn-dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--tokens-per-sample", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    py = sys.executable
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()

    # 1. corpus ------------------------------------------------------------------------
    data_bin = os.path.join(args.data, "data-bin")
    if not os.path.exists(os.path.join(data_bin, "dict.txt")):
        print(f"[demo] generating the synthetic corpus in {args.data}", flush=True)
        sh([py, "data-prep/synthetic.py", "--out", args.data, "--seed", str(args.seed),
            "--train-tokens", str(args.train_tokens)])
        sh([py, "-m", "fairseq_cli.preprocess", "--only-source", "--trainpref", f"{args.data}/train.txt",
            "--validpref", f"{args.data}/valid.txt", "--testpref", f"{args.data}/test.txt",
            "--destdir", data_bin, "--workers", "2"], os.path.join(args.out, "preprocess.log"))
    truth = json.load(open(os.path.join(args.data, "truth.json")))

    # 2. train + 3. evaluate --------------------------------------------------------------
    archs = [DENSE_ARCH] + sorted(ARCHS) if args.archs == "all" else args.archs.split(",")
    common = [
        data_bin, "--task", "language_modeling", "--user-dir", os.path.join(ROOT, "moe_plugin"),
        "--cpu", "--criterion", "moe_cross_entropy", "--seed", str(args.seed),
        "--decoder-layers", str(args.layers), "--decoder-embed-dim", str(args.embed_dim),
        "--decoder-ffn-embed-dim", str(args.ffn_dim), "--decoder-attention-heads", "4",
        # the moe_lm archs' defaults, spelled out so that fairseq's transformer_lm (--archs) matches
        "--decoder-input-dim", str(args.embed_dim), "--decoder-output-dim", str(args.embed_dim),
        "--share-decoder-input-output-embed", "--decoder-normalize-before", "--dropout", "0.0",
        "--tokens-per-sample", str(args.tokens_per_sample), "--max-tokens", str(args.max_tokens),
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", str(args.lr),
        "--lr-scheduler", "inverse_sqrt", "--warmup-updates", str(max(args.max_update // 10, 1)),
        "--clip-norm", "1.0", "--max-update", str(args.max_update), "--log-format", "simple",
        "--log-interval", str(max(args.max_update // 6, 1)), "--validate-interval-updates", "0",
        "--no-epoch-checkpoints", "--disable-validation",
    ]
    rows, failed = [], []
    for arch in archs:
        t0 = time.time()
        try:
            rows.append(run_arch(arch, args, py, data_bin, common, truth))
        except Exception as e:  # keep going: one broken arch should not hide the others
            print(f"[demo] {arch}: FAILED ({e})", flush=True)
            failed.append(arch)
            continue
        r = rows[-1]
        print(f"[demo] {arch}: valid ppl {r['valid_ppl']:.2f}, test ppl {r['test_ppl']:.2f} "
              f"(true source {truth['valid']['perplexity']:.2f}/{truth['test']['perplexity']:.2f}) "
              f"[{time.time() - t0:.0f}s]", flush=True)

    # 4. report ---------------------------------------------------------------------------
    md = render(rows, truth, args, time.time() - t_start)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"rows": rows, "truth": truth}, f, indent=2)
    print(md)
    print(f"[demo] wrote {os.path.join(args.out, 'results.md')}")
    if failed:
        raise SystemExit(f"[demo] these archs failed (logs in {args.out}): {', '.join(failed)}")


def run_arch(arch, args, py, data_bin, common, truth):
    """Train one arch from scratch, evaluate it on valid and test; return its results row."""
    from moe_plugin.models.archs import ARCHS, DEMO_ARGS

    t0 = time.time()
    save = os.path.join(args.out, "checkpoints", arch)
    shutil.rmtree(save, ignore_errors=True)  # fairseq would resume from an old checkpoint_last
    extra = []
    if arch in ARCHS:
        k = int(ARCHS[arch][1].get("moe_top_k", 1))
        extra = ["--moe-expert-count", str(args.experts), "--moe-expert-ffn-dim", str(max(args.ffn_dim // k, 1))]
        # demo_args may name the run's length, e.g. a top-K schedule over "{max_update}" updates
        extra += [a.format(max_update=args.max_update) for a in DEMO_ARGS.get(arch, [])]
    print(f"[demo] {arch}: training {args.max_update} updates", flush=True)
    log = sh([py, "-m", "fairseq_cli.train", *common, "--arch", arch, "--save-dir", save, *extra],
             os.path.join(args.out, f"train_{arch}.log"), echo_prefix=arch)
    train_line = [l for l in log.splitlines() if "| train |" in l][-1]
    row = {
        "arch": arch,
        "wps": last_match(r"\| wps ([\d.]+)", train_line),
        "load_max": last_match(r"\| moe_load_max ([\d.]+)", train_line),
        "dropped": last_match(r"\| moe_dropped ([\d.]+)", train_line),
    }
    ckpt = os.path.join(save, "checkpoint_last.pt")
    for split in ("valid", "test"):
        out = sh([py, "-m", "fairseq_cli.eval_lm", data_bin, "--user-dir", os.path.join(ROOT, "moe_plugin"),
                  "--path", ckpt, "--cpu", "--gen-subset", split, "--tokens-per-sample", str(args.tokens_per_sample),
                  "--context-window", str(args.tokens_per_sample // 2), "--max-tokens", str(args.max_tokens)],
                 os.path.join(args.out, f"eval_{arch}_{split}.log"))
        row[f"{split}_ppl"] = last_match(r"Perplexity: ([\d.]+)", out)
    row.update(count_params(ckpt))
    row["seconds"] = round(time.time() - t0, 1)
    return row


def count_params(ckpt):
    import torch  # noqa: F401
    from fairseq import checkpoint_utils

    import moe_plugin  # noqa: F401  (registers the archs)
    from moe_plugin.utils import param_counts

    models, _ = checkpoint_utils.load_model_ensemble([ckpt])
    total, active = param_counts(models[0].eval())  # eval: the K the evaluation uses
    return {"params": total, "active_params": active}


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def render(rows, truth, args, seconds):
    tv, tt = truth["valid"]["perplexity"], truth["test"]["perplexity"]
    lines = [
        "# moe_plugin demo: synthetic corpus",
        "",
        f"{args.layers} layers, d={args.embed_dim}, FFN {args.ffn_dim}, {args.experts} experts in every 2nd layer "
        f"(experts of size FFN/K), {args.max_update} updates of {args.max_tokens} tokens on CPU. "
        f"True-source perplexity (the floor): valid {tv:.3f}, test {tt:.3f}. Total time {seconds / 60:.1f} min.",
        "",
        "| arch | params | active params | valid ppl | test ppl | true ppl (valid/test) | train words/s | load max/mean | % dropped |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['arch']} | {r['params']:,} | {r['active_params']:,} | {fmt(r['valid_ppl'], '.3f')} | "
            f"{fmt(r['test_ppl'], '.3f')} | {tv:.3f} / {tt:.3f} | {fmt(r['wps'], '.0f')} | "
            f"{fmt(r['load_max'], '.3f')} | {fmt(r['dropped'], '.2f')} |"
        )
    lines += ["", "Perplexities from fairseq-eval-lm (context window "
              f"{args.tokens_per_sample // 2}); words/s and load from the fairseq-train log (train average).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
