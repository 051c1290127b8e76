"""Switch top-1 and GShard top-2: capacity, dropping, priority, balance and z losses."""

import math

import numpy as np
import pytest
import scipy.stats
import torch

from moe_plugin.routing import DROPPED, build_router
from moe_plugin.losses import switch_balance_loss
from moe_plugin.routing.interface import apply_capacity, capacity
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


def fixed_gate(r, probs_E):
    """Make router ``r`` (D >= 1) give every token whose x[:, 0] = 1 (rest 0) the probabilities ``probs_E``."""
    with torch.no_grad():
        r.gate.weight.zero_()
        r.gate.weight[:, 0] = torch.log(torch.as_tensor(probs_E, dtype=torch.float32))


@pytest.mark.parametrize("before", [False, True])
def test_gshard_random_policy_keeps_second_with_probability_2g2(before):
    """top2gating: keep the second expert when 2 * g2 > u, with g2 normalised only when
    normalising before dropping: P = 2 * 0.2 = 0.4 (raw) or 2 * 0.2 / 0.6 = 0.667."""
    r = gshard("random", E=5, moe_capacity_factor=float("inf"), moe_normalize_gate_prob_before_dropping=before)
    r.train()
    fixed_gate(r, [0.4, 0.2, 0.15, 0.15, 0.1])
    x = torch.zeros(4000, 6)
    x[:, 0] = 1.0
    torch.manual_seed(0)
    out = r(x)
    kept = out.expert_ids_TK[:, 1] >= 0
    assert (out.expert_ids_TK[kept, 1] == 1).all() and (out.expert_ids_TK[:, 0] == 0).all()
    want = 2 * 0.2 / 0.6 if before else 2 * 0.2
    assert abs(float(kept.float().mean()) - want) < 0.04  # 5 binomial standard deviations
    # a token without its second slot: weight 1 on the first (after), or g1 / (g1 + g2) (before)
    w1 = out.weights_TK[~kept, 0]
    torch.testing.assert_close(w1, torch.full_like(w1, 0.4 / 0.6 if before else 1.0))
    torch.testing.assert_close(out.weights_TK[kept], torch.tensor([[0.4 / 0.6, 0.2 / 0.6]]).expand(int(kept.sum()), 2))
    r.eval()  # evaluation: policy all, deterministic
    assert (r(x).expert_ids_TK[:, 1] == 1).all()


def test_gshard_sampling_policy_samples_the_gate_distribution_without_the_first():
    """Gumbel-max over the logits without the first expert = a sample from g_e / (1 - g1)."""
    probs = [0.4, 0.2, 0.15, 0.15, 0.1]
    r = gshard("sampling", E=5, moe_capacity_factor=float("inf")).train()
    fixed_gate(r, probs)
    x = torch.zeros(6000, 6)
    x[:, 0] = 1.0
    torch.manual_seed(0)
    out = r(x)
    second = out.expert_ids_TK[:, 1]
    assert (second != 0).all()
    observed = torch.bincount(second, minlength=5)[1:].numpy()
    expected = np.array(probs[1:]) / 0.6 * len(second)
    assert scipy.stats.chisquare(observed, expected).pvalue > 1e-3
    # combine weights use the raw gate value of the sampled expert
    g2 = torch.tensor(probs)[second]
    torch.testing.assert_close(out.weights_TK, torch.stack([0.4 / (0.4 + g2), g2 / (0.4 + g2)], 1))


