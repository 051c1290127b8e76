"""BASE layers (moe_plugin/base_layer.py) and the base_lm arch against slow obvious references
of the formula, fairseq's own decoder (layer positions) and argmax (greedy evaluation)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from fairseq import options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

import moe_plugin  # noqa: F401
from moe_plugin.base_layer import BaseLayer
from moe_plugin.models.base_layers import base_layer_positions
from moe_plugin.experts import BaseSublayerBank
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


def sublayer_bank_loop(bank, x_ND, counts_E):
    """The slow obvious reference of BaseSublayerBank: a Python loop over experts and sublayers."""
    out = []
    n = int(counts_E.sum())
    for e, x in enumerate(torch.split(x_ND[:n], counts_E.tolist())):
        h = x
        for s, ffn in enumerate(bank.ffns):
            z = F.layer_norm(h, (bank.model_dim,), bank.ln_weight_ESD[e, s], bank.ln_bias_ESD[e, s], eps=1e-5)
            z = ffn.activation(z @ ffn.w1_EDF[e] + ffn.b1_EF[e])
            h = h + z @ ffn.w2_EFD[e] + ffn.b2_ED[e]
        out.append(h - x)
    out.append(x_ND.new_zeros(x_ND.shape[0] - n, bank.model_dim))  # the tail
    return torch.cat(out, 0)


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
    slow = sublayer_bank_loop(bank, x, counts_E)
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


def test_sublayer_init_matches_fairseqs_base_sublayer():
    """fairseq's BaseSublayer (LayerNorm, ff1, ff2 as nn.Linear, ff2.weight zeroed) is the
    reference: LayerNorm ones/zeros, ff2's weight zero, every other weight and bias uniform
    with nn.Linear's bound 1/sqrt(fan_in) (compared by range and spread on large layers)."""
    import argparse

    from fairseq.modules.base_layer import BaseSublayer

    Dm, Fm, E = 64, 256, 8
    torch.manual_seed(0)
    theirs = BaseSublayer(argparse.Namespace(decoder_embed_dim=Dm, decoder_ffn_embed_dim=Fm, activation_fn="relu"))
    ours = BaseSublayerBank(E, Dm, Fm, 1)
    bank = ours.ffns[0]
    assert (ours.ln_weight_ESD == 1).all() and (ours.ln_bias_ESD == 0).all()
    assert (theirs.norm.weight == 1).all() and (theirs.norm.bias == 0).all()
    assert (theirs.ff2.weight == 0).all() and (bank.w2_EFD == 0).all()
    for mine, ref in ((bank.w1_EDF, theirs.ff1.weight), (bank.b1_EF, theirs.ff1.bias), (bank.b2_ED, theirs.ff2.bias)):
        ref = ref.detach()
        assert abs(float(mine.abs().max()) / float(ref.abs().max()) - 1) < 0.05
        assert abs(float(mine.std()) / float(ref.std()) - 1) < 0.15
        assert abs(float(mine.mean())) < 0.1 * float(ref.abs().max())


