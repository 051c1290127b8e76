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
* With local experts the layer does not call the bank on gathered rows at all: the bank's
  ``forward_combined`` (:class:`_FusedDispatchFFN`, for ``fused`` and ``grouped_mm``) gathers
  the rows, runs the FFN and scatters the weighted outputs back in one autograd function that
  keeps for backward only the layer's input, each row's token index and weight, and the hidden
  activation: a dense FFN's activation memory. BASE's one-sublayer experts
  (:class:`BaseSublayerBank`) take the same path with their per-expert LayerNorm recomputed in
  backward. ``fuse_dispatch = False`` on a bank restores the separate gather, bank and combine.
* ``bmm`` (the fallback for unaligned shapes): every group padded to the largest, one
  ``bmm``. (The slow obvious per-expert loops the banks are tested against live in tests/.)

Variants (:data:`EXPERT_VARIANTS`, chosen by the router's declared ``expert_variant``):
``"ffn"`` :class:`ExpertBank` (one whole expert FFN per routed slot) and ``"segmented"``
:class:`SegmentedExpertBank` (MultiHash: column i of the router's ids picks the expert of
segment i of the hidden units). BASE's layer builds :class:`BaseSublayerBank` (residual
pre-LayerNorm sublayers per expert) itself. Beside the routed bank, an MoE layer may hold
:class:`SharedExpertBank` (``--moe-shared-experts``, DeepSeekMoE's always-active experts;
not a router variant: every router's layer can have one).

Initialisation and placement: a bank holds the ``num_experts`` experts with global ids
``first_expert .. first_expert + num_experts - 1`` (all E of a layer, or a rank's E/W in
expert-parallel mode: only those are allocated). Expert e is initialised from its own CPU
``torch.Generator`` seeded from (the layer's ``seed``, e) (:func:`expert_generator`), so
it gets the same initial values whatever the world size and whichever rank holds it: a
rank's bank equals the slice of a one-process bank with the same seed. The bank draws
nothing from the global RNG, except one base seed when it is given none
(:func:`draw_seed`).
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable, Dict, List, Optional

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
BANK_IMPLS = ("auto", "fused", "grouped_mm", "bmm")


def mix_seed(*parts) -> int:
    """A 60-bit seed from any ints/strings, mixed with SHA-256 (nearby inputs -> unrelated seeds)."""
    key = "/".join(str(int(p)) if not isinstance(p, str) else p for p in parts)
    return int(hashlib.sha256(key.encode()).hexdigest()[:15], 16)


def expert_generator(seed: int, expert: int) -> torch.Generator:
    """The CPU generator that initialises global expert ``expert`` of a layer seeded ``seed``."""
    g = torch.Generator(device="cpu")
    g.manual_seed(mix_seed("moe_plugin.experts", seed, expert))
    return g


def draw_seed() -> int:
    """One base seed drawn from the global RNG (so fairseq's --seed still determines it)."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


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
    ``grouped_mm`` (torch._grouped_mm) or ``bmm`` (pad each group to the largest, one
    batched matmul); ``auto`` picks grouped_mm where the strides allow it (16-byte aligned,
    e.g. D and F multiples of 4 in fp32), else bmm.
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
    if impl != "bmm":
        raise ValueError(f"grouped_matmul: unknown impl {impl!r}; allowed: auto, grouped_mm, bmm")
    sizes = counts_E.tolist()
    n = sum(sizes)
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


def _activation_backward(g_a: torch.Tensor, a_nF: torch.Tensor, pre_nF: Optional[torch.Tensor], activation: str,
                         p_drop: float) -> torch.Tensor:
    """dL/d(pre-activation) from dL/d(activation output) ``g_a``. ReLU: in place on ``g_a``,
    one pass over the saved output ``a_nF`` (which is positive exactly where a unit passed,
    dropout included; masked_fill_ with a <= 0 mask costs ten times more on CPU), then the
    dropout scale. Others: autograd through the activation at the saved ``pre_nF``."""
    if activation == "relu":
        g_h = torch.ops.aten.threshold_backward.grad_input(g_a, a_nF, 0, grad_input=g_a)
        if p_drop > 0:
            g_h.mul_(1.0 / (1.0 - p_drop))
        return g_h
    with torch.enable_grad():
        pre = pre_nF.detach().requires_grad_()
        (g_h,) = torch.autograd.grad(ACTIVATIONS[activation](pre), pre, g_a)
    return g_h


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
        g_h = _activation_backward(g_a, a_nF, pre_nF, ctx.activation, ctx.p_drop)
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


def _rowsum_product(u_nF: torch.Tensor, a_nF: torch.Tensor) -> torch.Tensor:
    """(n,) row-wise dot products of two (n, F) tensors, in row blocks so the temporary
    product stays small (a fresh (n, F) tensor costs page faults on CPU)."""
    n = u_nF.shape[0]
    out = u_nF.new_empty(n)
    step = max(1, (1 << 20) // max(1, u_nF.shape[1]))
    for i in range(0, n, step):
        torch.sum(u_nF[i : i + step] * a_nF[i : i + step], 1, out=out[i : i + step])
    return out


class _FusedDispatchFFN(torch.autograd.Function):
    """gather -> expert FFN -> weighted scatter-add in one function, saving for backward only
    the layer's input ``x_TD`` (which the router saves anyway: the same storage), each sorted
    row's token index and combine weight, and the hidden activation; the gathered input rows
    and the expert outputs are temporaries, recomputed where the backward needs them:

        out_t = sum_{rows r of token t} w_r * (act(x_t W1_e(r) + b1_e(r)) W2_e(r) + b2_e(r))

    Backward (g = dL/dout gathered per row, u_r = g_r W2_e^T, a_r the activation):
        dL/dw_r  = <u_r, a_r> + <g_r, b2_e>         (= <g_r, y_r> without recomputing y)
        dL/dW2_e = sum_r a_r^T (w_r g_r),  dL/db2_e = sum_r w_r g_r
        dL/da_r  = w_r u_r  -> through the activation (and dropout) -> dL/dh_r
        dL/dW1_e = sum_r x_t(r)^T dL/dh_r (x re-gathered), dL/dx_t = sum_{r of t} dL/dh_r W1_e^T

    That is what :class:`_FusedExpertFFN` plus the dispatcher's gather and combine compute
    (tested against both and against a per-token loop), with the activation memory of a dense
    FFN of the same active width: per routed slot one hidden row (F floats) plus three scalars,
    instead of additionally the gathered input and the output rows (2 D floats per slot).
    Non-ReLU activations save the pre-activation only (the activation is recomputed).

    ``sizes``: kept rows per expert as host ints (the ``fused`` CPU path: one ``addmm`` per
    expert over the first ``n`` rows), or None with ``counts_E`` on the device (the
    ``grouped_mm`` GPU path: all N rows through ``torch._grouped_mm``, the tail past the
    last offset masked, no host sync).
    """

    @staticmethod
    def forward(ctx, x_TD, w_N, token_N, w1_EDF, b1_EF, w2_EFD, b2_ED, sizes: Optional[List[int]],
                counts_E: torch.Tensor, activation: str, p_drop: float, ln_w_ED=None, ln_b_ED=None):
        T, D = x_TD.shape
        E, _, F = w1_EDF.shape
        grouped = sizes is None
        if grouped:
            n = token_N.shape[0]
            offs_E = counts_E.cumsum(0).to(torch.int32)
            expert_n = expert_of_rows(counts_E, n)  # tail rows: E
            tail_n1 = (expert_n == E).unsqueeze(1)
            starts = None
        else:
            n = sum(sizes)
            starts = [0]
            for c in sizes:
                starts.append(starts[-1] + c)
            offs_E = expert_n = tail_n1 = None
        token_n = token_N[:n]
        w_n = w_N[:n]
        x_nD = x_TD.index_select(0, token_n)
        if ln_w_ED is not None:  # BASE's per-expert pre-LayerNorm, recomputed in backward
            x_nD = _expert_layer_norm(x_nD, ln_w_ED, ln_b_ED, starts, expert_n)[0]
        if grouped:
            h_nF = torch._grouped_mm(x_nD, w1_EDF, offs=offs_E)
            h_nF.add_(_pad_rows(b1_EF).index_select(0, expert_n)).masked_fill_(tail_n1, 0)
        else:
            h_nF = x_nD.new_empty(n, F)
            for e, c in enumerate(sizes):
                if c:
                    torch.addmm(b1_EF[e], x_nD[starts[e] : starts[e + 1]], w1_EDF[e], out=h_nF[starts[e] : starts[e + 1]])
        if activation == "relu":
            pre_nF, a_nF = None, h_nF.relu_()
        else:
            pre_nF, a_nF = h_nF, ACTIVATIONS[activation](h_nF)
        if p_drop > 0:  # ReLU only (the caller's rule): the backward needs no mask then
            a_nF = F_.dropout(a_nF, p=p_drop, training=True, inplace=True)
        if grouped:
            y_nD = torch._grouped_mm(a_nF, w2_EFD, offs=offs_E)
            y_nD.add_(_pad_rows(b2_ED).index_select(0, expert_n)).masked_fill_(tail_n1, 0)
        else:
            y_nD = x_nD  # the gathered input is not needed any more: its buffer takes the output
            for e, c in enumerate(sizes):
                if c:
                    torch.addmm(b2_ED[e], a_nF[starts[e] : starts[e + 1]], w2_EFD[e], out=y_nD[starts[e] : starts[e + 1]])
        y_nD.mul_(w_n.to(y_nD.dtype).unsqueeze(1))
        out_TD = x_TD.new_zeros(T, D).index_add_(0, token_n, y_nD)
        # non-ReLU: only the pre-activation is kept; the activation is recomputed in backward
        ctx.save_for_backward(x_TD, w_n, token_n, w1_EDF, b1_EF, w2_EFD, b2_ED,
                              a_nF if pre_nF is None else pre_nF, counts_E if grouped else None, ln_w_ED, ln_b_ED)
        ctx.sizes, ctx.starts, ctx.activation, ctx.p_drop = sizes, starts, activation, p_drop
        ctx.num_slots = w_N.shape[0]
        return out_TD

    @staticmethod
    def backward(ctx, g_TD):
        x_TD, w_n, token_n, w1_EDF, b1_EF, w2_EFD, b2_ED, saved_nF, counts_E, ln_w_ED, ln_b_ED = ctx.saved_tensors
        sizes, starts = ctx.sizes, ctx.starts
        grouped = sizes is None
        E, D, F = w1_EDF.shape
        n = token_n.shape[0]
        relu = ctx.activation == "relu"
        if relu:
            a_nF = saved_nF
        else:
            a_nF = ACTIVATIONS[ctx.activation](saved_nF)
        g_nD = g_TD.contiguous().index_select(0, token_n)
        wcol_n1 = w_n.to(g_nD.dtype).unsqueeze(1)
        need_w = ctx.needs_input_grad[1]
        if grouped:
            offs_E = counts_E.cumsum(0).to(torch.int32)
            expert_n = expert_of_rows(counts_E, n)
            tail_n1 = (expert_n == E).unsqueeze(1)
            u_nF = torch._grouped_mm(g_nD, w2_EFD.transpose(1, 2), offs=offs_E).masked_fill_(tail_n1, 0)
            g_w = None
            if need_w:
                g_w = _rowsum_product(u_nF, a_nF) + (g_nD * _pad_rows(b2_ED).index_select(0, expert_n)).sum(1)
            gw_nD = g_nD.mul_(wcol_n1).masked_fill_(tail_n1, 0)
            g_w2 = torch._grouped_mm(a_nF.t(), gw_nD, offs=offs_E)
            g_b2 = gw_nD.new_zeros(E + 1, D).index_add_(0, expert_n, gw_nD)[:E]
        else:
            rows = [slice(starts[e], starts[e + 1]) for e in range(E)]
            empty_E = [e for e, c in enumerate(sizes) if c == 0]
            u_nF = g_nD.new_empty(n, F)
            g_w = g_nD.new_empty(n) if need_w else None
            for e, c in enumerate(sizes):
                if c:
                    torch.mm(g_nD[rows[e]], w2_EFD[e].t(), out=u_nF[rows[e]])
                    if need_w:
                        torch.mv(g_nD[rows[e]], b2_ED[e], out=g_w[rows[e]])
            if need_w:
                g_w.add_(_rowsum_product(u_nF, a_nF))
            gw_nD = g_nD.mul_(wcol_n1)
            g_w2 = _zeros_at(torch.empty_like(w2_EFD), empty_E)
            g_b2 = _zeros_at(g_nD.new_empty(E, D), empty_E)
            for e, c in enumerate(sizes):
                if c:
                    torch.mm(a_nF[rows[e]].t(), gw_nD[rows[e]], out=g_w2[e])
                    torch.sum(gw_nD[rows[e]], 0, out=g_b2[e])
        # dL/da = w u, then through dropout and the activation (in place)
        g_h = _activation_backward(u_nF.mul_(wcol_n1), a_nF, None if relu else saved_nF, ctx.activation, ctx.p_drop)
        x_nD = x_TD.index_select(0, token_n)  # re-gathered: not saved
        need_x = ctx.needs_input_grad[0]
        ln = ln_w_ED is not None
        if ln:  # the FFN's input is LN_e(x): recomputed from the re-gathered rows
            x_raw_nD = x_nD
            x_nD, xhat_nD, mean_n1, rstd_n1 = _expert_layer_norm(x_raw_nD, ln_w_ED, ln_b_ED, starts,
                                                                  expert_n if grouped else None)
            need_x = True  # LN's parameters need dL/dz
        if grouped:
            g_w1 = torch._grouped_mm(x_nD.t(), g_h, offs=offs_E)
            g_b1 = g_h.new_zeros(E + 1, F).index_add_(0, expert_n, g_h)[:E]
            g_xn = torch._grouped_mm(g_h, w1_EDF.transpose(1, 2), offs=offs_E).masked_fill_(tail_n1, 0) if need_x else None
        else:
            g_w1 = _zeros_at(torch.empty_like(w1_EDF), empty_E)
            g_b1 = _zeros_at(g_h.new_empty(E, F), empty_E)
            for e, c in enumerate(sizes):
                if c:
                    torch.mm(x_nD[rows[e]].t(), g_h[rows[e]], out=g_w1[e])
                    torch.sum(g_h[rows[e]], 0, out=g_b1[e])
                    if need_x:  # x's rows of this expert are used: their buffer takes dL/dx
                        torch.mm(g_h[rows[e]], w1_EDF[e].t(), out=x_nD[rows[e]])
            g_xn = x_nD if need_x else None
        g_lnw = g_lnb = None
        if ln:  # g_xn is dL/dz, z = xhat * ln_w_e + ln_b_e
            if grouped:
                g_lnw = g_xn.new_zeros(E + 1, D).index_add_(0, expert_n, g_xn * xhat_nD)[:E]
                g_lnb = g_xn.new_zeros(E + 1, D).index_add_(0, expert_n, g_xn)[:E]
                g_xn = g_xn * _pad_rows(ln_w_ED).index_select(0, expert_n)
            else:
                g_lnw = _zeros_at(g_xn.new_empty(E, D), empty_E)
                g_lnb = _zeros_at(g_xn.new_empty(E, D), empty_E)
                for e, c in enumerate(sizes):
                    if c:
                        torch.sum(g_xn[rows[e]] * xhat_nD[rows[e]], 0, out=g_lnw[e])
                        torch.sum(g_xn[rows[e]], 0, out=g_lnb[e])
                        g_xn[rows[e]].mul_(ln_w_ED[e])
            g_xn = torch.ops.aten.native_layer_norm_backward(
                g_xn, x_raw_nD, [D], mean_n1, rstd_n1, None, None, [True, False, False])[0]
            need_x = ctx.needs_input_grad[0]
        g_x = None
        if need_x:
            g_x = g_TD.new_zeros(x_TD.shape).index_add_(0, token_n, g_xn)
        if g_w is not None:
            g_w = g_w.to(w_n.dtype)
            g_w = g_w if g_w.shape[0] == ctx.num_slots else torch.cat([g_w, g_w.new_zeros(ctx.num_slots - g_w.shape[0])])
        return g_x, g_w, None, g_w1, g_b1, g_w2, g_b2, None, None, None, None, g_lnw, g_lnb


#: BASE's sublayer LayerNorm epsilon (fairseq's nn.LayerNorm default)
BASE_LN_EPS = 1e-5


def _expert_layer_norm(x_nD, ln_w_ED, ln_b_ED, starts, expert_n):
    """LN_e(x) for rows sorted by expert: -> (z, xhat, mean, rstd); rows of the same expert
    (``starts``, host ints) or, on the grouped path, ``expert_n`` (tail rows: E, no affine)."""
    D = x_nD.shape[1]
    xhat_nD, mean_n1, rstd_n1 = torch.native_layer_norm(x_nD, [D], None, None, BASE_LN_EPS)
    if starts is None:
        z_nD = torch.addcmul(_pad_rows(ln_b_ED).index_select(0, expert_n), xhat_nD,
                             _pad_rows(ln_w_ED).index_select(0, expert_n))
    else:
        z_nD = torch.empty_like(xhat_nD)
        for e in range(ln_w_ED.shape[0]):
            if starts[e + 1] > starts[e]:
                r = slice(starts[e], starts[e + 1])
                torch.addcmul(ln_b_ED[e], xhat_nD[r], ln_w_ED[e], out=z_nD[r])
    return z_nD, xhat_nD, mean_n1, rstd_n1


def _combined(owner: nn.Module, bank: "ExpertBank", x_TD, w_N, token_N, counts_E, impl: str, p_drop: float, ln=None):
    """:class:`_FusedDispatchFFN` over ``bank``'s weights (and BASE's LayerNorm ``ln``), cast to
    the input's dtype; no rows at all: zeros, every parameter of ``owner`` kept in the graph."""
    if token_N.shape[0] == 0:
        return x_TD.new_zeros(x_TD.shape) + 0.0 * sum(p.sum() for p in owner.parameters())
    dt = x_TD.dtype
    w1, b1, w2, b2 = (p.to(dt) for p in (bank.w1_EDF, bank.b1_EF, bank.w2_EFD, bank.b2_ED))
    ln_w, ln_b = (None, None) if ln is None else (p.to(dt) for p in ln)
    sizes = counts_E.tolist() if impl == "fused" else None
    return _FusedDispatchFFN.apply(x_TD.contiguous(), w_N, token_N, w1, b1, w2, b2, sizes, counts_E,
                                   bank.activation_name, p_drop, ln_w, ln_b)


def _pad_rows(b_EX: torch.Tensor) -> torch.Tensor:
    """(E + 1, X): the rows of ``b_EX`` and a zero row for expert E (the tail)."""
    return torch.cat([b_EX, b_EX.new_zeros(1, b_EX.shape[1])])


class ExpertBank(nn.Module):
    """E two-layer FFNs ``fc2(dropout(act(fc1(x))))`` with batched weights.

    Holds ``num_experts`` experts, global ids ``first_expert ..`` (module docstring: only
    they are allocated). Each expert is initialised like fairseq's ``nn.Linear`` FFN
    (kaiming-uniform weights, uniform biases), so one expert is distributed exactly as the
    dense FFN it replaces, from its own generator (:func:`expert_generator` of ``seed``
    and its global id; ``seed=None`` draws one from the global RNG).
    """

    #: the ``Router.expert_variant`` this bank serves
    variant = "ffn"

    def __init__(
        self,
        num_experts: int,
        model_dim: int,
        ffn_dim: int,
        activation: str = "relu",
        activation_dropout: float = 0.0,
        impl: str = "auto",
        *,
        first_expert: int = 0,
        seed: Optional[int] = None,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"--activation-fn: {activation!r} is not supported by the expert bank; allowed: {', '.join(ACTIVATIONS)}")
        if impl not in BANK_IMPLS:
            raise ValueError(f"expert bank impl: {impl!r} is not known; allowed: {', '.join(BANK_IMPLS)}")
        E, D, F = num_experts, model_dim, ffn_dim
        self.num_experts, self.model_dim, self.ffn_dim = E, D, F
        self.first_expert = int(first_expert)
        self.seed = draw_seed() if seed is None else int(seed)
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
        """Every held expert from its own generator (the same values on any rank, any W)."""
        for l in range(self.num_experts):
            self.init_expert(l, expert_generator(self.seed, self.first_expert + l))

    @torch.no_grad()
    def init_expert(self, l: int, generator: torch.Generator) -> None:
        """nn.Linear's default for local expert ``l``: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for
        fc1's weight and bias, then fc2's, drawn from ``generator`` in that order."""
        for w, b, fan_in in ((self.w1_EDF, self.b1_EF, self.model_dim), (self.w2_EFD, self.b2_ED, self.ffn_dim)):
            bound = 1.0 / math.sqrt(fan_in)
            w[l].uniform_(-bound, bound, generator=generator)
            b[l].uniform_(-bound, bound, generator=generator)

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

    #: gather -> FFN -> combine in one function (:meth:`forward_combined`) where it applies
    #: (:meth:`combined_impl`); False: always the separate gather, bank and combine (the
    #: reference path the tests compare against)
    fuse_dispatch = True

    def combined_impl(self, x_TD: torch.Tensor) -> Optional[str]:
        """The implementation :meth:`forward_combined` would use on ``x_TD``, or None where it
        does not apply (``bmm``; activation dropout with a non-ReLU activation, whose mask the
        hand-written backward cannot recover; a subclass that computes something else)."""
        if not self.fuse_dispatch or type(self) is not ExpertBank:
            return None
        impl = self.resolved_impl(x_TD)
        if impl == "grouped_mm" and not _grouped_mm_applies(x_TD, self.ffn_dim):
            return None
        p_drop = self.activation_dropout if self.training else 0.0
        if impl not in ("fused", "grouped_mm") or (p_drop > 0 and self.activation_name != "relu"):
            return None
        return impl

    def forward_combined(self, x_TD: torch.Tensor, w_N: torch.Tensor, token_N: torch.Tensor,
                         counts_E: torch.Tensor, impl: str) -> torch.Tensor:
        """``out_t = sum_r w_r FFN_e(r)(x_t(r))`` over the sorted rows r (``token_N[r]`` their
        token, ``w_N[r]`` their combine weight, ``counts_E[e]`` rows for expert e, then the
        tail of dropped rows) -> (T, D), without keeping the gathered rows for backward
        (:class:`_FusedDispatchFFN`). ``impl``: :meth:`combined_impl`'s answer."""
        p_drop = self.activation_dropout if self.training else 0.0
        return _combined(self, self, x_TD, w_N, token_N, counts_E, impl, p_drop)

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


class SegmentedExpertBank(ExpertBank):
    """MultiHash's experts (Roller et al. 2021, Sec. 4 "MultiHash layers"): the weights of an
    :class:`ExpertBank`, computed per segment. With N hash functions, column i of the
    router's ids ``ids_TN`` picks the expert of segment i; both weight matrices are split
    along their output dim (F/N columns of W1, D/N columns of W2):

        h_t = act( concat_i [ x_t W1_{k_i(t)}[:, F_i] + b1_{k_i(t)}[F_i] ] )
        y_t =      concat_i [ h_t W2_{k_i(t)}[:, D_i] + b2_{k_i(t)}[D_i] ]

    Not a per-slot computation (h_t mixes the segments of N experts), so the layer calls
    :meth:`forward_segments` with the token rows and the dispatcher instead of dispatch ->
    experts -> combine. Local experts only (``--hash-multi`` > 1 refuses expert parallelism).
    """

    variant = "segmented"

    def __init__(self, num_experts: int, model_dim: int, ffn_dim: int, activation: str = "relu",
                 activation_dropout: float = 0.0, impl: str = "auto", *, num_segments: int = 1,
                 first_expert: int = 0, seed: Optional[int] = None):
        N = int(num_segments)
        if N < 1 or model_dim % N or ffn_dim % N:
            raise ValueError(
                f"--hash-multi: {N} does not divide both the model dim {model_dim} and the expert FFN dim {ffn_dim}; "
                "allowed: a common divisor of both"
            )
        super().__init__(num_experts, model_dim, ffn_dim, activation, activation_dropout, impl,
                         first_expert=first_expert, seed=seed)
        self.num_segments = N

    def forward_segments(self, x_TD: torch.Tensor, ids_TN: torch.Tensor, dispatcher) -> torch.Tensor:
        """(T, D) output of the MultiHash equations; rows whose ids are dropped (-1) get zeros."""
        return segmented_ffn(x_TD, ids_TN, self, dispatcher, self.training)


def segmented_ffn(x_TD: torch.Tensor, ids_TN: torch.Tensor, experts: ExpertBank, dispatcher, training: bool) -> torch.Tensor:
    """The MultiHash equations (:class:`SegmentedExpertBank`) over ``experts``' weights.

    ``ids_TN[:, i]`` is k_i. Per hash function i the tokens are sorted by k_i (the
    dispatcher's one-slot permutation) and segment i of the chosen experts is applied with
    one grouped matmul: 2N grouped matmuls of 1/N of an expert each, i.e. one expert FFN per
    token. N = 1 is the plain expert FFN.
    """
    T, D = x_TD.shape
    N = ids_TN.shape[1]
    F = experts.ffn_dim
    sF, sD = F // N, D // N
    if not bool((ids_TN >= 0).any()):
        # keep every parameter in the graph (distributed gradient reduction sees them all)
        return x_TD.new_zeros(T, D) + 0.0 * sum(p.sum() for p in experts.parameters())
    routes = []
    h_parts = []
    for i in range(N):
        # rows of dropped ids come last (the tail): zero output, no bias (expert E), no gradient
        x_RD, counts_E, plan = dispatcher.dispatch(x_TD, ids_TN[:, i : i + 1])
        expert_R = expert_of_rows(counts_E, x_RD.shape[0])
        fs = slice(i * sF, (i + 1) * sF)
        h_RS = grouped_matmul(x_RD, experts.w1_EDF[:, :, fs], counts_E, experts.impl)
        h_RS = add_group_bias(h_RS, experts.b1_EF[:, fs], expert_R)
        h_parts.append(h_RS.new_zeros(T, sF).index_copy(0, plan.token_N, h_RS))
        routes.append((plan.token_N, counts_E, expert_R))
    h_TF = experts.activation(torch.cat(h_parts, dim=1))
    h_TF = F_.dropout(h_TF, p=experts.activation_dropout, training=training)
    y_parts = []
    for i, (token_R, counts_E, expert_R) in enumerate(routes):
        ds = slice(i * sD, (i + 1) * sD)
        y_RS = grouped_matmul(h_TF.index_select(0, token_R), experts.w2_EFD[:, :, ds], counts_E, experts.impl)
        y_RS = add_group_bias(y_RS, experts.b2_ED[:, ds], expert_R)
        y_parts.append(y_RS.new_zeros(T, sD).index_copy(0, token_R, y_RS))
    return torch.cat(y_parts, dim=1)


class SharedExpertBank(ExpertBank):
    """DeepSeekMoE's shared experts (Dai et al. 2024, arXiv 2401.06066, Sec. 3.2 "shared expert
    isolation"): N expert FFNs that every token goes through, their outputs summed with weight 1,

        y_t = sum_{i < N} fc2_i(dropout(act(fc1_i(x_t))))        (N = ``num_experts``, F_s = ``ffn_dim``)

    Stored like an :class:`ExpertBank` of N experts (``w1_EDF`` with E = N, ...), each expert
    initialised like a dense ``nn.Linear`` FFN of hidden F_s from its own generator (seed: the
    caller's, :func:`moe_plugin.moe_layer.build_moe_layer` derives it from the layer's), so the
    N experts are N separate FFNs as in the paper. Computed as **one** FFN of hidden N * F_s:
    the N first-layer matrices side by side (D, N F_s), the N second-layer ones stacked
    (N F_s, D) and the N output biases summed. That is the sum of the N FFNs exactly (the
    hidden units of different experts never mix; only the floating-point order of the
    second matmul's sum differs), and one dense matmul pair instead of N (DeepSeek's public
    code builds its shared experts as one MLP of hidden ``n_shared_experts *
    moe_intermediate_size`` too). No routing, no capacity: nothing is dropped.

    ``forward(x_TD, valid_T)`` (not the routed bank's sorted-rows signature): rows where
    ``valid_T`` is False (padding) get zero output, and so no gradient reaches the weights
    from them; the rows are computed and masked (no host sync to count them).
    """

    variant = "shared"

    def forward(self, x_TD: torch.Tensor, valid_T: Optional[torch.Tensor] = None) -> torch.Tensor:  # type: ignore[override]
        """(T, D) -> (T, D): the sum of the N shared experts' outputs, zero where ``valid_T`` is False."""
        N, D, F = self.num_experts, self.model_dim, self.ffn_dim
        dt = x_TD.dtype
        # the N experts' hidden units side by side: column block i of w1_DH is expert i's W1
        w1_DH = self.w1_EDF.to(dt).permute(1, 0, 2).reshape(D, N * F)
        b1_H = self.b1_EF.to(dt).reshape(N * F)
        w2_HD = self.w2_EFD.to(dt).reshape(N * F, D)
        b2_D = self.b2_ED.to(dt).sum(0)
        h_TH = self.activation(torch.addmm(b1_H, x_TD, w1_DH))
        p_drop = self.activation_dropout if self.training else 0.0
        h_TH = F_.dropout(h_TH, p=p_drop, training=p_drop > 0)
        y_TD = torch.addmm(b2_D, h_TH, w2_HD)
        if valid_T is not None:
            y_TD = torch.where(valid_T.unsqueeze(1), y_TD, torch.zeros((), dtype=y_TD.dtype, device=y_TD.device))
        return y_TD


class BaseSublayerBank(nn.Module):
    """BASE's experts (Lewis et al. 2021) with batched weights; expert e maps x to ``f_e(x) - x``.

    f_e = S residual sublayers ``x + W2 act(W1 LN(x))`` (fairseq's ``BaseSublayer``): per
    sublayer a LayerNorm (``ln_weight_ESD``/``ln_bias_ESD``, eps 1e-5) and an
    :class:`ExpertBank` FFN computed by grouped matmul over rows sorted by expert. W2 starts
    at zero, its bias and W1 as ``nn.Linear`` (fairseq zeroes ``ff2.weight`` only).
    Every parameter has the expert dimension first. Holds experts ``first_expert ..``;
    sublayer s's FFNs are initialised per expert from seed ``mix_seed(seed, s)`` (module
    docstring).
    """

    def __init__(
        self,
        num_experts: int,
        model_dim: int,
        ffn_dim: int,
        num_sublayers: int = 1,
        activation: str = "relu",
        impl: str = "auto",
        *,
        first_expert: int = 0,
        seed: Optional[int] = None,
    ):
        super().__init__()
        E, D, S = num_experts, model_dim, num_sublayers
        self.num_experts, self.model_dim, self.num_sublayers = E, D, S
        self.first_expert = int(first_expert)
        self.seed = draw_seed() if seed is None else int(seed)
        self.ln_weight_ESD = nn.Parameter(torch.ones(E, S, D))
        self.ln_bias_ESD = nn.Parameter(torch.zeros(E, S, D))
        self.ffns = nn.ModuleList(
            [ExpertBank(E, D, ffn_dim, activation=activation, activation_dropout=0.0, impl=impl,
                        first_expert=first_expert, seed=mix_seed("moe_plugin.base_sublayer", self.seed, s))
             for s in range(S)]
        )
        for bank in self.ffns:
            with torch.no_grad():
                bank.w2_EFD.zero_()

    #: as :attr:`ExpertBank.fuse_dispatch` (one sublayer only: f(x) - x = FFN_e(LN_e(x)))
    fuse_dispatch = True

    def combined_impl(self, x_TD: torch.Tensor) -> Optional[str]:
        """With one sublayer, f_e(x) - x is one FFN of a per-expert LayerNorm: the fused
        gather -> LN -> FFN -> combine of :class:`_FusedDispatchFFN` applies (the LN is
        recomputed in backward); with more, None (the separate path)."""
        if not self.fuse_dispatch or self.num_sublayers != 1:
            return None
        return self.ffns[0].combined_impl(x_TD)

    def forward_combined(self, x_TD: torch.Tensor, w_N: torch.Tensor, token_N: torch.Tensor,
                         counts_E: torch.Tensor, impl: str) -> torch.Tensor:
        """``out_t = sum_r w_r (f_e(r)(x_t) - x_t)`` (:meth:`ExpertBank.forward_combined`)."""
        return _combined(self, self.ffns[0], x_TD, w_N, token_N, counts_E, impl, 0.0,
                         ln=(self.ln_weight_ESD[:, 0], self.ln_bias_ESD[:, 0]))

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x_ND: rows sorted by expert, ``counts_E[e]`` rows for expert e -> f(x) - x, (N, D)."""
        N, D = x_ND.shape
        if N == 0:
            # keep every parameter in the graph (distributed gradient reduction)
            return x_ND.new_zeros(0, D) + 0.0 * sum(p.sum() for p in self.parameters())
        # tail rows (dropped slots, sorted last) borrow the last expert's LayerNorm; the
        # banks give them zero output and zero gradient
        expert_N = expert_of_rows(counts_E, N).clamp(max=self.num_experts - 1)
        h_ND = x_ND
        delta_ND = None
        for s, bank in enumerate(self.ffns):
            z_ND = F_.layer_norm(h_ND, (D,), eps=1e-5)
            ln_w_ND = self.ln_weight_ESD[:, s].index_select(0, expert_N).to(z_ND.dtype)
            z_ND = torch.addcmul(self.ln_bias_ESD[:, s].index_select(0, expert_N).to(z_ND.dtype), z_ND, ln_w_ND)
            u_ND = bank(z_ND, counts_E)
            delta_ND = u_ND if delta_ND is None else delta_ND + u_ND
            h_ND = x_ND + delta_ND
        return delta_ND


#: Router.expert_variant -> the bank class build_expert_bank builds for it
EXPERT_VARIANTS: Dict[str, type] = {"ffn": ExpertBank, "segmented": SegmentedExpertBank}


def build_expert_bank(variant: str, num_experts: int, model_dim: int, ffn_dim: int, *, activation: str = "relu",
                      activation_dropout: float = 0.0, first_expert: int = 0, seed: Optional[int] = None,
                      num_segments: int = 1) -> ExpertBank:
    """The bank of ``variant`` holding experts ``first_expert .. first_expert + num_experts - 1``."""
    if variant not in EXPERT_VARIANTS:
        raise ValueError(f"expert variant {variant!r} (declared by the router) is not known; "
                         f"allowed: {', '.join(EXPERT_VARIANTS)}")
    extra = {"num_segments": num_segments} if variant == "segmented" else {}
    return EXPERT_VARIANTS[variant](num_experts, model_dim, ffn_dim, activation=activation,
                                    activation_dropout=activation_dropout, first_expert=first_expert, seed=seed,
                                    **extra)
