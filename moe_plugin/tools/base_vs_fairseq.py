#!/usr/bin/env python3
"""BASE layers, moe_plugin vs fairseq (run as ``scripts/bench_base_vs_fairseq.py`` or
``python -m moe_plugin.tools.base_vs_fairseq``): train words/s and validation loss of the same model.

Two sides, each on 2 CPU ranks over gloo (``--distributed-no-spawn``; rank 1 started in the
background, then rank 0; a fresh free port per run; OMP_NUM_THREADS=1):

  fairseq  ``--arch transformer_lm --base-layers 1 --criterion cross_entropy`` (fairseq's own
           BaseLayer: one expert per rank, libbase assignment)
  ours     ``--user-dir moe_plugin --arch base_lm --base-layers 1 --moe-expert-count 2
           --moe-expert-parallel --criterion moe_cross_entropy`` (one expert per rank)

Everything else is shared (:func:`shared_flags`): pre-LN (``--decoder-normalize-before``, which
base_lm's arch sets anyway through fairseq's ``base_lm_architecture``), ``--decoder-input-dim``
= ``--decoder-output-dim`` = the embedding dim, the same data, seed, optimizer and updates;
``--base-shuffle`` at both sides' default (on). Default shape: docs/base_layers.md, section
"Side by side with fairseq's own --base-layers" (2 layers, d=64, FFN 256, 2 heads, blocks of
64 tokens, 2048 tokens per rank and batch, Adam lr 3e-3, inverse-sqrt warm-up 40, clip 1.0),
with fewer updates (``--updates``, default 80).

Data: fairseq's BASE all-to-all needs the same token count on every rank in every batch, so
the training text is cut to a multiple of W x --max-tokens (the recipe of docs/base_layers.md)
under data/bench-base/ (made once, reused when present).

Runs are interleaved (fairseq, ours, fairseq, ours, ... ``--repeats`` pairs). Words/s of one
run: the steady-state rate of rank 0's ``train_inner`` lines (fairseq's per-interval ``wps``,
every interval but the first, i.e. the tokens of those intervals over their time; warm-up
and the final validation excluded); the epoch summary's ``wps`` (which counts the time of the
final validation too) is kept in the JSON as ``summary_wps``. Valid loss: fairseq's
validation after the last update (bits per token; greedy routing on both sides). Reported:
the median words/s of each side, the ratio ours/fairseq of each adjacent pair, its median
and min-max, and both losses.

``--profile``: after the timed runs (or alone with ``--profile-only``), each side once more
on 2 ranks, in a harness that builds the model, criterion and trainer with fairseq's own
builders (``fairseq.distributed.utils.call_main``, ``tasks.setup_task``, ``Trainer``) from the
same flags and times ``Trainer.train_step``: ms per step, the forward time of each component
(PyTorch forward hooks on the decoder's modules and the criterion), the collectives per
step, and torch.profiler's top ops by self CPU time.

  python scripts/bench_base_vs_fairseq.py --repeats 2 --markdown results/bench_base_vs_fairseq.md
  python scripts/bench_base_vs_fairseq.py --profile-only --updates 30
"""

import argparse
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time

from moe_plugin.tools.commands import ROOT  # noqa: E402  (the repository root)
SIDES = ("fairseq", "ours")


# ----------------------------------------------------------------------------- flags

def shared_flags(args, data_bin):
    """Flags both sides get, in the same order (the test asserts the sides differ only in
    :func:`side_flags`)."""
    d = str(args.dim)
    return [
        data_bin, "--task", "language_modeling", "--cpu", "--seed", str(args.seed), "--num-workers", "0",
        "--decoder-layers", str(args.layers), "--decoder-embed-dim", d, "--decoder-ffn-embed-dim", str(args.ffn),
        "--decoder-attention-heads", str(args.heads), "--decoder-input-dim", d, "--decoder-output-dim", d,
        "--decoder-normalize-before", "--tokens-per-sample", str(args.tokens_per_sample),
        "--max-tokens", str(args.max_tokens), "--base-layers", "1", "--base-shuffle", str(args.base_shuffle),
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", str(args.lr), "--lr-scheduler", "inverse_sqrt",
        "--warmup-updates", str(args.warmup), "--clip-norm", "1.0", "--max-update", str(args.updates),
        "--log-format", "simple", "--log-interval", str(args.log_interval), "--no-save",
        "--distributed-world-size", "2", "--distributed-backend", "gloo", "--distributed-no-spawn",
        "--ddp-backend", "legacy_ddp",
    ]


