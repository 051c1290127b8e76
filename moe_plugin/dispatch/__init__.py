"""Dispatch: move token slots to the experts that hold them and the results back.

- :mod:`.placement`: :class:`ExpertPlacement`, which experts live on which rank (the one
  place that knows).
- :mod:`.local`: :class:`LocalDispatcher`, every expert in this process.
- :mod:`.expert_parallel`: :class:`ExpertParallelDispatcher` (E/W experts per worker,
  tokens by all-to-all) and :func:`make_expert_parallel`.
- :mod:`.all_to_all`: differentiable uneven all-to-all over torch.distributed.
- :mod:`.shuffle`: BASE's token shuffle (``--base-shuffle``): tokens to random workers
  before routing and back after.

Core: no fairseq import. docs/distributed.md describes the whole workflow.
"""

from moe_plugin.dispatch.local import DispatchPlan, LocalDispatcher  # noqa: F401
from moe_plugin.dispatch.placement import ExpertPlacement  # noqa: F401
