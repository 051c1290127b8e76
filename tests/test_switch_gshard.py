"""Switch top-1 and GShard top-2: capacity, dropping, priority, balance and z losses."""

import math

import pytest
import torch

from moe_plugin.routing import DROPPED, build_router
from moe_plugin.routing.interface import apply_capacity, capacity, switch_balance_loss
from tests.helpers import router_cfg, token_info


def slow_capacity(ids_TK, E, cap):
    """Reference: walk slots in priority order (all first choices, then second...)."""
    T, K = ids_TK.shape
    used = [0] * E
    out = torch.full_like(ids_TK, DROPPED)
    for k in range(K):
        for t in range(T):
            e = int(ids_TK[t, k])
            if e >= 0 and used[e] < cap:
                used[e] += 1
                out[t, k] = e
    return out


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("K", [1, 2])
def test_apply_capacity_matches_slow_reference(seed, K):
    g = torch.Generator().manual_seed(seed)
    E, T = 5, 37
    ids = torch.randint(-1, E, (T, K), generator=g)
    for cap in (1, 3, 8, 100):
        assert torch.equal(apply_capacity(ids, E, cap), slow_capacity(ids, E, cap))


def test_capacity_formula():
    assert capacity(100, 8, 1, 1.0) == 13  # ceil(12.5)
    assert capacity(100, 8, 2, 1.0) == 25  # GShard's 2T/E
    assert capacity(100, 8, 1, 1.25) == 16
    assert capacity(100, 8, 1, float("inf")) == 100


def switch(E=4, D=6, **kw):
    torch.manual_seed(0)
    return build_router(router_cfg("switch", moe_expert_count=E, **kw), D)


def test_switch_drops_over_capacity_in_token_order_and_dropped_tokens_pass_through():
    E, D, T = 4, 6, 20
    r = switch(E, D, moe_capacity_factor=1.0)
    with torch.no_grad():
        r.gate.weight.zero_()
        r.gate.weight[2, 0] = 10.0  # everyone prefers expert 2 when x[:, 0] > 0
    x = torch.randn(T, D)
    x[:, 0] = x[:, 0].abs() + 0.1
    out = r(x)
    cap = math.ceil(T / E)
    assert out.expert_ids_TK[:cap, 0].eq(2).all()
    assert out.expert_ids_TK[cap:, 0].eq(DROPPED).all()
    assert out.stats["tokens_per_expert"].tolist() == [0, 0, cap, 0]
    assert float(out.stats["dropped_frac"]) == pytest.approx((T - cap) / T)
    # through the layer, a dropped token's FFN output is exactly zero (the residual carries it)
    from moe_plugin.experts import ExpertBank
    from moe_plugin.moe_layer import MoELayer

    layer = MoELayer(r, ExpertBank(E, D, 8))
    y = layer(x)
    assert y[cap:].abs().max() == 0
    assert y[:cap].abs().max() > 0


def test_switch_weight_is_router_probability():
    r = switch(moe_capacity_factor=float("inf"))
    x = torch.randn(30, 6)
    out = r(x)
    probs = torch.softmax(x @ r.gate.weight.t(), -1)
    torch.testing.assert_close(out.expert_ids_TK[:, 0], probs.argmax(-1))
    torch.testing.assert_close(out.weights_TK[:, 0], probs.max(-1).values)


def test_balance_loss_uniform_routing_is_one_and_hand_case():
    E, T = 4, 8
    probs = torch.full((T, E), 1.0 / E)
    top1 = torch.arange(T) % E
    assert float(switch_balance_loss(probs, top1, torch.ones(T, dtype=torch.bool))) == pytest.approx(1.0)
    # hand-computed: 2 tokens, 2 experts, both to expert 0, probs (0.75, 0.25) and (0.5, 0.5)
    probs = torch.tensor([[0.75, 0.25], [0.5, 0.5]])
    # f = (1, 0), P = (0.625, 0.375) -> 2 * (1 * 0.625) = 1.25
    loss = switch_balance_loss(probs, torch.tensor([0, 0]), torch.ones(2, dtype=torch.bool))
    assert float(loss) == pytest.approx(1.25)


