"""SAM (Switch and Mixture) router: against a slow double-loop reference, its degenerate
cases (G = 1 is top-K, E/G = 1 is Switch), hand-computed losses and metrics, gradients.

Legend: T tokens, D model dim, E experts, G groups, M = E/G, K experts per token.
"""

import math

import pytest
import torch

from moe_plugin import config
from moe_plugin.dispatch.expert_parallel import ExpertParallelDispatcher
from moe_plugin.dispatch.placement import ExpertPlacement, device_visits
from moe_plugin.experts import ExpertBank
from moe_plugin.losses import alignment_loss, expert_balance_loss, group_balance_loss, switch_balance_loss
from moe_plugin.moe_layer import MoELayer
from moe_plugin.routing import DROPPED, build_router
from moe_plugin.routing.interface import capacity, per_slot_capacity
from moe_plugin.routing.sam import sam_select
from tests.helpers import router_cfg, token_info

INF = float("inf")


def make(D=16, E=8, G=2, K=2, cap=INF, **kw):
    cfg = router_cfg("sam", moe_expert_count=E, sam_groups=G, moe_top_k=K, moe_capacity_factor=cap,
                     moe_eval_capacity_factor=cap, **kw)
    config.validate(cfg)
    return build_router(cfg, D)


def random_probs(T, E, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(2.0 * torch.randn(T, E, generator=g, dtype=torch.float64), -1)


# ---------------------------------------------------------------- slow obvious references


def ref_select(p, G, K, renorm):
    """Double loop: group sums, best group (first on ties), in-group top-K, weights."""
    T, E = p.shape
    M = E // G
    groups, ids, weights = [], [], []
    for t in range(T):
        sums = [sum(float(p[t, j * M + i]) for i in range(M)) for j in range(G)]
        best = max(range(G), key=lambda j: (sums[j], -j))
        members = sorted(range(M), key=lambda i: -float(p[t, best * M + i]))[:K]
        w = [float(p[t, best * M + i]) for i in members]
        if renorm:
            w = [v / sum(w) for v in w]
        groups.append(best)
        ids.append([best * M + i for i in members])
        weights.append(w)
    return torch.tensor(groups), torch.tensor(ids), torch.tensor(weights, dtype=p.dtype)


def ref_losses(p, G, K, mode="in_group", slots="first", align_reduction="mean"):
    """balance_group, balance_expert, align by their definitions, token by token.

    slots: which selected experts the expert balance counts (``first``: slot 0; ``all``:
    the per-slot loss summed over the K slots)."""
    T, E = p.shape
    M = E // G
    group, ids, _ = ref_select(p, G, K, False)
    sums = [[sum(float(p[t, j * M + i]) for i in range(M)) for j in range(G)] for t in range(T)]
    f = [sum(1 for t in range(T) if group[t] == j) / T for j in range(G)]
    P = [sum(sums[t][j] for t in range(T)) / T for j in range(G)]
    balance_group = G * sum(f[j] * P[j] for j in range(G))
    balance_expert = 0.0
    for slot in range(K if slots == "all" else 1):
        first = [int(ids[t, slot]) for t in range(T)]
        if mode == "global":
            fe = [sum(1 for t in range(T) if first[t] == e) / T for e in range(E)]
            Pe = [sum(float(p[t, e]) for t in range(T)) / T for e in range(E)]
            balance_expert += E * sum(fe[e] * Pe[e] for e in range(E))
            continue
        for j in range(G):
            toks = [t for t in range(T) if group[t] == j]
            if not toks:
                continue
            inner = 0.0
            for e in range(j * M, (j + 1) * M):
                f_in = sum(1 for t in toks if first[t] == e) / len(toks)
                P_in = sum(float(p[t, e]) / sums[t][j] for t in toks) / len(toks)
                inner += f_in * P_in
            balance_expert += f[j] * M * inner
    align = 0.0
    for t in range(T):
        kth = float(p[t, int(ids[t, -1])])
        for e in range(E):
            if e // M != group[t]:
                align += max(0.0, float(p[t, e]) - kth)
    return balance_group, balance_expert, align / T if align_reduction == "mean" else align


# ---------------------------------------------------------------- selection


@pytest.mark.parametrize("E,G,K", [(8, 2, 1), (8, 2, 3), (8, 4, 2), (12, 3, 4), (6, 6, 1), (6, 1, 3)])
@pytest.mark.parametrize("renorm", [False, True])
def test_select_matches_double_loop(E, G, K, renorm):
    for seed in range(3):
        p = random_probs(40, E, seed)
        group, ids, w = sam_select(p, G, K, renorm)
        rg, rids, rw = ref_select(p, G, K, renorm)
        assert torch.equal(group, rg)
        assert torch.equal(ids, rids)
        torch.testing.assert_close(w, rw)


@pytest.mark.parametrize("slots,align_reduction", [("first", "mean"), ("all", "sum")])
@pytest.mark.parametrize("mode", ["in_group", "global"])
@pytest.mark.parametrize("E,G,K", [(8, 2, 2), (12, 3, 1), (12, 4, 3)])
def test_losses_match_double_loop(E, G, K, mode, slots, align_reduction):
    p = random_probs(30, E, seed=E + G + K)
    valid = torch.ones(30, dtype=torch.bool)
    group, ids, _ = sam_select(p, G, K)
    kth = p.gather(1, ids[:, -1:]).squeeze(1)
    got = (
        float(group_balance_loss(p, group, G, valid)),
        float(expert_balance_loss(p, group, ids, G, valid, mode, slots)),
        float(alignment_loss(p, group, kth, G, valid, align_reduction)),
    )
    for a, b in zip(got, ref_losses(p, G, K, mode, slots, align_reduction)):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12)


