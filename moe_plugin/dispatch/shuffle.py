"""BASE layers' token shuffle (``--base-shuffle``): every real token goes to a random worker
before routing and comes back to its row after.

Legend: T rows on this rank (padding included), V this rank's real (non-padding) tokens,
R rows it receives, D model dim, W workers of the process group.

fairseq (``fairseq/modules/base_layer.py``, ``BaseLayer.forward``, training only) permutes
its T rows with ``torch.randperm`` and sends the permuted rows in W equal consecutive chunks,
chunk w to rank w (an all-to-all without split sizes); each rank routes what it received,
and the inverse all-to-all and the inverse permutation put every result back. The point is
that the batch a rank balances over is a random sample of the global batch, not a few
documents. Here (:func:`plan_shuffle`, :class:`ShufflePlan`):

1. this rank's V real tokens, in a random order ``order_V`` (padding does not travel: it
   takes no expert's slot in moe_plugin, and its output is 0, as without the shuffle);
2. ``send_W``: consecutive chunks of that order, chunk w to rank w, of ``V // W`` tokens, one
   more for ``V mod W`` of them: ranks ``rank, rank + 1, ...`` (mod W). When V is a multiple
   of W these are fairseq's equal chunks; the rotation makes every rank receive exactly V
   tokens whenever all ranks hold the same V;
3. one count exchange (W integers) tells every rank what it receives (``recv_W``), and the
   token ids (:class:`TokenInfo` fields) travel with the rows, so the router sees the ids of
   the tokens it routes;
4. :meth:`ShufflePlan.run`: the rows go out (differentiable :func:`all_to_all`), the layer
   runs on the R received rows, the results go back by the reverse all-to-all and land at
   the rows they left. Gradients take the same way back.

Uneven ranks: fairseq's equal chunks need the same T on every rank, divisible by W (gloo and
NCCL fail otherwise). Here any V per rank works (0 included): rank q receives
``sum_r chunk_q(V_r)`` tokens, so the shuffle also evens out the ranks' token counts
(within W of the mean).

Random numbers: the permutation comes from a CPU ``torch.Generator`` seeded from
(``moe_seed``, layer index, rank, update count, shuffles so far in this update) only
(:func:`shuffle_seed`), never from the global RNG. fairseq draws from the global RNG, which
its trainer reseeds with ``seed + update`` on every rank at every step: every rank draws the
same permutation there, and the draw shifts every later random number (dropout) of the
step. Here ranks draw different permutations, dropout draws the same masks with and without
the shuffle, and a resumed run draws the same permutations as an uninterrupted one (the
update count comes from fairseq's ``set_num_updates``). The plan is drawn once per forward,
outside any activation-checkpointed region: a recompute reuses it (:meth:`ShufflePlan.run`
does no count exchange and draws nothing).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable, List, Optional

import torch

from moe_plugin.dispatch.all_to_all import all_to_all, exchange_counts, exchange_rows
from moe_plugin.dispatch.all_to_all import rank as dist_rank, world_size as dist_world_size
from moe_plugin.routing.interface import TokenInfo


def shuffle_seed(seed: Optional[int], layer_index: Optional[int], rank: int, update: int, count: int) -> int:
    """The seed of one shuffle: a hash of its coordinates (seed None: 1, fairseq's --seed)."""
    key = f"base-shuffle/{1 if seed is None else int(seed)}/{-1 if layer_index is None else int(layer_index)}"
    key += f"/{int(rank)}/{int(update)}/{int(count)}"
    return int(hashlib.sha256(key.encode()).hexdigest()[:15], 16)


def chunk_sizes(num_tokens: int, world_size: int, rank: int) -> List[int]:
    """Tokens this rank sends to each rank: ``V // W``, plus one for the ``V mod W`` ranks
    ``rank, rank + 1, ...`` (mod W)."""
    base, extra = divmod(int(num_tokens), world_size)
    return [base + int((w - rank) % world_size < extra) for w in range(world_size)]


@dataclasses.dataclass
class ShufflePlan:
    """One shuffle: where this rank's rows go and what it receives (see the module docstring).

    ``order_V``: rows of this rank's input in sending order (real tokens only);
    ``send_W``/``recv_W``: rows sent to / received from each rank; ``tokens_R``: the token
    ids of the received rows (None when the layer got none).
    """

    num_rows: int
    order_V: torch.Tensor
    send_W: List[int]
    recv_W: List[int]
    tokens_R: Optional[TokenInfo]
    group: object = None

    def send(self, x_TD: torch.Tensor) -> torch.Tensor:
        """This rank's rows -> the R rows it routes (grouped by source rank)."""
        return all_to_all(x_TD.index_select(0, self.order_V), self.send_W, self.recv_W, self.group)

    def back(self, y_RD: torch.Tensor) -> torch.Tensor:
        """Results of the received rows -> this rank's (T, D) rows (0 at padding rows)."""
        y_VD = all_to_all(y_RD, self.recv_W, self.send_W, self.group)
        return y_VD.new_zeros((self.num_rows,) + tuple(y_VD.shape[1:])).index_copy(0, self.order_V, y_VD)

    def run(self, layer: Callable, x: torch.Tensor) -> torch.Tensor:
        """``layer(rows, tokens=...)`` on the shuffled tokens, results back in place; x (..., D)."""
        y_RD = layer(self.send(x.reshape(-1, x.shape[-1])), tokens=self.tokens_R)
        return self.back(y_RD).view(x.shape)


def plan_shuffle(
    num_rows: int,
    tokens: Optional[TokenInfo],
    generator: torch.Generator,
    device: torch.device,
    group=None,
) -> ShufflePlan:
    """Draw this rank's permutation and exchange counts and token ids (a collective: every
    rank of ``group`` calls it, in the same order). ``tokens``: the TokenInfo of the rows, or
    None (then every row is a real token; all ranks must agree on None)."""
    W, r = dist_world_size(group), dist_rank(group)
    if tokens is not None and tokens.ids_T.shape[0] != num_rows:
        raise RuntimeError(f"--base-shuffle: {num_rows} hidden states but {tokens.ids_T.shape[0]} token ids")
    if tokens is None:
        idx_V = torch.arange(num_rows, device=device)
    else:
        idx_V = torch.nonzero(~tokens.pad_mask_T).squeeze(1).to(device)
    V = idx_V.numel()
    order_V = idx_V[torch.randperm(V, generator=generator).to(device)]
    send_W = chunk_sizes(V, W, r)
    send_W1 = torch.tensor(send_W, dtype=torch.long, device=device).view(W, 1)
    recv_W = exchange_counts(send_W1, group).view(-1).tolist()
    tokens_R = None
    if tokens is not None:
        if tokens.incremental or tokens.next_ids_T is None:
            raise RuntimeError("--base-shuffle: incremental decoding is never shuffled (evaluation only)")
        fields = (tokens.ids_T, tokens.prev_ids_T, tokens.positions_T, tokens.next_ids_T)
        meta_V4 = torch.stack([f.to(device=device, dtype=torch.long) for f in fields], 1).index_select(0, order_V)
        meta_R4 = exchange_rows(meta_V4, send_W, recv_W, group)
        tokens_R = TokenInfo(
            ids_T=meta_R4[:, 0],
            prev_ids_T=meta_R4[:, 1],
            positions_T=meta_R4[:, 2],
            pad_mask_T=torch.zeros(meta_R4.shape[0], dtype=torch.bool, device=device),
            next_ids_T=meta_R4[:, 3],
        )
    return ShufflePlan(int(num_rows), order_V, send_W, recv_W, tokens_R, group)


def shuffle_generator(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g
