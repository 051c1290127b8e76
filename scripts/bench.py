#!/usr/bin/env python3
"""Benchmarks: every number is a ratio to a baseline measured in the same run.

  layer       forward+backward time of each router's MoE layer over the dense FFN of one
              expert's size (D -> F -> D) on the same tokens: the physical limit of a top-1
              layer is 1.0x, of a top-K layer K.0x. Also activation memory (bytes saved for
              backward; on CUDA the peak allocated memory) over the dense FFN's.
  assignment  BASE's balanced assignment vs fairseq.libbase and scipy (scripts/bench_assignment.py).
  base-vs-fairseq  BASE layers end to end: moe_plugin's base_lm (--moe-expert-parallel) vs fairseq's
              own transformer_lm --base-layers 1, train words/s and valid loss of the same model on 2
              gloo CPU ranks, runs interleaved (scripts/bench_base_vs_fairseq.py; its defaults).
  e2e         fairseq-train words/s of each MoE arch over the dense baseline dense_lm (the same
              model without MoE layers) of the same shape and active compute (experts of size
              F/K), fixed updates, synthetic corpus.

Output: JSON lines (one per measurement) on stdout or --jsonl FILE, and a markdown summary
(--markdown FILE, also printed at the end). ``make bench`` runs the CPU default.

  python scripts/bench.py --suite layer --T 2048,8192 --E 8,16,64
  python scripts/bench.py --suite layer --device cuda --dtype bf16 --D 1024 --F 4096
"""

import argparse
import contextlib
import json
import logging
import os
import platform
import re
import statistics
import sys
import time
import warnings

import torch
import torch.nn as nn

from moe_plugin.tools import commands

ROOT = commands.ROOT
warnings.filterwarnings("ignore")
logging.disable(logging.INFO)


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} threads (torch {torch.__version__})"


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_against(fn, base_fn, device, reps, warmup=2):
    """Median times of ``fn`` and ``base_fn``, run alternately: a shared machine's slow
    spells then fall on both, and their ratio is steadier than two separate medians."""
    for _ in range(warmup):
        base_fn()
        fn()
    t_fn, t_base = [], []
    for _ in range(reps):
        for f, out in ((base_fn, t_base), (fn, t_fn)):
            sync(device)
            t0 = time.perf_counter()
            f()
            sync(device)
            out.append(time.perf_counter() - t0)
    return statistics.median(t_fn), statistics.median(t_base)


def train_step(module, forward, x, gy):
    """Forward + backward as fairseq does it: gradients start from None each step."""
    for p in module.parameters():
        p.grad = None
    x.grad = None
    forward(x).backward(gy)


