"""The expert bank: E feed-forward networks with batched weights, computed per group.

Legend: N rows (token slots) sorted by expert, D model dim, F expert hidden dim, E experts.

Weights are stored batched, ``w1_EDF`` (E, D, F) and ``w2_EFD`` (E, F, D), so the bank
computes every expert in one grouped matmul over rows already sorted by expert
(``torch._grouped_mm`` where available, else a padded ``bmm``). The bank knows nothing of
routing: it takes rows sorted by expert and the count of rows per expert.
"""

from __future__ import annotations

import math
from typing import Callable

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


def grouped_matmul(x_ND: torch.Tensor, w_EDF: torch.Tensor, counts_E: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Rows ``x_ND`` sorted by group (``counts_E`` rows each) times that group's matrix.

    impl: ``grouped_mm`` (torch._grouped_mm), ``bmm`` (pad each group to the largest, one
    batched matmul) or ``loop`` (the slow obvious reference); ``auto`` picks the first
    available of grouped_mm and bmm.
    """
    if impl == "auto":
        # torch._grouped_mm needs 16-byte aligned strides (e.g. D, F multiples of 4 in fp32)
        es = x_ND.element_size()
        aligned = (x_ND.shape[1] * es) % 16 == 0 and (w_EDF.shape[2] * es) % 16 == 0
        impl = "grouped_mm" if _HAS_GROUPED_MM and aligned else "bmm"
    if impl == "grouped_mm":
        offs_E = counts_E.cumsum(0).to(torch.int32)
        return _ContiguousGrad.apply(torch._grouped_mm(x_ND, w_EDF.to(x_ND.dtype), offs=offs_E))
    if impl == "loop":
        chunks = torch.split(x_ND, counts_E.tolist())
        return torch.cat([c @ w_EDF[e].to(x_ND.dtype) for e, c in enumerate(chunks)], dim=0)
    if impl == "bmm":
        E = w_EDF.shape[0]
        N = x_ND.shape[0]
        C = int(counts_E.max()) if N > 0 else 0
        starts_E = counts_E.cumsum(0) - counts_E
        group_N = torch.repeat_interleave(torch.arange(E, device=x_ND.device), counts_E, output_size=N)
        slot_N = torch.arange(N, device=x_ND.device) - starts_E[group_N]
        padded_ECD = x_ND.new_zeros(E, C, x_ND.shape[1])
        padded_ECD[group_N, slot_N] = x_ND
        out_ECF = torch.bmm(padded_ECD, w_EDF.to(x_ND.dtype))
        return out_ECF[group_N, slot_N]
    raise ValueError(f"grouped_matmul: unknown impl {impl!r}; allowed: auto, grouped_mm, bmm, loop")


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
        E, D, F = num_experts, model_dim, ffn_dim
        self.num_experts, self.model_dim, self.ffn_dim = E, D, F
        self.w1_EDF = nn.Parameter(torch.empty(E, D, F))
        self.b1_EF = nn.Parameter(torch.empty(E, F))
        self.w2_EFD = nn.Parameter(torch.empty(E, F, D))
        self.b2_ED = nn.Parameter(torch.empty(E, D))
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

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x_ND: rows sorted by expert, ``counts_E[e]`` rows for expert e. Returns (N, D)."""
        N = x_ND.shape[0]
        if N == 0:
            # keep every parameter in the graph so distributed gradient reduction sees it
            return x_ND.new_zeros(0, self.model_dim) + 0.0 * sum(p.sum() for p in self.parameters())
        expert_N = torch.repeat_interleave(
            torch.arange(self.num_experts, device=x_ND.device), counts_E, output_size=N
        )
        h_NF = grouped_matmul(x_ND, self.w1_EDF, counts_E, self.impl) + self.b1_EF[expert_N].to(x_ND.dtype)
        h_NF = self.activation(h_NF)
        h_NF = F_.dropout(h_NF, p=self.activation_dropout, training=self.training)
        return grouped_matmul(h_NF, self.w2_EFD, counts_E, self.impl) + self.b2_ED[expert_N].to(x_ND.dtype)
