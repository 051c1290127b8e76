#!/usr/bin/env python3
"""Benchmark BASE's balanced assignment: moe_plugin's PyTorch solver vs fairseq's C++ libbase
vs scipy's exact linear_sum_assignment, and S-BASE's approximate one (Sinkhorn, the
``sinkhorn`` router of moe_plugin/routing/sinkhorn.py) beside them.

For every T in --tokens and E in --experts (E | T) and every score distribution:
  * time: CPU time of one call (this thread; min over --repeat calls, libbase and ours
    interleaved), with torch limited to --threads threads for both solvers;
  * total affinity and gap to the optimum: against scipy's exact optimum (every expert's
    column repeated T/E times, then LAPJV) where T <= --scipy-max-tokens; above that scipy
    is skipped (T=8192 takes minutes and T=16384 needs a 2 GiB dense matrix) and the gap is
    measured against an upper bound of the optimum instead: the LP dual value
    ``sum_t max_e (s_te - p_e) + (T/E) sum_e p_e`` at prices p from a tight run of our solver
    (eps 100x smaller). That bound is >= the optimum, so the gap printed is >= the true gap
    (marked "<=" in the table);
  * warm: our solver started from the prices of the previous "batch" (the same scores plus
    small noise), the regime of training where the router keeps the last batch's prices;
  * Sinkhorn (S-BASE's training assignment: argmax of the Sinkhorn-normalised exp(scores / tau),
    at the router's defaults --sinkhorn-tol 1e-4, --sinkhorn-iterations 100, tau = 1, or the
    values given here): CPU ms (min over --repeat), its value against the same reference (the
    gap can be negative: its loads are not exactly T/E, and a greedy assignment over uneven loads
    can score above the balanced optimum), the load of its fullest expert over T/E ("load
    max"), the tokens over T/E at their experts, in % of T (what capacity factor 1.0 would
    drop; "over cap"), and its iterations. The auction's loads are exactly T/E (load max 1.00).

Score distributions: ``normal`` (i.i.d. N(0,1), the usual benchmark) and ``structured``
(rank-8 scores plus a per-expert bias: popular and unpopular experts, as in a trained
BASE layer).

Prints a markdown table (and writes it to --out). Example:
    OMP_NUM_THREADS=1 python scripts/bench_assignment.py --out results/bench_assignment.md
"""

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch

from moe_plugin.routing.balanced import solve_balanced
from moe_plugin.routing.sinkhorn import sinkhorn


