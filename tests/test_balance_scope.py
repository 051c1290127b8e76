"""``--moe-balance-scope`` (moe_plugin/routing/_softmax.py ``first_choice_frequencies``): the
Switch balance loss with the frequencies of this micro-batch or of the global batch (every
rank, and the update's micro-batches so far), against the loss computed by hand from the
concatenated batch (moe_plugin.losses.switch_balance_loss with explicit frequencies)."""

import pytest
import torch

from moe_plugin import config
from moe_plugin.losses import switch_balance_loss
from tests import ep_cases
from tests._ep_jobs import result, worker_results
from tests.helpers import router_cfg

E = ep_cases.UPD_E


def first_choices(router, x):
    """(probs, first choices) of the router's gate on x, computed outside the router."""
    with torch.no_grad():
        probs = torch.softmax(x @ router.gate.weight.t(), -1)
    return probs, probs.argmax(-1)


def hand_loss(router, x, xs_for_f):
    """E sum_e f_e P_e with P over ``x`` and f over the first choices of every batch in ``xs_for_f``."""
    ids = torch.cat([first_choices(router, z)[1] for z in xs_for_f])
    f = torch.bincount(ids, minlength=E).float() / ids.numel()
    probs = torch.softmax(x @ router.gate.weight.t(), -1)
    valid = torch.ones(x.shape[0], dtype=torch.bool)
    return switch_balance_loss(probs, probs.argmax(-1), valid, f_E=f)


def test_micro_scope_is_the_micro_batch_loss():
    r = ep_cases.build_scope_router("micro")
    x0, x1 = ep_cases.update_inputs(0, 0), ep_cases.update_inputs(0, 1)
    r.set_num_updates(0)
    r(x0)
    torch.testing.assert_close(r(x1).aux_losses["balance"], hand_loss(r, x1, [x1]))


def test_global_scope_over_the_update_so_far_then_reset():
    r = ep_cases.build_scope_router("global")
    x0, x1 = ep_cases.update_inputs(0, 0), ep_cases.update_inputs(0, 1)
    r.set_num_updates(0)
    torch.testing.assert_close(r(x0).aux_losses["balance"], hand_loss(r, x0, [x0]))
    r.set_num_updates(0)  # the second micro-batch of --update-freq 2
    global_1 = r(x1).aux_losses["balance"]
    torch.testing.assert_close(global_1, hand_loss(r, x1, [x0, x1]))
    assert not torch.allclose(global_1, hand_loss(r, x1, [x1]))  # the scope changes the loss
    r.set_num_updates(1)  # a new update starts afresh
    x2 = ep_cases.update_inputs(1, 0)
    torch.testing.assert_close(r(x2).aux_losses["balance"], hand_loss(r, x2, [x2]))
    r.eval()  # evaluation: this batch only, and nothing accumulates
    torch.testing.assert_close(r(x0).aux_losses["balance"], hand_loss(r, x0, [x0]))


def test_a_recompute_uses_the_recorded_frequencies():
    r = ep_cases.build_scope_router("global")
    x0, x1 = ep_cases.update_inputs(0, 0), ep_cases.update_inputs(0, 1)
    r.set_num_updates(0)
    r(x0)
    first = r(x1).aux_losses["balance"]
    state = r.recompute_state(None)
    counts = r._scope_counts.clone()
    with r.replaying(state):
        again = r(x1).aux_losses["balance"]
    torch.testing.assert_close(again, first)
    assert torch.equal(r._scope_counts, counts)  # nothing counted twice


@pytest.mark.distributed
def test_ranks_use_the_frequencies_of_every_rank():
    """2 gloo ranks, --update-freq 1: each rank's loss and gate gradient equal the loss with
    f over both ranks' micro-batches (hand-computed here); with --update-freq 2 on one
    process the last micro-batch has the same loss (earlier ones use the update so far)."""
    W = ep_cases.W
    results = worker_results(W)
    for step in range(2):
        xs = [ep_cases.update_inputs(step, m) for m in range(W)]
        for rank in range(W):
            res = result(results, rank, "balance_scope/global")
            ref = ep_cases.build_scope_router("global")
            ref.gate.weight.grad = None
            expected = hand_loss(ref, xs[rank], xs)
            expected.backward()
            torch.testing.assert_close(res[f"loss{step}"], expected.detach())
            torch.testing.assert_close(res[f"grad{step}"], ref.gate.weight.grad)
        one = ep_cases.build_scope_router("global")
        for m in range(W):
            loss, _ = ep_cases.scope_micro_batch(one, step, m)
        torch.testing.assert_close(loss, result(results, W - 1, "balance_scope/global")[f"loss{step}"])


@pytest.mark.parametrize("name", ["hash", "sam", "balanced", "loss_free", "smoe_dropout"])
def test_global_scope_is_refused_where_it_changes_nothing(name):
    with pytest.raises(ValueError, match="--moe-balance-scope"):
        config.validate(router_cfg(name, moe_expert_count=8, moe_balance_scope="global"))


def test_global_scope_is_accepted_by_the_switch_loss_routers():
    for name, extra in (("switch", {}), ("gshard", {}), ("hyper", {"hyper_balance_loss": True})):
        config.validate(router_cfg(name, moe_expert_count=8, moe_balance_scope="global", **extra))
    with pytest.raises(ValueError, match="--moe-balance-scope: 'batch'"):
        config.validate(router_cfg("switch", moe_balance_scope="batch"))
