"""base_lm end to end as a user runs it: fairseq-train with E local experts in one process,
then fairseq-eval-lm on its checkpoint (one file, whatever the world size)."""

import math
import re

import pytest
import torch

from tests.conftest import TINY_MODEL, TINY_TRAIN, eval_lm_loss, run_cli

pytestmark = pytest.mark.e2e


def test_base_lm_trains_balanced_and_evaluates(tiny_corpus, tmp_path):
    _, data_bin = tiny_corpus
    E = 4
    proc = run_cli(
        "train", data_bin, *TINY_TRAIN, *TINY_MODEL, "--arch", "base_lm", "--criterion", "moe_cross_entropy",
        "--base-layers", "1", "--base-sublayers", "2", "--moe-expert-count", E, "--max-update", "6",
        "--save-dir", tmp_path,
    )
    out = proc.stdout + proc.stderr
    # the BASE layer sits at fairseq's position: index (1 * 2) // 2 = 1 of [layer0, BASE, layer1]
    train = [line for line in out.splitlines() if "| train_inner |" in line or " train_inner " in line]
    assert train, out[-3000:]
    for line in train:
        # every training batch is exactly balanced (512 tokens, no padding, 4 experts)
        assert re.search(r"moe_l1_load_max[= ]1(\.0+)?[,| ]", line + " "), line
        assert re.search(r"moe_l1_auction_rounds[= ][\d.]+", line), line
        assert re.search(r"moe_l1_affinity[= ]-?[\d.]+", line), line
    # one checkpoint (no per-rank files) holding all E experts and the centroids
    files = sorted(p.name for p in tmp_path.glob("checkpoint*.pt"))
    assert "checkpoint_last.pt" in files and not any("rank" in f for f in files)
    state = torch.load(tmp_path / "checkpoint_last.pt", map_location="cpu", weights_only=False)["model"]
    assert state["decoder.layers.1.moe.router.expert_centroids"].shape == (E, 32)
    assert state["decoder.layers.1.moe.experts.ffns.1.w1_EDF"].shape == (E, 32, 64)
    ev = run_cli("eval_lm", data_bin, "--user-dir", TINY_TRAIN[3], "--path", tmp_path / "checkpoint_last.pt",
                 "--cpu", "--tokens-per-sample", "32", "--max-tokens", "512")
    loss = eval_lm_loss(ev.stdout + ev.stderr)
    assert math.isfinite(loss) and 0 < loss < 20
