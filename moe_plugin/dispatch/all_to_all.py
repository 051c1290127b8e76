"""A differentiable all-to-all over ``torch.distributed`` with uneven (and zero) splits.

Legend: N rows this rank sends, R rows it receives, D the row width (any trailing shape),
W workers in the process group.

``all_to_all(x_ND, send_splits_W, recv_splits_W)`` sends ``send_splits_W[w]`` consecutive
rows of ``x_ND`` to rank w and returns the rows received, grouped by source rank
(``recv_splits_W[w]`` rows from rank w). Its backward is the same exchange with the splits
swapped: the gradient of each received row travels back to the rank and position it came
from. Any split may be 0 and any rank may send or receive nothing at all; every rank must
still call it (it is a collective), in the same order on every rank, in forward and in
backward. Works with gloo (CPU tensors) and NCCL (CUDA tensors).
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.distributed as dist


def world_size(group=None) -> int:
    """Ranks in ``group`` (1 when torch.distributed is not initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def rank(group=None) -> int:
    """This process's rank in ``group`` (0 when torch.distributed is not initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(group)


def exchange_rows(x_ND: torch.Tensor, send_splits: List[int], recv_splits: List[int], group=None) -> torch.Tensor:
    """The same exchange without autograd (integer metadata, counts)."""
    if x_ND.shape[0] != sum(send_splits):
        raise RuntimeError(f"all_to_all: {x_ND.shape[0]} rows but send splits {send_splits} sum to {sum(send_splits)}")
    out_RD = x_ND.new_empty((sum(recv_splits),) + tuple(x_ND.shape[1:]))
    dist.all_to_all_single(
        out_RD, x_ND.contiguous(), output_split_sizes=recv_splits, input_split_sizes=send_splits, group=group
    )
    return out_RD


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, send_splits, recv_splits, group):
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        return exchange_rows(x_ND, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad_RD):
        # the reverse exchange: rows go back to where they came from
        return exchange_rows(grad_RD, ctx.recv_splits, ctx.send_splits, ctx.group), None, None, None


def all_to_all(
    x_ND: torch.Tensor, send_splits: Sequence[int], recv_splits: Sequence[int], group=None
) -> torch.Tensor:
    """Differentiable uneven all-to-all (see the module docstring). Splits are Python ints."""
    send, recv = [int(s) for s in send_splits], [int(s) for s in recv_splits]
    W = world_size(group)
    if len(send) != W or len(recv) != W:
        raise RuntimeError(f"all_to_all: need {W} send and receive splits, got {len(send)} and {len(recv)}")
    return _AllToAll.apply(x_ND, send, recv, group)


def exchange_counts(counts_WL: torch.Tensor, group=None) -> torch.Tensor:
    """Tell every rank how many rows it will receive.

    counts_WL: (W, L) integers, ``counts_WL[w, l]`` = rows this rank sends to local slot l
    of rank w. Returns (W, L): ``[w, l]`` = rows rank w sends to local slot l of this rank.
    Not differentiable (counts carry no gradient).
    """
    W, L = counts_WL.shape
    send = counts_WL.reshape(-1).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.view(W, L)
