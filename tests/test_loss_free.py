"""Auxiliary-loss-free balancing (moe_plugin/routing/loss_free.py): the selection rule, the
once-per-update bias step from the counts of the whole update (micro-batches and ranks),
resume, evaluation, the sequence-wise loss, and balance without any aux loss."""

import math

import pytest
import torch

from moe_plugin import config
from moe_plugin.routing import DROPPED, build_router
from moe_plugin.routing.loss_free import sequence_balance_loss, sign_update
from tests import ep_cases
from tests._ep_jobs import result, worker_results
from tests.helpers import router_cfg, token_info

D, E = 8, 4


def make(**kw):
    cfg = router_cfg("loss_free", moe_expert_count=E, **kw)
    config.validate(cfg)
    torch.manual_seed(0)
    return build_router(cfg, D)


def test_sign_update_hand_computed():
    # loads 6, 2, 2, 2 (mean 3): expert 0 overloaded -> down, the others up; a load equal to the mean stays
    b = sign_update(torch.zeros(4), torch.tensor([6, 2, 2, 2]), 0.5)
    assert b.tolist() == [-0.5, 0.5, 0.5, 0.5]
    b = sign_update(torch.tensor([0.1, 0.0, 0.0]), torch.tensor([3, 3, 3]), 0.5)
    assert b.tolist() == pytest.approx([0.1, 0.0, 0.0])


@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
@pytest.mark.parametrize("k", [1, 2])
def test_bias_selects_but_does_not_weight(score, k):
    r = make(moe_top_k=k, moe_router_score_function=score).eval()
    x = torch.randn(7, D)
    logits = x @ r.gate.weight.t()
    s = torch.sigmoid(logits) if score == "sigmoid" else torch.softmax(logits, -1)
    bias = torch.tensor([0.0, 5.0, -5.0, 0.0])  # expert 1 always chosen, expert 2 never
    r.expert_bias_E.copy_(bias)
    out = r(x)
    for t in range(7):
        order = sorted(range(E), key=lambda e: -(s[t, e] + bias[e]).item())[:k]
        assert out.expert_ids_TK[t].tolist() == order
        w = torch.stack([s[t, e] for e in order])
        if score == "sigmoid" and k > 1:
            w = w / w.sum()
        torch.testing.assert_close(out.weights_TK[t], w)
    assert (out.expert_ids_TK[:, 0] == 1).all() and not (out.expert_ids_TK == 2).any()


def test_counts_only_in_training_and_not_in_a_recompute():
    r = make()
    x = torch.randn(9, D)
    r.set_num_updates(0)
    r.eval()
    r(x)
    assert int(r.pending_load_E.sum()) == 0
    r.train()
    r(x)
    assert int(r.pending_load_E.sum()) == 9
    with r.replaying(r.recompute_state(None)):
        r(x)
    assert int(r.pending_load_E.sum()) == 9


def test_padding_is_not_counted():
    r = make().train()
    ids = torch.randint(4, 50, (2, 5))
    ids[1, 3:] = 1
    r(torch.randn(10, D), tokens=token_info(ids))
    assert int(r.pending_load_E.sum()) == 8


def test_one_step_per_update_from_every_micro_batch():
    """Two micro-batches of one update: the bias moves once, from their summed counts."""
    r = ep_cases.build_update_router(rate=0.25)
    xs = [ep_cases.update_inputs(0, m) for m in range(2)]
    r.set_num_updates(0)
    counts = torch.zeros(E, dtype=torch.long)
    for x in xs:
        out = r(x)
        counts += torch.bincount(out.expert_ids_TK.reshape(-1), minlength=E)
        r.set_num_updates(0)  # fairseq calls it before every micro-batch: no step inside an update
        assert torch.equal(r.expert_bias_E, torch.zeros(E))
    r.set_num_updates(1)
    expected = 0.25 * torch.sign(counts.double().mean() - counts.double())
    torch.testing.assert_close(r.expert_bias_E, expected.float())
    assert counts.max() > counts.min()  # the skewed input makes the step do something


@pytest.mark.distributed
def test_update_freq_on_one_process_equals_ranks():
    """W gloo ranks with --update-freq 1 (tests/_ep_worker.py) and one process with
    --update-freq W on the same micro-batches reach the same bias after every update."""
    W = ep_cases.W
    results = worker_results(W)
    one_process = ep_cases.bias_after_each_update(ep_cases.build_update_router(), list(range(W)))
    assert (one_process[-1] != 0).any()
    for rank in range(W):
        assert torch.equal(result(results, rank, "update_state/loss_free")["bias"], one_process)
    # and an update-freq-1 run on one micro-batch alone differs (the check can fail)
    alone = ep_cases.bias_after_each_update(ep_cases.build_update_router(), [0])
    assert not torch.equal(alone, one_process)


