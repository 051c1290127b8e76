"""Shared experts (--moe-shared-experts, DeepSeekMoE: Dai et al. 2024, arXiv 2401.06066) and
fine-grained experts, against slow obvious references.

* layer: output = the routed output (tests.helpers.reference_moe, a per-token loop over the
  router's decision) + the sum of N shared FFNs computed one by one from the same weights;
  padding rows get nothing; the shared weights' gradients equal autograd through that loop;
  the recompute under activation checkpointing sees the same padding;
* every registered router: the layer builds and runs with shared experts, and its output
  minus the same layer's without them is exactly the shared experts' sum;
* build: the routed experts and the router are initialised exactly as without shared
  experts (same seed), the shared ones like nn.Linear, and only routed parameters are
  marked ``param.expert`` in expert-parallel mode (the 2-rank check is tests/ep_cases.py's
  ``switch+shared`` entry, run by tests/test_expert_parallel.py);
* FLOPs (moe_plugin/tools/flops.py): the shared experts add exactly N * 2 * 2 * D * F_s per
  MoE layer (hand count, and torch's FLOP counter on the shared bank's forward); E*m experts
  of F/m at K*m cost the coarse E, F, K's expert FLOPs (the router grows by 2 D E (m - 1));
* bad values: one ValueError naming the option;
* end to end: fairseq-train --moe-shared-experts 1, then fairseq-eval-lm.
"""

import dataclasses
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from moe_plugin import config
from moe_plugin.dispatch import ExpertPlacement
from moe_plugin.moe_layer import build_moe_layer, checkpointed
from moe_plugin.tools import flops as F
from tests.helpers import all_router_names, reference_moe, router_cfg, token_info, vocab_info

D, FFN, E = 8, 12, 4
INF = float("inf")


def make_layer(name="switch", shared=3, shared_dim=5, activation="relu", placement=None, activation_dropout=0.0,
               global_seed=0, **kw):
    cfg = router_cfg(name, moe_expert_count=E, moe_shared_experts=shared, moe_shared_expert_ffn_dim=shared_dim,
                     moe_seed=11, **kw)
    config.validate(cfg)
    torch.manual_seed(global_seed)
    return build_moe_layer(cfg, D, FFN, activation=activation, activation_dropout=activation_dropout,
                           vocab=vocab_info(), layer_index=1, placement=placement)


def batch(seed=0, B=3, L=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 50, (B, L), generator=g)
    ids[-1, -2:] = 1  # padding at the end of the last sequence
    return torch.randn(B * L, D, generator=g), token_info(ids)


def shared_by_hand(bank, x_TD, pad_T=None, params=None):
    """Sum over the N shared experts of fc2_i(act(fc1_i(x_t))), one token and one expert at a
    time; zero for padding rows. ``params``: (w1, b1, w2, b2) leaves to differentiate."""
    w1, b1, w2, b2 = params if params is not None else (bank.w1_EDF, bank.b1_EF, bank.w2_EFD, bank.b2_ED)
    rows = []
    for t in range(x_TD.shape[0]):
        y = torch.zeros(x_TD.shape[1])
        if pad_T is None or not bool(pad_T[t]):
            for i in range(w1.shape[0]):
                y = y + bank.activation(x_TD[t] @ w1[i] + b1[i]) @ w2[i] + b2[i]
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_output_is_routed_plus_the_sum_of_n_reference_ffns(activation):
    layer = make_layer(activation=activation, moe_capacity_factor=INF).eval()
    assert layer.shared_experts.num_experts == 3 and layer.shared_experts.ffn_dim == 5
    x, tok = batch()
    y = layer(x, tokens=tok)
    route = layer.router(x, tokens=tok)
    routed = reference_moe(x, route.expert_ids_TK, route.weights_TK, layer.experts)
    expected = routed + shared_by_hand(layer.shared_experts, x, tok.pad_mask_T)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    # padding rows get nothing (neither routed nor shared), real rows get the shared part
    assert tok.pad_mask_T.sum() == 2 and (y[tok.pad_mask_T] == 0).all()
    assert (shared_by_hand(layer.shared_experts, x)[~tok.pad_mask_T].abs().sum(1) > 0).all()
    # without token info every row is a real token and gets the shared experts
    y_all = layer(x)
    route_all = layer.router(x)
    torch.testing.assert_close(
        y_all, reference_moe(x, route_all.expert_ids_TK, route_all.weights_TK, layer.experts)
        + shared_by_hand(layer.shared_experts, x), rtol=1e-5, atol=1e-6)


