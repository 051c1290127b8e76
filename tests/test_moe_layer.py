"""The MoE layer against slow obvious references: a dense FFN, a per-token loop."""

import pytest
import torch
import torch.nn as nn

from moe_plugin.dispatch import LocalDispatcher
from moe_plugin.experts import ExpertBank, grouped_matmul
from moe_plugin.moe_layer import MoELayer
from moe_plugin.routing import build_router
from tests.helpers import reference_moe, router_cfg

INF = float("inf")


def _rows_by_hand(x, w, counts):
    """Row r of group e (r counted over the sorted rows) is x[r] @ w[e]; tail rows are zero."""
    out = torch.zeros(x.shape[0], w.shape[2])
    r = 0
    for e, c in enumerate(counts.tolist()):
        for _ in range(c):
            out[r] = x[r] @ w[e]
            r += 1
    return out


@pytest.mark.parametrize("tail", [0, 3])
@pytest.mark.parametrize("impl", ["grouped_mm", "bmm", "auto"])
def test_grouped_matmul_equals_row_by_row_with_empty_groups_and_tail(impl, tail):
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([3, 0, 5, 0, 4])
    N = int(counts.sum()) + tail
    x = torch.randn(N, 8, generator=g, requires_grad=True)
    w = torch.randn(5, 8, 12, generator=g, requires_grad=True)
    gy = torch.randn(N, 12, generator=g)
    y = grouped_matmul(x, w, counts, impl)
    y.backward(gy)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y2 = _rows_by_hand(x2, w2, counts)
    y2.backward(gy)
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(w.grad, w2.grad)
    assert w.grad[1].abs().max() == 0 and w.grad[3].abs().max() == 0
    if tail:
        assert y[-tail:].abs().max() == 0 and x.grad[-tail:].abs().max() == 0


def _bank_by_hand(bank, x, counts, drop_mask=None):
    """Slow obvious bank: every routed row through its expert's FFN, tail rows zero."""
    out = torch.zeros(x.shape[0], bank.model_dim)
    r = 0
    for e, c in enumerate(counts.tolist()):
        for _ in range(c):
            h = bank.activation(x[r] @ bank.w1_EDF[e] + bank.b1_EF[e])
            if drop_mask is not None:
                h = h * drop_mask[r]
            out[r] = h @ bank.w2_EFD[e] + bank.b2_ED[e]
            r += 1
    return out


@pytest.mark.parametrize("activation", ["relu", "gelu", "swish"])
@pytest.mark.parametrize("impl", ["fused", "grouped_mm", "bmm"])
def test_expert_bank_impls_equal_row_by_row(impl, activation):
    """Outputs and every gradient of each implementation against a per-row loop; empty
    experts get zero gradients, tail rows zero output and zero gradient."""
    torch.manual_seed(3)
    E, D, F = 5, 8, 12
    counts = torch.tensor([4, 0, 6, 1, 0])
    N = int(counts.sum()) + 2
    bank = ExpertBank(E, D, F, activation=activation, impl=impl)
    x = torch.randn(N, D, requires_grad=True)
    gy = torch.randn(N, D)
    bank(x, counts).backward(gy)
    got = [p.grad.clone() for p in bank.parameters()] + [x.grad.clone()]
    bank.zero_grad()
    x2 = x.detach().clone().requires_grad_()
    y_ref = _bank_by_hand(bank, x2, counts)
    y_ref.backward(gy)
    want = [p.grad for p in bank.parameters()] + [x2.grad]
    torch.testing.assert_close(bank(x, counts), y_ref)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert got[0][1].abs().max() == 0 and got[1][4].abs().max() == 0
    assert got[-1][-2:].abs().max() == 0