def side_flags(side):
    if side == "fairseq":
        return ["--arch", "transformer_lm", "--criterion", "cross_entropy"]
    if side == "ours":
        return ["--user-dir", os.path.join(ROOT, "moe_plugin"), "--arch", "base_lm", "--criterion", "moe_cross_entropy",
                "--moe-expert-count", "2", "--moe-expert-parallel"]
    if side == "ours-ce":  # diagnostic: ours with fairseq's plain criterion (BASE has no aux loss: the same
        # loss; what moe_cross_entropy's routing stats cost)
        return ["--user-dir", os.path.join(ROOT, "moe_plugin"), "--arch", "base_lm", "--criterion", "cross_entropy",
                "--moe-expert-count", "2", "--moe-expert-parallel"]
    if side == "dense":  # reference only: fairseq's model without the BASE block (what no BASE layer costs)
        return ["--arch", "transformer_lm", "--criterion", "cross_entropy", "--base-layers", "0"]
    raise ValueError(side)


def rank_flags(port, rank):
    return ["--distributed-init-method", f"tcp://127.0.0.1:{port}", "--distributed-rank", str(rank)]


def train_command(args, data_bin, side, port, rank):
    return [sys.executable, "-m", "fairseq_cli.train", *shared_flags(args, data_bin), *side_flags(side),
            *rank_flags(port, rank)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    return e


# ----------------------------------------------------------------------------- data

def prepare_data(args, log=print):
    """data/bench-base/data-bin-even: the synthetic corpus, training part cut to
    ``W * max_tokens * epoch_batches`` tokens (every rank gets full batches); made once."""
    out = os.path.join(ROOT, args.data)
    world = 2
    target = world * args.max_tokens * args.epoch_batches
    even_bin = os.path.join(out, f"data-bin-even-{target}")
    if os.path.exists(os.path.join(even_bin, "train.bin")) and os.path.exists(os.path.join(even_bin, "valid.bin")):
        return even_bin
    text = os.path.join(out, "text")
    py = sys.executable
    if not os.path.exists(os.path.join(text, "train.txt")) or _count_tokens(os.path.join(text, "train.txt")) < target + 10000:
        log(f"[bench-base] generating the corpus under {text}")
        subprocess.run([py, "data-prep/synthetic.py", "--out", text, "--seed", "1", "--train-tokens",
                        str(int(target * 1.05) + 20000), "--valid-tokens", str(args.valid_tokens),
                        "--test-tokens", "10000"], cwd=ROOT, env=env(), check=True, stdout=subprocess.DEVNULL)
    lines = [ln for ln in open(os.path.join(text, "train.txt")).read().split("\n") if ln.strip()]
    keep, total = [], 0
    for ln in lines:  # fairseq appends </s> to every line: a line counts len + 1 tokens
        if total + len(ln.split()) + 1 > target:
            break
        keep.append(ln)
        total += len(ln.split()) + 1
    words = lines[len(keep)].split()
    while len(words) < target - total - 1:
        words += words
    keep.append(" ".join(words[: target - total - 1]))
    even_txt = os.path.join(text, f"train_even_{target}.txt")
    with open(even_txt, "w") as f:
        f.write("\n".join(keep) + "\n")
    full_bin = os.path.join(out, "data-bin")
    pre = [py, "-m", "fairseq_cli.preprocess", "--only-source", "--workers", "1"]
    if not os.path.exists(os.path.join(full_bin, "dict.txt")):
        subprocess.run([*pre, "--trainpref", f"{text}/train.txt", "--validpref", f"{text}/valid.txt",
                        "--destdir", full_bin], cwd=ROOT, env=env(), check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    subprocess.run([*pre, "--trainpref", even_txt, "--validpref", f"{text}/valid.txt", "--destdir", even_bin,
                    "--srcdict", os.path.join(full_bin, "dict.txt")], cwd=ROOT, env=env(), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return even_bin


def _count_tokens(path):
    with open(path) as f:
        return sum(len(ln.split()) + 1 for ln in f if ln.strip())


# ----------------------------------------------------------------------------- logs

_INNER = re.compile(r"\| INFO \| train_inner \| (.*)$", re.M)
_SUMMARY = re.compile(r"\| INFO \| train \| (.*)$", re.M)
_VALID = re.compile(r"\| INFO \| valid \| (.*)$", re.M)
_PARAMS = re.compile(r"num\. (?:shared |expert )?model params: ([\d,]+)")


def _fields(text):
    """'epoch 001:     20 / 120 loss=8.1, ppl=274, wps=13000, ...' or '... | loss 7.04 | wps 12 |'
    -> {name: float}."""
    out = {}
    for m in re.finditer(r"(\w+)[= ]([-\d.]+(?:e[-+]?\d+)?)(?=\s*[,|]|\s*$)", text):
        try:
            out[m.group(1)] = float(m.group(2))
        except ValueError:
            pass
    return out


def parse_log(text):
    """Rank 0's fairseq-train log -> {"wps": steady-state words/s (train_inner intervals after
    the first), "summary_wps", "train_wall", "updates", "valid_loss" (bits), "train_loss",
    "params"}; missing figures are None."""
    inner = [_fields(m.group(1)) for m in _INNER.finditer(text)]
    summary = [_fields(m.group(1)) for m in _SUMMARY.finditer(text)]
    valid = [_fields(m.group(1)) for m in _VALID.finditer(text)]
    steady = inner[1:] if len(inner) > 1 else inner
    tokens = seconds = 0.0
    prev = inner[0]["num_updates"] if len(inner) > 1 else 0.0
    for row in steady:
        if not row.get("wps"):
            continue
        n = row["num_updates"] - prev
        prev = row["num_updates"]
        tokens += n * row["wpb"]
        seconds += n * row["wpb"] / row["wps"]
    params = [int(m.group(1).replace(",", "")) for m in _PARAMS.finditer(text)]
    last = summary[-1] if summary else {}
    return {
        "wps": tokens / seconds if seconds else None,
        "summary_wps": last.get("wps"),
        "train_wall": sum(s.get("train_wall", 0.0) for s in summary) or None,
        "updates": int(last["num_updates"]) if "num_updates" in last else None,
        "train_loss": last.get("loss"),
        "valid_loss": valid[-1].get("loss") if valid else None,
        "params": sum(params) if params else None,  # shared + expert, this rank
    }


# ----------------------------------------------------------------------------- runs

def run_side(args, data_bin, side, logdir, tag):
    """One 2-rank run; returns the parsed rank-0 log (plus "error" on failure)."""
    port = free_port()
    logs = [os.path.join(logdir, f"{tag}.rank{r}.log") for r in (0, 1)]
    with open(logs[1], "w") as f1:
        p1 = subprocess.Popen(train_command(args, data_bin, side, port, 1), cwd=ROOT, env=env(), stdout=f1,
                              stderr=subprocess.STDOUT)
        t0 = time.time()
        try:
            with open(logs[0], "w") as f0:
                p0 = subprocess.run(train_command(args, data_bin, side, port, 0), cwd=ROOT, env=env(), stdout=f0,
                                    stderr=subprocess.STDOUT, timeout=args.timeout)
            rc1 = p1.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p1.kill()
            p1.wait()
            return {"error": f"timed out after {args.timeout}s", "log": logs[0]}
        finally:
            if p1.poll() is None:
                p1.kill()
                p1.wait()
    text = open(logs[0]).read()
    row = parse_log(text)
    row["seconds"] = round(time.time() - t0, 1)
    row["log"] = os.path.relpath(logs[0], ROOT)
    finished = "done training" in text and row["wps"] is not None and row["valid_loss"] is not None
    if not finished:
        row["error"] = f"exit {p0.returncode}/{rc1}: " + text[-600:]
    elif p0.returncode != 0 or rc1 != 0:
        # trained and validated, then died in teardown (seen once in ~20 runs: "terminate called
        # without an active exception", SIGABRT, after "done training"): the figures stand
        row["exit_warning"] = f"exit {p0.returncode}/{rc1} after training finished"
    return row


def summarize(runs):
    """runs: [{"side", "repeat", "wps", "valid_loss", ...}] -> the summary row."""
    by = {s: [r for r in runs if r["side"] == s and not r.get("error")] for s in SIDES}
    ratios = []
    for f in by["fairseq"]:
        o = next((r for r in by["ours"] if r["repeat"] == f["repeat"]), None)
        if o is not None:
            ratios.append(o["wps"] / f["wps"])
    out = {"kind": "summary", "n": {s: len(by[s]) for s in SIDES}}
    for s in SIDES:
        w = [r["wps"] for r in by[s]]
        v = [r["valid_loss"] for r in by[s] if r["valid_loss"] is not None]
        out[f"{s}_wps"] = statistics.median(w) if w else None
        out[f"{s}_wps_range"] = [min(w), max(w)] if w else None
        out[f"{s}_valid_loss"] = statistics.median(v) if v else None
    dense = [r["wps"] for r in runs if r["side"] == "dense" and not r.get("error")]
    if dense:  # the ceiling: fairseq's model without its BASE block, over fairseq with it
        out["dense_wps"] = statistics.median(dense)
        out["dense_over_fairseq"] = out["dense_wps"] / out["fairseq_wps"] if out["fairseq_wps"] else None
    out["ratio"] = statistics.median(ratios) if ratios else None
    out["ratio_range"] = [min(ratios), max(ratios)] if ratios else None
    out["ratios"] = ratios
    if out["fairseq_valid_loss"] is not None and out["ours_valid_loss"] is not None:
        out["valid_loss_diff"] = out["ours_valid_loss"] - out["fairseq_valid_loss"]
    return out


def machine():
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPU cores, 1 thread per rank (torch {torch.__version__})"


def config_line(args):
    return (f"{args.layers} layers, d={args.dim}, FFN {args.ffn}, {args.heads} heads, one BASE layer (FFN {args.ffn}, "
            f"1 sublayer, E=2: one expert per rank), blocks of {args.tokens_per_sample} tokens, {args.max_tokens} tokens "
            f"per rank and batch, Adam lr {args.lr}, inverse-sqrt warm-up {args.warmup}, clip 1.0, {args.updates} "
            f"updates, seed {args.seed}, --base-shuffle {args.base_shuffle}, 2 gloo ranks")


def markdown(args, runs, summary, profiles):
    out = [f"Machine: {machine()}.", "", f"Config: {config_line(args)}.", ""]
    if runs:
        out += ["### BASE layers: moe_plugin `base_lm --moe-expert-parallel` vs fairseq `transformer_lm --base-layers 1`",
                "",
                "Words/s: rank 0's steady-state rate (fairseq's `train_inner` wps over every log interval but the "
                "first); valid loss in bits after the last update.", "",
                "| repeat | side | words/s | epoch-summary wps | valid loss (bits) | params (rank 0) | run s |",
                "|---:|---|---:|---:|---:|---:|---:|"]
        for r in runs:
            if r.get("error"):
                out.append(f"| {r['repeat']} | {r['side']} | error: {r['error'][:80]!r} | | | | |")
                continue
            vl = "-" if r["valid_loss"] is None else f"{r['valid_loss']:.3f}"
            sw = "-" if r["summary_wps"] is None else f"{r['summary_wps']:.0f}"
            pr = "-" if r["params"] is None else f"{r['params']:,}"
            out.append(f"| {r['repeat']} | {r['side']} | {r['wps']:.0f} | {sw} | {vl} | {pr} | {r['seconds']} |")
        out.append("")
    if summary and summary.get("ratio") is not None:
        s = summary
        fr, orr, rr = s["fairseq_wps_range"], s["ours_wps_range"], s["ratio_range"]
        diff = "-" if s.get("valid_loss_diff") is None else f"{s['valid_loss_diff']:+.3f} bits"
        out += ["| | fairseq | ours | ours/fairseq |", "|---|---:|---:|---:|",
                f"| words/s, median (min-max) | {s['fairseq_wps']:.0f} ({fr[0]:.0f}-{fr[1]:.0f}) | "
                f"{s['ours_wps']:.0f} ({orr[0]:.0f}-{orr[1]:.0f}) | {s['ratio']:.3f}x ({rr[0]:.3f}-{rr[1]:.3f}) |",
                f"| valid loss (bits), median | {_f(s['fairseq_valid_loss'])} | {_f(s['ours_valid_loss'])} | {diff} |",
                ""]
        if s.get("dense_wps"):
            out += [f"Reference: fairseq's model without the BASE block (`--base-layers 0`): {s['dense_wps']:.0f} words/s, "
                    f"{s['dense_over_fairseq']:.3f}x fairseq's BASE run (the most any BASE implementation could gain).", ""]
    for p in profiles:
        out += profile_markdown(p)
    return "\n".join(out)


def _f(v, fmt="{:.3f}"):
    return "-" if v is None else fmt.format(v)


# ----------------------------------------------------------------------------- profile

def profile_side(args, data_bin, side, logdir):
    """The profile harness on 2 ranks (this script in --worker mode); rank 0's JSON report."""
    port = free_port()
    out = os.path.join(logdir, f"profile_{side}.json")
    base = [sys.executable, "-m", "moe_plugin.tools.base_vs_fairseq", "--worker", side, "--worker-port", str(port),
            "--worker-out", out, "--data-bin", data_bin, *_passthrough(args)]
    logs = [open(os.path.join(logdir, f"profile_{side}.rank{r}.log"), "w") for r in (0, 1)]
    p1 = subprocess.Popen(base + ["--worker-rank", "1"], cwd=ROOT, env=env(), stdout=logs[1], stderr=subprocess.STDOUT)
    p0 = subprocess.run(base + ["--worker-rank", "0"], cwd=ROOT, env=env(), stdout=logs[0], stderr=subprocess.STDOUT,
                        timeout=args.timeout)
    p1.wait(timeout=120)
    for f in logs:
        f.close()
    if p0.returncode != 0 or not os.path.exists(out):
        return {"kind": "profile", "side": side, "error": open(logs[0].name).read()[-1500:]}
    with open(out) as f:
        return json.load(f)


def _passthrough(args):
    keep = ("seed", "base_shuffle", "layers", "dim", "ffn", "heads", "tokens_per_sample", "max_tokens", "lr", "warmup",
            "log_interval", "profile_warmup", "profile_steps", "profile_top")
    out = []
    for k in keep:
        out += ["--" + k.replace("_", "-"), str(getattr(args, k))]
    return out


def worker(args):
    """One rank of the profile harness: fairseq's own builders from the training flags."""
    import logging

    import torch
    from fairseq import options, tasks, utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.distributed import utils as distributed_utils
    from fairseq.trainer import Trainer

    logging.disable(logging.WARNING)
    side = args.worker
    args.updates = 10 ** 6  # no stop; the loop below decides
    flags = [*shared_flags(args, args.data_bin), *side_flags(side), *rank_flags(args.worker_port, args.worker_rank)]
    parser = options.get_training_parser()
    ns = options.parse_args_and_arch(parser, input_args=flags)
    cfg = convert_namespace_to_omegaconf(ns)

    def main(cfg):
        import numpy as np

        utils.import_user_module(cfg.common)
        np.random.seed(cfg.common.seed)
        utils.set_torch_seed(cfg.common.seed)
        task = tasks.setup_task(cfg.task)
        model = task.build_model(cfg.model)
        criterion = task.build_criterion(cfg.criterion)
        trainer = Trainer(cfg, task, model, criterion)
        epoch_itr = trainer.get_train_iterator(epoch=1, load_dataset=True)
        trainer.begin_epoch(epoch_itr.epoch)
        itr = epoch_itr.next_epoch_itr(fix_batches_to_gpus=False, shuffle=True)
        samples = iter(itr)
        fwd, names = _forward_timers(model, criterion)
        n_warm, n_steps = args.profile_warmup, args.profile_steps

        def step():
            trainer.train_step([next(samples)])

        for _ in range(n_warm):
            step()
        # 1) plain timing (hooks only accumulate perf_counter deltas)
        for k in fwd:
            fwd[k] = 0.0
        torch.distributed.barrier()
        times = []
        for _ in range(n_steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        comp = {k: 1e3 * v / n_steps for k, v in fwd.items()}
        # 2) torch.profiler over the same number of steps
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(n_steps):
                step()
        ka = prof.key_averages()
        ops = sorted(ka, key=lambda e: e.self_cpu_time_total, reverse=True)
        top = [{"op": e.key, "calls_per_step": e.count / n_steps, "self_ms_per_step": e.self_cpu_time_total / 1e3 / n_steps,
                "total_ms_per_step": e.cpu_time_total / 1e3 / n_steps} for e in ops[:args.profile_top]]
        coll = [{"op": e.key, "calls_per_step": e.count / n_steps, "self_ms_per_step": e.self_cpu_time_total / 1e3 / n_steps}
                for e in ka if re.search(r"all_?to_?all|all_?reduce|all_?gather|broadcast|barrier", e.key, re.I)
                and not e.key.startswith("aten::")]
        backward = sum(e.cpu_time_total for e in ka if e.key.startswith("autograd::engine::evaluate_function"))
        # busy vs waiting: the collectives' self time (their autograd wrappers included: a rank
        # waits for the other inside them) against every other event's self time
        is_coll = re.compile(r"all_?to_?all|all2all|all_?reduce|all_?gather|broadcast|barrier|c10d|gloo", re.I)
        coll_ms = sum(e.self_cpu_time_total for e in ka if is_coll.search(e.key)) / 1e3 / n_steps
        busy_ms = sum(e.self_cpu_time_total for e in ka if not is_coll.search(e.key)) / 1e3 / n_steps
        # 3) cProfile over the same number of steps: where the Python time goes, per function
        import cProfile
        import pstats

        cp = cProfile.Profile()
        cp.enable()
        for _ in range(n_steps):
            step()
        cp.disable()
        py = []
        for (path, line, func), (cc, nc, tt, ct, _) in pstats.Stats(cp).stats.items():
            if re.search(r"moe_plugin|fairseq/(modules/base_layer|trainer|criterions|models/transformer|"
                         r"distributed|optim)|torch/distributed", path):
                where = path.split("site-packages/")[-1].replace(ROOT + os.sep, "")
                py.append({"function": f"{where}:{line}({func})", "calls_per_step": nc / n_steps,
                           "cum_ms_per_step": 1e3 * ct / n_steps, "self_ms_per_step": 1e3 * tt / n_steps})
        py.sort(key=lambda r: r["cum_ms_per_step"], reverse=True)
        if cfg.distributed_training.distributed_rank == 0:
            report = {
                "kind": "profile", "side": side, "steps": n_steps, "warmup": n_warm,
                "step_ms_median": 1e3 * statistics.median(times), "step_ms_min": 1e3 * min(times),
                "step_ms_all": [round(1e3 * t, 2) for t in times],
                "forward_ms_per_step": {k: round(comp[k], 3) for k in names},
                "backward_ms_per_step_profiled": backward / 1e3 / n_steps,
                "collective_ms_per_step": coll_ms, "busy_ms_per_step": busy_ms,
                "collectives": coll, "top_ops": top, "python": py[:args.profile_top * 2],
                "params": sum(p.numel() for p in model.parameters()),
            }
            with open(args.worker_out, "w") as f:
                json.dump(report, f)

    distributed_utils.call_main(cfg, main)


def _forward_timers(model, criterion):
    """Forward hooks timing the decoder's modules (depth <= 4 under the decoder) and the whole
    criterion forward (model forward + loss + stats); {name: seconds} accumulated."""
    acc, starts, names = {}, {}, []

    def add(name, module):
        acc[name] = 0.0
        names.append(name)

        def pre(mod, inp, _n=name):
            starts[_n] = time.perf_counter()

        def post(mod, inp, out, _n=name):
            acc[_n] += time.perf_counter() - starts.pop(_n, time.perf_counter())

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    add("criterion (model forward + loss + stats)", criterion)
    for name, module in model.named_modules():
        if not name.startswith("decoder") or name.count(".") > 4:
            continue
        if name.endswith(("dropout_module", "activation_dropout_module")) or "quant" in name:
            continue
        add(name, module)
    return acc, names


def profile_markdown(p):
    if p.get("error"):
        return [f"### profile {p['side']}: error", "", "```", p["error"][-800:], "```", ""]
    out = [f"### Profile, {p['side']}: {p['step_ms_median']:.1f} ms per train step (median of {p['steps']}, min "
           f"{p['step_ms_min']:.1f}; after {p['warmup']} warm-up steps), rank 0", "",
           "Forward time per step of each module (nested: a parent includes its children); the backward, "
           "all-reduce, clipping and optimizer are the step minus the criterion's forward.", "",
           "| module | forward ms/step |", "|---|---:|"]
    for k, v in p["forward_ms_per_step"].items():
        if v >= 0.05:
            out.append(f"| {k} | {v:.2f} |")
    crit = next(iter(p["forward_ms_per_step"].values()))
    out += [f"| (rest of the step: backward, all-reduce, clip, optimizer, stats) | {p['step_ms_median'] - crit:.2f} |",
            "", f"torch.profiler: {p.get('busy_ms_per_step', float('nan')):.1f} ms/step busy (self time of every op "
            f"but the collectives), {p.get('collective_ms_per_step', float('nan')):.1f} ms/step inside collectives "
            "(the transfer and the wait for the other rank).", "",
            "Collectives per step (torch.profiler):", "", "| op | calls/step | self ms/step |", "|---|---:|---:|"]
    for c in p["collectives"]:
        out.append(f"| {c['op']} | {c['calls_per_step']:.1f} | {c['self_ms_per_step']:.2f} |")
    out += ["", f"Top {len(p['top_ops'])} ops by self CPU time (torch.profiler; ms per step):", "",
            "| op | calls/step | self ms | total ms |", "|---|---:|---:|---:|"]
    for t in p["top_ops"]:
        out.append(f"| {t['op']} | {t['calls_per_step']:.1f} | {t['self_ms_per_step']:.2f} | {t['total_ms_per_step']:.2f} |")
    if p.get("python"):
        out += ["", "Python functions by cumulative time (cProfile, which slows Python down; ms per step, "
                "fairseq/moe_plugin/torch.distributed only):", "",
                "| function | calls/step | cum ms | self ms |", "|---|---:|---:|---:|"]
        for t in p["python"]:
            out.append(f"| {t['function']} | {t['calls_per_step']:.1f} | {t['cum_ms_per_step']:.2f} | "
                       f"{t['self_ms_per_step']:.2f} |")
    out.append("")
    return out


# ----------------------------------------------------------------------------- main

def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=2, help="interleaved (fairseq, ours) pairs")
    p.add_argument("--updates", type=int, default=80)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--ffn", type=int, default=256)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--tokens-per-sample", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--lr", type=float, default=0.003)
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--base-shuffle", type=int, default=1, choices=[0, 1],
                   help="both sides' --base-shuffle (default 1: both sides' own default)")
    p.add_argument("--epoch-batches", type=int, default=120, help="full batches per rank and epoch in the cut corpus")
    p.add_argument("--valid-tokens", type=int, default=30000)
    p.add_argument("--data", default=os.path.join("data", "bench-base"))
    p.add_argument("--logdir", default=os.path.join("results", "bench_base_vs_fairseq"))
    p.add_argument("--timeout", type=int, default=900, help="seconds per run")
    p.add_argument("--sides", default="fairseq,ours", help="run order within a repeat; 'dense' adds fairseq "
                   "without the BASE block (a ceiling), 'ours-ce' ours with --criterion cross_entropy (diagnostic)")
    p.add_argument("--profile", action="store_true", help="also run the profile harness on each side")
    p.add_argument("--profile-only", action="store_true", help="only the profile harness")
    p.add_argument("--profile-warmup", type=int, default=10)
    p.add_argument("--profile-steps", type=int, default=20)
    p.add_argument("--profile-top", type=int, default=15)
    p.add_argument("--jsonl", nargs="?", const="-", default=None,
                   help="JSON lines to FILE, or to stdout without FILE (then the progress goes to stderr)")
    p.add_argument("--markdown", default=None)
    # the profile harness's own ranks
    p.add_argument("--worker", choices=SIDES + ("dense", "ours-ce"), help=argparse.SUPPRESS)
    p.add_argument("--worker-rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("--worker-port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--data-bin", help=argparse.SUPPRESS)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker(args)
    to_stdout = args.jsonl == "-"
    if args.jsonl and not to_stdout:
        os.makedirs(os.path.dirname(os.path.abspath(args.jsonl)), exist_ok=True)
    sink = sys.stdout if to_stdout else (open(args.jsonl, "w") if args.jsonl else None)
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if to_stdout else (lambda m: print(m, flush=True))

    def emit(row):
        if sink is not None:
            sink.write(json.dumps(row) + "\n")
            sink.flush()

    emit({"kind": "machine", "machine": machine(), "config": config_line(args),
          "args": {k: v for k, v in vars(args).items() if not k.startswith(("worker", "jsonl", "markdown", "data_bin"))},
          "commands": {s: " ".join(train_command(args, "<data-bin>", s, "<port>", 0)[1:]) for s in SIDES}})
    data_bin = prepare_data(args, log=say)
    logdir = os.path.join(ROOT, args.logdir)
    os.makedirs(logdir, exist_ok=True)
    sides = args.sides.split(",")
    runs, summary = [], None
    if not args.profile_only:
        for rep in range(1, args.repeats + 1):
            for side in sides:
                say(f"[bench-base] repeat {rep}: {side} ...")
                row = {"kind": "run", "side": side, "repeat": rep, **run_side(args, data_bin, side, logdir, f"{side}_r{rep}")}
                emit(row)
                runs.append(row)
                say(f"[bench-base]   {side}: " + (row["error"][-300:] if row.get("error") else
                                                   f"{row['wps']:.0f} words/s, valid loss {row['valid_loss']}"))
        summary = summarize(runs)
        emit(summary)
    profiles = []
    if args.profile or args.profile_only:
        for side in sides:
            say(f"[bench-base] profile: {side} ...")
            p = profile_side(args, data_bin, side, logdir)
            emit(p)
            profiles.append(p)
    md = markdown(args, runs, summary, profiles)
    if args.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w") as f:
            f.write(md + "\n")
    print(md, file=sys.stderr if to_stdout else sys.stdout)
    failed = any(r.get("error") for r in runs) or any(p.get("error") for p in profiles)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
