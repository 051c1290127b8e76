"""The differentiable all-to-all and the expert-parallel dispatcher on 2 gloo ranks.

Both ranks run tests/_ep_worker.py once per session (tests/_ep_jobs.py); every reference
here is computed in this process from the same seeded inputs by brute force: which rows
land where, and the gradients of the whole two-rank computation by autograd in one process.
"""

import pytest
import torch

from tests import ep_cases
from tests._ep_jobs import result, worker_results

pytestmark = pytest.mark.distributed
W = ep_cases.W


@pytest.fixture(scope="module")
def results():
    return worker_results(W)


@pytest.mark.parametrize("case", list(ep_cases.A2A_SPLITS))
def test_all_to_all_forward_backward(results, case):
    splits = ep_cases.A2A_SPLITS[case]
    xs = [ep_cases.a2a_inputs(case, r)[0] for r in range(W)]
    ws = [ep_cases.a2a_inputs(case, r)[1] for r in range(W)]

    def block(src, dst):  # rows of rank src's send buffer going to rank dst
        start = sum(splits[src][:dst])
        return slice(start, start + splits[src][dst])

    def recv_block(src, dst):  # rows of rank dst's receive buffer coming from rank src
        start = sum(splits[s][dst] for s in range(src))
        return slice(start, start + splits[src][dst])

    for r in range(W):
        res = result(results, r, f"a2a/{case}")
        expected_y = torch.cat([xs[src][block(src, r)] for src in range(W)])
        assert torch.equal(res["y"], expected_y)
        expected_grad = torch.cat([ws[dst][recv_block(r, dst)] for dst in range(W)])
        assert torch.equal(res["grad"], expected_grad)


def _dispatch_reference(case):
    """Autograd in one process over both ranks' tokens and all experts."""
    A = ep_cases.disp_experts().requires_grad_(True)
    inputs = [ep_cases.disp_inputs(case, r) for r in range(W)]
    xs = [x.clone().requires_grad_(True) for x, _, _, _ in inputs]
    outs, total = [], 0.0
    for (x0, ids, wts, out_w), x in zip(inputs, xs):
        out = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for k in range(ids.shape[1]):
                e = int(ids[t, k])
                if e >= 0:
                    out[t] = out[t] + wts[t, k] * (x[t] @ A[e])
        outs.append(out)
        total = total + (out * out_w).sum()
    total.backward()
    return inputs, outs, xs, A


@pytest.mark.parametrize("case", list(ep_cases.DISP_CASES))
def test_dispatcher_matches_one_process(results, case):
    inputs, outs, xs, A = _dispatch_reference(case)
    L = ep_cases.DISP_E // W
    for r in range(W):
        res = result(results, r, f"dispatch/{case}")
        # rows reach the owner grouped by local expert, then by source rank, then slot order
        rows, counts = [], []
        for l in range(L):
            e = r * L + l
            n = 0
            for src in range(W):
                x, ids, _, _ = inputs[src]
                for s in range(ids.numel()):
                    if int(ids.reshape(-1)[s]) == e:
                        rows.append(x[s // ids.shape[1]])
                        n += 1
            counts.append(n)
        assert res["counts"].tolist() == counts
        expected_rows = torch.stack(rows) if rows else torch.zeros(0, ep_cases.DISP_D)
        assert torch.equal(res["rows"], expected_rows)
        torch.testing.assert_close(res["out"], outs[r].detach(), rtol=1e-6, atol=1e-6)
        grad_x = xs[r].grad if xs[r].grad is not None else torch.zeros_like(xs[r])  # no token routed
        torch.testing.assert_close(res["grad_x"], grad_x, rtol=1e-6, atol=1e-6)
        # an expert's gradient sums the tokens of every rank
        torch.testing.assert_close(res["grad_A"], A.grad[r * L:(r + 1) * L], rtol=1e-5, atol=1e-6)


def test_cases_exercise_zero_traffic():
    """The cases above do contain the degenerate traffic they claim to (guards the inputs)."""
    assert ep_cases.DISP_CASES["rank1_has_no_tokens"][1][0] == 0
    _, ids, _, _ = ep_cases.disp_inputs("rank0_sends_nothing_expert3_idle", 0)
    assert (ids < 0).all()
    _, ids1, _, _ = ep_cases.disp_inputs("rank0_sends_nothing_expert3_idle", 1)
    assert not (ids1 == 3).any()
    assert sum(map(sum, ep_cases.A2A_SPLITS["nothing_at_all"])) == 0
