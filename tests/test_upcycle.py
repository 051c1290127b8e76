"""Sparse upcycling (moe_plugin/tools/upcycle.py) from the dense_lm checkpoint of tests/_e2e_runs.py.

Step 0 is exact where a token's combine weights sum to one (hash; GShard's top-2 renormalised over
the chosen experts, every expert a copy); Switch's layer gives its top-1 probability times the
dense FFN (checked as that product). The output loads in fairseq-eval-lm (same perplexity as the
dense model for hash_lm) and fairseq-train --finetune-from-model continues from it."""

import os
import sys

import pytest
import torch
from fairseq import checkpoint_utils

from moe_plugin.tools import commands, upcycle as up
from tests import _e2e_runs
from tests.conftest import TINY_MODEL, TINY_TRAIN, eval_lm_loss, run_cli

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def dense(tiny_corpus, tmp_path_factory):
    _, data_bin = tiny_corpus
    ckpt, _ = _e2e_runs.trained(tmp_path_factory, data_bin, "dense_lm")
    return ckpt, data_bin


def load(path):
    (model,), _ = checkpoint_utils.load_model_ensemble([path])
    return model.eval()


def lprobs(model, src):
    with torch.no_grad():
        return model.get_normalized_probs(model(src), log_probs=True)


def batch(model, seed=0):
    V = len(model.decoder.dictionary)
    return torch.randint(4, V, (3, 20), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch,extra", [
    ("hash_lm", []), ("hash_lm", ["--hash-type", "balanced", "--hash-multi", "2"]),
    ("gshard_lm", ["--moe-freq", "1"]),
])
def test_step_zero_equals_the_dense_model_where_weights_sum_to_one(dense, tmp_path, arch, extra):
    ckpt, data_bin = dense
    out = up.upcycle(ckpt, arch, str(tmp_path / "up.pt"), ["--moe-expert-count", "4", *extra], log=lambda *_: None)
    d, m = load(ckpt), load(out)
    assert m.moe_layers() and m.decoder.moe_cfg.moe_router == _e2e_runs.ARCHS[arch][0]
    src = batch(d)
    torch.testing.assert_close(lprobs(m, src), lprobs(d, src), atol=1e-5, rtol=0)


