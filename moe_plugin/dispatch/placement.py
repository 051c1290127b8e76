"""Which experts live on which rank: the one place that knows.

Legend: E experts in a layer, W ranks (workers), L = E/W experts per rank, T tokens,
K slots per token.

Expert parallelism splits a layer's E experts into W contiguous blocks of L: rank w holds
global experts ``w*L .. w*L+L-1``. The dispatcher (routing tokens to ranks), the expert
builder (which experts to allocate), the checkpoint layout (which experts a file holds) and
the routers' traffic statistics (which expert is on which device) all read this class;
none computes a range of its own.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import torch


@dataclasses.dataclass(frozen=True)
class ExpertPlacement:
    """E experts over W ranks in contiguous blocks; this is rank ``rank``'s view.

    ``ExpertPlacement(E)`` (W = 1, rank 0) holds every expert: the local (data-parallel or
    one-process) layout. E not divisible by W raises ValueError at construction.
    """

    num_experts: int
    world_size: int = 1
    rank: int = 0

    def __post_init__(self):
        E, W = self.num_experts, self.world_size
        if E < 1:
            raise ValueError(f"--moe-expert-count: {E} is not allowed; it must be >= 1")
        if W < 1 or E % W:
            raise ValueError(
                f"--moe-expert-count: {E} experts cannot be split over {W} "
                f"workers (--distributed-world-size); expert parallelism needs --moe-expert-count "
                f"divisible by --distributed-world-size"
            )
        if not 0 <= self.rank < W:
            raise ValueError(f"expert parallelism: rank {self.rank} is outside 0..{W - 1}")

    @property
    def per_rank(self) -> int:
        """L: experts held by each rank."""
        return self.num_experts // self.world_size

    @property
    def first(self) -> int:
        """The first global expert id held by this rank."""
        return self.rank * self.per_rank

    @property
    def stop(self) -> int:
        """One past the last global expert id held by this rank."""
        return self.first + self.per_rank

    @property
    def range(self) -> range:
        """The global expert ids held by this rank."""
        return range(self.first, self.stop)

    @property
    def is_sharded(self) -> bool:
        """Whether this rank holds only part of the experts (W > 1)."""
        return self.world_size > 1

    def for_rank(self, rank: int) -> "ExpertPlacement":
        """The same split seen from another rank."""
        return ExpertPlacement(self.num_experts, self.world_size, rank)

    def device_of(self, expert_ids: torch.Tensor) -> torch.Tensor:
        """Rank holding each expert id (same shape); ids < 0 (dropped slots) -> -1."""
        dest = torch.div(expert_ids, self.per_rank, rounding_mode="floor")
        return torch.where(expert_ids >= 0, dest, torch.full_like(dest, -1))

    def local(self, expert_ids: torch.Tensor) -> torch.Tensor:
        """Local index (0..L-1) of each expert id on the rank holding it; ids < 0 -> -1."""
        local = expert_ids - self.device_of(expert_ids) * self.per_rank
        return torch.where(expert_ids >= 0, local, torch.full_like(local, -1))

    def describe(self) -> str:
        """Human-readable: which experts this rank holds (for error messages)."""
        return describe_placement(self.first, self.stop, self.num_experts, self.world_size, self.rank)


def describe_placement(first: int, stop: int, num_experts: int, world: int, rank: int) -> str:
    """Which experts a model or checkpoint holds, in words. ``rank < 0``: a shard of unknown rank."""
    if world <= 1 and (first, stop) == (0, num_experts):
        return f"all {num_experts} experts (1 worker)"
    if rank < 0:
        return f"experts {first}..{stop - 1} of {num_experts} (a shard of a {world}-worker expert-parallel run)"
    return f"experts {first}..{stop - 1} of {num_experts} (expert-parallel rank {rank} of {world})"


# ----------------------------------------------------------------------------------------
# Cross-device traffic of a routing decision (the figures SAM is judged by; the dispatchers
# report them for a router that declares ``simulated_devices``).
# ----------------------------------------------------------------------------------------


def simulated_homes(num_tokens: int, num_devices: int, device=None) -> torch.Tensor:
    """(T,) home device of each row when T rows are split into ``num_devices`` equal
    contiguous blocks (block r on device r): the layout the local dispatcher simulates."""
    return torch.div(torch.arange(num_tokens, device=device) * num_devices, max(num_tokens, 1), rounding_mode="floor")


def device_visits(expert_ids_TK: torch.Tensor, home_T: torch.Tensor, placement: ExpertPlacement) -> torch.Tensor:
    """(T,) number of distinct devices other than the token's home among its experts (ids < 0 ignored)."""
    T, K = expert_ids_TK.shape
    dev_TK = placement.device_of(expert_ids_TK)
    visits_TW = torch.zeros(T, placement.world_size, dtype=torch.bool, device=expert_ids_TK.device)
    visits_TW.scatter_(1, torch.where(dev_TK >= 0, dev_TK, home_T.unsqueeze(-1).expand(T, K)), True)
    visits_TW[torch.arange(T, device=expert_ids_TK.device), home_T] = False
    return visits_TW.sum(-1)


@torch.no_grad()
def traffic_stats(
    expert_ids_TK: torch.Tensor,
    home_T: torch.Tensor,
    placement: ExpertPlacement,
    valid_T: torch.Tensor,
    plain_ids_TK: Optional[torch.Tensor] = None,
) -> Dict[str, torch.Tensor]:
    """What a routing decision sends to other devices (detached scalars, no host sync).

    expert_ids_TK: routed ids (``-1`` = dropped or padding), home_T: the device each token
    lives on, valid_T: non-padding tokens (the ``_frac`` figures are per non-padding token).

    * ``xdev_tokens``: tokens sent to another device, each counted once per device it
      visits other than its own;
    * ``xdev_frac``: the same per non-padding token;
    * ``xdev_slots``: slots sent to another device by a dispatcher shipping one row per slot;
    * ``topk_xdev_frac`` (with ``plain_ids_TK``, the ids plain top-K routing of the same
      probabilities would choose): what that routing would send per non-padding token.
    """
    n = valid_T.sum().clamp(min=1).float()
    visits_T = device_visits(expert_ids_TK, home_T, placement)
    dev_TK = placement.device_of(expert_ids_TK)
    xdev_slots = ((expert_ids_TK >= 0) & (dev_TK != home_T.unsqueeze(-1))).sum().float()
    stats = {
        "xdev_tokens": visits_T.sum().float(),
        "xdev_frac": visits_T.sum().float() / n,
        "xdev_slots": xdev_slots,
    }
    if plain_ids_TK is not None:
        stats["topk_xdev_frac"] = device_visits(plain_ids_TK, home_T, placement).sum().float() / n
    return stats
