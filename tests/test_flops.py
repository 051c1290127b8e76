"""moe_plugin/tools/flops.py: active FLOPs per token by component, and parameters.

Two independent references:

* hand counts: for tiny models of known dims (D model dim, F FFN dim, L keys per query =
  --tokens-per-sample, V vocabulary, E experts, K experts per token) the arithmetic of every
  component is written out below from those dims alone (FLOPs = 2 x multiply-adds), and the
  parameters likewise;
* brute force: torch's FLOP counter (torch.utils.flop_counter.FlopCounterMode) counts the
  multiply-adds of one real forward in eval mode. Attention runs under the math SDPA backend,
  so its score / value products reach the counter as ``bmm`` (the fused CPU SDPA kernel has no
  FLOP formula and would count as 0), and ``torch._grouped_mm`` (MultiHash's segments on CPU)
  is given its formula here (2 x rows x D x F; the counter has none). Tolerance: exact (1e-9
  relative) after one stated difference: BASE's gate ``sigmoid(h . w_e)`` is a row-wise dot
  product, 2 D FLOPs per token that the counter sees as elementwise work (no FLOPs) and the
  report counts. The dispatch (sorting, gathering) is no FLOPs on either side.
"""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from moe_plugin.base_layer import BaseLayer
from moe_plugin.routing._topk import TopKSoftmaxRouter
from moe_plugin.tools import flops as F

# the tiny model: 2 decoder layers; MoE (where the arch has one) in layer 1 only
LAYERS, D, FFN, L, V, E = 2, 16, 32, 8, 50, 4
DIMS = ["--decoder-layers", LAYERS, "--decoder-embed-dim", D, "--decoder-ffn-embed-dim", FFN,
        "--decoder-attention-heads", 2, "--tokens-per-sample", L, "--dropout", 0]
MOE = ["--moe-expert-count", E, "--moe-layers", 1]
B = 3  # sequences in the brute-force forward; T = B * L tokens per forward
T = B * L
HYPER_H = 8  # --hyper-hidden-dim
TOPK = ["--moe-top-k-min", 1, "--moe-top-k-max", 3, "--moe-eval-top-k", 2]

# FLOPs per token of each component, by hand
ATTN_PROJ = 2 * 4 * D * D          # q, k, v, out projections of one layer
ATTN_SCORES = 2 * 2 * L * D        # Q K^T and A V, every query against L keys ("full")
ATTN_SCORES_CAUSAL = 2 * 2 * ((L + 1) / 2) * D
FFN_FLOPS = 2 * 2 * D * FFN        # fc1 + fc2 (= one expert FFN of the same size)
OUTPUT = 2 * D * V                 # the output projection to the vocabulary
GATE = 2 * D * E                   # a router's (D, E) gate
HYPERNET = 2 * (D * HYPER_H + HYPER_H * E * (D + 1))  # per forward: Linear(Q=D, H) + Linear(H, E (D + 1))
BASE_SUBLAYERS = 2
BASE_BLOCK = GATE + 2 * D + BASE_SUBLAYERS * FFN_FLOPS  # affinities, gate dot product, S sublayers
DENSE = LAYERS * (ATTN_PROJ + ATTN_SCORES + FFN_FLOPS) + OUTPUT
MOE_LAYER_BASE = LAYERS * (ATTN_PROJ + ATTN_SCORES) + FFN_FLOPS + OUTPUT  # without layer 1's FFN


def moe_total(k: float, router: float) -> float:
    return MOE_LAYER_BASE + k * FFN_FLOPS + router


# name -> (flags, expected eval FLOPs/token, expected train FLOPs/token, K eval, K train)
CASES = {
    "dense_lm": (["--arch", "dense_lm"], DENSE, DENSE, [], []),
    "switch_lm": (["--arch", "switch_lm", *MOE], moe_total(1, GATE), moe_total(1, GATE), [1], [1]),
    "gshard_lm": (["--arch", "gshard_lm", *MOE], moe_total(2, GATE), moe_total(2, GATE), [2], [2]),
    "sam_lm": (["--arch", "sam_lm", *MOE, "--sam-groups", 2, "--moe-top-k", 2],
               moe_total(2, GATE), moe_total(2, GATE), [2], [2]),
    "hash_lm": (["--arch", "hash_lm", *MOE, "--hash-type", "random"], moe_total(1, 0), moe_total(1, 0), [1], [1]),
    "multihash_lm": (["--arch", "hash_lm", *MOE, "--hash-type", "random", "--hash-multi", 2],
                     moe_total(1, 0), moe_total(1, 0), [1], [1]),
    "base_lm": (["--arch", "base_lm", "--moe-expert-count", E, "--base-sublayers", BASE_SUBLAYERS],
                DENSE + BASE_BLOCK, DENSE + BASE_BLOCK, [1], [1]),
    # the K schedule 1 -> 3 ends at 3 (training); evaluation at K = 2
    "hyper_lm": (["--arch", "hyper_lm", *MOE, *TOPK, "--hyper-hidden-dim", HYPER_H],
                 moe_total(2, GATE + HYPERNET / T), moe_total(3, GATE + HYPERNET / T), [2], [3]),
    "smoe_dropout_lm": (["--arch", "smoe_dropout_lm", *MOE, *TOPK],
                        moe_total(2, GATE), moe_total(3, GATE), [2], [3]),
}


