"""The experiments (moe_plugin/experiments/, run by scripts/reproduce/<name>.sh): every
experiment's --dry-run at every scale (the commands it prints are the commands it runs, and
fairseq's own parsers accept them), the registry, the shell entry points, and a tiny real run
through the runner and the report. The full tiny-scale runs of the four experiments are
marked slow."""

import os
import re
import shlex
import subprocess
import sys

import pytest

from moe_plugin.experiments import EXPERIMENTS, register_experiment
from moe_plugin.experiments import _plan as P
from moe_plugin.experiments import runner as R
from moe_plugin.experiments._hydra import files_written_later
from moe_plugin.models.archs import ARCHS
from tests import _reproduce_runs
from tests.conftest import ROOT

SCRIPTS = list(EXPERIMENTS)
#: every arch a plan may name: the routers', the plugin's dense one, fairseq's own
KNOWN_ARCHS = set(ARCHS) | set(P.PLUGIN_ARCHS) | set(P.FAIRSEQ_ARCHS)


def dry_run(script, scale, capsys, *extra):
    """(the first seed's plan, the printed dry run, every seed's plan)."""
    capsys.readouterr()
    plans = R.main(script, ["--scale", scale, "--dry-run", *extra])
    return plans[0], capsys.readouterr().out, plans


def strip_launcher(cmd):
    """The fairseq-train command inside a launcher's command line."""
    return cmd[cmd.index("fairseq-train"):]


_PARSED = {}


def parse_train(args):
    """fairseq-train's own parser on the arguments (an unknown flag or value fails)."""
    from fairseq import options

    key = tuple(args)
    if key not in _PARSED:
        # a hash table the plan writes before that run is named as it will be
        args, later = files_written_later(args)
        _PARSED[key] = options.parse_args_and_arch(options.get_training_parser(), input_args=args)
        vars(_PARSED[key]).update(later)
    return _PARSED[key]


