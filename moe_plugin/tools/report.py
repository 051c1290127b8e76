"""Tables and plots from fairseq train / eval logs, laid out like the papers' tables.

``python -m moe_plugin.tools.report RUN_DIR... [--out DIR]``

A RUN_DIR is a directory holding a fairseq-train log (``train.log``: fairseq-train's
output, any of its log formats: simple, json, hydra's, or ``--log-file``'s bare lines)
and optionally fairseq-eval-lm logs (``eval_<name>.log``) and a ``run.json`` written by
the experiment runner (``moe_plugin/experiments/runner.py``: label, arch, dataset, unit,
which paper table). A directory with neither is searched recursively for run directories, so
``python -m moe_plugin.tools.report results/reproduce/hash_ablation/tiny`` reports a whole
experiment. Writes ``report.md``, ``report.json`` and ``plots/*.png`` (matplotlib, Agg) into
``--out`` (default: the single RUN_DIR, or the common parent of several):

* a summary of every run (valid and test perplexity, or bits per character on
  character-level data, words/s, load, dropped tokens, training time);
* the paper-style table of each experiment (``moe_plugin.experiments.EXPERIMENTS``: its
  ``table`` and ``paper``), with the papers' published numbers beside ours where they are
  known (marked unverified where they are a third party's);
* valid perplexity against updates and against wall time, per group of runs;
* expert load per layer over training (max/mean of the per-layer ``moe_l{i}_load_max``
  train metric), one plot per MoE run;
* the K sweep of ``python -m moe_plugin.tools.sweep_topk`` (its ``topk_sweep.json`` in a sub-directory;
  its table renderer and plot are reused) and the routing analyses of
  ``python -m moe_plugin.tools.analysis`` (``analysis.md`` in a sub-directory).

Seeds: the runner writes each seed of an experiment to ``OUT/seed<N>/<run>/`` (run.json
``seed``); the report groups the seed directories of one run (:func:`group_seeds`) into one
row whose figures are :class:`moe_plugin.tools.stats.Estimate`\ s (the mean over seeds,
printed "mean ± sample std (n=N)"; the curves are the seeds' mean), and ends each
experiment's table with the verdicts on its paper's claims (the experiment module's
``CLAIMS``, ``moe_plugin.tools.stats.verdicts``). A run directory without a seed (the layout
before seeds, ``OUT/<run>/``, or a hand-made one) is a row of its own, as before.

Units: fairseq logs ``nll_loss`` in bits per token (``moe_cross_entropy`` divides by
ln 2) and fairseq-eval-lm prints "Loss (base 2)"; on the character-level data-bins of
``data-prep/charlevel.py`` one token is one character, so these are bits per character
(BPC), and perplexity = 2^bits.
"""

import argparse
import glob
import json
import math
import os
import re
import statistics
import sys
from datetime import datetime
from typing import Dict, List, Optional

from moe_plugin.tools import stats
from moe_plugin.tools.stats import Estimate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# ----------------------------------------------------------------------------------------
# Log parsing
# ----------------------------------------------------------------------------------------

_TS_DEFAULT = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)")
_TS_HYDRA = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d+)\]")
_TAG_DEFAULT = re.compile(r"\| (?:INFO|WARNING) \| (train_inner|valid|train) \| (.*)$")
_TAG_HYDRA = re.compile(r"\]\[(train_inner|valid|train)\]\[(?:INFO|WARNING)\] - (.*)$")
_EVAL = re.compile(r"Loss \(base 2\): ([\d.]+), Perplexity: ([\d.]+)")
_DONE = re.compile(r"done training in ([\d.]+) seconds")


def _num(v):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return int(f) if f.is_integer() and "." not in str(v) and "e" not in str(v).lower() else f


def _timestamp(line: str) -> Optional[float]:
    m = _TS_HYDRA.match(line)
    if m:
        return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp() + int(m.group(2)) / 1000.0
    m = _TS_DEFAULT.match(line)
    if m:
        return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp()
    return None


