"""Expert parallelism (E/W experts per worker, tokens by all-to-all) and its checkpoints.

- :mod:`.all_to_all`: differentiable uneven all-to-all over torch.distributed.
- :mod:`.shuffle`: BASE's token shuffle (``--base-shuffle``): tokens to random workers
  before routing and back after.
- :mod:`.dispatcher`: :class:`ExpertParallelDispatcher` (the LocalDispatcher interface)
  and :func:`make_expert_parallel`, which turns a built MoE layer into this rank's part.
- :mod:`.layout`: the expert layout metadata every moe_lm checkpoint carries, and the
  clear error when a checkpoint does not fit the model loading it.
- :mod:`.checkpoints`: integrity checks of checkpoint files and the choice of a
  consistent set of per-rank shards to resume from.

``python -m moe_plugin.reshard`` merges or splits expert shards. docs/distributed.md
describes the whole workflow.
"""

from moe_plugin.parallel.all_to_all import all_to_all, exchange_counts  # noqa: F401
from moe_plugin.parallel.dispatcher import (  # noqa: F401
    ExpertParallelDispatcher,
    RankMismatchError,
    is_expert_parallel,
    make_expert_parallel,
    shard_experts,
)
from moe_plugin.parallel.layout import LayoutMismatchError, apply_layout, model_layout  # noqa: F401