def test_router_forward_matches_reference():
    """The whole router: softmax(x W^T) in fp32, then the double-loop reference."""
    r = make(D=16, E=12, G=3, K=2, sam_renormalize=True)
    x = torch.randn(50, 16) * 3
    out = r(x)
    p = torch.softmax(x.double() @ r.gate.weight.double().t(), -1)
    rg, rids, rw = ref_select(p, 3, 2, True)
    assert torch.equal(out.expert_ids_TK, rids)
    torch.testing.assert_close(out.weights_TK.double(), rw, atol=1e-6, rtol=1e-5)
    # every slot's expert lies in the token's chosen group (contiguous blocks of E/G = 4)
    assert torch.equal(out.expert_ids_TK // 4, rg.unsqueeze(1).expand(-1, 2))


def test_g1_is_plain_topk_over_all_experts():
    r = make(E=8, G=1, K=3)
    x = torch.randn(60, 16) * 3
    out = r(x)
    p = torch.softmax(x @ r.gate.weight.t(), -1)
    w, ids = p.topk(3, dim=-1)
    assert torch.equal(out.expert_ids_TK, ids)
    torch.testing.assert_close(out.weights_TK, w)
    # group balance is the constant 1 and in-group balance is Switch's loss
    valid = torch.ones(60, dtype=torch.bool)
    assert float(out.aux_losses["balance_group"]) == pytest.approx(1.0)
    torch.testing.assert_close(out.aux_losses["balance_expert"], switch_balance_loss(p, ids[:, 0], valid))
    assert float(out.aux_losses["align"]) == 0.0
    assert float(out.stats["topk_in_group"]) == 1.0


@pytest.mark.parametrize("cap", [INF, 1.0])
def test_g1_k2_renormalized_is_gshard_top2(cap):
    """G = 1, K = 2 with renormalised weights is GShard's top-2 (policy 'all')."""
    sam = make(E=8, G=1, K=2, cap=cap, sam_renormalize=True).eval()
    gcfg = router_cfg("gshard", moe_expert_count=8, moe_capacity_factor=cap, moe_eval_capacity_factor=cap,
                      moe_normalize_gate_prob_before_dropping=True)  # SAM renormalises before dropping
    gshard = build_router(gcfg, 16).eval()
    gshard.gate.weight.data.copy_(sam.gate.weight.data)
    x = torch.randn(64, 16) * 3
    a, b = sam(x), gshard(x)
    assert torch.equal(a.expert_ids_TK, b.expert_ids_TK)
    torch.testing.assert_close(a.weights_TK, b.weights_TK)


@pytest.mark.parametrize("cap", [INF, 1.0])
@pytest.mark.parametrize("training", [True, False])
def test_one_expert_per_group_is_switch(cap, training):
    """E/G = 1: same ids, same weights (and same dropping) as switch.py with the same gate."""
    sam = make(E=8, G=8, K=1, cap=cap).train(training)
    scfg = router_cfg("switch", moe_expert_count=8, moe_capacity_factor=cap, moe_eval_capacity_factor=cap)
    config.validate(scfg)
    switch = build_router(scfg, 16).train(training)
    switch.gate.weight.data.copy_(sam.gate.weight.data)
    ids = torch.randint(4, 50, (4, 16))
    ids[0, -3:] = 1  # padding
    tok = token_info(ids)
    x = torch.randn(64, 16) * 3
    a, b = sam(x, tokens=tok), switch(x, tokens=tok)
    assert torch.equal(a.expert_ids_TK, b.expert_ids_TK)
    assert torch.equal(a.weights_TK, b.weights_TK)
    # groups are experts, so the group balance loss is Switch's balance loss
    torch.testing.assert_close(a.aux_losses["balance_group"], b.aux_losses["balance"])
    torch.testing.assert_close(a.aux_losses["z"], b.aux_losses["z"])
    assert float(a.aux_losses["balance_expert"]) == pytest.approx(1.0)
    assert float(a.aux_losses["align"]) == 0.0


# ---------------------------------------------------------------- hand-computed small case

# 4 tokens, E = 4 experts in G = 2 groups {0,1} {2,3}. Group sums (s0, s1) and choices:
#   t0 (.3, .7) -> group 1; t1 (.6, .4) -> group 0; t2 (.1, .9) -> group 1; t3 (.45, .55) -> group 1
HAND_P = torch.tensor([
    [0.10, 0.20, 0.30, 0.40],
    [0.50, 0.10, 0.15, 0.25],
    [0.05, 0.05, 0.60, 0.30],
    [0.44, 0.01, 0.30, 0.25],
], dtype=torch.float64)


def hand_router(K, **kw):
    """A router whose probabilities are exactly HAND_P: identity gate, x = log p."""
    r = make(D=4, E=4, G=2, K=K, **kw)
    r.gate.weight.data.copy_(torch.eye(4))
    return r, HAND_P.log().float()


def test_hand_case_selection():
    for K, renorm, ids, w in [
        (1, False, [[3], [0], [2], [2]], [[0.4], [0.5], [0.6], [0.3]]),
        (2, False, [[3, 2], [0, 1], [2, 3], [2, 3]], [[0.4, 0.3], [0.5, 0.1], [0.6, 0.3], [0.3, 0.25]]),
        (2, True, [[3, 2], [0, 1], [2, 3], [2, 3]], [[4 / 7, 3 / 7], [5 / 6, 1 / 6], [2 / 3, 1 / 3], [6 / 11, 5 / 11]]),
    ]:
        r, x = hand_router(K, sam_renormalize=renorm)
        out = r(x)
        assert out.expert_ids_TK.tolist() == ids
        torch.testing.assert_close(out.weights_TK, torch.tensor(w), atol=1e-6, rtol=1e-6)
        assert (out.expert_ids_TK // 2).tolist() == [[g] * K for g in [1, 0, 1, 1]]  # groups {0,1} {2,3}


def test_hand_case_losses():
    # balance_group = G * sum_j f_j P_j, f = (1/4, 3/4), P = (1.45/4, 2.55/4)
    balance_group = 2 * (0.25 * 1.45 / 4 + 0.75 * 2.55 / 4)  # 1.1375
    # in-group: group 0 has t1 only (first choice e0, q = .5/.6); group 1 has t0, t2, t3
    # with first choices e3, e2, e2 -> f_{2|1} = 2/3, f_{3|1} = 1/3
    P2 = (0.3 / 0.7 + 0.6 / 0.9 + 0.30 / 0.55) / 3
    P3 = (0.4 / 0.7 + 0.3 / 0.9 + 0.25 / 0.55) / 3
    balance_in_group = 0.25 * 2 * (1.0 * 0.5 / 0.6) + 0.75 * 2 * (2 / 3 * P2 + 1 / 3 * P3)  # 1.190115...
    # global: first choices e0, e2, e2, e3 -> f = (1/4, 0, 1/2, 1/4); P = column means
    balance_global = 4 * (0.25 * 1.09 / 4 + 0.5 * 1.35 / 4 + 0.25 * 1.2 / 4)  # 1.2475
    # align K=1: only t3 has an outside expert (e0: .44) above its selected .30
    align_k1 = (0.44 - 0.30) / 4
    # align K=2: t1 (selected e0, e1; K-th .10): outside .15, .25 -> .05 + .15;
    #            t3 (K-th .25): outside e0 .44 -> .19
    align_k2 = ((0.05 + 0.15) + 0.19) / 4
    for K, align in [(1, align_k1), (2, align_k2)]:
        for mode, balance_expert in [("in_group", balance_in_group), ("global", balance_global)]:
            r, x = hand_router(K, sam_expert_balance=mode)
            out = r(x)
            got = {k: float(v) for k, v in out.aux_losses.items()}
            assert got["balance_group"] == pytest.approx(balance_group, abs=1e-6)
            assert got["balance_expert"] == pytest.approx(balance_expert, abs=1e-6)
            assert got["align"] == pytest.approx(align, abs=1e-6)
            # z-loss: logsumexp(log p) = log 1 = 0
            assert got["z"] == pytest.approx(0.0, abs=1e-6)
            # the unweighted values are logged too
            for name in ("balance_group", "balance_expert", "align"):
                assert float(out.stats[f"loss_{name}"]) == pytest.approx(got[name])


def test_hand_case_losses_all_slots_and_sum():
    """K = 2 with --sam-balance-slots all and --sam-align-reduction sum (Hetu's formulation)."""
    # selected experts (both slots): t0 {3, 2}, t1 {0, 1}, t2 {2, 3}, t3 {2, 3}
    # global: f = (1/4, 1/4, 3/4, 3/4) (slot counts / tokens), P = column means
    balance_global_all = 4 * (0.25 * 1.09 / 4 + 0.25 * 0.36 / 4 + 0.75 * 1.35 / 4 + 0.75 * 1.20 / 4)  # 2.275
    # in_group: group 0 holds t1 (f_{0|0} = f_{1|0} = 1, q = .5/.6, .1/.6); group 1 holds
    # t0, t2, t3 and every one of them selects e2 and e3 (f = 1 each), so its inner sum is
    # sum_e P_{e|1} = 1
    balance_in_group_all = 0.25 * 2 * (0.5 / 0.6 + 0.1 / 0.6) + 0.75 * 2 * 1.0  # 2.0
    align_sum = (0.05 + 0.15) + 0.19  # t1 and t3, as in the mean case, not divided by 4
    for mode, balance_expert in [("in_group", balance_in_group_all), ("global", balance_global_all)]:
        r, x = hand_router(2, sam_expert_balance=mode, sam_balance_slots="all", sam_align_reduction="sum")
        got = {k: float(v) for k, v in r(x).aux_losses.items()}
        assert got["balance_expert"] == pytest.approx(balance_expert, abs=1e-6)
        assert got["align"] == pytest.approx(align_sum, abs=1e-6)
        assert got["balance_group"] == pytest.approx(1.1375, abs=1e-6)  # unchanged by these options


def test_hand_case_metrics():
    # group load: (1, 3) tokens -> max/mean 1.5, cv = std(1, 3) / 2 = 0.5
    # simulated devices: home of rows 0, 1 is device 0, of rows 2, 3 device 1
    for K, topk_in, top1_in, topk_xdev in [
        # global top-1: e3 e0 e2 e0 -> in chosen group for t0 t1 t2; crosses for t0 (home 0), t3 (home 1)
        (1, 3 / 4, 3 / 4, 2 / 4),
        # global top-2: {3,2} {0,3} {2,3} {0,2} -> in group for t0 t2; t0, t1, t3 visit another device
        (2, 2 / 4, 3 / 4, 3 / 4),
    ]:
        r, x = hand_router(K)
        st = r(x).stats
        assert float(st["group_load_max"]) == pytest.approx(1.5)
        assert float(st["group_load_cv"]) == pytest.approx(0.5)
        assert float(st["topk_in_group"]) == pytest.approx(topk_in)
        assert float(st["top1_in_group"]) == pytest.approx(top1_in)
        # the traffic figures are the (local) dispatcher's, simulating the router's G devices
        assert r.simulated_devices == 2
        layer = MoELayer(r, ExpertBank(4, 4, 8))
        layer(x)
        st = layer.last_stats
        # SAM: groups 1 0 1 1 vs homes 0 0 1 1 -> only t0 leaves its device, once
        assert float(st["xdev_tokens"]) == 1.0
        assert float(st["xdev_frac"]) == pytest.approx(0.25)
        # ... with its K slots (t0's experts e3 (and e2) are both on device 1)
        assert float(st["xdev_slots"]) == K
        assert float(st["topk_xdev_frac"]) == pytest.approx(topk_xdev)
        assert st["tokens_per_expert"].tolist() == ([1, 0, 2, 1] if K == 1 else [1, 1, 3, 3])


def test_device_visits_by_hand():
    ids = torch.tensor([[0, 5], [6, 7], [2, DROPPED], [DROPPED, DROPPED]])
    home = torch.tensor([0, 0, 1, 1])
    # 4 devices of 2 experts: t0 visits dev 0 (home) and 2; t1 dev 3; t2 dev 1 (home); t3 nothing
    assert device_visits(ids, home, ExpertPlacement(8, 4)).tolist() == [1, 1, 0, 0]
    # 2 devices of 4: t0 dev 0 (home) + 1; t1 dev 1; t2 dev 0 (home 1); t3 nothing
    assert device_visits(ids, home, ExpertPlacement(8, 2)).tolist() == [1, 1, 1, 0]


@pytest.mark.parametrize("seed", range(4))
def test_align_is_zero_exactly_when_group_holds_global_topk(seed):
    p = random_probs(200, 12, seed)
    G, K = 3, 2
    group, ids, _ = sam_select(p, G, K)
    kth = p.gather(1, ids[:, -1:]).squeeze(1)
    per_token = torch.stack([
        alignment_loss(p[t:t + 1], group[t:t + 1], kth[t:t + 1], G, torch.ones(1, dtype=torch.bool)) for t in range(200)
    ])
    held = (p.topk(K, -1).indices // (12 // G) == group.unsqueeze(1)).all(-1)
    assert torch.equal(per_token == 0, held)
    assert held.any() and (~held).any()  # both cases occur


def test_padding_takes_no_part():
    """Losses and stats over a padded batch equal those over its non-padding rows alone."""
    r = make(E=8, G=2, K=2)
    ids = torch.randint(4, 50, (4, 10))
    ids[1, -4:] = 1
    ids[3, -7:] = 1
    tok = token_info(ids)
    x = torch.randn(40, 16) * 3
    full = r(x, tokens=tok)
    keep = ~tok.pad_mask_T
    sub = r(x[keep])
    assert (full.expert_ids_TK[tok.pad_mask_T] == DROPPED).all()
    for name in full.aux_losses:
        torch.testing.assert_close(full.aux_losses[name], sub.aux_losses[name])
    for name in ("tokens_per_expert", "group_load_max", "topk_in_group", "top1_in_group", "entropy"):
        torch.testing.assert_close(full.stats[name], sub.stats[name])


def test_a_tokens_experts_share_one_group_and_padding_is_not_routed():
    r = make(E=8, G=4, K=2)
    ids = torch.randint(4, 50, (2, 6))
    ids[0, -2:] = 1
    tok = token_info(ids)
    out = r(torch.randn(12, 16), tokens=tok)
    assert (out.expert_ids_TK[tok.pad_mask_T] == DROPPED).all()
    assert (out.plain_topk_ids_TK[tok.pad_mask_T] == DROPPED).all()
    valid = ~tok.pad_mask_T
    groups = out.expert_ids_TK[valid] // 2  # groups of E/G = 2 contiguous experts
    assert (groups == groups[:, :1]).all()


def test_capacity_drops_like_switch():
    """Per-expert capacity ceil(f K T / E); best slots are served first."""
    r = make(E=8, G=2, K=2, cap=0.5)
    x = torch.randn(64, 16) * 3
    out = r(x)
    cap = math.ceil(0.5 * 2 * 64 / 8)
    assert (out.stats["tokens_per_expert"] <= cap).all()
    assert float(out.stats["dropped_frac"]) > 0
    ref = make(E=8, G=2, K=2, cap=INF)
    ref.load_state_dict(r.state_dict())
    full = ref(x)
    kept = out.expert_ids_TK >= 0
    assert torch.equal(out.expert_ids_TK[kept], full.expert_ids_TK[kept])
    # a second slot is kept only if that expert served every first slot routed to it
    for e in range(8):
        first_e = full.expert_ids_TK[:, 0] == e
        second_kept = (out.expert_ids_TK[:, 1] == e).any()
        if second_kept:
            assert bool((out.expert_ids_TK[first_e, 0] == e).all())


# ---------------------------------------------------------------- gradients, options


def test_gradients_reach_the_router():
    torch.manual_seed(0)
    r = make(D=16, E=8, G=2, K=2, sam_router_bias=True)
    r.gate.weight.data.mul_(30.0)  # a peaked router, so some tokens are misaligned
    layer = MoELayer(r, ExpertBank(8, 16, 32))
    x = torch.randn(64, 16)
    y = layer(x)
    # through the combine weights
    (gw,) = torch.autograd.grad(y.pow(2).sum(), r.gate.weight)
    assert gw.abs().sum() > 0
    out = r(x)
    assert float(out.aux_losses["align"]) > 0
    for name in ("balance_group", "balance_expert", "align", "z"):
        gw, gb = torch.autograd.grad(out.aux_losses[name], [r.gate.weight, r.gate_bias], retain_graph=True)
        assert gw.abs().sum() > 0 and gb.abs().sum() > 0, name


@pytest.mark.parametrize("overrides,option", [
    ({"sam_groups": 3}, "--sam-groups"),
    ({"sam_groups": 0}, "--sam-groups"),
    ({"sam_groups": 4, "moe_top_k": 3}, "--moe-top-k"),
    ({"sam_expert_balance": "sideways"}, "--sam-expert-balance"),
    ({"sam_balance_slots": "second"}, "--sam-balance-slots"),
    ({"sam_align_reduction": "max"}, "--sam-align-reduction"),
    ({"sam_capacity_rounding": "floor"}, "--sam-capacity-rounding"),
])
def test_bad_options_raise(overrides, option):
    cfg = router_cfg("sam", moe_expert_count=8, **overrides)
    with pytest.raises(ValueError, match=option):
        config.validate(cfg)


def test_expert_parallel_dispatcher_counts_real_sends():
    """In expert-parallel mode (W = 4, this rank 1; the traffic figures need no process
    group) a token's home is this rank and expert e lives on device e // (E/W)."""
    ep = ExpertParallelDispatcher(8, 4, 1)
    x = torch.randn(80, 16) * 3
    valid = torch.ones(80, dtype=torch.bool)

    def traffic(router):
        out = router(x)
        st = ep.traffic_stats(out.expert_ids_TK, valid, simulated_devices=router.simulated_devices,
                              plain_ids_TK=out.plain_topk_ids_TK)
        return out, st

    out, st = traffic(make(E=8, G=4, K=2))
    away = out.expert_ids_TK[:, 0] // 2 != 1  # group j = experts 2j, 2j+1 = device j
    assert float(st["xdev_tokens"]) == float(away.sum())
    assert float(st["xdev_slots"]) == 2 * float(away.sum())
    # G = 2 groups over W = 4 devices: a group spans two devices, so a token may leave for 2
    out, st = traffic(make(E=8, G=2, K=2))
    dev = out.expert_ids_TK // 2
    expected = sum(len(set(d.tolist()) - {1}) for d in dev)
    assert float(st["xdev_tokens"]) == expected
    plain_dev = out.plain_topk_ids_TK // 2
    expected_plain = sum(len(set(d.tolist()) - {1}) for d in plain_dev) / 80
    assert float(st["topk_xdev_frac"]) == pytest.approx(expected_plain)


# ---------------------------------------------------------------- Hetu's SAM gate
#
# An independent slow transcription of the one public SAM implementation, Hetu's SAM gate
# (github.com/PKU-DAIR/Hetu, indexed as Hsword/Hetu): python/hetu/layers/SAMGate.py
# (samgating, balance_loss, alignment_loss, SAMGate) with its kernels src/ops/SamGroupSum.cu,
# src/ops/TopKIdx.cu, src/ops/GroupTopKIdx.cu, src/ops/SamMax.cu and the dispatch in
# src/ops/LayoutTransform.cu. Plain loops over tokens and experts; autograd only for the
# gradients (the kth probability detached as SamMax's gradient kernel does).

HETU_FLAGS = dict(
    sam_expert_balance="global",
    sam_balance_slots="all",
    sam_align_reduction="sum",
    sam_align_detach_kth=True,
    sam_router_bias=True,
    moe_router_init="xavier",
    sam_capacity_rounding="per_slot",
)


def hetu_sam_gate(x_TD, W_DE, b_E, G, K, capacity_factor):
    """Hetu's samgating(x W + b), token by token. Returns (ids, kept ids, weights, l_aux, l_alignment).

    Two places where Hetu's code contradicts itself are transcribed as intended, not as
    written: (1) the chosen group's experts are the SamGroupSum block j*M .. j*M+M-1
    (GroupTopKIdx and SamMax index j*G .. j*G+G-1, the same block only when M == G);
    (2) slot i >= 1 of an expert queues behind every earlier slot's tokens there
    (SAMGate.py offsets it by the count of the *last* slot's tokens, acc_base from
    mask_topk[k-1], which for K = 2 lets two slots share one buffer row); for K = 1 both
    readings are the same.
    """
    T, E = x_TD.shape[0], W_DE.shape[1]
    M = E // G
    gates = torch.softmax(x_TD @ W_DE + b_E, dim=-1)  # SAMGate.__call__: matmul + bias, softmax_op
    capacity = K * math.ceil((T / E) * capacity_factor)  # samgating
    ids = []
    for t in range(T):
        g = [float(v) for v in gates[t]]
        sums = [sum(g[j * M:(j + 1) * M]) for j in range(G)]  # SamGroupSum
        best, best_val = -1, -10000.0
        for j in range(G):  # TopKIdx, topk=1: a '>=' scan, the last maximum wins
            if sums[j] >= best_val:
                best, best_val = j, sums[j]
        vals, chosen = list(g), []
        for _ in range(K):  # GroupTopKIdx: K '>=' scans over the group, each winner set to -10000
            top, top_val = -1, -10000.0
            for e in range(best * M, (best + 1) * M):
                if vals[e] >= top_val:
                    top, top_val = e, vals[e]
            chosen.append(top)
            vals[top] = -10000.0
        ids.append(chosen)
    masks = [torch.zeros(T, E, dtype=gates.dtype) for _ in range(K)]  # one_hot_op per slot
    for t in range(T):
        for i in range(K):
            masks[i][t, ids[t][i]] = 1.0
    # balance_loss summed over the K slot masks: E * sum_e mean_t(gates) * mean_t(mask_i)
    l_aux = sum(E * (gates.mean(0) * masks[i].mean(0)).sum() for i in range(K))
    # SamMax: max(0, g_te - g_t,kth) outside the chosen group (the kernel leaves the group's
    # entries unwritten: 0); its gradient reaches only those outside entries (kth detached)
    l_alignment = gates.new_zeros(())
    for t in range(T):
        group = ids[t][0] // M
        kth = gates[t, ids[t][K - 1]].detach()
        for e in range(E):
            if e // M != group and float(gates[t, e]) > float(kth):
                l_alignment = l_alignment + (gates[t, e] - kth)
    # locations: slot 0 in token order, then slot 1 behind it, ...; kept when location < capacity
    count = [0] * E
    kept = [[DROPPED] * K for _ in range(T)]
    for i in range(K):
        for t in range(T):
            e = ids[t][i]
            if count[e] < capacity:
                kept[t][i] = e
            count[e] += 1
    # gates_s: the raw probability of each kept slot (LayoutTransform zeroes dropped slots)
    weights = torch.stack([
        torch.stack([gates[t, kept[t][i]] if kept[t][i] >= 0 else gates.new_zeros(()) for i in range(K)])
        for t in range(T)
    ])
    return torch.tensor(ids), torch.tensor(kept), weights, l_aux, l_alignment


@pytest.mark.parametrize("E,G,K,cap", [(16, 4, 4, 0.5), (16, 4, 2, 1.0), (8, 2, 2, 0.75), (12, 3, 1, 1.0)])
def test_hetu_flags_match_hetu_sam_gate(E, G, K, cap):
    """Every option set as Hetu's gate: the same ids, drops, weights, losses and gradients as
    the transcription, on a padded batch (the transcription sees the non-padding rows only;
    Hetu has no padding) with capacity drops."""
    torch.manual_seed(E * 100 + K)
    D = 16
    r = make(D=D, E=E, G=G, K=K, cap=cap, **HETU_FLAGS)
    r.gate_bias.data.normal_(0.0, 0.5)
    ids_BL = torch.randint(4, 50, (4, 16))
    ids_BL[1, -5:] = 1
    ids_BL[2, -9:] = 1
    tok = token_info(ids_BL)
    x = torch.randn(64, D) * 2
    out = r(x, tokens=tok)
    valid = ~tok.pad_mask_T

    W = r.gate.weight.detach().double().t().clone().requires_grad_(True)
    b = r.gate_bias.detach().double().clone().requires_grad_(True)
    ref_ids, ref_kept, ref_w, l_aux, l_align = hetu_sam_gate(x[valid].double(), W, b, G, K, cap)
    assert (ref_kept == DROPPED).any(), "the case should drop some slots"
    assert (out.expert_ids_TK[~valid] == DROPPED).all()
    assert torch.equal(out.expert_ids_TK[valid], ref_kept)
    torch.testing.assert_close(out.weights_TK[valid].double(), ref_w.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.aux_losses["balance_expert"].double(), l_aux.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.aux_losses["align"].double(), l_align.detach(), atol=1e-5, rtol=1e-5)
    assert float(l_align) > 0, "the case should have misaligned tokens"
    # gradients of Hetu's two losses, with Hetu's weights (1 each)
    gW, gb = torch.autograd.grad(out.aux_losses["balance_expert"] + out.aux_losses["align"], [r.gate.weight, r.gate_bias])
    rW, rb = torch.autograd.grad(l_aux + l_align, [W, b])
    torch.testing.assert_close(gW.double(), rW.t(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gb.double(), rb, atol=1e-5, rtol=1e-4)


def test_align_gradient_is_sammax_gradient():
    """--sam-align-detach-kth with sum: d align / d g_te = 1 for every expert outside the
    chosen group above the K-th selected probability, 0 elsewhere (SamMax.cu's gradient kernel)."""
    E, G, K = 12, 3, 2
    p = random_probs(50, E, seed=5).requires_grad_(True)
    group, ids, _ = sam_select(p.detach(), G, K)
    kth = p.gather(1, ids[:, -1:]).squeeze(1)
    valid = torch.ones(50, dtype=torch.bool)
    (grad,) = torch.autograd.grad(alignment_loss(p, group, kth, G, valid, "sum", detach_kth=True), p, retain_graph=True)
    expected = torch.zeros(50, E, dtype=p.dtype)
    for t in range(50):
        for e in range(E):
            if e // (E // G) != int(group[t]) and float(p[t, e]) > float(kth[t]):
                expected[t, e] = 1.0
    assert expected.sum() > 0
    assert torch.equal(grad, expected)
    # the default (not detached) also pushes the K-th selected probability up
    (grad_live,) = torch.autograd.grad(alignment_loss(p, group, kth, G, valid, "sum"), p)
    rows = torch.arange(50)
    torch.testing.assert_close(grad_live[rows, ids[:, -1]], -expected.sum(-1))


@pytest.mark.parametrize("K", [1, 2, 3])
@pytest.mark.parametrize("factor", [0.5, 1.0, 1.25, 2.0, INF])
def test_per_slot_capacity(K, factor):
    """K * ceil((T / E) * factor), Hetu's expression; the tensor form equals the int form."""
    for E in (8, 12):
        for n in range(1, 120):
            want = K * n if math.isinf(factor) else K * math.ceil((n / E) * factor)
            assert per_slot_capacity(n, E, K, factor) == want
            assert int(per_slot_capacity(torch.tensor(n), E, K, factor)) == want


def test_capacity_rounding_option_reaches_the_router():
    """total (default) is the shared rule of the softmax routers; per_slot is Hetu's; both without host sync."""
    T = 61
    for training in (True, False):
        default = make(E=8, G=2, K=2, cap=1.1).train(training)
        hetu = make(E=8, G=2, K=2, cap=1.1, sam_capacity_rounding="per_slot").train(training)
        # ceil(1.1 * 2 * 61 / 8) = ceil(16.775) = 17; 2 * ceil(61 / 8 * 1.1) = 2 * ceil(8.3875) = 18
        assert default.capacity_for(T) == capacity(T, 8, 2, 1.1) == 17
        assert hetu.capacity_for(T) == 18
        assert int(hetu.capacity_for(torch.tensor(T))) == hetu.capacity_for(T)


def test_forward_reads_nothing_back_from_the_device(monkeypatch):
    """The capacity takes the 0-dim count of non-padding tokens: no int()/item() in forward."""
    r = make(E=8, G=2, K=2, cap=1.0)
    ids = torch.randint(4, 50, (4, 8))
    ids[0, -3:] = 1
    tok = token_info(ids)
    x = torch.randn(32, 16)

    def no_sync(*a, **k):
        raise AssertionError("host sync in SamRouter.forward")

    for name in ("__int__", "item", "tolist", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, no_sync)
    r(x, tokens=tok)


def test_xavier_router_init_is_hetus():
    """--moe-router-init xavier on the SAM router: U(-a, a) with Hetu's XavierUniformInit limit
    a = sqrt(3 / ((fan_in + fan_out) / 2)) (python/hetu/initializers.py)."""
    torch.manual_seed(0)
    D, E = 64, 16
    r = make(D=D, E=E, G=4, K=2, moe_router_init="xavier")
    a = math.sqrt(3.0 / ((D + E) / 2.0))
    w = r.gate.weight.detach()
    assert float(w.abs().max()) <= a and float(w.abs().max()) > 0.95 * a
    assert float(w.std()) == pytest.approx(a / math.sqrt(3.0), rel=0.08)  # the uniform's std


def test_defaults_are_the_documented_formulation():
    """The defaults stay what they were before the Hetu options existed (docs/sam.md says why)."""
    cfg = router_cfg("sam")
    assert (cfg.sam_groups, cfg.moe_top_k, cfg.sam_renormalize, cfg.sam_expert_balance, cfg.sam_balance_slots,
            cfg.sam_align_reduction, cfg.sam_align_detach_kth, cfg.sam_router_bias,
            cfg.sam_capacity_rounding) == (2, 2, False, "in_group", "first", "mean", False, False, "total")


def test_router_logits_are_fp32():
    """Under a bf16 model the logits and softmax are still fp32 (Hetu's gate: "everything is in
    fp32"): the ids are those of the fp64 reference, not of a bf16 matmul."""
    torch.manual_seed(3)
    r = make(D=16, E=8, G=2, K=2, sam_router_bias=True).to(torch.bfloat16)
    r.gate_bias.data.normal_(0.0, 0.5)
    x = (torch.randn(200, 16) * 3).to(torch.bfloat16)
    out = r(x)
    logits = x.double() @ r.gate.weight.double().t() + r.gate_bias.double()
    _, ref_ids, ref_w = ref_select(torch.softmax(logits, -1), 2, 2, False)
    assert torch.equal(out.expert_ids_TK, ref_ids)
    assert out.weights_TK.dtype == torch.bfloat16
    torch.testing.assert_close(out.weights_TK.double(), ref_w, atol=1e-2, rtol=1e-2)
    assert out.aux_losses["align"].dtype == torch.float32


def test_train_and_eval_route_alike():
    """No mode switch in the routing (as Hetu's samgating): with the same capacity and no
    jitter, training and evaluation give the same ids, weights and losses."""
    r = make(E=8, G=2, K=2, cap=INF)
    x = torch.randn(40, 16) * 3
    a, b = r.train()(x), r.eval()(x)
    assert torch.equal(a.expert_ids_TK, b.expert_ids_TK) and torch.equal(a.weights_TK, b.weights_TK)
    for name in a.aux_losses:
        assert torch.equal(a.aux_losses[name], b.aux_losses[name])
