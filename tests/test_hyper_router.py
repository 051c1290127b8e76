"""HyperRouter (`hyper`), SMoE-Dropout (`smoe_dropout`) and SMoE (`smoe`) routers: generated
router vs a slow reference, top-K softmax vs brute force, what is frozen and what learns, the
reference's initialisation, seeding (fairseq's --seed unless --moe-frozen-router-seed is
given), options, capacity, and evaluation at any K."""

import math

import pytest
import torch

from moe_plugin import config
from moe_plugin.moe_layer import build_moe_layer
from moe_plugin.routing import DROPPED, build_router
from moe_plugin.routing._topk import set_eval_top_k
from moe_plugin.utils import param_counts
from tests.helpers import router_cfg, token_info

D, E = 12, 6


def make(name, layer_index=1, **kw):
    kw.setdefault("moe_expert_count", E)
    cfg = router_cfg(name, **kw)
    config.validate(cfg)
    return build_router(cfg, D, layer_index=layer_index)


def batch(T=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, D, generator=g)


# --- the generated router ------------------------------------------------------------------


def slow_generate(router):
    """[W | b] = H(e) with explicit loops: h_j = relu(sum_q A_jq e_q + a_j), o_p = sum_j B_pj h_j + b_p,
    row e of the (E, D+1) reshape = [W_e1..W_eD, b_e]."""
    e = router.embedding_1Q[0].double()
    A, a = router.hypernet[0].weight.double(), router.hypernet[0].bias.double()
    B, b = router.hypernet[2].weight.double(), router.hypernet[2].bias.double()
    H, Q = A.shape
    h = [max(0.0, sum(float(A[j, q] * e[q]) for q in range(Q)) + float(a[j])) for j in range(H)]
    o = [sum(float(B[p, j]) * h[j] for j in range(H)) + float(b[p]) for p in range(B.shape[0])]
    W = torch.tensor([[o[ex * (D + 1) + d] for d in range(D)] for ex in range(E)], dtype=torch.float64)
    bias = torch.tensor([o[ex * (D + 1) + D] for ex in range(E)], dtype=torch.float64)
    return W, bias


@pytest.mark.parametrize("fp32", [True, False])
def test_generated_weight_and_bias_equal_hypernet_of_embedding(fp32):
    r = make("hyper", hyper_embed_dim=5, hyper_hidden_dim=7, moe_no_gating_fp32=not fp32)
    assert r.use_fp32 == fp32
    with torch.no_grad():  # non-zero biases so the reference checks them too
        r.hypernet[0].bias.normal_(0, 0.1)
        r.hypernet[2].bias.normal_(0, 0.1)
    W_ref, b_ref = slow_generate(r)
    W, b = r.generate()
    assert W.shape == (E, D) and b.shape == (E,)
    torch.testing.assert_close(W.double(), W_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.double(), b_ref, rtol=1e-5, atol=1e-6)
    x = batch(4)
    logits_ref = torch.stack([torch.stack([x[t].double() @ W_ref[ex] + b_ref[ex] for ex in range(E)]) for t in range(4)])
    torch.testing.assert_close(r.logits(x).double(), logits_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["hyper", "smoe_dropout", "smoe"])
@pytest.mark.parametrize("K", [1, 2, 4, E])
def test_top_k_weights_are_softmax_over_the_chosen_logits(name, K):
    r = make(name, moe_top_k=K).train()
    x = batch(30)
    out = r(x)
    logits = r.logits(x).detach().double()
    assert out.expert_ids_TK.shape == (30, K) and r.top_k == K
    for t in range(30):
        order = sorted(range(E), key=lambda ex: -float(logits[t, ex]))[:K]
        vals = [float(logits[t, ex]) for ex in order]
        z = sum(math.exp(v - vals[0]) for v in vals)
        want = [math.exp(v - vals[0]) / z for v in vals]
        assert out.expert_ids_TK[t].tolist() == order
        assert out.weights_TK[t].tolist() == pytest.approx(want, rel=1e-5, abs=1e-6)


# --- what learns and what is frozen ---------------------------------------------------------


def test_hypernet_gets_no_gradient_and_embedding_does():
    r = make("hyper", moe_top_k=3).train()
    x = batch(40).requires_grad_(True)
    out = r(x)
    g = torch.Generator().manual_seed(3)
    (out.weights_TK * torch.randn(out.weights_TK.shape, generator=g)).sum().backward()
    assert all(not p.requires_grad and p.grad is None for p in r.hypernet.parameters())
    assert r.embedding_1Q.requires_grad and r.embedding_1Q.grad is not None
    assert r.embedding_1Q.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert [n for n, p in r.named_parameters() if p.requires_grad] == ["embedding_1Q"]
    # frozen, but part of the state_dict (evaluation regenerates the same router)
    assert {"hypernet.0.weight", "hypernet.0.bias", "hypernet.2.weight", "hypernet.2.bias", "embedding_1Q"} <= set(
        r.state_dict())