def top2gating_reference(probs_TE, valid_T, cap, before, keep2_T=None):
    """Slow transcription of fairseq moe-branch top2gating token by token: second expert =
    best other one, kept where ``keep2_T`` (the random policy's draw; all for policy all);
    first choices of valid tokens take capacity in token order, then kept second choices;
    weights normalised before dropping (g / max(g1 + g2, eps)) or after it, over the kept
    slots (g m / max(g1 m1 + g2 m2, eps)). Also the balance loss E * sum_e f_e P_e over the
    valid tokens' first choices before capacity."""
    T, E = probs_TE.shape
    eps = torch.finfo(probs_TE.dtype).eps
    keep2_T = torch.ones(T, dtype=torch.bool) if keep2_T is None else keep2_T
    picks = []
    for t in range(T):
        order = sorted(range(E), key=lambda e: (-float(probs_TE[t, e]), e))
        picks.append((order[0], order[1], float(probs_TE[t, order[0]]), float(probs_TE[t, order[1]])))
    used = [0] * E
    kept = [[False, False] for _ in range(T)]
    for k in range(2):
        for t in range(T):
            e = picks[t][k]
            if bool(valid_T[t]) and (k == 0 or bool(keep2_T[t])) and used[e] < cap:
                used[e] += 1
                kept[t][k] = True
    ids = torch.full((T, 2), DROPPED, dtype=torch.long)
    w = torch.zeros(T, 2, dtype=torch.float64)
    for t in range(T):
        e1, e2, g1, g2 = picks[t]
        m1, m2 = kept[t]
        if before:
            d = max(g1 + g2, eps)
            w1, w2 = g1 / d * m1, g2 / d * m2
        else:
            d = max(g1 * m1 + g2 * m2, eps)
            w1, w2 = g1 * m1 / d, g2 * m2 / d
        ids[t] = torch.tensor([e1 if m1 else DROPPED, e2 if m2 else DROPPED])
        w[t] = torch.tensor([w1, w2])
    n = int(valid_T.sum())
    f = [sum(1 for t in range(T) if valid_T[t] and picks[t][0] == e) / n for e in range(E)]
    P = [sum(float(probs_TE[t, e]) for t in range(T) if valid_T[t]) / n for e in range(E)]
    return ids, w, E * sum(fe * pe for fe, pe in zip(f, P))


@pytest.mark.parametrize("policy", ["all", "random"])
@pytest.mark.parametrize("before", [False, True])
@pytest.mark.parametrize("factor", [0.5, 1.0, float("inf")])
def test_gshard_matches_top2gating_reference_loop(policy, before, factor):
    E, L, B = 6, 9, 4
    r = gshard(policy, E=E, moe_capacity_factor=factor, moe_normalize_gate_prob_before_dropping=before).train()
    ids = torch.randint(4, 40, (B, L))
    ids[-1, -3:] = 1  # padding: not routed, takes no capacity
    tok = token_info(ids)
    x = torch.randn(L * B, 6) * 3
    keep2 = None
    if policy == "random":
        # the random draws, read from a run without capacity (capacity consumes no randomness)
        r.capacity_factor = float("inf")
        torch.manual_seed(5)
        keep2 = r(x, tokens=tok).expert_ids_TK[:, 1] >= 0
        r.capacity_factor = factor
        assert not keep2[~tok.pad_mask_T].all() and keep2.any()
    torch.manual_seed(5)
    out = r(x, tokens=tok)
    probs = torch.softmax(x @ r.gate.weight.t(), -1)
    n = int((~tok.pad_mask_T).sum())
    cap = n * 2 if math.isinf(factor) else math.ceil(factor * 2 * n / E)
    want_ids, want_w, want_balance = top2gating_reference(probs, ~tok.pad_mask_T, cap, before, keep2)
    assert torch.equal(out.expert_ids_TK, want_ids)
    torch.testing.assert_close(out.weights_TK.double(), want_w, atol=1e-6, rtol=1e-6)
    assert float(out.aux_losses["balance"]) == pytest.approx(want_balance, rel=1e-5)
    if factor == 0.5:
        assert (want_ids[:, 1] == DROPPED).any() and (want_ids[:, 0] >= 0).any()


@pytest.mark.parametrize("name", ["switch", "gshard"])
def test_gate_runs_in_fp32_and_returns_the_input_dtype(name):
    """--moe-gating-use-fp32 (Switch Sec. 2.4 selective precision): a bfloat16 input is
    routed exactly as its float32 copy; the weights come back in bfloat16."""
    r = switch(E=6) if name == "switch" else gshard("all", E=6, moe_capacity_factor=0.75)
    x = torch.randn(40, 6).to(torch.bfloat16)
    lo, hi = r(x), r(x.float())
    assert lo.weights_TK.dtype == torch.bfloat16
    assert torch.equal(lo.expert_ids_TK, hi.expert_ids_TK)
    assert torch.equal(lo.weights_TK, hi.weights_TK.to(torch.bfloat16))


