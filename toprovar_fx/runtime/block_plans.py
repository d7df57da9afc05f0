"""Pruned blocks without Python decisions in their way: plan the next block, then run it as data.

Why: on a GPU at batch 1 a pruned block run through the dispatcher costs ~3 ms of host time
(three dispatches, three compiled-branch calls, gathers, scatters, FAE launches) for well under
1 ms of GPU work (benchmarks/results/e2e-2026-11-28-dispatcher.md). Once a scale's decisions
are taken, what the dispatcher will do to the next block is known in advance: which branches
run on the kept tokens, and ``k``. A ``BlockPlan`` holds that; with it the block is a pure
function of its inputs and the kept indices, so ``lowering.runners.PlannedBlockRunner`` can
replay it from a CUDA graph (one per plan signature and input shapes), then apply the
dispatcher's side effects (clock tick, entropy records, FLOP accounting, kept positions)
itself, in the dispatcher's order.

Plans exist only where they are exact: a decided scale whose next block is skipped (a skipped
layer, or a block after the first of a skipped scale), or a Detail layer of an active scale that
prunes tokens, with no CFG reuse and either ``select_per: block`` (one kept set per block,
selected before the call from the block's input) or FastVAR's ``select_per: sublayer`` with
frequency selection (each pruned branch selects from its own input inside the graph, as the
dispatcher does), and identity or cached-scale restore (the cached outputs are inputs of the
call, never read from the decider inside a captured graph); a kept block of the cached scale
itself (its branch outputs are outputs of the call, which the decider keeps); and a kept block of
a scale where SkipVAR's ``cfg.reuse_cond_from`` runs the cond rows only (each branch on the cond
half, its outputs given to both halves, as the dispatcher's ``_cond_only`` does; graphs with a
symbolic batch only). Everything else keeps running through the dispatcher.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .decision_ops import DecisionSpec


@dataclass(frozen=True)
class BlockPlan:
    """What the dispatcher would do to the next block."""

    scale: int
    layer: int
    tokens: int  # the scale's token count N
    rows: int
    k: int  # kept tokens of the pruned branches (0 when nothing is pruned)
    actions: tuple[str, ...]  # per routed branch of the block, in graph order: keep | prune_tokens | skip
    # FastVAR's select_per: sublayer with frequency selection: each pruned branch selects from its
    # own input inside the graph (the dispatcher does the same at run time)
    select_in_graph: bool = False
    # an entropy selection not made yet this scale: the graph takes the entropy it ranks (instead of
    # the kept indices) and returns the indices it selected, which the next blocks take as input
    select_entropy: bool = False
    # the measured block of a deciding scale: every branch kept, and the scale decision's device work
    # computed in the graph from its self-attention's entropy (an extra output; the layer scores R(l)
    # are its extra input)
    measure: DecisionSpec | None = None
    # restore.mode cached_scale: the cached scale's token grid and this scale's (None: identity)
    cached_hw: tuple[int, int] | None = None
    hw: tuple[int, int] | None = None
    # the cached scale of restore.mode cached_scale: the kept branches' outputs are returned and
    # kept by the decider, as the dispatcher's ``_keep`` does
    record_cache: bool = False
    # cfg.reuse_cond_from: every branch kept on the cond rows, the uncond rows given the same result
    cond_only: bool = False

    @property
    def prunes(self) -> bool:
        return "prune_tokens" in self.actions

    @property
    def skips_all(self) -> bool:
        return all(a == "skip" for a in self.actions)

    @property
    def signature(self) -> tuple[Any, ...]:
        """What the captured computation depends on beyond its inputs' shapes. ``k`` too: a block
        that selects its own tokens (``select_entropy``, ``select_in_graph``) takes no input of
        ``k``'s size, so without it a graph captured for one kept count replayed for another (the
        entropy gate gives each prompt its own k): it kept the captured count, not the decided one."""
        return (self.actions, self.k, self.select_in_graph, self.select_entropy, self.measure, self.cached_hw,
                self.hw, self.record_cache, self.cond_only)


@dataclass
class PlanRun:
    """The state of one planned call while its branches run (``Decider.plan_run``)."""

    plan: BlockPlan
    specs: tuple[Any, ...]  # the block's routed branches, in graph order (one per action)
    # the plan's input: kept positions [rows, k], or the entropy ranked (``select_entropy``), or the
    # layer scores (``measure``); a graph's static buffer under capture
    idx: torch.Tensor | None = None
    cached: tuple[torch.Tensor, ...] = ()  # per pruned branch, its cached-scale output (graph inputs)
    n_cached: int = field(init=False)  # how many: ``cached`` itself is let go after each call of the graph
    step: int = 0
    pruned: int = 0  # pruned branches run so far
    first_idx: torch.Tensor | None = None  # the block's first in-graph selection (returned by the graph)
    entropies: list[tuple[torch.Tensor, ...]] = field(default_factory=list)
    deltas: list[torch.Tensor] = field(default_factory=list)  # kept branches' outputs (record_cache)

    def __post_init__(self) -> None:
        self.n_cached = len(self.cached)


def plan_next_block(decider: Any, specs: list[Any]) -> BlockPlan | None:
    """The plan of the next block (one graph call holding ``specs``), or None if it is not exact."""
    if not specs:
        return None
    action = decider.next_block_action(1, plannable=True)
    if action not in ("prune_tokens", "skip", "cache", "measure", "cond"):
        return None  # each implies a resolved scale
    clock, gen = decider.session.clock, decider.gen
    # measure, cache and cond may be the first block of the next scale, the others are in the running one
    scale, layer, _ = clock.next_block()
    res = decider._resolve()
    if res is None or scale >= res.num_scales:
        return None
    h, w = res.hw[scale]  # a next scale has not ticked yet; the call's input must match it
    if action == "measure":
        spec = decider.measure_spec(res, scale)
        if spec is None:
            return None
        return BlockPlan(scale=scale, layer=layer, tokens=h * w, rows=gen.rows, k=0,
                         actions=("keep",) * len(specs), measure=spec)
    if action == "cond":
        if any(spec.batch_static for spec in specs):
            return None  # the batch cannot be halved: the dispatcher says so and runs both halves
        return BlockPlan(scale=scale, layer=layer, tokens=h * w, rows=gen.rows, k=0,
                         actions=("keep",) * len(specs), cond_only=True)
    if action in ("skip", "cache"):  # skip: nothing selected, restored or recorded
        return BlockPlan(scale=scale, layer=layer, tokens=h * w, rows=gen.rows, k=0,
                         actions=(action if action == "skip" else "keep",) * len(specs),
                         record_cache=action == "cache")
    pol, tok = decider.policy, decider.policy.token
    per_block = tok.select_per == "block" and tok.selection in ("entropy", "random", "frequency")
    in_graph = tok.select_per == "sublayer" and tok.selection == "frequency"
    if not (per_block or in_graph) or pol.restore.mode not in ("identity", "cached_scale"):
        return None
    actions = tuple("prune_tokens" if spec.kind in tok.sublayers and spec not in decider.disabled else "keep"
                    for spec in specs)
    if per_block and actions[0] != "prune_tokens":
        return None  # the kept set is chosen at the first pruned branch, from the block's input
    cached_hw = hw = None
    if pol.restore.mode == "cached_scale":
        if decider.cached_hw is None or any((layer, spec.kind) not in decider.cache
                                            for spec, a in zip(specs, actions) if a == "prune_tokens"):
            return None  # the dispatcher reports the missing cache
        cached_hw, hw = tuple(decider.cached_hw), tuple(gen.hw[scale])
    k = decider.cur.kept[layer]
    select_entropy = False
    if per_block and tok.selection == "entropy":
        ent = decider.selection_entropy(scale)
        select_entropy = ent is not None and decider.cached_selection(ent, k, gen.rows) is None
    return BlockPlan(scale=scale, layer=layer, tokens=gen.tokens[scale], rows=gen.rows, k=k, actions=actions,
                     select_in_graph=in_graph, select_entropy=select_entropy, cached_hw=cached_hw, hw=hw)


def cached_inputs(decider: Any, plan: BlockPlan, specs: list[Any]) -> tuple[torch.Tensor, ...]:
    """Per pruned branch, its output at the cached scale (rows as the dispatcher slices them):
    extra inputs of a planned call, never read from the decider inside a captured graph."""
    if plan.cached_hw is None:
        return ()
    return tuple(decider.cache[(plan.layer, spec.kind)][: plan.rows]
                 for spec, a in zip(specs, plan.actions) if a == "prune_tokens")


def apply_plan_effects(decider: Any, plan: BlockPlan, specs: list[Any], entropies: tuple[Any, ...],
                       tick: Any, idx: torch.Tensor | None, cached_deltas: tuple[Any, ...] = ()) -> None:
    """The dispatcher's side effects of a planned block, in its order (cache, record, account).
    ``cached_deltas``: per kept branch, its output, when the plan records the cached scale."""
    sess, gen = decider.session, decider.gen
    if plan.prunes and not plan.select_in_graph:  # select_per: block keeps one choice per block
        decider.cur.indices[plan.layer] = idx
    i = 0
    deltas = iter(cached_deltas)
    row_fraction = 0.5 if plan.cond_only else 1.0  # the dispatcher's ``_cond_only`` accounts the cond rows
    for spec, action in zip(specs, plan.actions):
        if action == "skip":  # nothing recorded, nothing run
            decider._account(spec, tick, "skip", 0, row_fraction)
            continue
        if plan.record_cache:
            decider.keep_cached(tick, spec.kind, next(deltas))
        ents = entropies[i:i + len(spec.site_ids)]
        i += len(spec.site_ids)
        full = action == "keep"
        for sid, ent in zip(spec.site_ids, ents):
            if full and sess.sites[sid].kind == "self":
                decider.latest_full = ent
            sess.record_attention(sid, ent, tick)
        decider._account(spec, tick, action, plan.tokens if full else plan.k, row_fraction)
        if not full:
            gen.kept_idx.setdefault((tick.scale, tick.layer), idx)
