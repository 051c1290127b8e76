"""The contract every registered router keeps (new routers are picked up automatically)."""

import pytest
import torch

from moe_plugin.routing import DROPPED, build_router
from tests.helpers import all_router_names, router_cfg, token_info, vocab_info

T_SEQ, B, D, E = 6, 4, 16, 8


def make(name, **kw):
    cfg = router_cfg(name, moe_expert_count=E, moe_capacity_factor=float("inf"),
                     moe_eval_capacity_factor=float("inf"), **kw)
    from moe_plugin import config

    config.validate(cfg)
    torch.manual_seed(0)
    return build_router(cfg, D, vocab=vocab_info(), layer_index=1)


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 50, (B, T_SEQ), generator=g)
    ids[-1, -2:] = 1  # two padding positions
    x = torch.randn(T_SEQ * B, D, generator=g)
    return x, token_info(ids)


@pytest.mark.parametrize("name", all_router_names())
@pytest.mark.parametrize("training", [True, False])
def test_output_contract(name, training):
    router = make(name)
    router.train(training)
    x, tok = inputs()
    out = router(x, tokens=tok)
    T = x.shape[0]
    K = out.expert_ids_TK.shape[1]
    assert out.expert_ids_TK.shape == (T, K) and out.weights_TK.shape == (T, K)
    assert out.expert_ids_TK.dtype == torch.long
    assert ((out.expert_ids_TK >= DROPPED) & (out.expert_ids_TK < E)).all()
    assert torch.isfinite(out.weights_TK).all()
    dropped = out.expert_ids_TK < 0
    assert (out.weights_TK[dropped] == 0).all()
    # a token never uses the same expert in two slots
    for t in range(T):
        kept = out.expert_ids_TK[t][out.expert_ids_TK[t] >= 0]
        assert kept.unique().numel() == kept.numel()
    tpe = out.stats["tokens_per_expert"]
    assert tpe.shape == (E,)
    # counts match the kept slots of non-padding tokens
    valid = ~tok.pad_mask_T
    ids_valid = out.expert_ids_TK[valid]
    assert torch.equal(tpe, torch.bincount(ids_valid[ids_valid >= 0], minlength=E))
    for name_, loss in out.aux_losses.items():
        assert loss.dim() == 0 and torch.isfinite(loss), name_
    for v in out.stats.values():
        assert not v.requires_grad


@pytest.mark.parametrize("name", all_router_names())
def test_eval_is_deterministic_and_state_dict_round_trips(name):
    router = make(name).eval()
    x, tok = inputs()
    a = router(x, tokens=tok)
    b = router(x, tokens=tok)
    assert torch.equal(a.expert_ids_TK, b.expert_ids_TK) and torch.equal(a.weights_TK, b.weights_TK)
    # a fresh router built under another global seed routes identically once loaded
    torch.manual_seed(1234)
    other = make(name).eval()
    torch.manual_seed(99)
    other.load_state_dict(router.state_dict())
    c = other(x, tokens=tok)
    assert torch.equal(a.expert_ids_TK, c.expert_ids_TK)
    torch.testing.assert_close(a.weights_TK, c.weights_TK)


@pytest.mark.parametrize("name", all_router_names())
def test_padding_is_not_routed(name):
    router = make(name).eval()
    x, tok = inputs()
    out = router(x, tokens=tok)
    assert (out.expert_ids_TK[tok.pad_mask_T] == DROPPED).all()
