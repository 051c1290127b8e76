"""The expert bank: E feed-forward networks with batched weights, computed per group.

Legend: N rows (token slots) sorted by expert, n <= N of them routed, D model dim,
F expert hidden dim, E experts.

Weights are stored batched, ``w1_EDF`` (E, D, F) and ``w2_EFD`` (E, F, D). The bank takes
rows already sorted by expert and the count of rows per expert, and knows nothing of
routing. Rows past ``counts_E.sum()`` (the *tail*: slots the router dropped, which the
dispatcher sorts last so that it never has to ask the device how many were kept) are not
computed: their output is zero and no gradient flows to them.

Implementations (``impl``):

* ``fused`` (the CPU default): one autograd function for the whole FFN. Each expert is one
  ``addmm`` written straight into a preallocated buffer (the bias comes free with the
  matmul, as in ``nn.Linear``), the activation runs in place, and the backward is written
  out by hand: per-expert ``mm`` into preallocated gradients, bias gradients as per-expert
  row sums. It saves what a dense FFN saves (the input and the activation) and allocates
  nothing per row beyond that; the profile of the composed version spent a third of its
  non-matmul time allocating and gathering per-row biases (docs/performance.md).
* ``grouped_mm`` (the GPU default for bf16 with 16-byte aligned strides, which
  ``torch._grouped_mm`` needs): composed with autograd; nothing leaves the device (no host
  sync). Elsewhere on a GPU the default is ``fused`` (one host read of the counts).
* ``bmm`` (the fallback for unaligned shapes): every group padded to the largest, one
  ``bmm``; ``loop`` (the slow obvious reference of the tests).
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F_

_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")

ACTIVATIONS = {
    "relu": F_.relu,
    "gelu": F_.gelu,
    "gelu_fast": lambda x: F_.gelu(x, approximate="tanh"),
    "gelu_accurate": lambda x: F_.gelu(x, approximate="tanh"),
    "tanh": torch.tanh,
    "linear": lambda x: x,
    "swish": F_.silu,
}
BANK_IMPLS = ("auto", "fused", "grouped_mm", "bmm", "loop")


def expert_of_rows(counts_E: torch.Tensor, num_rows: int) -> torch.Tensor:
    """(N,) the expert of each sorted row; tail rows get E. Stays on the device."""
    ends_E = counts_E.cumsum(0)
    return torch.searchsorted(ends_E, torch.arange(num_rows, device=counts_E.device), right=True)


def _host_rows(counts_E: torch.Tensor) -> Optional[int]:
    """The number of routed rows when reading it costs nothing (CPU), else None."""
    return int(counts_E.sum()) if counts_E.device.type == "cpu" else None


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    torch._grouped_mm's backward rejects stride-0 gradients (e.g. from ``y.sum()``);
    a contiguous gradient costs nothing extra in the usual case.
    """

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class _ZeroRowsGrad(torch.autograd.Function):
    """Identity whose backward zeroes the gradient of the rows in ``mask_N``.

    torch._grouped_mm leaves rows past the last offset uninitialised, in its output and
    in the input gradient of its backward: the tail rows' gradient must not escape.
    """

    @staticmethod
    def forward(ctx, x, mask_N):
        ctx.save_for_backward(mask_N)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (mask_N,) = ctx.saved_tensors
        return grad.masked_fill(mask_N.unsqueeze(1), 0), None


class _GroupBias(torch.autograd.Function):
    """``h + b[expert_N]`` (tail rows, expert E, get nothing); backward sums per group with
    ``index_add`` rather than the ``index_put`` an indexed gather differentiates to."""

    @staticmethod
    def forward(ctx, h_NF, b_EF, expert_N):
        E = b_EF.shape[0]
        ctx.save_for_backward(expert_N)
        ctx.E = E
        b_pad = torch.cat([b_EF.to(h_NF.dtype), b_EF.new_zeros(1, b_EF.shape[1], dtype=h_NF.dtype)])
        return h_NF + b_pad.index_select(0, expert_N)

    @staticmethod
    def backward(ctx, grad):
        (expert_N,) = ctx.saved_tensors
        g_b = grad.new_zeros(ctx.E + 1, grad.shape[1]).index_add_(0, expert_N, grad)
        return grad, g_b[: ctx.E], None