def test_gradients_reach_the_shared_experts_as_through_the_slow_loop():
    layer = make_layer(moe_capacity_factor=INF).train()
    x, tok = batch(1)
    g_TD = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    x1 = x.clone().requires_grad_(True)
    (layer(x1, tokens=tok) * g_TD).sum().backward()
    bank = layer.shared_experts
    leaves = [p.detach().clone().requires_grad_(True) for p in (bank.w1_EDF, bank.b1_EF, bank.w2_EFD, bank.b2_ED)]
    (shared_by_hand(bank, x, tok.pad_mask_T, leaves) * g_TD).sum().backward()
    for p, ref in zip((bank.w1_EDF, bank.b1_EF, bank.w2_EFD, bank.b2_ED), leaves):
        assert p.grad is not None and p.grad.abs().sum() > 0
        torch.testing.assert_close(p.grad, ref.grad, rtol=1e-5, atol=1e-6)
    # padding rows receive no input gradient (nothing routed, nothing shared)
    assert (x1.grad[tok.pad_mask_T] == 0).all() and (x1.grad[~tok.pad_mask_T].abs().sum(1) > 0).all()


def test_activation_checkpointing_recomputes_the_same_shared_output():
    layer = make_layer(activation_dropout=0.2).train()  # dropout: the recompute must draw the same masks
    x, tok = batch(2)
    g_TD = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    results = []
    for ckpt in (False, True):
        layer.zero_grad(set_to_none=True)
        x1 = x.clone().requires_grad_(True)
        torch.manual_seed(7)
        y = checkpointed(lambda x_: layer(x_, tokens=tok), [layer], x1) if ckpt else layer(x1, tokens=tok)
        (y * g_TD).sum().backward()
        results.append((y.detach(), x1.grad, [p.grad.clone() for p in layer.shared_experts.parameters()]))
    (y0, gx0, gp0), (y1, gx1, gp1) = results
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    torch.testing.assert_close(gx1, gx0)
    for a, b in zip(gp1, gp0):
        torch.testing.assert_close(a, b)


#: routed paths beside the plain bank: MultiHash's segmented experts, the hash expert norm
VARIANTS = [("hash", {"hash_multi": 2, "hash_type": "random"}), ("hash", {"hash_expert_norm": True})]


@pytest.mark.parametrize("name, options", [(n, {}) for n in all_router_names()] + VARIANTS)
def test_every_router_runs_with_shared_experts(name, options):
    layer = make_layer(name, shared=2, shared_dim=0, **options)
    assert getattr(layer.experts, "num_segments", 1) == options.get("hash_multi", 1)
    assert (layer.expert_norm is not None) == options.get("hash_expert_norm", False)
    bank = layer.shared_experts
    assert bank.num_experts == 2 and bank.ffn_dim == FFN  # 0 = the routed experts' dim
    x, tok = batch(3)
    layer.train()
    torch.manual_seed(1)
    y = layer(x, tokens=tok)
    assert y.shape == x.shape and torch.isfinite(y).all()
    (y.square().sum() + sum(layer.last_aux_losses.values(), y.new_zeros(()))).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in bank.parameters())
    layer.eval()
    with torch.no_grad():
        y_eval = layer(x, tokens=tok)
        layer.shared_experts = None
        routed = layer(x, tokens=tok)
        layer.shared_experts = bank
    torch.testing.assert_close(y_eval - routed, shared_by_hand(bank, x, tok.pad_mask_T), rtol=1e-5, atol=1e-5)
    assert (y_eval[tok.pad_mask_T] == routed[tok.pad_mask_T]).all()