def _classify(line: str):
    """(kind, body) of a fairseq progress line, kind in train_inner / valid / train; else None."""
    for rx in (_TAG_DEFAULT, _TAG_HYDRA):
        m = rx.search(line)
        if m:
            return m.group(1), m.group(2)
    s = line.strip()
    # --log-file's bare lines (no logger name): recognise them by their shape
    if s.startswith("{") and s.endswith("}"):
        try:
            d = json.loads(s)
        except ValueError:
            return None
        if any(k.startswith("valid_") for k in d):
            return "valid", s
        if any(k.startswith("train_") for k in d):
            return "train", s
        return ("train_inner", s) if "num_updates" in d or "update" in d else None
    if re.match(r"^epoch \d+:\s+\d+ / \d+ ", s):
        return "train_inner", s
    if re.match(r"^epoch \d+ \| valid on ", s):
        return "valid", s
    if re.match(r"^epoch \d+ \| loss ", s):
        return "train", s
    return None


def _parse_body(kind: str, body: str) -> Dict[str, object]:
    body = body.strip()
    out: Dict[str, object] = {}
    if body.startswith("{"):
        d = json.loads(body)
        for k, v in d.items():
            for prefix in ("valid_", "train_"):  # json format prefixes valid/train stats
                if kind != "train_inner" and k.startswith(prefix):
                    k = k[len(prefix):]
                    break
            out[k] = _num(v)
        if kind == "valid":
            out.setdefault("subset", "valid")
        return out
    m = re.match(r"epoch (\d+)", body)
    if m:
        out["epoch"] = int(m.group(1))
    m = re.search(r"valid on '([^']+)' subset", body)
    if m:
        out["subset"] = m.group(1)
    if kind == "train_inner" and "=" in body:
        for k, v in re.findall(r"([A-Za-z_][\w]*)=([^,\s]+)", body):
            out[k] = _num(v)
    else:
        for part in body.split(" | ")[1:]:
            kv = part.strip().split(" ", 1)
            if len(kv) == 2 and not kv[0].startswith("valid"):
                out[kv[0]] = _num(kv[1].strip())
    return out


def parse_train_log(path: str) -> Dict[str, object]:
    """train_inner / valid / train records of a fairseq-train log (dicts of numbers).

    Every record has ``ts`` (seconds since the epoch) when the line has a timestamp.
    Valid records get ``wall``: the ``wall`` of the last train_inner record before them
    plus the time elapsed since it (fairseq prints no wall time on validation lines);
    without timestamps, that train_inner record's ``wall``.
    """
    res = {"train_inner": [], "valid": [], "train": [], "done_seconds": None, "arch": None}
    last_inner = None
    with open(path, errors="replace") as f:
        for line in f:
            if res["arch"] is None:
                m = re.search(r"'model': \{'_name': '([\w-]+)'", line) or re.search(r"\barch='([\w-]+)'", line)
                if m:
                    res["arch"] = m.group(1)
            m = _DONE.search(line)
            if m:
                res["done_seconds"] = float(m.group(1))
            c = _classify(line)
            if c is None:
                continue
            kind, body = c
            try:
                rec = _parse_body(kind, body)
            except ValueError:
                continue
            ts = _timestamp(line)
            if ts is not None:
                rec["ts"] = ts
            if kind == "train_inner":
                last_inner = rec
            if kind == "valid" and last_inner is not None and "wall" in last_inner:
                wall = float(last_inner["wall"])
                if ts is not None and "ts" in last_inner:
                    wall += ts - float(last_inner["ts"])
                rec.setdefault("wall", wall)
            res[kind].append(rec)
    return res


def parse_eval_log(path: str) -> Optional[Dict[str, float]]:
    """{'loss_bits', 'ppl', 'ppl_printed'} from fairseq-eval-lm's output, or None if it has no
    result. fairseq prints the perplexity with 2 decimals and the loss with 4, so ``ppl`` is
    2 ** loss_bits (e.g. two seeds printed 4.14 and 4.14 are 4.1408 and 4.1417), the printed
    figure beside it."""
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    m = _EVAL.findall(text)
    if not m:
        return None
    bits = float(m[-1][0])
    return {"loss_bits": bits, "ppl": 2.0 ** bits, "ppl_printed": float(m[-1][1])}


