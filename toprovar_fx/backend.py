"""The ``toprovar`` Dynamo backend.

``torch.compile(fn, backend="toprovar", options={...})`` finds this function through the
``torch_dynamo_backends`` entry point. Dynamo calls it once per graph it captures (one per
graph fragment when user code graph-breaks); every graph goes through the same passes, and
every graph of one compiled function shares one runtime ``Session``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx as fx

from .passes.context import PassContext
from .passes.pipeline import run_passes
from .runtime.dispatch import accumulate_scale, dispatch_branch
from .runtime.session import Session
from .settings import Settings, parse_options

log = logging.getLogger("toprovar")

_RUNTIME_CALLS = (dispatch_branch, accumulate_scale)

# options dict (kept alive here) -> its Session; Dynamo passes the same dict object for every
# graph of one torch.compile call.
_SESSIONS_BY_OPTIONS: dict[int, tuple[Any, Session]] = {}


def _session_for(options: Mapping[str, Any] | None) -> Session:
    key = id(options)
    hit = _SESSIONS_BY_OPTIONS.get(key)
    if hit is not None and hit[0] is options:
        return hit[1]
    settings = parse_options(options)
    session = _new_session(settings)
    _SESSIONS_BY_OPTIONS[key] = (options, session)
    return session


def _new_session(settings: Settings) -> Session:
    policy = None
    message = None
    if settings.policy is not None:
        from .policies import PolicyError, load_policy

        try:
            policy = load_policy(settings.policy, preset=settings.preset)
        except PolicyError as err:
            if settings.strict:
                raise
            message = f"policy could not be loaded ({err}); running dense (observe mode)"
    if policy is None and settings.resolved_mode == "prune":
        settings = Settings(**{**settings.__dict__, "mode": "observe"})
    session = Session(settings, policy)
    if message:
        session.fallback(message)
    if policy is not None and settings.resolved_mode == "prune":
        from .runtime.decisions import Decider

        session.decider = Decider(session, policy)
    return session


def _ensure_recompile_budget(limit: int) -> None:
    """Raise Dynamo's recompile limit so a 10-13 scale sampler never silently runs eager.

    Dynamo reads the limit when a guard fails, before any backend is asked, so it cannot be
    scoped to our graphs; it is raised (never lowered) the first time a graph reaches us.
    """
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    if getattr(cfg, name) < limit:
        log.info("toprovar: raising torch._dynamo.config.%s from %d to %d", name, getattr(cfg, name), limit)
        setattr(cfg, name, limit)


class GraphRunner:
    """The callable handed back to Dynamo for one graph: runs it, then records entropy."""

    def __init__(self, session: Session, fn: Callable, hoisted: list[tuple[int, bool]], n_outputs: int,
                 sequence: bool):
        self.session = session
        self.fn = fn
        self.hoisted = hoisted  # (site id, whether the key length follows the entropy output)
        self.n_outputs = n_outputs
        self.sequence = sequence

    def __call__(self, *args: Any) -> Any:
        outs = self.fn(*args)
        if not self.hoisted:
            return outs
        n = self.n_outputs
        record = self.session.record_attention
        i = n
        for sid, with_len in self.hoisted:
            if with_len:
                record(sid, outs[i], key_len=int(outs[i + 1]))
                i += 2
            else:
                record(sid, outs[i])
                i += 1
        return tuple(outs[:n]) if self.sequence else outs[0]


def _copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy whose graph can be rewritten while ``gm`` stays runnable as the dense fallback."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return fx.GraphModule(gm, graph)


def _wants_inductor(settings: Settings, example_inputs: list[Any]) -> bool:
    if settings.inductor is not None:
        return settings.inductor
    return any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)


def compile_graph(gm: fx.GraphModule, example_inputs: list[Any], session: Session) -> Callable:
    """Run the passes over one Dynamo graph and return what Dynamo should call instead."""
    settings = session.settings
    t0 = time.perf_counter()
    _ensure_recompile_budget(settings.recompile_limit)
    graph_id = session.graphs
    ctx = PassContext(session=session, example_inputs=example_inputs, graph_id=graph_id,
                      mode=settings.resolved_mode)
    try:
        work = run_passes(_copy_graph_module(gm), ctx)
        fn: Callable = work.forward
        if _wants_inductor(settings, example_inputs):
            if any(n.op == "call_function" and n.target in _RUNTIME_CALLS for n in work.graph.nodes):
                # The dispatcher and the accumulation gate decide in Python at run time; tracing them
                # with fake tensors would freeze one decision into the compiled code. Such graphs
                # run as rewritten FX.
                log.info("toprovar: graph %d holds run-time decisions; not handed to Inductor", graph_id)
            else:
                from torch._inductor.compile_fx import compile_fx

                fn = compile_fx(work, example_inputs)
        runner: Callable = GraphRunner(session, fn, ctx.hoisted, ctx.n_outputs, ctx.outputs_sequence)
    except Exception as err:  # noqa: BLE001 - any failure must fall back to the traced graph
        if settings.strict:
            raise
        session.fallback(f"graph {graph_id} could not be rewritten ({type(err).__name__}: {err}); it runs dense")
        runner = gm.forward
    session.note_compile(time.perf_counter() - t0)
    return runner


def toprovar_backend(gm: fx.GraphModule, example_inputs: list[Any], options: Mapping[str, Any] | None = None,
                     **kwargs: Any) -> Callable:
    """Dynamo backend entry point (``backend="toprovar"``)."""
    if kwargs:
        raise ValueError(
            f"toprovar: unexpected torch.compile argument(s) {sorted(kwargs)}; pass settings in options={{...}}"
        )
    return compile_graph(gm, example_inputs, _session_for(options))
