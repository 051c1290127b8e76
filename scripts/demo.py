#!/usr/bin/env python3
"""make demo: the dense baseline dense_lm against the MoE archs (by default Switch, GShard and
one arch per paper: BASE, Hash, SAM, HyperRouter; ``--archs all`` for every registered arch)
on a synthetic corpus with a known answer, over seeds, at measured active compute.

1. Generates the synthetic corpus (data-prep/synthetic.py ``--preset context``: 32 domains
   sharing 512 words, the next word depending on the domain read off the context, where the
   routers separate; or ``--preset calibrated``/``control``/``none``: docs/synthetic.md; its
   truth.json holds the exact cross-entropy of the generating source, the floor, and its
   <split>.domains each document's domain) into ``data/synthetic-<preset>`` and binarises it
   with fairseq-preprocess; a directory generated with another preset or data seed is
   refused, not reused.
2. Counts each arch's active forward FLOPs per token and its parameters on the model built
   from the flags it trains with (moe_plugin.tools.flops; no data read but the dictionary).
3. Trains the dense baseline ``dense_lm`` (the MoE archs' model without MoE layers, so
   the same embedding, normalisation and final LayerNorm; fairseq's ``transformer_lm``
   builds another model from the same flags: docs/fidelity.md, section dense) and each MoE
   arch with the same shape and the same active FFN compute per token: an arch that
   activates K experts gets experts of hidden size F/K. Fixed number of updates on CPU,
   once per seed of ``--seeds`` (default 1,2; the corpus is the same for every seed:
   ``--data-seed``), ``--jobs`` runs at a time (default 2 on 2 CPUs, one thread each),
   validating on the first ``--valid-batches`` batches of valid (default 10, about 20k
   tokens; 0: all of it) every ``--valid-every`` updates (default: 4 times): the curve of the
   plot; the table's quality figure is test's, all of it.
4. Evaluates each checkpoint with fairseq-eval-lm on test, and routes test through each MoE
   checkpoint to relate its experts to the documents' domains (domains.json).
5. Prints and writes results/demo/results.md (and results.json, plots/valid_ppl.png,
   plots/expert_domain.png: the best ranked MoE arch's share of each domain's tokens per expert).

Layout of ``--out``: ``seed<N>/<arch>/`` per run (train.log, eval_test.log, run.json,
checkpoints/, domains.json), so ``python -m moe_plugin.tools.report results/demo`` reads it too;
flops.json (the FLOPs reports); results.md, results.json; plots/.

The table (one row per arch, figures = mean ± sample std over the seeds, n = seeds):

* test perplexity (fairseq-eval-lm) and the gap to the floor in nats/token: the model's test
  cross-entropy minus truth.json's; "learned": (CE_unigram - CE_model) / (CE_unigram -
  CE_floor), the share of what is learnable beyond the training unigram (CE_unigram: the
  add-one unigram of train.txt on test.txt, from truth.json, written by data-prep/synthetic.py);
* rank: 1 + the number of archs whose gap is smaller by more than the combined spread
  (``moe_plugin.tools.stats.compare``), so equal ranks are not told apart; "vs dense_lm":
  better / worse (beyond the spread) / within spread;
* total and active parameters, active FLOPs/token in evaluation and their ratio to
  dense_lm's, marked when more than 2% off (``moe_plugin.tools.flops.compare_active_flops``);
* train words/s (median of the logged intervals after the first);
* load max/mean and % of token slots dropped AT THE END of training: the last logged
  train_inner interval (the last tenth of the updates), not the average from update 1;
* NMI(expert; domain): I(first expert; domain) / H(first expert) on test, the MoE layers' mean.

``--table-only`` renders the table again from the runs already in ``--out`` (no training).
Run as ``make demo``; ``python scripts/demo.py --help`` for the knobs.
"""

import argparse
import concurrent.futures
import dataclasses
import glob
import json
import logging
import math
import os
import re
import shutil
import sys
import threading
import time
import warnings
from typing import Dict, List, Optional, Sequence

from moe_plugin.tools import commands

ROOT = commands.ROOT
DENSE = "dense_lm"  # moe_plugin.models.archs.DENSE_ARCH (that module imports fairseq; --table-only does not)
#: vs-dense verdicts of the table
BETTER, WORSE, WITHIN, NO_SPREAD = "better", "worse", "within spread", "no spread (n<2)"


def sh(cmd, log_path=None, echo_prefix=None, env=None):
    """Run a command (moe_plugin.tools.commands.run), echoing fairseq's train/valid progress as
    ``PREFIX: train update N nll_loss(bits) L`` when ``echo_prefix`` is given; returns its output.
    ``env``: variables set for the command on top of this process' environment."""

    def progress(line):
        if not echo_prefix or not ("| train_inner |" in line or "| valid |" in line):
            return None
        m = re.search(r"num_updates[= ](\d+)", line)
        loss = re.search(r"nll_loss[= ]([\d.]+)", line)
        kind = "valid" if "| valid |" in line else "train"
        return (f"{echo_prefix}: {kind} update {m.group(1) if m else '?'} "
                f"nll_loss(bits) {loss.group(1) if loss else '?'}")

    return commands.run(cmd, log=log_path, echo=progress, env=env).stdout