# ----------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------


def layer_mean(rec: dict, name: str) -> Optional[float]:
    """Mean of the per-layer metric ``moe_l{i}_<name>`` over the layers of a log record (None if
    none); of a seed-grouped record, the Estimate over seeds of each seed's layer mean."""
    vals = [v for k, v in rec.items() if re.fullmatch(rf"moe_l\d+_{name}", k) and isinstance(v, (int, float))]
    if not vals:
        return None
    if all(isinstance(v, Estimate) for v in vals) and len({v.seeds for v in vals}) == 1:
        return Estimate([sum(per) / len(per) for per in zip(*(v.values for v in vals))], vals[0].seeds)
    vals = [float(v) for v in vals]
    return sum(vals) / len(vals)


def load_run(run_dir: str) -> dict:
    meta = {}
    if os.path.exists(os.path.join(run_dir, "run.json")):
        with open(os.path.join(run_dir, "run.json")) as f:
            meta = json.load(f)
    log = parse_train_log(os.path.join(run_dir, "train.log")) if os.path.exists(
        os.path.join(run_dir, "train.log")) else {"train_inner": [], "valid": [], "train": [], "arch": None,
                                                  "done_seconds": None}
    name = meta.get("name") or os.path.basename(os.path.normpath(run_dir))
    run = {
        "dir": run_dir, "name": name, "label": meta.get("label") or name,
        "seed": meta.get("seed"),
        "arch": meta.get("arch") or log["arch"] or "?", "group": meta.get("group", "main"),
        "script": meta.get("script"), "scale": meta.get("scale"), "dataset": meta.get("dataset", ""),
        "dataset_label": meta.get("dataset_label", meta.get("dataset", "")), "unit": meta.get("unit", "ppl"),
        "status": meta.get("status", "trained" if log["valid"] or log["train_inner"] else "not run"),
        "meta": meta.get("meta", {}), "devices": meta.get("devices"), "launcher": meta.get("launcher"),
        "order": meta.get("order", 0),
        "log": log,
    }
    valid = [r for r in log["valid"] if r.get("subset", "valid") == "valid"]
    run["valid_curve"] = [(int(r["num_updates"]), float(r.get("wall", float("nan"))), float(r["nll_loss"]),
                           float(r["ppl"])) for r in valid if "num_updates" in r and "ppl" in r and "nll_loss" in r]
    last = valid[-1] if valid else {}
    run["valid_final"] = last
    run["updates"] = int(last.get("num_updates", 0)) or (
        int(log["train_inner"][-1].get("num_updates", 0)) if log["train_inner"] else 0)
    inner = log["train_inner"]
    wps = [float(r["wps"]) for r in inner[1:] if "wps" in r] or [float(r["wps"]) for r in inner if "wps" in r]
    run["wps"] = statistics.median(wps) if wps else (float(log["train"][-1]["wps"]) if log["train"] and
                                                       "wps" in log["train"][-1] else None)
    walls = [float(r["wall"]) for r in inner + log["train"] if "wall" in r]
    run["wall"] = max(walls) if walls else None
    run["load_series"] = {}
    for r in inner:
        for k, v in r.items():
            m = re.fullmatch(r"moe_l(\d+)_load_max", k)
            if m and "num_updates" in r:
                run["load_series"].setdefault(int(m.group(1)), []).append((int(r["num_updates"]), float(v)))
    run["flops"] = None  # the runner's flops.json: active FLOPs/token and parameters of the built model
    if os.path.exists(os.path.join(run_dir, "flops.json")):
        with open(os.path.join(run_dir, "flops.json")) as f:
            run["flops"] = json.load(f)
    run["evals"] = {}
    evals = meta.get("evals") or [{"name": os.path.basename(p)[5:-4], "label": os.path.basename(p)[5:-4],
                                   "log": os.path.basename(p)} for p in sorted(glob.glob(os.path.join(run_dir,
                                                                                                     "eval_*.log")))]
    for ev in evals:
        res = parse_eval_log(os.path.join(run_dir, ev["log"]))
        if res is not None:
            run["evals"][ev["name"]] = dict(res, label=ev.get("label", ev["name"]))
    return run