def test_padding_does_not_change_losses_or_stats():
    r = switch(moe_capacity_factor=float("inf"))
    ids = torch.randint(4, 40, (3, 5))
    x = torch.randn(15, 6)
    base = r(x, tokens=token_info(ids))
    # append a padded position to every sequence, with arbitrary hidden states
    ids_p = torch.cat([ids, torch.ones(3, 2, dtype=torch.long)], 1)
    x_p = torch.cat([x.view(5, 3, 6), torch.randn(2, 3, 6) * 50], 0).reshape(-1, 6)
    pad = r(x_p, tokens=token_info(ids_p))
    for k in ("balance", "z"):
        torch.testing.assert_close(base.aux_losses[k], pad.aux_losses[k])
    assert torch.equal(base.stats["tokens_per_expert"], pad.stats["tokens_per_expert"])
    torch.testing.assert_close(base.stats["entropy"], pad.stats["entropy"])


def test_z_loss_matches_definition():
    r = switch()
    x = torch.randn(10, 6)
    logits = x @ r.gate.weight.t()
    expected = torch.logsumexp(logits, -1).pow(2).mean()
    torch.testing.assert_close(r(x).aux_losses["z"], expected)


def test_jitter_only_in_training():
    r = switch(moe_jitter_eps=0.5, moe_capacity_factor=float("inf"))
    x = torch.randn(50, 6)
    r.eval()
    a, b = r(x), r(x)
    assert torch.equal(a.weights_TK, b.weights_TK)
    r.train()
    torch.manual_seed(1)
    c = r(x)
    assert not torch.equal(a.weights_TK, c.weights_TK)


def gshard(policy="all", E=6, D=6, **kw):
    torch.manual_seed(0)
    return build_router(router_cfg("gshard", moe_expert_count=E, moe_second_expert_policy=policy, **kw), D)


@pytest.mark.parametrize("policy", ["all", "sampling", "random"])
def test_gshard_two_distinct_experts_normalised_weights(policy):
    r = gshard(policy, moe_capacity_factor=float("inf")).train()
    x = torch.randn(64, 6)
    out = r(x)
    ids, w = out.expert_ids_TK, out.weights_TK
    probs = torch.softmax(x @ r.gate.weight.t(), -1)
    assert torch.equal(ids[:, 0], probs.argmax(-1))
    assert (ids[:, 0] != ids[:, 1]).all()
    both = ids[:, 1] >= 0
    torch.testing.assert_close(w[both].sum(-1), torch.ones(int(both.sum())))
    g1 = probs.gather(1, ids[:, :1]).squeeze(1)
    g2 = probs.gather(1, ids[:, 1:].clamp(min=0)).squeeze(1)
    torch.testing.assert_close(w[both, 0], (g1 / (g1 + g2))[both])
    if policy == "all":
        second = probs.scatter(1, ids[:, :1], -1.0).argmax(-1)
        assert torch.equal(ids[:, 1], second)


def test_gshard_random_policy_keeps_second_with_probability_2g2():
    r = gshard("random", E=4, moe_capacity_factor=float("inf")).train()
    with torch.no_grad():
        r.gate.weight.zero_()  # uniform probs: g1 = g2 -> normalised g2 = 0.5 -> keep always
    out = r(torch.randn(200, 6))
    assert (out.expert_ids_TK[:, 1] >= 0).all()
    with torch.no_grad():
        r.gate.weight.zero_()
        r.gate.weight[0, 0] = 30.0  # g1 ~ 1, g2 ~ 0 -> second almost never kept
    x = torch.randn(200, 6)
    x[:, 0] = 1.0
    out = r(x)
    assert (out.expert_ids_TK[:, 1] == DROPPED).float().mean() > 0.95


def test_gshard_first_choices_take_capacity_before_second_choices():
    E, T = 4, 16
    r = gshard("all", E=E, moe_capacity_factor=0.5)  # cap = ceil(0.5 * 2 * 16 / 4) = 4
    with torch.no_grad():
        r.gate.weight.zero_()
        r.gate.weight[0, 0] = 5.0
        r.gate.weight[1, 0] = 4.0
    x = torch.zeros(T, 6)
    x[:, 0] = 1.0
    x[:8, 1] = 0.0
    out = r(x)
    # every token: first 0, second 1. Cap 4: tokens 0..3 keep slot 0, tokens 0..3 keep slot 1
    assert out.expert_ids_TK[:4].tolist() == [[0, 1]] * 4
    assert (out.expert_ids_TK[4:] == DROPPED).all()


def test_eval_uses_eval_capacity_factor():
    r = switch(moe_capacity_factor=0.25, moe_eval_capacity_factor=float("inf"))
    with torch.no_grad():
        r.gate.weight.zero_()
        r.gate.weight[0, 0] = 10.0
    x = torch.randn(40, 6)
    x[:, 0] = 1.0
    assert (r.train()(x).expert_ids_TK == DROPPED).any()
    assert (r.eval()(x).expert_ids_TK >= 0).all()
