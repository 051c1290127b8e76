"""What an experiment describes, and the commands it becomes.

An experiment file (``moe_plugin/experiments/<name>.py``) builds a :class:`Plan` per scale
from these parts: :class:`Run` (one row or cell of a paper table: arch, dataset, model and
MoE flags), :class:`Dataset` (a fairseq data-bin and how to make it), :class:`EvalSpec`
(one fairseq-eval-lm evaluation), :class:`Launcher` (one process, torchrun, Slurm) and
post-training :class:`Step`\ s (the K sweep, the routing analysis). :func:`plan_steps` turns
a plan into the exact commands, in order (fairseq-preprocess, fairseq-train,
fairseq-eval-lm, the extra steps, the report); ``moe_plugin.experiments.runner`` prints or
runs them. Commands run from the repository root; relative paths in them are relative to it.

Scales: ``paper`` (the paper's sizes and GPU counts, through ``scripts/launch_torchrun.sh``
on one node or ``scripts/launch_slurm.sh`` on several; real corpora of
``data-prep/prepare-*.sh``), ``mini`` (one GPU, about an hour per experiment, the same
corpora), ``tiny`` (CPU, the synthetic corpus of ``data-prep/synthetic.py`` and its bytes as
a character-level stand-in for enwik8/text8, minutes per experiment).

Seeds: every run is trained once per seed (``Plan.seeds``, default :data:`DEFAULT_SEEDS` of
the scale, the runner's ``--seeds``). The runner builds the experiment's plan once per seed
(:func:`seed_out`: ``OUT/seed<N>``, ``--seed N``), so a seed is a complete replicate of the
experiment, its pre- and post-training steps included (the k-means hash table from the same
seed's dense model, the K sweep and the routing analysis of the same seed's checkpoints);
:func:`plan_steps` of the seeds' plans prepares the datasets once and reports once over OUT,
where the report groups each run's seeds (mean and spread, ``moe_plugin.tools.stats``). A
plan without a seed (``Plan.seed`` None, what ``runner.plan_of`` returns: one hydra config
per run) writes its runs to ``OUT/<run>``, the layout before seeds, which the report still
reads (as one seed).
"""

import argparse
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from moe_plugin.models.archs import DENSE_ARCH

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
USER_DIR = "moe_plugin"  # relative to ROOT, as every command runs from ROOT
SCALES = ("paper", "mini", "tiny")
#: the seeds every run is trained with, per scale (``--seeds`` overrides): at least 3 on the
#: CPU scale (a claim's verdict needs a spread), 2 at mini (an hour per experiment and seed),
#: one at paper scale (days on 32-128 GPUs per run: a spread there is a budget decision)
DEFAULT_SEEDS = {"tiny": (1, 2, 3), "mini": (1, 2), "paper": (1,)}

#: archs that are fairseq's own (a run may name one; the reproductions' dense rows use
#: DENSE_ARCH, moe_lm without MoE layers and with the MoE archs' defaults: fairseq's
#: transformer_lm builds another model from the same flags, docs/fidelity.md section dense)
FAIRSEQ_ARCHS = ("transformer_lm",)
#: archs moe_plugin registers besides the routers' (moe_plugin/models/moe_lm.py)
PLUGIN_ARCHS = (DENSE_ARCH,)
#: the multi-GPU launchers (paper scale)
LAUNCH_TORCHRUN = "scripts/launch_torchrun.sh"
LAUNCH_SLURM = "scripts/launch_slurm.sh"


# ----------------------------------------------------------------------------------------
# What an experiment describes
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
    """Everything one experiment does at one scale."""

    experiment: str
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
    #: the seeds the experiment is run with (each run trained once per seed); default: the scale's
    seeds: List[int] = field(default_factory=list)
    #: the seed of this plan (``--seed``, and ``out`` is the experiment's ``seed_out``); None:
    #: a plan not given a seed (its runs use ``hp['seed']`` and ``out/<run>``)
    seed: Optional[int] = None

    def __post_init__(self):
        if not self.seeds:
            self.seeds = list(DEFAULT_SEEDS.get(self.scale, (1,)))
        check_seeds(self.seeds, "Plan.seeds")

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

#: training hyperparameters per scale (experiments override what their paper specifies)
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

#: the tiny scale's synthetic corpus: data-prep/synthetic.py's preset (docs/synthetic.md), the
#: one ``make demo`` trains on (32 domains sharing 512 words, the next word depending on the
#: domain read off the context: where the routers separate), shared by every experiment
TINY_PRESET = "context"
TINY_SYNTHETIC = ["--preset", TINY_PRESET, "--seed", "1"]