def test_a_bank_of_some_experts_is_the_slice_of_the_full_bank():
    """Expert parallelism builds only a rank's experts: a bank of experts 2..3 of 4 holds two
    experts (every parameter with the expert dimension first) equal to the full bank's slice
    of the same seed (tests/test_expert_allocation.py checks every arch's layer)."""
    full = BaseSublayerBank(4, D, FF, 2, seed=11)
    local = BaseSublayerBank(2, D, FF, 2, first_expert=2, seed=11)
    assert local.num_experts == 2 and local.ln_weight_ESD.shape == (2, 2, D)
    assert all(ffn.w1_EDF.shape[0] == 2 for ffn in local.ffns)
    full_params = dict(full.named_parameters())
    for name, p in local.named_parameters():
        assert torch.equal(p, full_params[name][2:4]), name


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
    # the router's state before the forward (the warm-start prices): the router is asked
    # again below from the same state, so it routes as the layer's forward did
    state0 = {n: b.clone() for n, b in layer.moe.router.named_buffers()}
    y, attn, extra = layer(x)
    assert y.shape == x.shape and attn is None and extra is None
    # the assignment the layer must use, from independent code
    x_TD = x.detach().reshape(-1, D)
    scores = x_TD @ layer.moe.router.expert_centroids.detach().t()
    valid = ~tok.pad_mask_T
    expected = torch.full((B * L,), DROPPED)
    expected[valid] = balanced_assignment(scores[valid]) if training else scores[valid].argmax(1)
    for n, b in state0.items():
        setattr(layer.moe.router, n, b)
    out = layer.moe.router(x_TD, tokens=tok)
    assert torch.equal(out.expert_ids_TK[:, 0], expected)
    ref = reference_layer(layer, x.reshape(-1, D), expected).reshape(L, B, D)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    params = [x, *layer.parameters()]
    g_fast = torch.autograd.grad(y.square().sum(), params, allow_unused=True)
    g_ref = torch.autograd.grad(ref.square().sum(), params, allow_unused=True)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # no auxiliary loss; every real token is routed (no dropping)
    assert layer.moe.last_aux_losses == {} and bool((expected[valid] >= 0).all())
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


def test_eval_balanced_option_and_generation_refusal():
    """Balanced in evaluation reads the whole batch: generation refuses it (tests/test_generation.py
    runs the refusal through fairseq); the default greedy evaluation may generate."""
    layer = make_layer(E=4, base_eval_balanced=True).eval()
    x_TD = torch.randn(64, D) + 2.0 * layer.moe.router.expert_centroids[0].detach()
    assert (layer.moe.router(x_TD).stats["tokens_per_expert"] == 16).all()
    assert layer.moe.router.causal_refusal().startswith("--base-eval-balanced: refused for generation")
    assert make_layer(E=4).moe.router.causal_refusal() is None


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


def test_shuffle_default_is_fairseqs_transformer_lm_default(tiny_corpus):
    """fairseq's ``transformer_lm --base-layers 1`` shuffles (its dataclass default 1; fairseq's
    base_lm_architecture alone would say False); base_lm does the same, and --base-shuffle 0 turns it off."""
    _, data_bin = tiny_corpus
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [data_bin, "--task", "language_modeling", "--arch", "transformer_lm",
                                                "--base-layers", "1"])
    fairseq_default = bool(convert_namespace_to_omegaconf(args).model.base_shuffle)
    for extra, expected in (([], fairseq_default), (["--base-shuffle", "0"], False)):
        _, model = build(data_bin, "base_lm", "--decoder-layers", "2", *extra)
        assert [m.shuffle for m in model.decoder.layers if isinstance(m, BaseLayer)] == [expected]
    assert fairseq_default
    # the shuffle's generator follows fairseq's --seed (moe_seed)
    _, model = build(data_bin, "base_lm", "--decoder-layers", "2", "--seed", "5")
    assert [m.shuffle_seed for m in model.decoder.layers if isinstance(m, BaseLayer)] == [5]


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


# ---------------------------------------------------------------------------- fairseq's BaseLayer


def ours_with_fairseq_weights(E, centroids_ED, expert_weights):
    """moe_plugin's BaseLayer holding fairseq's weights: centroids, and per expert e and
    sublayer s fairseq's (norm.weight, norm.bias, ff1.weight, ff1.bias, ff2.weight, ff2.bias)."""
    from tests import ep_cases

    layer = BaseLayer(router_cfg("balanced", moe_expert_count=E), ep_cases.FS_D, ep_cases.FS_F, ep_cases.FS_S, "relu")
    bank = layer.moe.experts
    with torch.no_grad():
        layer.moe.router.expert_centroids.copy_(centroids_ED)
        for e, subs in enumerate(expert_weights):
            for s, (lw, lb, w1, b1, w2, b2) in enumerate(subs):
                bank.ln_weight_ESD[e, s] = lw
                bank.ln_bias_ESD[e, s] = lb
                bank.ffns[s].w1_EDF[e] = w1.t()
                bank.ffns[s].b1_EF[e] = b1
                bank.ffns[s].w2_EFD[e] = w2.t()
                bank.ffns[s].b2_ED[e] = b2
    return layer


