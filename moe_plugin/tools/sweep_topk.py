"""Perplexity against the number of experts per token K at inference (HyperRouter, Do et al.
2023, the inference-efficiency figure): evaluate checkpoints with fairseq-eval-lm at several K.

For every checkpoint and every K in ``--ks`` (default 1,2,4,8,16) with K <= its expert
count, runs fairseq-eval-lm with ``--model-overrides "{'moe_eval_top_k': K}"`` (the routers
of ``hyper_lm``, ``smoe_dropout_lm`` and ``smoe_lm`` read it; see moe_plugin/routing/_topk.py). A
checkpoint whose router has no evaluation K (dense ``transformer_lm``, ``switch_lm``, ...)
is evaluated once and drawn as a horizontal reference line.

By default fairseq-eval-lm's own ``main`` runs in this process (the same code as the
command, without paying its start-up once per K); ``--subprocess`` runs the command itself.

Writes ``OUT/topk_sweep.md`` (table), ``OUT/topk_sweep.png`` (plot) and ``OUT/topk_sweep.json``.

    python -m moe_plugin.tools.sweep_topk DATA_BIN hyper=ckpts/hyper/checkpoint_last.pt \\
        smoe=ckpts/smoe/checkpoint_last.pt --out results/topk_sweep --gen-subset test \\
        -- --tokens-per-sample 128 --context-window 64

Arguments after ``--`` go to fairseq-eval-lm unchanged.
"""

import argparse
import json
import logging
import os
import re
import sys

from moe_plugin.tools import commands

ROOT = commands.ROOT
USER_DIR = os.path.join(ROOT, "moe_plugin")
DEFAULT_KS = "1,2,4,8,16"