def test_fused_bank_relu_dropout_gradient_matches_its_mask():
    """With activation dropout the fused backward recovers the mask from the saved output:
    the gradient equals the by-hand one with the mask the forward drew."""
    E, D, F, p = 3, 8, 16, 0.4
    counts = torch.tensor([5, 3, 4])
    bank = ExpertBank(E, D, F, activation="relu", activation_dropout=p, impl="fused").train()
    x = torch.randn(12, D, requires_grad=True)
    gy = torch.randn(12, D)
    torch.manual_seed(7)
    y = bank(x, counts)
    y.backward(gy)
    got = [q.grad.clone() for q in bank.parameters()] + [x.grad.clone()]
    # the same mask, drawn the same way: dropout on the (n, F) hidden activations
    torch.manual_seed(7)
    mask = torch.nn.functional.dropout(torch.ones(12, F), p=p, training=True)
    assert 0 < int((mask == 0).sum()) < mask.numel()
    bank.zero_grad()
    x2 = x.detach().clone().requires_grad_()
    y_ref = _bank_by_hand(bank, x2, counts, drop_mask=mask)
    y_ref.backward(gy)
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(got, [q.grad for q in bank.parameters()] + [x2.grad]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("impl", ["fused", "grouped_mm", "bmm"])
def test_expert_bank_bf16_close_to_fp32(impl):
    torch.manual_seed(0)
    counts = torch.tensor([7, 9, 0, 16])
    bank = ExpertBank(4, 16, 32, impl=impl)
    x = torch.randn(32, 16)
    y32 = bank(x, counts)
    y16 = bank(x.bfloat16(), counts)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, atol=0.05, rtol=0.05)


def test_one_expert_equals_dense_ffn_outputs_and_gradients():
    torch.manual_seed(0)
    D, F, T = 16, 32, 40
    fc1, fc2 = nn.Linear(D, F), nn.Linear(F, D)
    router = build_router(router_cfg("switch", moe_expert_count=1, moe_capacity_factor=INF), D)
    experts = ExpertBank(1, D, F, activation="relu")
    experts.load_dense(0, fc1, fc2)
    layer = MoELayer(router, experts)
    x = torch.randn(T, D, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    gy = torch.randn(T, D)
    layer(x).backward(gy)
    y_ref = fc2(torch.relu(fc1(x_ref)))
    y_ref.backward(gy)
    torch.testing.assert_close(layer(x), y_ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(experts.w1_EDF.grad[0], fc1.weight.grad.t())
    torch.testing.assert_close(experts.b1_EF.grad[0], fc1.bias.grad)
    torch.testing.assert_close(experts.w2_EFD.grad[0], fc2.weight.grad.t())
    torch.testing.assert_close(experts.b2_ED.grad[0], fc2.bias.grad)


@pytest.mark.parametrize("router_name,factor", [("switch", INF), ("switch", 1.0), ("gshard", INF), ("gshard", 0.6)])
@pytest.mark.parametrize("impl", ["fused", "grouped_mm", "bmm"])
def test_vectorised_layer_equals_per_token_loop(router_name, factor, impl):
    torch.manual_seed(1)
    D, F, E, T = 16, 24, 6, 50
    router = build_router(router_cfg(router_name, moe_expert_count=E, moe_capacity_factor=factor), D).eval()
    router.eval_capacity_factor = factor
    experts = ExpertBank(E, D, F, activation="gelu", impl=impl)
    layer = MoELayer(router, experts).eval()
    x = torch.randn(T, D, requires_grad=True)
    gy = torch.randn(T, D)
    y = layer(x)
    y.backward(gy)
    grads = [p.grad.clone() for p in experts.parameters()] + [x.grad.clone(), router.gate.weight.grad.clone()]
    for p in list(experts.parameters()) + [router.gate.weight]:
        p.grad = None
    x2 = x.detach().clone().requires_grad_()
    route = router(x2)
    y_ref = reference_moe(x2, route.expert_ids_TK, route.weights_TK, experts)
    y_ref.backward(gy)
    grads_ref = [p.grad for p in experts.parameters()] + [x2.grad, router.gate.weight.grad]
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)


def test_dispatch_combine_round_trip_with_dropped_slots():
    E = 3
    ids = torch.tensor([[0, 2], [1, -1], [-1, -1], [2, 0]])
    w = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.0, 0.0], [0.3, 0.7]])
    x = torch.arange(8.0).view(4, 2)
    d = LocalDispatcher(E)
    x_sorted, counts, plan = d.dispatch(x, ids)
    assert counts.tolist() == [2, 1, 2]
    # rows sorted by expert: expert 0 gets tokens 0 and 3, expert 1 token 1, expert 2 tokens
    # 0 and 3; then the dropped slots (token 1's second, both of token 2's) in slot order
    assert plan.token_N.tolist() == [0, 3, 1, 0, 3, 1, 2, 2]
    torch.testing.assert_close(x_sorted, x[plan.token_N])
    # identity experts that zero the tail, as the expert bank does: y_t = sum_k w_tk * x_t
    y_sorted = torch.cat([x_sorted[:5], torch.zeros(3, 2)])
    torch.testing.assert_close(d.combine(y_sorted, w, plan), x * w.sum(1, keepdim=True))
    # the kept rows alone (as the expert-parallel dispatcher returns them) combine the same
    torch.testing.assert_close(d.combine(x_sorted[:5], w, plan), x * w.sum(1, keepdim=True))


