"""Expert parallelism builds only a rank's experts (moe_plugin/moe_layer.py, moe_plugin/experts.py).

For every registered router (a new one joins by registering) and BASE's own layer, rank r of
a W-rank expert-parallel build (built here in one process: the builder takes the placement
explicitly, no process group) is compared with a one-process build of the same seed:

* bytes: the rank's module (every parameter and buffer) holds the one-process module's
  shared bytes plus exactly E/W of its expert bytes: nothing of the other ranks' experts
  is allocated, not even for a moment inside a kept object (peak memory is not measurable
  reliably in a test; the bytes of the built module are);
* values: its experts equal the slice ``[r*E/W, (r+1)*E/W)`` of the one-process experts
  (per-expert generators: expert e's initial values do not depend on W or on the rank),
  its shared parameters equal the one-process ones;
* flags: exactly its expert parameters carry fairseq's ``param.expert``.
"""

import dataclasses

import pytest
import torch

from moe_plugin import config
from moe_plugin.base_layer import BaseLayer
from moe_plugin.dispatch import ExpertPlacement
from moe_plugin.dispatch.expert_parallel import ExpertParallelDispatcher
from moe_plugin.moe_layer import build_moe_layer
from tests.helpers import all_router_names, router_cfg, vocab_info

E, D, F = 8, 8, 16
#: BASE's own layer (balanced router over residual sublayers) beside the routers' layers
BASE_LAYER = "base_layer"


def layer_kinds():
    names = all_router_names()
    return names + ([BASE_LAYER] if "balanced" in names else [])


def kind_cfg(kind, expert_parallel, moe_seed):
    cfg = router_cfg("balanced" if kind == BASE_LAYER else kind, moe_expert_count=E, moe_seed=moe_seed)
    return dataclasses.replace(cfg, moe_expert_parallel=expert_parallel)


def build(kind, placement, moe_seed):
    """The MoE layer of ``kind`` holding the experts of ``placement``, under global seed 0."""
    cfg = kind_cfg(kind, placement.is_sharded, moe_seed)
    torch.manual_seed(0)
    if kind == BASE_LAYER:
        return BaseLayer(cfg, D, F, num_sublayers=2, vocab=vocab_info(), layer_index=1, placement=placement).moe
    return build_moe_layer(cfg, D, F, vocab=vocab_info(), layer_index=1, placement=placement)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def is_expert(name: str) -> bool:
    return name.startswith("experts.")


def skip_reason(kind):
    try:
        config.validate(kind_cfg(kind, True, None))
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize("moe_seed", [None, 5], ids=["seed-from-global-rng", "moe-seed"])
@pytest.mark.parametrize("W", [4, 2])
@pytest.mark.parametrize("kind", layer_kinds())
def test_a_rank_allocates_its_experts_only_and_they_equal_the_one_process_slice(kind, W, moe_seed):
    reason = skip_reason(kind)
    if reason:
        pytest.skip(f"{kind} refuses --moe-expert-parallel: {reason}")
    full = build(kind, ExpertPlacement(E), moe_seed)
    full_params = dict(full.named_parameters())
    full_expert_bytes = tensor_bytes(p for n, p in full_params.items() if is_expert(n))
    full_bytes = tensor_bytes(list(full.parameters()) + list(full.buffers()))
    assert full_expert_bytes > 0
    L = E // W
    for r in range(W):
        layer = build(kind, ExpertPlacement(E, W, r), moe_seed)
        assert isinstance(layer.dispatcher, ExpertParallelDispatcher)
        assert layer.dispatcher.expert_range == (r * L, (r + 1) * L)
        params = dict(layer.named_parameters())
        assert set(params) == set(full_params)
        expert_bytes = tensor_bytes(p for n, p in params.items() if is_expert(n))
        assert expert_bytes * W == full_expert_bytes, f"rank {r} holds {expert_bytes} expert bytes"
        # nothing else grew: the module's bytes are the shared ones plus this rank's experts
        assert tensor_bytes(list(layer.parameters()) + list(layer.buffers())) == \
            full_bytes - full_expert_bytes + expert_bytes
        for n, p in params.items():
            want = full_params[n][r * L:(r + 1) * L] if is_expert(n) else full_params[n]
            assert torch.equal(p, want), f"{n} of rank {r} is not the one-process build's {'slice' if is_expert(n) else 'value'}"
            assert getattr(p, "expert", False) == is_expert(n), n
        for n, b in layer.named_buffers():
            assert torch.equal(b, dict(full.named_buffers())[n]), n


def test_experts_do_not_depend_on_what_the_rest_of_the_model_drew():
    """With moe_seed set, a layer's experts are a function of (moe_seed, layer index) alone:
    the global RNG state before the build does not change them; another layer index or
    seed gives other experts."""
    cfg = router_cfg("switch", moe_expert_count=E, moe_seed=3)

    def experts(global_seed, layer_index=1, c=cfg):
        torch.manual_seed(global_seed)
        return build_moe_layer(c, D, F, layer_index=layer_index).experts.w1_EDF.detach()

    assert torch.equal(experts(0), experts(1))
    assert not torch.equal(experts(0), experts(0, layer_index=2))
    assert not torch.equal(experts(0), experts(0, c=dataclasses.replace(cfg, moe_seed=4)))
    # distinct experts of one layer get distinct values
    w = experts(0)
    assert all(not torch.equal(w[0], w[e]) for e in range(1, E))


def test_an_expert_count_that_does_not_divide_names_both_options():
    with pytest.raises(ValueError, match="--moe-expert-count.*--distributed-world-size"):
        ExpertPlacement(6, 4, 0)
    with pytest.raises(ValueError, match="rank 4"):
        ExpertPlacement(8, 4, 4)


def test_placement_maps_experts_to_ranks_like_a_brute_force_table():
    p = ExpertPlacement(12, 4, 2)
    owner = {e: w for w in range(4) for e in range(12) if w * 3 <= e < (w + 1) * 3}
    ids = torch.tensor([[0, 5, -1], [11, 6, 8]])
    want_dev = torch.tensor([[owner[int(e)] if e >= 0 else -1 for e in row] for row in ids])
    want_local = torch.tensor([[int(e) - 3 * owner[int(e)] if e >= 0 else -1 for e in row] for row in ids])
    assert torch.equal(p.device_of(ids), want_dev)
    assert torch.equal(p.local(ids), want_local)
    assert (p.first, p.stop, p.per_rank) == (6, 9, 3)
    assert [p.for_rank(w).first for w in range(4)] == [0, 3, 6, 9]
