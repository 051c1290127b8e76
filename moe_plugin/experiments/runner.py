"""Runs an experiment (``python -m moe_plugin.experiments.runner NAME [options]``, what
``bash scripts/reproduce/NAME.sh`` calls) and writes the hydra configs (``... runner configs``).

An experiment (``moe_plugin/experiments/<name>.py``, registered in
``moe_plugin.experiments.EXPERIMENTS``) describes *what* a paper table compares (a
:class:`~moe_plugin.experiments._plan.Plan`); this module prints its exact commands
(``--dry-run``) or runs them through the repository's one subprocess runner
(``moe_plugin.tools.commands``), and writes every run's logs and metadata where
``python -m moe_plugin.tools.report`` finds them::

    OUT/                        results/reproduce/<experiment>/<scale> by default
      seed<N>/                  one replicate of the experiment per seed (--seeds, default: the scale's)
        <run>/run.json          label, arch, dataset, unit (ppl|bpc), seed, commands, paper key
        <run>/train.log         fairseq-train's output (stdout+stderr)
        <run>/eval_<e>.log      fairseq-eval-lm's output, one per evaluation
        <run>/checkpoints/
        <extra steps>/          K sweep tables, routing analysis (of this seed's checkpoints)
      report.md, plots/         python -m moe_plugin.tools.report OUT: each run's seeds grouped
                                (mean ± spread), the paper's claims with their verdicts

The experiment's plan is built once per seed (``moe_plugin.experiments._plan``: a seed is a
complete replicate, so the steps an experiment derives from its output directory, such as the
k-means table from the dense run's checkpoint, read the same seed's files). Commands run from
the repository root; relative paths in them (``--out``, ``--data-root``) are relative to it.
A finished step is skipped, so an interrupted experiment resumes.
"""

import argparse
import contextlib
import io
import json
import os
import shlex
import shutil
import sys
import time
from typing import List, Optional, Sequence, Tuple, Union

from moe_plugin.experiments import EXPERIMENTS
from moe_plugin.experiments._plan import (DEFAULT_SEEDS, ROOT, SCALES, Plan, Run, Step, eval_command, parse_seeds,
                                          plan_steps, seed_out, train_command)
from moe_plugin.tools import commands


def progress(line: str) -> Optional[str]:
    """The lines of a fairseq log worth echoing while it runs (validation, result, end)."""
    if "| valid |" in line or "Perplexity:" in line or "done training" in line:
        return line.rstrip()[-160:]
    return None


def run_meta(plan: Plan, run: Run) -> dict:
    ds = plan.datasets[run.dataset]
    return {
        "script": plan.experiment,  # run.json key read by the report
        "scale": plan.scale, "name": run.name, "label": run.label, "arch": run.arch,
        "group": run.group, "dataset": ds.key, "dataset_label": ds.label, "unit": ds.unit,
        "device": plan.device, "devices": plan.launcher.world_size, "launcher": plan.launcher.describe(),
        "train_command": shlex.join(train_command(plan, run)),
        "evals": [dict(name=e.name, split=e.split, overrides=e.overrides, label=e.label or e.name,
                       log=f"eval_{e.name}.log", command=shlex.join(eval_command(plan, run, e))) for e in run.evals],
        "hp": dict(plan.hp), "meta": dict(run.meta), "order": plan.runs.index(run),
        # the seed of a seeded plan (OUT/seed<N>/<run>; the report groups a run's seeds); None: an
        # unseeded plan (OUT/<run>, trained with hp["seed"])
        "seed": plan.seed, "seeds": list(plan.seeds),
    }


def write_run_json(plan: Plan, run: Run, status: str) -> None:
    rd = os.path.join(ROOT, plan.run_dir(run))
    os.makedirs(rd, exist_ok=True)
    meta = run_meta(plan, run)
    meta["status"] = status
    with open(os.path.join(rd, "run.json"), "w") as f:
        json.dump(meta, f, indent=2, default=str)


