"""Shared machinery of the paper-reproduction scripts (``scripts/reproduce/*.py``).

A script describes *what* a paper table compares (a :class:`Plan`: runs with their arch
and flags, datasets, evaluations, extra steps); this module turns a plan into the exact
commands (fairseq-preprocess, fairseq-train, fairseq-eval-lm, the K sweep, the routing
analysis, the report), prints them (``--dry-run``) or runs them, and writes every run's
logs and metadata where ``python -m moe_plugin.tools.report`` finds them::

    OUT/                    results/reproduce/<script>/<scale> by default
      <run>/run.json        label, arch, dataset, unit (ppl|bpc), commands, paper key
      <run>/train.log       fairseq-train's output (stdout+stderr)
      <run>/eval_<e>.log    fairseq-eval-lm's output, one per evaluation
      <run>/checkpoints/
      <extra steps>/        K sweep tables, routing analysis
      report.md, plots/     python -m moe_plugin.tools.report OUT

Scales (``--scale``):
  * ``paper``: the paper's model sizes and GPU counts, launched through the multi-GPU
    launchers (``scripts/launch_torchrun.sh`` on one node, ``scripts/launch_slurm.sh`` on
    several); real corpora prepared by ``data-prep/prepare-*.sh``.
  * ``mini``: one GPU, about an hour per script; the same corpora.
  * ``tiny``: CPU, the synthetic corpus of ``data-prep/synthetic.py`` (and its bytes as a
    character-level stand-in for enwik8/text8), minutes per script.

Commands run from the repository root; relative paths in them are relative to it.
``python -m moe_plugin.experiments.runner configs`` writes the hydra YAML equivalent of every
training command into ``configs/<scale>/`` (see :func:`yaml_for_command`).
"""

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from moe_plugin.config import DENSE_ARCH

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
USER_DIR = "moe_plugin"  # relative to ROOT, as every command runs from ROOT
SCALES = ("paper", "mini", "tiny")
SCRIPTS_DIR = os.path.join("scripts", "reproduce")
#: the reproduce scripts, in the order docs and configs list them
SCRIPTS = ("base_throughput_quality", "hash_ablation", "sam_k_quality", "hyperrouter_tables")
#: archs that are fairseq's own (a run may name one; the reproductions' dense rows use
#: DENSE_ARCH, moe_lm without MoE layers and with the MoE archs' defaults: fairseq's
#: transformer_lm builds another model from the same flags, docs/fidelity.md section dense)
FAIRSEQ_ARCHS = ("transformer_lm",)
#: archs moe_plugin registers besides the routers' (moe_plugin/models/moe_lm.py)
PLUGIN_ARCHS = (DENSE_ARCH,)
#: the launchers of the expert-parallel issue (paper scale)
LAUNCH_TORCHRUN = "scripts/launch_torchrun.sh"
LAUNCH_SLURM = "scripts/launch_slurm.sh"


# ----------------------------------------------------------------------------------------
# What a script describes
# ----------------------------------------------------------------------------------------


@dataclass
class Dataset:
    """A fairseq data-bin and how to make it (commands run only when it is missing)."""

    key: str
    data_bin: str
    unit: str  # "ppl" (word level) or "bpc" (character level: loss in bits per character)
    label: str
    prepare: List[List[str]] = field(default_factory=list)
    note: str = ""
    #: per prepare command, the file whose existence means it is done (default: the data-bin's dict.txt)
    prepare_creates: List[Optional[str]] = field(default_factory=list)


@dataclass
class EvalSpec:
    """One fairseq-eval-lm evaluation of a run's last checkpoint."""

    name: str
    split: str = "test"
    overrides: Optional[dict] = None  # --model-overrides (e.g. {'moe_eval_top_k': 2})
    label: str = ""


@dataclass
class Run:
    """One training run (one row, or one cell, of a paper table)."""

    name: str
    label: str
    arch: str
    dataset: str
    args: List[str]  # model + MoE flags (arch, sizes); training flags come from the plan
    group: str = "main"
    evals: List[EvalSpec] = field(default_factory=lambda: [EvalSpec("test")])
    #: (name, command) steps before training (e.g. the k-means hash table); may use
    #: the outputs of the runs in ``needs``
    pre: List[tuple] = field(default_factory=list)
    needs: List[str] = field(default_factory=list)
    meta: Dict[str, object] = field(default_factory=dict)  # report hints: experts, K, paper key...
    extra_train_args: List[str] = field(default_factory=list)


