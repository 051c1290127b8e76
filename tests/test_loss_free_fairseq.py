"""Loss-free balancing through fairseq-train (--update-freq 2): the bias is in the
checkpoint, moves by the update rate once per update, and a run stopped and resumed from
its checkpoint reaches the same bias and weights as the uninterrupted run."""

import pytest
import torch

from tests.conftest import TINY_MODEL, TINY_TRAIN, run_cli

pytestmark = pytest.mark.e2e
RATE = 0.01


def train(data_bin, save, max_update):
    run_cli("train", data_bin, *TINY_TRAIN, *TINY_MODEL, "--arch", "loss_free_lm", "--criterion",
            "moe_cross_entropy", "--moe-expert-count", "4", "--moe-router-bias-update-rate", RATE,
            "--update-freq", "2", "--max-update", max_update, "--save-dir", save,
            "--save-interval-updates", "2", "--disable-validation")
    return torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=False)["model"]


def test_bias_in_checkpoint_and_resume(tiny_corpus, tmp_path):
    _, data_bin = tiny_corpus
    straight = train(data_bin, tmp_path / "straight", 4)
    train(data_bin, tmp_path / "resumed", 2)
    resumed = train(data_bin, tmp_path / "resumed", 4)
    biases = {k: v for k, v in straight.items() if k.endswith("expert_bias_E")}
    assert biases
    for k, b in biases.items():
        steps = b / RATE
        # 4 updates: the bias took the steps of updates 1..3 (update 4's counts are pending,
        # applied before the next update's first forward): integer multiples of the rate
        torch.testing.assert_close(steps, steps.round(), atol=1e-4, rtol=0)
        assert steps.abs().max() <= 3 + 1e-4 and (b != 0).any(), k
        assert int(straight[k.replace("expert_bias_E", "pending_load_E")].sum()) > 0
    tensors = [k for k, v in straight.items() if torch.is_tensor(v)]
    assert len(tensors) > 10
    for k in tensors:
        assert torch.equal(straight[k], resumed[k]), k