@pytest.mark.parametrize("scale", P.SCALES)
@pytest.mark.parametrize("script", SCRIPTS)
def test_dry_run_prints_the_exact_commands(script, scale, capsys):
    plan, out, plans = dry_run(script, scale, capsys)
    steps = P.plan_steps(plans)
    printed = [line for line in out.splitlines() if line and not line.startswith("#")]
    assert len(printed) == len(steps)
    for line, step in zip(printed, steps):
        assert line.startswith(shlex.join(step.cmd))  # what is printed is what runs
    trains = [s for s in steps if s.kind == "train"]
    assert [p.seed for p in plans] == list(P.DEFAULT_SEEDS[scale])
    assert len(trains) == len(plan.runs) * len(plans) and trains  # every run once per seed
    for step in trains:
        cmd = step.cmd
        inner = strip_launcher(cmd)
        assert inner[0] == "fairseq-train"
        if scale == "tiny":
            assert "--cpu" in inner and plan.launcher.kind == "local"
            assert inner[1].startswith(os.path.join("results", "reproduce", "data"))
        else:
            assert "--cpu" not in inner and "--fp16" in inner
            assert inner[1].startswith("data" + os.sep)
        if scale == "paper":
            # through a multi-GPU launcher, with the world size it starts
            ws = int(inner[inner.index("--distributed-world-size") + 1])
            assert ws == plan.launcher.world_size > 1
            if plan.launcher.kind == "torchrun":
                assert cmd[:3] == ["bash", P.LAUNCH_TORCHRUN, str(ws)]
            else:
                assert cmd[0] == "sbatch" and "--wait" in cmd and P.LAUNCH_SLURM in cmd
                nodes = int(cmd[cmd.index("--nodes") + 1])
                assert nodes * int(cmd[cmd.index("--ntasks-per-node") + 1]) == ws
            for ev in [s for s in steps if s.run == step.run and s.kind == "eval"]:
                if "--moe-expert-parallel" in inner:
                    # per-rank shards, evaluated on the training's launcher and world size
                    assert ev.cmd[:2] == cmd[:2] and "fairseq-eval-lm" in ev.cmd
                    assert ev.cmd[ev.cmd.index("--path") + 1].endswith("checkpoint_last-rank-{RANK}.pt")
                else:
                    assert ev.cmd[0] == "fairseq-eval-lm"
        else:
            assert cmd[0] == "fairseq-train"
    assert steps[-1].cmd[:3] == ["python", "-m", "moe_plugin.tools.report"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_command_is_accepted_by_fairseqs_parsers(script, capsys):
    """fairseq-train's parser on every training command of every scale (dense_lm rows
    included), fairseq-eval-lm's on every evaluation."""
    from fairseq import options

    for scale in P.SCALES:
        plan, _, _ = dry_run(script, scale, capsys)
        for run in plan.runs:
            assert run.arch in KNOWN_ARCHS, run.arch
            ns = parse_train(P.train_args(plan, run))
            # a run may train its own number of updates (upcycling: the dense start and the upcycled runs)
            assert ns.arch == run.arch and ns.max_update == int(run.meta.get("max_update", plan.hp["updates"]))
            for ev in run.evals:
                cmd = P.eval_command(plan, run, ev)
                cmd = cmd[cmd.index("fairseq-eval-lm"):]
                ens = options.parse_args_and_arch(options.get_eval_lm_parser(), input_args=cmd[1:])
                assert ens.gen_subset == ev.split
                if ev.overrides:
                    assert eval(ens.model_overrides) == ev.overrides


def test_hyperrouter_plan_evaluates_at_two_and_all_experts(capsys):
    plan, _, _ = dry_run("hyperrouter_tables", "paper", capsys)
    assert {r.dataset for r in plan.runs} == {"enwik8", "text8", "wikitext-103"}
    for run in plan.runs:
        if run.meta["kind"] in ("hyper", "smoe_dropout"):
            assert [ev.overrides for ev in run.evals] == [{"moe_eval_top_k": 2}, {"moe_eval_top_k": 16}]
            ns = parse_train(P.train_args(plan, run))
            assert (ns.moe_top_k_schedule, ns.moe_top_k_min, ns.moe_top_k_max) == ("linear_increase", 8, 16)
            assert ns.moe_top_k_schedule_updates == 400000
    sweeps = [s for s in plan.post if s.cmd[1:3] == ["-m", "moe_plugin.tools.sweep_topk"]]
    assert len(sweeps) == 3 and all("1,2,4,8,16" in s.cmd for s in sweeps)


def test_updates_override_moves_every_schedule(capsys):
    plan, out, _ = dry_run("hyperrouter_tables", "tiny", capsys, "--updates", "30")
    assert plan.hp["updates"] == 30 and plan.hp["validate_every"] == 3
    run = plan.run_named("hyper_syn")
    assert run.args[run.args.index("--moe-top-k-schedule-updates") + 1] == "30"
    assert "--max-update 30 " in out


def test_only_keeps_the_runs_a_run_needs(capsys):
    plan, out, plans = dry_run("hash_ablation", "tiny", capsys, "--only", "hash_clustered")
    assert all([r.name for r in p.runs] == ["dense", "hash_clustered"] for p in plans)
    assert "python -m moe_plugin.tools.hash_kmeans" in out
    with pytest.raises(SystemExit):
        R.main("hash_ablation", ["--dry-run", "--only", "nope"])


def test_registry_holds_each_paper_table_once():
    assert sorted(SCRIPTS) == sorted(["balancing", "base_throughput_quality", "hash_ablation", "sam_k_quality",
                                      "hyperrouter_tables", "upcycling"])
    for name, exp in EXPERIMENTS.items():
        assert exp.name == name and exp.paper["source"] and callable(exp.table) and exp.description
        assert os.path.exists(os.path.join(ROOT, "scripts", "reproduce", f"{name}.sh"))
    with pytest.raises(ValueError, match="registered twice"):
        register_experiment("hash_ablation", table=lambda runs: [], paper={"source": "x"})(lambda scale, args: None)
    with pytest.raises(ValueError, match="registered: balancing, base_throughput_quality"):
        R.main("nope", ["--dry-run"])


def test_seeds_train_every_run_once_per_seed_in_its_own_directory(capsys):
    """--seeds 4,7: the experiment once per seed into OUT/seed<N> (--seed N), its own extra
    steps included (k-means from the same seed's dense model, the K sweep of that seed's
    checkpoints); the datasets prepared once; one report over OUT."""
    out = os.path.join("results", "reproduce", "hash_ablation", "tiny")
    plan, text, plans = dry_run("hash_ablation", "tiny", capsys, "--seeds", "4,7")
    steps = P.plan_steps(plans)
    assert [p.seed for p in plans] == [4, 7] and all(p.seeds == [4, 7] for p in plans)
    names = [r.name for r in plan.runs]
    for seed in (4, 7):
        sdir = os.path.join(out, f"seed{seed}")
        trains = [s for s in steps if s.kind == "train" and s.seed == seed]
        assert [s.run for s in trains] == names
        for s in trains:
            ns = parse_train(strip_launcher(s.cmd)[1:])
            assert ns.seed == seed and ns.save_dir == os.path.join(sdir, s.run, "checkpoints")
            assert s.log == os.path.join(sdir, s.run, "train.log")
        for s in steps:
            if s.kind in ("eval", "pre") and s.seed == seed:
                assert all(sdir in a for a in s.cmd if a.startswith(out)), s.cmd
        kmeans = next(s for s in steps if s.kind == "pre" and s.seed == seed and s.run == "hash_clustered")
        assert kmeans.cmd[3] == os.path.join(sdir, "dense", "checkpoints", "checkpoint_last.pt")
    prepares = [s for s in steps if s.kind == "prepare"]
    assert [s.cmd for s in prepares] == [s.cmd for s in P.plan_steps(plans[0]) if s.kind == "prepare"] != []
    assert [s.cmd for s in steps if s.kind == "report"] == [["python", "-m", "moe_plugin.tools.report", out]]
    assert "# seeds 4,7: every run trained once per seed" in text
    # the hyperrouter K sweep reads its own seed's checkpoints
    _, _, hplans = dry_run("hyperrouter_tables", "tiny", capsys, "--seeds", "1,2")
    for hp_ in hplans:
        sweep = next(s for s in P.plan_steps(hp_) if s.kind == "post")
        ckpts = [a.split("=", 1)[1] for a in sweep.cmd if "=" in a and a.endswith(".pt")]
        assert ckpts and all(c.startswith(os.path.join(hp_.out, "")) for c in ckpts)
        assert hp_.out == P.seed_out(os.path.join("results", "reproduce", "hyperrouter_tables", "tiny"), hp_.seed)


@pytest.mark.parametrize("bad", ["1,x", "1,1", "-2", ","])
def test_bad_seeds_are_refused_with_the_option_named(bad, capsys):
    with pytest.raises(SystemExit):
        R.main("sam_k_quality", ["--dry-run", "--seeds", bad])
    err = capsys.readouterr().err
    assert "--seeds" in err and "allowed" in err
    with pytest.raises(ValueError, match="--seeds"):
        P.parse_seeds(bad)


def test_plan_without_a_seed_keeps_the_old_layout():
    """plan_of's plan (one hydra config per run) has no seed: OUT/<run> and hp's --seed (the
    layout before seeds; tests/_reproduce_runs.py trains such a plan and reports it)."""
    plan = R.plan_of("sam_k_quality", "tiny")
    assert plan.seed is None and plan.seeds == list(P.DEFAULT_SEEDS["tiny"])
    run = plan.runs[0]
    args = P.train_args(plan, run)
    assert args[args.index("--save-dir") + 1] == os.path.join(plan.out, run.name, "checkpoints")
    assert args[args.index("--seed") + 1] == str(plan.hp["seed"])
    steps = P.plan_steps(plan)
    assert steps[-1].cmd[-1] == plan.out and all(s.seed is None for s in steps)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_corpus):
    return _reproduce_runs.tiny_run(tmp_path_factory, tiny_corpus)


