"""The hash router's own MoE layer (``hashed.py``): MultiHash (``--hash-multi N > 1``) and
the authors' per-expert ``LN(x + FFN(x))`` (``--hash-expert-norm``).

Legend: T tokens, D model dim, F expert hidden dim, E experts, N hash functions,
R routed rows of one hash function sorted by expert (non-padding tokens), S columns of one
segment (F/N or D/N).

MultiHash equations (hashed.py's docstring; both weight matrices split along their output dim):

    h_t = act( concat_i [ x_t W1_{k_i(t)}[:, F_i] + b1_{k_i(t)}[F_i] ] )
    y_t =      concat_i [ h_t W2_{k_i(t)}[:, D_i] + b2_{k_i(t)}[D_i] ]

``--hash-expert-norm``: y_t = LN(x_t + FFN_{k(t)}(x_t)) with one LayerNorm shared by all
experts of the layer, as ParlAI's ``HashLayerFFN`` (``hash_ladder.py``) computes it; the
decoder layer's own residual and LayerNorm then follow as usual.

Kept apart from ``hashed.py`` (whose name does not start with "_", so the routing package
imports it) because it subclasses :class:`MoELayer`, and ``moe_layer`` imports the routing
package: this module is imported only when such a layer is built.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F_

from moe_plugin.experts import add_group_bias, expert_of_rows, grouped_matmul
from moe_plugin.moe_layer import MoELayer


class HashMoELayer(MoELayer):
    """A Hash layer that needs its own expert computation over an :class:`ExpertBank`'s
    weights (E, D, F) / (E, F, D): MultiHash (N > 1) and/or the shared expert LayerNorm.

    MultiHash: per hash function i the tokens are sorted by k_i (the dispatcher's
    permutation) and segment i of the chosen experts is applied with one grouped matmul;
    local experts only (``HashRouter.validate`` refuses ``--moe-expert-parallel``). N = 1
    is the standard dispatch -> experts -> combine. Padding tokens get a zero output (the
    residual carries them), like a dropped slot in :class:`MoELayer`, with or without the
    expert norm.
    """

    def __init__(self, router, experts, dispatcher=None, *, expert_norm: bool = False):
        super().__init__(router, experts, dispatcher)
        N, D, F = router.num_hashes, experts.model_dim, experts.ffn_dim
        if D % N or F % N:
            raise ValueError(
                f"--hash-multi: {N} does not divide both the model dim {D} and the expert FFN dim {F}; "
                "allowed: a common divisor of both"
            )
        # ParlAI's HashLayerFFN: one LayerNorm (default init) shared by the experts
        self.expert_norm = nn.LayerNorm(D) if expert_norm else None

    def compute(self, x_TD: torch.Tensor, route) -> torch.Tensor:
        """The layer's FFN for one routing decision (routing, token ids and the record /
        replay under activation checkpointing are :class:`MoELayer`'s) -> (T, D)."""
        if self.router.num_hashes > 1:
            y_TD = multihash_ffn(x_TD, route.expert_ids_TK, self.experts, self.dispatcher, self.training)
        else:
            y_TD = super().compute(x_TD, route)
        if self.expert_norm is not None:
            routed_T1 = route.expert_ids_TK[:, :1] >= 0
            y_TD = torch.where(routed_T1, self.expert_norm(x_TD + y_TD), torch.zeros_like(y_TD))
        return y_TD


def multihash_ffn(x_TD: torch.Tensor, ids_TN: torch.Tensor, experts, dispatcher, training: bool) -> torch.Tensor:
    """(T, D) output of the MultiHash equations; rows whose ids are ``DROPPED`` (-1) get zeros.

    ``ids_TN[:, i]`` is k_i. Cost: 2N grouped matmuls of 1/N of an expert each, i.e. one
    expert FFN per token.
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
