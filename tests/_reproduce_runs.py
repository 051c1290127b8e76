"""A tiny real run through the reproduce machinery (moe_plugin/experiments/runner.py), shared by
test_reproduce.py and test_analysis.py: one hash_lm run (random hash, 4 experts in both
layers of TINY_MODEL's shape) trained for 12 updates with fairseq-train, evaluated with
fairseq-eval-lm, reported by moe_plugin.tools.report. Built once per test session (cached in
pytest's base temp directory)."""

import os

from moe_plugin.experiments import runner as R

UPDATES = 12


def tiny_plan(out: str, data_bin: str) -> R.Plan:
    hp = R.hp_for("tiny", tokens_per_sample=32, max_tokens=512, updates=UPDATES, warmup=2, lr=1e-3,
                  log_interval=2, validate_every=4, save_every=6, eval_max_tokens=1024)
    model = R.model_flags(32, 2, 2, 64) + ["--moe-expert-count", "4", "--moe-layers", "0,1", "--hash-type", "random"]
    run = R.Run("hash_random", "Hash (random)", "hash_lm", "tiny", model, group="ablation",
                meta=dict(hash_type="random", experts=4, router="hash"))
    ds = R.Dataset("tiny", data_bin, "ppl", "tiny synthetic")
    return R.Plan("hash_ablation", "tiny", "test run", [run], {"tiny": ds}, hp, R.Launcher("local"), device="cpu",
                  out=out)


def tiny_run(tmp_path_factory, tiny_corpus) -> R.Plan:
    out = str(tmp_path_factory.getbasetemp() / "reproduce_tiny_run")
    plan = tiny_plan(out, tiny_corpus[1])
    if not os.path.exists(os.path.join(out, "report.md")):
        R.execute(plan, R.plan_steps(plan))
    return plan