def test_smoe_dropout_router_gets_no_gradient():
    r = make("smoe_dropout", moe_top_k=3).train()
    x = batch(40).requires_grad_(True)
    out = r(x)
    (out.weights_TK * torch.arange(3.0)).sum().backward()
    assert [p for p in r.parameters() if p.requires_grad] == []
    assert r.gate.weight.grad is None
    assert x.grad is not None and x.grad.abs().sum() > 0  # the input still learns through the weights
    assert "gate.weight" in r.state_dict()


def test_smoe_gate_is_a_trainable_linear_with_bias():
    r = make("smoe", moe_top_k=2).train()
    with torch.no_grad():  # non-zero bias so the brute force checks it
        r.gate.bias.normal_(0, 0.5)
    x = batch(30).requires_grad_(True)
    W, b = r.gate.weight.detach().double(), r.gate.bias.detach().double()
    want = torch.stack([torch.stack([x[t].detach().double() @ W[e] + b[e] for e in range(E)]) for t in range(30)])
    torch.testing.assert_close(r.logits(x).double(), want, rtol=1e-5, atol=1e-6)
    out = r(x)
    (out.weights_TK * torch.randn(out.weights_TK.shape, generator=torch.Generator().manual_seed(4))).sum().backward()
    assert r.gate.weight.grad.abs().sum() > 0 and r.gate.bias.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0
    assert set(out.aux_losses) == {"z"}  # no balance loss (CustomNaiveGate has none)


def test_frozen_parameters_are_left_out_of_an_optimizer_built_like_fairseq():
    # fairseq's Trainer._build_optimizer: filter(lambda p: p.requires_grad, model.parameters())
    layer = build_moe_layer(router_cfg("hyper", moe_expert_count=E), D, 8, layer_index=1)
    trainable = [p for p in layer.parameters() if p.requires_grad]
    ids = {id(p) for p in trainable}
    assert id(layer.router.embedding_1Q) in ids
    assert not any(id(p) in ids for p in layer.router.hypernet.parameters())
    opt = torch.optim.Adam(trainable, lr=0.1)
    before = {k: v.clone() for k, v in layer.router.state_dict().items()}
    layer.train()
    y = layer(batch(16))
    (y.pow(2).sum() + sum(v for v in layer.last_aux_losses.values())).backward()
    opt.step()
    after = layer.router.state_dict()
    for k in ("hypernet.0.weight", "hypernet.2.weight", "hypernet.2.bias"):
        assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before["embedding_1Q"], after["embedding_1Q"])


# --- seeding and initialisation --------------------------------------------------------------


@pytest.mark.parametrize("name,frozen", [("hyper", ["hypernet.0.weight", "hypernet.2.weight", "embedding_1Q"]),
                                         ("smoe_dropout", ["gate.weight"])])
def test_initialisation_ignores_the_global_rng(name, frozen):
    torch.manual_seed(0)
    a = make(name).state_dict()
    torch.manual_seed(12345)
    torch.rand(100)
    b = make(name).state_dict()
    other_layer = make(name, layer_index=3).state_dict()
    other_seed = make(name, moe_frozen_router_seed=7).state_dict()
    for k in frozen:
        assert torch.equal(a[k], b[k]), k
        assert not torch.equal(a[k], other_layer[k]), k
        assert not torch.equal(a[k], other_seed[k]), k


FROZEN = {"hyper": ["hypernet.0.weight", "hypernet.2.weight", "embedding_1Q"], "smoe_dropout": ["gate.weight"]}


@pytest.mark.parametrize("name", sorted(FROZEN))
def test_frozen_parts_follow_fairseqs_seed_unless_their_own_seed_is_given(name):
    def state(**kw):
        return make(name, **kw).state_dict()

    s3, s3_again, s4 = state(moe_seed=3), state(moe_seed=3), state(moe_seed=4)
    default, seed1 = state(), state(moe_seed=1)  # no seed known (outside fairseq): fairseq's default --seed 1
    fixed3, fixed4 = state(moe_seed=3, moe_frozen_router_seed=7), state(moe_seed=4, moe_frozen_router_seed=7)
    for k in FROZEN[name]:
        assert torch.equal(s3[k], s3_again[k]), k
        assert not torch.equal(s3[k], s4[k]), k
        assert torch.equal(default[k], seed1[k]), k
        assert torch.equal(fixed3[k], fixed4[k]) and not torch.equal(fixed3[k], s3[k]), k
        assert torch.equal(state(moe_seed=9, moe_frozen_router_seed=3)[k], s3[k]), k  # same seed, same draw


