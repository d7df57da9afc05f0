"""The pass order, as data, and the loop that runs it with logging.

Each pass is ``fn(gm, ctx) -> PassResult``; the pipeline logs, per pass, the node-count
change, the pass's summary and its time on the ``toprovar`` logger (enable with
``TORCH_LOGS="+toprovar"`` or ``logging.getLogger("toprovar").setLevel(logging.DEBUG)``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch.fx as fx

from .context import PassContext, PassResult
from .find_attention import find_attention
from .hoist_entropy_outputs import hoist_entropy_outputs
from .rewrite_attention import rewrite_attention

log = logging.getLogger("toprovar")

Pass = Callable[[fx.GraphModule, PassContext], PassResult]

# Observe mode: attention becomes FAE, entropy leaves the graph as extra outputs.
OBSERVE_PASSES: list[Pass] = [find_attention, rewrite_attention, hoist_entropy_outputs]


def passes_for(mode: str) -> list[Pass]:
    """The literal pass list for a mode."""
    if mode == "observe":
        return OBSERVE_PASSES
    from .prune_pipeline import PRUNE_PASSES

    return PRUNE_PASSES


def run_passes(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Run the passes of ``ctx.mode`` over ``gm`` in order."""
    for p in passes_for(ctx.mode):
        before = len(gm.graph.nodes)
        t0 = time.perf_counter()
        result = p(gm, ctx)
        gm = result.gm
        log.debug(
            "graph %d: %s: %s (nodes %d -> %d, %.1f ms)",
            ctx.graph_id, p.__name__, result.summary, before, len(gm.graph.nodes), 1e3 * (time.perf_counter() - t0),
        )
    return gm
