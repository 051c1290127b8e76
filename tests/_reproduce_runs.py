"""A tiny real run through the experiment runner (moe_plugin/experiments/runner.py), shared by
test_reproduce.py and test_analysis.py: one hash_lm run (random hash, 4 experts in both
layers of TINY_MODEL's shape) trained for 12 updates with fairseq-train, evaluated with
fairseq-eval-lm, reported by moe_plugin.tools.report: a plan without a seed (OUT/<run>, the
layout before seeds) and the same run at two seeds (OUT/seed<N>/<run>, as the runner lays out
an experiment). Built once per test session (cached in pytest's base temp directory)."""

import os

from moe_plugin.experiments import _plan as P
from moe_plugin.experiments import runner

UPDATES = 12


def tiny_plan(out: str, data_bin: str) -> P.Plan:
    hp = P.hp_for("tiny", tokens_per_sample=32, max_tokens=512, updates=UPDATES, warmup=2, lr=1e-3,
                  log_interval=2, validate_every=4, save_every=6, eval_max_tokens=1024)
    model = P.model_flags(32, 2, 2, 64) + ["--moe-expert-count", "4", "--moe-layers", "0,1", "--hash-type", "random"]
    run = P.Run("hash_random", "Hash (random)", "hash_lm", "tiny", model, group="ablation",
                meta=dict(hash_type="random", experts=4, router="hash"))
    ds = P.Dataset("tiny", data_bin, "ppl", "tiny synthetic")
    return P.Plan("hash_ablation", "tiny", "test run", [run], {"tiny": ds}, hp, P.Launcher("local"), device="cpu",
                  out=out)


def tiny_seed_run(tmp_path_factory, tiny_corpus, seeds=(1, 2)):
    """The tiny plan once per seed, executed through the runner: (OUT, the seeds' plans)."""
    out = str(tmp_path_factory.getbasetemp() / "reproduce_tiny_seeds")
    plans = []
    for s in seeds:
        plan = tiny_plan(P.seed_out(out, s), tiny_corpus[1])
        plan.seed, plan.seeds = s, list(seeds)
        plans.append(plan)
    if not os.path.exists(os.path.join(out, "report.md")):
        runner.execute(plans, P.plan_steps(plans))
    return out, plans


def tiny_run(tmp_path_factory, tiny_corpus) -> P.Plan:
    out = str(tmp_path_factory.getbasetemp() / "reproduce_tiny_run")
    plan = tiny_plan(out, tiny_corpus[1])
    if not os.path.exists(os.path.join(out, "report.md")):
        runner.execute(plan, P.plan_steps(plan))
    return plan