def test_frozen_routers_follow_fairseq_seed_and_survive_a_state_dict_round_trip(tiny_corpus):
    from tests.test_fairseq_integration import build

    data_bin = tiny_corpus[1]
    common = ["--moe-expert-count", "4", "--moe-top-k-schedule", "none"]

    def frozen(arch, *extra):
        _, _, model, _ = build(data_bin, arch, *common, *extra)
        # the random router tensors (the hypernetwork's biases are zeros whatever the seed)
        return model, {k: v for k, v in model.state_dict().items()
                       if ".router." in k and not k.endswith(("num_updates", "bias"))}

    for arch in ("hyper_lm", "smoe_dropout_lm"):
        m1, a = frozen(arch, "--seed", "1")
        _, a_again = frozen(arch, "--seed", "1")
        m2, b = frozen(arch, "--seed", "2")
        _, c = frozen(arch, "--seed", "2", "--moe-frozen-router-seed", "1")
        assert a and a.keys() == b.keys()
        assert all(torch.equal(a[k], a_again[k]) for k in a)
        assert all(not torch.equal(a[k], b[k]) for k in a), arch
        assert all(torch.equal(a[k], c[k]) for k in a), arch  # the explicit seed fixes them whatever --seed is
        # the checkpoint holds them: a model built under another seed routes as the saved one once loaded
        m2.load_state_dict(m1.state_dict())
        x = torch.randn(10, m1.decoder.embed_dim, generator=torch.Generator().manual_seed(0))
        for (_, l1), (_, l2) in zip(m1.moe_layers(), m2.moe_layers()):
            o1, o2 = l1.router.eval()(x), l2.router.eval()(x)
            assert torch.equal(o1.expert_ids_TK, o2.expert_ids_TK) and torch.equal(o1.weights_TK, o2.weights_TK)


def test_reference_initialisation_statistics():
    # the reference's train.py weights_init: every Linear N(0, --init_std 0.02), zero bias; the
    # HyperRouter embedding torch.randn, N(0, 1); hidden size 256 (HyperRouterGate's default)
    r = make("hyper", moe_expert_count=16)
    assert r.hypernet[0].weight.shape == (256, D) and r.hypernet[2].weight.shape == (16 * (D + 1), 256)
    for lin in (r.hypernet[0], r.hypernet[2]):
        assert lin.weight.std().item() == pytest.approx(0.02, rel=0.15)
        assert abs(lin.weight.mean().item()) < 0.005
        assert torch.equal(lin.bias, torch.zeros_like(lin.bias))
    assert r.embedding_1Q.shape == (1, D)
    big = make("hyper", moe_expert_count=16, hyper_embed_dim=4000)
    assert big.embedding_1Q.std().item() == pytest.approx(1.0, rel=0.1)
    # SMoE-Dropout: CustomNaiveGate (bias init 0, frozen by --freeze_gate) = a frozen N(0, 0.02) weight
    s = make("smoe_dropout", moe_expert_count=16, moe_top_k=1)
    assert s.gate.weight.shape == (16, D) and s.gate.bias is None
    assert s.gate.weight.std().item() == pytest.approx(0.02, rel=0.25)
    assert abs(s.gate.weight.mean().item()) < 0.01
    # SMoE: the same CustomNaiveGate, trainable, with its zero-initialised bias
    torch.manual_seed(0)
    m = make("smoe", moe_expert_count=64, moe_top_k=2)
    assert m.gate.weight.shape == (64, D) and m.gate.bias.shape == (64,)
    assert m.gate.weight.std().item() == pytest.approx(0.02, rel=0.15)
    assert torch.equal(m.gate.bias, torch.zeros(64))
    assert all(p.requires_grad for p in m.parameters())


def test_hyper_dimension_options():
    r = make("hyper", hyper_embed_dim=9, hyper_hidden_dim=21)
    assert r.embedding_1Q.shape == (1, 9)
    assert r.hypernet[0].weight.shape == (21, 9)
    assert r.hypernet[2].weight.shape == (E * (D + 1), 21)
    d = make("hyper")  # defaults: Q = model dim, H = 256 (the reference's runs)
    assert d.embedding_1Q.shape == (1, D) and d.hypernet[0].weight.shape == (256, D)
    z = make("hyper", hyper_hidden_dim=0)  # 0 = model dim
    assert z.hypernet[0].weight.shape == (D, D)


