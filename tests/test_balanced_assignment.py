"""The balanced assignment of BASE layers (moe_plugin.routing.balanced) against independent
references: scipy's exact linear_sum_assignment, fairseq's own C++ auction (libbase), brute
force over all assignments, and hand-made cases."""

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.optimize import linear_sum_assignment

from moe_plugin.routing.balanced import (
    balanced_assignment,
    balanced_capacities,
    greedy_assignment,
    solve_balanced,
)


def scores(kind, T, E, seed):
    """Score matrices of several shapes of difficulty."""
    g = torch.Generator().manual_seed(seed)
    if kind == "iid":
        return torch.randn(T, E, generator=g)
    if kind == "skewed":  # some experts much more popular than others
        return torch.randn(T, E, generator=g) + 1.5 * torch.randn(E, generator=g)
    if kind == "lowrank":  # correlated tokens, as h . w_e after training
        return torch.randn(T, 4, generator=g) @ torch.randn(4, E, generator=g) + 0.3 * torch.randn(E, generator=g)
    if kind == "base_init":  # what a BASE layer sees at init: h . w_e, w orthogonal, gain 0.1
        w = torch.nn.init.orthogonal_(torch.empty(E, 32), gain=0.1)
        return torch.randn(T, 32, generator=g) @ w.t()
    if kind == "ties":  # few distinct values: many ties
        return torch.randint(0, 3, (T, E), generator=g).float()
    raise ValueError(kind)


def total(a, expert_T):
    return float(a.double().gather(1, expert_T[:, None]).sum())


def scipy_optimum(a, cap_E):
    """Exact optimum: every expert's column repeated cap_e times, then LAPJV."""
    cost = np.repeat(a.double().numpy(), cap_E.numpy(), axis=1)
    rows, cols = linear_sum_assignment(cost, maximize=True)
    return float(cost[rows, cols].sum())


def loads(expert_T, E):
    return torch.bincount(expert_T, minlength=E)


# ---------------------------------------------------------------------------- balance


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    T=st.integers(0, 300),
    E=st.integers(1, 24),
    seed=st.integers(0, 10_000),
    kind=st.sampled_from(["iid", "skewed", "lowrank", "ties"]),
)
def test_exact_balance_property(T, E, seed, kind):
    a = scores(kind, T, E, seed) if T else torch.empty(0, E)
    expert_T = balanced_assignment(a)
    assert expert_T.shape == (T,) and expert_T.dtype == torch.long
    n_E = loads(expert_T, E)
    assert int(n_E.sum()) == T
    assert int(n_E.max() - n_E.min()) <= 1
    if T % E == 0:
        assert (n_E == T // E).all()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    a=arrays(
        np.float32,
        st.tuples(st.integers(1, 60), st.integers(1, 9)),
        elements=st.one_of(
            st.floats(-1e6, 1e6, width=32), st.sampled_from([float("nan"), float("inf"), float("-inf")])
        ),
    )
)
def test_balance_with_arbitrary_floats_including_nan_and_inf(a):
    T, E = a.shape
    expert_T = balanced_assignment(torch.from_numpy(a))
    n_E = loads(expert_T, E)
    assert ((expert_T >= 0) & (expert_T < E)).all()
    assert int(n_E.sum()) == T and int(n_E.max() - n_E.min()) <= 1