def write_flops(plan: Plan, run: Run) -> Optional[dict]:
    """Count ``run``'s active FLOPs per token and its parameters (moe_plugin.tools.flops) on the
    model built from its training flags, into RUN_DIR/flops.json, which the report's tables
    print beside each row; None (said) when it cannot be counted. Paper-scale models are not
    built here (CPU memory): ``python -m moe_plugin.tools.flops`` counts them on request."""
    path = os.path.join(ROOT, plan.run_dir(run), "flops.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    if plan.scale == "paper":
        return None
    from moe_plugin.experiments._plan import train_args
    from moe_plugin.tools import flops

    try:
        args = train_args(plan, run)
        data = args[0] if os.path.isabs(args[0]) else os.path.join(ROOT, args[0])
        with contextlib.redirect_stdout(io.StringIO()):
            model, _ = flops.build_model(args[1:], data=data)
        rep = flops.flops_per_token(model, int(plan.hp["tokens_per_sample"]),
                                    tokens_per_batch=int(plan.hp["max_tokens"]), label=run.name)
    except Exception as e:  # noqa: BLE001  (the tables say "-"; the run itself is unaffected)
        print(f"[reproduce] {run.name}: FLOPs not counted ({e})", flush=True)
        return None
    out = {"active_flops_per_token": rep.active_flops_per_token, "total_params": rep.total_params,
           "active_params": rep.active_params, "seq_len": rep.seq_len, "tokens_per_batch": rep.tokens_per_batch}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    return out


def eval_done(log: str) -> bool:
    try:
        with open(log) as f:
            return "Perplexity:" in f.read()
    except OSError:
        return False


def _as_plans(plans: Union[Plan, Sequence[Plan]]) -> List[Plan]:
    return [plans] if isinstance(plans, Plan) else list(plans)


def execute(plans: Union[Plan, Sequence[Plan]], steps: List[Step], force: bool = False) -> None:
    """Run the steps of a plan, or of the seeds' plans of an experiment, in order, skipping
    those done already (unless ``force``); every run's run.json says how far it got. A
    failing command raises commands.CommandFailed."""
    t_start = time.time()
    plans = _as_plans(plans)
    by_seed = {p.seed: p for p in plans}
    for plan in plans:
        for run in plan.runs:
            done = os.path.exists(os.path.join(ROOT, plan.run_dir(run), "train.done")) and not force
            write_run_json(plan, run, "trained" if done else "pending")
    report_out = steps[-1].cmd[-1] if steps and steps[-1].kind == "report" else plans[0].out
    for i, step in enumerate(steps, 1):
        absolute = lambda p: os.path.join(ROOT, p) if p else p  # noqa: E731
        if step.creates and os.path.exists(absolute(step.creates)) and not force:
            print(f"[{i}/{len(steps)}] {step.kind} {step.name}: done already ({step.creates})", flush=True)
            continue
        if step.kind == "eval" and eval_done(absolute(step.result_log or step.log)) and not force:
            print(f"[{i}/{len(steps)}] eval {step.name}: done already ({step.log})", flush=True)
            continue
        print(f"[{i}/{len(steps)}] {step.kind} {step.name}  [{(time.time() - t_start) / 60:.1f} min]\n"
              f"    $ {shlex.join(step.cmd)}", flush=True)
        if step.kind == "report":
            from moe_plugin.tools import report

            report.main([absolute(step.cmd[-1])])
            continue
        append = False
        plan = by_seed.get(step.seed, plans[0])
        if step.kind == "train":
            run = plan.run_named(step.run)
            write_run_json(plan, run, "training")
            if force:  # a fresh run; otherwise fairseq resumes from an interrupted run's checkpoint_last
                shutil.rmtree(os.path.join(ROOT, plan.run_dir(run), "checkpoints"), ignore_errors=True)
            else:
                append = True  # the log of a resumed run continues the interrupted one's
        commands.run(step.cmd, log=absolute(step.log), append=append, echo=progress)
        if step.kind == "train":
            with open(absolute(step.creates), "w") as f:
                f.write(shlex.join(step.cmd) + "\n")
            write_run_json(plan, plan.run_named(step.run), "trained")
            write_flops(plan, plan.run_named(step.run))
    print(f"[reproduce] {plans[0].experiment} --scale {plans[0].scale}: done in {(time.time() - t_start) / 60:.1f} "
          f"min; report: {os.path.join(report_out, 'report.md')}", flush=True)


def print_dry_run(plans: Union[Plan, Sequence[Plan]], steps: List[Step]) -> None:
    plans = _as_plans(plans)
    plan = plans[0]
    print(f"# {plan.title}")
    print(f"# scale {plan.scale}: {plan.device.upper()}, {plan.launcher.describe()}; run from {ROOT}")
    if plan.seed is not None:
        out = os.path.dirname(os.path.normpath(plan.out))
        print(f"# seeds {','.join(str(p.seed) for p in plans)}: every run trained once per seed, into "
              f"{os.path.join(out, 'seed<N>')}; the report groups a run's seeds: {out}")
    for n in plan.notes:
        print(f"# {n}")
    for step in steps:
        where = f"  > {step.log}" if step.log else ""
        cond = f"   # if {step.creates} is missing" if step.kind == "prepare" else ""
        print(f"{shlex.join(step.cmd)}{where}{cond}")


def experiment_parser(name: str) -> argparse.ArgumentParser:
    """The command line of experiment ``name`` (the options every experiment shares, then its own)."""
    exp = EXPERIMENTS[name]
    p = argparse.ArgumentParser(prog=f"bash scripts/reproduce/{name}.sh", description=exp.description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=SCALES, default="tiny",
                   help="paper: the paper's sizes and GPU counts (launchers); mini: one GPU, ~1 h; "
                        "tiny: CPU, synthetic corpus, minutes (default)")
    p.add_argument("--dry-run", action="store_true", help="print the exact commands and exit")
    p.add_argument("--out", default=None, help=f"output directory (default results/reproduce/{name}/SCALE)")
    p.add_argument("--data-root", default=os.path.join("results", "reproduce", "data"),
                   help="where the tiny scale's synthetic corpora go")
    p.add_argument("--only", default="", help="comma-separated run names to run (default: all)")
    p.add_argument("--updates", type=int, default=0, help="override the number of updates of every run")
    p.add_argument("--seeds", default="", help="comma-separated training seeds, each run trained once per seed "
                   "into OUT/seed<N> (default: " + ", ".join(f"{s} {','.join(map(str, v))}" for s, v in
                                                             DEFAULT_SEEDS.items()) + ")")
    p.add_argument("--force", action="store_true", help="redo steps whose outputs exist")
    p.add_argument("--list", action="store_true", help="list the runs and exit")
    if exp.add_arguments:
        exp.add_arguments(p)
    return p


def _only(p: argparse.ArgumentParser, plan: Plan, only: str) -> Plan:
    """--only: the named runs and the runs they need (and the extra steps of those runs only)."""
    keep = {s.strip() for s in only.split(",") if s.strip()}
    unknown = keep - {r.name for r in plan.runs}
    if unknown:
        p.error(f"--only: unknown run(s) {sorted(unknown)}; runs: {', '.join(r.name for r in plan.runs)}")
    needed = set(keep)
    for r in plan.runs:
        if r.name in keep:
            needed.update(r.needs)
    plan.runs = [r for r in plan.runs if r.name in needed]
    plan.post = [s for s in plan.post if set(s.needs) <= needed]
    return plan


def build(name: str, argv=None) -> Tuple[argparse.Namespace, argparse.ArgumentParser, Plan]:
    """(parsed command line, parser, the experiment's plan without a seed: runs in OUT/<run>)."""
    if name not in EXPERIMENTS:
        raise ValueError(f"experiment {name!r}; registered: {', '.join(EXPERIMENTS)}")
    p = experiment_parser(name)
    args = p.parse_args(argv)
    args.out = args.out or os.path.join("results", "reproduce", name, args.scale)
    if os.path.isabs(args.out) and args.out.startswith(ROOT + os.sep):
        args.out = os.path.relpath(args.out, ROOT)
    if args.seeds:
        try:
            args.seeds = parse_seeds(args.seeds)
        except ValueError as e:
            p.error(str(e))
    plan = EXPERIMENTS[name].build_plan(args.scale, args)
    plan.out = args.out
    if args.seeds:
        plan.seeds = list(args.seeds)
    if args.only:
        _only(p, plan, args.only)
    return args, p, plan


def seed_plans(name: str, args: argparse.Namespace, p: argparse.ArgumentParser, plan: Plan) -> List[Plan]:
    """The experiment's plan once per seed of ``plan.seeds``: built with ``--out`` OUT/seed<N>
    (every path the experiment derives from it is the seed's) and ``--seed N``."""
    plans = []
    for seed in plan.seeds:
        a = argparse.Namespace(**vars(args))
        a.out = seed_out(args.out, seed)
        sp = EXPERIMENTS[name].build_plan(args.scale, a)
        sp.out, sp.seed, sp.seeds = a.out, seed, list(plan.seeds)
        sp.hp["seed"] = seed
        if args.only:
            _only(p, sp, args.only)
        plans.append(sp)
    return plans


def main(name: str, argv=None) -> List[Plan]:
    """Experiment ``name`` with command line ``argv``: list, print or run its plan, once per
    seed; returns the seeds' plans (in seed order)."""
    args, p, plan = build(name, argv)
    plans = seed_plans(name, args, p, plan)
    if args.list:
        print(f"# seeds {','.join(map(str, plan.seeds))}: every run trained once per seed")
        for r in plan.runs:
            print(f"{r.name:24s} {r.arch:16s} {r.dataset:14s} {r.label}")
        return plans
    steps = plan_steps(plans)
    if args.dry_run:
        print_dry_run(plans, steps)
        return plans
    execute(plans, steps, force=args.force)
    return plans


def plan_of(name: str, scale: str, argv=()) -> Plan:
    """The plan experiment ``name`` builds for ``scale`` with default options (and its default
    --out), without a seed: one hydra config per run (``--seed`` of the scale's hyperparameters,
    OUT/<run>; the runner gives each seed its own ``--seed`` and directory)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return build(name, ["--scale", scale, *argv])[2]


def _cli(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = (f"python -m moe_plugin.experiments.runner {{{','.join(EXPERIMENTS)}}} [--scale tiny|mini|paper] "
             "[--dry-run] ...   (NAME --help for its options)\n"
             "       python -m moe_plugin.experiments.runner configs [--out DIR] [--experiments A,B] [--scales S,T]\n"
             "       python -m moe_plugin.experiments.runner list")
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "list":
        for name, exp in EXPERIMENTS.items():
            print(f"{name:26s} {exp.description.strip().splitlines()[0] if exp.description.strip() else ''}")
        return 0
    if cmd == "configs":
        from moe_plugin.experiments import _hydra

        c = argparse.ArgumentParser(prog="python -m moe_plugin.experiments.runner configs",
                                    description="write the hydra YAML of every experiment's training commands")
        c.add_argument("--out", default=os.path.join(ROOT, "configs"))
        c.add_argument("--experiments", default=",".join(EXPERIMENTS))
        c.add_argument("--scales", default=",".join(SCALES))
        a = c.parse_args(rest)
        _hydra.generate_configs(a.out, a.experiments.split(","), a.scales.split(","))
        return 0
    if cmd not in EXPERIMENTS:
        print(f"unknown experiment {cmd!r}; registered: {', '.join(EXPERIMENTS)}\n{usage}", file=sys.stderr)
        return 2
    try:
        main(cmd, rest)
    except commands.CommandFailed as e:
        raise SystemExit(f"[{cmd}] {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