@pytest.mark.parametrize("option,value", [("hyper_embed_dim", -1), ("hyper_hidden_dim", -3)])
def test_bad_hyper_options_raise(option, value):
    cfg = router_cfg("hyper", moe_expert_count=E, **{option: value})
    with pytest.raises(ValueError, match=f"--{option.replace('_', '-')}: {value}"):
        config.validate(cfg)


# --- losses, capacity ------------------------------------------------------------------------


def test_no_balance_loss_by_default_and_switch_loss_as_an_option():
    x = batch(50)
    assert "balance" not in make("hyper", moe_top_k=2)(x).aux_losses
    assert "balance" not in make("smoe_dropout", moe_top_k=2)(x).aux_losses
    assert "balance" not in make("smoe", moe_top_k=2)(x).aux_losses
    r = make("hyper", moe_top_k=2, hyper_balance_loss=True)
    out = r(x)
    # brute force: E * sum_e f_e P_e, f over first choices, P = mean softmax over all experts
    probs = torch.softmax(r.logits(x).detach().double(), -1)
    first = probs.argmax(-1)
    f = torch.tensor([(first == ex).double().mean().item() for ex in range(E)], dtype=torch.float64)
    want = E * float((f * probs.mean(0)).sum())
    assert float(out.aux_losses["balance"]) == pytest.approx(want, rel=1e-5)
    out.aux_losses["balance"].backward()
    assert r.embedding_1Q.grad is not None and r.embedding_1Q.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["hyper", "smoe_dropout", "smoe"])
def test_default_never_drops_and_finite_capacity_is_honoured(name):
    ids = torch.randint(4, 40, (5, 8), generator=torch.Generator().manual_seed(1))
    ids[0, -3:] = 1  # padding
    tok = token_info(ids)
    x = batch(40)
    r = make(name, moe_top_k=3)
    assert math.isinf(r.capacity_factor) and math.isinf(r.eval_capacity_factor)
    out = r(x, tokens=tok)
    valid = ~tok.pad_mask_T
    assert (out.expert_ids_TK[valid] >= 0).all() and (out.expert_ids_TK[~valid] == DROPPED).all()
    assert float(out.stats["dropped_frac"]) == 0.0
    assert torch.allclose(out.weights_TK[valid].sum(-1), torch.ones(int(valid.sum())))
    tight = make(name, moe_top_k=3, moe_capacity_factor=0.5)
    out = tight(x, tokens=tok)
    cap = math.ceil(0.5 * 3 * int(valid.sum()) / E)
    assert int(out.stats["tokens_per_expert"].max()) <= cap
    assert float(out.stats["dropped_frac"]) > 0
    assert (out.weights_TK[out.expert_ids_TK < 0] == 0).all()


# --- evaluation at any K ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["hyper", "smoe_dropout", "smoe"])
def test_eval_k_changes_active_experts_output_and_param_count(name):
    cfg = router_cfg(name, moe_expert_count=E, moe_top_k=2)
    torch.manual_seed(0)
    layer = build_moe_layer(cfg, D, 8, layer_index=1).eval()
    x = batch(24)
    results = {}
    assert layer.router.top_k == E  # the default evaluation K: all experts
    for k in (1, 2, 4, E):
        assert set_eval_top_k(layer, k) == 1
        assert layer.router.top_k == k
        with torch.no_grad():
            y = layer(x)
        assert int(layer.last_stats["tokens_per_expert"].sum()) == k * 24
        assert float(layer.last_stats["top_k"]) == k
        total, active = param_counts(layer)
        n_exp = sum(p.numel() for p in layer.experts.parameters())
        assert active == total - round(n_exp * (1 - k / E))
        results[k] = y
    for k in (1, 4, E):
        assert not torch.allclose(results[k], results[2])
    # 0 = back to the training K; training ignores the evaluation K
    set_eval_top_k(layer, 0)
    assert layer.router.top_k == 2
    set_eval_top_k(layer, 4)
    assert layer.train().router.top_k == 2 and layer.eval().router.top_k == 4
    set_eval_top_k(layer, -1)
    assert layer.eval().router.top_k == E
    with pytest.raises(ValueError, match="--moe-eval-top-k: 7"):
        set_eval_top_k(layer, E + 1)
