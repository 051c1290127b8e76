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


@pytest.mark.parametrize("impl", ["grouped_mm", "bmm", "auto"])
def test_grouped_matmul_equals_loop_with_empty_groups(impl):
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([3, 0, 5, 0, 4])
    x = torch.randn(int(counts.sum()), 8, generator=g, requires_grad=True)
    w = torch.randn(5, 8, 12, generator=g, requires_grad=True)
    gy = torch.randn(int(counts.sum()), 12, generator=g)
    y = grouped_matmul(x, w, counts, impl)
    y.backward(gy)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y2 = grouped_matmul(x2, w2, counts, "loop")
    y2.backward(gy)
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(w.grad, w2.grad)
    assert w.grad[1].abs().max() == 0 and w.grad[3].abs().max() == 0


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
@pytest.mark.parametrize("impl", ["grouped_mm", "bmm"])
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
    # rows sorted by expert: expert 0 gets tokens 0 and 3, expert 1 token 1, expert 2 tokens 0 and 3
    assert plan.token_N.tolist() == [0, 3, 1, 0, 3]
    y = d.combine(x_sorted, w, plan)  # identity experts: y_t = sum_k w_tk * x_t
    torch.testing.assert_close(y, x * w.sum(1, keepdim=True))


def test_layer_keeps_last_aux_and_stats():
    torch.manual_seed(0)
    router = build_router(router_cfg("switch", moe_expert_count=4), 8)
    layer = MoELayer(router, ExpertBank(4, 8, 16))
    layer(torch.randn(5, 3, 8))
    assert set(layer.last_aux_losses) >= {"balance", "z"}
    assert layer.last_aux_losses["balance"].requires_grad
    assert int(layer.last_stats["tokens_per_expert"].sum()) <= 15
    assert int(layer.last_stats["num_tokens"]) == 15
