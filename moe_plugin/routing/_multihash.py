"""MultiHash expert computation for the hash router (``hashed.py``, ``--hash-multi N > 1``).

Legend: T tokens, D model dim, F expert hidden dim, E experts, N hash functions,
R routed rows of one hash function sorted by expert (non-padding tokens), S columns of one
segment (F/N or D/N).

Equations (hashed.py's docstring; both weight matrices split along their output dim):

    h_t = act( concat_i [ x_t W1_{k_i(t)}[:, F_i] + b1_{k_i(t)}[F_i] ] )
    y_t =      concat_i [ h_t W2_{k_i(t)}[:, D_i] + b2_{k_i(t)}[D_i] ]

Kept apart from ``hashed.py`` (whose name does not start with "_", so the routing package
imports it) because it subclasses :class:`MoELayer`, and ``moe_layer`` imports the routing
package: this module is imported only when a MultiHash layer is built.
"""

from typing import Optional

import torch
import torch.nn.functional as F_

from moe_plugin.experts import add_group_bias, expert_of_rows, grouped_matmul
from moe_plugin.moe_layer import MoELayer
from moe_plugin.routing.interface import TokenInfo


class MultiHashMoELayer(MoELayer):
    """The MultiHash FFN over an :class:`ExpertBank`'s weights (E, D, F) / (E, F, D).

    Per hash function i the tokens are sorted by k_i (the dispatcher's permutation) and
    segment i of the chosen experts is applied with one grouped matmul; padding tokens get
    a zero output (the residual carries them), like a dropped slot in :class:`MoELayer`.
    Local experts only (``HashRouter.validate`` refuses ``--moe-expert-parallel``).
    """

    def __init__(self, router, experts, dispatcher=None):
        super().__init__(router, experts, dispatcher)
        N, D, F = router.num_hashes, experts.model_dim, experts.ffn_dim
        if D % N or F % N:
            raise ValueError(
                f"--hash-multi: {N} does not divide both the model dim {D} and the expert FFN dim {F}; "
                "allowed: a common divisor of both"
            )

    def forward(self, x: torch.Tensor, tokens: Optional[TokenInfo] = None) -> torch.Tensor:
        """x: (..., D), e.g. fairseq's (T_seq, B, D). Returns the same shape."""
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        if tokens is None and self.token_source is not None:
            tokens = self.token_source()
        if tokens is None:
            raise RuntimeError("the hash router needs token ids, and none reached the MultiHash layer")
        route = self.router(x_TD, tokens=tokens)
        y_TD = multihash_ffn(x_TD, route.expert_ids_TK, self.experts, self.dispatcher, self.training)
        self.last_aux_losses = route.aux_losses
        stats = dict(route.stats)
        stats["num_tokens"] = (~tokens.pad_mask_T).sum().detach()
        self.last_stats = stats
        return y_TD.reshape(shape)


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