@pytest.mark.e2e
def test_tiny_run_through_runner_and_report(tiny_run):
    import json

    from moe_plugin.tools import report

    rd = os.path.join(tiny_run.out, "hash_random")
    meta = json.load(open(os.path.join(rd, "run.json")))
    assert meta["status"] == "trained" and meta["arch"] == "hash_lm"
    log = open(os.path.join(rd, "train.log")).read()
    eval_log = open(os.path.join(rd, "eval_test.log")).read()
    assert log.startswith("# fairseq-train ") and "done training" in log
    # the report against the raw text: every validation line, the last one's figures, eval-lm's result
    n_valid = len(re.findall(r"valid on 'valid' subset", log))
    last_ppl = float(re.findall(r"valid on 'valid' subset .*\| ppl ([\d.]+)", log)[-1])
    test_ppl = float(re.findall(r"Perplexity: ([\d.]+)", eval_log)[-1])
    run = report.load_run(rd)
    assert len(run["valid_curve"]) == n_valid >= 3
    assert run["updates"] == _reproduce_runs.UPDATES
    assert run["valid_final"]["ppl"] == last_ppl
    assert run["valid_final"]["ppl"] == pytest.approx(2 ** run["valid_final"]["nll_loss"], rel=2e-3)
    assert sorted(run["load_series"]) == [0, 1]
    md = open(os.path.join(tiny_run.out, "report.md")).read()
    row = next(line for line in md.splitlines() if line.startswith("| Hash (random) | 4 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # test: 2 ** eval-lm's 4-decimal loss (off by up to ppl * ln 2 * 5e-5 from the exact one), which its
    # 2-decimal perplexity rounds (0.005)
    assert float(cells[2]) == pytest.approx(last_ppl)
    assert float(cells[3]) == pytest.approx(test_ppl, abs=test_ppl * 0.6932 * 5e-5 + 0.005)
    # flops.json, counted by the runner from the run's training flags: the parameters of the
    # model fairseq loads from the run's checkpoint
    from fairseq import checkpoint_utils

    fl = json.load(open(os.path.join(rd, "flops.json")))
    models, _ = checkpoint_utils.load_model_ensemble([os.path.join(rd, "checkpoints", "checkpoint_last.pt")])
    assert fl["total_params"] == sum(p.numel() for p in models[0].parameters())
    assert fl["active_flops_per_token"]["eval"] > 0 and run["flops"] == fl
    assert cells[5] == "23.27"  # the paper's random-hash figure beside ours
    for png in ("valid_vs_updates_hash_ablation_ablation.png", "valid_vs_wall_hash_ablation_ablation.png",
                "load_hash_random.png"):
        assert os.path.getsize(os.path.join(tiny_run.out, "plots", png)) > 1000


@pytest.mark.e2e
def test_tiny_seeds_through_runner_and_report(tmp_path_factory, tiny_corpus):
    """Two seeds of the tiny run: each trained with its --seed into OUT/seed<N>/<run>, and the
    report's row is the mean ± sample std of the two seeds' own results (read from the logs)."""
    import json
    import statistics

    from moe_plugin.tools import report

    out, plans = _reproduce_runs.tiny_seed_run(tmp_path_factory, tiny_corpus)
    tests = []
    for seed in (1, 2):
        rd = os.path.join(out, f"seed{seed}", "hash_random")
        meta = json.load(open(os.path.join(rd, "run.json")))
        assert meta["status"] == "trained" and meta["seed"] == seed and meta["seeds"] == [1, 2]
        log = open(os.path.join(rd, "train.log")).read()
        assert f"--seed {seed} " in log.splitlines()[0]
        # eval-lm's 4-decimal base-2 loss (its perplexity is printed with 2 decimals only)
        bits = float(re.findall(r"Loss \(base 2\): ([\d.]+)", open(os.path.join(rd, "eval_test.log")).read())[-1])
        tests.append(2 ** bits)
    assert tests[0] != tests[1]  # the seeds differ
    md = open(os.path.join(out, "report.md")).read()
    row = next(line for line in md.splitlines() if line.startswith("| Hash (random) | 4 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] == f"{statistics.mean(tests):.3f} ± {statistics.stdev(tests):.3f} (n=2)"
    assert "### The paper's claims at tiny scale (seeds 1, 2)" in md
    runs = report.group_seeds([report.load_run(d) for d in report.find_run_dirs([out])])
    assert len(runs) == 1 and runs[0]["seed_list"] == [1, 2]


def test_shell_entry_point_prints_the_plan_from_any_directory(tmp_path):
    """bash scripts/reproduce/<name>.sh from another directory: the same plan, with the
    experiment's own option (--equal-compute) passed through."""
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "reproduce", "sam_k_quality.sh"), "--scale", "mini",
                           "--dry-run", "--equal-compute"], capture_output=True, text=True, cwd=str(tmp_path),
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("fairseq-train data/wikitext-103/data-bin") == 7 * len(P.DEFAULT_SEEDS["mini"])
    assert f"run from {ROOT}" in proc.stdout and "experts of hidden size F/K (--equal-compute)" in proc.stdout


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize("script", SCRIPTS)
def test_tiny_scale_end_to_end(script, tmp_path):
    """The acceptance run: --scale tiny on CPU writes its tables and plots (minutes each)."""
    R.main(script, ["--scale", "tiny", "--out", str(tmp_path / "out"), "--data-root", str(tmp_path / "data")])
    md = (tmp_path / "out" / "report.md").read_text()
    assert f"## {script}" in md and "## All runs" in md
    assert list((tmp_path / "out" / "plots").glob("valid_vs_updates_*.png"))