def checkpoint_info(path):
    """Router, expert count and training K of a fairseq checkpoint, without building it."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=False)
    model_cfg = state["cfg"]["model"] if state.get("cfg") is not None else vars(state["args"])
    get = (lambda k, d=None: model_cfg.get(k, d)) if hasattr(model_cfg, "get") else (
        lambda k, d=None: getattr(model_cfg, k, d))
    hist = state.get("optimizer_history") or [{}]
    info = {
        "arch": get("arch") or get("_name"),
        "router": get("moe_router"),
        "experts": get("moe_expert_count"),
        "num_updates": hist[-1].get("num_updates"),
        "train_top_k": None,
        "eval_top_k": get("moe_eval_top_k"),
    }
    from moe_plugin.routing import ROUTER_REGISTRY
    from moe_plugin.routing._topk import TopKSoftmaxRouter, scheduled_top_k, top_k_range

    cls = ROUTER_REGISTRY.get(info["router"]) if info["router"] else None
    info["has_eval_k"] = bool(cls is not None and issubclass(cls, TopKSoftmaxRouter) and info["experts"])
    if info["has_eval_k"]:
        sched = get("moe_top_k_schedule", "none")
        if sched == "none":
            info["train_top_k"] = get("moe_top_k")
        else:
            # the routers' update-count buffer: the count of the last training forward
            counts = [int(v) for k, v in state["model"].items() if k.endswith("router.num_updates")]
            n = counts[0] if counts else max((info["num_updates"] or 0) - 1, 0)
            k_min, k_max = top_k_range(get("moe_top_k_min", 0), get("moe_top_k_max", 0), info["experts"])
            info["train_top_k"] = scheduled_top_k(sched, k_min, k_max, get("moe_top_k_schedule_updates"), n)
    return info


def eval_args(data, ckpt, k, extra, cpu):
    args = [data, "--user-dir", USER_DIR, "--path", ckpt]
    if cpu:
        args.append("--cpu")
    if k is not None:
        args += ["--model-overrides", repr({"moe_eval_top_k": k})]
    return args + list(extra)


def run_eval(data, ckpt, k, extra, cpu, use_subprocess):
    """-> (loss in bits, perplexity) from fairseq-eval-lm."""
    args = eval_args(data, ckpt, k, extra, cpu)
    if use_subprocess:
        proc = commands.run([sys.executable, "-m", "fairseq_cli.eval_lm", *args], cwd=os.getcwd(), check=False)
        out = proc.stdout
        m = re.findall(r"Loss \(base 2\): ([\d.]+), Perplexity: ([\d.]+)", out)
        if proc.returncode != 0 or not m:
            raise SystemExit(f"fairseq-eval-lm failed on {ckpt} (K={k}):\n{out[-3000:]}")
        return float(m[-1][0]), float(m[-1][1])
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli import eval_lm

    parser = options.get_eval_lm_parser()
    ns = options.parse_args_and_arch(parser, input_args=args)
    res = eval_lm.main(convert_namespace_to_omegaconf(ns))
    # fairseq's hydra set-up leaves the root logger at DEBUG; keep the rest of the run quiet
    logging.getLogger().setLevel(logging.INFO)
    return float(res["loss"]), float(res["perplexity"])


def parse_checkpoints(specs):
    out = []
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep:
            path = spec
            label = os.path.basename(os.path.dirname(os.path.abspath(spec))) or spec
        if not os.path.isfile(path):
            raise SystemExit(f"checkpoint not found: {path}")
        out.append((label, path))
    return out


def render_table(rows, ks):
    lines = [
        "| checkpoint | arch | E | train K | " + " | ".join(f"K={k}" for k in ks) + " |",
        "|---|---|---:|---:|" + "---:|" * len(ks),
    ]
    for r in rows:
        cells = []
        for k in ks:
            if not r["has_eval_k"]:
                cells.append(f"{r['fixed_ppl']:.3f}")
            elif str(k) in r["ppl"]:
                cells.append(f"{r['ppl'][str(k)]:.3f}")
            else:
                cells.append("-")
        tk = r["train_top_k"] if r["train_top_k"] is not None else "fixed"
        lines.append(f"| {r['label']} | {r['arch']} | {r['experts'] or '-'} | {tk} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows, ks, path, title):
    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if r["has_eval_k"]:
            xs = [k for k in ks if str(k) in r["ppl"]]
            ax.plot(xs, [r["ppl"][str(k)] for k in xs], marker="o", label=r["label"])
        else:
            ax.axhline(r["fixed_ppl"], linestyle="--", color="gray", label=f"{r['label']} (fixed routing)")
    ax.set_xscale("log", base=2)
    top = max([r["experts"] or 0 for r in rows if r["has_eval_k"]] or [max(ks)])
    shown = [k for k in ks if k <= top] or ks
    ax.set_xticks(shown)
    ax.set_xticklabels([str(k) for k in shown])
    ax.set_xlabel("experts per token at inference (K)")
    ax.set_ylabel("perplexity")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="fairseq data-bin directory")
    p.add_argument("checkpoints", nargs="*", help="checkpoint paths, optionally LABEL=PATH")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--ks", default=DEFAULT_KS, help=f"comma-separated K values (default {DEFAULT_KS}); those > E are skipped")
    p.add_argument("--gen-subset", default="test")
    p.add_argument("--no-cpu", action="store_true", help="do not pass --cpu (evaluate on GPU)")
    p.add_argument("--subprocess", action="store_true", help="run the fairseq-eval-lm command per K")
    p.add_argument("--title", default="Perplexity vs experts per token at inference")
    p.add_argument("--from-json", help="re-render the table and plot of an earlier run's topk_sweep.json (no evaluation)")
    args = p.parse_args(argv)
    if not args.checkpoints and not args.from_json:
        p.error("give at least one checkpoint (or --from-json)")
    try:
        ks = sorted({int(k) for k in args.ks.split(",") if k.strip()})
    except ValueError:
        raise SystemExit(f"--ks: {args.ks!r} is not a comma-separated list of integers") from None
    if not ks or ks[0] < 1:
        raise SystemExit(f"--ks: {args.ks!r}: every K must be >= 1")
    os.makedirs(args.out, exist_ok=True)
    extra = ["--gen-subset", args.gen_subset, *extra]
    rows = []
    if args.from_json:
        with open(args.from_json) as f:
            rows = json.load(f)["rows"]
    for label, ckpt in parse_checkpoints(args.checkpoints):
        info = checkpoint_info(ckpt)
        row = dict(label=label, checkpoint=ckpt, **info, ppl={}, loss={}, fixed_ppl=None)
        if info["has_eval_k"]:
            for k in ks:
                if k > info["experts"]:
                    continue
                loss, ppl = run_eval(args.data, ckpt, k, extra, not args.no_cpu, args.subprocess)
                row["ppl"][str(k)], row["loss"][str(k)] = ppl, loss
                print(f"[sweep] {label}: K={k} loss(bits) {loss:.4f} ppl {ppl:.3f}", flush=True)
        else:
            loss, ppl = run_eval(args.data, ckpt, None, extra, not args.no_cpu, args.subprocess)
            row["fixed_ppl"], row["fixed_loss"] = ppl, loss
            print(f"[sweep] {label}: fixed routing ppl {ppl:.3f}", flush=True)
        rows.append(row)

    table = render_table(rows, ks)
    cmd = ("fairseq-eval-lm DATA --user-dir moe_plugin --path CKPT --gen-subset "
           f"{args.gen_subset} --model-overrides \"{{'moe_eval_top_k': K}}\" {' '.join(extra[2:])}").rstrip()
    md = "\n".join([
        f"# {args.title}", "",
        f"Perplexity on `{args.gen_subset}` of `{args.data}` from `{cmd}`; '-' = K larger than the "
        "expert count; 'train K' = the K of the last training update (what `moe_eval_top_k` 0 uses).", "",
        table, "",
    ])
    with open(os.path.join(args.out, "topk_sweep.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "topk_sweep.json"), "w") as f:
        json.dump({"ks": ks, "rows": rows}, f, indent=2)
    plot(rows, ks, os.path.join(args.out, "topk_sweep.png"), args.title)
    print(md)
    print(f"[sweep] wrote {args.out}/topk_sweep.md, topk_sweep.png, topk_sweep.json")
    return rows


if __name__ == "__main__":
    main()
