"""Sinkhorn routing (S-BASE, router ``sinkhorn``, arch ``sbase_lm``): the normalisation against a
slow float64 reference and a hand-computed case, balance on skewed logits, the assignment's
value against scipy's exact balanced optimum, training vs evaluation, padding, options."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from moe_plugin import config
from moe_plugin.routing import DROPPED, build_router
from moe_plugin.routing.sinkhorn import sinkhorn
from tests.helpers import router_cfg, token_info

D, E = 16, 8


def make(**kw):
    cfg = router_cfg("sinkhorn", moe_expert_count=kw.pop("moe_expert_count", E), **kw)
    config.validate(cfg)
    torch.manual_seed(0)
    return build_router(cfg, D)


def slow_sinkhorn(scores_TE: np.ndarray, tau: float = 1.0, iterations: int = 5000) -> np.ndarray:
    """Reference: alternately rescale the rows of exp(s / tau) to sum 1/T and the columns to
    sum 1/E, on the matrix itself, in float64 (no scaling vectors, no shift, no eps)."""
    T, E_ = scores_TE.shape
    P = np.exp(scores_TE.astype(np.float64) / tau)
    for _ in range(iterations):
        P *= (1.0 / T) / P.sum(1, keepdims=True)
        P *= (1.0 / E_) / P.sum(0, keepdims=True)
    return P


def scipy_optimum(a_TE: np.ndarray, loads_E) -> float:
    """Exact optimum of sum_t a[t, e(t)] with expert e taking loads_E[e] tokens (each
    expert's column repeated loads_E[e] times, then LAPJV)."""
    cols = np.repeat(np.arange(a_TE.shape[1]), loads_E)
    cost = a_TE[:, cols]
    rows, picked = linear_sum_assignment(cost, maximize=True)
    return float(cost[rows, picked].sum())


def skewed_scores(T, E_, seed, dtype=torch.float64):
    """N(0, 1) scores plus a per-expert bias rising 0 -> 3: greedy overloads the last experts."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, E_, generator=g, dtype=dtype) + torch.linspace(0, 3, E_, dtype=dtype)


# ---------------------------------------------------------------------------------------
# the normalisation
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("T,E_,scale", [(40, 4, 1.0), (96, 8, 3.0), (33, 5, 0.1)])
def test_converges_to_marginals_and_matches_slow_reference(seed, T, E_, scale):
    g = torch.Generator().manual_seed(seed)
    s = scale * torch.randn(T, E_, generator=g, dtype=torch.float64)
    # float64; Megatron's eps = 1e-8 in the denominators perturbs the fixed point by ~E * 1e-8
    # (relative), so the change of d1 levels off near there: tol 1e-7 is reachable
    res = sinkhorn(s, tol=1e-7, max_iterations=5000)
    P = res.plan_TE
    assert res.iterations < 5000  # converged by the stopping rule, not the cap
    # the last update is of the columns: they are exact up to eps; the rows within the tolerance
    torch.testing.assert_close(P.sum(0), torch.full((E_,), 1.0 / E_, dtype=P.dtype), rtol=1e-6, atol=0)
    torch.testing.assert_close(P.sum(1), torch.full((T,), 1.0 / T, dtype=P.dtype), rtol=1e-5, atol=0)
    np.testing.assert_allclose(P.numpy(), slow_sinkhorn(s.numpy()), rtol=1e-5)
    assert torch.equal(res.expert_T, P.argmax(1))


def test_float32_default_tolerance_marginals():
    """Megatron's rule (tol 1e-4 on the change of the column scaling) in float32: the rows
    are within 1e-3 of 1/T (relative) on a random problem, the columns within 1e-5."""
    s = 2.0 * torch.randn(512, 16, generator=torch.Generator().manual_seed(0))
    res = sinkhorn(s)
    assert res.plan_TE.dtype == torch.float32 and float(res.delta) <= 1e-4 and res.iterations < 100
    assert float((res.plan_TE.sum(1) * 512 - 1).abs().max()) < 1e-3
    assert float((res.plan_TE.sum(0) * 16 - 1).abs().max()) < 1e-5


def test_hand_computed_2x2():
    """Rows and columns 1/2: P = [[a, 1/2 - a], [1/2 - a, a]] with a^2 / (1/2 - a)^2 equal to
    the cross ratio K00 K11 / (K01 K10) of K = exp(s / tau)."""
    # both tokens prefer expert 0 (greedy sends both there); cross ratio 9/4 -> a = 0.3
    s = torch.tensor([[math.log(9.0), 0.0], [math.log(4.0), 0.0]], dtype=torch.float64)
    res = sinkhorn(s, tol=0.0, max_iterations=200)
    torch.testing.assert_close(res.plan_TE, torch.tensor([[0.3, 0.2], [0.2, 0.3]], dtype=torch.float64))
    assert res.expert_T.tolist() == [0, 1]  # the balanced optimum (ln 9 + 0 > ln 4 + 0)
    assert s.argmax(1).tolist() == [0, 0]
    # temperature 1/2 squares the cross ratio: (9/4)^2 -> a / (1/2 - a) = 9/4 -> a = 9/26
    res = sinkhorn(s, tol=0.0, max_iterations=200, temperature=0.5)
    a = 9.0 / 26.0
    torch.testing.assert_close(res.plan_TE, torch.tensor([[a, 0.5 - a], [0.5 - a, a]], dtype=torch.float64))
    # one iteration by hand from d1 = 1 (K = [[9, 1], [4, 1]], row-shifted to [[1, 1/9], [1, 1/4]]):
    # d0 = (1/2) / (K 1) and d1 = (1/2) / (K^T d0) on the unshifted K; the plan is shift-free
    res = sinkhorn(s, tol=0.0, max_iterations=1)
    K = torch.tensor([[9.0, 1.0], [4.0, 1.0]], dtype=torch.float64)
    d0 = 0.5 / (K @ torch.ones(2, dtype=torch.float64))
    d1 = 0.5 / (d0 @ K)
    torch.testing.assert_close(res.plan_TE, d0[:, None] * K * d1[None, :], rtol=1e-7, atol=1e-12)


def test_row_shift_invariance_and_large_logits():
    """Adding a constant to a row changes nothing (d0 absorbs it), so logits far above
    exp's float32 range (~88) give the same plan as moderate ones, finite."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(64, 8, generator=g)
    shifted = s + 300.0 * torch.rand(64, 1, generator=g)
    a, b = sinkhorn(s, tol=0.0, max_iterations=30), sinkhorn(shifted, tol=0.0, max_iterations=30)
    assert torch.isfinite(b.plan_TE).all()
    torch.testing.assert_close(a.plan_TE, b.plan_TE, rtol=1e-4, atol=1e-8)
    assert torch.equal(a.expert_T, b.expert_T)


def test_padding_rows_are_left_out():
    """The problem with padding rows masked is exactly the problem on the real rows."""
    g = torch.Generator().manual_seed(4)
    s = torch.randn(30, 6, generator=g, dtype=torch.float64)
    valid = torch.rand(30, generator=g) > 0.3
    full = sinkhorn(s, valid, tol=0.0, max_iterations=300)
    sub = sinkhorn(s[valid], tol=0.0, max_iterations=300)
    assert (full.plan_TE[~valid] == 0).all()
    torch.testing.assert_close(full.plan_TE[valid], sub.plan_TE)
    assert torch.equal(full.expert_T[valid], sub.expert_T)


def test_iteration_cap_and_fixed_iterations():
    s = 10.0 * skewed_scores(256, 8, 0, torch.float32)  # logits spread ~ +-40: slow to converge
    assert sinkhorn(s, tol=0.0, max_iterations=7).iterations == 7
    capped = sinkhorn(s, tol=1e-4, max_iterations=25)
    assert capped.iterations == 25 and float(capped.delta) > 1e-4


# ---------------------------------------------------------------------------------------
# the assignment: balance and value
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_balances_skewed_logits_where_argmax_collapses(seed):
    """A bias of +5 on expert 0: plain argmax puts (almost) every token there; the
    Sinkhorn assignment keeps every expert within 1.3 x T/E."""
    T, E_ = 512, 8
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(T, E_, generator=g)
    s[:, 0] += 5.0
    greedy = torch.bincount(s.argmax(1), minlength=E_)
    assert greedy[0] >= 0.95 * T
    load = torch.bincount(sinkhorn(s).expert_T, minlength=E_).float()
    assert float(load.max()) <= 1.3 * T / E_ and float(load.min()) >= 0.7 * T / E_


@pytest.mark.parametrize("seed", range(4))
def test_value_against_scipy_balanced_optimum(seed):
    """T = E * c with skewed scores. scipy's exact optimum with every expert taking exactly
    c tokens (columns repeated c times) is the reference. The Sinkhorn assignment (tau 1,
    Megatron's rule) is within 4 % of it (above it where its loads are uneven), with no
    expert over 1.4 c, while greedy exceeds it by > 15 % with an expert over 3 c; and it is
    exactly optimal for the loads it produced (argmax of the plan = greedy under the prices
    -log d1, an LP-duality certificate), which scipy confirms."""
    E_, c = 8, 32
    s = skewed_scores(E_ * c, E_, seed)
    a = s.numpy()
    res = sinkhorn(s)
    expert = res.expert_T.numpy()
    value = float(a[np.arange(E_ * c), expert].sum())
    loads = np.bincount(expert, minlength=E_)
    optimum = scipy_optimum(a, [c] * E_)
    assert abs(value / optimum - 1.0) <= 0.04
    assert loads.max() <= 1.4 * c
    assert a.max(1).sum() / optimum > 1.15 and np.bincount(a.argmax(1), minlength=E_).max() > 3 * c
    assert value == pytest.approx(scipy_optimum(a, loads), rel=1e-12)
    # the prices certify it: every token's expert maximises s_te + log d1_e
    reduced = a + res.log_d1_E.numpy()[None, :]
    assert np.all(reduced[np.arange(E_ * c), expert] >= reduced.max(1) - 1e-9)


def test_lower_temperature_is_more_balanced():
    """tau 0.1 (exp(10 s)) on the same skewed problems: max load <= 1.15 c (vs <= 1.4 c at tau
    1), value within 2 % of the balanced optimum."""
    E_, c = 8, 32
    for seed in range(2):
        s = skewed_scores(E_ * c, E_, seed)
        a = s.numpy()
        expert = sinkhorn(s, temperature=0.1, max_iterations=3000).expert_T.numpy()
        loads = np.bincount(expert, minlength=E_)
        assert loads.max() <= 1.15 * c
        value = float(a[np.arange(E_ * c), expert].sum())
        assert abs(value / scipy_optimum(a, [c] * E_) - 1.0) <= 0.02


# ---------------------------------------------------------------------------------------
# the router
# ---------------------------------------------------------------------------------------


def batch(seed=0, B=4, L=6, pads=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 50, (B, L), generator=g)
    if pads:
        ids[-1, -pads:] = 1
    return torch.randn(B * L, D, generator=g), token_info(ids)


def test_arch_defaults():
    cfg = router_cfg("sinkhorn")
    assert cfg.moe_top_k == 1 and cfg.moe_capacity_factor == 2.0
    assert (cfg.sinkhorn_iterations, cfg.sinkhorn_tol, cfg.sinkhorn_temperature, cfg.sinkhorn_gate) == (
        100, 1e-4, 1.0, "sigmoid")


def test_training_routes_by_sinkhorn_of_the_real_tokens():
    router = make(moe_capacity_factor=float("inf")).train()
    x, tok = batch()
    out = router(x, tokens=tok)
    valid = ~tok.pad_mask_T
    logits = x @ router.gate.weight.t()
    ref = sinkhorn(logits[valid], tol=1e-4, max_iterations=100)
    assert torch.equal(out.expert_ids_TK[valid, 0], ref.expert_T)
    assert (out.expert_ids_TK[~valid] == DROPPED).all() and (out.weights_TK[~valid] == 0).all()
    chosen = logits[valid].gather(1, ref.expert_T[:, None])
    torch.testing.assert_close(out.weights_TK[valid], torch.sigmoid(chosen))
    assert out.stats["sinkhorn_iterations"] == ref.iterations
    # no balance loss (S-BASE has none); the z-loss is there for --moe-z-loss-weight
    assert set(out.aux_losses) == {"z"}
    # the gate carries the gradient to the router weights
    out.weights_TK.sum().backward()
    assert router.gate.weight.grad is not None and router.gate.weight.grad.abs().sum() > 0


def test_evaluation_is_greedy_argmax():
    router = make(moe_capacity_factor=float("inf")).eval()  # no drop in either mode
    with torch.no_grad():
        router.gate.weight[0] += 0.5  # skew: Sinkhorn and argmax disagree
    x, tok = batch(1)
    out = router(x, tokens=tok)
    valid = ~tok.pad_mask_T
    logits = x @ router.gate.weight.t()
    assert torch.equal(out.expert_ids_TK[valid, 0], logits[valid].argmax(1))
    torch.testing.assert_close(out.weights_TK[valid, 0], torch.sigmoid(logits[valid].max(1).values))
    assert out.stats["sinkhorn_iterations"] == 0
    router.train()
    trained = router(x, tokens=tok)
    assert not torch.equal(trained.expert_ids_TK[valid, 0], out.expert_ids_TK[valid, 0])
    # incremental decoding routes greedily even in training mode
    tok.incremental = True
    assert torch.equal(router(x, tokens=tok).expert_ids_TK, out.expert_ids_TK)


def test_softmax_gate():
    router = make(sinkhorn_gate="softmax").eval()
    x, tok = batch(2, pads=0)
    out = router(x, tokens=tok)
    probs = torch.softmax(x @ router.gate.weight.t(), dim=-1)
    torch.testing.assert_close(out.weights_TK[:, 0], probs.max(1).values)


def test_capacity_drops_in_token_order():
    """Capacity factor 0.5 on 24 tokens, E = 4: at most ceil(0.5 * 24 / 4) = 3 per expert, the
    first in token order kept (limit_capacity, as the other routers)."""
    router = make(moe_expert_count=4, moe_capacity_factor=0.5).train()
    x, tok = batch(3, pads=0)
    out = router(x, tokens=tok)
    wanted = sinkhorn(x @ router.gate.weight.t()).expert_T
    kept = out.expert_ids_TK[:, 0]
    for e in range(4):
        rows = torch.nonzero(wanted == e).squeeze(1)
        assert torch.equal(kept[rows[:3]], torch.full((min(3, rows.numel()),), e))
        assert (kept[rows[3:]] == DROPPED).all()
    dropped = float((kept == DROPPED).sum()) / 24
    assert float(out.stats["dropped_frac"]) == pytest.approx(dropped)


@pytest.mark.parametrize(
    "option,value,allowed",
    [
        ("moe_top_k", 2, "allowed: 1"),
        ("sinkhorn_iterations", 0, "an integer >= 1"),
        ("sinkhorn_iterations", 2.5, "an integer >= 1"),
        ("sinkhorn_tol", -1e-3, ">= 0"),
        ("sinkhorn_tol", float("nan"), ">= 0"),
        ("sinkhorn_tol", float("inf"), ">= 0"),
        ("sinkhorn_temperature", 0.0, "> 0"),
        ("sinkhorn_temperature", float("inf"), "> 0"),
        ("sinkhorn_gate", "relu", "sigmoid, softmax"),
        ("moe_jitter_eps", 1.0, "0 <= eps < 1"),
    ],
)
def test_bad_options_raise(option, value, allowed):
    cfg = router_cfg("sinkhorn", **{option: value})
    with pytest.raises(ValueError) as err:
        config.validate(cfg)
    msg = str(err.value)
    assert "--" + option.replace("_", "-") in msg and allowed in msg
