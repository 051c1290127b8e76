"""Inputs and jobs of the distributed unit checks, shared by the worker ranks
(tests/_ep_worker.py) and the test modules that compute the references.

Every input is a pure function of fixed seeds, so the parent process rebuilds exactly
what each rank saw. World size is 2 throughout (``W``).
"""

import dataclasses
import datetime
from typing import List, Tuple

import torch

W = 2

# ----------------------------------------------------------------------------------------
# all-to-all: SPLITS[case][src][dst] rows that rank src sends to rank dst
# ----------------------------------------------------------------------------------------
A2A_D = 3
A2A_SPLITS = {
    "uneven": [[2, 3], [1, 0]],
    "rank0_sends_nothing": [[0, 0], [4, 1]],
    "nothing_at_all": [[0, 0], [0, 0]],
    "self_only": [[3, 0], [0, 2]],
}


def a2a_inputs(case: str, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(rows rank sends (N, D), weights of the received rows (R, D) for the backward)."""
    splits = A2A_SPLITS[case]
    g = torch.Generator().manual_seed(1000 * list(A2A_SPLITS).index(case) + rank)
    x = torch.randn(sum(splits[rank]), A2A_D, generator=g)
    recv = sum(splits[src][rank] for src in range(W))
    w = torch.randn(recv, A2A_D, generator=g)
    return x, w


def a2a_job(case):
    def job(rank, world):
        from moe_plugin.dispatch.all_to_all import all_to_all

        splits = A2A_SPLITS[case]
        x, w = a2a_inputs(case, rank)
        x.requires_grad_(True)
        y = all_to_all(x, splits[rank], [splits[src][rank] for src in range(W)])
        (y * w).sum().backward()
        return {"y": y.detach(), "grad": x.grad.detach() if x.grad is not None else torch.zeros_like(x)}

    return job


# ----------------------------------------------------------------------------------------
# dispatcher with fixed routing: E experts, K slots, experts y = x @ A_e
# ----------------------------------------------------------------------------------------
DISP_E, DISP_K, DISP_D = 4, 2, 3
#: case -> per rank: (T tokens, kind of routing)
DISP_CASES = {
    "uneven": [(5, "random"), (4, "random")],
    "rank0_sends_nothing_expert3_idle": [(3, "all_dropped"), (6, "no_expert3")],
    "rank1_has_no_tokens": [(4, "random"), (0, "random")],
}


def disp_inputs(case: str, rank: int):
    """(x_TD, expert_ids_TK with -1 drops, weights_TK, output weights g_TD)."""
    T, kind = DISP_CASES[case][rank]
    g = torch.Generator().manual_seed(77 + 100 * list(DISP_CASES).index(case) + rank)
    x = torch.randn(T, DISP_D, generator=g)
    ids = torch.stack([torch.randperm(DISP_E, generator=g)[:DISP_K] for _ in range(T)]) if T else torch.zeros(
        0, DISP_K, dtype=torch.long
    )
    if kind == "all_dropped":
        ids = torch.full_like(ids, -1)
    elif kind == "no_expert3":
        ids = torch.where(ids == 3, torch.full_like(ids, -1), ids)
    if T:
        ids[0, 1] = -1  # a dropped slot
    wts = torch.rand(T, DISP_K, generator=g) * (ids >= 0)
    out_w = torch.randn(T, DISP_D, generator=g)
    return x, ids, wts, out_w


def disp_experts() -> torch.Tensor:
    """A_EDD: expert e maps a row x to x @ A_e."""
    return torch.randn(DISP_E, DISP_D, DISP_D, generator=torch.Generator().manual_seed(5))


def disp_job(case):
    def job(rank, world):
        from moe_plugin.dispatch.expert_parallel import ExpertParallelDispatcher

        d = ExpertParallelDispatcher(DISP_E, world, rank)
        first, stop = d.expert_range
        A_local = disp_experts()[first:stop].clone().requires_grad_(True)
        x, ids, wts, out_w = disp_inputs(case, rank)
        x.requires_grad_(True)
        x_RD, counts_L, plan = d.dispatch(x, ids)
        chunks = torch.split(x_RD, counts_L.tolist())
        y_RD = torch.cat([c @ A_local[l] for l, c in enumerate(chunks)] + [x_RD.new_zeros(0, DISP_D)])
        y_RD = y_RD + 0.0 * A_local.sum()  # every expert in the graph, as ExpertBank does
        out = d.combine(y_RD, wts, plan)
        (out * out_w).sum().backward()
        return {
            "rows": x_RD.detach(),
            "counts": counts_L,
            "out": out.detach(),
            "grad_x": x.grad.detach() if x.grad is not None else torch.zeros_like(x),
            "grad_A": A_local.grad.detach(),
        }

    return job


# ----------------------------------------------------------------------------------------
# routers: an MoE layer per registered router, expert-parallel vs one process
# ----------------------------------------------------------------------------------------
R_D, R_F, R_E = 8, 16, 4
#: (batch, length) of each rank's micro-batch
R_SHAPES = [(3, 5), (2, 6)]


#: extra layer kinds beside the routers: BASE's own layer (balanced router over a bank of
#: residual sublayers with per-expert LayerNorms, moe_plugin/base_layer.py); switch with two
#: shared experts (--moe-shared-experts, replicated on every rank, not param.expert)
EXTRA_LAYERS = {"base_layer": "balanced", "switch+shared": "switch"}
#: the options of an extra layer kind beside its router's arch defaults
EXTRA_OPTIONS = {"switch+shared": {"moe_shared_experts": 2, "moe_shared_expert_ffn_dim": 6}}


def layer_names() -> List[str]:
    from tests.helpers import all_router_names

    names = all_router_names()
    return names + [k for k, router in EXTRA_LAYERS.items() if router in names]


def router_config(name: str, expert_parallel: bool):
    from tests.helpers import router_cfg

    cfg = router_cfg(EXTRA_LAYERS.get(name, name), moe_expert_count=R_E, **EXTRA_OPTIONS.get(name, {}))
    return dataclasses.replace(cfg, moe_expert_parallel=expert_parallel)


def router_inputs(rank: int):
    """(x_TD, TokenInfo, output weights g_TD) of rank ``rank``'s micro-batch (with padding)."""
    from tests.helpers import token_info

    B, L = R_SHAPES[rank]
    g = torch.Generator().manual_seed(300 + rank)
    ids = torch.randint(4, 50, (B, L), generator=g)
    ids[-1, -2:] = 1  # padding at the end of the last sequence
    x = torch.randn(B * L, R_D, generator=g)
    out_w = torch.randn(B * L, R_D, generator=g)
    return x, token_info(ids), out_w


def build_router_layer(name: str, expert_parallel: bool):
    """The MoE layer (seeded: the expert-parallel one holds the same experts' slice)."""
    from moe_plugin import config
    from moe_plugin.moe_layer import build_moe_layer
    from tests.helpers import vocab_info

    cfg = router_config(name, expert_parallel)
    config.validate(cfg)
    torch.manual_seed(0)
    if name == "base_layer":
        from moe_plugin.base_layer import BaseLayer

        layer = BaseLayer(cfg, R_D, R_F, num_sublayers=2, vocab=vocab_info(), layer_index=1).moe
        first, stop = layer.dispatcher.expert_range if expert_parallel else (0, R_E)
        with torch.no_grad():  # W2 starts at zero in BASE; make every expert do something
            for i, p in enumerate(layer.experts.parameters()):
                g = torch.Generator().manual_seed(i)
                p.add_(0.1 * torch.randn((R_E,) + tuple(p.shape[1:]), generator=g)[first:stop])
        return layer
    return build_moe_layer(cfg, R_D, R_F, vocab=vocab_info(), layer_index=1)


def micro_batch_loss(layer, rank: int, forward=None):
    """Forward of rank ``rank``'s micro-batch -> (loss, output, aux values, tokens per expert).

    loss = sum(out * g) + ntokens * sum(aux losses): moe_cross_entropy's form (aux losses
    are per-token means, weighted by the sample size), with every aux weight 1.
    """
    x, tok, out_w = router_inputs(rank)
    torch.manual_seed(1000 + rank)  # routers that draw random numbers draw the same ones
    out = (forward or layer)(x, tokens=tok)
    ntok = int((~tok.pad_mask_T).sum())
    aux = {k: v for k, v in layer.last_aux_losses.items()}
    loss = (out * out_w).sum() + ntok * sum(aux.values(), out.new_zeros(()))
    return loss, out, aux, layer.last_stats["tokens_per_expert"], ntok


def sample_size() -> int:
    return sum(int((~router_inputs(r)[1].pad_mask_T).sum()) for r in range(W))


def router_skip_reason(name: str):
    """Why a router cannot run in expert-parallel mode here (its validate refuses), or None."""
    from moe_plugin import config

    try:
        config.validate(router_config(name, True))
    except ValueError as e:
        return str(e)
    return None


def router_job(name):
    def job(rank, world):
        from fairseq.distributed.legacy_distributed_data_parallel import LegacyDistributedDataParallel

        import torch.distributed as dist

        reason = router_skip_reason(name)
        if reason:
            return {"skip": reason}
        layer = build_router_layer(name, True)
        params0 = {n: p.detach().clone() for n, p in layer.named_parameters()}
        ddp = LegacyDistributedDataParallel(layer, dist.group.WORLD)
        layer.train()
        loss, out, aux, tpe, _ = micro_batch_loss(layer, rank, forward=ddp)
        loss.backward()
        # fairseq's trainer: all-reduce (skipping param.expert), then multiply by W / sample size
        ddp.all_reduce_grads()
        factor = world / sample_size()
        for p in layer.parameters():
            if p.grad is not None:
                p.grad.mul_(factor)
        grads = {n: p.grad.detach().clone() for n, p in layer.named_parameters() if p.grad is not None}
        # fairseq's gradient norm (what --clip-norm clips by): max_norm 0 only measures it
        from fairseq import utils as fairseq_utils

        gnorm = float(fairseq_utils.clip_grad_norm_(list(layer.parameters()), 0.0))
        layer.eval()
        with torch.no_grad():
            _, out_eval, _, _, _ = micro_batch_loss(layer, rank, forward=ddp)
        return {
            "out": out.detach(),
            "out_eval": out_eval,
            "aux": {k: float(v) for k, v in aux.items()},
            "tokens_per_expert": tpe,
            "grads": grads,
            "gnorm": gnorm,
            "params": params0,
            "expert_flags": {n: hasattr(p, "expert") for n, p in layer.named_parameters()},
            "expert_range": list(layer.dispatcher.expert_range),
        }

    return job


# ----------------------------------------------------------------------------------------
# BASE's token shuffle (--base-shuffle, moe_plugin/dispatch/shuffle.py)
# ----------------------------------------------------------------------------------------
SH_D, SH_F, SH_E = 8, 16, 4
#: case -> per rank: (batch, length, padding positions at the end of the last sequence)
SH_CASES = {
    "uneven": [(3, 5, 2), (2, 6, 0)],  # 13 and 12 real tokens: uneven chunks
    "equal": [(2, 8, 0), (4, 4, 0)],  # 16 each: fairseq's equal chunks of 8
    "rank1_only_padding": [(2, 4, 1), (1, 3, 3)],  # rank 1 has no real token
}
#: layer kinds of the shuffle jobs: data-parallel (every rank holds all E experts) and expert-parallel
SH_MODES = ("local", "expert_parallel")


def shuffle_inputs(case: str, rank: int):
    """(x (L, B, D), TokenInfo, output weights (L, B, D)) of rank ``rank``. Rank r's tokens
    lie near expert r's centroid (:func:`build_shuffle_layer`): without the shuffle each
    rank balances over tokens that all prefer one expert, with it over a mix."""
    from tests.helpers import token_info

    B, L, pads = SH_CASES[case][rank]
    g = torch.Generator().manual_seed(500 + 10 * list(SH_CASES).index(case) + rank)
    ids = torch.randint(4, 50, (B, L), generator=g)
    if pads:
        ids[-1, L - pads:] = 1
    centroid = shuffle_centroids()[rank]
    x = 0.5 * torch.randn(L, B, SH_D, generator=g) + 3.0 * centroid
    out_w = torch.randn(L, B, SH_D, generator=g)
    return x, token_info(ids), out_w


def shuffle_centroids() -> torch.Tensor:
    return torch.randn(SH_E, SH_D, generator=torch.Generator().manual_seed(41))


def build_shuffle_layer(mode: str, shuffle: bool = True, checkpoint: bool = False):
    """A BaseLayer (2 sublayers, every weight non-trivial, centroids of :func:`shuffle_centroids`)."""
    from moe_plugin.base_layer import BaseLayer
    from tests.helpers import router_cfg

    cfg = router_cfg("balanced", moe_expert_count=SH_E, moe_expert_parallel=(mode == "expert_parallel"),
                     moe_seed=7)
    torch.manual_seed(0)
    layer = BaseLayer(cfg, SH_D, SH_F, num_sublayers=2, shuffle=shuffle, layer_index=3)
    first, stop = layer.moe.dispatcher.expert_range if mode == "expert_parallel" else (0, SH_E)
    with torch.no_grad():
        for i, p in enumerate(layer.moe.experts.parameters()):
            g = torch.Generator().manual_seed(i)
            p.add_(0.3 * torch.randn((SH_E,) + tuple(p.shape[1:]), generator=g)[first:stop])
        layer.moe.router.expert_centroids.copy_(0.5 * shuffle_centroids())
    layer.checkpoint_activations = checkpoint
    return layer


def shuffle_plan_job(case):
    """The plan alone, on tokens marked by (rank, row): what each rank receives, the round
    trip through an identity layer, and the gradient of sum(received * w)."""

    def job(rank, world):
        from moe_plugin.dispatch import shuffle as sh

        B, L, _ = SH_CASES[case][rank]
        _, tok, _ = shuffle_inputs(case, rank)
        T = B * L
        x = torch.stack([torch.full((T,), float(rank)), torch.arange(T, dtype=torch.float)], 1)
        x.requires_grad_(True)
        plan = sh.plan_shuffle(T, tok, sh.shuffle_generator(sh.shuffle_seed(1, 0, rank, 0, 0)), x.device)
        x_RD = plan.send(x)
        w = torch.randn(x_RD.shape, generator=torch.Generator().manual_seed(60 + rank))
        (x_RD * w).sum().backward()
        back = plan.back(x_RD.detach())
        return {"order": plan.order_V, "send": plan.send_W, "recv": plan.recv_W, "rows": x_RD.detach(),
                "ids": plan.tokens_R.ids_T, "positions": plan.tokens_R.positions_T, "w": w,
                "grad": x.grad.detach(), "back": back}

    return job


def shuffle_layer_job(case, mode):
    """The BaseLayer with --base-shuffle in training: output, input gradient, parameter
    gradients, the plan it drew, its stats; the same with activation checkpointing; the
    evaluation output; the permutation policy (same coordinates -> same permutation)."""

    def job(rank, world):
        x0, tok, out_w = shuffle_inputs(case, rank)
        res = {}
        for name, ckpt in (("plain", False), ("checkpointed", True)):
            layer = build_shuffle_layer(mode, checkpoint=ckpt).train()
            layer.moe.token_source = lambda: tok
            layer.set_num_updates(5)
            x = x0.clone().requires_grad_(True)
            rng_before = torch.get_rng_state()
            y, _, _ = layer(x)
            (y * out_w).sum().backward()
            res.setdefault("global_rng_untouched", True)
            res["global_rng_untouched"] &= torch.equal(rng_before, torch.get_rng_state())
            plan = layer.last_shuffle
            res[name] = {
                "y": y.detach(), "grad_x": x.grad.detach(),
                "grads": {n: p.grad.detach().clone() for n, p in layer.named_parameters() if p.grad is not None},
                "order": plan.order_V, "send": plan.send_W, "recv": plan.recv_W,
                "tokens_per_expert": layer.moe.last_stats["tokens_per_expert"],
                "num_tokens": int(layer.moe.last_stats["num_tokens"]),
            }
        # the same coordinates draw the same permutation; the next forward of the update another
        y2, _, _ = layer(x0)
        res["second_order"] = layer.last_shuffle.order_V
        layer.set_num_updates(6)
        layer.set_num_updates(5)  # a resumed run sets the count again: the count restarts
        layer(x0)
        res["resumed_order"] = layer.last_shuffle.order_V
        layer.eval()
        with torch.no_grad():
            res["y_eval"] = layer(x0)[0]
        res["eval_shuffled"] = layer.last_shuffle is not None
        return res

    return job


# ----------------------------------------------------------------------------------------
# fairseq's own BaseLayer (fairseq/modules/base_layer.py) on W ranks: one expert per rank
# ----------------------------------------------------------------------------------------
FS_D, FS_F, FS_S = 8, 16, 2
FS_E = W  # fairseq: one expert per worker
FS_SHAPE = (6, 2)  # (length, batch): 12 tokens per rank, no padding (fairseq routes padding)
#: a_t0 - a_t1 of each rank's tokens (in a shuffled order): 8 prefer expert 0 on rank 0, but the
#: balanced optimum sends the 6 strongest there; unique optima, by margins of 1.7 and 0.9
FS_MARGINS = [
    [4.0, 3.6, 3.2, 2.8, 2.4, 2.0, 0.3, 0.2, -1.0, -1.5, -2.0, -2.5],
    [-4.0, -3.4, -2.9, -2.5, 1.1, 0.6, -0.4, -0.3, 2.6, 3.0, 3.3, 3.9],
]


def fairseq_centroids() -> torch.Tensor:
    return torch.nn.init.orthogonal_(torch.empty(FS_E, FS_D), gain=1.0, generator=torch.Generator().manual_seed(3))


def fairseq_expert_weights(e: int):
    """Per sublayer s: (LN weight (D,), LN bias (D,), ff1 weight (F, D), ff1 bias (F,),
    ff2 weight (D, F), ff2 bias (D,)) of expert e; ff2 is not zero (fairseq zeroes it)."""
    g = torch.Generator().manual_seed(90 + e)
    out = []
    for _ in range(FS_S):
        out.append((1 + 0.2 * torch.randn(FS_D, generator=g), 0.1 * torch.randn(FS_D, generator=g),
                    0.3 * torch.randn(FS_F, FS_D, generator=g), 0.1 * torch.randn(FS_F, generator=g),
                    0.3 * torch.randn(FS_D, FS_F, generator=g), 0.1 * torch.randn(FS_D, generator=g)))
    return out


def fairseq_inputs(rank: int):
    """(x (L, B, D), output weights): ``x_t . (w_0 - w_1) = FS_MARGINS[rank][t]`` exactly, plus
    components along w_0 + w_1 (so alpha varies) and orthogonal to both centroids."""
    g = torch.Generator().manual_seed(700 + rank)
    w = fairseq_centroids().double()
    diff, common = w[0] - w[1], w[0] + w[1]
    d_T = torch.tensor(FS_MARGINS[rank], dtype=torch.float64)
    T = d_T.numel()
    noise = torch.randn(T, FS_D, generator=g).double()
    q, _ = torch.linalg.qr(w.t())  # (D, 2) basis of the centroids' span
    noise = noise - noise @ q @ q.t()
    x = d_T[:, None] * diff / diff.dot(diff) + torch.randn(T, 1, generator=g).double() * common / 2 + noise
    L, B = FS_SHAPE
    out_w = torch.randn(L, B, FS_D, generator=g)
    return x.float().view(L, B, FS_D), out_w


def fairseq_base_job():
    """fairseq's BaseLayer with base_shuffle off, expert = rank: training (input requires
    grad: balanced assignment, libbase) and evaluation (greedy) outputs and gradients."""

    def job(rank, world):
        import argparse

        from fairseq.modules.base_layer import BaseLayer as FairseqBaseLayer

        args = argparse.Namespace(decoder_embed_dim=FS_D, decoder_ffn_embed_dim=FS_F, base_sublayers=FS_S,
                                  base_shuffle=False, activation_fn="relu")
        layer = FairseqBaseLayer(args)
        assert layer.num_workers == FS_E and layer.expert_id == rank
        with torch.no_grad():
            layer.expert_centroids.copy_(fairseq_centroids())
            for sub, (lw, lb, w1, b1, w2, b2) in zip(layer.expert_network, fairseq_expert_weights(rank)):
                for p, v in ((sub.norm.weight, lw), (sub.norm.bias, lb), (sub.ff1.weight, w1), (sub.ff1.bias, b1),
                             (sub.ff2.weight, w2), (sub.ff2.bias, b2)):
                    p.copy_(v)
        x0, out_w = fairseq_inputs(rank)
        res = {}
        for mode in ("train", "eval"):
            layer.zero_grad(set_to_none=True)
            x = x0.clone().requires_grad_(mode == "train")  # fairseq's switch: input.requires_grad
            y = layer(x)[0]
            (y * out_w).sum().backward()
            res[mode] = {
                "y": y.detach(),
                "grad_x": x.grad.detach() if x.grad is not None else None,
                "grads": {n: p.grad.detach().clone() for n, p in layer.named_parameters() if p.grad is not None},
            }
        return res

    return job


# ----------------------------------------------------------------------------------------
# update-level router state (loss_free's bias): W ranks with --update-freq 1 against one
# process with --update-freq W on the same micro-batches (tests/test_loss_free.py)
# ----------------------------------------------------------------------------------------
UPD_STEPS, UPD_E, UPD_D, UPD_T = 6, 4, 8, 10


def update_inputs(step: int, micro: int):
    """Micro-batch ``micro`` of update ``step``: skewed hidden states (expert 0 favoured)."""
    g = torch.Generator().manual_seed(5000 + 17 * step + micro)
    x = torch.randn(UPD_T, UPD_D, generator=g)
    x[:, 0] += 2.0
    return x


def build_update_router(rate: float = 0.05):
    from moe_plugin import config
    from moe_plugin.routing import build_router
    from tests.helpers import router_cfg

    cfg = router_cfg("loss_free", moe_expert_count=UPD_E, moe_router_bias_update_rate=rate)
    config.validate(cfg)
    torch.manual_seed(3)
    router = build_router(cfg, UPD_D)
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.weight[0, 0] = 1.0  # expert 0 wins the skewed dimension
        router.gate.weight[1:, 1:] = 0.3 * torch.randn(UPD_E - 1, UPD_D - 1, generator=torch.Generator().manual_seed(4))
    return router.train()


def bias_after_each_update(router, micro_batches_of_rank):
    """Run the updates (fairseq's order: set_num_updates(n), then the forwards of update n)
    and return the bias the forwards of every next update see."""
    out = []
    for n in range(UPD_STEPS):
        router.set_num_updates(n)
        for m in micro_batches_of_rank:
            router(update_inputs(n, m))
        out.append(router.expert_bias_E.clone())
    router.set_num_updates(UPD_STEPS)
    out.append(router.expert_bias_E.clone())
    return torch.stack(out[1:])


def update_state_job():
    def job(rank, world):
        return {"bias": bias_after_each_update(build_update_router(), [rank])}

    return job


def build_scope_router(scope: str = "global"):
    """A switch router with --moe-balance-scope ``scope`` (same weights on every rank)."""
    from moe_plugin import config
    from moe_plugin.routing import build_router
    from tests.helpers import router_cfg

    cfg = router_cfg("switch", moe_expert_count=UPD_E, moe_balance_scope=scope)
    config.validate(cfg)
    torch.manual_seed(7)
    return build_router(cfg, UPD_D).train()


def scope_micro_batch(router, step: int, micro: int):
    """One training micro-batch: its balance loss and that loss's gradient on the gate."""
    router.set_num_updates(step)
    router.gate.weight.grad = None
    loss = router(update_inputs(step, micro)).aux_losses["balance"]
    loss.backward()
    return loss.detach(), router.gate.weight.grad.clone()


def balance_scope_job():
    def job(rank, world):
        router = build_scope_router()
        out = {}
        for step in range(2):
            out[f"loss{step}"], out[f"grad{step}"] = scope_micro_batch(router, step, rank)
        return out

    return job


def jobs() -> List[Tuple[str, object]]:
    out = [(f"a2a/{c}", a2a_job(c)) for c in A2A_SPLITS]
    out += [(f"dispatch/{c}", disp_job(c)) for c in DISP_CASES]
    out += [(f"router/{n}", router_job(n)) for n in layer_names()]
    out += [(f"shuffle_plan/{c}", shuffle_plan_job(c)) for c in SH_CASES]
    out += [(f"shuffle_layer/{c}/{m}", shuffle_layer_job(c, m)) for c in SH_CASES for m in SH_MODES]
    out += [("fairseq_base", fairseq_base_job())]
    out += [("update_state/loss_free", update_state_job())]
    out += [("balance_scope/global", balance_scope_job())]
    return out


TIMEOUT = datetime.timedelta(seconds=120)
