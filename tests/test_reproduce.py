"""scripts/reproduce/: every script's --dry-run at every scale (the commands it prints are the
commands it runs, and fairseq's own parsers accept them), the clear refusal when an arch is
not registered, and a tiny real run through the runner and the report. The full tiny-scale
runs of the four scripts are marked slow."""

import os
import re
import shlex
import subprocess
import sys

import pytest

from moe_plugin.experiments import runner as R
from moe_plugin.routing import ARCHS
from tests import _reproduce_runs
from tests.conftest import ROOT

SCRIPTS = R.SCRIPTS


def dry_run(script, scale, capsys, *extra):
    capsys.readouterr()
    plan = R.load_script(script).main(["--scale", scale, "--dry-run", *extra])
    return plan, capsys.readouterr().out


def strip_launcher(cmd):
    """The fairseq-train command inside a launcher's command line."""
    return cmd[cmd.index("fairseq-train"):]


_PARSED = {}


def parse_train(args):
    """fairseq-train's own parser on the arguments (an unknown flag or value fails)."""
    from fairseq import options

    key = tuple(args)
    if key not in _PARSED:
        _PARSED[key] = options.parse_args_and_arch(options.get_training_parser(), input_args=list(args))
    return _PARSED[key]


@pytest.mark.parametrize("scale", R.SCALES)
@pytest.mark.parametrize("script", SCRIPTS)
def test_dry_run_prints_the_exact_commands(script, scale, capsys):
    plan, out = dry_run(script, scale, capsys)
    steps = R.plan_steps(plan)
    printed = [line for line in out.splitlines() if line and not line.startswith("#")]
    assert len(printed) == len(steps)
    for line, step in zip(printed, steps):
        assert line.startswith(shlex.join(step.cmd))  # what is printed is what runs
    trains = [s for s in steps if s.kind == "train"]
    assert len(trains) == len(plan.runs) and trains
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
                assert cmd[:3] == ["bash", R.LAUNCH_TORCHRUN, str(ws)]
            else:
                assert cmd[0] == "sbatch" and "--wait" in cmd and R.LAUNCH_SLURM in cmd
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
    """fairseq-train's parser on every training command of every scale, fairseq-eval-lm's on
    every evaluation (runs of archs not registered in this checkout are skipped)."""
    from fairseq import options

    for scale in R.SCALES:
        plan, _ = dry_run(script, scale, capsys)
        for run in plan.runs:
            if run.arch not in ARCHS and run.arch not in R.FAIRSEQ_ARCHS:
                continue
            ns = parse_train(R.train_args(plan, run))
            assert ns.arch == run.arch and ns.max_update == int(plan.hp["updates"])
            for ev in run.evals:
                cmd = R.eval_command(plan, run, ev)
                cmd = cmd[cmd.index("fairseq-eval-lm"):]
                ens = options.parse_args_and_arch(options.get_eval_lm_parser(), input_args=cmd[1:])
                assert ens.gen_subset == ev.split
                if ev.overrides:
                    assert eval(ens.model_overrides) == ev.overrides


def test_hyperrouter_plan_evaluates_at_two_and_all_experts(capsys):
    plan, _ = dry_run("hyperrouter_tables", "paper", capsys)
    assert {r.dataset for r in plan.runs} == {"enwik8", "text8", "wikitext-103"}
    for run in plan.runs:
        if run.meta["kind"] in ("hyper", "smoe_dropout"):
            assert [ev.overrides for ev in run.evals] == [{"moe_eval_top_k": 2}, {"moe_eval_top_k": 16}]
            ns = parse_train(R.train_args(plan, run))
            assert (ns.moe_top_k_schedule, ns.moe_top_k_min, ns.moe_top_k_max) == ("linear_increase", 8, 16)
            assert ns.moe_top_k_schedule_updates == 400000
    sweeps = [s for s in plan.post if s.cmd[1] == "scripts/sweep_topk.py"]
    assert len(sweeps) == 3 and all("1,2,4,8,16" in s.cmd for s in sweeps)