@dataclass
class Launcher:
    """How a training command is started: here (one process), torchrun on one node, Slurm.

    The multi-GPU launchers are the expert-parallel work's (docs/distributed.md):
    ``scripts/launch_torchrun.sh NGPU fairseq-train ARGS`` and, under Slurm,
    ``sbatch ... scripts/launch_slurm.sh fairseq-train ARGS`` (submitted with ``--wait``, so
    the script goes on when the job ends, and ``--output`` = the run's train.log). Both add
    ``--distributed-world-size`` themselves and resume from the newest complete checkpoint.
    """

    kind: str = "local"  # local | torchrun | slurm
    nodes: int = 1
    gpus_per_node: int = 1
    cpus_per_task: int = 10

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def wrap(self, cmd: List[str], log: Optional[str] = None) -> List[str]:
        if self.kind == "local":
            return cmd
        if self.kind == "torchrun":
            return ["bash", LAUNCH_TORCHRUN, str(self.gpus_per_node), *cmd]
        if self.kind == "slurm":
            out = ["sbatch", "--wait", "--nodes", str(self.nodes), "--ntasks-per-node", str(self.gpus_per_node),
                   "--gpus-per-node", str(self.gpus_per_node), "--cpus-per-task", str(self.cpus_per_task)]
            if log:
                out += ["--output", log, "--open-mode", "append"]
            return out + [LAUNCH_SLURM, *cmd]
        raise ValueError(f"launcher kind {self.kind!r}; allowed: local, torchrun, slurm")

    def script(self) -> Optional[str]:
        return {"torchrun": LAUNCH_TORCHRUN, "slurm": LAUNCH_SLURM}.get(self.kind)

    def captures_own_log(self) -> bool:
        """Slurm writes the job's output itself (sbatch --output); the runner logs sbatch's."""
        return self.kind == "slurm"

    def describe(self) -> str:
        if self.kind == "local":
            return "one process"
        return f"{self.world_size} GPUs ({self.nodes} node(s) x {self.gpus_per_node}) via {self.script()}"


@dataclass
class Plan:
    """Everything one script does at one scale."""

    script: str
    scale: str
    title: str
    runs: List[Run]
    datasets: Dict[str, Dataset]
    hp: Dict[str, object]  # training hyperparameters (see train_args)
    launcher: Launcher = field(default_factory=Launcher)
    device: str = "cpu"  # cpu | gpu
    #: steps after every run (K sweep, routing analysis): ``Step`` with ``needs`` = its runs
    post: List["Step"] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    out: str = ""

    def run_dir(self, run: Run) -> str:
        return os.path.join(self.out, run.name)

    def run_named(self, name: str) -> Run:
        for r in self.runs:
            if r.name == name:
                return r
        raise KeyError(name)


# ----------------------------------------------------------------------------------------
# Scales and datasets
# ----------------------------------------------------------------------------------------

#: training hyperparameters per scale (scripts override what their paper specifies)
BASE_HP = {
    "tiny": dict(tokens_per_sample=64, max_tokens=2048, update_freq=1, lr=2e-3, warmup=15, updates=150,
                 clip_norm=1.0, dropout=0.1, log_interval=10, validate_every=15, save_every=75,
                 lr_scheduler="inverse_sqrt", num_workers=0, eval_max_tokens=4096, seed=1),
    "mini": dict(tokens_per_sample=512, max_tokens=8192, update_freq=1, lr=5e-4, warmup=500, updates=4000,
                 clip_norm=1.0, dropout=0.1, log_interval=50, validate_every=500, save_every=2000,
                 lr_scheduler="inverse_sqrt", num_workers=2, eval_max_tokens=16384, seed=1),
    "paper": dict(tokens_per_sample=1024, max_tokens=2048, update_freq=8, lr=1e-4, warmup=2000, updates=100000,
                  clip_norm=0.1, dropout=0.1, log_interval=100, validate_every=2000, save_every=10000,
                  lr_scheduler="inverse_sqrt", num_workers=4, eval_max_tokens=8192, seed=1),
}

#: the tiny synthetic corpus (shared by every script; a few seconds to generate)
TINY_SYNTHETIC = ["--seed", "1", "--train-tokens", "150000", "--valid-tokens", "15000", "--test-tokens", "15000",
                  "--vocab-size", "500", "--domains", "4", "--domain-vocab", "80", "--shared-vocab", "20"]


def dataset_for(key: str, scale: str, data_root: str) -> Dataset:
    """The dataset ``key`` (wikitext-103, enwik8, text8, synthetic, synthetic-bytes)."""
    if key in ("wikitext-103", "enwik8", "text8"):
        script = {"wikitext-103": "prepare-wikitext103.sh", "enwik8": "prepare-enwik8.sh",
                  "text8": "prepare-text8.sh"}[key]
        unit = "ppl" if key == "wikitext-103" else "bpc"
        label = {"wikitext-103": "WikiText-103", "enwik8": "enwik8", "text8": "text8"}[key]
        return Dataset(key, os.path.join("data", key, "data-bin"), unit, label,
                       prepare=[["bash", f"data-prep/{script}"]])
    root = os.path.join(data_root, "synthetic")
    if key == "synthetic":
        return Dataset(key, os.path.join(root, "data-bin"), "ppl", "synthetic (words)", prepare=[
            ["python", "data-prep/synthetic.py", "--out", root, *TINY_SYNTHETIC],
            ["fairseq-preprocess", "--only-source", "--trainpref", f"{root}/train.txt", "--validpref",
             f"{root}/valid.txt", "--testpref", f"{root}/test.txt", "--destdir", f"{root}/data-bin",
             "--workers", "1"],
        ], note="data-prep/synthetic.py; its truth.json has the true-source perplexity",
            prepare_creates=[f"{root}/truth.json", None])
    if key == "synthetic-bytes":
        bdir = os.path.join(data_root, "synthetic-bytes")
        return Dataset(key, os.path.join(bdir, "data-bin"), "bpc", "synthetic (bytes)", prepare=[
            ["python", "data-prep/synthetic.py", "--out", root, *TINY_SYNTHETIC],
            # the bytes of the synthetic text, as prepare-enwik8.sh converts enwik8
            ["python", "data-prep/charlevel.py", "enwik8", "--input", f"{root}/train.txt", f"{root}/valid.txt",
             f"{root}/test.txt", "--out", f"{bdir}/text", "--valid-chars", "40000", "--test-chars", "40000"],
            ["fairseq-preprocess", "--only-source", "--trainpref", f"{bdir}/text/train.txt", "--validpref",
             f"{bdir}/text/valid.txt", "--testpref", f"{bdir}/text/test.txt", "--destdir", f"{bdir}/data-bin",
             "--workers", "1", "--padding-factor", "1"],
        ], note="the synthetic text's bytes through data-prep/charlevel.py enwik8 (enwik8's format)",
            prepare_creates=[f"{root}/truth.json", None, None])
    raise ValueError(f"dataset {key!r}; allowed: wikitext-103, enwik8, text8, synthetic, synthetic-bytes")