def add_group_bias(h_NF: torch.Tensor, b_EF: torch.Tensor, expert_N: torch.Tensor) -> torch.Tensor:
    """``h + b[expert_N]``; rows of expert E (the tail) get nothing."""
    return _GroupBias.apply(h_NF, b_EF, expert_N)


def _grouped_mm_applies(x_ND: torch.Tensor, out_dim: int) -> bool:
    """torch._grouped_mm takes 16-byte aligned strides, and on CUDA bf16 only."""
    es = x_ND.element_size()
    aligned = (x_ND.shape[1] * es) % 16 == 0 and (out_dim * es) % 16 == 0
    dtype_ok = x_ND.device.type == "cpu" or x_ND.dtype == torch.bfloat16
    return _HAS_GROUPED_MM and aligned and dtype_ok


def grouped_matmul(x_ND: torch.Tensor, w_EDF: torch.Tensor, counts_E: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Rows ``x_ND`` sorted by group (``counts_E`` rows each) times that group's matrix.

    Rows past ``counts_E.sum()`` give zero rows and receive no gradient. impl:
    ``grouped_mm`` (torch._grouped_mm), ``bmm`` (pad each group to the largest, one batched
    matmul) or ``loop`` (the slow obvious reference); ``auto`` picks grouped_mm where the
    strides allow it (16-byte aligned, e.g. D and F multiples of 4 in fp32), else bmm.
    """
    if impl in ("auto", "fused"):  # "fused" is the bank's whole-FFN path: a lone matmul takes auto's
        impl = "grouped_mm" if _grouped_mm_applies(x_ND, w_EDF.shape[2]) else "bmm"
    N = x_ND.shape[0]
    w_EDF = w_EDF.to(x_ND.dtype)
    if impl == "grouped_mm":
        n = _host_rows(counts_E)
        offs_E = counts_E.cumsum(0).to(torch.int32)
        if n == N:
            return _ContiguousGrad.apply(torch._grouped_mm(x_ND, w_EDF, offs=offs_E))
        tail_N = torch.arange(N, device=x_ND.device) >= offs_E[-1]
        y = torch._grouped_mm(_ZeroRowsGrad.apply(x_ND, tail_N), w_EDF, offs=offs_E)
        return _ContiguousGrad.apply(y.masked_fill(tail_N.unsqueeze(1), 0))
    if impl not in ("loop", "bmm"):
        raise ValueError(f"grouped_matmul: unknown impl {impl!r}; allowed: auto, grouped_mm, bmm, loop")
    sizes = counts_E.tolist()
    n = sum(sizes)
    if impl == "loop":
        parts = [c @ w_EDF[e] for e, c in enumerate(torch.split(x_ND[:n], sizes))]
    else:
        E = w_EDF.shape[0]
        C = max(sizes) if n > 0 else 0
        group_n = expert_of_rows(counts_E, n)
        slot_n = torch.arange(n, device=x_ND.device) - (counts_E.cumsum(0) - counts_E)[group_n]
        padded_ECD = x_ND.new_zeros(E, C, x_ND.shape[1])
        padded_ECD[group_n, slot_n] = x_ND[:n]
        parts = [torch.bmm(padded_ECD, w_EDF)[group_n, slot_n]]
    if n < N:
        parts.append(x_ND.new_zeros(N - n, w_EDF.shape[2]))
    return torch.cat(parts, dim=0)


def _zeros_at(t: torch.Tensor, rows: List[int]) -> torch.Tensor:
    for r in rows:
        t[r].zero_()
    return t


class _FusedExpertFFN(torch.autograd.Function):
    """``fc2(act(fc1(x)))`` per expert over sorted rows, with a hand-written backward.

    Forward: one ``addmm`` per expert into a preallocated (n, F) buffer, the activation in
    place (ReLU) or out of place (others), then activation dropout (ReLU only), then one
    ``addmm`` per expert into the (N, D) output. Saved: x, the activation output (and the
    pre-activation for non-ReLU activations). ReLU's backward needs no mask: a hidden unit
    passes gradient exactly where its (dropped-out and rescaled) output is positive.
    """

    @staticmethod
    def forward(ctx, x_ND, w1_EDF, b1_EF, w2_EFD, b2_ED, sizes: List[int], activation: str, p_drop: float):
        N, D = x_ND.shape
        F = w1_EDF.shape[2]
        n = sum(sizes)
        starts = [0]
        for c in sizes:
            starts.append(starts[-1] + c)
        h_nF = x_ND.new_empty(n, F)
        for e, c in enumerate(sizes):
            if c:
                torch.addmm(b1_EF[e], x_ND[starts[e] : starts[e + 1]], w1_EDF[e], out=h_nF[starts[e] : starts[e + 1]])
        if activation == "relu":
            pre_nF = None
            a_nF = h_nF.relu_()
        else:
            pre_nF = h_nF
            a_nF = ACTIVATIONS[activation](h_nF)
        if p_drop > 0:  # ReLU only (ExpertBank.forward): the backward needs no mask then
            a_nF = F_.dropout(a_nF, p=p_drop, training=True, inplace=True)
        y_ND = x_ND.new_empty(N, D)
        for e, c in enumerate(sizes):
            if c:
                torch.addmm(b2_ED[e], a_nF[starts[e] : starts[e + 1]], w2_EFD[e], out=y_ND[starts[e] : starts[e + 1]])
        if n < N:
            y_ND[n:].zero_()
        ctx.save_for_backward(x_ND, w1_EDF, w2_EFD, a_nF, pre_nF)
        ctx.sizes, ctx.starts, ctx.activation, ctx.p_drop = sizes, starts, activation, p_drop
        return y_ND

    @staticmethod
    def backward(ctx, g_ND):
        x_ND, w1_EDF, w2_EFD, a_nF, pre_nF = ctx.saved_tensors
        sizes, starts = ctx.sizes, ctx.starts
        g_ND = g_ND.contiguous()
        E, F = w1_EDF.shape[0], w1_EDF.shape[2]
        n = starts[-1]
        rows = [slice(starts[e], starts[e + 1]) for e in range(E)]
        # gradients of the size of all E experts: allocated, not zero-filled (each routed
        # expert's slice is written once by its mm/sum; only unused experts are zeroed)
        empty_E = [e for e, c in enumerate(sizes) if c == 0]
        g_w2 = _zeros_at(torch.empty_like(w2_EFD), empty_E)
        g_b2 = _zeros_at(g_ND.new_empty(E, w2_EFD.shape[2]), empty_E)
        g_a = g_ND.new_empty(n, F)
        for e, c in enumerate(sizes):
            if c:
                torch.mm(a_nF[rows[e]].t(), g_ND[rows[e]], out=g_w2[e])
                torch.sum(g_ND[rows[e]], 0, out=g_b2[e])
                torch.mm(g_ND[rows[e]], w2_EFD[e].t(), out=g_a[rows[e]])
        # through dropout and the activation: g_a becomes the pre-activation gradient
        if ctx.activation == "relu":
            # in place, one pass (masked_fill_ with a <= 0 mask costs ten times more on CPU)
            g_h = torch.ops.aten.threshold_backward.grad_input(g_a, a_nF, 0, grad_input=g_a)
            if ctx.p_drop > 0:
                g_h.mul_(1.0 / (1.0 - ctx.p_drop))
        else:
            with torch.enable_grad():
                pre = pre_nF.detach().requires_grad_()
                (g_h,) = torch.autograd.grad(ACTIVATIONS[ctx.activation](pre), pre, g_a)
        g_w1 = _zeros_at(torch.empty_like(w1_EDF), empty_E)
        g_b1 = _zeros_at(g_ND.new_empty(E, F), empty_E)
        g_x = g_ND.new_empty(x_ND.shape) if ctx.needs_input_grad[0] else None
        for e, c in enumerate(sizes):
            if c:
                torch.mm(x_ND[rows[e]].t(), g_h[rows[e]], out=g_w1[e])
                torch.sum(g_h[rows[e]], 0, out=g_b1[e])
                if g_x is not None:
                    torch.mm(g_h[rows[e]], w1_EDF[e].t(), out=g_x[rows[e]])
        if g_x is not None and n < x_ND.shape[0]:
            g_x[n:].zero_()
        return g_x, g_w1, g_b1, g_w2, g_b2, None, None, None


class ExpertBank(nn.Module):
    """E two-layer FFNs ``fc2(dropout(act(fc1(x))))`` with batched weights.

    Each expert is initialised like fairseq's ``nn.Linear`` FFN (kaiming-uniform weights,
    uniform biases), so one expert is distributed exactly as the dense FFN it replaces.
    """

    def __init__(
        self,
        num_experts: int,
        model_dim: int,
        ffn_dim: int,
        activation: str = "relu",
        activation_dropout: float = 0.0,
        impl: str = "auto",
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"--activation-fn: {activation!r} is not supported by the expert bank; allowed: {', '.join(ACTIVATIONS)}")
        if impl not in BANK_IMPLS:
            raise ValueError(f"expert bank impl: {impl!r} is not known; allowed: {', '.join(BANK_IMPLS)}")
        E, D, F = num_experts, model_dim, ffn_dim
        self.num_experts, self.model_dim, self.ffn_dim = E, D, F
        self.w1_EDF = nn.Parameter(torch.empty(E, D, F))
        self.b1_EF = nn.Parameter(torch.empty(E, F))
        self.w2_EFD = nn.Parameter(torch.empty(E, F, D))
        self.b2_ED = nn.Parameter(torch.empty(E, D))
        self.activation_name = activation
        self.activation: Callable = ACTIVATIONS[activation]
        self.activation_dropout = activation_dropout
        self.impl = impl
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias
        for w, b, fan_in in ((self.w1_EDF, self.b1_EF, self.model_dim), (self.w2_EFD, self.b2_ED, self.ffn_dim)):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def load_dense(self, expert: int, fc1: nn.Linear, fc2: nn.Linear) -> None:
        """Copy a dense FFN (fairseq's fc1/fc2) into expert ``expert`` (used by tests and upcycling)."""
        with torch.no_grad():
            self.w1_EDF[expert].copy_(fc1.weight.t())
            self.b1_EF[expert].copy_(fc1.bias)
            self.w2_EFD[expert].copy_(fc2.weight.t())
            self.b2_ED[expert].copy_(fc2.bias)

    def resolved_impl(self, x_ND: torch.Tensor) -> str:
        """``auto``: grouped_mm on a GPU where it applies (bf16, aligned), else fused."""
        if self.impl != "auto":
            return self.impl
        if x_ND.device.type != "cpu" and _grouped_mm_applies(x_ND, self.ffn_dim):
            return "grouped_mm"
        return "fused"

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x_ND: rows sorted by expert, ``counts_E[e]`` rows for expert e (then the tail).
        Returns (N, D), zero on the tail rows."""
        N = x_ND.shape[0]
        if N == 0:
            # keep every parameter in the graph so distributed gradient reduction sees it
            return x_ND.new_zeros(0, self.model_dim) + 0.0 * sum(p.sum() for p in self.parameters())
        p_drop = self.activation_dropout if self.training else 0.0
        impl = self.resolved_impl(x_ND)
        if impl == "fused" and p_drop > 0 and self.activation_name != "relu":
            impl = "auto"  # the fused backward recovers the dropout mask from ReLU's output only
        dt = x_ND.dtype
        w1, b1, w2, b2 = (p.to(dt) for p in (self.w1_EDF, self.b1_EF, self.w2_EFD, self.b2_ED))
        if impl == "fused":
            return _FusedExpertFFN.apply(x_ND.contiguous(), w1, b1, w2, b2, counts_E.tolist(), self.activation_name, p_drop)
        expert_N = expert_of_rows(counts_E, N)
        h_NF = add_group_bias(grouped_matmul(x_ND, w1, counts_E, impl), b1, expert_N)
        h_NF = F_.dropout(self.activation(h_NF), p=p_drop, training=p_drop > 0)
        y_ND = add_group_bias(grouped_matmul(h_NF, w2, counts_E, impl), b2, expert_N)
        # tail rows got no bias (expert E); grouped_matmul gave them zeros
        return y_ND