def job_threads(jobs: int) -> int:
    """The OMP/torch threads of each of ``jobs`` concurrent runs: this process' OMP_NUM_THREADS
    (else the CPU count) shared out, at least 1."""
    try:
        total = int(os.environ.get("OMP_NUM_THREADS", "") or 0)
    except ValueError:
        total = 0
    total = total or (os.cpu_count() or 1)
    return max(total // max(jobs, 1), 1)


def quiet_imports():
    """fairseq and fairscale print warnings and INFO lines on import; the demo does not need them."""
    warnings.filterwarnings("ignore")
    logging.disable(logging.INFO)


def parse_seeds(text: str) -> List[int]:
    """``"1,2"`` -> [1, 2]; ValueError naming ``--seeds`` for anything but distinct integers."""
    try:
        seeds = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: {text!r} is not allowed; allowed: comma-separated distinct integers, e.g. 1,2")
    return seeds


# ----------------------------------------------------------------------------------------
# Training flags (shared by the runs and the FLOPs count)
# ----------------------------------------------------------------------------------------


def valid_every(args) -> int:
    return args.valid_every if args.valid_every > 0 else max(args.max_update // 4, 1)


def train_flags(args, arch: str, seed: int, save_dir: str) -> List[str]:
    """fairseq-train's flags for ``arch`` at ``seed`` (everything but the data directory, the
    task, --user-dir and --cpu): what the demo trains with and what its FLOPs are counted on."""
    from moe_plugin.models.archs import ARCHS, DEMO_ARGS

    flags = [
        "--arch", arch, "--criterion", "moe_cross_entropy", "--seed", str(seed),
        "--decoder-layers", str(args.layers), "--decoder-embed-dim", str(args.embed_dim),
        "--decoder-ffn-embed-dim", str(args.ffn_dim), "--decoder-attention-heads", "4",
        # the moe_lm archs' defaults, spelled out so that fairseq's transformer_lm (--archs) matches
        "--decoder-input-dim", str(args.embed_dim), "--decoder-output-dim", str(args.embed_dim),
        "--share-decoder-input-output-embed", "--decoder-normalize-before", "--dropout", "0.0",
        "--tokens-per-sample", str(args.tokens_per_sample), "--max-tokens", str(args.max_tokens),
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", str(args.lr),
        "--lr-scheduler", "inverse_sqrt", "--warmup-updates", str(max(args.max_update // 10, 1)),
        "--clip-norm", "1.0", "--max-update", str(args.max_update), "--log-format", "simple",
        # the last logged interval is the last tenth of training: the end-of-training load
        "--log-interval", str(max(args.max_update // 10, 1)),
        "--validate-interval-updates", str(valid_every(args)),
        *(["--max-valid-steps", str(args.valid_batches)] if args.valid_batches > 0 else []),
        "--no-epoch-checkpoints", "--no-save-optimizer-state", "--save-dir", save_dir,
    ]
    if arch in ARCHS:
        k = int(ARCHS[arch][1].get("moe_top_k", 1))
        flags += ["--moe-expert-count", str(args.experts), "--moe-expert-ffn-dim", str(max(args.ffn_dim // k, 1))]
        # demo_args may name the run's length, e.g. a top-K schedule over "{max_update}" updates
        flags += [a.format(max_update=args.max_update) for a in DEMO_ARGS.get(arch, [])]
    return flags


def count_flops(args, archs: Sequence[str], data_bin: str, seed: int) -> Dict[str, dict]:
    """arch -> its FlopsReport as a dict (moe_plugin.tools.flops), counted on the model built
    from its training flags at ``seed``; an arch that cannot be counted is left out (said)."""
    from moe_plugin.tools import flops

    out = {}
    for arch in archs:
        try:
            model, _ = flops.build_model(train_flags(args, arch, seed, os.devnull), data=data_bin)
            rep = flops.flops_per_token(model, args.tokens_per_sample, tokens_per_batch=args.max_tokens, label=arch)
        except Exception as e:  # noqa: BLE001  (the table says "-" for it)
            print(f"[demo] {arch}: FLOPs not counted ({e})", flush=True)
            continue
        out[arch] = dataclasses.asdict(rep)
        print(f"[demo] {arch}: {flops.human(rep.active_flops_per_token['eval'])} active FLOPs/token (eval), "
              f"{rep.total_params:,} params, {rep.active_params['eval']:,} active", flush=True)
    return out


def run_seed(arch, seed, args, py, data_bin, out_dir, threads: Optional[int] = None) -> None:
    """Train ``arch`` at ``seed`` from scratch into ``out_dir`` (train.log, checkpoints/),
    evaluate it on test (eval_test.log) and write run.json (status, seconds); ``threads``: the
    OMP_NUM_THREADS of its commands (None: this process')."""
    t0 = time.time()
    env = None if threads is None else {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    save = os.path.join(out_dir, "checkpoints")
    shutil.rmtree(out_dir, ignore_errors=True)  # fairseq would resume from an old checkpoint_last
    os.makedirs(out_dir)
    meta = {"name": arch, "label": arch, "arch": arch, "seed": seed, "script": "demo", "dataset": "synthetic",
            "status": "failed", "evals": [{"name": "test", "label": "test", "log": "eval_test.log"}], "meta": {}}

    def write_meta():
        with open(os.path.join(out_dir, "run.json"), "w") as f:
            json.dump(meta, f, indent=2)

    write_meta()
    print(f"[demo] {arch} seed {seed}: training {args.max_update} updates", flush=True)
    sh([py, "-m", "fairseq_cli.train", data_bin, "--task", "language_modeling", "--user-dir",
        os.path.join(ROOT, "moe_plugin"), "--cpu", *train_flags(args, arch, seed, save)],
       os.path.join(out_dir, "train.log"), echo_prefix=f"{arch}/seed{seed}", env=env)
    sh([py, "-m", "fairseq_cli.eval_lm", data_bin, "--user-dir", os.path.join(ROOT, "moe_plugin"),
        "--path", os.path.join(save, "checkpoint_last.pt"), "--cpu", "--gen-subset", "test",
        "--tokens-per-sample", str(args.tokens_per_sample), "--context-window", str(args.tokens_per_sample // 2),
        "--max-tokens", str(args.max_tokens)], os.path.join(out_dir, "eval_test.log"), env=env)
    meta["status"] = "trained"
    meta["meta"]["seconds"] = round(time.time() - t0, 1)
    meta["meta"]["threads"] = threads
    write_meta()
    domains = os.path.join(args.data, "test.domains")
    if arch != DENSE and os.path.exists(domains):
        try:
            analyse_domains(os.path.join(save, "checkpoint_last.pt"), data_bin, domains, out_dir, args.max_tokens)
        except Exception as e:  # noqa: BLE001  (the table says "-"; the run itself is fine)
            print(f"[demo] {arch} seed {seed}: no expert x domain analysis ({e})", flush=True)


def check_corpus(truth: dict, args) -> None:
    """Refuse a corpus directory generated with another preset or data seed than asked for (an
    earlier demo's corpus would silently stand in for the one the table names)."""
    cfg = truth.get("config", {})
    have = (cfg.get("preset") or "none", cfg.get("seed"))
    want = (args.preset, args.data_seed)
    if args.train_tokens is not None and cfg.get("train_tokens") != args.train_tokens:
        raise SystemExit(f"[demo] --data {args.data}: the corpus there has {cfg.get('train_tokens')} training "
                         f"tokens; asked for --train-tokens {args.train_tokens}. Remove the directory (make "
                         "clean-demo) or pass another --data.")
    if have != want:
        raise SystemExit(f"[demo] --data {args.data}: the corpus there was generated with preset {have[0]!r}, "
                         f"seed {have[1]}; asked for --preset {want[0]}, --data-seed {want[1]}. Remove the "
                         "directory (make clean-demo) or pass another --data.")


def analyse_domains(checkpoint: str, data_bin: str, domains_path: str, out_dir: str, max_tokens: int) -> dict:
    """Route test through the checkpoint (evaluation mode, as fairseq-eval-lm routes) and write
    ``out_dir/domains.json``: per MoE layer the D x E counts of each domain's tokens per first
    expert and NMI(expert; domain) (moe_plugin.tools.analysis)."""
    from moe_plugin.tools import analysis

    model, task = analysis.load_checkpoint(checkpoint, data_bin)
    assign = analysis.collect_assignments(model, task, "test", max_tokens=max_tokens)
    sizes = analysis.split_documents(task, "test")
    res = analysis.domain_analysis(assign, sizes, analysis.read_domains(domains_path, sizes.shape[0]))
    with open(os.path.join(out_dir, "domains.json"), "w") as f:
        json.dump({"split": "test", "layers": res}, f)
    return res


def read_domain_figures(run_dir: str) -> Optional[dict]:
    """``domains.json`` of a run (:func:`analyse_domains`), or None."""
    path = os.path.join(run_dir, "domains.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)["layers"]


# ----------------------------------------------------------------------------------------
# The table (pure functions of the runs' logs, truth.json and the FLOPs reports)
# ----------------------------------------------------------------------------------------


def end_of_training(run: dict) -> dict:
    """Load max/mean (``moe_load_max``: the layers' mean) and % slots dropped (``moe_dropped``)
    of the LAST logged train_inner interval of a run (``moe_plugin.tools.report.load_run``),
    with the updates it covers (``first``..``last``); None where the log has no such figure
    (dense_lm, or no interval logged)."""
    inner = [r for r in run["log"]["train_inner"] if "num_updates" in r]
    if not inner:
        return {"first": None, "last": None, "load_max": None, "dropped": None}
    last = inner[-1]
    first = int(inner[-2]["num_updates"]) + 1 if len(inner) > 1 else 1

    def num(k):
        v = last.get(k)
        return float(v) if isinstance(v, (int, float)) else None

    return {"first": first, "last": int(last["num_updates"]), "load_max": num("moe_load_max"),
            "dropped": num("moe_dropped")}


def seed_figures(run: dict, floor_nats: float, unigram_nats: Optional[float]) -> Optional[dict]:
    """The per-seed figures of one trained run; None when it has no test result."""
    ev = run["evals"].get("test")
    if run["status"] != "trained" or ev is None:
        return None
    ce = float(ev["loss_bits"]) * math.log(2)
    learned = None
    if unigram_nats is not None and unigram_nats > floor_nats:
        learned = (unigram_nats - ce) / (unigram_nats - floor_nats)
    end = end_of_training(run)
    valid = run["valid_final"].get("ppl")
    dom = read_domain_figures(run["dir"]) if run.get("dir") else None
    nmi = None if not dom else sum(d["nmi_domain"] for d in dom.values()) / len(dom)
    return {"seed": run["seed"], "test_ppl": float(ev["ppl"]), "test_nats": ce, "gap": ce - floor_nats,
            "learned": learned, "valid_ppl": None if valid is None else float(valid), "wps": run["wps"],
            "load_max_end": end["load_max"], "dropped_end": end["dropped"], "end_updates": [end["first"], end["last"]],
            "nmi_domain": nmi, "seconds": (run.get("meta") or {}).get("seconds")}


FIGURES = ("test_ppl", "test_nats", "gap", "learned", "valid_ppl", "wps", "load_max_end", "dropped_end",
           "nmi_domain", "seconds")


def arch_row(arch: str, per_seed: List[dict], flops: Dict[str, dict], baseline: str = DENSE) -> dict:
    """One table row: every figure of :data:`FIGURES` as a ``stats.Estimate`` over the seeds
    that have it (None where none has), the FLOPs report's parameters and eval FLOPs/token,
    and their ratio to ``baseline``'s with ``flops_within`` (compare_active_flops, 2%)."""
    from moe_plugin.tools import flops as flops_tool, stats

    row = {"arch": arch, "seeds": [s["seed"] for s in per_seed], "per_seed": per_seed}
    for k in FIGURES:
        row[k] = stats.aggregate([s[k] for s in per_seed], [s["seed"] for s in per_seed])
    rep = _report(flops.get(arch))
    row.update(total_params=None, active_params=None, flops_eval=None, flops_train=None, flops_ratio=None,
               flops_within=None)
    if rep is not None:
        row.update(total_params=rep.total_params, active_params=rep.active_params["eval"],
                   flops_eval=rep.active_flops_per_token["eval"], flops_train=rep.active_flops_per_token["train"])
        base = _report(flops.get(baseline))
        if base is not None:
            within, ratio = flops_tool.compare_active_flops(base, rep, mode="eval")
            row.update(flops_ratio=ratio, flops_within=within)
    return row


def _report(d: Optional[dict]):
    from moe_plugin.tools.flops import FlopsReport

    return None if d is None else FlopsReport(**d)


def rank_rows(rows: List[dict], baseline: str = DENSE) -> List[dict]:
    """Rank by the gap to the floor, a difference counting only beyond the combined spread:
    rank = 1 + the number of rows whose gap is lower by more than it (``stats.compare``);
    ``vs_dense``: better / worse / within spread (or no spread with < 2 seeds on a side)
    against ``baseline``'s row. Returns the rows sorted by (rank, mean gap); a row without a
    result comes last with rank None."""
    from moe_plugin.tools import stats

    base = next((r for r in rows if r["arch"] == baseline), None)
    for r in rows:
        if r["gap"] is None:
            r["rank"], r["vs_dense"] = None, None
            continue
        r["rank"] = 1 + sum(1 for o in rows if o is not r and o["gap"] is not None
                            and stats.compare(o["gap"], r["gap"], "lower") == stats.HOLDS)
        if r is base:
            r["vs_dense"] = "baseline"
        elif base is None or base["gap"] is None:
            r["vs_dense"] = None
        elif stats.combined_spread(r["gap"], base["gap"]) is None:
            r["vs_dense"] = NO_SPREAD
        else:
            v = stats.compare(r["gap"], base["gap"], "lower")
            r["vs_dense"] = {stats.HOLDS: BETTER, stats.DOES_NOT_HOLD: WORSE}.get(v, WITHIN)
    return sorted(rows, key=lambda r: (r["rank"] is None, r["rank"] or 0,
                                       float(r["gap"]) if r["gap"] is not None else math.inf))


def build_rows(runs: List[dict], truth: dict, flops: Dict[str, dict], unigram_nats: Optional[float],
               order: Optional[Sequence[str]] = None) -> List[dict]:
    """The ranked table rows of the runs (``report.load_run`` dicts, one per seed)."""
    floor = float(truth["test"]["cross_entropy_nats"])
    by_arch: Dict[str, List[dict]] = {}
    for run in sorted(runs, key=lambda r: (r["seed"] is None, r["seed"] or 0)):
        by_arch.setdefault(run["name"], [])
        fig = seed_figures(run, floor, unigram_nats)
        if fig is not None:
            by_arch[run["name"]].append(fig)
    names = [a for a in (order or []) if a in by_arch] + sorted(a for a in by_arch if a not in (order or []))
    return rank_rows([arch_row(a, by_arch[a], flops) for a in names])


def _fmt(v, spec: str) -> str:
    from moe_plugin.tools import stats

    return stats.format_estimate(v, spec)


#: the archs of a default ``make demo``: the dense baseline, Switch and GShard, and one arch per
#: paper (BASE, Hash, SAM, HyperRouter); ``--archs all`` adds the rest (SMoE-Dropout, smoe_lm, ...)
DEFAULT_ARCHS = ("dense_lm", "switch_lm", "gshard_lm", "base_lm", "hash_lm", "sam_lm", "hyper_lm")


def demo_archs(text: str, registered, dense: str = DENSE) -> List[str]:
    """``--archs``: 'default' -> DEFAULT_ARCHS, 'all' -> dense + every registered arch, else the
    comma-separated list, each checked (ValueError naming --archs and what is allowed)."""
    if text == "default":
        return list(DEFAULT_ARCHS)
    leaky = sorted(future_seeing_archs(registered))
    if text == "all":
        return [dense] + sorted(a for a in registered if a not in leaky)
    archs = [a for a in text.split(",") if a]
    known = {dense, "transformer_lm", *registered}
    bad = [a for a in archs if a not in known]
    if bad or not archs:
        raise ValueError(f"--archs: {text!r} is not allowed; allowed: default, all, or a comma-separated subset of "
                         f"{', '.join(sorted(known - set(leaky)))}")
    seeing = [a for a in archs if a in leaky]
    if seeing:
        raise ValueError(f"--archs: {', '.join(seeing)} is not allowed: its routing of a token reads the tokens after "
                         "it (the whole batch), so its test perplexity is not a causal LM's and cannot be ranked "
                         "beside the others (docs/expert_choice.md); allowed: the other archs")
    return archs


def future_seeing_archs(registered) -> List[str]:
    """The registered archs whose router's evaluation reads future tokens (``Router.evaluation_sees_future``)."""
    from moe_plugin.routing import ROUTER_REGISTRY

    return [a for a, (router, _defaults) in registered.items() if ROUTER_REGISTRY[router].evaluation_sees_future]


#: % of token slots dropped at the end of training above which a row is marked (issue: "nobody would accept")
DROP_LIMIT = 5.0


def _mean(v) -> Optional[float]:
    """The mean of an Estimate (moe_plugin.tools.stats: a float subclass), a plain number, or None."""
    if v is None:
        return None
    return float(v)


def dropped_cell(v) -> str:
    """The % dropped cell: mean ± spread, marked when the mean is above DROP_LIMIT."""
    m = _mean(v)
    return _fmt(v, ".2f") + (f" **(>{DROP_LIMIT:g}%)**" if m is not None and m > DROP_LIMIT else "")


def render(rows: List[dict], truth: dict, unigram_nats: Optional[float], args, seconds: Optional[float],
           plot: Optional[str] = None, heatmap: Optional[str] = None) -> str:
    from moe_plugin.tools.flops import EQUAL_COMPUTE_TOLERANCE, human

    tv, tt = truth["valid"]["perplexity"], truth["test"]["perplexity"]
    floor = truth["test"]["cross_entropy_nats"]
    seeds = sorted({s for r in rows for s in r["seeds"]})
    took = f" Total time {seconds / 60:.1f} min." if seconds is not None else ""
    uni = (f"; the training unigram's (CE_unigram, truth.json): {unigram_nats:.3f} nats/token, "
           f"perplexity {math.exp(unigram_nats):.1f}") if unigram_nats is not None else ""
    lines = [
        "# moe_plugin demo: synthetic corpus",
        "",
        f"{args.layers} layers, d={args.embed_dim}, FFN {args.ffn_dim}, {args.experts} experts in every 2nd layer "
        f"(experts of size FFN/K), {args.max_update} updates of {args.max_tokens} tokens on CPU, seeds "
        f"{', '.join(map(str, seeds))}.{took}",
        "",
        f"True source (the floor): test perplexity {tt:.3f} ({floor:.4f} nats/token), valid {tv:.3f}{uni}.",
        "",
        "| rank | arch | vs dense_lm | test ppl | gap to floor (nats/token) | learned | total params | "
        "active params | FLOPs/token (eval) | vs dense FLOPs | train words/s | load max/mean (end) | "
        "% dropped (end) | NMI(expert; domain) | s per seed |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    marked = False
    for r in rows:
        ratio = "-"
        if r["flops_ratio"] is not None:
            ratio = f"{r['flops_ratio']:.3f}x"
            if not r["flops_within"]:
                ratio += f" **(>{EQUAL_COMPUTE_TOLERANCE:.0%} off)**"
                marked = True
        cells = [
            "-" if r["rank"] is None else str(r["rank"]), r["arch"], r["vs_dense"] or "-",
            _fmt(r["test_ppl"], ".3f"), _fmt(r["gap"], ".4f"), _fmt(r["learned"], ".3f"),
            "-" if r["total_params"] is None else f"{r['total_params']:,}",
            "-" if r["active_params"] is None else f"{r['active_params']:,}",
            "-" if r["flops_eval"] is None else human(r["flops_eval"]), ratio,
            _fmt(r["wps"], ".0f"), _fmt(r["load_max_end"], ".3f"), dropped_cell(r["dropped_end"]),
            _fmt(r["nmi_domain"], ".3f"), _fmt(r["seconds"], ".0f"),
        ]
        if not r["seeds"]:
            cells[3] = "failed"
        lines.append("| " + " | ".join(cells) + " |")
    ends = sorted({tuple(s["end_updates"]) for r in rows for s in r["per_seed"] if s["end_updates"][0] is not None})
    end_txt = ", ".join(f"updates {a}-{b}" if a != b else f"update {b}" for a, b in ends) or "none logged"
    lines += [
        "",
        "Figures: mean ± sample standard deviation over the seeds (n = seeds with a result). Test perplexity from "
        f"fairseq-eval-lm (context window {args.tokens_per_sample // 2}); gap to floor = the model's test "
        "cross-entropy minus the true source's; learned = (CE_unigram - CE_model) / (CE_unigram - CE_floor). "
        "Rank: 1 + the number of archs whose gap is lower by more than the combined spread (the sum of the two "
        "standard deviations), so equal ranks are not told apart; vs dense_lm: the same test on the gap "
        "(better / worse beyond the spread, else within spread).",
        f"Parameters and active FLOPs per token (forward, evaluation K, attention over {args.tokens_per_sample} "
        "keys) are counted on the model built from each arch's training flags (moe_plugin.tools.flops); "
        f"a ratio more than {EQUAL_COMPUTE_TOLERANCE:.0%} off dense_lm's is marked"
        + (" (such a row is not at equal compute)." if marked else "."),
        "Train words/s: the median of the logged intervals after the first. Load max/mean (the MoE layers' mean) "
        f"and % of token slots dropped: the last logged training interval ({end_txt}), not the average "
        "from update 1.",
        *([f"% dropped marked **(>{DROP_LIMIT:g}%)**: more than {DROP_LIMIT:g}% of the token slots exceed their "
           "expert's capacity at the end of training at the arch's default capacity factor (--moe-capacity-factor: "
           "1.25 for Switch and SAM, as in the Switch paper; 1.0 of two slots per token for GShard top-2): those "
           "tokens skip the MoE layer through the residual, a cost the row's quality includes. The router's load "
           "is max/mean above the factor in part of the batches; the demo keeps the default, "
           "`fairseq-train --moe-capacity-factor 2` (or `inf`, no dropping) can."]
          if any(_mean(r["dropped_end"]) is not None and _mean(r["dropped_end"]) > DROP_LIMIT for r in rows) else []),
        "NMI(expert; domain): I(first expert; domain) / H(first expert) of the test tokens routed by the final "
        "checkpoint in evaluation mode, each token in its document's domain (test.domains), the MoE layers' "
        "mean (moe_plugin.tools.analysis): 1 = the expert is a function of the domain, 0 = independent of it.",
        "",
    ]
    if heatmap:
        lines += [f"![expert x domain]({os.path.relpath(heatmap, args.out)})", "",
                  "Share of each domain's test tokens per expert (rows sum to 1), per MoE layer, of the best "
                  "ranked MoE arch at its first seed.", ""]
    if plot:
        lines += [f"![valid perplexity against updates]({os.path.relpath(plot, args.out)})", "",
                  "Valid perplexity of the training's validations ("
                  + (f"the first {args.valid_batches} batches of valid, " if getattr(args, "valid_batches", 0) else "")
                  + "no context window, so above what fairseq-eval-lm gives); the dashed line: the true source's.",
                  ""]
    return "\n".join(lines)


def plot_valid(runs: List[dict], floor_ppl: float, path: str, order: Sequence[str] = ()) -> Optional[str]:
    """Valid perplexity (the training's validations, the seeds' mean at their common updates)
    against updates, one line per arch, the true source's valid perplexity as a horizontal line."""
    from moe_plugin.tools import report

    by_arch: Dict[str, List[dict]] = {}
    for r in runs:
        if r["status"] == "trained" and r["valid_curve"]:
            by_arch.setdefault(r["name"], []).append(r)
    if not by_arch:
        return None
    plt = report._plt()
    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    names = [a for a in order if a in by_arch] + sorted(a for a in by_arch if a not in order)
    for arch in names:
        curve = report._mean_curve([r["valid_curve"] for r in by_arch[arch]])
        ax.plot([c[0] for c in curve], [c[3] for c in curve], marker="o", markersize=3,
                label=f"{arch} (n={len(by_arch[arch])})")
    ax.axhline(floor_ppl, color="black", linestyle="--", linewidth=1.0, label=f"true source {floor_ppl:.2f}")
    ax.set_yscale("log")
    ax.set_xlabel("updates")
    ax.set_ylabel("valid perplexity")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return report._save(plt, fig, ax, "valid perplexity (mean over seeds) and the floor", path)


def best_moe_run(rows: List[dict], runs: List[dict], baseline: str = DENSE) -> Optional[dict]:
    """The run (first seed) of the best ranked MoE arch that has an expert x domain analysis."""
    for r in rows:
        if r["arch"] == baseline or r["rank"] is None:
            continue
        for run in sorted((x for x in runs if x["name"] == r["arch"]), key=lambda x: x["seed"] or 0):
            if read_domain_figures(run["dir"]):
                return run
    return None


def plot_domains(run: dict, path: str) -> Optional[str]:
    """Heatmap per MoE layer: rows = domains, columns = experts, share of the domain's test
    tokens whose first expert is that one (rows sum to 1)."""
    import numpy as np

    from moe_plugin.tools import report

    layers = read_domain_figures(run["dir"])
    if not layers:
        return None
    plt = report._plt()
    names = sorted(layers, key=lambda n: int(re.sub(r"\D", "", n) or 0))
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names) + 1.2, 5.0), squeeze=False)
    im = None
    for ax, name in zip(axes[0], names):
        C = np.asarray(layers[name]["counts"], dtype=np.float64)
        share = C / np.maximum(C.sum(1, keepdims=True), 1)
        im = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"layer {name[1:]}: NMI {layers[name]['nmi_domain']:.2f}", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("domain")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="share of the domain's tokens")
    fig.suptitle(f"{run['name']} (seed {run['seed']}): expert x domain on test", fontsize=10)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _jsonable(x):
    from moe_plugin.tools.stats import Estimate

    if isinstance(x, Estimate):
        return {"mean": float(x), "spread": x.spread, "n": x.n, "values": list(x.values), "seeds": list(x.seeds)}
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def write_table(args, order: Sequence[str] = (), seconds: Optional[float] = None) -> List[dict]:
    """Read every run under ``args.out`` (seed<N>/<arch>/), truth.json and the corpus of
    ``args.data``, flops.json; write results.md, results.json, plots/valid_ppl.png; print the
    table; return the rows."""
    from moe_plugin.tools import report

    cfg_path = os.path.join(args.out, "demo_config.json")
    if os.path.exists(cfg_path):  # the settings the runs were trained with (--table-only may be given others)
        with open(cfg_path) as f:
            args = argparse.Namespace(**dict(vars(args), **{k: v for k, v in json.load(f).items()
                                                            if k not in ("out", "data")}))
    truth = json.load(open(os.path.join(args.data, "truth.json")))
    # CE_unigram: the training unigram's cross-entropy on test, written by data-prep/synthetic.py
    # (None for a corpus generated before it wrote it: the learned-share column is then empty)
    unigram = truth["test"].get("unigram_cross_entropy_nats")
    flops_path = os.path.join(args.out, "flops.json")
    flops = json.load(open(flops_path)) if os.path.exists(flops_path) else {}
    runs = [report.load_run(os.path.dirname(p)) for p in sorted(glob.glob(os.path.join(args.out, "seed*", "*",
                                                                                       "run.json")))]
    rows = build_rows(runs, truth, flops, unigram, order)
    plot = None
    try:
        plot = plot_valid(runs, float(truth["valid"]["perplexity"]), os.path.join(args.out, "plots", "valid_ppl.png"),
                          order)
    except ImportError as e:  # matplotlib is optional for the table
        print(f"[demo] no plot ({e})", flush=True)
    heatmap = None
    best = best_moe_run(rows, runs)
    if best is not None:
        try:
            heatmap = plot_domains(best, os.path.join(args.out, "plots", "expert_domain.png"))
        except ImportError as e:
            print(f"[demo] no heatmap ({e})", flush=True)
    md = render(rows, truth, unigram, args, seconds, plot, heatmap)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(_jsonable({"rows": rows, "truth": truth, "unigram_cross_entropy_nats": unigram, "flops": flops}),
                  f, indent=2)
    print(md)
    print(f"[demo] wrote {os.path.join(args.out, 'results.md')}" + "".join(f" and {p}" for p in (plot, heatmap) if p))
    return rows


# ----------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------


def main(argv=None):
    quiet_imports()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "results", "demo"))
    p.add_argument("--preset", default="context", choices=("calibrated", "context", "control", "none"),
                   help="the synthetic corpus (data-prep/synthetic.py --preset; docs/synthetic.md): calibrated "
                   "(32 domains of their own words), context (32 domains sharing their words: the next word "
                   "depends on the domain read from the context), control (2 domains: capacity is not the "
                   "bottleneck) or none (the script's defaults)")
    p.add_argument("--data", default=None, help="corpus directory (default: data/synthetic-<preset>); "
                   "generated and binarised when DIR/data-bin is missing")
    p.add_argument("--archs", default="default", help="comma-separated archs; 'default': " + ",".join(DEFAULT_ARCHS)
                   + " (the dense baseline, the two classic baselines and the four papers' archs: what fits "
                   "15 minutes on 2 cores); 'all': dense_lm + every registered arch (also smoe_lm, "
                   "smoe_dropout_lm, loss_free_lm, sbase_lm and later routers; not expert_choice_lm, whose "
                   "evaluation reads future tokens)")
    p.add_argument("--seeds", default="1,2", help="training seeds, comma-separated (each a run of its own)")
    p.add_argument("--data-seed", type=int, default=1, help="the synthetic corpus' seed (the same for every run)")
    p.add_argument("--max-update", type=int, default=300)
    p.add_argument("--valid-every", type=int, default=0, help="validate every N updates (0: max-update / 4)")
    p.add_argument("--valid-batches", type=int, default=10,
                   help="batches of valid per validation (fairseq's --max-valid-steps; 0: the whole valid set): "
                   "the plot's curve; the table's figures are on the whole test set")
    p.add_argument("--train-tokens", type=int, default=None, help="training tokens of the corpus (default: the preset's)")
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--ffn-dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--tokens-per-sample", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--lr", type=float, default=6e-3)
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="runs trained at a time, each with OMP_NUM_THREADS / jobs threads (default: 2 where "
                   "there are 2 CPUs: two small runs of one thread each finish sooner than one after the "
                   "other at two threads)")
    p.add_argument("--table-only", action="store_true",
                   help="render the table from the runs already in --out (no corpus, no training)")
    args = p.parse_args(argv)
    if args.data is None:
        args.data = os.path.join(ROOT, "data", f"synthetic-{args.preset}")
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as e:
        p.error(str(e))
    if args.jobs < 1:
        p.error(f"--jobs: {args.jobs} is not allowed; allowed: >= 1")
    if args.valid_batches < 0:
        p.error(f"--valid-batches: {args.valid_batches} is not allowed; allowed: >= 0 (0: the whole valid set)")
    if args.valid_every < 0:
        p.error(f"--valid-every: {args.valid_every} is not allowed; allowed: >= 0 (0: max-update / 4)")
    if args.table_only:
        write_table(args)
        return
    from moe_plugin.models.archs import ARCHS, DENSE_ARCH

    py = sys.executable
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()

    # 1. corpus ------------------------------------------------------------------------
    data_bin = os.path.join(args.data, "data-bin")
    if not os.path.exists(os.path.join(data_bin, "dict.txt")):
        print(f"[demo] generating the synthetic corpus in {args.data}", flush=True)
        gen = [py, "data-prep/synthetic.py", "--out", args.data, "--seed", str(args.data_seed)]
        gen += [] if args.preset == "none" else ["--preset", args.preset]
        gen += [] if args.train_tokens is None else ["--train-tokens", str(args.train_tokens)]
        sh(gen)
        sh([py, "-m", "fairseq_cli.preprocess", "--only-source", "--trainpref", f"{args.data}/train.txt",
            "--validpref", f"{args.data}/valid.txt", "--testpref", f"{args.data}/test.txt",
            "--destdir", data_bin, "--workers", "2"], os.path.join(args.out, "preprocess.log"))
    truth = json.load(open(os.path.join(args.data, "truth.json")))
    check_corpus(truth, args)

    # 2. FLOPs and parameters ------------------------------------------------------------
    try:
        archs = demo_archs(args.archs, ARCHS, DENSE_ARCH)
    except ValueError as e:
        p.error(str(e))
    for old in glob.glob(os.path.join(args.out, "seed*")):  # runs of an earlier demo would join the table
        shutil.rmtree(old, ignore_errors=True)
    with open(os.path.join(args.out, "demo_config.json"), "w") as f:
        json.dump({k: v for k, v in vars(args).items() if k != "table_only"}, f, indent=2)
    with open(os.path.join(args.out, "flops.json"), "w") as f:
        json.dump(count_flops(args, archs, data_bin, seeds[0]), f, indent=2)

    # 3. train + 4. evaluate, every seed (``--jobs`` runs at a time) ---------------------------
    jobs = [(arch, seed) for arch in archs for seed in seeds]
    threads = job_threads(args.jobs) if args.jobs > 1 else None
    if args.jobs > 1:
        print(f"[demo] {len(jobs)} runs, {args.jobs} at a time, {threads} thread(s) each", flush=True)
    failed, left = [], {arch: len(seeds) for arch in archs}
    t_arch = {arch: None for arch in archs}
    lock = threading.Lock()

    def one(job):
        arch, seed = job
        t_arch[arch] = t_arch[arch] or time.time()
        try:
            run_seed(arch, seed, args, py, data_bin, os.path.join(args.out, f"seed{seed}", arch), threads)
        except Exception as e:  # keep going: one broken run should not hide the others
            print(f"[demo] {arch} seed {seed}: FAILED ({e})", flush=True)
            failed.append(f"{arch}/seed{seed}")
        with lock:  # two runs of one arch may finish at once
            left[arch] -= 1
            last = not left[arch]
        if last:
            print(f"[demo] {arch}: {_arch_summary(args, arch, truth)} (true source "
                  f"{truth['test']['perplexity']:.2f}) [{time.time() - t_arch[arch]:.0f}s]", flush=True)

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        list(pool.map(one, jobs))

    # 5. report ---------------------------------------------------------------------------
    write_table(args, order=archs, seconds=time.time() - t_start)
    if failed:
        raise SystemExit(f"[demo] these runs failed (logs in {args.out}/seed<N>/<arch>): {', '.join(failed)}")


def _arch_summary(args, arch: str, truth: dict) -> str:
    from moe_plugin.tools import report, stats

    vals = []
    for p in sorted(glob.glob(os.path.join(args.out, "seed*", arch, "run.json"))):
        run = report.load_run(os.path.dirname(p))
        ev = run["evals"].get("test")
        if run["status"] == "trained" and ev is not None:
            vals.append((float(ev["ppl"]), run["seed"]))
    e = stats.aggregate([v for v, _ in vals], [s for _, s in vals])
    return f"test ppl {stats.format_estimate(e, '.3f', 'no result')}"


if __name__ == "__main__":
    main()