@pytest.mark.parametrize("before,want", [
    # after dropping (default): t0 lost its second slot -> 1 on its first; t1 lost its first
    # -> 1 on its second; t3 lost both -> 0, 0
    (False, [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 0.0]]),
    # before dropping: g / (g1 + g2) then masked
    (True, [[0.5 / 0.8, 0.0], [0.0, 0.3 / 0.9], [0.5 / 0.8, 0.0], [0.0, 0.0]]),
])
def test_gshard_normalisation_order_hand_computed(before, want):
    """4 tokens, 3 experts, capacity ceil(0.375 * 2 * 4 / 3) = 1. Gate probabilities:
    t0 (.5 .3 .2), t1 (.6 .1 .3), t2 (.2 .5 .3), t3 (.5 .4 .1). First choices: t0 -> e0 kept,
    t1 -> e0 full, t2 -> e1 kept, t3 -> e0 full; second choices: t0 -> e1 full, t1 -> e2 kept,
    t2 -> e2 full, t3 -> e1 full."""
    r = gshard("all", E=3, D=4, moe_capacity_factor=0.375, moe_normalize_gate_prob_before_dropping=before)
    p = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.1, 0.3], [0.2, 0.5, 0.3], [0.5, 0.4, 0.1]])
    with torch.no_grad():
        r.gate.weight.copy_(torch.log(p).t())  # token t = one-hot x_t: logits log p_t
    out = r(torch.eye(4))
    assert out.expert_ids_TK.tolist() == [[0, DROPPED], [DROPPED, 2], [1, DROPPED], [DROPPED, DROPPED]]
    torch.testing.assert_close(out.weights_TK, torch.tensor(want), atol=1e-6, rtol=1e-6)


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


# ---------------------------------------------------------------------------------------
# Router initialisation (Switch Transformer Sec. 2.4) and its alternatives
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["switch", "gshard"])
@pytest.mark.parametrize("scale", [0.1, 1.0])
def test_router_init_is_the_switch_papers_truncated_normal(name, scale):
    """Weights ~ N(0, sigma^2) cut at +-2 sigma, sigma = sqrt(s / D) (fan-in D): checked
    against scipy's truncnorm (Kolmogorov-Smirnov, and its std), on D * E = 65536 values."""
    D, E = 1024, 64
    torch.manual_seed(0)
    r = build_router(router_cfg(name, moe_expert_count=E, moe_router_init_scale=scale), D)
    w = r.gate.weight.detach().double().flatten().numpy()
    sigma = math.sqrt(scale / D)
    assert np.abs(w).max() <= 2 * sigma * (1 + 1e-6)
    law = scipy.stats.truncnorm(-2.0, 2.0, loc=0.0, scale=sigma)
    assert abs(w.std() / law.std() - 1) < 0.02 and abs(w.mean()) < 0.02 * sigma
    assert scipy.stats.kstest(w, law.cdf).pvalue > 1e-3


@pytest.mark.parametrize("init,bound", [("linear", lambda D, E: 1 / math.sqrt(D)),
                                        ("xavier", lambda D, E: math.sqrt(6 / (D + E)))])
def test_router_init_alternatives_are_their_uniform_laws(init, bound):
    D, E = 1024, 64
    torch.manual_seed(0)
    w = switch(E, D, moe_router_init=init).gate.weight.detach().double().flatten().numpy()
    b = bound(D, E)
    assert scipy.stats.kstest(w, scipy.stats.uniform(-b, 2 * b).cdf).pvalue > 1e-3


@pytest.mark.parametrize("kw,option", [({"moe_router_init": "orthogonal"}, "--moe-router-init"),
                                       ({"moe_router_init_scale": 0.0}, "--moe-router-init-scale"),
                                       ({"moe_router_init_scale": float("inf")}, "--moe-router-init-scale")])
def test_bad_router_init_options(kw, option):
    with pytest.raises(ValueError, match=option):
        switch(**kw)