def test_non_finite_scores_count_as_lowest_or_highest_finite_score():
    # NaN and -inf count as the lowest finite score, +inf as the highest (numpy's nan_to_num
    # with those values is the independent reference); the result is optimal for that matrix
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        T, E = 96, 6
        a = torch.randn(T, E, generator=g)
        r = torch.rand(T, E, generator=g)
        a[r < 0.10] = float("nan")
        a[(r >= 0.10) & (r < 0.15)] = float("-inf")
        a[(r >= 0.15) & (r < 0.18)] = float("inf")
        fin = a[torch.isfinite(a)]
        ref = torch.from_numpy(
            np.nan_to_num(a.numpy(), nan=float(fin.min()), neginf=float(fin.min()), posinf=float(fin.max()))
        )
        result = solve_balanced(a)
        assert (loads(result.expert_T, E) == T // E).all()
        opt = scipy_optimum(ref, torch.full((E,), T // E))
        assert opt - total(ref, result.expert_T) <= 1e-3 * abs(opt)
    # all non-finite: still a balanced assignment
    b = torch.full((12, 3), float("nan"))
    assert (loads(balanced_assignment(b), 3) == 4).all()


def test_edge_cases():
    assert balanced_assignment(torch.randn(0, 5)).shape == (0,)
    assert (balanced_assignment(torch.randn(7, 1)) == 0).all()
    # fewer tokens than experts: every token its own expert, the best ones
    a = torch.tensor([[0.0, 5.0, 1.0, 0.0], [4.0, 0.0, 1.0, 3.0]])
    assert balanced_assignment(a).tolist() == [1, 0]
    # all scores equal: any balanced assignment
    assert (loads(balanced_assignment(torch.ones(12, 4)), 4) == 3).all()
    with pytest.raises(ValueError, match="scores must be"):
        balanced_assignment(torch.randn(3))


# ---------------------------------------------------------------------------- optimality


@pytest.mark.parametrize("kind", ["iid", "skewed", "lowrank", "base_init", "ties"])
@pytest.mark.parametrize("T,E", [(64, 2), (128, 8), (256, 16), (512, 8), (480, 32)])
def test_within_a_tenth_of_a_percent_of_scipy_optimum(kind, T, E):
    for seed in range(2):
        a = scores(kind, T, E, seed)
        result = solve_balanced(a)
        cap_E = loads(result.expert_T, E)
        assert (cap_E == T // E).all()
        opt = scipy_optimum(a, cap_E)
        got = total(a, result.expert_T)
        assert got <= opt + 1e-6 * max(1.0, abs(opt))  # scipy is exact: nothing beats it
        assert opt - got <= 1e-3 * abs(opt) + 1e-6, (opt, got)
        # the certificate is a true upper bound on the distance to the optimum
        assert opt - got <= result.gap_bound + 1e-4 * max(1.0, abs(opt))


def test_brute_force_on_tiny_problems():
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        T, E = 6, 3
        a = torch.randn(T, E, generator=g)
        best = max(
            sum(float(a[t, e]) for t, e in enumerate(assign))
            for assign in itertools.product(range(E), repeat=T)
            if all(assign.count(e) == 2 for e in range(E))
        )
        got = total(a, balanced_assignment(a))
        assert abs(best - got) <= 1e-3 * abs(best) + 1e-6


@pytest.mark.parametrize("T,E", [(10, 4), (333, 16), (250, 7)])
def test_t_not_divisible_by_e(T, E):
    a = scores("skewed", T, E, 3)
    result = solve_balanced(a)
    n_E = loads(result.expert_T, E)
    assert int(n_E.sum()) == T and set(n_E.tolist()) <= {T // E, T // E + 1}
    # the larger loads go to the experts most demanded at the start (mean-centred argmax)
    demand_E = loads(torch.argmax(a - a.mean(0), 1), E)
    assert torch.equal(n_E, balanced_capacities(T, E, demand_E))
    # optimal for those loads
    opt = scipy_optimum(a, n_E)
    assert opt - total(a, result.expert_T) <= 1e-3 * abs(opt)


def test_given_capacities_are_met_exactly():
    a = scores("iid", 100, 4, 0)
    cap_E = torch.tensor([10, 40, 25, 25])
    result = solve_balanced(a, cap_E)
    assert torch.equal(loads(result.expert_T, 4), cap_E)
    opt = scipy_optimum(a, cap_E)
    assert opt - total(a, result.expert_T) <= 1e-3 * abs(opt)
    with pytest.raises(ValueError, match="capacities"):
        solve_balanced(a, torch.tensor([10, 10, 10, 10]))


def test_warm_start_from_previous_prices():
    a = scores("lowrank", 1024, 16, 0)
    first = solve_balanced(a)
    b = a + 0.01 * scores("iid", 1024, 16, 1)  # the next batch: close to the last one
    warm = solve_balanced(b, prices_E=first.prices_E)
    cold = solve_balanced(b)
    assert (loads(warm.expert_T, 16) == 64).all()
    assert abs(total(b, warm.expert_T) - total(b, cold.expert_T)) <= 1e-3 * abs(total(b, cold.expert_T))


def test_deterministic():
    a = scores("skewed", 512, 16, 5)
    assert torch.equal(balanced_assignment(a), balanced_assignment(a.clone()))


# ---------------------------------------------------------------------------- vs libbase


@pytest.mark.parametrize("kind", ["iid", "skewed", "lowrank", "base_init"])
@pytest.mark.parametrize("T,E", [(1024, 8), (1024, 32), (2048, 16), (2048, 64)])
def test_never_worse_than_fairseq_libbase(kind, T, E):
    libbase = pytest.importorskip("fairseq.libbase")
    for seed in range(2):
        a = scores(kind, T, E, seed)
        perm_T = libbase.balanced_assignment(a.clone())  # token ids grouped by expert
        lib_T = torch.empty(T, dtype=torch.long)
        lib_T[perm_T] = torch.arange(E).repeat_interleave(T // E)
        ours = total(a, balanced_assignment(a))
        theirs = total(a, lib_T)
        # small tolerance for ties (libbase's own result is eps-optimal, 5-10 bp off)
        assert ours >= theirs - 1e-5 * abs(theirs), (ours, theirs)


# ---------------------------------------------------------------------------- greedy


def test_greedy_assignment_is_argmax():
    a = scores("lowrank", 200, 8, 0)
    assert torch.equal(greedy_assignment(a), a.argmax(1))
    b = a.clone()
    b[0] = float("nan")
    b[0, 5] = 1.0
    assert greedy_assignment(b)[0] == 5


def test_gap_bound_is_finite_and_small_at_benchmark_like_sizes():
    a = scores("base_init", 4096, 64, 0)
    result = solve_balanced(a)
    assert math.isfinite(result.gap_bound) and 0 <= result.gap_bound <= 1e-3 * abs(result.total)