def dataset_for(key: str, scale: str, data_root: str) -> Dataset:
    """The dataset ``key`` (wikitext-103, enwik8, text8, synthetic, synthetic-bytes)."""
    if key in ("wikitext-103", "enwik8", "text8"):
        script = {"wikitext-103": "prepare-wikitext103.sh", "enwik8": "prepare-enwik8.sh",
                  "text8": "prepare-text8.sh"}[key]
        unit = "ppl" if key == "wikitext-103" else "bpc"
        label = {"wikitext-103": "WikiText-103", "enwik8": "enwik8", "text8": "text8"}[key]
        return Dataset(key, os.path.join("data", key, "data-bin"), unit, label,
                       prepare=[["bash", f"data-prep/{script}"]])
    # named by preset: a corpus of another preset (an earlier version's) is not reused in its place
    root = os.path.join(data_root, f"synthetic-{TINY_PRESET}")
    if key == "synthetic":
        return Dataset(key, os.path.join(root, "data-bin"), "ppl", "synthetic (words)", prepare=[
            ["python", "data-prep/synthetic.py", "--out", root, *TINY_SYNTHETIC],
            ["fairseq-preprocess", "--only-source", "--trainpref", f"{root}/train.txt", "--validpref",
             f"{root}/valid.txt", "--testpref", f"{root}/test.txt", "--destdir", f"{root}/data-bin",
             "--workers", "1"],
        ], note="data-prep/synthetic.py; its truth.json has the true-source perplexity",
            prepare_creates=[f"{root}/truth.json", None])
    if key == "synthetic-bytes":
        bdir = os.path.join(data_root, f"synthetic-{TINY_PRESET}-bytes")
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
        "--seed", str(hp["seed"] if plan.seed is None else plan.seed), "--dropout", _num(hp["dropout"]),
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
    """The fairseq-eval-lm options every evaluation of the plan uses (for ``python -m moe_plugin.tools.sweep_topk``)."""
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
    seed: Optional[int] = None  # the seed of the plan the step belongs to (None: an unseeded plan)


def plan_steps(plan) -> List[Step]:
    """Every command of the plan, in execution order; of a list of plans (one per seed of an
    experiment, ``Plan.seed`` set, ``out`` = ``seed_out(OUT, seed)``): the datasets' prepare
    steps once, then each seed's pre-training, training, evaluation and post-training steps,
    then one report over OUT."""
    if isinstance(plan, Plan):
        return _plan_steps(plan)
    plans = list(plan)
    if not plans:
        raise ValueError("plan_steps: no plan")
    if len(plans) == 1 and plans[0].seed is None:
        return _plan_steps(plans[0])
    if any(p.seed is None for p in plans) or len({p.seed for p in plans}) != len(plans):
        raise ValueError(f"plan_steps: plans of distinct seeds needed, got seeds {[p.seed for p in plans]}")
    outs = {os.path.dirname(os.path.normpath(p.out)) for p in plans}
    if len(outs) != 1 or any(os.path.normpath(p.out) != os.path.normpath(seed_out(next(iter(outs)), p.seed))
                             for p in plans):
        raise ValueError(f"plan_steps: the seeds' plans must write to OUT/seed<N> of one OUT, got "
                         f"{[p.out for p in plans]}")
    steps: List[Step] = []
    seen = set()
    for p in plans:
        for s in _plan_steps(p):
            if s.kind == "prepare":  # the datasets are the seeds' common input
                key = tuple(s.cmd)
                if key not in seen:
                    seen.add(key)
                    steps.append(Step(s.kind, s.name, s.cmd, s.log, s.run, s.creates, list(s.needs)))
    for p in plans:
        steps += [s for s in _plan_steps(p) if s.kind not in ("prepare", "report")]
    out = next(iter(outs))
    steps.append(Step("report", "report", ["python", "-m", "moe_plugin.tools.report", out]))
    return steps