def fairseq_names(E, S):
    """Our parameter (name, index) for each of fairseq's: expert e's sublayer s on rank e."""
    out = {}
    for s in range(S):
        out[f"expert_network.{s}.norm.weight"] = lambda o, e, s=s: o["moe.experts.ln_weight_ESD"][e, s]
        out[f"expert_network.{s}.norm.bias"] = lambda o, e, s=s: o["moe.experts.ln_bias_ESD"][e, s]
        out[f"expert_network.{s}.ff1.weight"] = lambda o, e, s=s: o[f"moe.experts.ffns.{s}.w1_EDF"][e].t()
        out[f"expert_network.{s}.ff1.bias"] = lambda o, e, s=s: o[f"moe.experts.ffns.{s}.b1_EF"][e]
        out[f"expert_network.{s}.ff2.weight"] = lambda o, e, s=s: o[f"moe.experts.ffns.{s}.w2_EFD"][e].t()
        out[f"expert_network.{s}.ff2.bias"] = lambda o, e, s=s: o[f"moe.experts.ffns.{s}.b2_ED"][e]
    return out


def brute_force_balanced(scores_TE):
    """(best assignment, best total, second-best total) over every balanced assignment (E = 2)."""
    import itertools

    T = scores_TE.shape[0]
    totals = []
    for first in itertools.combinations(range(T), T // 2):
        e_T = torch.ones(T, dtype=torch.long)
        e_T[list(first)] = 0
        totals.append((float(scores_TE.double().gather(1, e_T[:, None]).sum()), e_T))
    totals.sort(key=lambda t: -t[0])
    return totals[0][1], totals[0][0], totals[1][0]


@pytest.mark.distributed
def test_same_as_fairseqs_base_layer_on_two_ranks():
    """fairseq's BaseLayer (2 gloo ranks, one expert each, --base-shuffle 0: job
    ``fairseq_base`` of tests/ep_cases.py) against moe_plugin's BaseLayer with the same weights
    and E = 2 in one process, rank by rank: the same output and input gradient in training
    (balanced assignment; inputs with a unique optimum, checked by brute force, so libbase and
    our solver must agree) and in evaluation (greedy); the parameter gradients summed over
    ranks (what the all-reduce sums; fairseq keeps expert e's on rank e, unreduced)."""
    from tests import ep_cases
    from tests._ep_jobs import result, worker_results

    W = ep_cases.W
    results = worker_results(W)
    experts = [ep_cases.fairseq_expert_weights(e) for e in range(ep_cases.FS_E)]
    ours = ours_with_fairseq_weights(ep_cases.FS_E, ep_cases.fairseq_centroids(), experts)
    names = fairseq_names(ep_cases.FS_E, ep_cases.FS_S)
    for mode in ("train", "eval"):
        ours.train(mode == "train")
        ours.zero_grad(set_to_none=True)
        theirs = [result(results, r, "fairseq_base")[mode] for r in range(W)]
        for r in range(W):
            x0, out_w = ep_cases.fairseq_inputs(r)
            scores = x0.reshape(-1, ep_cases.FS_D) @ ep_cases.fairseq_centroids().t()
            best, top, second = brute_force_balanced(scores)
            assert top - second > 0.5  # a unique optimum, by a margin (0.9 and 1.7)
            if mode == "train":
                assert torch.equal(ours.moe.router(x0.reshape(-1, ep_cases.FS_D)).expert_ids_TK[:, 0], best)
            ours.moe.router.last_prices_E = torch.zeros(0)  # each rank solves its batch cold
            x = x0.clone().requires_grad_(mode == "train")
            y = ours(x)[0]
            (y * out_w).sum().backward()
            torch.testing.assert_close(theirs[r]["y"], y.detach(), rtol=1e-5, atol=1e-5)
            if mode == "train":
                torch.testing.assert_close(theirs[r]["grad_x"], x.grad, rtol=1e-5, atol=1e-5)
        grads = {n: p.grad for n, p in ours.named_parameters()}
        # fairseq's centroid row e gets its gradient (through alpha) on rank e; the rest is 0
        torch.testing.assert_close(sum(t["grads"]["expert_centroids"] for t in theirs),
                                   grads["moe.router.expert_centroids"], rtol=1e-5, atol=1e-5)
        for name, ours_of in names.items():
            for e in range(ep_cases.FS_E):
                torch.testing.assert_close(theirs[e]["grads"][name], ours_of(grads, e), rtol=1e-5, atol=1e-5)


@pytest.fixture
def one_process_group(tmp_path):
    """A 1-process gloo group (fairseq's BaseLayer calls torch.distributed even on one worker)."""
    import torch.distributed as dist
    from fairseq.distributed import utils as distributed_utils

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    if hasattr(distributed_utils.get_global_group, "_global_group"):  # fairseq caches the group
        del distributed_utils.get_global_group._global_group
    dist.destroy_process_group()


def test_one_worker_fairseq_base_layer_evaluates_as_ours_but_cannot_train(one_process_group):
    """One worker = one expert in fairseq. Evaluation: the same output and parameter
    gradients as moe_plugin's E = 1 layer, except at padding (fairseq routes it, moe_plugin
    passes it through). Training: fairseq's libbase assignment raises with one expert."""
    import argparse

    from fairseq.modules.base_layer import BaseLayer as FairseqBaseLayer

    from tests import ep_cases

    args = argparse.Namespace(decoder_embed_dim=ep_cases.FS_D, decoder_ffn_embed_dim=ep_cases.FS_F,
                              base_sublayers=ep_cases.FS_S, base_shuffle=False, activation_fn="relu")
    theirs = FairseqBaseLayer(args)
    centroid = ep_cases.fairseq_centroids()[:1]
    weights = ep_cases.fairseq_expert_weights(0)
    with torch.no_grad():
        theirs.expert_centroids.copy_(centroid)
        for sub, vals in zip(theirs.expert_network, weights):
            for p, v in zip((sub.norm.weight, sub.norm.bias, sub.ff1.weight, sub.ff1.bias, sub.ff2.weight,
                             sub.ff2.bias), vals):
                p.copy_(v)
    ours = ours_with_fairseq_weights(1, centroid, [weights]).eval()
    x, out_w = ep_cases.fairseq_inputs(0)
    y_theirs = theirs(x)[0]  # x does not require grad: fairseq's evaluation (greedy)
    (y_theirs * out_w).sum().backward()
    y_ours = ours(x)[0]
    (y_ours * out_w).sum().backward()
    torch.testing.assert_close(y_theirs, y_ours, rtol=1e-5, atol=1e-5)
    grads = {n: p.grad for n, p in ours.named_parameters()}
    torch.testing.assert_close(theirs.expert_centroids.grad, grads["moe.router.expert_centroids"], rtol=1e-5,
                               atol=1e-5)
    for name, ours_of in fairseq_names(1, ep_cases.FS_S).items():
        torch.testing.assert_close(dict(theirs.named_parameters())[name].grad, ours_of(grads, 0), rtol=1e-5,
                                   atol=1e-5)
    # padding: moe_plugin leaves it unchanged, fairseq computes the expert on it
    L, B = ep_cases.FS_SHAPE
    ids = torch.randint(4, 40, (B, L))
    ids[-1, -2:] = 1
    tok = token_info(ids)
    ours.moe.token_source = lambda: tok
    with torch.no_grad():
        y_pad = ours(x)[0].reshape(-1, ep_cases.FS_D)
    pad = tok.pad_mask_T
    torch.testing.assert_close(y_pad[~pad], y_theirs.detach().reshape(-1, ep_cases.FS_D)[~pad])
    assert torch.equal(y_pad[pad], x.reshape(-1, ep_cases.FS_D)[pad])
    assert not torch.allclose(y_theirs.detach().reshape(-1, ep_cases.FS_D)[pad], x.reshape(-1, ep_cases.FS_D)[pad])
    with pytest.raises(RuntimeError):
        theirs(x.clone().requires_grad_(True))  # training: libbase's auction needs two experts


def clustered_scores(T, E, seed):
    """T/E tokens per cluster, every cluster leaning to the low experts: greedy is unbalanced."""
    g = torch.Generator().manual_seed(seed)
    cluster_T = torch.randperm(T, generator=g) % E
    s_EE = torch.randn(E, E, generator=g) + torch.linspace(2, 0, E)
    return s_EE[cluster_T] + 0.05 * torch.randn(T, E, generator=g)


def scipy_balanced(a_TE, forbid=None):
    """Exact balanced optimum (every expert's column repeated T/E times, LAPJV); ``forbid``
    (t, e): token t may not go to expert e. Returns (expert_T, total)."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    T, E = a_TE.shape
    k = T // E
    cost = np.repeat(a_TE.double().numpy(), k, axis=1)
    if forbid is not None:
        cost[forbid[0], forbid[1] * k:(forbid[1] + 1) * k] = -1e9
    rows, cols = linear_sum_assignment(cost, maximize=True)
    expert_T = torch.empty(T, dtype=torch.long)
    expert_T[torch.from_numpy(rows)] = torch.from_numpy(cols // k)
    return expert_T, float(cost[rows, cols].sum())


@pytest.mark.parametrize("T,E", [(32, 4), (48, 4), (64, 4), (64, 8)])
def test_assignment_equals_fairseqs_where_the_optimum_is_unique(T, E):
    """solve_balanced against fairseq's ``BaseLayer.balanced_assignment`` (libbase) on the same
    scores. Where the optimum (scipy) is unique by a margin of at least 5 % of the score
    range (every other balanced assignment moves some token off its optimal expert; the
    cheapest such move is found by forbidding each token's expert in turn), both return it;
    elsewhere ours scores at least as high as fairseq's and within 0.1 % of the optimum."""
    import types

    from fairseq import libbase
    from fairseq.modules.base_layer import BaseLayer as FairseqBaseLayer

    from moe_plugin.routing.balanced import solve_balanced

    unique = 0
    for seed in range(12):
        a = clustered_scores(T, E, seed)
        best, top = scipy_balanced(a)
        margin = min(top - scipy_balanced(a, (t, int(best[t])))[1] for t in range(T))
        # fairseq's method, unbound (its instance needs a process group; it only uses self.cpp)
        perm = FairseqBaseLayer.balanced_assignment(types.SimpleNamespace(cpp=libbase), a.clone())[0]
        theirs = torch.empty(T, dtype=torch.long)
        theirs[perm] = torch.arange(E).repeat_interleave(T // E)
        ours = solve_balanced(a).expert_T
        assert not torch.equal(a.argmax(1), best)  # greedy is not the answer
        if margin >= 0.05 * float(a.max() - a.min()):
            unique += 1
            assert torch.equal(theirs, best) and torch.equal(ours, best), seed
        else:
            ours_total, theirs_total = total_score(a, ours), total_score(a, theirs)
            assert ours_total >= theirs_total - 1e-6 * abs(theirs_total), seed
            assert ours_total >= top - 1e-3 * abs(top), seed
    assert unique >= 1


def total_score(a_TE, expert_T):
    return float(a_TE.double().gather(1, expert_T[:, None]).sum())
