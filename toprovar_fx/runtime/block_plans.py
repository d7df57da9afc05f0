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

Plans exist only where they are exact: ``select_per: block`` (one kept set per block), identity
restore, no CFG reuse, a decided and active scale whose next block is a Detail layer that
prunes tokens or is skipped (a skipped layer, or a block after the first of a skipped scale).
Everything else keeps running through the dispatcher.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class BlockPlan:
    """What the dispatcher would do to the next block."""

    scale: int
    layer: int
    tokens: int  # the scale's token count N
    rows: int
    k: int  # kept tokens of the pruned branches (0 when nothing is pruned)
    actions: tuple[str, ...]  # per routed branch of the block, in graph order: keep | prune_tokens | skip

    @property
    def prunes(self) -> bool:
        return "prune_tokens" in self.actions


@dataclass
class PlanRun:
    """The state of one planned call while its branches run (``Decider.plan_run``)."""

    plan: BlockPlan
    idx: torch.Tensor | None = None  # kept positions [rows, k]; a graph's static buffer under capture
    step: int = 0
    entropies: list[tuple[torch.Tensor, ...]] = field(default_factory=list)


def plan_next_block(decider: Any, specs: list[Any]) -> BlockPlan | None:
    """The plan of the next block (one graph call holding ``specs``), or None if it is not exact."""
    if not specs:
        return None
    action = decider.next_block_action(1)
    if action not in ("prune_tokens", "skip"):
        return None  # either implies a decided scale whose next block is in the same scale
    clock, gen = decider.session.clock, decider.gen
    scale, layer = clock.scale, clock.layer + 1
    if action == "skip":  # every branch skipped: nothing selected, restored or recorded
        return BlockPlan(scale=scale, layer=layer, tokens=gen.tokens[scale], rows=gen.rows, k=0,
                         actions=("skip",) * len(specs))
    pol, tok = decider.policy, decider.policy.token
    if (tok.select_per != "block" or pol.restore.mode != "identity"
            or tok.selection not in ("entropy", "random", "frequency")):
        return None
    actions = tuple("prune_tokens" if spec.kind in tok.sublayers and spec not in decider.disabled else "keep"
                    for spec in specs)
    if actions[0] != "prune_tokens":
        return None  # the kept set is chosen at the first pruned branch, from the block's input
    return BlockPlan(scale=scale, layer=layer, tokens=gen.tokens[scale], rows=gen.rows,
                     k=decider.cur.kept[layer], actions=actions)


def apply_plan_effects(decider: Any, plan: BlockPlan, specs: list[Any], entropies: tuple[Any, ...],
                       tick: Any, idx: torch.Tensor | None) -> None:
    """The dispatcher's side effects of a planned block, in its order (record, then account)."""
    sess, gen = decider.session, decider.gen
    if plan.prunes:
        decider.cur.indices[plan.layer] = idx
    i = 0
    for spec, action in zip(specs, plan.actions):
        if action == "skip":  # nothing recorded, nothing run
            decider._account(spec, tick, "skip", 0)
            continue
        ents = entropies[i:i + len(spec.site_ids)]
        i += len(spec.site_ids)
        full = action == "keep"
        for sid, ent in zip(spec.site_ids, ents):
            if full and sess.sites[sid].kind == "self":
                decider.latest_full = ent
            sess.record_attention(sid, ent, tick)
        decider._account(spec, tick, action, plan.tokens if full else plan.k)
        if not full:
            gen.kept_idx.setdefault((tick.scale, tick.layer), idx)
