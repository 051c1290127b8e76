"""End to end as a user runs it: fairseq-preprocess -> fairseq-train -> fairseq-eval-lm,
for fairseq's dense transformer_lm and every registered MoE arch."""

import math
import re

import pytest

from moe_plugin.routing import ARCHS, DEMO_ARGS
from tests.conftest import TINY_MODEL, TINY_TRAIN, eval_lm_loss, run_cli

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("arch", ["transformer_lm"] + sorted(ARCHS))
def test_train_then_eval_lm(tiny_corpus, tmp_path, arch):
    text, data_bin = tiny_corpus
    demo = [a.format(max_update=6) for a in DEMO_ARGS.get(arch, [])]
    extra = [] if arch == "transformer_lm" else ["--moe-expert-count", "4", *demo]
    proc = run_cli("train", data_bin, *TINY_TRAIN, *TINY_MODEL, "--arch", arch, "--criterion", "moe_cross_entropy",
                   "--max-update", "6", "--save-dir", tmp_path, *extra)
    out = proc.stdout + proc.stderr
    if arch != "transformer_lm":
        # routing metrics in fairseq's train and valid log lines, overall and per layer
        for key in ("moe_load_max", "moe_load_cv", "moe_dropped", "moe_entropy", "moe_unused", "moe_aux"):
            assert re.search(rf"\| train \|.*\b{key} [\d.]+", out), key
            assert re.search(rf"\| valid \|.*\b{key} [\d.]+", out), key
        assert re.search(r"\| train \|.*\bmoe_l\d+_load_max [\d.]+", out)
    ev = run_cli("eval_lm", data_bin, "--user-dir", TINY_TRAIN[3], "--path", tmp_path / "checkpoint_last.pt",
                 "--cpu", "--tokens-per-sample", "32", "--max-tokens", "512")
    loss = eval_lm_loss(ev.stdout + ev.stderr)
    assert math.isfinite(loss) and 0 < loss < 20
