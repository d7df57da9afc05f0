"""Compile the outlined branches of a dispatcher graph with Inductor.

Why: a graph that calls ``dispatch_branch`` decides in Python at run time (keep, skip, run on
the kept tokens), so it cannot be handed to Inductor whole: tracing the dispatcher would
freeze one decision into the compiled code. Its branches, however, are plain tensor code
(``insert_branch_dispatch`` guarantees it) and hold nearly all of the work. Each is compiled
here with ``torch.compile(dynamic=True)``, so one compiled branch serves every token count
(all scales, every bucketed kept count ``k``) without recompiling per shape.

Branches with the same code and no module state of their own (parameters arrive as inputs,
as Dynamo lifts them) compute the same function, so they share one compiled callable: the
32 blocks of a model compile each branch kind once.

Expects: ``gm`` from ``insert_branch_dispatch`` (submodules ``toprovar_branch_*`` passed to
``dispatch_branch`` through ``get_attr`` nodes). Guarantees: each such submodule is replaced
by a ``CompiledBranch`` with the same call signature and outputs; the graph is unchanged.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from ..runtime.dispatch import dispatch_branch

log = logging.getLogger("toprovar")


class CompiledBranch(torch.nn.Module):
    """An outlined branch run through its compiled callable (the FX module stays for reference)."""

    def __init__(self, original: fx.GraphModule, compiled: Callable) -> None:
        super().__init__()
        self.original = original
        self.compiled = compiled

    def forward(self, *inputs: Any) -> Any:
        return self.compiled(*inputs)


class _LazyCompiled:
    """The branch's code and its ``torch.compile`` made at the first call, at run time.

    Code generated while Dynamo compiles the enclosing graph (when the backend runs) is never
    traced by a nested ``torch.compile`` (seen on torch 2.13: its frames silently run
    eagerly), so the branch's function is generated here, at its first call.
    """

    def __init__(self, sub: fx.GraphModule, backend: str, options: dict[str, Any] | None = None) -> None:
        self.sub = sub
        self.backend = backend
        self.options = options  # Inductor config patches (option ``inductor_options``)
        self.compiled: Callable | None = None

    def __call__(self, *inputs: Any) -> Any:
        if self.compiled is None:
            fn = _fresh_forward(self.sub)
            self.compiled = torch.compile(fn, backend=self.backend, dynamic=True, fullgraph=True,
                                          options=self.options)
        return self.compiled(*inputs)


def _fresh_forward(sub: fx.GraphModule) -> Callable:
    """The branch's code as a new function: the graph copied into a module rooted at a plain
    dict of the attributes it reads (no ties to Dynamo's output module)."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(sub.graph, {}))
    attrs = {n.target: operator.attrgetter(n.target)(sub) for n in graph.nodes if n.op in ("get_attr", "call_module")}
    return fx.GraphModule(attrs, graph).forward


def _shareable(sub: fx.GraphModule) -> bool:
    return not any(n.op in ("get_attr", "call_module") for n in sub.graph.nodes)


def compile_branches(gm: fx.GraphModule, cache: dict[str, Callable], backend: str = "inductor",
                     options: dict[str, Any] | None = None) -> int:
    """Replace every dispatched branch of ``gm`` by a compiled one; returns how many.

    ``cache`` maps branch code to compiled callables; pass the session's so that graphs
    compiled later (Dynamo recompiles per scale) reuse what was compiled before. ``options``:
    the backend's config patches (``torch.compile(options=...)``), the same for every branch
    of one cache.
    """
    done = 0
    for node in gm.graph.find_nodes(op="call_function", target=dispatch_branch):
        attr = node.args[2]
        if not isinstance(attr, fx.Node) or attr.op != "get_attr":
            continue
        sub = getattr(gm, attr.target)
        if isinstance(sub, CompiledBranch):
            continue
        key = sub.code if _shareable(sub) else f"{id(sub)}:{sub.code}"
        compiled = cache.get(key)
        if compiled is None:
            compiled = cache[key] = _LazyCompiled(sub, backend, options)
        setattr(gm, attr.target, CompiledBranch(sub, compiled))
        done += 1
    log.debug("toprovar: %d branch(es) compiled with %s", done, backend)
    return done