def _mean_record(recs: List[dict], seeds: list) -> dict:
    """The per-seed records' numeric fields as Estimates over the seeds that have them."""
    out = {}
    for k in dict.fromkeys(k for r in recs for k in r):
        vals = [(r[k], s) for r, s in zip(recs, seeds) if isinstance(r.get(k), (int, float))
                and not isinstance(r.get(k), bool)]
        if vals:
            e = stats.aggregate([v for v, _ in vals], [s for _, s in vals])
            if e is not None:
                out[k] = e
        elif recs and k in recs[0]:
            out[k] = recs[0][k]
    return out


def _mean_curve(curves: List[list]) -> list:
    """The mean over seeds of curves of (update, value...) tuples, at the updates every curve has."""
    if not curves:
        return []
    common = set.intersection(*({c[0] for c in curve} for curve in curves))
    by = [{c[0]: c for c in curve} for curve in curves]
    out = []
    for u in sorted(common):
        cols = list(zip(*(b[u][1:] for b in by)))
        out.append((u, *[math.fsum(col) / len(col) for col in cols]))
    return out


def group_seeds(runs: List[dict]) -> List[dict]:
    """One row per run: the seed directories of one run (run.json ``seed``, the runner's
    ``OUT/seed<N>/<run>``) merged into a run dict of the same keys whose figures are
    Estimates over its seeds (valid record, evaluations, words/s, wall time, the last train
    record; curves: the seeds' mean at their common updates), with ``seeds`` = the per-seed
    runs; a run without a seed stays as it is. In the order of each group's first run."""
    groups: Dict[tuple, List[dict]] = {}
    for r in runs:
        if r.get("seed") is None:
            groups[("dir", r["dir"])] = [r]
            continue
        root = os.path.dirname(os.path.dirname(os.path.normpath(r["dir"])))  # OUT of OUT/seed<N>/<run>
        groups.setdefault(("seeds", root, r["script"], r["scale"], r["name"]), []).append(r)
    out = []
    for key, rs in groups.items():
        if key[0] == "dir":
            out.append(rs[0])
            continue
        rs = sorted(rs, key=lambda r: r["seed"])
        done = [r for r in rs if r["status"] != "not run"] or rs
        seeds = [r["seed"] for r in done]
        first = done[0]
        m = dict(first)
        m.update({
            "dir": os.path.join(key[1], first["name"]), "seeds": rs, "seed": None, "seed_list": seeds,
            "status": first["status"] if all(r["status"] == "not run" for r in rs) else next(
                r["status"] for r in rs if r["status"] != "not run"),
            "valid_final": _mean_record([r["valid_final"] for r in done], seeds),
            "valid_curve": _mean_curve([r["valid_curve"] for r in done]),
            "updates": min(r["updates"] for r in done),
            "wps": stats.aggregate([r["wps"] for r in done], seeds),
            "wall": stats.aggregate([r["wall"] for r in done], seeds),
            "load_series": {layer: _mean_curve([r["load_series"].get(layer, []) for r in done])
                            for layer in sorted({k for r in done for k in r["load_series"]})},
            "evals": {},
        })
        for name in dict.fromkeys(n for r in done for n in r["evals"]):
            have = [(r["evals"][name], r["seed"]) for r in done if name in r["evals"]]
            ev = _mean_record([e for e, _ in have], [s for _, s in have])
            ev["label"] = have[0][0].get("label", name)
            m["evals"][name] = ev
        last_train = [(r["log"]["train"][-1], r["seed"]) for r in done if r["log"]["train"]]
        m["log"] = {"train_inner": [], "valid": [], "arch": first["log"].get("arch"), "done_seconds": None,
                    "train": [_mean_record([t for t, _ in last_train], [s for _, s in last_train])]
                    if last_train else []}
        out.append(m)
    return out


