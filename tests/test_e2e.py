"""End to end as a user runs it: fairseq-preprocess -> fairseq-train -> fairseq-eval-lm,
for the dense baseline dense_lm and every registered MoE arch (the runs are shared with
test_eval_invariance.py: tests/_e2e_runs.py)."""

import math
import re

import pytest

from moe_plugin.models.archs import ARCHS
from tests import _e2e_runs
from tests.conftest import eval_lm_loss

pytestmark = pytest.mark.e2e

METRICS = ("moe_load_max", "moe_load_cv", "moe_dropped", "moe_entropy", "moe_unused", "moe_aux")


@pytest.mark.parametrize("arch", _e2e_runs.ALL_ARCHS)
def test_train_then_eval_lm(tiny_corpus, tmp_path_factory, arch):
    _, data_bin = tiny_corpus
    ckpt, out = _e2e_runs.trained(tmp_path_factory, data_bin, arch)
    assert re.search(r"\| train \|.*\bnum_updates 6\b", out)
    if arch in ARCHS:
        # routing metrics in fairseq's train and valid log lines, overall and per layer
        for key in METRICS:
            assert re.search(rf"\| train \|.*\b{key} [\d.]+", out), key
            assert re.search(rf"\| valid \|.*\b{key} [\d.]+", out), key
        assert re.search(r"\| train \|.*\bmoe_l\d+_load_max [\d.]+", out)
    else:  # the dense baseline: moe_cross_entropy with no MoE layer logs no routing metric
        logged = [line for line in out.splitlines() if "| train |" in line or "| valid |" in line]
        assert logged and not any(re.search(r"\bmoe_\w+ ", line) for line in logged)
    # the same command test_eval_invariance.py compares across batch sizes (run once)
    ev = _e2e_runs.eval_lm(data_bin, ckpt, *_e2e_runs.EVAL_ARGS, "--max-tokens", "64")
    loss = eval_lm_loss(ev)
    assert math.isfinite(loss) and 0 < loss < 20
