"""--checkpoint-activations / --offload-activations route exactly as the plain forward does.

For every registered arch (the router contract over the registry): one training step of the
fairseq model with and without activation checkpointing, on a batch with padding, dropout on
and a capacity small enough to drop tokens, gives the same loss and the same gradient of
every parameter, router included (the aux losses keep their gradient), and BASE solves its
assignment once per step (the recompute replays it, so the warm-start prices move once).
"""

import pytest
import torch

import moe_plugin  # noqa: F401
from moe_plugin.models.archs import ARCHS
from moe_plugin.routing import balanced as balanced_mod
from tests.helpers import lm_sample
from tests.test_fairseq_integration import build

#: per-arch flags making every loss of the arch count and every router path run
ARCH_FLAGS = {
    "switch_lm": ["--moe-capacity-factor", "1.0", "--moe-jitter-eps", "0.1"],
    "gshard_lm": ["--moe-second-expert-policy", "sampling"],
    "sam_lm": ["--moe-capacity-factor", "1.0"],
    "hash_lm": ["--moe-freq", "2"],
}


def _batch(task, bsz=3, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = task.source_dictionary
    tokens = torch.randint(d.nspecial, len(d), (bsz, length), generator=g)
    lengths = torch.tensor([length, length - 5, length - 2][:bsz])
    for b, n in enumerate(lengths.tolist()):
        tokens[b, n:] = d.pad()
    target = torch.cat([tokens[:, 1:], tokens.new_full((bsz, 1), d.pad())], dim=1)
    target[tokens.eq(d.pad())] = d.pad()
    return lm_sample(tokens, target, d.pad())


def _step(model, criterion, sample, rng_seed):
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(rng_seed)
    loss, _, log = criterion(model, sample)
    loss.backward()
    grads = {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}
    return float(loss), grads, log


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("offload", [False, True])
def test_checkpointing_gives_the_same_step(tiny_corpus, arch, offload, monkeypatch):
    _, data_bin = tiny_corpus
    flags = ["--dropout", "0.1", "--moe-loss-weights", "z=0.01", *ARCH_FLAGS.get(arch, [])]
    _, task, plain, criterion = build(data_bin, arch, *flags)
    ckpt_flags = ["--checkpoint-activations"] + (["--offload-activations"] if offload else [])
    _, _, ckpt, _ = build(data_bin, arch, *flags, *ckpt_flags)
    ckpt.load_state_dict(plain.state_dict())
    sample = _batch(task)

    solves = []
    real_solve = balanced_mod.solve_balanced
    monkeypatch.setattr(balanced_mod, "solve_balanced", lambda *a, **k: solves.append(1) or real_solve(*a, **k))

    loss_a, grads_a, log_a = _step(plain, criterion, sample, rng_seed=3)
    n_plain = len(solves)
    loss_b, grads_b, log_b = _step(ckpt, criterion, sample, rng_seed=3)
    assert len(solves) - n_plain == n_plain, "BASE must solve once per layer and step, also when checkpointed"

    assert loss_b == pytest.approx(loss_a, rel=1e-6, abs=1e-6)
    assert grads_a.keys() == grads_b.keys()
    routed_with_grad = 0
    for name, g_a in grads_a.items():
        g_b = grads_b[name]
        assert (g_a is None) == (g_b is None), name
        if g_a is None:
            continue
        torch.testing.assert_close(g_b, g_a, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        if "router" in name and g_a.abs().sum() > 0:
            routed_with_grad += 1
    for key, value in log_a.items():
        if key.startswith("moe_") and isinstance(value, float):
            assert log_b[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    # BASE's warm start moved once, to the same prices
    for (_, a), (_, b) in zip(plain.moe_layers(), ckpt.moe_layers()):
        if hasattr(a.router, "last_prices_E"):
            torch.testing.assert_close(b.router.last_prices_E, a.router.last_prices_E)


def test_checkpointed_aux_losses_carry_gradient(tiny_corpus):
    """The switch balance loss alone (no cross-entropy) moves the router under checkpointing:
    fairseq's checkpoint_wrapper would have computed it under no_grad."""
    _, data_bin = tiny_corpus
    _, task, model, criterion = build(data_bin, "switch_lm", "--checkpoint-activations")
    sample = _batch(task)
    model.train()
    criterion(model, sample)  # fills last_aux_losses
    (_, layer) = model.moe_layers()[0]
    balance = layer.last_aux_losses["balance"]
    assert balance.requires_grad
    (g,) = torch.autograd.grad(balance, [layer.router.gate.weight])
    assert g.abs().sum() > 0


def test_hash_lm_checkpointed_backward_sees_the_token_ids(tiny_corpus):
    """The decoder's token context is cleared when the forward ends; the recompute in
    backward must still route by the ids of its own forward (it used to fail)."""
    _, data_bin = tiny_corpus
    _, task, model, criterion = build(data_bin, "hash_lm", "--checkpoint-activations", "--hash-type", "previous")
    loss, _, _ = criterion(model.train(), _batch(task))
    assert model.decoder.token_context.current is None
    loss.backward()


def _train_log_values(out: str, key: str):
    import re

    return [float(v) for v in re.findall(rf"\| epoch \d+:\s+\d+ / \d+ .*?\b{key}=([\d.]+)", out)] or [
        float(v) for v in re.findall(rf"\|\s+\d+ / \d+ .*?\b{key}=([\d.]+)", out)
    ]


@pytest.mark.e2e
@pytest.mark.parametrize("arch", ["switch_lm", "hash_lm"])
def test_fairseq_train_with_checkpoint_activations(tiny_corpus, tmp_path, arch):
    """fairseq-train --checkpoint-activations trains, logging the same loss and the same
    weighted balance loss (switch: weight 1) at every update as without the flag, so the
    balance loss trains as it does without it (it did not train at all under fairseq's
    checkpoint_wrapper), and fairseq-eval-lm gives the same perplexity."""
    from tests.conftest import TINY_MODEL, TINY_TRAIN, eval_lm_loss, run_cli

    _, data_bin = tiny_corpus
    runs = {}
    for flag in ([], ["--checkpoint-activations"]):
        save = tmp_path / ("ckpt" if flag else "plain")
        extra = ["--moe-aux-loss-weight", "1.0", "--lr", "1e-2"] if arch == "switch_lm" else []
        proc = run_cli("train", data_bin, *TINY_TRAIN, *TINY_MODEL, "--arch", arch, "--criterion",
                       "moe_cross_entropy", "--moe-expert-count", "4", "--max-update", "12", "--dropout", "0",
                       "--save-dir", save, *extra, *flag)
        out = proc.stdout + proc.stderr
        runs[bool(flag)] = {k: _train_log_values(out, k) for k in ("loss", "moe_aux")}
        ev = run_cli("eval_lm", data_bin, "--user-dir", TINY_TRAIN[3], "--path", save / "checkpoint_last.pt",
                     "--cpu", "--tokens-per-sample", "32", "--max-tokens", "512")
        runs[bool(flag)]["eval"] = eval_lm_loss(ev.stdout + ev.stderr)
    plain, ckpt = runs[False], runs[True]
    assert len(plain["loss"]) >= 10, plain
    assert ckpt["loss"] == pytest.approx(plain["loss"], rel=2e-3, abs=2e-3)
    assert ckpt["moe_aux"] == pytest.approx(plain["moe_aux"], rel=2e-3, abs=2e-3)
    assert ckpt["eval"] == pytest.approx(plain["eval"], rel=1e-3)
    if arch == "switch_lm":
        # the balance loss falls, with the flag as without it: from its peak in the first updates
        # (the router learns an unbalanced split) back towards its minimum 1.0 (1.27 -> 1.04 here)
        for run in (plain, ckpt):
            aux = run["moe_aux"]
            assert sum(aux[-4:]) / 4 < max(aux[:4]) - 0.1, aux