def test_updates_override_moves_every_schedule(capsys):
    plan, out = dry_run("hyperrouter_tables", "tiny", capsys, "--updates", "30")
    assert plan.hp["updates"] == 30 and plan.hp["validate_every"] == 3
    run = plan.run_named("hyper_syn")
    assert run.args[run.args.index("--moe-top-k-schedule-updates") + 1] == "30"
    assert "--max-update 30 " in out


def test_only_keeps_the_runs_a_run_needs(capsys):
    plan, out = dry_run("hash_ablation", "tiny", capsys, "--only", "hash_clustered")
    assert [r.name for r in plan.runs] == ["dense", "hash_clustered"]
    assert "scripts/hash_kmeans_table.py" in out
    with pytest.raises(SystemExit):
        R.load_script("hash_ablation").main(["--dry-run", "--only", "nope"])


def test_unregistered_arch_is_refused_with_a_clear_message(monkeypatch, capsys):
    monkeypatch.delitem(ARCHS, "sam_lm")
    _, out = dry_run("sam_k_quality", "tiny", capsys)
    assert "WARNING" in out and "sam_lm: registered by moe_plugin/routing/sam.py (issue 5)" in out
    with pytest.raises(SystemExit, match=r"(?s)not registered.*sam_lm.*--skip-missing-archs"):
        R.load_script("sam_k_quality").main(["--scale", "tiny", "--out", os.devnull + "_x"])


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
    assert float(cells[2]) == pytest.approx(last_ppl) and float(cells[3]) == pytest.approx(test_ppl)
    assert cells[5] == "23.27"  # the paper's random-hash figure beside ours
    for png in ("valid_vs_updates_hash_ablation_ablation.png", "valid_vs_wall_hash_ablation_ablation.png",
                "load_hash_random.png"):
        assert os.path.getsize(os.path.join(tiny_run.out, "plots", png)) > 1000


@pytest.mark.slow
def test_script_runs_as_a_command():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "reproduce", "sam_k_quality.py"),
                           "--scale", "mini", "--dry-run"], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("fairseq-train data/wikitext-103/data-bin") == 7


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize("script", SCRIPTS)
def test_tiny_scale_end_to_end(script, tmp_path):
    """The acceptance run: --scale tiny on CPU writes its tables and plots (minutes each)."""
    mod = R.load_script(script)
    plan = R.load_script(script).main(["--scale", "tiny", "--dry-run"])
    missing = R.missing_archs(plan)
    args = ["--scale", "tiny", "--out", str(tmp_path / "out"), "--data-root", str(tmp_path / "data")]
    if missing:
        args.append("--skip-missing-archs")
    mod.main(args)
    md = (tmp_path / "out" / "report.md").read_text()
    assert f"## {script}" in md and "## All runs" in md
    assert list((tmp_path / "out" / "plots").glob("valid_vs_updates_*.png"))


def test_skip_missing_archs_marks_rows_not_run(monkeypatch, tmp_path, capsys):
    monkeypatch.delitem(ARCHS, "sam_lm")
    data_root = tmp_path / "data"
    (data_root / "synthetic" / "data-bin").mkdir(parents=True)
    (data_root / "synthetic" / "truth.json").write_text("{}")  # the corpus steps count as done
    (data_root / "synthetic" / "data-bin" / "dict.txt").write_text("")
    out = tmp_path / "out"
    R.load_script("sam_k_quality").main(["--scale", "tiny", "--only", "topk_k2,sam_k1", "--skip-missing-archs",
                                         "--out", str(out), "--data-root", str(data_root)])
    assert "skipping runs of unregistered archs: ['sam_k1', 'topk_k2']" in capsys.readouterr().out
    md = (out / "report.md").read_text()
    assert "| flat top-2 | 2 | 1 | not run |" in md and "| SAM K=1 | 1 | 2 | not run |" in md
    assert not (out / "sam_k1" / "train.log").exists()