def find_run_dirs(paths: List[str]) -> List[str]:
    out = []
    for p in paths:
        if not os.path.isdir(p):
            raise SystemExit(f"{p}: not a directory")
        if os.path.exists(os.path.join(p, "train.log")) or os.path.exists(os.path.join(p, "run.json")):
            out.append(p)
            continue
        for root, dirs, files in os.walk(p):
            dirs[:] = sorted(d for d in dirs if d not in ("checkpoints", "plots"))
            if "train.log" in files or "run.json" in files:
                out.append(root)
                dirs[:] = []
    return out


# ----------------------------------------------------------------------------------------
# Formatting helpers
# ----------------------------------------------------------------------------------------


def fmt(v, spec=".2f", none="-"):
    """``format(v, spec)``; an Estimate (a seed mean) as "mean ± spread (n=N)"; ``none`` for no value."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    return format(v, spec)


def _figure(v):
    """A log figure as a float (an Estimate over seeds stays one)."""
    return v if isinstance(v, Estimate) else float(v)


def metric_value(run: dict, kind: str = "valid", eval_name: str = "test") -> Optional[float]:
    """The run's quality figure in its unit: perplexity, or bits per character (of a
    seed-grouped run: the Estimate over its seeds)."""
    if kind == "valid":
        v = run["valid_final"]
        if not v:
            return None
        return _figure(v["nll_loss"]) if run["unit"] == "bpc" else _figure(v["ppl"])
    ev = run["evals"].get(eval_name)
    if ev is None:
        return None
    return ev["loss_bits"] if run["unit"] == "bpc" else ev["ppl"]


def unit_name(unit: str) -> str:
    return "BPC" if unit == "bpc" else "ppl"


def value_at_wall(run: dict, t: float) -> Optional[float]:
    """Valid figure (in the run's unit) linearly interpolated at wall time t (None outside); of
    a seed-grouped run, the Estimate over the seeds whose curves reach t."""
    if run.get("seeds"):
        vals = [(value_at_wall(r, t), r["seed"]) for r in run["seeds"]]
        return stats.aggregate([v for v, _ in vals], [s for _, s in vals])
    pts = [(w, (nll if run["unit"] == "bpc" else ppl)) for (_u, w, nll, ppl) in run["valid_curve"] if not math.isnan(w)]
    if not pts or t < pts[0][0] - 1e-9 or t > pts[-1][0] + 1e-9:
        return None
    for (w0, v0), (w1, v1) in zip(pts, pts[1:]):
        if w0 <= t <= w1:
            return v0 if w1 == w0 else v0 + (v1 - v0) * (t - w0) / (w1 - w0)
    return pts[-1][1]


def summary_table(runs: List[dict]) -> List[str]:
    eval_names = []
    for r in runs:
        for n in r["evals"]:
            if n not in eval_names:
                eval_names.append(n)
    head = ["run", "arch", "data", "updates", "valid"] + [f"{n}" for n in eval_names] + [
        "words/s", "load max/mean (valid)", "% dropped (train)", "train time", "total params",
        "FLOPs/token (eval)", "vs first row"]
    first_flops = {}  # (script, dataset) -> the first counted row's active FLOPs/token in evaluation
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    for r in runs:
        if r["status"] == "not run":
            lines.append(f"| {r['label']} | {r['arch']} | {r['dataset_label']} | not run | " + " | ".join(
                ["-"] * (len(head) - 4)) + " |")
            continue
        u = unit_name(r["unit"])
        cells = [r["label"], r["arch"], r["dataset_label"], str(r["updates"]),
                 f"{fmt(metric_value(r), '.3f')} {u}"]
        for n in eval_names:
            ev = r["evals"].get(n)
            cells.append(f"{fmt(metric_value(r, 'eval', n), '.3f')}" if ev else "-")
        last_train = r["log"]["train"][-1] if r["log"]["train"] else {}
        cells += [fmt(r["wps"], ".0f"), fmt(r["valid_final"].get("moe_load_max"), ".2f"),
                  fmt(last_train.get("moe_dropped"), ".2f"), fmt(r["wall"], ".0f", "-") + " s"]
        cells += flops_cells(r.get("flops"), first_flops, (r["script"], r["dataset"]))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


#: relative difference of active FLOPs/token beyond which two rows are not at equal compute
FLOPS_TOLERANCE = stats.EQUAL_COMPUTE_TOLERANCE


def flops_cells(fl: Optional[dict], first: Dict[tuple, float], key: tuple) -> List[str]:
    """Total params, active FLOPs/token in evaluation and the ratio to the first counted row of
    the same experiment and dataset (``first``, filled here), marked beyond FLOPS_TOLERANCE."""
    if not fl:
        return ["-", "-", "-"]
    f = float(fl["active_flops_per_token"]["eval"])
    base = first.setdefault(key, f)
    ratio = f / base if base else float("nan")
    mark = f" **(>{FLOPS_TOLERANCE:.0%} off)**" if abs(ratio - 1.0) > FLOPS_TOLERANCE else ""
    return [f"{int(fl['total_params']):,}", f"{f / 1e6:.3f}M", f"{ratio:.3f}x{mark}"]


# ----------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------


def _plt():
    import logging

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, ax, title: str, path: str) -> str:
    """Title, grid and legend, then the figure written to path and closed."""
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_valid(runs: List[dict], path: str, x: str, title: str) -> Optional[str]:
    """Valid figure (ppl or BPC) against updates (x='updates') or wall seconds (x='wall')."""
    pts_any = False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in runs:
        curve = r["valid_curve"]
        if not curve:
            continue
        xs = [c[0] if x == "updates" else c[1] for c in curve]
        ys = [c[2] if r["unit"] == "bpc" else c[3] for c in curve]
        ok = [(a, b) for a, b in zip(xs, ys) if not math.isnan(a)]
        if not ok:
            continue
        ax.plot([a for a, _ in ok], [b for _, b in ok], marker="o", markersize=3, label=r["label"])
        pts_any = True
    if not pts_any:
        plt.close(fig)
        return None
    unit = runs[0]["unit"]
    ax.set_xlabel("updates" if x == "updates" else "training wall time (s)")
    ax.set_ylabel("valid bits per character" if unit == "bpc" else "valid perplexity")
    all_y = [c[2] if r["unit"] == "bpc" else c[3] for r in runs for c in r["valid_curve"]]
    if unit != "bpc" and all_y and min(all_y) > 0 and max(all_y) / min(all_y) > 5:
        ax.set_yscale("log")
    return _save(plt, fig, ax, title, path)


def plot_load(run: dict, path: str) -> Optional[str]:
    """Per-layer expert load (max/mean of tokens per expert) over training."""
    if not run["load_series"]:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    for layer in sorted(run["load_series"]):
        pts = run["load_series"][layer]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=f"layer {layer}")
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xlabel("updates")
    ax.set_ylabel("expert load max/mean")
    return _save(plt, fig, ax, f"{run['label']}: expert load per layer (train)", path)


# ----------------------------------------------------------------------------------------
# K sweep and routing analysis sections
# ----------------------------------------------------------------------------------------


def sweep_section(sweep_json: str, plots_dir: str, unit: str = "ppl") -> List[str]:
    """The K sweep of ``python -m moe_plugin.tools.sweep_topk``: its table (and, on character-level data, the same
    in bits per character) and its plot, redrawn into plots/."""
    with open(sweep_json) as f:
        data = json.load(f)
    ks, rows = data["ks"], data["rows"]
    from moe_plugin.tools import sweep_topk as sweep

    name = os.path.basename(os.path.dirname(sweep_json))
    parent = os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(sweep_json))))
    if re.fullmatch(r"seed\d+", parent):  # one sweep per seed (OUT/seed<N>/sweep_*): told apart
        name = f"{name}_{parent}"
    lines = [f"### K sweep: {name}", "", f"Perplexity at inference with K experts per token "
             f"(moe_plugin.tools.sweep_topk; {os.path.relpath(sweep_json)}).", "", sweep.render_table(rows, ks), ""]
    if unit == "bpc":
        lines += ["Bits per character:", "", "| checkpoint | " + " | ".join(f"K={k}" for k in ks) + " |",
                  "|---|" + "---:|" * len(ks)]
        for r in rows:
            cells = [fmt(r.get("fixed_loss"), ".3f") if not r["has_eval_k"] else fmt(r["loss"].get(str(k)), ".3f")
                     for k in ks]
            lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
        lines.append("")
    png = os.path.join(plots_dir, f"topk_{name}.png")
    sweep.plot(rows, ks, png, f"{name}: perplexity vs K at inference")
    lines += [f"![K sweep {name}](plots/{os.path.basename(png)})", ""]
    return lines


def analysis_section(analysis_md: str) -> List[str]:
    """The per-layer load and routing-change tables of an analysis.md (the rest linked)."""
    with open(analysis_md) as f:
        text = f.read()
    keep, out = False, []
    for line in text.splitlines():
        if line.startswith("## "):
            keep = line.startswith("## Load per layer") or line.startswith("## Routing change")
            if keep:
                out.append("##" + line)
            continue
        if keep:
            out.append(line)
    title = text.splitlines()[0].lstrip("# ") if text else analysis_md
    parent = os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(analysis_md))))
    if re.fullmatch(r"seed\d+", parent):  # one analysis per seed (OUT/seed<N>/analysis_*)
        title += f" ({parent})"
    return [f"### {title}", "", *out, f"Per-expert tokens: {os.path.relpath(analysis_md)}", ""]


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------


def claims_of(experiment, scale: Optional[str]) -> list:
    """The paper's claims of a registered experiment at ``scale``: its module's ``CLAIMS`` (a
    list, or a dict scale -> list; none when the module declares none)."""
    import importlib

    module = importlib.import_module(experiment.build_plan.__module__)
    return stats.claims_for(getattr(module, "CLAIMS", ()), scale)


def claims_section(experiment, runs: List[dict]) -> List[str]:
    """The verdicts on the experiment's claims, per scale among ``runs`` (seed-grouped runs)."""
    lines = []
    for scale in dict.fromkeys(r["scale"] for r in runs):
        claims = claims_of(experiment, scale)
        if claims:
            rs = [r for r in runs if r["scale"] == scale]
            seeds = sorted({s for r in rs for s in (r.get("seed_list") or [])})
            title = "The paper's claims" + (f" at {scale} scale" if scale else "") + (f" (seeds {', '.join(map(str, seeds))})" if seeds
                                                               else " (one run each: no spread)")
            lines += stats.verdicts(claims, rs, title=title)
    return lines


def build_report(run_dirs: List[str], out: str, title: str = "") -> str:
    runs = group_seeds([load_run(d) for d in run_dirs])
    # the scripts' order (run.json "order"), then the directories' order
    runs = [r for _, r in sorted(enumerate(runs), key=lambda ir: (ir[1]["script"] or "", ir[1]["order"], ir[0]))]
    plots = os.path.join(out, "plots")
    os.makedirs(plots, exist_ok=True)
    scripts = sorted({r["script"] for r in runs if r["script"]})
    scale = sorted({r["scale"] for r in runs if r["scale"]})
    lines = [f"# {title or ('Reproduction report: ' + ', '.join(scripts) if scripts else 'Training report')}", ""]
    if scale:
        lines += [f"Scale: {', '.join(scale)}. Generated by `python -m moe_plugin.tools.report` from the fairseq logs in "
                  f"{', '.join(sorted({os.path.relpath(os.path.dirname(r['dir'])) for r in runs}))}.", ""]
    from moe_plugin.experiments import EXPERIMENTS  # the paper tables and their published numbers

    for script in scripts:
        rs = [r for r in runs if r["script"] == script]
        if script in EXPERIMENTS and rs:
            lines += [f"## {script}", ""] + EXPERIMENTS[script].table(rs) + claims_section(EXPERIMENTS[script], rs)
    lines += ["## All runs", ""] + summary_table(runs) + [
        "", "valid: last validation of the train log; test columns: fairseq-eval-lm (per evaluation); "
        "BPC rows are bits per character. words/s: median over the train log's intervals. A run of several seeds: "
        "mean ± sample standard deviation over its seeds (n = seeds with the figure). Total params and active "
        "forward FLOPs per token in evaluation: counted by the runner on the model built from the run's training "
        "flags (moe_plugin.tools.flops; flops.json); vs first row: the ratio to the first counted row of the same "
        f"experiment and data, marked when more than {FLOPS_TOLERANCE:.0%} off (not at equal compute).", ""]
    # curves per group
    groups = []
    for r in runs:
        key = (r["script"] or "", r["group"])
        if key not in groups:
            groups.append(key)
    fig_lines = []
    for script, group in groups:
        rs = [r for r in runs if (r["script"] or "") == script and r["group"] == group]
        units = {r["unit"] for r in rs}
        for unit in sorted(units):
            sub = [r for r in rs if r["unit"] == unit]
            tag = "_".join(x for x in (script, group, unit if len(units) > 1 else "") if x) or "runs"
            for x in ("updates", "wall"):
                p = plot_valid(sub, os.path.join(plots, f"valid_vs_{x}_{tag}.png"), x,
                               f"{script or 'runs'} / {group}: valid {unit_name(unit)} vs "
                               f"{'updates' if x == 'updates' else 'wall time'}")
                if p:
                    fig_lines.append(f"![valid vs {x}: {tag}](plots/{os.path.basename(p)})")
    load_lines = []
    for r in runs:
        p = plot_load(r, os.path.join(plots, f"load_{r['name']}.png"))
        if p:
            load_lines.append(f"![load {r['name']}](plots/{os.path.basename(p)})")
    if fig_lines:
        lines += ["## Validation curves", ""] + fig_lines + [""]
    if load_lines:
        lines += ["## Expert load per layer over training", "",
                  "max/mean of the tokens per expert of each MoE layer (`moe_l{i}_load_max` of the train log; "
                  "1.0 = perfectly balanced).", ""] + load_lines + [""]
    # K sweeps and analyses anywhere under the report's inputs
    roots = sorted({os.path.dirname(os.path.normpath(d)) for d in run_dirs} | {out})
    sweeps, analyses = set(), set()
    for root in roots:
        sweeps.update(glob.glob(os.path.join(root, "*", "topk_sweep.json")))
        analyses.update(glob.glob(os.path.join(root, "*", "analysis.md")))
    if sweeps:
        lines += ["## K sweep (experts per token at inference)", ""]
        for s in sorted(sweeps):
            unit = "ppl"
            with open(s) as f:
                ckpts = [row.get("checkpoint", "") for row in json.load(f)["rows"]]
            root = ROOT  # sweep_topk runs from here
            paths = [p for c in ckpts for p in (os.path.abspath(c), os.path.join(root, c))]
            for r in runs:
                if any(p.startswith(os.path.abspath(d["dir"]) + os.sep) for p in paths for d in r.get("seeds") or [r]):
                    unit = r["unit"]
            lines += sweep_section(s, plots, unit)
    if analyses:
        lines += ["## Routing analysis", ""]
        for a in sorted(analyses):
            lines += analysis_section(a)
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "report.json"), "w") as f:  # one record per run directory (per seed)
        json.dump([{k: v for k, v in d.items() if k != "log"} for r in runs for d in r.get("seeds") or [r]], f,
                  indent=1, default=str)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m moe_plugin.tools.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", help="run directories (or directories containing them)")
    p.add_argument("--out", default=None, help="output directory (default: the RUN_DIR, or the common parent)")
    p.add_argument("--title", default="")
    p.add_argument("--quiet", action="store_true", help="do not print the report")
    args = p.parse_args(argv)
    dirs = find_run_dirs(args.run_dirs)
    if not dirs:
        raise SystemExit(f"no run directory (with train.log or run.json) under {args.run_dirs}")
    out = args.out or (args.run_dirs[0] if len(args.run_dirs) == 1 else os.path.commonpath(
        [os.path.abspath(d) for d in args.run_dirs]))
    text = build_report(dirs, out, args.title)
    if not args.quiet:
        print(text)
    print(f"[report] {len(dirs)} run(s) -> {os.path.join(out, 'report.md')} (+ report.json, plots/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