def build(flags):
    model, _ = F.build_model([*map(str, DIMS), *map(str, flags)], vocab_size=V)
    return model


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: build(flags) for name, (flags, *_rest) in CASES.items()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_flops_match_the_hand_count(models, name):
    _, eval_flops, train_flops, k_eval, k_train = CASES[name]
    report = F.flops_per_token(models[name], L, tokens_per_batch=T, label=name)
    assert report.active_flops_per_token["eval"] == pytest.approx(eval_flops, rel=1e-12)
    assert report.active_flops_per_token["train"] == pytest.approx(train_flops, rel=1e-12)
    assert report.experts_per_token == {"eval": k_eval, "train": k_train}
    ev = report.components["eval"]
    assert ev["attention_proj"] == LAYERS * ATTN_PROJ and ev["attention_scores"] == LAYERS * ATTN_SCORES
    assert ev["output"] == OUTPUT and ev["embeddings"] == 0
    for mode in F.MODES:
        assert sum(report.components[mode].values()) == report.active_flops_per_token[mode]


def test_components_of_the_moe_archs(models):
    hyper = F.flops_per_token(models["hyper_lm"], L, tokens_per_batch=T).components
    assert hyper["train"]["experts"] == 3 * FFN_FLOPS and hyper["eval"]["experts"] == 2 * FFN_FLOPS
    assert hyper["eval"]["router"] == pytest.approx(GATE + HYPERNET / T)
    assert hyper["eval"]["dense_ffn"] == FFN_FLOPS  # layer 0
    # the per-forward work is amortised over the tokens of a forward
    one_seq = F.flops_per_token(models["hyper_lm"], L)  # default: one sequence (L tokens) per forward
    assert one_seq.tokens_per_batch == L and one_seq.per_forward_flops == HYPERNET
    assert one_seq.components["eval"]["router"] == pytest.approx(GATE + HYPERNET / L)
    base = F.flops_per_token(models["base_lm"], L).components["eval"]
    assert base["base_block"] == BASE_BLOCK and base["dense_ffn"] == LAYERS * FFN_FLOPS
    assert base["experts"] == 0 and base["router"] == 0
    hash_ = F.flops_per_token(models["hash_lm"], L).components["eval"]
    assert hash_["router"] == 0 and hash_["experts"] == FFN_FLOPS


def test_causal_attention_counts_the_keys_a_query_sees(models):
    report = F.flops_per_token(models["dense_lm"], L, attention="causal")
    assert report.components["eval"]["attention_scores"] == LAYERS * ATTN_SCORES_CAUSAL
    assert report.active_flops_per_token["eval"] == DENSE - LAYERS * (ATTN_SCORES - ATTN_SCORES_CAUSAL)


def test_parameters_by_hand(models):
    attn = 4 * (D * D + D)
    ln = 2 * D
    ffn = D * FFN + FFN + FFN * D + D
    layer = attn + 2 * ln + ffn
    # token embedding, output projection (not shared: the archs' default), layers, final LayerNorm
    dense = V * D + D * V + LAYERS * layer + ln
    r = F.flops_per_token(models["dense_lm"], L)
    assert r.total_params == dense and r.active_params == {"train": dense, "eval": dense}
    switch = dense - ffn + E * D + E * ffn  # layer 1: a (D, E) gate and E experts
    r = F.flops_per_token(models["switch_lm"], L)
    assert r.total_params == switch
    assert r.active_params == {"train": switch - (E - 1) * ffn, "eval": switch - (E - 1) * ffn}
    router = D + (D * HYPER_H + HYPER_H) + (HYPER_H * E * (D + 1) + E * (D + 1))  # embedding, hypernetwork
    hyper = dense - ffn + router + E * ffn
    r = F.flops_per_token(models["hyper_lm"], L)
    assert r.total_params == hyper
    assert r.active_params == {"train": hyper - (E - 3) * ffn, "eval": hyper - (E - 2) * ffn}