# ----------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------


def _num(v) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def train_args(plan: Plan, run: Run) -> List[str]:
    """fairseq-train arguments (without the launcher) of ``run``."""
    hp = plan.hp
    ds = plan.datasets[run.dataset]
    updates = int(hp["updates"])
    args = [
        ds.data_bin, "--task", "language_modeling", "--user-dir", USER_DIR, "--arch", run.arch,
        "--criterion", "moe_cross_entropy", "--save-dir", os.path.join(plan.run_dir(run), "checkpoints"),
        "--seed", str(hp["seed"]), "--dropout", _num(hp["dropout"]),
        "--tokens-per-sample", str(hp["tokens_per_sample"]), "--max-tokens", str(hp["max_tokens"]),
        "--update-freq", str(hp["update_freq"]), "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)",
        "--lr", _num(hp["lr"]), "--lr-scheduler", str(hp["lr_scheduler"]),
        "--warmup-updates", str(hp["warmup"]), "--clip-norm", _num(hp["clip_norm"]),
        "--max-update", str(updates), "--log-format", "simple", "--log-interval", str(hp["log_interval"]),
        "--validate-interval-updates", str(hp["validate_every"]), "--save-interval-updates", str(hp["save_every"]),
        "--keep-interval-updates", "2", "--no-epoch-checkpoints",
        # validation and checkpoints by update count only (epochs of the tiny corpus are short)
        "--validate-interval", "1000000", "--save-interval", "1000000",
        "--num-workers", str(hp["num_workers"]),
    ]
    if hp["lr_scheduler"] == "inverse_sqrt":
        args += ["--warmup-init-lr", "1e-07"]
    elif hp["lr_scheduler"] == "polynomial_decay":  # linear decay to 0 over the run
        args += ["--total-num-update", str(updates), "--end-learning-rate", "0.0"]
    if hp.get("stop_time_hours"):
        args += ["--stop-time-hours", _num(hp["stop_time_hours"])]
    if plan.device == "cpu":
        args.append("--cpu")
    else:
        args.append("--fp16")
        if "--moe-expert-parallel" in run.args:
            # fairseq's flattened fp16 copy would lose param.expert (moe_plugin/models/expert_parallel.py)
            args.append("--fp16-no-flatten-grads")
    if plan.launcher.world_size > 1:
        args += ["--distributed-world-size", str(plan.launcher.world_size)]
    return args + list(run.args) + list(run.extra_train_args)


def train_command(plan: Plan, run: Run) -> List[str]:
    return plan.launcher.wrap(["fairseq-train", *train_args(plan, run)], os.path.join(plan.run_dir(run), "train.log"))


def expert_parallel(run: Run) -> bool:
    return "--moe-expert-parallel" in run.args


def distributed_eval(plan: Plan, run: Run) -> bool:
    """Expert-parallel runs on several GPUs save one shard per rank (``-rank-R.pt``); they are
    evaluated on the same launcher and world size, each rank loading its shard (the paper
    BASE models, 44B parameters, do not fit one GPU; ``python -m moe_plugin.tools.reshard``
    merges shards when they do)."""
    return expert_parallel(run) and plan.launcher.world_size > 1


def checkpoint_path(plan: Plan, run: Run, name: str = "checkpoint_last.pt") -> str:
    if distributed_eval(plan, run):
        name = name[:-3] + "-rank-{RANK}.pt"  # the launchers put each rank's number in {RANK}
    return os.path.join(plan.run_dir(run), "checkpoints", name)


