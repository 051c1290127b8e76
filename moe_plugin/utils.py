"""Small helpers shared by scripts: parameter counts."""

from typing import Tuple

import torch.nn as nn


def param_counts(model: nn.Module) -> Tuple[int, int]:
    """(total parameters, parameters active per token).

    Active = everything outside the expert banks, plus K/E of each MoE layer's experts
    (K = the router's current ``top_k``). For a dense model both numbers are equal.
    """
    from moe_plugin.moe_layer import MoELayer

    total = sum(p.numel() for p in model.parameters())
    inactive = 0.0
    for m in model.modules():
        if isinstance(m, MoELayer):
            n_exp = sum(p.numel() for p in m.experts.parameters())
            inactive += n_exp * (1.0 - m.router.top_k / m.num_experts)
    return total, int(round(total - inactive))