def test_build_keeps_the_routed_init_and_inits_each_shared_expert_like_a_linear():
    plain, with_shared = make_layer(shared=0, shared_dim=0), make_layer(shared=3, shared_dim=5)
    assert plain.shared_experts is None
    for (n, p), (n2, p2) in zip(plain.named_parameters(), with_shared.named_parameters()):
        assert n == n2 and torch.equal(p, p2), n  # router and routed experts unchanged, registered first
    # seeded from the layer's seed (--seed, layer index), not from the global RNG
    again = make_layer(shared=3, shared_dim=5, global_seed=123)
    assert all(torch.equal(a, b) for a, b in zip(with_shared.shared_experts.parameters(),
                                                 again.shared_experts.parameters()))
    bank = with_shared.shared_experts
    assert bank.w1_EDF.abs().max() <= 1 / math.sqrt(D) and bank.w2_EFD.abs().max() <= 1 / math.sqrt(5)
    assert bank.b1_EF.abs().max() <= 1 / math.sqrt(D) and bank.b2_ED.abs().max() <= 1 / math.sqrt(5)
    assert not torch.equal(bank.w1_EDF[0], bank.w1_EDF[1])  # separate experts, separate generators


def test_expert_parallel_build_replicates_the_shared_experts_unmarked():
    full = make_layer()
    rank1 = make_layer(placement=ExpertPlacement(E, 2, 1), moe_expert_parallel=True)
    assert rank1.experts.num_experts == E // 2 and rank1.shared_experts.num_experts == 3
    for n, p in rank1.named_parameters():
        assert hasattr(p, "expert") == n.startswith("experts."), n
    for a, b in zip(full.shared_experts.parameters(), rank1.shared_experts.parameters()):
        assert torch.equal(a, b)  # every rank holds the same shared experts as one process


# --- FLOPs -------------------------------------------------------------------------------

LAYERS, FD, FF, L, V = 2, 16, 32, 8, 50
DIMS = ["--decoder-layers", LAYERS, "--decoder-embed-dim", FD, "--decoder-ffn-embed-dim", FF,
        "--decoder-attention-heads", 2, "--tokens-per-sample", L, "--dropout", 0]


def report(*flags):
    torch.manual_seed(0)
    model, _ = F.build_model([*map(str, DIMS), *map(str, flags)], vocab_size=V)
    return F.flops_per_token(model, L), model


@pytest.mark.parametrize("layers", ["1", "0,1"])
def test_shared_experts_add_n_ffns_of_flops_per_moe_layer(layers):
    N, Fs = 2, 24
    base, _ = report("--arch", "switch_lm", "--moe-expert-count", E, "--moe-layers", layers)
    rep, model = report("--arch", "switch_lm", "--moe-expert-count", E, "--moe-layers", layers,
                        "--moe-shared-experts", N, "--moe-shared-expert-ffn-dim", Fs)
    per_layer = N * 2 * (FD * Fs + Fs * FD)  # 2 FLOPs per multiply-add, fc1 and fc2 of each shared expert
    n_moe = len(layers.split(","))
    for mode in F.MODES:
        assert rep.components[mode]["shared_experts"] == n_moe * per_layer
        assert rep.active_flops_per_token[mode] - base.active_flops_per_token[mode] == n_moe * per_layer
        assert base.components[mode]["shared_experts"] == 0
        assert rep.experts_per_token[mode] == base.experts_per_token[mode]  # routed K only
        # shared parameters are always active: all of them count
        shared_params = n_moe * (N * (FD * Fs + Fs + Fs * FD + FD))
        assert rep.active_params[mode] - base.active_params[mode] == shared_params
    assert rep.total_params - base.total_params == shared_params
    # brute force: torch's FLOP counter on the shared bank's forward of T tokens
    moe = next(m for m in model.modules() if getattr(m, "shared_experts", None) is not None)
    T = 6
    with FlopCounterMode(display=False) as counter:
        moe.shared_experts(torch.randn(T, FD))
    assert counter.get_total_flops() == T * per_layer


def topk_flags(E_, F_, K_):
    """smoe_lm (a learned top-K gate with any K): E_ experts of hidden F_, K_ active in training
    and evaluation, MoE in layer 1."""
    return ["--arch", "smoe_lm", "--moe-layers", 1, "--moe-expert-count", E_, "--moe-expert-ffn-dim", F_,
            "--moe-top-k", K_, "--moe-eval-top-k", K_]