def test_resume_mid_run_equals_uninterrupted():
    """A checkpoint saved after update n holds the bias and that update's pending counts; a
    router loaded from it and continued reaches the uninterrupted bias."""
    full = ep_cases.bias_after_each_update(ep_cases.build_update_router(), [0, 1])
    r = ep_cases.build_update_router()
    for n in range(3):
        r.set_num_updates(n)
        for m in (0, 1):
            r(ep_cases.update_inputs(n, m))
    state = {k: v.clone() for k, v in r.state_dict().items()}
    resumed = ep_cases.build_update_router()
    resumed.set_num_updates(3)  # fairseq's loaders set the count before load_state_dict
    resumed.load_state_dict(state)
    biases = []
    for n in range(3, ep_cases.UPD_STEPS):
        resumed.set_num_updates(n)
        biases.append(resumed.expert_bias_E.clone())
        for m in (0, 1):
            resumed(ep_cases.update_inputs(n, m))
    resumed.set_num_updates(ep_cases.UPD_STEPS)
    biases.append(resumed.expert_bias_E.clone())
    assert torch.equal(torch.stack(biases), full[2:])


def test_evaluation_uses_the_bias_frozen():
    r = ep_cases.build_update_router()
    ep_cases.bias_after_each_update(r, [0, 1])
    frozen = r.expert_bias_E.clone()
    r.eval()
    for n in range(10, 13):
        r.set_num_updates(n)
        r(ep_cases.update_inputs(n, 0))
    assert torch.equal(r.expert_bias_E, frozen)


def load_ratio(router, x):
    with torch.no_grad():
        ids = router(x).expert_ids_TK.reshape(-1)
    counts = torch.bincount(ids[ids >= 0], minlength=E).double()
    return (counts.max() / counts.mean()).item()


def test_skewed_input_balances_without_any_aux_loss():
    """A frozen gate that sends most tokens to expert 0: the bias alone brings the load
    max/mean below 1.1 within 150 updates (rate 0.01), with no loss and no gradient."""
    r = ep_cases.build_update_router(rate=0.01)
    g = torch.Generator().manual_seed(11)

    def batch():
        x = torch.randn(256, D, generator=g)
        x[:, 0] += 2.0
        return x

    r.eval()
    start = load_ratio(r, batch())
    r.train()
    assert start > 2.0
    reached = None
    for n in range(150):
        r.set_num_updates(n)
        r(batch())
        r.eval()
        if reached is None and load_ratio(r, batch()) < 1.1:
            reached = n
        r.train()
    assert reached is not None, f"load max/mean still >= 1.1 after 150 updates (start {start:.2f})"
    r.eval()
    assert load_ratio(r, batch()) < 1.15


def slow_sequence_loss(scores_TE, chosen_TK, valid_T, B):
    T, E_ = scores_TE.shape
    K = chosen_TK.shape[1]
    losses = []
    for b in range(B):
        rows = [t for t in range(T) if t % B == b and valid_T[t]]
        if not rows:
            continue
        f = torch.zeros(E_)
        P = torch.zeros(E_)
        for t in rows:
            for k in range(K):
                if chosen_TK[t, k] >= 0:
                    f[chosen_TK[t, k]] += E_ / (K * len(rows))
            P += scores_TE[t] / scores_TE[t].sum() / len(rows)
        losses.append((f * P).sum())
    return torch.stack(losses).mean()


def test_sequence_balance_loss_against_a_loop():
    g = torch.Generator().manual_seed(2)
    B, L = 3, 5
    scores = torch.rand(B * L, E, generator=g)
    chosen = scores.topk(2, -1).indices
    valid = torch.ones(B * L, dtype=torch.bool)
    valid[[2, 5, 14]] = False  # rows t*B+b: padding of sequences 2 and 2 and 2
    chosen[~valid] = DROPPED
    torch.testing.assert_close(sequence_balance_loss(scores, chosen, valid, B), slow_sequence_loss(scores, chosen, valid, B))
    # uniform scores and a uniform choice give 1
    u = torch.full((8, 4), 0.5)
    ids = torch.arange(8).remainder(4).unsqueeze(1)
    assert sequence_balance_loss(u, ids, torch.ones(8, dtype=torch.bool), 1).item() == pytest.approx(1.0)


def test_sequence_loss_is_returned_only_when_asked_and_has_a_gradient():
    ids = torch.randint(4, 50, (2, 4))
    assert "seq_balance" not in make().train()(torch.randn(8, D), tokens=token_info(ids)).aux_losses
    r = make(moe_seq_aux_loss=True).train()
    out = r(torch.randn(8, D), tokens=token_info(ids))
    out.aux_losses["seq_balance"].backward()
    assert r.gate.weight.grad is not None and r.gate.weight.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="--moe-seq-aux-loss"):
        r(torch.randn(8, D))


@pytest.mark.parametrize(
    "kw,option",
    [
        ({"moe_router_score_function": "tanh"}, "--moe-router-score-function"),
        ({"moe_router_bias_update_rate": -1.0}, "--moe-router-bias-update-rate"),
        ({"moe_router_bias_update_rate": math.inf}, "--moe-router-bias-update-rate"),
    ],
)
def test_bad_options_are_refused(kw, option):
    with pytest.raises(ValueError, match=option):
        config.validate(router_cfg("loss_free", **kw))