def make_scores(kind, T, E, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(T, E, generator=g)
    if kind == "structured":
        low_rank_TE = torch.randn(T, 8, generator=g) @ torch.randn(8, E, generator=g)
        return 0.35 * low_rank_TE + 0.5 * torch.randn(E, generator=g)
    raise ValueError(kind)


def cpu_ms(fn, repeat):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.thread_time()
        out = fn()
        best = min(best, time.thread_time() - t0)
    return best * 1e3, out


def total(a, expert_T):
    return float(a.double().gather(1, expert_T[:, None]).sum())


def libbase_experts(libbase, a):
    T, E = a.shape
    perm_T = libbase.balanced_assignment(a.clone())  # token ids grouped by expert
    expert_T = torch.empty(T, dtype=torch.long)
    expert_T[perm_T] = torch.arange(E).repeat_interleave(T // E)
    return expert_T


def scipy_optimum(a):
    from scipy.optimize import linear_sum_assignment

    T, E = a.shape
    cost = np.repeat(a.double().numpy(), T // E, axis=1)
    rows, cols = linear_sum_assignment(cost, maximize=True)
    return float(cost[rows, cols].sum())


def dual_bound(a, prices_E):
    """sum_t max_e (a_te - p_e) + (T/E) sum_e p_e >= optimum, for any prices."""
    T, E = a.shape
    a, p = a.double(), prices_E.double()
    return float((a - p).amax(1).sum() + (T // E) * p.sum())


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1024,4096,8192,16384")
    ap.add_argument("--experts", default="8,16,64,128")
    ap.add_argument("--scores", default="normal,structured")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--scipy-max-tokens", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sinkhorn-temperature", type=float, default=1.0)
    ap.add_argument("--sinkhorn-tol", type=float, default=1e-4)
    ap.add_argument("--sinkhorn-iterations", type=int, default=100)
    ap.add_argument("--out", default=None)
    ap.add_argument("--jsonl", action="store_true", help="also print each row as a JSON line (scripts/bench.py reads them)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        from fairseq import libbase
    except ImportError:
        libbase = None
        print("fairseq.libbase is not importable: libbase columns are empty", file=sys.stderr)

    lines = [
        f"Machine: {cpu_name()}, {os.cpu_count()} CPU cores visible, "
        f"torch {torch.__version__}, {args.threads} thread(s); time = CPU time of one call, "
        f"min of {args.repeat}. Sinkhorn: tau {args.sinkhorn_temperature}, tol {args.sinkhorn_tol}, "
        f"at most {args.sinkhorn_iterations} iterations.",
        "",
        "| scores | T | E | libbase ms | ours ms | speed-up | ours warm ms | libbase gap % | ours gap % | "
        "sinkhorn ms | sinkhorn gap % | sinkhorn load max | sinkhorn over cap % | sinkhorn iters | reference |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    print("\n".join(lines), flush=True)
    for kind in args.scores.split(","):
        for T in map(int, args.tokens.split(",")):
            for E in map(int, args.experts.split(",")):
                if T % E:
                    continue
                a = make_scores(kind, T, E, args.seed)
                ours_ms, ours = cpu_ms(lambda: solve_balanced(a), 1)  # warm-up / first call
                lib_ms = float("nan")
                lib_T = None
                for _ in range(args.repeat):  # interleaved
                    if libbase is not None:
                        m, lib_T = cpu_ms(lambda: libbase_experts(libbase, a), 1)
                        lib_ms = m if lib_ms != lib_ms else min(lib_ms, m)
                    m, ours = cpu_ms(lambda: solve_balanced(a), 1)
                    ours_ms = min(ours_ms, m)
                assert (torch.bincount(ours.expert_T, minlength=E) == T // E).all()
                nxt = a + 0.05 * make_scores("normal", T, E, args.seed + 1)
                warm_ms, _ = cpu_ms(lambda: solve_balanced(nxt, prices_E=ours.prices_E), args.repeat)
                got = total(a, ours.expert_T)
                sk_kw = dict(tol=args.sinkhorn_tol, max_iterations=args.sinkhorn_iterations,
                             temperature=args.sinkhorn_temperature)
                sk_ms, sk = cpu_ms(lambda: sinkhorn(a, **sk_kw), args.repeat)
                sk_load_E = torch.bincount(sk.expert_T, minlength=E)
                sk_load_max = float(sk_load_E.max()) / (T // E)
                sk_over_pct = 100.0 * float((sk_load_E - T // E).clamp(min=0).sum()) / T
                if T <= args.scipy_max_tokens:
                    ref, ref_name, le = scipy_optimum(a), "scipy optimum", ""
                else:
                    tight = solve_balanced(a, eps_rel=5e-5, gap_tol=1e-6)
                    ref, ref_name, le = dual_bound(a, tight.prices_E), "LP dual bound", "<= "
                gap = lambda x: 100.0 * (ref - x) / abs(ref)  # noqa: E731
                lib_gap = f"{le}{gap(total(a, lib_T)):.4f}" if lib_T is not None else "-"
                row = (
                    f"| {kind} | {T} | {E} | {lib_ms:.1f} | {ours_ms:.1f} | {lib_ms / ours_ms:.1f}x | {warm_ms:.1f} | "
                    f"{lib_gap} | {le}{gap(got):.4f} | {sk_ms:.1f} | {le}{gap(total(a, sk.expert_T)):.4f} | "
                    f"{sk_load_max:.2f} | {sk_over_pct:.2f} | {sk.iterations} | {ref_name} |"
                )
                lines.append(row)
                print(row, flush=True)
                if args.jsonl:
                    print(json.dumps({
                        "scores": kind, "T": T, "E": E, "libbase_ms": lib_ms, "ours_ms": ours_ms,
                        "speedup": lib_ms / ours_ms, "ours_warm_ms": warm_ms,
                        "libbase_gap_pct": gap(total(a, lib_T)) if lib_T is not None else None,
                        "ours_gap_pct": gap(got), "reference": ref_name,
                        "sinkhorn_ms": sk_ms, "sinkhorn_gap_pct": gap(total(a, sk.expert_T)),
                        "sinkhorn_load_max": sk_load_max, "sinkhorn_over_cap_pct": sk_over_pct,
                        "sinkhorn_iterations": sk.iterations,
                    }), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