@pytest.mark.parametrize("m", [2, 4])
def test_fine_grained_experts_cost_the_coarse_expert_flops(m):
    E0, F0, K0 = 4, 32, 2
    coarse, _ = report(*topk_flags(E0, F0, K0))
    fine, _ = report(*topk_flags(E0 * m, F0 // m, K0 * m))
    for mode in F.MODES:
        c, f = coarse.components[mode], fine.components[mode]
        assert f["experts"] == c["experts"] == K0 * 2 * 2 * FD * F0
        assert f["router"] - c["router"] == 2 * FD * E0 * (m - 1)  # the gate grows with the expert count
        assert fine.active_flops_per_token[mode] - coarse.active_flops_per_token[mode] == 2 * FD * E0 * (m - 1)
        assert fine.experts_per_token[mode] == [K0 * m]
    # DeepSeekMoE's constant-compute rule: one of the K*m active experts becomes a shared one
    # of the same size (m*E - 1 routed experts, K*m - 1 of them active)
    ds, _ = report(*topk_flags(E0 * m - 1, F0 // m, K0 * m - 1), "--moe-shared-experts", 1)
    for mode in F.MODES:
        d = ds.components[mode]
        assert d["experts"] + d["shared_experts"] == coarse.components[mode]["experts"]


# --- bad values --------------------------------------------------------------------------

@pytest.mark.parametrize("options, match", [
    ({"moe_shared_experts": -1}, r"--moe-shared-experts: -1 .* >= 0"),
    ({"moe_shared_experts": 1, "moe_shared_expert_ffn_dim": -4}, r"--moe-shared-expert-ffn-dim: -4 .* >= 0"),
    ({"moe_shared_expert_ffn_dim": 16}, r"--moe-shared-expert-ffn-dim: 16 has no effect with --moe-shared-experts 0"),
])
def test_bad_values_raise_naming_the_option(options, match):
    with pytest.raises(ValueError, match=match):
        config.validate(router_cfg("switch", **options))


def test_shared_experts_without_moe_layers_are_refused():
    cfg = router_cfg("switch", moe_shared_experts=1, moe_freq=0)
    config.validate(dataclasses.replace(cfg, moe_shared_experts=0), num_layers=2)
    with pytest.raises(ValueError, match=r"--moe-shared-experts: 1 has no effect, no decoder layer has an MoE FFN"):
        config.validate(cfg, num_layers=2)


def test_base_layers_refuse_shared_experts():
    from moe_plugin.base_layer import BaseLayer

    cfg = router_cfg("balanced", moe_expert_count=E, moe_shared_experts=1)
    with pytest.raises(ValueError, match=r"--moe-shared-experts: 1 is not allowed with BASE layers"):
        BaseLayer(cfg, D, FFN)


# --- end to end --------------------------------------------------------------------------

@pytest.mark.e2e
def test_fairseq_train_then_eval_lm_with_a_shared_expert(tiny_corpus, tmp_path):
    from tests.conftest import TINY_MODEL, TINY_TRAIN, USER_DIR, eval_lm_loss, run_cli

    _, data_bin = tiny_corpus
    save = tmp_path / "ckpt"
    run_cli("train", data_bin, *TINY_TRAIN, *TINY_MODEL, "--arch", "switch_lm", "--criterion", "moe_cross_entropy",
            "--max-update", 2, "--disable-validation", "--save-dir", save, "--moe-expert-count", 4,
            "--moe-shared-experts", 1, "--moe-shared-expert-ffn-dim", 48)
    ckpt = torch.load(save / "checkpoint_last.pt", weights_only=False)
    assert ckpt["cfg"]["model"]["moe_shared_experts"] == 1
    shapes = {k: tuple(v.shape) for k, v in ckpt["model"].items() if ".shared_experts." in k}
    assert shapes == {"decoder.layers.1.fc1.shared_experts.w1_EDF": (1, 32, 48),
                      "decoder.layers.1.fc1.shared_experts.b1_EF": (1, 48),
                      "decoder.layers.1.fc1.shared_experts.w2_EFD": (1, 48, 32),
                      "decoder.layers.1.fc1.shared_experts.b2_ED": (1, 32)}
    out = run_cli("eval_lm", data_bin, "--user-dir", USER_DIR, "--path", save / "checkpoint_last.pt", "--cpu",
                  "--num-workers", "0", "--tokens-per-sample", "32", "--max-tokens", "64")
    loss = eval_lm_loss(out.stdout + out.stderr)
    assert math.isfinite(loss) and 0 < loss < 20