def test_switch_layer_is_its_top1_probability_times_the_dense_ffn(dense, tmp_path):
    ckpt, _ = dense
    out = up.upcycle(ckpt, "switch_lm", str(tmp_path / "up.pt"), ["--moe-expert-count", "4"], log=lambda *_: None)
    d, m = load(ckpt), load(out)
    ((i, layer),) = m.moe_layers()
    fc1, fc2 = d.decoder.layers[i].fc1, d.decoder.layers[i].fc2
    x = torch.randn(50, fc1.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        p_top1 = torch.softmax(layer.router.gate(x).float(), -1).max(-1).values
        want = p_top1[:, None] * fc2(torch.relu(fc1(x)))
        torch.testing.assert_close(layer(x), want, atol=1e-6, rtol=1e-5)


def test_router_initialisation_follows_the_seed(dense, tmp_path):
    """The router starts as a fresh build seeded by the dense run's --seed (or --seed): the same
    file twice, another gate with another seed."""
    ckpt, _ = dense
    gates = []
    for name, seed in (("a", None), ("b", None), ("c", 7)):
        out = up.upcycle(ckpt, "switch_lm", str(tmp_path / f"{name}.pt"), ["--moe-expert-count", "4"], seed=seed,
                         log=lambda *_: None)
        ((_, layer),) = load(out).moe_layers()
        gates.append(layer.router.gate.weight.detach())
    assert torch.equal(gates[0], gates[1]) and not torch.equal(gates[0], gates[2])


def test_noise_perturbs_each_expert_copy(dense, tmp_path):
    ckpt, _ = dense
    out = up.upcycle(ckpt, "hash_lm", str(tmp_path / "up.pt"), ["--moe-expert-count", "4"], noise=0.1,
                     noise_seed=3, log=lambda *_: None)
    ((i, layer),) = load(out).moe_layers()
    w1 = layer.experts.w1_EDF.detach()
    dense_w1 = load(ckpt).decoder.layers[i].fc1.weight.detach().t()
    rel = (w1 / dense_w1 - 1).flatten(1)
    assert not torch.equal(w1[0], w1[1])
    assert rel.std(1).sub(0.1).abs().max() < 0.02 and rel.mean(1).abs().max() < 0.02


@pytest.mark.parametrize("arch,extra,option", [
    ("base_lm", [], "--arch"),
    ("hash_lm", ["--moe-expert-ffn-dim", "32"], "--moe-expert-ffn-dim"),
    ("switch_lm", ["--moe-shared-experts", "1"], "--moe-shared-experts"),
    ("hash_lm", ["--hash-expert-norm"], "--hash-expert-norm"),
    ("switch_lm", ["--moe-expert-parallel"], "--moe-expert-parallel"),
    ("switch_lm", ["--decoder-layers", "3"], "--decoder-layers"),
    ("dense_lm", [], "--arch"),
])
def test_what_cannot_be_upcycled_is_refused_with_one_line(dense, tmp_path, arch, extra, option):
    ckpt, _ = dense
    with pytest.raises(up.UpcycleError) as err:
        up.upcycle(ckpt, arch, str(tmp_path / "up.pt"), ["--moe-expert-count", "4", *extra], log=lambda *_: None)
    assert str(err.value).startswith(option + ":") and "\n" not in str(err.value), str(err.value)
    assert not os.path.exists(tmp_path / "up.pt")


def test_a_dictionary_of_another_size_is_refused_naming_the_tensor(dense, tmp_path):
    ckpt, data_bin = dense
    other = tmp_path / "data-bin"
    other.mkdir()
    text = open(os.path.join(data_bin, "dict.txt")).read()
    (other / "dict.txt").write_text(text + "extra1 1\nextra2 1\n")
    with pytest.raises(up.UpcycleError, match=r"^--dense: decoder\.embed_tokens\.weight is \(\d+, 32\) in the dense "
                                             r"checkpoint and \(\d+, 32\) in the switch model$"):
        up.upcycle(ckpt, "switch_lm", str(tmp_path / "up.pt"), ["--moe-expert-count", "4"], data=str(other),
                   log=lambda *_: None)


def test_a_moe_checkpoint_is_refused(dense, tmp_path):
    ckpt, _ = dense
    first = up.upcycle(ckpt, "hash_lm", str(tmp_path / "up.pt"), ["--moe-expert-count", "4"], log=lambda *_: None)
    with pytest.raises(up.UpcycleError, match=r"^--dense: .* is a hash_lm checkpoint; allowed: a dense_lm"):
        up.upcycle(first, "switch_lm", str(tmp_path / "again.pt"), [], log=lambda *_: None)


def test_eval_lm_and_finetune_from_the_upcycled_checkpoint(dense, tmp_path):
    """The acceptance flow through the command-line tools."""
    ckpt, data_bin = dense
    out = str(tmp_path / "hash.pt")
    commands.run([sys.executable, "-m", "moe_plugin.tools.upcycle", "--dense", ckpt, "--arch", "hash_lm",
                  "--out", out, "--moe-expert-count", "4"])
    losses = [eval_lm_loss(_e2e_runs.eval_lm(data_bin, c, *_e2e_runs.EVAL_ARGS, "--max-tokens", "64"))
              for c in (ckpt, out)]
    assert losses[0] == losses[1]
    train = run_cli("train", data_bin, *TINY_TRAIN, *TINY_MODEL, "--arch", "hash_lm", "--moe-expert-count", "4",
                    "--criterion", "moe_cross_entropy", "--max-update", "2", "--save-dir", tmp_path / "ft",
                    "--finetune-from-model", out)
    log = train.stdout + train.stderr
    assert f"Loaded checkpoint {out} (epoch 1 @ 0 updates)" in log and "num_updates 2" in log
    assert torch.load(tmp_path / "ft" / "checkpoint_last.pt", weights_only=False)["optimizer_history"][-1][
        "num_updates"] == 2
