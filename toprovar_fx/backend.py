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
from torch._dynamo.exc import RestartAnalysis

from .lowering.cuda_graphs import CudaGraphCache, mutates_inputs
from .lowering.runners import GraphRunner, PlannedBlockRunner, ScaleSwitchRunner
from .passes.bucket_context import BucketPlan, bucket_plan
from .passes.context import PassContext
from .passes.graph_utils import is_static_input
from .passes.hoist_context import ContextSplit, split_context
from .passes.pipeline import run_passes
from .runtime.context_memo import ContextMemo, ContextRunner
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


def _copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy whose graph can be rewritten while ``gm`` stays runnable as the dense fallback."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return fx.GraphModule(gm, graph)


def _wants_inductor(settings: Settings, example_inputs: list[Any]) -> bool:
    if settings.inductor is not None:
        return settings.inductor
    return _on_cuda(example_inputs)


def _inductor_patches(settings: Settings) -> dict[str, Any] | None:
    """Option ``inductor_options`` as Inductor's config patches (a copy: Inductor may keep it)."""
    return None if settings.inductor_options is None else dict(settings.inductor_options)


def _on_cuda(example_inputs: list[Any]) -> bool:
    return any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)


def _dynamo_guarded(example_inputs: list[Any]) -> list[bool]:
    """Per input of a Dynamo graph: a tensor, whose sizes and strides Dynamo's guards and the graph's
    integer inputs fix (``CudaGraphCache``'s ``guarded``)."""
    return [isinstance(e, torch.Tensor) for e in example_inputs]


def _wants_cuda_graphs(settings: Settings, example_inputs: list[Any]) -> bool:
    return (settings.cuda_graphs if settings.cuda_graphs is not None else True) and _on_cuda(example_inputs)


def _has_runtime_calls(gm: fx.GraphModule) -> bool:
    return any(n.op == "call_function" and n.target in _RUNTIME_CALLS for n in gm.graph.nodes)