def test_layer_keeps_last_aux_and_stats():
    torch.manual_seed(0)
    router = build_router(router_cfg("switch", moe_expert_count=4), 8)
    layer = MoELayer(router, ExpertBank(4, 8, 16))
    layer(torch.randn(5, 3, 8))
    assert set(layer.last_aux_losses) >= {"balance", "z"}
    assert layer.last_aux_losses["balance"].requires_grad
    assert int(layer.last_stats["tokens_per_expert"].sum()) <= 15
    assert int(layer.last_stats["num_tokens"]) == 15


def test_capacity_from_a_device_count_equals_the_int_formula():
    """The tensor form (no host sync) gives exactly ceil(f * K * T / E) of the int form."""
    from moe_plugin.routing.interface import capacity

    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        T = int(torch.randint(0, 5000, (1,), generator=g))
        E = int(torch.randint(1, 130, (1,), generator=g))
        K = int(torch.randint(1, 5, (1,), generator=g))
        f = [0.5, 1.0, 1.25, 2.0, 1 / 3, 0.7, INF][int(torch.randint(0, 7, (1,), generator=g))]
        want = max(int(__import__("math").ceil(f * K * T / E)), 1) if f != INF else max(T * K, 1)
        assert capacity(T, E, K, f) == want
        assert int(capacity(torch.tensor(T), E, K, f)) == want


def test_tokens_per_expert_equals_bincount_of_kept_ids():
    from moe_plugin.routing.interface import tokens_per_expert

    ids = torch.randint(-1, 7, (300, 3))
    torch.testing.assert_close(tokens_per_expert(ids, 7), torch.bincount(ids[ids >= 0], minlength=7))


def _saved_bytes(fn, params):
    """Bytes of the tensors autograd keeps for backward during ``fn()`` (parameters not counted)."""
    seen, total = {p.untyped_storage().data_ptr() for p in params}, [0]

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in seen and key != 0:
            seen.add(key)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


@pytest.mark.parametrize("impl", ["fused", "grouped_mm"])
@pytest.mark.parametrize("activation,p_drop", [("relu", 0.0), ("relu", 0.3), ("gelu", 0.0)])
@pytest.mark.parametrize("K,drop", [(1, False), (2, False), (2, True)])
def test_fused_gather_ffn_combine_equals_separate_steps_and_loop(impl, activation, p_drop, K, drop):
    """ExpertBank.forward_combined (gather, FFN and combine in one autograd function that keeps
    neither the gathered rows nor the expert outputs) against the separate dispatch -> bank ->
    combine, and (without dropout) the per-token loop: output and the gradients of x, of the
    combine weights and of every expert parameter; an expert with no rows, dropped slots and a
    token with none kept included."""
    torch.manual_seed(3)
    T, D, F, E = 41, 8, 12, 5
    bank = ExpertBank(E, D, F, activation=activation, activation_dropout=p_drop, impl=impl).train()
    with torch.no_grad():
        for p in bank.parameters():
            p.normal_()
    ids = torch.randint(0, E, (T, K))
    ids[ids == 3] = 4  # expert 3 gets no rows
    if drop:
        ids[::3, 0] = -1
        ids[5] = -1
    w = torch.rand(T, K, requires_grad=True)
    gy = torch.randn(T, D)
    d = LocalDispatcher(E)
    assert bank.combined_impl(torch.zeros(1, D)) == impl

    def run(fn):
        x = torch.randn(T, D, generator=torch.Generator().manual_seed(0)).requires_grad_()
        for p in [w, *bank.parameters()]:
            p.grad = None
        torch.manual_seed(7)  # the same dropout mask on every path
        y = fn(x)
        y.backward(gy)
        return [y.detach(), x.grad, w.grad.clone()] + [p.grad.clone() for p in bank.parameters()]

    def separate(x):
        x_ND, counts_E, plan = d.dispatch(x, ids)
        return d.combine(bank(x_ND, counts_E), w, plan)

    fused = run(lambda x: d.dispatch_compute_combine(x, ids, w, bank, impl))
    for a, b in zip(fused, run(separate)):
        torch.testing.assert_close(a, b)
    if p_drop == 0:
        for a, b in zip(fused, run(lambda x: reference_moe(x, ids, w, bank))):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("router_name,K", [("switch", 1), ("gshard", 2)])
