"""Checkpoints written by an older moe_plugin still load and evaluate to the same numbers.

tests/fixtures/checkpoints/ holds, for every arch, a tiny model trained for a few updates by the
commit named in its MANIFEST.json (the main branch before the package was split into its
core / shell / tools / experiments wings), the binarised corpus it was trained on, and the
per-token log-probabilities fairseq's scorer gave then on the test split
(tests/fixtures/make_checkpoints.py wrote all of it). The current code must load each file the
way fairseq-eval-lm does and give the same per-token log-probabilities (1e-6), and
fairseq-eval-lm itself must print the same loss.
"""

import json
import os

import pytest
import torch

from tests.conftest import ROOT, USER_DIR, eval_lm_loss, run_cli

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "checkpoints")
DATA = os.path.join(FIXTURE, "data-bin")


def manifest():
    with open(os.path.join(FIXTURE, "MANIFEST.json")) as f:
        return json.load(f)


ARCHS = sorted(manifest()["archs"])


def test_every_fixture_arch_is_still_registered():
    """The archs of the older main all still exist (none renamed or dropped), and the fixture is small."""
    from moe_plugin.models.archs import ARCHS as REGISTERED, DENSE_ARCH

    assert set(ARCHS) <= set(REGISTERED) | {DENSE_ARCH}
    assert len(ARCHS) >= 9
    assert sum(v["bytes"] for v in manifest()["archs"].values()) < 1_500_000


def token_scores(checkpoint: str) -> dict:
    """fairseq-eval-lm's path (its checkpoint loader, its dataloader, its SequenceScorer): the
    same function that wrote the expected scores."""
    from tests.fixtures.make_checkpoints import token_scores as score

    return score(checkpoint, DATA)


@pytest.mark.parametrize("arch", ARCHS)
def test_old_checkpoint_gives_the_same_token_log_probs(arch):
    expected = torch.load(os.path.join(FIXTURE, f"{arch}.scores.pt"))
    got = token_scores(os.path.join(FIXTURE, f"{arch}.pt"))
    assert sorted(got) == sorted(expected)
    for i in expected:
        torch.testing.assert_close(got[i], expected[i], rtol=0, atol=1e-6)
    # the fixture can fail: the scores are not those of an untrained (uniform) model
    nll = -float(torch.cat(list(expected.values())).double().mean())
    assert abs(nll - manifest()["archs"][arch]["mean_nll"]) < 1e-9


@pytest.mark.e2e
@pytest.mark.parametrize("arch", ARCHS)
def test_old_checkpoint_through_fairseq_eval_lm(arch):
    out = run_cli("eval_lm", DATA, "--path", os.path.join(FIXTURE, f"{arch}.pt"), "--user-dir", USER_DIR, "--cpu",
                  "--gen-subset", "test", "--tokens-per-sample", "16", "--max-tokens", "256", "--num-workers", "0",
                  "--context-window", "0")
    loss = eval_lm_loss(out.stdout + out.stderr)
    expected = torch.load(os.path.join(FIXTURE, f"{arch}.scores.pt"))
    nll_base2 = -float(torch.cat(list(expected.values())).double().mean()) / float(torch.log(torch.tensor(2.0)))
    assert abs(loss - nll_base2) < 1e-4  # fairseq prints 4 decimals