def _plan_steps(plan: Plan) -> List[Step]:
    steps: List[Step] = []
    used = []
    for run in plan.runs:
        if run.dataset not in used:
            used.append(run.dataset)
    for key in used:
        ds = plan.datasets[key]
        for i, cmd in enumerate(ds.prepare):
            creates = ds.prepare_creates[i] if i < len(ds.prepare_creates) else None
            steps.append(Step("prepare", f"{key}:{i}", cmd, creates=creates or os.path.join(ds.data_bin, "dict.txt"),
                              seed=plan.seed))
    done = set()
    pending = list(plan.runs)
    while pending:  # runs in order, a run after the runs it needs
        progressed = False
        for run in list(pending):
            if any(n not in done for n in run.needs):
                continue
            rd = plan.run_dir(run)
            for name, cmd in run.pre:
                steps.append(Step("pre", f"{run.name}:{name}", cmd, log=os.path.join(rd, f"{name}.log"), run=run.name,
                                  seed=plan.seed))
            log = os.path.join(rd, "train.sbatch.log" if plan.launcher.captures_own_log() else "train.log")
            steps.append(Step("train", run.name, train_command(plan, run), log=log,
                              run=run.name, creates=os.path.join(rd, "train.done"), seed=plan.seed))
            own_log = plan.launcher.captures_own_log() and distributed_eval(plan, run)
            for ev in run.evals:
                elog = os.path.join(rd, f"eval_{ev.name}.log")
                steps.append(Step("eval", f"{run.name}:{ev.name}", eval_command(plan, run, ev),
                                  log=elog + ".sbatch" if own_log else elog, run=run.name, result_log=elog,
                                  seed=plan.seed))
            done.add(run.name)
            pending.remove(run)
            progressed = True
        if not progressed:
            raise ValueError(f"runs with unknown or circular needs: {[r.name for r in pending]}")
    for s in plan.post:  # the experiment's own steps (its Step objects: copied, with the plan's seed)
        steps.append(Step(s.kind, s.name, s.cmd, s.log, s.run, s.creates, list(s.needs), s.result_log, plan.seed))
    steps.append(Step("report", "report", ["python", "-m", "moe_plugin.tools.report", plan.out], seed=plan.seed))
    return steps


def check_seeds(seeds, option: str = "--seeds") -> List[int]:
    """``seeds`` as a list of distinct non-negative ints; else ValueError naming ``option``."""
    seeds = list(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds) or \
            len(set(seeds)) != len(seeds):
        raise ValueError(f"{option}: {seeds!r}; allowed: one or more distinct non-negative integer seeds, "
                         "e.g. 1,2,3")
    return seeds


def parse_seeds(text: str, option: str = "--seeds") -> List[int]:
    """``"1,2,3"`` -> [1, 2, 3] (the runner's ``--seeds``); ValueError naming the option otherwise."""
    try:
        seeds = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{option}: {text!r}; allowed: comma-separated distinct non-negative integers, "
                         "e.g. 1,2,3") from None
    return check_seeds(seeds, option)


def seed_out(out: str, seed: int) -> str:
    """Where seed ``seed`` of an experiment whose output is ``out`` goes: ``out/seed<N>``."""
    return os.path.join(out, f"seed{seed}")


def scale_updates(hp: Dict[str, object], updates: int) -> Dict[str, object]:
    """--updates: the run length, and every interval that counts updates in proportion."""
    old = int(hp["updates"])
    hp["updates"] = updates
    for key in ("warmup", "validate_every", "save_every", "log_interval"):
        hp[key] = max(1, int(round(int(hp[key]) * updates / old)))
    return hp



# ----------------------------------------------------------------------------------------
# Helpers for the experiments' model flags
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
    """The scale's training hyperparameters with the experiment's overrides, then the command
    line's ``--updates`` (experiments build everything that counts updates from the result)."""
    hp = dict(BASE_HP[scale])
    hp.update(overrides)
    if args is not None and getattr(args, "updates", 0):
        scale_updates(hp, args.updates)
    return hp


def launcher_for(scale: str, nodes: int = 1, gpus_per_node: int = 8) -> Launcher:
    if scale != "paper":
        return Launcher("local")
    return Launcher("slurm" if nodes > 1 else "torchrun", nodes, gpus_per_node)


def word_level_setting(scale: str, args: Optional[argparse.Namespace], hp: Dict[str, Dict[str, object]],
                       nodes: int = 1, gpus_per_node: int = 8):
    """(hp, dataset, adaptive softmax, launcher) of an experiment on WikiText-103 (paper and
    mini scales; fairseq's adaptive input/softmax recipe) or the synthetic corpus (tiny):
    ``hp[scale]`` are the experiment's overrides of the scale's hyperparameters, ``nodes`` x
    ``gpus_per_node`` its paper-scale GPUs."""
    if scale == "tiny":
        return hp_for(scale, args, **hp.get(scale, {})), "synthetic", None, launcher_for(scale)
    return (hp_for(scale, args, **hp.get(scale, {})), "wikitext-103", WT103_ADAPTIVE,
            launcher_for(scale, nodes=nodes, gpus_per_node=gpus_per_node))