def test_layer_keeps_dense_ffn_activations_only(router_name, K):
    """What the MoE layer keeps for backward: a dense FFN of the same active width keeps its
    input and its hidden activation (D + F floats per token); the layer keeps its input, K
    hidden rows per token and a few scalars per slot and token (the router's probabilities:
    E floats). The separate dispatch -> bank -> combine path (``fuse_dispatch = False``) keeps
    the gathered rows and the expert outputs on top: 2 K D floats per token more."""
    torch.manual_seed(0)
    T, D, F, E = 256, 32, 128, 4
    router = build_router(router_cfg(router_name, moe_expert_count=E, moe_capacity_factor=INF), D).train()
    bank = ExpertBank(E, D, F, impl="fused")
    layer = MoELayer(router, bank).train()
    x = torch.randn(T, D, requires_grad=True)
    y, fused_bytes = _saved_bytes(lambda: layer(x), layer.parameters())
    dense_bytes = 4 * T * (D + K * F)
    # input + K hidden rows + the router's (T, E) probabilities and masks and per-slot scalars
    # (gshard at E=4: 31 floats per token; the gathered rows alone would be 2 K D = 128)
    assert fused_bytes <= dense_bytes + 4 * T * (4 * E + 16 * K)
    bank.fuse_dispatch = False
    y_sep, sep_bytes = _saved_bytes(lambda: layer(x), layer.parameters())
    torch.testing.assert_close(y, y_sep)
    assert sep_bytes - fused_bytes >= 4 * T * 2 * K * D * 0.95


def test_fused_combine_with_every_slot_dropped_keeps_parameters_in_graph():
    E, D = 3, 4
    bank = ExpertBank(E, D, 8, impl="fused")
    x = torch.randn(6, D, requires_grad=True)
    ids = torch.full((6, 1), -1)
    y = LocalDispatcher(E).dispatch_compute_combine(x, ids, torch.ones(6, 1), bank, "fused")
    assert torch.equal(y, torch.zeros(6, D))
    y.sum().backward()
    assert all(p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)) for p in bank.parameters())


@pytest.mark.parametrize("impl", ["fused", "grouped_mm"])
def test_fused_base_sublayer_equals_separate_steps(impl):
    """BASE's one-sublayer expert f_e(x) - x = FFN_e(LN_e(x)) through the fused gather -> LN ->
    FFN -> combine (the LayerNorm recomputed in backward) against the separate dispatch ->
    BaseSublayerBank -> combine: output and the gradients of x, the gate weights, the
    LayerNorm's and the FFN's parameters; one expert gets no rows, some slots are dropped."""
    from moe_plugin.experts import BaseSublayerBank

    torch.manual_seed(4)
    T, D, F, E = 33, 8, 16, 4
    bank = BaseSublayerBank(E, D, F, 1, impl=impl).train()
    with torch.no_grad():
        for p in bank.parameters():
            p.normal_()
    ids = torch.randint(0, E, (T, 1))
    ids[ids == 2] = 1
    ids[::5] = -1
    w = torch.rand(T, 1, requires_grad=True)
    gy = torch.randn(T, D)
    d = LocalDispatcher(E)
    assert bank.combined_impl(torch.zeros(1, D)) == impl

    def run(fn):
        x = (3 * torch.randn(T, D, generator=torch.Generator().manual_seed(0)) + 1).requires_grad_()
        for p in [w, *bank.parameters()]:
            p.grad = None
        fn(x).backward(gy)
        return [fn(x).detach(), x.grad, w.grad.clone()] + [p.grad.clone() for p in bank.parameters()]

    def separate(x):
        x_ND, counts_E, plan = d.dispatch(x, ids)
        return d.combine(bank(x_ND, counts_E), w, plan)

    for a, b in zip(run(lambda x: d.dispatch_compute_combine(x, ids, w, bank, impl)), run(separate)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert BaseSublayerBank(E, D, F, 2, impl=impl).combined_impl(torch.zeros(1, D)) is None
