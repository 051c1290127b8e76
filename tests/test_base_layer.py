"""BASE layers (moe_plugin/base_layer.py) and the base_lm arch against slow obvious references
of the formula, fairseq's own decoder (layer positions) and argmax (greedy evaluation)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from fairseq import options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

import moe_plugin  # noqa: F401
from moe_plugin.base_layer import BaseLayer, BaseSublayerBank, base_layer_positions
from moe_plugin.moe_layer import MoELayer
from moe_plugin.routing import DROPPED
from moe_plugin.routing.balanced import BalancedRouter, balanced_assignment
from tests.conftest import USER_DIR
from tests.helpers import router_cfg, token_info

D, FF = 16, 24


def make_layer(E=4, S=1, seed=0, **opts):
    torch.manual_seed(seed)
    cfg = router_cfg("balanced", moe_expert_count=E, **opts)
    layer = BaseLayer(cfg, D, FF, S, "relu")
    # non-zero output weights so that the experts do something
    with torch.no_grad():
        for bank in layer.moe.experts.ffns:
            bank.w2_EFD.normal_(0, 0.3)
        layer.moe.experts.ln_weight_ESD.uniform_(0.5, 1.5)
        layer.moe.experts.ln_bias_ESD.normal_(0, 0.1)
        layer.moe.router.expert_centroids.normal_(0, 0.5)
    return layer


def reference_layer(layer, x_TD, expert_T):
    """Per token: y = alpha * f_e(h) + (1 - alpha) * h, alpha = sigmoid(h . w_e),
    f_e = S x [h + W2 relu(W1 LN(h))]; dropped (padding) tokens pass through."""
    bank = layer.moe.experts
    w_ED = layer.moe.router.expert_centroids
    out = []
    for t in range(x_TD.shape[0]):
        h, e = x_TD[t], int(expert_T[t])
        if e < 0:
            out.append(h)
            continue
        f = h
        for s, ffn in enumerate(bank.ffns):
            z = F.layer_norm(f, (D,), bank.ln_weight_ESD[e, s], bank.ln_bias_ESD[e, s], eps=1e-5)
            f = f + torch.relu(z @ ffn.w1_EDF[e] + ffn.b1_EF[e]) @ ffn.w2_EFD[e] + ffn.b2_ED[e]
        alpha = torch.sigmoid(h @ w_ED[e])
        out.append(alpha * f + (1 - alpha) * h)
    return torch.stack(out)


# ---------------------------------------------------------------------------- the expert bank


@pytest.mark.parametrize("S", [1, 2])
def test_sublayer_bank_vectorised_equals_loop(S):
    torch.manual_seed(0)
    bank = BaseSublayerBank(5, D, FF, S)
    with torch.no_grad():
        for ffn in bank.ffns:
            ffn.w2_EFD.normal_(0, 0.3)
    counts_E = torch.tensor([3, 0, 4, 1, 2])  # an expert with no rows
    x = torch.randn(int(counts_E.sum()), D, requires_grad=True)
    fast = bank(x, counts_E)
    grads_fast = torch.autograd.grad(fast.square().sum(), [x, *bank.parameters()])
    slow = bank.forward_loop(x, counts_E)
    grads_slow = torch.autograd.grad(slow.square().sum(), [x, *bank.parameters()])
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_fast, grads_slow):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_output_weights_start_at_zero():
    bank = BaseSublayerBank(3, D, FF, 2)
    for ffn in bank.ffns:
        assert (ffn.w2_EFD == 0).all() and (ffn.b2_ED != 0).any()  # fairseq zeroes the weight only
    with torch.no_grad():
        for ffn in bank.ffns:
            ffn.b2_ED.zero_()
    x = torch.randn(6, D)
    assert (bank(x, torch.tensor([2, 2, 2])) == 0).all()  # every expert is the identity


def test_expert_parameters_can_be_sharded_for_expert_parallelism():
    from moe_plugin.parallel import shard_experts

    bank = BaseSublayerBank(4, D, FF, 2)
    local = shard_experts(bank, 4, 2, 4)
    assert local.num_experts == 2 and local.ln_weight_ESD.shape == (2, 2, D)
    assert all(ffn.w1_EDF.shape[0] == 2 for ffn in local.ffns)


# ---------------------------------------------------------------------------- the layer


@pytest.mark.parametrize("S", [1, 2])
@pytest.mark.parametrize("training", [True, False])
def test_layer_equals_slow_reference_of_the_formula(S, training):
    layer = make_layer(E=4, S=S).train(training)
    B, L = 3, 8
    ids = torch.randint(4, 40, (B, L))
    ids[-1, -3:] = 1  # padding
    tok = token_info(ids)
    layer.moe.token_source = lambda: tok
    x = torch.randn(L, B, D, requires_grad=True)
    y, attn, extra = layer(x)
    assert y.shape == x.shape and attn is None and extra is None
    # the assignment the layer must use, from independent code
    x_TD = x.detach().reshape(-1, D)
    scores = x_TD @ layer.moe.router.expert_centroids.detach().t()
    valid = ~tok.pad_mask_T
    expected = torch.full((B * L,), DROPPED)
    expected[valid] = balanced_assignment(scores[valid]) if training else scores[valid].argmax(1)
    out = layer.moe.router(x_TD, tokens=tok)
    assert torch.equal(out.expert_ids_TK[:, 0], expected)
    ref = reference_layer(layer, x.reshape(-1, D), expected).reshape(L, B, D)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    params = [x, *layer.parameters()]
    g_fast = torch.autograd.grad(y.square().sum(), params, allow_unused=True)
    g_ref = torch.autograd.grad(ref.square().sum(), params, allow_unused=True)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # padding passes through unchanged and is not counted
    torch.testing.assert_close(y.reshape(-1, D)[~valid], x.reshape(-1, D)[~valid])
    assert int(layer.moe.last_stats["tokens_per_expert"].sum()) == int(valid.sum())


def test_training_balances_and_evaluation_is_greedy():
    layer = make_layer(E=4)
    x_TD = torch.randn(64, D) + 2.0 * layer.moe.router.expert_centroids[0].detach()  # all like expert 0
    layer.train()
    route = layer.moe.router(x_TD)
    assert (route.stats["tokens_per_expert"] == 16).all()
    assert route.stats["auction_rounds"] > 0 and route.stats["gap_bound"] >= 0
    layer.eval()
    route = layer.moe.router(x_TD)
    scores = x_TD @ layer.moe.router.expert_centroids.t()
    assert torch.equal(route.expert_ids_TK[:, 0], scores.argmax(1))  # greedy = argmax
    assert route.stats["tokens_per_expert"][0] > 16


def test_eval_balanced_option_and_incremental_is_greedy():
    layer = make_layer(E=4, base_eval_balanced=True).eval()
    x_TD = torch.randn(64, D) + 2.0 * layer.moe.router.expert_centroids[0].detach()
    assert (layer.moe.router(x_TD).stats["tokens_per_expert"] == 16).all()
    tok = dataclasses.replace(token_info(torch.randint(4, 40, (64, 1))), incremental=True)
    scores = x_TD @ layer.moe.router.expert_centroids.t()
    assert torch.equal(layer.moe.router(x_TD, tokens=tok).expert_ids_TK[:, 0], scores.argmax(1))


def test_warm_start_prices_are_not_model_state():
    router = make_layer(E=4).moe.router.train()
    assert "last_prices_E" not in router.state_dict()
    router(torch.randn(32, D))
    assert router.last_prices_E.shape == (4,)
    cold = make_layer(E=4, base_cold_start=True).moe.router.train()
    cold(torch.randn(32, D))
    assert cold.last_prices_E.numel() == 0


def test_centroids_orthogonal_init_with_gain():
    torch.manual_seed(0)
    router = BalancedRouter(router_cfg("balanced", moe_expert_count=4), 16)
    w = router.expert_centroids.detach()
    torch.testing.assert_close(w @ w.t(), 0.01 * torch.eye(4), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------- in the model

SMALL = ["--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "32", "--decoder-attention-heads", "2",
         "--decoder-input-dim", "16", "--decoder-output-dim", "16", "--tokens-per-sample", "16", "--dropout", "0"]


def build(data_bin, arch, *extra, user_dir=True):
    parser = options.get_training_parser()
    argv = [data_bin, "--task", "language_modeling", "--arch", arch, "--cpu", *SMALL, *map(str, extra)]
    if user_dir:
        argv += ["--user-dir", USER_DIR]
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(parser, argv))
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(0)
    return task, task.build_model(cfg.model)


@pytest.mark.parametrize("layers,num_base", [(4, 1), (5, 3), (2, 2), (6, 2)])
def test_base_layers_go_where_fairseq_puts_them(tiny_corpus, monkeypatch, layers, num_base):
    """fairseq's own decoder (with its BaseLayer replaced by a marker, which needs no process
    group) is the reference for the positions."""
    import fairseq.models.transformer.transformer_decoder as fairseq_decoder

    _, data_bin = tiny_corpus

    class Marker(torch.nn.Module):
        def __init__(self, cfg):
            super().__init__()

    monkeypatch.setattr(fairseq_decoder, "BaseLayer", Marker)
    _, dense = build(data_bin, "transformer_lm", "--decoder-layers", layers, "--base-layers", num_base, user_dir=False)
    expected = [i for i, m in enumerate(dense.decoder.layers) if isinstance(m, Marker)]
    monkeypatch.undo()
    _, model = build(data_bin, "base_lm", "--decoder-layers", layers, "--base-layers", num_base,
                     "--moe-expert-count", 3)
    ours = [i for i, m in enumerate(model.decoder.layers) if isinstance(m, BaseLayer)]
    assert ours == expected == base_layer_positions(layers, num_base)
    assert [i for i, _ in model.moe_layers()] == ours
    assert len(model.decoder.layers) == layers + num_base
    from fairseq.modules.base_layer import BaseLayer as FairseqBaseLayer

    assert not any(isinstance(m, FairseqBaseLayer) for m in model.modules())


def test_options_reach_the_base_layers(tiny_corpus):
    _, data_bin = tiny_corpus
    _, model = build(data_bin, "base_lm", "--decoder-layers", "2", "--base-layers", "2", "--base-sublayers", "3",
                     "--moe-expert-count", "5", "--moe-expert-ffn-dim", "12", "--base-shuffle", "1")
    base = [m for m in model.decoder.layers if isinstance(m, BaseLayer)]
    assert len(base) == 2
    for layer in base:
        assert layer.shuffle and layer.moe.num_experts == 5
        assert layer.moe.experts.num_sublayers == 3 and layer.moe.experts.ffns[0].ffn_dim == 12
        assert layer.moe.router.name == "balanced"
    # base_lm replaces no FFN by default; --moe-layers adds balanced-routed FFN experts too
    assert all(isinstance(m.fc1, torch.nn.Linear) for m in model.decoder.layers if not isinstance(m, BaseLayer))
    _, model = build(data_bin, "base_lm", "--decoder-layers", "2", "--moe-layers", "1", "--moe-expert-count", "4")
    kinds = [type(m).__name__ for _, m in model.moe_layers()]
    assert len(kinds) == 2 and all(isinstance(m, MoELayer) for _, m in model.moe_layers())


@pytest.mark.parametrize(
    "extra,option",
    [
        (["--base-sublayers", "0"], "--base-sublayers"),
        (["--base-layers", "-1"], "--base-layers"),
        (["--moe-top-k", "2"], "--moe-top-k"),
        (["--base-eps", "0"], "--base-eps"),
    ],
)
def test_bad_options_are_one_clear_error(tiny_corpus, extra, option):
    _, data_bin = tiny_corpus
    with pytest.raises(ValueError) as err:
        build(data_bin, "base_lm", "--decoder-layers", "2", *extra)
    assert str(err.value).startswith(option) and "allowed" in str(err.value), str(err.value)


def test_incremental_decoding_equals_full_forward(tiny_corpus):
    _, data_bin = tiny_corpus
    task, model = build(data_bin, "base_lm", "--decoder-layers", "2", "--base-layers", "2", "--moe-expert-count", "4")
    model.eval()
    src = torch.randint(4, len(task.dictionary), (2, 9))
    with torch.no_grad():
        full = model(src)[0]
        state = {}
        steps = [model.decoder(src[:, : t + 1], incremental_state=state)[0] for t in range(src.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
