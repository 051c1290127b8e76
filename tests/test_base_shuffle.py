"""BASE's token shuffle (--base-shuffle, moe_plugin/dispatch/shuffle.py) on 2 gloo ranks.

Both ranks run tests/_ep_worker.py (jobs ``shuffle_plan/*`` and ``shuffle_layer/*`` of
tests/ep_cases.py). The references are computed here, in one process: which rows each rank
must receive (from the permutations the ranks drew and the chunk rule written out again
below), and a one-process BASE layer holding all experts that routes each rank's received
tokens as one batch and puts the results back, with autograd over both ranks' inputs.
"""

import pytest
import torch

from moe_plugin.routing import TokenInfo
from tests import ep_cases
from tests._ep_jobs import result, worker_results

pytestmark = pytest.mark.distributed
W = ep_cases.W
D = ep_cases.SH_D


@pytest.fixture(scope="module")
def results():
    return worker_results(W)


def expected_chunks(V, rank):
    """fairseq's equal chunks when W divides V; the V mod W extra tokens go to ranks rank, rank+1, ..."""
    sizes = [V // W] * W
    for i in range(V % W):
        sizes[(rank + i) % W] += 1
    return sizes


def real_rows(tok):
    return torch.nonzero(~tok.pad_mask_T).squeeze(1)


def chunk(order, send, dst):
    start = sum(send[:dst])
    return order[start:start + send[dst]]


# ---------------------------------------------------------------------------- the plan


@pytest.mark.parametrize("case", list(ep_cases.SH_CASES))
def test_every_token_goes_to_its_chunk_and_comes_back_to_its_row(results, case):
    res = [result(results, r, f"shuffle_plan/{case}") for r in range(W)]
    toks = [ep_cases.shuffle_inputs(case, r)[1] for r in range(W)]
    for r in range(W):
        # a permutation of this rank's real tokens (padding stays), in chunks of the rule
        assert sorted(res[r]["order"].tolist()) == real_rows(toks[r]).tolist()
        assert res[r]["send"] == expected_chunks(len(res[r]["order"]), r)
        assert res[r]["recv"] == [res[src]["send"][r] for src in range(W)]
    for q in range(W):
        # rank q receives chunk q of every rank, grouped by source rank; rows marked (rank, row)
        rows = torch.cat([chunk(res[src]["order"], res[src]["send"], q) for src in range(W)])
        src_of = torch.cat([torch.full((res[src]["send"][q],), src) for src in range(W)])
        assert torch.equal(res[q]["rows"], torch.stack([src_of.float(), rows.float()], 1))
        ids = torch.cat([toks[src].ids_T[chunk(res[src]["order"], res[src]["send"], q)] for src in range(W)])
        pos = torch.cat([toks[src].positions_T[chunk(res[src]["order"], res[src]["send"], q)] for src in range(W)])
        assert torch.equal(res[q]["ids"], ids) and torch.equal(res[q]["positions"], pos)
    for r in range(W):
        T = toks[r].ids_T.numel()
        marked = torch.stack([torch.full((T,), float(r)), torch.arange(T, dtype=torch.float)], 1)
        real = ~toks[r].pad_mask_T
        # back through an identity layer: every token at its own row, padding rows 0
        assert torch.equal(res[r]["back"][real], marked[real]) and (res[r]["back"][~real] == 0).all()
        # the gradient of sum(received * w) reaches the row each received row came from
        grad = torch.zeros(T, 2)
        for q in range(W):
            offset = sum(res[s]["send"][q] for s in range(r))
            mine = chunk(res[r]["order"], res[r]["send"], q)
            grad[mine] = res[q]["w"][offset:offset + len(mine)]
        assert torch.equal(res[r]["grad"], grad)


def test_equal_token_counts_are_fairseqs_equal_chunks(results):
    """16 real tokens on each rank: 8 to each rank, every rank receives 16 (fairseq's regime)."""
    for r in range(W):
        res = result(results, r, "shuffle_plan/equal")
        assert res["send"] == [8, 8] and sum(res["recv"]) == 16
    # uneven: 13 and 12 real tokens; the ranks end up with 13 and 12 (or 12 and 13)
    recv = [sum(result(results, r, "shuffle_plan/uneven")["recv"]) for r in range(W)]
    assert sorted(recv) == [12, 13]


# ---------------------------------------------------------------------------- the layer


def _reference(case, plans, training=True):
    """One process, all E experts: rank q's received tokens (the rows the plans name) are one
    batch of a fresh-router BASE layer; results go back to their rows; autograd over both
    ranks' inputs. Returns (outputs per rank, input grads per rank, param grads, tokens per
    expert per rank)."""
    ref = ep_cases.build_shuffle_layer("local", shuffle=False).train(training)
    inputs = [ep_cases.shuffle_inputs(case, r) for r in range(W)]
    xs = [x.clone().requires_grad_(True) for x, _, _ in inputs]
    flat = [x.reshape(-1, D) for x in xs]
    deltas = [torch.zeros_like(f) for f in flat]
    tpe = []
    for q in range(W):
        parts = [chunk(plans[src]["order"], plans[src]["send"], q) for src in range(W)]
        rows = torch.cat([flat[src][parts[src]] for src in range(W)])
        toks = [inputs[src][1] for src in range(W)]
        tok_q = TokenInfo(
            ids_T=torch.cat([toks[s].ids_T[parts[s]] for s in range(W)]),
            prev_ids_T=torch.cat([toks[s].prev_ids_T[parts[s]] for s in range(W)]),
            positions_T=torch.cat([toks[s].positions_T[parts[s]] for s in range(W)]),
            pad_mask_T=torch.zeros(rows.shape[0], dtype=torch.bool),
            next_ids_T=torch.cat([toks[s].next_ids_T[parts[s]] for s in range(W)]),
        )
        ref.moe.router.last_prices_E = torch.zeros(0)  # each rank's router starts cold
        y_q = ref.moe(rows, tokens=tok_q)
        tpe.append(ref.moe.last_stats["tokens_per_expert"])
        for src, y in zip(range(W), torch.split(y_q, [len(p) for p in parts])):
            deltas[src] = deltas[src].index_add(0, parts[src], y)
    ys = [x + d.view_as(x) for x, d in zip(xs, deltas)]
    sum((y * out_w).sum() for y, (_, _, out_w) in zip(ys, inputs)).backward()
    grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    return [y.detach() for y in ys], [x.grad for x in xs], grads, tpe


def _unshuffled(case, training=True):
    """Each rank's own tokens through the one-process layer (no shuffle)."""
    ref = ep_cases.build_shuffle_layer("local", shuffle=False).train(training)
    out = []
    for r in range(W):
        x, tok, _ = ep_cases.shuffle_inputs(case, r)
        ref.moe.token_source = lambda tok=tok: tok
        ref.moe.router.last_prices_E = torch.zeros(0)
        with torch.no_grad():
            out.append(ref(x)[0])
    return out


@pytest.mark.parametrize("mode", ep_cases.SH_MODES)
@pytest.mark.parametrize("case", list(ep_cases.SH_CASES))
def test_shuffled_layer_equals_one_process_reference(results, case, mode):
    res = [result(results, r, f"shuffle_layer/{case}/{mode}") for r in range(W)]
    plans = [res[r]["plain"] for r in range(W)]
    ys, grad_xs, grads, tpe = _reference(case, plans)
    for r in range(W):
        torch.testing.assert_close(res[r]["plain"]["y"], ys[r], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(res[r]["plain"]["grad_x"], grad_xs[r], rtol=1e-5, atol=1e-5)
        # the stats describe the tokens this rank received
        assert torch.equal(res[r]["plain"]["tokens_per_expert"], tpe[r])
        assert res[r]["plain"]["num_tokens"] == sum(res[r]["plain"]["recv"])
    for name, g in grads.items():
        if mode == "expert_parallel" and name.startswith("moe.experts."):
            # each rank holds E/W experts; their gradient is divided by W (dispatch/expert_parallel.py)
            L = ep_cases.SH_E // W
            for r in range(W):
                torch.testing.assert_close(res[r]["plain"]["grads"][name] * W, g[r * L:(r + 1) * L],
                                           rtol=1e-5, atol=1e-5)
        else:  # what the data-parallel all-reduce sums
            torch.testing.assert_close(sum(res[r]["plain"]["grads"][name] for r in range(W)), g,
                                       rtol=1e-5, atol=1e-5)
    # the test can fail: without the shuffle the layer computes something else here
    plain = _unshuffled(case)
    assert max(float((ys[r] - plain[r]).abs().max()) for r in range(W)) > 1e-2


@pytest.mark.parametrize("mode", ep_cases.SH_MODES)
@pytest.mark.parametrize("case", list(ep_cases.SH_CASES))
def test_checkpointing_evaluation_and_random_numbers(results, case, mode):
    res = [result(results, r, f"shuffle_layer/{case}/{mode}") for r in range(W)]
    evals = _unshuffled(case, training=False)
    for r in range(W):
        plain, ckpt = res[r]["plain"], res[r]["checkpointed"]
        # activation checkpointing: the recompute reuses the forward's shuffle
        assert torch.equal(plain["order"], ckpt["order"])
        torch.testing.assert_close(ckpt["y"], plain["y"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ckpt["grad_x"], plain["grad_x"], rtol=1e-6, atol=1e-6)
        for name, g in plain["grads"].items():
            torch.testing.assert_close(ckpt["grads"][name], g, rtol=1e-6, atol=1e-6)
        # evaluation: no shuffle, greedy routing of this rank's own tokens
        assert not res[r]["eval_shuffled"]
        torch.testing.assert_close(res[r]["y_eval"], evals[r], rtol=1e-5, atol=1e-5)
        # a local generator: the global RNG is untouched; (seed, layer, rank, update, count)
        # fix the permutation, so a resumed update redraws it and the next forward does not
        assert res[r]["global_rng_untouched"]
        assert torch.equal(res[r]["resumed_order"], plain["order"])
        if len(plain["order"]) >= 4:
            assert not torch.equal(res[r]["second_order"], plain["order"])


def test_ranks_draw_different_permutations(results):
    orders = [result(results, r, "shuffle_layer/equal/local")["plain"]["order"] for r in range(W)]
    assert len(orders[0]) == len(orders[1]) == 16 and not torch.equal(orders[0], orders[1])


# ---------------------------------------------------------------------------- one process


def test_one_process_shuffle_is_a_no_op():
    """No process group (or one of size 1): the layer with --base-shuffle is the layer without."""
    x, tok, out_w = ep_cases.shuffle_inputs("uneven", 0)
    outs = []
    for shuffle in (True, False):
        layer = ep_cases.build_shuffle_layer("local", shuffle=shuffle).train()
        layer.moe.token_source = lambda: tok
        xx = x.clone().requires_grad_(True)
        y = layer(xx)[0]
        (y * out_w).sum().backward()
        outs.append((y.detach(), xx.grad))
        assert layer.last_shuffle is None
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