def activation_bytes(fn, device, module):
    """Bytes saved for backward by one forward, parameters not counted (CPU), or peak
    allocated memory over what was allocated before (CUDA)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated() - base
    total = [0]
    seen = {p.untyped_storage().data_ptr() for p in module.parameters()}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in seen and key != 0:
            seen.add(key)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def layer_suite(args, emit):
    from moe_plugin.config import MoEConfig
    from moe_plugin.moe_layer import build_moe_layer
    from moe_plugin.models.archs import ARCHS
    from moe_plugin.routing import ROUTER_REGISTRY, TokenInfo, VocabInfo

    device, dtype = args.device, {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    D, F = args.D, args.F
    names = sorted(ROUTER_REGISTRY) + ["base_block"] if args.routers == "all" else args.routers.split(",")
    routers = [r for r in names if r != "base_block"]
    V = 1000
    vocab = VocabInfo(size=V, pad=1, eos=2, counts_V=torch.randint(1, 1000, (V,)))
    rows = []
    for T in args.T:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(T, D, generator=g).to(device, dtype)
        gy = torch.randn(T, D, generator=g).to(device, dtype)
        B = 8
        ids_BT = torch.randint(4, V, (B, T // B), generator=g)
        tok = TokenInfo(
            ids_T=ids_BT.t().reshape(-1).to(device),
            prev_ids_T=torch.cat([ids_BT.new_ones(B, 1), ids_BT[:, :-1]], 1).t().reshape(-1).to(device),
            positions_T=torch.arange(T // B).repeat_interleave(B).to(device),
            pad_mask_T=torch.zeros(T, dtype=torch.bool, device=device),
            next_ids_T=torch.cat([ids_BT[:, 1:], ids_BT.new_ones(B, 1)], 1).t().reshape(-1).to(device),
        )
        dense = nn.Sequential(nn.Linear(D, F), nn.ReLU(), nn.Linear(F, D)).to(device, dtype)
        xd = x.clone().requires_grad_()

        def run_dense():
            train_step(dense, dense, xd, gy)

        m_dense = activation_bytes(lambda: dense(xd), device, dense)
        emit({"suite": "layer", "impl": "dense_ffn", "T": T, "D": D, "F": F, "act_bytes": m_dense})
        for E in args.E:
            # a floor no router can beat when T*K/E is small: every step writes fresh gradients
            # for all E experts' weights (fairseq sets .grad to None after each update)
            w1, w2 = (torch.empty(E, a, b, device=device, dtype=dtype) for a, b in ((D, F), (F, D)))

            def write_grads():
                for w in (w1, w2):
                    torch.empty_like(w).copy_(w)

            t_w, t_dense = time_against(write_grads, run_dense, device, args.reps)
            row = {"suite": "layer", "impl": "floor: write E experts' weight gradients", "T": T, "E": E, "K": 0,
                   "seconds": t_w, "dense_seconds": t_dense, "ratio": t_w / t_dense, "act_ratio": 0.0}
            emit(row)
            rows.append(row)
            del w1, w2
            if "base_block" in names:
                row = base_block_row(T, E, D, F, x, gy, device, dtype, args.reps)
                emit(row)
                rows.append(row)
            for name in routers + (["balanced:cached"] if "balanced" in routers else []):
                name, _, variant = name.partition(":")
                defaults = next((d for a, (r, d) in ARCHS.items() if r == name), {})
                values = {"moe_router": name, "moe_expert_count": E, **{k: v for k, v in defaults.items() if not callable(v)}}
                if name == "balanced":
                    # every solve from scratch: the same batch comes back each repetition, and
                    # a warm start from its own prices would make the solver look free
                    values["base_cold_start"] = True
                values = {k: v for k, v in values.items() if k in MoEConfig.__dataclass_fields__}
                try:
                    cfg = MoEConfig(**values)
                    torch.manual_seed(0)
                    layer = build_moe_layer(cfg, D, F, vocab=vocab, layer_index=0).to(device, dtype).train()
                except Exception as e:  # a router this harness cannot build: say so
                    emit({"suite": "layer", "impl": name, "T": T, "E": E, "skipped": str(e)[:200]})
                    continue
                xm = x.clone().requires_grad_()
                moe = lambda x_: layer(x_, tokens=tok)  # noqa: E731

                def run_moe():
                    train_step(layer, moe, xm, gy)

                with cached_assignment(variant == "cached"):
                    t, t_dense = time_against(run_moe, run_dense, device, args.reps)
                    m = activation_bytes(lambda: moe(xm), device, layer)
                k = getattr(layer.router, "top_k", 1)
                label = name + (" (assignment cached)" if variant else "")
                row = {"suite": "layer", "impl": label, "T": T, "E": E, "K": k, "D": D, "F": F, "seconds": t,
                       "dense_seconds": t_dense, "ratio": t / t_dense, "act_ratio": m / max(m_dense, 1)}
                emit(row)
                rows.append(row)
    return rows


def base_block_row(T, E, D, F, x, gy, device, dtype, reps):
    """BASE's real block as base_lm builds it (``x + alpha (f_e(x) - x)``, f_e a pre-LN residual
    sublayer, the balanced assignment solved cold) over a dense pre-LN FFN block ``x + FFN(LN(x))``."""
    from moe_plugin.base_layer import BaseLayer
    from moe_plugin.config import MoEConfig

    torch.manual_seed(0)
    block = BaseLayer(MoEConfig(moe_router="balanced", moe_expert_count=E, base_cold_start=True), D, F)
    block = block.to(device, dtype).train()
    dense = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, F), nn.ReLU(), nn.Linear(F, D)).to(device, dtype)
    xb, xd = (x.view(T, 1, D).clone().requires_grad_() for _ in range(2))
    gyb = gy.view(T, 1, D)
    moe = lambda x_: block(x_)[0]  # noqa: E731
    res = lambda x_: x_ + dense(x_)  # noqa: E731
    t, t_dense = time_against(lambda: train_step(block, moe, xb, gyb), lambda: train_step(dense, res, xd, gyb),
                              device, reps)
    m, m_dense = activation_bytes(lambda: moe(xb), device, block), activation_bytes(lambda: res(xd), device, dense)
    return {"suite": "layer", "impl": "BASE block (base_lm's) over a dense pre-LN block", "T": T, "E": E, "K": 1,
            "D": D, "F": F, "seconds": t, "dense_seconds": t_dense, "ratio": t / t_dense, "act_ratio": m / max(m_dense, 1)}


@contextlib.contextmanager
def cached_assignment(active: bool):
    """BASE without the assignment: the balanced router reuses its first solution (the
    layer still computes scores, gates and their gradients; only the solver is skipped)."""
    if not active:
        yield
        return
    from moe_plugin.routing import balanced

    solve, memo = balanced.solve_balanced, {}

    def cached(scores_TE, **kw):
        key = tuple(scores_TE.shape)
        if key not in memo:
            memo[key] = solve(scores_TE, **kw)
        return memo[key]

    balanced.solve_balanced = cached
    try:
        yield
    finally:
        balanced.solve_balanced = solve


def script_suite(suite, script, extra, emit):
    """Run ``scripts/<script> --jsonl <extra>`` and pass its JSON lines on, tagged with ``suite``."""
    path = os.path.join(ROOT, "scripts", script)
    if not os.path.exists(path):
        emit({"suite": suite, "skipped": f"scripts/{script} is not there"})
        return []
    out = commands.run([sys.executable, path, "--jsonl", *extra], check=False, merge_stderr=False)
    rows = []
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            row["suite"] = suite
            emit(row)
            rows.append(row)
    if out.returncode != 0:
        emit({"suite": suite, "error": out.stderr[-500:]})
    return rows


def assignment_suite(args, emit):
    sizes = ["--tokens", ",".join(map(str, args.T)), "--experts", ",".join(map(str, args.E))]
    return script_suite("assignment", "bench_assignment.py", sizes, emit)


def base_vs_fairseq_suite(args, emit):
    return script_suite("base-vs-fairseq", "bench_base_vs_fairseq.py", [], emit)


def e2e_suite(args, emit):
    from moe_plugin.models.archs import ARCHS, DEMO_ARGS, DENSE_ARCH

    data = os.path.join(ROOT, "data", "bench")
    data_bin = os.path.join(data, "data-bin")
    if not os.path.exists(os.path.join(data_bin, "dict.txt")):
        commands.run([sys.executable, "data-prep/synthetic.py", "--out", data, "--train-tokens", "600000"])
        commands.run([sys.executable, "-m", "fairseq_cli.preprocess", "--only-source", "--trainpref",
                      f"{data}/train.txt", "--validpref", f"{data}/valid.txt", "--destdir", data_bin,
                      "--workers", "2"])
    D, F = args.e2e_dim, 4 * args.e2e_dim
    common = [data_bin, "--task", "language_modeling", "--user-dir", os.path.join(ROOT, "moe_plugin"),
              "--criterion", "moe_cross_entropy", "--decoder-layers", "4", "--decoder-embed-dim", str(D),
              "--decoder-input-dim", str(D), "--decoder-output-dim", str(D), "--decoder-ffn-embed-dim", str(F),
              "--decoder-attention-heads", "4", "--tokens-per-sample", "256", "--max-tokens", "8192",
              "--optimizer", "adam", "--lr", "1e-3", "--max-update", str(args.e2e_updates), "--log-format",
              "simple", "--log-interval", "1000", "--no-save", "--disable-validation", "--seed", "1"]
    if args.device == "cpu":
        common.append("--cpu")
    elif args.dtype != "fp32":
        common.append("--" + args.dtype)
    archs = [DENSE_ARCH] + sorted(ARCHS) if args.archs == "all" else args.archs.split(",")
    from moe_plugin.tools import flops

    base_wps, base_flops, rows = None, None, []
    for arch in archs:
        extra = []
        if arch in ARCHS:
            router, defaults = ARCHS[arch]
            # experts of hidden F / (experts per token): K, or expert choice's capacity factor
            k = float(defaults.get("moe_capacity_factor", 1)) if router == "expert_choice" else int(defaults.get("moe_top_k", 1))
            extra = ["--moe-expert-count", str(args.e2e_experts), "--moe-expert-ffn-dim", str(int(F // k)),
                     *[a.format(max_update=args.e2e_updates) for a in DEMO_ARGS.get(arch, [])]]
        flags = [*common, "--arch", arch, *extra]
        proc = commands.run([sys.executable, "-m", "fairseq_cli.train", *flags], check=False)
        m = re.findall(r"\| train \|.*?\| wps ([\d.]+)", proc.stdout)
        if proc.returncode != 0 or not m:
            emit({"suite": "e2e", "arch": arch, "error": proc.stdout[-400:]})
            continue
        wps = float(m[-1])
        # the compute each row runs at, counted on the model built from the same flags
        model, _ = flops.build_model(flags[1:], data=data_bin)  # flags[0]: the data directory
        rep = flops.flops_per_token(model, 256, tokens_per_batch=8192, label=arch)
        train_flops = rep.active_flops_per_token["train"]
        base_wps = base_wps or (wps if arch == DENSE_ARCH else None)
        base_flops = base_flops or (train_flops if arch == DENSE_ARCH else None)
        row = {"suite": "e2e", "arch": arch, "wps": wps, "ratio": wps / base_wps if base_wps else None,
               "train_flops_per_token": train_flops, "total_params": rep.total_params,
               "flops_ratio": train_flops / base_flops if base_flops else None}
        emit(row)
        rows.append(row)
    return rows


def markdown(args, layer_rows, assign_rows, e2e_rows, bvf_rows=()):
    out = [f"Machine: {machine(args.device)}; dtype {args.dtype}.", ""]
    if layer_rows:
        out += [f"### MoE layer, forward+backward, time over the dense FFN (D={args.D}, F={args.F}); "
                "activation memory ratio in parentheses", ""]
        Es = sorted({r["E"] for r in layer_rows})
        Ts = sorted({r["T"] for r in layer_rows})
        head = "| router | K | " + " | ".join(f"T={T} E={E}" for T in Ts for E in Es) + " |"
        out += [head, "|---|---:|" + "---:|" * (len(Ts) * len(Es))]
        for name in sorted({r["impl"] for r in layer_rows}):
            cells, k = [], "?"
            for T in Ts:
                for E in Es:
                    r = next((r for r in layer_rows if r["impl"] == name and r["T"] == T and r["E"] == E), None)
                    cells.append("-" if r is None else f"{r['ratio']:.2f}x" + (f" ({r['act_ratio']:.1f})" if r["K"] else ""))
                    k = r["K"] if r else k
            out.append(f"| {name} | {k or '-'} | " + " | ".join(cells) + " |")
        out.append("")
    if e2e_rows:
        from moe_plugin.tools import flops

        out += ["### End to end: fairseq-train words/s over dense_lm (same shape; active training FLOPs/token "
                "counted on the built model, moe_plugin.tools.flops; a FLOPs ratio more than 2% off is marked)", "",
                "| arch | words/s | ratio | active FLOPs/token (train) | vs dense FLOPs | FLOPs/s ratio | total params |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        for r in e2e_rows:
            ratio = f"{r['ratio']:.2f}" if r["ratio"] else "-"
            fr = r.get("flops_ratio")
            fcell = "-" if fr is None else f"{fr:.3f}x" + (" **(>2% off)**" if abs(fr - 1) > 0.02 else "")
            fl = r.get("train_flops_per_token")
            # words/s times FLOPs per token over dense_lm's: the compute rate, for rows whose
            # FLOPs per token are not dense_lm's (base_lm's extra block, a K schedule)
            rate = f"{r['ratio'] * fr:.2f}" if r["ratio"] and fr else "-"
            out.append(f"| {r['arch']} | {r['wps']:.0f} | {ratio} | {flops.human(fl) if fl else '-'} | {fcell} | "
                       f"{rate} | {r.get('total_params', 0):,} |")
        out.append("")
    if assign_rows:
        out += ["### BASE's balanced assignment: CPU ms per call, ours vs fairseq.libbase (gap to the optimum, %); "
                "S-BASE's Sinkhorn beside them (its loads are not exact: load max = fullest expert / (T/E))", "",
                "| scores | T | E | libbase ms | ours ms | speed-up | libbase gap % | ours gap % | sinkhorn ms | "
                "sinkhorn gap % | sinkhorn load max |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in assign_rows:
            lg = "-" if r["libbase_gap_pct"] is None else f"{r['libbase_gap_pct']:.4f}"
            sk = ("- | - | -" if r.get("sinkhorn_ms") is None else
                  f"{r['sinkhorn_ms']:.1f} | {r['sinkhorn_gap_pct']:.4f} | {r['sinkhorn_load_max']:.2f}")
            out.append(f"| {r['scores']} | {r['T']} | {r['E']} | {r['libbase_ms']:.1f} | {r['ours_ms']:.1f} | "
                       f"{r['speedup']:.1f}x | {lg} | {r['ours_gap_pct']:.4f} | {sk} |")
        out.append("")
    summary = next((r for r in bvf_rows if r.get("kind") == "summary" and r.get("ratio") is not None), None)
    if summary:
        config = next((r["config"] for r in bvf_rows if r.get("kind") == "machine"), "")
        out += ["### BASE layers end to end: moe_plugin `base_lm --moe-expert-parallel` vs fairseq `transformer_lm "
                f"--base-layers 1` ({config}; words/s: rank 0's steady-state train_inner rate; median over "
                f"{summary['n']['fairseq']} interleaved pairs, min-max in parentheses)", "",
                "| side | words/s | valid loss (bits) |", "|---|---:|---:|"]
        for side in ("fairseq", "ours"):
            lo, hi = summary[f"{side}_wps_range"]
            vl = summary[f"{side}_valid_loss"]
            out.append(f"| {side} | {summary[f'{side}_wps']:.0f} ({lo:.0f}-{hi:.0f}) | "
                       f"{'-' if vl is None else f'{vl:.3f}'} |")
        lo, hi = summary["ratio_range"]
        out += ["", f"ours/fairseq words/s: {summary['ratio']:.3f}x ({lo:.3f}-{hi:.3f}).", ""]
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    p.add_argument("--suite", default="layer,e2e", help="comma-separated: layer, assignment, e2e, base-vs-fairseq")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--D", type=int, default=512)
    p.add_argument("--F", type=int, default=2048)
    p.add_argument("--T", type=ints, default=[2048, 8192])
    p.add_argument("--E", type=ints, default=[8, 16, 64])
    p.add_argument("--routers", default="all")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--archs", default="all")
    p.add_argument("--e2e-dim", type=int, default=256)
    p.add_argument("--e2e-experts", type=int, default=8)
    p.add_argument("--e2e-updates", type=int, default=30)
    p.add_argument("--jsonl", default=None)
    p.add_argument("--markdown", default=None)
    args = p.parse_args(argv)
    sink = open(args.jsonl, "w") if args.jsonl else sys.stdout

    def emit(row):
        sink.write(json.dumps(row) + "\n")
        sink.flush()

    emit({"machine": machine(args.device), "args": {k: v for k, v in vars(args).items() if k not in ("jsonl", "markdown")}})
    suites = args.suite.split(",")
    layer_rows = layer_suite(args, emit) if "layer" in suites else []
    assign_rows = assignment_suite(args, emit) if "assignment" in suites else []
    e2e_rows = e2e_suite(args, emit) if "e2e" in suites else []
    bvf_rows = base_vs_fairseq_suite(args, emit) if "base-vs-fairseq" in suites else []
    md = markdown(args, layer_rows, assign_rows, e2e_rows, bvf_rows)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md + "\n")
    print(md, file=sys.stderr if sink is sys.stdout else sys.stdout)


if __name__ == "__main__":
    main()
