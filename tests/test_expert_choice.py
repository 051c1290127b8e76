"""Expert-choice routing (moe_plugin/routing/expert_choice.py): against a slow obvious reference
(loop over experts, sort each column), hand-computed ties, capacity above the token count,
padding, gradients, the causality refusal (router, fairseq model, fairseq-eval-lm) and the
arch defaults through fairseq's command line."""

import math

import pytest
import torch

from moe_plugin import config
from moe_plugin.routing import DROPPED, TokenInfo, build_router
from moe_plugin.routing.expert_choice import expert_choice_mask
from tests.helpers import router_cfg, token_info

D = 8


def make(E=4, factor=2.0, eval_factor=None, seed=0, **kw):
    cfg = router_cfg("expert_choice", moe_expert_count=E, moe_capacity_factor=factor,
                     moe_eval_capacity_factor=factor if eval_factor is None else eval_factor, **kw)
    config.validate(cfg)
    torch.manual_seed(seed)
    return build_router(cfg, D)


def batch(B=3, L=7, pads=(0, 2, 5), seed=0):
    """(x (B*L, D), TokenInfo) in fairseq's T x B row order; sequence b ends with pads[b] padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 50, (B, L), generator=g)
    for b, p in enumerate(pads):
        if p:
            ids[b, L - p:] = 1
    return torch.randn(B * L, D, generator=g), token_info(ids)


def reference(x_TD, weight_ED, valid_T, factor):
    """Slow obvious expert choice: S = softmax(x W^T) in float64; for every expert, sort its
    column (largest score first, equal scores: lower row first) over the non-padding rows and
    take the first C = ceil(factor * T_valid / E) (at least 1)."""
    S = torch.softmax(x_TD.double() @ weight_ED.double().t(), dim=-1)
    T, E = S.shape
    rows = [t for t in range(T) if valid_T[t]]
    C = len(rows) if math.isinf(factor) else max(1, math.ceil(factor * len(rows) / E))
    ids = torch.full((T, E), DROPPED, dtype=torch.long)
    w = torch.zeros(T, E, dtype=torch.float64)
    for e in range(E):
        for t in sorted(rows, key=lambda t: (-float(S[t, e]), t))[:C]:
            ids[t, e] = e
            w[t, e] = S[t, e]
    return ids, w, C


@pytest.mark.parametrize("E,factor", [(4, 2.0), (4, 1.0), (3, 0.5), (4, 8.0), (2, float("inf")), (1, 1.0)])
@pytest.mark.parametrize("training", [True, False])
def test_matches_slow_reference(E, factor, training):
    r = make(E, factor).train(training)
    x, tok = batch()
    out = r(x, tokens=tok)
    valid = ~tok.pad_mask_T
    ids, w, C = reference(x, r.gate.weight.detach(), valid, factor)
    assert torch.equal(out.expert_ids_TK, ids)
    torch.testing.assert_close(out.weights_TK.double(), w, rtol=1e-5, atol=1e-6)
    # every expert takes exactly min(C, T_valid) tokens, never padding
    T_valid = int(valid.sum())
    assert (out.stats["tokens_per_expert"] == min(C, T_valid)).all()
    assert (out.expert_ids_TK[tok.pad_mask_T] == DROPPED).all()
    assert float(out.stats["capacity"]) == C
    # dropped_frac: the share of non-padding tokens no expert chose
    none_T = (ids[valid] < 0).all(dim=1)
    assert float(out.stats["dropped_frac"]) == pytest.approx(float(none_T.double().mean()))
    assert float(out.stats["experts_per_token"]) == pytest.approx(float((ids[valid] >= 0).sum()) / T_valid)
    assert set(out.aux_losses) == {"z"}  # no balance loss


def test_capacity_above_the_token_count_takes_every_token():
    """C = ceil(8 * 13 / 4) = 26 > 13 non-padding tokens: every expert takes all 13."""
    r = make(4, 8.0)
    x, tok = batch(B=3, L=5, pads=(0, 1, 1))
    out = r(x, tokens=tok)
    valid = ~tok.pad_mask_T
    assert int(valid.sum()) == 13 and float(out.stats["capacity"]) == 26
    assert (out.expert_ids_TK[valid] == torch.arange(4)).all()
    assert torch.equal(out.stats["tokens_per_expert"], torch.full((4,), 13))
    assert float(out.stats["dropped_frac"]) == 0.0


def test_ties_go_to_the_lower_row_hand_computed():
    """A zero gate: every score is 1/E. 6 rows, row 1 padding, E = 2, factor 1: T_valid = 5,
    C = ceil(5 / 2) = 3, so both experts take rows 0, 2, 3 (weight 1/2) and rows 4, 5 get
    no expert: dropped 2/5."""
    r = make(2, 1.0)
    with torch.no_grad():
        r.gate.weight.zero_()
    pad = torch.tensor([False, True, False, False, False, False])
    tok = TokenInfo(ids_T=torch.full((6,), 5), prev_ids_T=torch.full((6,), 5), positions_T=torch.arange(6),
                    pad_mask_T=pad)
    out = r(torch.randn(6, D), tokens=tok)
    want = torch.tensor([[0, 1], [-1, -1], [0, 1], [0, 1], [-1, -1], [-1, -1]])
    assert torch.equal(out.expert_ids_TK, want)
    assert torch.equal(out.weights_TK, 0.5 * (want >= 0).float())
    assert float(out.stats["dropped_frac"]) == pytest.approx(0.4)


def test_mask_takes_a_tensor_capacity_and_no_padding():
    g = torch.Generator().manual_seed(3)
    S = torch.rand(10, 3, generator=g)
    valid = torch.tensor([True] * 7 + [False] * 3)
    S[7:] = 5.0  # padding with the best scores is still never chosen
    for cap in (1, 4, 7, 9, torch.tensor(4)):
        m = expert_choice_mask(S, valid, cap)
        assert not m[~valid].any()
        assert (m.sum(0) == min(int(cap), 7)).all()
        for e in range(3):  # the chosen rows are the column's best among the valid
            best = torch.argsort(S[:7, e], descending=True, stable=True)[: min(int(cap), 7)]
            assert set(m[:, e].nonzero().flatten().tolist()) == set(best.tolist())


def test_combine_weights_carry_the_gate_gradient():
    """The weights are S[t, e] of the chosen pairs: their gradient reaches the gate as the
    reference's does (the choice itself has none)."""
    r = make(4, 2.0)
    x, tok = batch()
    out = r(x, tokens=tok)
    g_TE = torch.randn(out.weights_TK.shape, generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad((out.weights_TK * g_TE).sum(), [r.gate.weight])
    W = r.gate.weight.detach().double().requires_grad_(True)
    S = torch.softmax(x.double() @ W.t(), dim=-1)
    chosen = (out.expert_ids_TK >= 0).double()
    (want,) = torch.autograd.grad((S * chosen * g_TE.double()).sum(), [W])
    torch.testing.assert_close(grad.double(), want, rtol=1e-5, atol=1e-6)


def test_per_batch_routing_depends_on_other_tokens():
    """Expert choice is per batch: the same rows routed alone and inside a larger batch get
    different experts (the reason eval is refused). With factor inf they do not."""
    x, tok = batch(B=2, L=6, pads=(0, 0))
    for factor, differs in ((1.0, True), (float("inf"), False)):
        r = make(4, factor).eval()
        whole = r(x, tokens=tok).expert_ids_TK
        first = r(x[:6], tokens=TokenInfo(tok.ids_T[:6], tok.prev_ids_T[:6], tok.positions_T[:6],
                                          tok.pad_mask_T[:6])).expert_ids_TK
        assert (not torch.equal(whole[:6], first)) == differs


# ----------------------------------------------------------------------------------------
# causality: the refusal
# ----------------------------------------------------------------------------------------


def test_inference_is_refused_unless_allowed():
    x, tok = batch()
    r = make(4, 2.0)
    r(x, tokens=tok)  # training
    r.eval()(x, tokens=tok)  # fairseq-train's validation: allowed
    assert r.causal_refusal().startswith("expert_choice: refused: generation")
    with pytest.raises(ValueError, match="expert_choice: refused: .*prepared for inference.*tokens after t"):
        r.make_generation_fast_(name="decoder.layers.1.fc1.router")
    with pytest.raises(ValueError, match="expert_choice: refused"):  # also if the caller went on
        r(x, tokens=tok)
    # with the option: prepared and evaluated; generation stays refused (a step would route
    # among the current tokens only)
    ok = make(4, 2.0, expert_choice_allow_future_leak=True).eval()
    ok.make_generation_fast_(name="x")
    ok(x, tokens=tok)
    assert "even with --expert-choice-allow-future-leak" in ok.causal_refusal()
    # an infinite evaluation factor leaks nothing: allowed without the option
    causal = make(4, 2.0, eval_factor=float("inf")).eval()
    causal.make_generation_fast_(name="x")
    assert causal.causal_refusal() is None


@pytest.mark.parametrize("kw,option", [
    ({"moe_top_k": 2}, "--moe-top-k: 2 is not allowed for the expert_choice router"),
    ({"expert_choice_allow_future_leak": "yes"}, "--expert-choice-allow-future-leak: 'yes' is not allowed"),
    ({"moe_jitter_eps": 1.5}, "--moe-jitter-eps: 1.5 is not allowed"),
])
def test_bad_options_fail_at_build(kw, option):
    cfg = router_cfg("expert_choice", **kw)
    with pytest.raises(ValueError, match=option):
        config.validate(cfg)


# ----------------------------------------------------------------------------------------
# inside fairseq
# ----------------------------------------------------------------------------------------


def test_arch_defaults_through_the_command_line(tiny_corpus):
    """expert_choice_lm: factor 2.0 (the paper's EC-CF2); the evaluation factor follows the
    training factor unless given."""
    from tests.test_fairseq_integration import build

    _, data_bin = tiny_corpus
    for extra, want in (([], (2.0, 2.0)), (["--moe-capacity-factor", "1.0"], (1.0, 1.0)),
                        (["--moe-capacity-factor", "1.0", "--moe-eval-capacity-factor", "inf"], (1.0, math.inf))):
        _, _, model, _ = build(data_bin, "expert_choice_lm", "--moe-layers", "1", *extra)
        ((_, layer),) = model.moe_layers()
        assert (layer.router.capacity_factor, layer.router.eval_capacity_factor) == want
        assert layer.router.allow_future_leak is False


def test_hydra_config_gets_the_same_defaults(tiny_corpus, tmp_path):
    """``model._name: expert_choice_lm`` (fairseq-hydra-train's path): the evaluation factor
    follows the training factor there too."""
    from tests.test_fairseq_integration import build_hydra

    _, data_bin = tiny_corpus
    for model, want in (({}, (2.0, 2.0)), ({"moe_capacity_factor": 1.5}, (1.5, 1.5))):
        _, m = build_hydra(tmp_path, data_bin, {"_name": "expert_choice_lm", "moe_layers": "1", **model})
        ((_, layer),) = m.moe_layers()
        assert (layer.router.capacity_factor, layer.router.eval_capacity_factor) == want


def test_model_output_sees_future_tokens_and_decoding_is_refused(tiny_corpus):
    """The fairseq model in eval mode: changing the last half of every sequence changes the
    output at earlier positions (the leak the refusal is about); not with factor inf. Incremental
    decoding is refused without the option."""
    from tests.test_fairseq_integration import build

    _, data_bin = tiny_corpus
    g = torch.Generator().manual_seed(0)
    for factor, leaks in (("1.0", True), ("inf", False)):
        _, task, model, _ = build(data_bin, "expert_choice_lm", "--moe-layers", "0,1,2,3",
                                  "--moe-eval-capacity-factor", factor)
        model.eval()
        n = len(task.dictionary)
        src = torch.randint(4, n, (4, 10), generator=g)
        other = src.clone()
        other[:, 5:] = torch.randint(4, n, (4, 5), generator=g)
        with torch.no_grad():
            a, b = model(src)[0][:, :5], model(other)[0][:, :5]
            assert (not torch.allclose(a, b, atol=1e-6)) == leaks
            if leaks:
                with pytest.raises(ValueError, match="expert_choice: refused: generation"):
                    model.decoder(src[:, :1], incremental_state={})


@pytest.mark.e2e
def test_fairseq_eval_lm_refuses_unless_overridden(tiny_corpus, tmp_path_factory):
    """fairseq-eval-lm on the expert_choice_lm checkpoint test_e2e.py trains: refused with the
    reason; accepted with --model-overrides "{'expert_choice_allow_future_leak': True}" (what
    tests/_e2e_runs.py adds for this arch), and then its scores depend on --max-tokens (the
    batch), which test_eval_invariance.py therefore does not check for this arch."""
    from tests import _e2e_runs
    from tests.conftest import USER_DIR, eval_lm_loss, run_cli

    _, data_bin = tiny_corpus
    ckpt, _ = _e2e_runs.trained(tmp_path_factory, data_bin, "expert_choice_lm")
    proc = run_cli("eval_lm", data_bin, "--user-dir", USER_DIR, "--path", ckpt, "--cpu", "--num-workers", "0",
                   *_e2e_runs.EVAL_ARGS, "--max-tokens", "64", check=False)
    assert proc.returncode != 0
    assert "expert_choice: refused" in proc.stdout + proc.stderr
    assert "expert_choice_allow_future_leak" in _e2e_runs.with_arch_overrides(ckpt, [])[-1]
    runs = [_e2e_runs.eval_lm(data_bin, ckpt, *_e2e_runs.EVAL_ARGS, "--max-tokens", m) for m in ("64", "2048")]
    assert math.isfinite(eval_lm_loss(runs[0]))
    a, b = (_e2e_runs.word_scores(r) for r in runs)
    assert sorted(a) == sorted(b)
    assert max(abs(x - y) for i in a for x, y in zip(a[i], b[i])) > 1e-3