def _lower_whole(work: fx.GraphModule, ctx: PassContext, max_bytes: int | None = None) -> Callable:
    """A graph without run-time decisions (``work``, the passes' output for ``ctx``): Inductor (CUDA
    by default), then CUDA graphs for calls whose per-call inputs take at most ``max_bytes``
    (default ``cuda_graph_max_mib``); the first ``ctx.n_outputs`` outputs are Dynamo's (the rest:
    hoisted entropies). Nothing returned keeps ``ctx`` (it holds the example inputs)."""
    session, example_inputs, graph_id = ctx.session, ctx.example_inputs, ctx.graph_id
    settings = session.settings
    fn: Callable = work.forward
    if _wants_inductor(settings, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        fn = compile_fx(work, example_inputs, config_patches=_inductor_patches(settings))
    if _wants_cuda_graphs(settings, example_inputs) and not mutates_inputs(work.graph):
        static = [is_static_input(n) for n in work.graph.find_nodes(op="placeholder")]
        limit = int(settings.cuda_graph_max_mib * 2**20) if max_bytes is None else max_bytes
        fn = CudaGraphCache(fn, static, limit, name=f"graph {graph_id}",
                            pool=session.graph_pool(), lend=settings.cuda_graph_lend_outputs,
                            guarded=_dynamo_guarded(example_inputs))
    return fn


def _runner(session: Session, fn: Callable, ctx: PassContext, dense_variant: bool = False) -> GraphRunner:
    return GraphRunner(session, fn, ctx.hoisted, ctx.n_outputs, ctx.outputs_sequence, dense_variant=dense_variant)


def _map_block_specs(session: Session, spec_ids: list[int]) -> tuple[int, ...]:
    """Give each self-attention site the routed specs of its block (``Session.block_specs``, tuples:
    the run time records them per block call as they are).

    Returns the specs before the graph's first self-attention: they belong to the block running
    when the graph is called (a block split over graphs), which accounts them itself.
    """
    blocks: list[tuple[int | None, list[int]]] = [(None, [])]
    for spec_id in spec_ids:
        spec = session.branches[spec_id]
        if spec.kind == "self_attn" and spec.site_ids:
            blocks.append((spec.site_ids[0], []))
        blocks[-1][1].append(spec_id)
    for site_id, specs in blocks[1:]:
        session.block_specs[site_id] = tuple(specs)
    return tuple(blocks[0][1])


def _compile_prune(gm: fx.GraphModule, example_inputs: list[Any], session: Session, graph_id: int) -> Callable:
    """Prune mode: the dispatcher variant, plus its dense stand-in for scales the policy cannot act on."""
    ctx = PassContext(session=session, example_inputs=example_inputs, graph_id=graph_id, mode="prune")
    work = run_passes(_copy_graph_module(gm), ctx)
    if not _has_runtime_calls(work):
        return _runner(session, _lower_whole(work, ctx), ctx)
    if _wants_inductor(session.settings, example_inputs):
        from .lowering.inductor_branches import compile_branches

        compile_branches(work, session.compiled_branches, options=_inductor_patches(session.settings))
    pruned = _runner(session, work.forward, ctx)
    leading = _map_block_specs(session, ctx.spec_ids)
    if any(n.op == "call_function" and n.target is accumulate_scale for n in work.graph.nodes):
        return pruned  # whether a scale is accumulated is decided with the scale: no dense stand-in
    dense_ctx = PassContext(session=session, example_inputs=example_inputs, graph_id=graph_id, mode="observe",
                            reuse_site_ids=list(ctx.registered_site_ids))
    dense_work = run_passes(_copy_graph_module(gm), dense_ctx)
    # the dense variant runs the kept (Global) blocks of pruned scales too: captured up to the planned
    # blocks' limit, or those blocks alone would launch their kernels one by one at the large scales
    dense_fn = _lower_whole(dense_work, dense_ctx, _planned_max_bytes(session.settings))
    dense = _runner(session, dense_fn, dense_ctx, dense_variant=True)
    self_sites = sum(session.sites[sid].kind != "cross" for sid in dense_ctx.registered_site_ids)
    planned = _planned_runner(work, ctx) if self_sites == 1 else None
    return ScaleSwitchRunner(session, dense, pruned, self_sites, leading, planned)


def _planned_max_bytes(settings: Settings) -> int:
    """Largest per-call inputs of a block graph in prune mode captured in a CUDA graph: 8 x
    ``cuda_graph_max_mib``, so that the K/V cache of the last scales fits (on Infinity-2B, a kept
    block at 48x48 takes 87 MB of inputs; uncaptured, it launched 26 kernels more than a replay)."""
    return int(8 * settings.cuda_graph_max_mib * 2**20)


def _planned_runner(work: fx.GraphModule, ctx: PassContext) -> PlannedBlockRunner | None:
    """``PlannedBlockRunner`` for a one-block dispatcher graph (option ``planned_blocks``), if it fits."""
    # locals, not ``ctx``, in the closure below: ``ctx`` holds the compile's example inputs
    session, graph_id = ctx.session, ctx.graph_id
    settings = session.settings
    if not settings.planned_blocks or ctx.hoisted or not ctx.spec_ids or mutates_inputs(work.graph):
        return None  # a replay must not depend on what an earlier call wrote into its inputs
    placeholders = list(work.graph.find_nodes(op="placeholder"))
    first = next((br for br in ctx.branches if br.prunable), None)
    if first is None or first.x not in placeholders:
        return None
    static = [is_static_input(n) for n in placeholders]
    max_bytes = _planned_max_bytes(settings)
    use_graphs = _wants_cuda_graphs(settings, ctx.example_inputs)
    guarded = _dynamo_guarded(ctx.example_inputs)

    def wrap(fn: Callable, n_extra: int) -> Callable:
        """``fn`` replayed per input shapes; ``n_extra`` per-call inputs follow the graph's (kept
        indices, cached-scale outputs)."""
        if not use_graphs:
            return fn
        return CudaGraphCache(fn, static + [False] * n_extra, max_bytes, name=f"planned block of graph {graph_id}",
                              pool=session.graph_pool(), lend=settings.cuda_graph_lend_outputs,
                              guarded=guarded + [False] * n_extra)  # ours, not Dynamo's: keyed by layout

    return PlannedBlockRunner(session, work.forward, list(ctx.spec_ids), placeholders.index(first.x),
                              ctx.n_outputs, ctx.outputs_sequence, wrap)


def _split_context(gm: fx.GraphModule, example_inputs: list[Any], settings: Settings) -> ContextSplit | None:
    """``split_context``, or None where it failed: the graph then keeps its context, and the rest of
    the backend still applies (a failed cut must not send the whole graph to the dense fallback)."""
    try:
        return split_context(gm, example_inputs)
    except Exception as err:  # noqa: BLE001 - the cut is an optimisation
        if settings.strict:
            raise
        log.info("toprovar: the cross-attention context could not be cut out (%s: %s); the graph keeps it",
                 type(err).__name__, err)
        return None


def _context_memo(split: ContextSplit, example_inputs: list[Any], session: Session,
                  plan: BucketPlan | None = None) -> ContextMemo:
    """The memo of a graph's hoisted context; its ``pre`` compiled by Inductor where the graph is.
    Graphs whose context is the same computation (Dynamo compiles a block once per scale shape)
    share one memo, so each block computes its context once per text, not once per graph; padded
    (``plan``) and unpadded contexts never share one."""
    key = split.signature if split.signature is None or plan is None else (split.signature, plan.pads)
    memo = session.context_memos.get(key)
    if memo is not None:
        return memo
    args = [example_inputs[i] for i in split.pre_inputs]
    pre: Callable = split.pre.forward
    if _wants_inductor(session.settings, args):
        from torch._inductor.compile_fx import compile_fx

        try:
            pre = compile_fx(split.pre, args, config_patches=_inductor_patches(session.settings))
        except Exception as err:  # noqa: BLE001 - the context runs once per text: eager costs little
            if session.settings.strict:
                raise
            log.info("toprovar: the hoisted context could not be compiled (%s: %s); it runs eagerly",
                     type(err).__name__, err)
    static = [is_static_input(p) for p in split.pre.graph.find_nodes(op="placeholder")]
    capture = None
    if _wants_cuda_graphs(session.settings, args):
        limit = int(session.settings.cuda_graph_max_mib * 2**20)

        def capture(fill: Callable[..., None]) -> Callable[..., None]:
            """A block's context computed again by one CUDA-graph replay (weights keyed by address,
            the text copied in once per generation: the blocks share its input buffer)."""
            return CudaGraphCache(fill, static, limit, name="hoisted context", pool=session.graph_pool())

    memo = ContextMemo(pre, static, capture=capture, sized=split.symbolic, pads=plan and plan.pads,
                       bucket=session.settings.resolved_context_bucket)
    session.context_memos[key if key is not None else id(memo)] = memo
    return memo


def compile_graph(gm: fx.GraphModule, example_inputs: list[Any], session: Session) -> Callable:
    """Run the passes over one Dynamo graph and return what Dynamo should call instead."""
    settings = session.settings
    t0 = time.perf_counter()
    _ensure_recompile_budget(settings.recompile_limit)
    graph_id = session.graphs
    try:
        split = _split_context(gm, example_inputs, settings) if settings.hoist_context else None
        plan = bucket_plan(split) if split is not None and settings.resolved_context_bucket else None
        kept = example_inputs if plan is None else [example_inputs[i] for i in plan.keep]
        main, main_inputs = (gm, example_inputs) if split is None else (split.main, [*kept, *split.example_values])
        if settings.resolved_mode == "prune":
            runner = _compile_prune(main, main_inputs, session, graph_id)
        else:
            ctx = PassContext(session=session, example_inputs=main_inputs, graph_id=graph_id, mode="observe")
            work = run_passes(_copy_graph_module(main), ctx)
            runner = _runner(session, _lower_whole(work, ctx), ctx)
        if split is not None:
            runner = ContextRunner(runner, _context_memo(split, example_inputs, session, plan), split.pre_inputs,
                                   plan and plan.keep)
    except RestartAnalysis:
        # Dynamo's signal to trace the frame again (Inductor's float-scalar pass raises it under
        # dynamic=True): it calls the backend again with the new graph. Swallowed, the graph ran
        # dense and its self-attentions never ticked the scale clock
        raise
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