def test_counting_leaves_the_model_as_it_was(models):
    model = models["hyper_lm"]
    model.train()
    routers = [m for m in model.modules() if isinstance(m, TopKSoftmaxRouter)]
    for r in routers:
        r.set_num_updates(7)
    F.flops_per_token(model, L)
    assert all(m.training for m in model.modules())
    assert all(r._num_updates == 7 and int(r.num_updates) == 7 and r.top_k == 1 for r in routers)
    for r in routers:
        r.set_num_updates(0)
    model.eval()


def test_compare_active_flops_within_two_percent(models):
    dense = F.flops_per_token(models["dense_lm"], L, tokens_per_batch=T, label="dense_lm")
    switch = F.flops_per_token(models["switch_lm"], L, tokens_per_batch=T, label="switch_lm")
    gshard = F.flops_per_token(models["gshard_lm"], L, tokens_per_batch=T, label="gshard_lm")
    within, ratio = F.compare_active_flops(dense, switch)
    assert within and ratio == pytest.approx(moe_total(1, GATE) / DENSE)  # 1.012: the gate only
    within, ratio = F.compare_active_flops(dense, gshard)
    assert not within and ratio == pytest.approx(moe_total(2, GATE) / DENSE)  # a second expert FFN
    assert F.compare_active_flops(dense, switch, tolerance=0.01).within is False
    row = switch.format_row(dense)
    assert row.startswith("| switch_lm |") and f"{moe_total(1, GATE) / DENSE:.3f}x" in row
    assert "off by more" in gshard.format_row(dense)
    assert F.FlopsReport.header().splitlines()[0].count("|") == row.count("|") == len(F.FlopsReport.HEADER) + 1
    other = F.flops_per_token(models["switch_lm"], 2 * L, tokens_per_batch=T)
    with pytest.raises(ValueError, match="seq_len"):
        F.compare_active_flops(dense, other)
    with pytest.raises(ValueError, match="mode"):
        F.compare_active_flops(dense, switch, mode="test")


def test_bad_input_is_refused(models):
    with pytest.raises(ValueError, match="attention"):
        F.flops_per_token(models["dense_lm"], L, attention="sparse")
    with pytest.raises(ValueError, match="seq_len"):
        F.flops_per_token(models["dense_lm"], 0)
    with pytest.raises(ValueError, match="tokens_per_batch"):
        F.flops_per_token(models["dense_lm"], L, tokens_per_batch=0)
    with pytest.raises(ValueError, match="--vocab-size"):
        F.build_model(["--arch", "dense_lm"])


def _grouped_mm_flop(x_shape, w_shape, *args, out_shape=None, **kwargs):
    """torch._grouped_mm of (N, D) rows with (E, D, F) weights: every row times one D x F matrix."""
    return 2 * x_shape[0] * x_shape[1] * w_shape[-1]


def counted(model, x_BT):
    """Total FLOPs of one eval forward by torch's FLOP counter, and its per-module counts."""
    model.eval()
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(
            display=False, custom_mapping={torch.ops.aten._grouped_mm: _grouped_mm_flop}) as counter:
        model(x_BT)
    per_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    return counter.get_total_flops(), per_module


@pytest.mark.parametrize("name", sorted(CASES) + ["transformer_lm"])
def test_flops_match_torch_flop_counter(models, name):
    model = build(["--arch", "transformer_lm"]) if name == "transformer_lm" else models[name]
    x_BT = torch.randint(4, V, (B, L), generator=torch.Generator().manual_seed(0))  # no padding
    total, per_module = counted(model, x_BT)
    report = F.flops_per_token(model, L, tokens_per_batch=T)
    ev = report.components["eval"]
    base_layers = sum(isinstance(m, BaseLayer) for m in model.modules())
    # the one difference: BASE's gate, counted as the method's dot product (2 D) and computed as
    # the (T, E) products h W^T (2 D E, which the counter sees; module docstring)
    assert total == pytest.approx(T * (report.active_flops_per_token["eval"] + base_layers * (GATE - 2 * D)), rel=1e-9)
    attn = sum(v for k, v in per_module.items() if k.endswith(".self_attn"))
    assert attn == pytest.approx(T * (ev["attention_proj"] + ev["attention_scores"]), rel=1e-9)
    out = sum(v for k, v in per_module.items() if k.endswith(("decoder.output_projection", "decoder.project_out_dim")))
    assert out == pytest.approx(T * ev["output"], rel=1e-9)


def test_command_prints_the_breakdown_and_the_ratio(capsys):
    argv = ["--vocab-size", V, *DIMS, "--arch", "switch_lm", *MOE, "--baseline-arch", "dense_lm"]
    assert F.main(list(map(str, argv))) == 0
    out = capsys.readouterr().out
    assert "total (active)" in out and "experts per token" in out
    assert f"{moe_total(1, GATE) / DENSE:.3f}x" in out  # MoE options stripped for the baseline
