"""Expert parallelism == one process holding all experts, for every registered router.

Two gloo ranks (tests/_ep_worker.py, once per session) each hold E/W = 2 of E = 4 experts
and run their own micro-batch through an MoE layer in expert-parallel mode, then fairseq's
own LegacyDistributedDataParallel gradient reduction and fairseq's trainer scaling
(multiply by W / sample size). The reference here is one process holding all 4 experts
that runs the same two micro-batches (routing is per micro-batch, as it is per rank:
capacity, balance losses and BASE's assignment are computed over each rank's batch; see
moe_plugin/dispatch/expert_parallel.py), sums the two losses and divides the gradient by the
same sample size: what fairseq does with --update-freq 2 on one process. Router state that
evolves with the batches seen (BASE's warm-start prices of the assignment solver) is per
rank, as it is per process in local data-parallel mode: the reference restores it to the
initial state before each micro-batch, as each rank starts from it.

Compared: initial parameters (experts = the reference's slice), outputs in training and in
eval mode, aux losses, tokens per expert, the gradient of every shared parameter (equal on
both ranks) and of every expert (the two ranks' slices concatenated). Tolerance: float32,
rtol 1e-5 / atol 1e-6 (the expert weight gradient sums the same products in a different
order: one grouped matmul over both ranks' rows instead of two accumulated micro-batches).
"""

import pytest
import torch

from tests import ep_cases
from tests._ep_jobs import result, worker_results

pytestmark = pytest.mark.distributed
W = ep_cases.W
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def results():
    return worker_results(W)


def reset_router_state(layer, buffers):
    """Each rank's router starts from the initial state: restore every router buffer
    (BASE's warm-start prices are per rank, as in local data-parallel mode)."""
    for full_name, value in buffers.items():
        module_name, _, name = full_name.rpartition(".")
        setattr(layer.router.get_submodule(module_name) if module_name else layer.router, name, value.clone())


def reference(name):
    layer = ep_cases.build_router_layer(name, expert_parallel=False)
    params0 = {n: p.detach().clone() for n, p in layer.named_parameters()}
    buffers0 = {n: b.detach().clone() for n, b in layer.router.named_buffers()}
    layer.train()
    outs, auxes, tpes, total = [], [], [], 0.0
    for r in range(W):
        reset_router_state(layer, buffers0)
        loss, out, aux, tpe, _ = ep_cases.micro_batch_loss(layer, r)
        outs.append(out.detach())
        auxes.append({k: float(v) for k, v in aux.items()})
        tpes.append(tpe)
        total = total + loss
    total.backward()
    S = ep_cases.sample_size()
    grads = {n: p.grad / S for n, p in layer.named_parameters() if p.grad is not None}
    layer.eval()
    outs_eval = []
    with torch.no_grad():
        for r in range(W):
            reset_router_state(layer, buffers0)
            outs_eval.append(ep_cases.micro_batch_loss(layer, r)[1])
    return params0, outs, outs_eval, auxes, tpes, grads


@pytest.mark.parametrize("name", ep_cases.layer_names())
def test_expert_parallel_equals_one_process(results, name):
    skip = ep_cases.router_skip_reason(name)
    if skip:
        pytest.skip(f"{name} refuses --moe-expert-parallel with its arch defaults: {skip}")
    params0, outs, outs_eval, auxes, tpes, grads = reference(name)
    L = ep_cases.R_E // W
    ranks = [result(results, r, f"router/{name}") for r in range(W)]
    for r, res in enumerate(ranks):
        assert res["expert_range"] == [r * L, (r + 1) * L]
        for n, p in res["params"].items():
            expected = params0[n][r * L:(r + 1) * L] if n.startswith("experts.") else params0[n]
            assert torch.equal(p, expected), f"initial {n} differs on rank {r}"
        # exactly the expert parameters carry fairseq's `expert` attribute
        assert res["expert_flags"] == {n: n.startswith("experts.") for n in res["params"]}
        torch.testing.assert_close(res["out"], outs[r], rtol=RTOL, atol=ATOL, msg=f"train output, rank {r}")
        torch.testing.assert_close(res["out_eval"], outs_eval[r], rtol=RTOL, atol=ATOL, msg=f"eval output, rank {r}")
        assert res["aux"].keys() == auxes[r].keys()
        for k in auxes[r]:
            assert res["aux"][k] == pytest.approx(auxes[r][k], rel=RTOL, abs=ATOL), k
        assert torch.equal(res["tokens_per_expert"], tpes[r])
    assert set(ranks[0]["grads"]) == set(grads), "the same parameters receive a gradient"
    for n, g in grads.items():
        if n.startswith("experts."):
            got = torch.cat([res["grads"][n] for res in ranks])
        else:
            got = ranks[0]["grads"][n]
            torch.testing.assert_close(ranks[1]["grads"][n], got, rtol=0, atol=0, msg=f"{n} differs between ranks")
        torch.testing.assert_close(got, g, rtol=RTOL, atol=ATOL, msg=f"gradient of {n}")
    # fairseq's gradient norm skips param.expert: every rank measures the shared gradients
    # only, so the ranks agree (fairseq checks that) and --clip-norm scales every gradient,
    # experts included, by the same factor; a one-process run would include the experts
    shared = [g for n, g in grads.items() if not n.startswith("experts.")]
    expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in shared])) if shared else 0.0
    assert ranks[0]["gnorm"] == ranks[1]["gnorm"]
    assert ranks[0]["gnorm"] == pytest.approx(float(expected), rel=RTOL, abs=ATOL)
