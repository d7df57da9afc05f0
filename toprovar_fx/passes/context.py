"""What passes share while one graph goes through the pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx


@dataclass
class PassResult:
    """What a pass did: whether it changed the graph and a one-line summary for the log."""

    gm: fx.GraphModule
    changed: bool
    summary: str = ""


@dataclass
class PassContext:
    """Inputs of the pipeline and the annotations passes hand to each other."""

    session: Any  # toprovar_fx.runtime.session.Session
    example_inputs: list[Any]
    graph_id: int
    mode: str  # observe | prune
    sites: list[Any] = field(default_factory=list)  # AttentionSite, from find_attention
    rewritten: list[tuple[Any, fx.Node]] = field(default_factory=list)  # (site, entropy node)
    site_ids: dict[fx.Node, int] = field(default_factory=dict)  # entropy node -> session site id
    hoisted: list[tuple[int, bool]] = field(default_factory=list)  # (site id, key length follows) in output order
    n_outputs: int = 0
    outputs_sequence: bool = True
    branches: list[Any] = field(default_factory=list)  # ResidualBranch, from find_residual_branches
    # Session site ids registered by rewrite_attention, in rewrite order. A second rewrite of the
    # same Dynamo graph (the dense variant of a prune-mode graph) passes them as reuse_site_ids
    # so that both variants record under the same sites instead of registering duplicates.
    registered_site_ids: list[int] = field(default_factory=list)
    reuse_site_ids: list[int] | None = None
    spec_ids: list[int] = field(default_factory=list)  # session branch specs routed, in graph order