def eval_command(plan: Plan, run: Run, ev: EvalSpec) -> List[str]:
    hp = plan.hp
    ds = plan.datasets[run.dataset]
    T = int(hp["tokens_per_sample"])
    cmd = ["fairseq-eval-lm", ds.data_bin, "--user-dir", USER_DIR, "--path", checkpoint_path(plan, run),
           "--gen-subset", ev.split, "--tokens-per-sample", str(T), "--context-window", str(T // 2),
           "--max-tokens", str(hp["eval_max_tokens"]), "--num-workers", "0"]
    cmd.append("--cpu" if plan.device == "cpu" else "--fp16")
    if ev.overrides:
        cmd += ["--model-overrides", repr(dict(ev.overrides))]
    if distributed_eval(plan, run):
        return plan.launcher.wrap(cmd, os.path.join(plan.run_dir(run), f"eval_{ev.name}.log"))
    return cmd


def eval_lm_tail_args(plan: Plan) -> List[str]:
    """The fairseq-eval-lm options every evaluation of the plan uses (for scripts/sweep_topk.py)."""
    T = int(plan.hp["tokens_per_sample"])
    return ["--tokens-per-sample", str(T), "--context-window", str(T // 2),
            "--max-tokens", str(plan.hp["eval_max_tokens"]), "--num-workers", "0"] + (
        [] if plan.device == "cpu" else ["--fp16"])


@dataclass
class Step:
    kind: str  # prepare | pre | train | eval | post | report
    name: str
    cmd: List[str]
    log: Optional[str] = None
    run: Optional[str] = None
    creates: Optional[str] = None  # the step is done when this path exists
    needs: List[str] = field(default_factory=list)  # post steps: the runs whose outputs they read
    result_log: Optional[str] = None  # eval steps: the log holding the result (default: log)


def plan_steps(plan: Plan) -> List[Step]:
    """Every command of the plan, in execution order."""
    steps: List[Step] = []
    used = []
    for run in plan.runs:
        if run.dataset not in used:
            used.append(run.dataset)
    for key in used:
        ds = plan.datasets[key]
        for i, cmd in enumerate(ds.prepare):
            creates = ds.prepare_creates[i] if i < len(ds.prepare_creates) else None
            steps.append(Step("prepare", f"{key}:{i}", cmd, creates=creates or os.path.join(ds.data_bin, "dict.txt")))
    done = set()
    pending = list(plan.runs)
    while pending:  # runs in order, a run after the runs it needs
        progressed = False
        for run in list(pending):
            if any(n not in done for n in run.needs):
                continue
            rd = plan.run_dir(run)
            for name, cmd in run.pre:
                steps.append(Step("pre", f"{run.name}:{name}", cmd, log=os.path.join(rd, f"{name}.log"), run=run.name))
            log = os.path.join(rd, "train.sbatch.log" if plan.launcher.captures_own_log() else "train.log")
            steps.append(Step("train", run.name, train_command(plan, run), log=log,
                              run=run.name, creates=os.path.join(rd, "train.done")))
            own_log = plan.launcher.captures_own_log() and distributed_eval(plan, run)
            for ev in run.evals:
                elog = os.path.join(rd, f"eval_{ev.name}.log")
                steps.append(Step("eval", f"{run.name}:{ev.name}", eval_command(plan, run, ev),
                                  log=elog + ".sbatch" if own_log else elog, run=run.name, result_log=elog))
            done.add(run.name)
            pending.remove(run)
            progressed = True
        if not progressed:
            raise ValueError(f"runs with unknown or circular needs: {[r.name for r in pending]}")
    steps.extend(plan.post)
    steps.append(Step("report", "report", ["python", "-m", "moe_plugin.tools.report", plan.out]))
    return steps


# ----------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------


def executable(cmd: List[str]) -> List[str]:
    """Map the printed command to what runs: this Python for ``python``, the fairseq console
    scripts next to it (or ``python -m fairseq_cli.X`` when they are not installed)."""
    head = cmd[0]
    if head == "python":
        return [sys.executable, *cmd[1:]]
    if head.startswith("fairseq-"):
        exe = os.path.join(os.path.dirname(sys.executable), head)
        if os.path.exists(exe):
            return [exe, *cmd[1:]]
        module = {"fairseq-train": "train", "fairseq-eval-lm": "eval_lm", "fairseq-preprocess": "preprocess",
                  "fairseq-hydra-train": "hydra_train"}[head]
        return [sys.executable, "-m", f"fairseq_cli.{module}", *cmd[1:]]
    return list(cmd)


def run_command(cmd: List[str], log: Optional[str], echo: bool = True, append: bool = False) -> str:
    """Run from the repo root with OMP_NUM_THREADS kept (default 1 for the CPU runs); tee the
    output to ``log``; SystemExit with the output's tail on failure."""
    env = dict(os.environ, PYTHONWARNINGS=os.environ.get("PYTHONWARNINGS", "ignore"))
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    if log:
        os.makedirs(os.path.dirname(log) or ".", exist_ok=True)
    out_lines = []
    t0 = time.time()
    with open(log or os.devnull, "a" if append else "w") as f:
        f.write("# " + shlex.join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(executable(cmd), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            f.write(line)
            out_lines.append(line)
            if echo and ("| valid |" in line or "Perplexity:" in line or "done training" in line):
                print(f"    {line.rstrip()[-160:]}  [{time.time() - t0:.0f}s]", flush=True)
        rc = proc.wait()
    if rc != 0:
        tail = "".join(out_lines[-40:])
        raise SystemExit(f"command failed ({rc}): {shlex.join(cmd)}\nlog: {log}\n{tail}")
    return "".join(out_lines)


def missing_archs(plan: Plan) -> List[str]:
    from moe_plugin.routing import ARCHS

    return sorted({r.arch for r in plan.runs} - set(ARCHS) - set(PLUGIN_ARCHS) - set(FAIRSEQ_ARCHS))


#: which file/issue registers each arch (for the message when one is missing)
ARCH_SOURCES = {
    "base_lm": "moe_plugin/routing/balanced.py (issue 3)",
    "hash_lm": "moe_plugin/routing/hashed.py (issue 4)",
    "sam_lm": "moe_plugin/routing/sam.py (issue 5)",
    "hyper_lm": "moe_plugin/routing/hyper.py (issue 6)",
    "smoe_dropout_lm": "moe_plugin/routing/random_fixed.py (issue 6)",
}


def missing_arch_message(missing: List[str]) -> str:
    lines = ["these archs are not registered in this checkout, so their runs cannot train:"]
    for a in missing:
        lines.append(f"  {a}: registered by {ARCH_SOURCES.get(a, 'a router file in moe_plugin/routing/')}, "
                     "which is not here (or failed to import)")
    lines.append("Run the other rows with --skip-missing-archs (their rows are then marked 'not run'), "
                 "or --only RUN,...")
    return "\n".join(lines)


def run_meta(plan: Plan, run: Run) -> dict:
    ds = plan.datasets[run.dataset]
    return {
        "script": plan.script, "scale": plan.scale, "name": run.name, "label": run.label, "arch": run.arch,
        "group": run.group, "dataset": ds.key, "dataset_label": ds.label, "unit": ds.unit,
        "device": plan.device, "devices": plan.launcher.world_size, "launcher": plan.launcher.describe(),
        "train_command": shlex.join(train_command(plan, run)),
        "evals": [dict(name=e.name, split=e.split, overrides=e.overrides, label=e.label or e.name,
                       log=f"eval_{e.name}.log", command=shlex.join(eval_command(plan, run, e))) for e in run.evals],
        "hp": dict(plan.hp), "meta": dict(run.meta), "order": plan.runs.index(run),
    }


def write_run_json(plan: Plan, run: Run, status: str) -> None:
    rd = os.path.join(ROOT, plan.run_dir(run))
    os.makedirs(rd, exist_ok=True)
    meta = run_meta(plan, run)
    meta["status"] = status
    with open(os.path.join(rd, "run.json"), "w") as f:
        json.dump(meta, f, indent=2, default=str)


def eval_done(log: str) -> bool:
    try:
        with open(log) as f:
            return "Perplexity:" in f.read()
    except OSError:
        return False


def execute(plan: Plan, steps: List[Step], force: bool = False, skip_runs=()) -> None:
    t_start = time.time()
    for run in plan.runs:
        done = os.path.exists(os.path.join(ROOT, plan.run_dir(run), "train.done")) and not force
        write_run_json(plan, run, "not run" if run.name in skip_runs else ("trained" if done else "pending"))
    needed_launchers = {plan.launcher.script()} - {None}
    for s in needed_launchers:
        if not os.path.exists(os.path.join(ROOT, s)):
            raise SystemExit(f"{s} is not in this checkout: the multi-GPU launchers come with the expert-parallel "
                             "issue (7). Use --dry-run to see the commands, or --scale mini on one GPU.")
    for i, step in enumerate(steps, 1):
        if step.run in skip_runs:
            continue
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

            report.main([absolute(plan.out)])
            continue
        append = False
        if step.kind == "train":
            run = plan.run_named(step.run)
            write_run_json(plan, run, "training")
            if force:  # a fresh run; otherwise fairseq resumes from an interrupted run's checkpoint_last
                shutil.rmtree(os.path.join(ROOT, plan.run_dir(run), "checkpoints"), ignore_errors=True)
            else:
                append = True  # the log of a resumed run continues the interrupted one's
        run_command(step.cmd, absolute(step.log), append=append)
        if step.kind == "train":
            with open(absolute(step.creates), "w") as f:
                f.write(shlex.join(step.cmd) + "\n")
            write_run_json(plan, plan.run_named(step.run), "trained")
    print(f"[reproduce] {plan.script} --scale {plan.scale}: done in {(time.time() - t_start) / 60:.1f} min; "
          f"report: {os.path.join(plan.out, 'report.md')}", flush=True)


def print_dry_run(plan: Plan, steps: List[Step], missing: List[str]) -> None:
    print(f"# {plan.title}")
    print(f"# scale {plan.scale}: {plan.device.upper()}, {plan.launcher.describe()}; run from {ROOT}")
    for n in plan.notes:
        print(f"# {n}")
    if missing:
        print("# WARNING: " + missing_arch_message(missing).replace("\n", "\n# "))
    for s in needed_launchers_missing(plan):
        print(f"# WARNING: {s} is not in this checkout (expert-parallel issue 7)")
    for step in steps:
        where = f"  > {step.log}" if step.log else ""
        cond = f"   # if {step.creates} is missing" if step.kind == "prepare" else ""
        print(f"{shlex.join(step.cmd)}{where}{cond}")


def needed_launchers_missing(plan: Plan) -> List[str]:
    s = plan.launcher.script()
    return [s] if s and not os.path.exists(os.path.join(ROOT, s)) else []


def main(script: str, build_plan: Callable[[str, argparse.Namespace], Plan], description: str,
         argv=None, add_arguments: Optional[Callable] = None) -> Plan:
    """The command line every reproduce script shares."""
    p = argparse.ArgumentParser(prog=f"{script}.py", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=SCALES, default="tiny",
                   help="paper: the paper's sizes and GPU counts (launchers); mini: one GPU, ~1 h; "
                        "tiny: CPU, synthetic corpus, minutes (default)")
    p.add_argument("--dry-run", action="store_true", help="print the exact commands and exit")
    p.add_argument("--out", default=None, help=f"output directory (default results/reproduce/{script}/SCALE)")
    p.add_argument("--data-root", default=os.path.join("results", "reproduce", "data"),
                   help="where the tiny scale's synthetic corpora go")
    p.add_argument("--only", default="", help="comma-separated run names to run (default: all)")
    p.add_argument("--updates", type=int, default=0, help="override the number of updates of every run")
    p.add_argument("--force", action="store_true", help="redo steps whose outputs exist")
    p.add_argument("--skip-missing-archs", action="store_true",
                   help="run the rows whose arch is registered and mark the others 'not run'")
    p.add_argument("--list", action="store_true", help="list the runs and exit")
    if add_arguments:
        add_arguments(p)
    args = p.parse_args(argv)
    args.out = args.out or os.path.join("results", "reproduce", script, args.scale)
    if os.path.isabs(args.out) and args.out.startswith(ROOT + os.sep):
        args.out = os.path.relpath(args.out, ROOT)
    plan = build_plan(args.scale, args)
    plan.out = args.out
    if args.only:
        keep = {s.strip() for s in args.only.split(",") if s.strip()}
        unknown = keep - {r.name for r in plan.runs}
        if unknown:
            p.error(f"--only: unknown run(s) {sorted(unknown)}; runs: {', '.join(r.name for r in plan.runs)}")
        needed = set(keep)
        for r in plan.runs:
            if r.name in keep:
                needed.update(r.needs)
        plan.runs = [r for r in plan.runs if r.name in needed]
        plan.post = [s for s in plan.post if set(s.needs) <= needed]
    if args.list:
        for r in plan.runs:
            print(f"{r.name:24s} {r.arch:16s} {r.dataset:14s} {r.label}")
        return plan
    steps = plan_steps(plan)
    missing = missing_archs(plan)
    if args.dry_run:
        print_dry_run(plan, steps, missing)
        return plan
    skip = set()
    if missing:
        if not args.skip_missing_archs:
            raise SystemExit(f"[{script}] " + missing_arch_message(missing))
        skip = {r.name for r in plan.runs if r.arch in missing}
        skip |= {r.name for r in plan.runs if set(r.needs) & skip}
        plan.post = [s for s in plan.post if not set(s.needs) & skip]
        steps = [s for s in plan_steps(plan)]
        print(f"[{script}] skipping runs of unregistered archs: {sorted(skip)}", flush=True)
    execute(plan, steps, force=args.force, skip_runs=skip)
    return plan


def scale_updates(hp: Dict[str, object], updates: int) -> Dict[str, object]:
    """--updates: the run length, and every interval that counts updates in proportion."""
    old = int(hp["updates"])
    hp["updates"] = updates
    for key in ("warmup", "validate_every", "save_every", "log_interval"):
        hp[key] = max(1, int(round(int(hp[key]) * updates / old)))
    return hp


# ----------------------------------------------------------------------------------------
# Hydra YAML equivalent of a training command (configs/)
# ----------------------------------------------------------------------------------------

#: fields holding paths: written relative to the directory fairseq-hydra-train starts in
PATH_FIELDS = (("common", "user_dir"), ("task", "data"), ("checkpoint", "save_dir"), ("model", "hash_table"),
               ("common", "log_file"), ("common", "tensorboard_logdir"))
#: the config groups fairseq-hydra-train composes
CFG_GROUPS = ("common", "common_eval", "distributed_training", "dataset", "optimization", "checkpoint", "bmuf",
              "generation", "eval_lm", "interactive", "ema", "task", "model", "criterion", "optimizer",
              "lr_scheduler")
NAMED_GROUPS = ("task", "model", "criterion", "optimizer", "lr_scheduler")


def cli_config(args: List[str]) -> dict:
    """The resolved config fairseq-train builds from ``args`` (its own parser and converter)."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from omegaconf import OmegaConf

    parser = options.get_training_parser()
    ns = options.parse_args_and_arch(parser, input_args=list(args))
    cfg = convert_namespace_to_omegaconf(ns)
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def hydra_config(config_dir: str, config_name: str, overrides=(), resolve: bool = True, runtime_cwd: str = ROOT):
    """The config ``fairseq-hydra-train --config-dir DIR --config-name NAME`` trains with.

    Emulates fairseq_cli/hydra_train.py step by step with fairseq's own functions:
    ``hydra_init(NAME)`` (FairseqConfig as the schema of the primary config), hydra's
    compose, ``add_defaults`` (before the user dir is imported: plugin models, criteria
    stay raw), the full resolution of ``_hydra_main`` (``${hydra:runtime.cwd}`` = the
    directory the command starts in), then train.main's ``import_user_module`` and second
    ``add_defaults`` (now the plugin's dataclasses fill their defaults). Returns the
    DictConfig train.main goes on with.
    """
    from fairseq import utils
    from fairseq.dataclass.initialize import add_defaults, hydra_init
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    GlobalHydra.instance().clear()
    hydra_init(config_name)
    # version_base 1.1: what fairseq-hydra-train (no version_base) and fairseq itself assume
    with initialize_config_dir(config_dir=os.path.abspath(config_dir), version_base="1.1"):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.cwd = runtime_cwd
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    add_defaults(cfg)
    if not resolve:
        return cfg
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    OmegaConf.set_struct(cfg, True)
    utils.import_user_module(cfg.common)
    add_defaults(cfg)
    GlobalHydra.instance().clear()
    return cfg


def _rel_path_expr(value: str) -> str:
    path = value if os.path.isabs(value) else os.path.join(ROOT, value)
    rel = os.path.relpath(path, ROOT)
    return "${hydra:runtime.cwd}/" + rel


def yaml_for_command(args: List[str], header: str = "") -> str:
    """Hydra YAML for fairseq-hydra-train equivalent to ``fairseq-train ARGS``.

    Every field whose resolved value differs from what fairseq-hydra-train would use
    without it (the defaults it composes for the same task/model/criterion/optimizer/
    scheduler names) is written; paths become ``${hydra:runtime.cwd}/...`` (hydra changes
    the working directory), so run it from the repository root. The result is checked: the
    YAML composed as fairseq-hydra-train composes it must equal the command's config in
    every field, else ValueError.
    """
    import tempfile

    import yaml
    from omegaconf import OmegaConf

    cli = cli_config(args)
    names = {g: (cli.get(g) or {}).get("_name") for g in NAMED_GROUPS}
    skeleton = {g: {"_name": names[g]} for g in NAMED_GROUPS if names[g]}
    skeleton.setdefault("common", {})["user_dir"] = _rel_path_expr(cli["common"]["user_dir"])
    skeleton["task"]["data"] = _rel_path_expr(cli["task"]["data"])
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "skeleton.yaml"), "w") as f:
            yaml.safe_dump(skeleton, f)
        base = OmegaConf.to_container(hydra_config(tmp, "skeleton"), resolve=True, enum_to_str=True)
        unresolved = OmegaConf.to_container(hydra_config(tmp, "skeleton", resolve=False), resolve=False)
    out = {g: dict(v) for g, v in skeleton.items()}
    for g in CFG_GROUPS:
        cg, bg = cli.get(g) or {}, base.get(g) or {}
        for k, v in cg.items():
            if k == "_name" or (g, k) in (("common", "user_dir"), ("task", "data")):
                continue
            if k in bg and bg[k] == v:
                continue
            if (g, k) in PATH_FIELDS and isinstance(v, str) and v:
                v = _rel_path_expr(v)
            out.setdefault(g, {})[k] = v
    # drop fields that are interpolations of a written field with the same value
    for g in list(out):
        for k in list(out[g]):
            ref = ((unresolved.get(g) or {}) if isinstance(unresolved.get(g), dict) else {}).get(k)
            if isinstance(ref, str) and ref.startswith("${") and ref.endswith("}") and ":" not in ref:
                rg, _, rk = ref[2:-1].partition(".")
                if rg in out and rk in out[rg] and out[rg][rk] == out[g][k]:
                    del out[g][k]
    order = ["common", "task", "model", "criterion", "optimizer", "lr_scheduler", "optimization", "dataset",
             "checkpoint", "distributed_training"]
    out = {g: out[g] for g in sorted(out, key=lambda g: order.index(g) if g in order else len(order)) if out[g]}
    text = yaml.safe_dump(out, sort_keys=False, default_flow_style=False, width=120)
    # check: fairseq-hydra-train's config from this YAML == fairseq-train's config
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "check.yaml"), "w") as f:
            f.write(text)
        got = OmegaConf.to_container(hydra_config(tmp, "check"), resolve=True, enum_to_str=True)
    diffs = config_differences(cli, got)
    if diffs:
        raise ValueError("the YAML does not reproduce the command's config: " + "; ".join(diffs[:10]))
    return (header + text) if header else text


def config_differences(a: dict, b: dict, groups=CFG_GROUPS, ignore=(("common", "user_dir"),)) -> List[str]:
    """Fields (group.key) whose values differ between two resolved configs."""
    diffs = []
    for g in groups:
        ag, bg = a.get(g) or {}, b.get(g) or {}
        for k in sorted(set(ag) | set(bg)):
            if (g, k) in ignore:
                continue
            va, vb = ag.get(k, "<missing>"), bg.get(k, "<missing>")
            if (g, k) in PATH_FIELDS and isinstance(va, str) and isinstance(vb, str):
                va, vb = os.path.abspath(os.path.join(ROOT, va)), os.path.abspath(os.path.join(ROOT, vb))
            if va != vb:
                diffs.append(f"{g}.{k}: {va!r} != {vb!r}")
    return diffs


def load_script(name: str):
    """Import scripts/reproduce/NAME.py as a module."""
    import importlib.util

    path = os.path.join(ROOT, SCRIPTS_DIR, f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"reproduce_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def plan_of(script: str, scale: str, argv=()) -> Plan:
    """The plan a script builds for ``scale`` with default options (and its default --out)."""
    import contextlib
    import io

    mod = load_script(script)
    with contextlib.redirect_stdout(io.StringIO()):
        return mod.main(["--scale", scale, "--list", *argv])


def config_name(plan: Plan, run: Run) -> str:
    return f"{plan.script}-{run.name}"


def generate_configs(out_dir: str, scripts=SCRIPTS, scales=SCALES, only_registered: bool = True) -> List[str]:
    """Write configs/<scale>/<script>-<run>.yaml for every training run; returns the paths."""
    import logging

    from moe_plugin.routing import ARCHS

    written = []
    logging.getLogger("hydra").setLevel(logging.WARNING)

    for scale in scales:
        for script in scripts:
            plan = plan_of(script, scale)
            for run in plan.runs:
                if only_registered and run.arch not in set(ARCHS) | set(PLUGIN_ARCHS) | set(FAIRSEQ_ARCHS):
                    print(f"[configs] skip {scale}/{config_name(plan, run)}: arch {run.arch} is not registered",
                          file=sys.stderr)
                    continue
                cmd = train_command(plan, run)
                header = (
                    f"# {plan.title}: {run.label} ({scale} scale)\n"
                    f"# Generated by `python -m moe_plugin.experiments.runner configs`; equivalent to the training command of\n"
                    f"#   python scripts/reproduce/{script}.py --scale {scale}   (run {run.name}):\n"
                    f"#   {shlex.join(cmd)}\n"
                    f"# Run from the repository root:\n"
                    f"#   fairseq-hydra-train --config-dir configs/{scale} --config-name {config_name(plan, run)}\n"
                    + (f"# ({plan.launcher.world_size} GPUs: one process per GPU, e.g. torchrun --nproc_per_node "
                       f"{plan.launcher.gpus_per_node} [--nnodes {plan.launcher.nodes} ...] -m fairseq_cli.hydra_train "
                       "...; fairseq reads torchrun's WORLD_SIZE/RANK)\n" if plan.launcher.world_size > 1 else "")
                )
                text = yaml_for_command(train_args(plan, run), header)
                path = os.path.join(out_dir, scale, config_name(plan, run) + ".yaml")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    f.write(text)
                written.append(path)
                print(f"[configs] {path}", file=sys.stderr)
    return written


def _cli(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m moe_plugin.experiments.runner",
                                description="Utilities of the reproduce scripts.")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("configs", help="write the hydra YAML of every reproduce training command")
    c.add_argument("--out", default=os.path.join(ROOT, "configs"))
    c.add_argument("--scripts", default=",".join(SCRIPTS))
    c.add_argument("--scales", default=",".join(SCALES))
    args = p.parse_args(argv)
    if args.cmd == "configs":
        generate_configs(args.out, args.scripts.split(","), args.scales.split(","))
    return 0


if __name__ == "__main__":
    sys.exit(_cli())


# ----------------------------------------------------------------------------------------
# Helpers for the scripts' model flags
# ----------------------------------------------------------------------------------------


def model_flags(d: int, layers: int, heads: int, ffn: int, adaptive: Optional[tuple] = None,
                adaptive_input: bool = True) -> List[str]:
    """Transformer LM size flags (every moe_lm arch, dense_lm included; the input/output dims
    are given explicitly, which dense_lm does not need but fairseq's transformer_lm would);
    ``adaptive=(cutoffs, factor)`` adds an adaptive
    softmax and (``adaptive_input``) an adaptive input with tied weights (fairseq's
    WikiText-103 recipe); without ``adaptive`` the input and output embeddings are shared.
    ``adaptive_input=False`` keeps a plain input embedding (hash tables from k-means read it)."""
    flags = ["--decoder-layers", str(layers), "--decoder-embed-dim", str(d), "--decoder-ffn-embed-dim", str(ffn),
             "--decoder-attention-heads", str(heads), "--decoder-input-dim", str(d), "--decoder-output-dim", str(d)]
    if adaptive:
        cutoffs, factor = adaptive
        if adaptive_input:
            flags += ["--adaptive-input", "--adaptive-input-cutoff", cutoffs, "--adaptive-input-factor",
                      _num(factor)]
        flags += ["--adaptive-softmax-cutoff", cutoffs, "--adaptive-softmax-factor", _num(factor)]
        if adaptive_input:
            flags += ["--tie-adaptive-weights", "--tie-adaptive-proj"]
    else:
        flags.append("--share-decoder-input-output-embed")
    return flags


#: adaptive input/softmax of fairseq's WikiText-103 language model recipe
WT103_ADAPTIVE = ("20000,60000", 4.0)


def hp_for(scale: str, args: Optional[argparse.Namespace] = None, **overrides) -> Dict[str, object]:
    """The scale's training hyperparameters with the script's overrides, then the command
    line's ``--updates`` (scripts build everything that counts updates from the result)."""
    hp = dict(BASE_HP[scale])
    hp.update(overrides)
    if args is not None and getattr(args, "updates", 0):
        scale_updates(hp, args.updates)
    return hp


def launcher_for(scale: str, nodes: int = 1, gpus_per_node: int = 8) -> Launcher:
    if scale != "paper":
        return Launcher("local")
    return Launcher("slurm" if nodes > 1 else "torchrun", nodes, gpus_per_node)
