"""Pruning decisions at run time: start scale D, layer classes, kept tokens (SPEC section 4).

Cost: at most one host synchronisation per scale. At the first branch after the scale's
measured layer, the decider computes, in one device-to-host transfer, rho_s (is pruning
active from here on?) and the kept count ``k`` of every layer of this scale from the measured
layer's entropy. Which tokens a layer keeps is then chosen on the device (top-k of the
lowest entropy of the latest layer that ran on all tokens), with no further synchronisation.
Layer classes are computed once per generation, after the representative scale, from an
SVD of each layer's ``[h, w]`` entropy map.

``override`` lets a test fix every decision (``(scale, layer) -> BlockDecision``) so the
compiled path can be compared with the zoo's reference pruning path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.profiler import record_function

from .decision_ops import DecisionSpec, decision_values
from .token_ops import (
    KeptTokens,
    entropy_indices,
    frequency_indices,
    gather_tokens,
    restore_cached,
    restore_identity,
    restore_kept,
)


@dataclass
class ScaleDecisions:
    """Decisions taken for the current scale."""

    scale: int
    active: bool = False
    decided: bool = False
    kept: dict[int, int] = field(default_factory=dict)  # layer -> k (entropy / ratio selection)
    indices: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> kept positions [rows, k]
    # the decision's device work, launched ahead and not yet read (``Decider._launch_decision``)
    pending: PendingDecision | None = None


@dataclass
class PendingDecision:
    """A scale decision whose device values are on their way to the host."""

    res: Any  # the policy's scale refs it was launched with
    spec: DecisionSpec | None  # what was computed (None: the policy cannot act at this scale)
    values: torch.Tensor | None = None  # host copy of [rho?, kept counts...] (None: nothing to read)
    event: Any = None  # recorded after the copy (CUDA), or None


def cond_half(spec: Any, inputs: tuple[Any, ...], x: torch.Tensor) -> tuple[int, tuple[Any, ...]]:
    """A branch's inputs cut to the cond half of a CFG batch (rows first): ``(b, inputs)``."""
    b = int(x.shape[0]) // 2
    return b, tuple(
        b if i in spec.batch_sizes
        else t[:b] if i in spec.batch_inputs and isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == 2 * b
        else t
        for i, t in enumerate(inputs)
    )


def both_halves(outs: tuple[Any, ...], b: int) -> tuple[Any, ...]:
    """A cond-half branch's outputs given to the uncond half too."""
    return tuple(torch.cat((o, o), 0) if isinstance(o, torch.Tensor) and o.dim() and o.shape[0] == b else o
                 for o in outs)


class Decider:
    """Applies one policy to the branches of one session."""

    def __init__(self, session: Any, policy: Any) -> None:
        self.session = session
        self.policy = policy
        self.override: dict[tuple[int, int], Any] | None = None  # test hook: fixed decisions
        self.gen = None
        self.resolved = None
        self.cur: ScaleDecisions | None = None
        self.tick = None
        self.cache: dict[tuple[int, str], torch.Tensor] = {}
        self.cached_hw: tuple[int, int] | None = None
        self.latest_full: torch.Tensor | None = None  # entropy [rows, L] of the latest dense layer
        self.unfit: set[int] = set()  # generations in which the policy did not fit the model
        self.row_fraction = 1.0  # 0.5 while only the cond half of a CFG batch runs
        self.disabled: set[Any] = set()  # branches that failed on pruned tokens: dense from then on
        self._needs_entropy = policy.needs_entropy
        self.plan_run = None  # a PlanRun while a planned block runs (runtime/block_plans.py)
        # the last entropy-driven selection (entropy tensor, k, rows, indices): the blocks of a scale
        # that share an entropy source and a kept count keep the same tokens, selected once
        self._selection: tuple[torch.Tensor, int, int, torch.Tensor] | None = None
        self._scores: tuple[tuple[int, ...], torch.Tensor] | None = None  # this generation's R(l) on the device
        # the last next_block_action ((self_sites, mixed, plannable), answer) since the clock's last tick
        self._predicted: tuple[tuple[int, bool, bool], str | None] | None = None
        # first_active_scale() of this generation, once known, is remembered as an int in
        # ``session.dense_until`` (-1: not yet; reset at start_generation). Not a reference to the
        # generation's state: that would keep its lent entropies, so their graphs could not replay.

    # ----- generation and scale bookkeeping ---------------------------------------------------
    def start_generation(self, gen: Any) -> None:
        self.gen = gen
        self.resolved = None
        self.session.dense_until = -1
        self.cur = None
        self.cache.clear()
        self.cached_hw = None
        self._selection = None
        self._scores = None

    def _resolve(self) -> Any | None:
        """The policy's scale refs for the running schedule; None (= dense) if the policy does not fit."""
        clock = self.session.clock
        if clock.mismatch is not None or not clock.candidates or self.gen.index in self.unfit:
            return None
        if self.resolved is None:
            name = clock.candidates[0]
            problems = self.policy.check_fingerprint(self.observed_fingerprint(len(self.policy.schedules[name])))
            if problems:
                self.unfit.add(self.gen.index)
                self.session._policy_mismatch("the traced model does not fit the policy's fingerprint: "
                                              + "; ".join(problems))
                return None
            self.resolved = self.policy.resolved(name)
        return self.resolved

    def on_tick(self, tick: Any) -> None:
        """Every self-attention tick of the session, from either variant of a graph."""
        self.tick = tick
        self._predicted = None
        if self.cur is None or self.cur.scale != tick.scale or tick.new_generation:
            if self.cur is not None and self.cur.pending is not None and not tick.new_generation:
                self._finish_decision()  # launched for a scale that ended before needing it
            self.cur = ScaleDecisions(tick.scale)
            self.latest_full = None

    def keeps_all_next(self, self_sites: int, mixed: bool = False, plannable: bool = False) -> bool:
        """Whether the next graph call surely keeps every branch, so its dense variant may run."""
        return self.next_block_action(self_sites, mixed, plannable) == "keep"

    def next_block_action(self, self_sites: int, mixed: bool = False, plannable: bool = False) -> str | None:
        """What the dispatcher will do to every branch of the next call of a graph holding
        ``self_sites`` self-attentions: ``keep``, ``prune_tokens`` (a Detail layer of a decided,
        active scale that keeps fewer than all tokens), ``cache`` (a kept block of the scale
        whose branch outputs ``restore.mode: cached_scale`` keeps), ``skip`` (a skipped layer of a decided
        scale, or a block after the first of a skipped scale), ``cond`` (a kept block of a scale
        where ``cfg.reuse_cond_from`` runs the cond rows only; asked with ``plannable`` only) or None
        (not known in advance, or mixed).
        ``mixed``: the graph ends the running block and starts the next (a block split over
        graphs); only whole scales before the policy acts are known for it.
        ``plannable``: the graph can run as a planned block; then the measured block of a scale
        whose decision computes something is ``measure`` (kept, and the decision's device work
        computed in its graph) instead of ``keep``.

        ``keep`` when the call cannot reach a scale the policy acts on (``first_active_scale``),
        and, for a one-block graph, when this generation's decisions so far say the next block is
        kept: one of the first ``measure_layer + 1`` blocks of a scale that is neither skipped nor
        CFG-reusing, or a block of an already decided scale that is inactive, or whose layer is
        kept (not eligible, a keep class, or keeping every token). The prediction uses only what
        the dispatcher variant would consult, so both variants compute the same thing.

        Asked twice per planned call (``dense_ahead``, then ``plan_next_block``) with the same
        arguments: the second answer is the first's, kept until the clock ticks (``on_tick``).
        """
        key = (self_sites, mixed, plannable)
        known = self._predicted
        if known is not None and known[0] == key:
            return known[1]
        action = self._predict(self_sites, mixed, plannable)
        self._predicted = (key, action)
        return action

    def _predict(self, self_sites: int, mixed: bool, plannable: bool) -> str | None:
        """``next_block_action`` computed."""
        first = self.first_active_scale()
        if first is None:
            return None
        clock, gen, pol = self.session.clock, self.gen, self.policy
        depth = clock.depth
        span = 1 + (-(-(max(self_sites, 1) - 1) // depth) if depth else max(self_sites, 1) - 1)
        if clock.scale + span < first:
            return "keep"
        if self_sites > 1 or mixed or not depth:
            return None
        if self_sites == 0:  # part of a block split over graphs: its branches belong to the current block
            same, scale, layer = True, clock.scale, clock.layer
        else:
            scale, layer, same = clock.next_block()
        res = self._resolve()
        if same and scale in gen.skipped:
            return "skip"  # the rest of a scale whose first block the dispatcher skipped
        after_d = pol.scale.mode == "skip_after_D" and gen.start_scale is not None and scale > gen.start_scale
        if res is None or scale in res.skip_scales or scale in gen.skipped or after_d:
            return None
        cached = pol.restore.mode == "cached_scale" and res.cached_scale == scale  # records branch outputs
        if res.reuse_cond_from is not None and scale >= res.reuse_cond_from:
            # SkipVAR's CFG shortcut: a block that keeps every branch runs them on the cond rows
            # (``cond``, a planned block only; the dispatcher's ``_cond_only``)
            if not plannable or self.override is not None or cached:
                return None
            return "cond" if self._block_action(res, scale, layer, same, plannable) == "keep" else None
        action = self._block_action(res, scale, layer, same, plannable)
        if cached:
            # the dispatcher keeps the branch outputs of a kept block here: the dense variant
            # cannot, a planned block can (``cache``); anything else at this scale is its own
            return "cache" if action == "keep" else None
        return action

    def _block_action(self, res, scale: int, layer: int, same: bool, plannable: bool = False) -> str | None:
        """``next_block_action`` for a one-block graph once the scale-level cases are settled."""
        pol, gen = self.policy, self.gen
        if self._needs_entropy and layer <= pol.scale.measure_layer:
            measures = plannable and layer == pol.scale.measure_layer and self.measure_spec(res, scale) is not None
            return "measure" if measures else "keep"
        if not same:
            # the next scale's first block: a fixed-ratio policy's decisions need no entropy, so a
            # layer that keeps every branch whatever the scale decides is known to keep
            known = not self._needs_entropy and scale < res.num_scales
            return "keep" if known and self._keeps_layer(res, scale, layer) else None
        cur = self.cur
        if cur is None or cur.scale != scale:
            return None
        if not cur.decided:
            if self._keeps_regardless(res, layer) and self._launch_ahead(res):
                return "keep"
            if not self._decide_ahead(res):
                return None
        if not cur.active or not pol.layer.eligible(layer):
            return "keep"
        if not gen.layer_classes:
            return None  # classes are computed by the dispatcher variant's first decision
        action = pol.layer.actions[gen.layer_classes.get(layer, "global")]
        if action != "prune_tokens":
            return action  # keep | skip: every branch of the block
        k = cur.kept.get(layer)
        return "keep" if k is None or k >= gen.tokens.get(scale, 0) else "prune_tokens"

    def _keeps_regardless(self, res, layer: int) -> bool:
        """Whether ``layer`` keeps every branch whatever this scale's decision says (a Global layer,
        or one the layer stage may not touch), while a later layer of the scale will need the
        decision. Then the decision's device work is launched now and read at that later layer,
        so the host does not wait for the GPU while the GPU runs this layer (one host
        synchronisation per pruned scale: on the H200 the GPU idled about 1-2 ms at each)."""
        if self.tick is None or not self._keeps_layer(res, self.tick.scale, layer):
            return False
        depth = self.session.clock.depth or 0
        return not all(self._keeps_layer(res, self.tick.scale, lay) for lay in range(layer + 1, depth))

    def _keeps_layer(self, res, scale: int, layer: int) -> bool:
        """Whether ``layer`` keeps every branch at ``scale`` whatever the scale's decision says (not
        eligible, or its class keeps); False while the classes are unknown (online classes before
        the representative scale)."""
        pol, gen = self.policy, self.gen
        if not gen.layer_classes and pol.layer.mode != "online":
            self._maybe_classify(res, scale)  # fixed classes: known without entropy
        if not gen.layer_classes:
            return False
        return not pol.layer.eligible(layer) or pol.layer.actions[gen.layer_classes.get(layer, "global")] == "keep"

    def _launch_ahead(self, res) -> bool:
        """``_decide_ahead`` without reading the values: the device work and the copy to the host
        are queued (``_launch_decision``); False when the dispatcher must decide."""
        if not self._can_decide_ahead():
            return False
        if self.cur.pending is None:
            with record_function("toprovar.decide_scale"):
                self._launch_decision(res, self.tick)
        return True

    def _can_decide_ahead(self) -> bool:
        """Whether the running scale's decision can be taken outside the dispatcher: no test
        override, past scale 0, and, for an entropy policy, the measured layer's entropy recorded
        (a fixed-ratio policy's decision reads nothing from the device)."""
        tick = self.tick
        return not (self.override is not None or tick is None or tick.scale == 0
                    or (self._needs_entropy and (tick.scale, self.policy.scale.measure_layer) not in self.gen.entropy))

    def _decide_ahead(self, res) -> bool:
        """Take the running scale's decisions before its first block past the measured layer is
        called, so that this block too can be predicted (run dense or planned) instead of going
        through the dispatcher. Same inputs as the dispatcher's decision at that block: the
        measured layer's entropy (recorded when its graph returned) and the layer classes.
        False when the dispatcher must decide (no entropy yet, test overrides).
        """
        tick, gen = self.tick, self.gen
        if not self._can_decide_ahead():
            return False
        if not gen.layer_classes:
            self._maybe_classify(res, tick.scale)
        with record_function("toprovar.decide_scale"):
            self._decide_scale(res, tick)
        return True

    def first_active_scale(self) -> int | None:
        """The first scale of this generation at which the policy may change anything.

        Before it every branch is kept, so the backend may run the dense variant of a graph
        (``ScaleSwitchRunner``). None while unknown (no schedule resolved yet, a test
        override); the schedule length when the policy does not fit (it runs dense).
        """
        clock, gen = self.session.clock, self.gen
        if self.override is not None or gen is None or clock.depth is None:
            return None  # the fingerprint check needs the depth, known after scale 0
        if clock.mismatch is not None or gen.index in self.unfit:
            return 10**9
        if self.session.dense_until >= 0:
            return self.session.dense_until  # the policy's refs are fixed per generation
        res = self._resolve()
        if res is None:
            return None
        pol = self.policy
        firsts = [res.num_scales, *res.skip_scales]
        if pol.scale.mode != "off":
            firsts.append(res.min_start)
        if res.reuse_cond_from is not None:
            firsts.append(res.reuse_cond_from)
        if pol.restore.mode == "cached_scale" and res.cached_scale is not None:
            firsts.append(res.cached_scale)
        first = max(1, min(firsts))
        self.session.dense_until = first
        return first

    def observed_fingerprint(self, num_scales: int) -> dict[str, Any]:
        """What the graphs and the clock tell about the model (family is not observable)."""
        selfs = [s for s in self.session.sites if s.kind == "self"]
        heads = selfs[0].heads if selfs else None
        width = heads * selfs[0].head_dim if selfs else None
        return {"depth": self.session.clock.depth, "heads": heads, "width": width, "num_scales": num_scales}

    # ----- the dispatcher's entry point -------------------------------------------------------
    def run_branch(self, spec: Any, branch: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[Any, ...]:
        if self.plan_run is not None:
            return self._run_planned(spec, branch, inputs)
        x = inputs[spec.hidden]
        session = self.session
        if spec.kind == "self_attn":
            session.tick(int(x.shape[1]), int(x.shape[0]))  # -> on_tick
        tick = self.tick
        if tick is None:  # a branch before any self-attention (never in VAR blocks): run it
            return self._keep(spec, branch, inputs, x, None)
        if self._reuses_cond(spec, tick, x):
            return self._cond_only(spec, branch, inputs, x, tick)
        return self._act(spec, branch, inputs, x, tick)

    def _reuses_cond(self, spec, tick, x: torch.Tensor) -> bool:
        """SkipVAR's CFG shortcut: from ``cfg.reuse_cond_from`` on, uncond rows copy the cond rows."""
        if self.override is not None or self.policy.cfg.reuse_cond_from is None:
            return False
        res = self._resolve()
        if res is None or tick.scale < res.reuse_cond_from or x.shape[0] % 2:
            return False
        if spec.batch_static:
            self.session.fallback(
                f"policy {self.policy.name!r}: cfg.reuse_cond_from needs graphs whose batch size is "
                "symbolic, but Dynamo specialised them to the batch of the first call; compile with "
                "torch.compile(..., dynamic=True) to use it. Both CFG halves run"
            )
            return False
        return True

    def _cond_only(self, spec, branch, inputs, x, tick):
        """Run the branch on the cond half (rows first) and give the uncond half the same result."""
        b, half = cond_half(spec, inputs, x)
        self.row_fraction = 0.5
        try:
            outs = self._act(spec, branch, half, half[spec.hidden], tick)
        finally:
            self.row_fraction = 1.0
        return both_halves(outs, b)

    def _act(self, spec, branch, inputs, x, tick):
        action, idx = self._decide(spec, tick, x)
        if action == "skip":
            self._account(spec, tick, "skip", 0)
            return (x, *[inputs[i] for i in spec.escape_skip])
        if action == "keep":
            return self._keep(spec, branch, inputs, x, tick)
        return self._prune(spec, branch, inputs, x, tick, idx)

    def keep_cached(self, tick: Any, kind: str, delta: torch.Tensor) -> None:
        """Keep a branch output of the cached scale (``restore.mode: cached_scale``) for the later
        scales. A clone: the decider holds it through those scales, and a lent CUDA-graph output
        held that long would keep its graph from replaying (``cuda_graph_lend_outputs``)."""
        self.cache[(tick.layer, kind)] = delta.clone()
        self.cached_hw = self.gen.hw[tick.scale]

    def _keep(self, spec, branch, inputs, x, tick):
        outs = branch(*inputs)
        delta = outs[0]
        self._record(spec, outs, tick, full=True)
        res = self._restore_scale()
        if tick is not None and res is not None and res.cached_scale == tick.scale:
            self.keep_cached(tick, spec.kind, delta)
        if tick is not None:
            self._account(spec, tick, "keep", int(x.shape[1]))
        return (x + delta, *outs[1:1 + spec.n_escapes])

    def _prune(self, spec, branch, inputs, x, tick, idx):
        try:
            return self._prune_unchecked(spec, branch, inputs, x, tick, idx)
        except Exception as err:  # noqa: BLE001 - a branch that cannot run pruned runs dense
            if self.session.settings.strict:
                raise
            self.disabled.add(spec)
            self.session.fallback(
                f"a {spec.kind} branch failed on pruned tokens ({type(err).__name__}: {err}); "
                "it runs on all tokens from now on"
            )
            return self._keep(spec, branch, inputs, x, tick)

    @staticmethod
    def _on_kept(spec, branch, inputs, kept: torch.Tensor, idx):
        """The branch run on the kept tokens: ``kept`` is its hidden input's (``[rows, k, C]``);
        the position-dependent inputs are gathered here."""
        gathered = list(inputs)
        gathered[spec.hidden] = kept
        for i, dim in spec.positional:
            gathered[i] = gather_tokens(inputs[i], idx, dim)
        for i in spec.token_sizes:
            gathered[i] = int(idx.shape[1])
        return branch(*gathered)

    def _run_planned(self, spec, branch, inputs):
        """A branch of a planned block (``runtime/block_plans.py``): no decisions, no side effects;
        the entropies are kept for the planned runner, which records them after the call."""
        run = self.plan_run
        action = run.plan.actions[run.step]
        run.step += 1
        x = inputs[spec.hidden]
        handed = isinstance(x, KeptTokens)  # only ever handed to a pruned branch (``_hands_on``)
        if action == "skip":
            run.entropies.append(())
            return (x, *[inputs[i] for i in spec.escape_skip])
        plan = run.plan
        if plan.cond_only:  # every branch kept, on the cond rows (``_cond_only``)
            b, half = cond_half(spec, inputs, x)
            outs = branch(*half)
            run.entropies.append(tuple(outs[1 + spec.n_escapes:]))
            return both_halves((half[spec.hidden] + outs[0], *outs[1:1 + spec.n_escapes]), b)
        if action == "keep":
            outs = branch(*inputs)
            x_new = x + outs[0]
            if plan.record_cache:
                run.deltas.append(outs[0])
        else:
            idx = run.idx
            if plan.select_in_graph:  # from this branch's own input, as the dispatcher selects
                idx = frequency_indices(x, plan.k)
                if run.first_idx is None:
                    run.first_idx = idx
            # identity restore with one kept set per block: the kept tokens go on to the next
            # pruned branch and are written back once, after the last (``_hands_on``)
            hand_on = plan.cached_hw is None and not plan.select_in_graph and self._hands_on(run)
            base = x.base if handed else x
            kept = x.kept if handed else gather_tokens(x, idx, 1)
            outs = self._on_kept(spec, branch, inputs, kept, idx)
            if handed or hand_on:
                kept = kept + outs[0]  # what restore_identity adds at the kept positions
                x_new = KeptTokens(base, kept) if hand_on else restore_kept(base, idx, kept)
            elif plan.cached_hw is None:
                x_new = restore_identity(x, idx, outs[0])
            else:
                cached = run.cached[run.pruned]
                run.pruned += 1
                x_new = restore_cached(x, idx, outs[0], cached, plan.cached_hw, plan.hw,
                                       self.policy.restore.interpolation)
        run.entropies.append(tuple(outs[1 + spec.n_escapes:]))
        return (x_new, *outs[1:1 + spec.n_escapes])

    @staticmethod
    def _hands_on(run) -> bool:
        """Whether the planned branch just started hands its kept tokens to the next one: that one
        prunes too (same kept set: one selection per block) and takes this one's ``x_new`` as its
        hidden input with no other use of it (``BranchSpec.hidden_from_previous``)."""
        nxt = run.step
        return (nxt < len(run.plan.actions) and run.plan.actions[nxt] == "prune_tokens"
                and run.specs[nxt].hidden_from_previous)

    def _prune_unchecked(self, spec, branch, inputs, x, tick, idx):
        outs = self._on_kept(spec, branch, inputs, gather_tokens(x, idx, 1), idx)
        self._record(spec, outs, tick, full=False)
        self._account(spec, tick, "prune_tokens", int(idx.shape[1]))
        # kept positions for pictures (`toprovar inspect`): the device tensor, no host sync; the
        # first pruned sublayer of a block stands for the block
        self.gen.kept_idx.setdefault((tick.scale, tick.layer), idx)
        restore = self.policy.restore
        if restore.mode == "identity":
            x_new = restore_identity(x, idx, outs[0])
        else:
            cached = self.cache.get((tick.layer, spec.kind))
            if cached is None:
                raise RuntimeError(
                    f"toprovar: no branch output recorded at the cached scale for layer {tick.layer} "
                    f"{spec.kind}; restore.cached_scale must precede every pruned scale"
                )
            x_new = restore_cached(x, idx, outs[0], cached[: x.shape[0]], self.cached_hw, self.gen.hw[tick.scale],
                                   restore.interpolation)
        return (x_new, *outs[1:1 + spec.n_escapes])

    def _record(self, spec, outs, tick, full: bool) -> None:
        ents = outs[1 + spec.n_escapes:]
        for sid, ent in zip(spec.site_ids, ents):
            if full and self.session.sites[sid].kind == "self":
                self.latest_full = ent
            self.session.record_attention(sid, ent, tick)

    def account_kept(self, spec_ids: tuple[int, ...]) -> None:
        """Account branches the dense variant ran at the current block, as ``_keep`` would
        (deferred to the report: ``Session.defer_kept``)."""
        tick, gen = self.tick, self.gen
        if tick is None or gen is None or tick.scale not in gen.tokens:
            return
        self.session.defer_kept(tick, spec_ids)

    def _account(self, spec, tick, action: str, run_tokens: int, row_fraction: float | None = None) -> None:
        """Executed and dense FLOPs of this branch at ``tick`` (linear per token + attention vs K/V);
        ``row_fraction`` of the rows ran (default: the dispatcher's current one)."""
        frac = self.row_fraction if row_fraction is None else row_fraction
        self.account(spec, tick.scale, tick.layer, self.gen.rows, action, run_tokens, frac)

    def account(self, spec, scale: int, layer: int, rows: int, action: str, run_tokens: int,
                row_fraction: float = 1.0) -> None:
        """Executed and dense FLOPs of one branch run on ``run_tokens`` of the scale's tokens."""
        gen = self.gen
        key = (scale, layer)
        n = gen.tokens[scale]
        dense = rows * n * spec.linear_flops_per_token
        executed = rows * run_tokens * spec.linear_flops_per_token
        if spec.kind == "self_attn":
            lk_dense = sum(gen.tokens[s] for s in range(scale + 1))
            lk_exec = self.session._kv_len(layer, scale) + run_tokens
            dense += rows * spec.attention_pair_flops * n * lk_dense
            executed += rows * spec.attention_pair_flops * run_tokens * lk_exec
            gen.actions[key] = (action, None if action == "keep" else run_tokens)
        executed *= row_fraction
        acc = gen.flops.setdefault(key, [0.0, 0.0])
        acc[0] += dense
        acc[1] += executed

    def _restore_scale(self):
        if self.policy.restore.mode != "cached_scale":
            return None
        return self._resolve()

    # ----- decisions ----------------------------------------------------------------------------
    def _decide(self, spec, tick, x) -> tuple[str, torch.Tensor | None]:
        if self.override is not None:
            return self._overridden(spec, tick)
        res = self._resolve()
        if res is None or tick.scale == 0:
            return "keep", None
        if self._scale_skipped(res, tick.scale):
            return "skip", None
        if not self.gen.layer_classes:
            self._maybe_classify(res, tick.scale)
        cur = self.cur
        if self._needs_entropy and tick.layer <= self.policy.scale.measure_layer:
            return "keep", None  # the scale's decisions wait for the measured layer's entropy
        if not cur.decided:
            with record_function("toprovar.decide_scale"):
                self._decide_scale(res, tick)
        if not cur.active:
            return "keep", None
        if not self.policy.layer.eligible(tick.layer):
            return "keep", None
        cls = self.gen.layer_classes.get(tick.layer, "global")
        action = self.policy.layer.actions[cls]
        if action != "prune_tokens":
            return action, None
        if spec.kind not in self.policy.token.sublayers or spec in self.disabled:
            return "keep", None
        k = cur.kept.get(tick.layer)
        if k is None or k >= int(x.shape[1]):
            return "keep", None
        if self.policy.token.select_per == "sublayer":
            with record_function("toprovar.select_tokens"):
                return "prune_tokens", self._indices(x, k, tick)
        idx = cur.indices.get(tick.layer)  # select_per: block -> one choice for all sublayers
        if idx is None or idx.shape[0] != x.shape[0]:
            with record_function("toprovar.select_tokens"):
                idx = cur.indices[tick.layer] = self._indices(x, k, tick)
        return "prune_tokens", idx

    def _scale_skipped(self, res, scale: int) -> bool:
        """Whether the whole scale is skipped (listed in skip_scales, or after D in skip_after_D)."""
        gen = self.gen
        if scale in gen.skipped:
            return True
        after_d = self.policy.scale.mode == "skip_after_D" and gen.start_scale is not None and scale > gen.start_scale
        if scale not in res.skip_scales and not after_d:
            return False
        if gen.accumulations == 0:
            # Skipping the transformer without gating the accumulation would add garbage tokens.
            self.session.fallback(
                f"policy {self.policy.name!r} skips scale {scale + 1}, but this sampler accumulates scales "
                "outside the compiled graphs, so the scale cannot be skipped; it runs"
            )
            return False
        gen.skipped.add(scale)
        return True

    def accumulate(self, acc: torch.Tensor, delta: torch.Tensor) -> bool:
        """Called by the gated accumulation after a scale's transformer: add this scale's map?"""
        if self.gen is None:
            return True
        self.gen.accumulations += 1
        return self.tick is None or self.tick.scale not in self.gen.skipped

    def _overridden(self, spec, tick):
        dec = self.override.get((tick.scale, tick.layer))
        if dec is None or dec.action == "keep":
            return "keep", None
        if dec.action == "skip":
            return "skip", None
        idx = dec.kept_idx.get(spec.kind)
        return ("prune_tokens", idx) if idx is not None else ("keep", None)

    def _maybe_classify(self, res, scale: int) -> None:
        """Classify the layers for a decision at ``scale`` (or a later one), if not done yet."""
        gen = self.gen
        lay = self.policy.layer
        if gen.layer_classes or self.policy.scale.mode == "off":
            return
        if lay.mode == "online" and scale <= res.representative:
            return  # online classes need the representative scale's entropy maps
        depth = self.session.clock.depth or 0
        if lay.mode == "off":
            for layer in range(depth):
                gen.layer_classes[layer], gen.layer_scores[layer] = "detail", 1.0
            return
        if lay.mode == "frozen":
            detail = set(lay.frozen.get("detail", ()))
            for layer in range(depth):
                d = layer in detail
                gen.layer_classes[layer], gen.layer_scores[layer] = ("detail", 1.0) if d else ("global", 0.0)
            return
        with record_function("toprovar.layer_svd"):  # the only part with device work
            self._classify_online(res)

    def _classify_online(self, res) -> None:
        """Layer classes from an SVD of each layer's entropy map at the representative scale."""
        gen, lay = self.gen, self.policy.layer
        h, w = gen.hw[res.representative]
        maps = []
        layers = sorted(layer for (s, layer) in gen.entropy if s == res.representative)
        for layer in layers:
            m = gen.entropy[(res.representative, layer)].float().mean(0).reshape(h, w)
            maps.append(m - m.mean() if lay.center else m)
        if not maps:
            return
        sv = torch.linalg.svdvals(torch.stack(maps))  # [layers, min(h, w)]
        ratio = (sv[:, 0] / sv[:, 1].clamp_min(1e-12)).tolist() if sv.shape[1] > 1 else [1.0] * len(layers)
        lo, hi = lay.ambiguity_band
        for layer, rho in zip(layers, ratio):
            r = math.exp(-lay.beta * (rho - 1.0))
            detail = r >= lay.detail_threshold and not (lo <= r <= hi)
            gen.layer_classes[layer] = "detail" if detail else "global"
            gen.layer_scores[layer] = r

    def _decide_scale(self, res, tick) -> None:
        """Once per scale: is pruning active, and how many tokens each layer keeps.

        rho_s and every layer's kept count are computed on the device and moved to the host
        together: the one host synchronisation of this scale (launched earlier by
        ``_launch_ahead`` when the layers before the first that needs it keep everything).
        """
        if self.cur.pending is None:
            self._launch_decision(res, tick)
        self._finish_decision()

    def _launch_decision(self, res, tick) -> None:
        """Queue the scale decision's device work and its copy to the host (``cur.pending``)."""
        s = tick.scale
        ent = self.gen.entropy.get((s, self.policy.scale.measure_layer))
        spec = self._decision_spec(res, s, ent is not None)
        dev = None
        if spec is not None and spec.computes:
            dev = decision_values(ent, self.layer_scores(spec, ent.device), spec)
        self.cur.pending = self._pending(res, spec, dev)

    def _decision_spec(self, res, s: int, has_entropy: bool) -> DecisionSpec | None:
        """What scale ``s``'s decision computes from the measured entropy (None: the policy cannot
        act at ``s``: scale stage off, or before min_start while D is unknown)."""
        pol, gen = self.policy, self.gen
        if pol.scale.mode == "off" or (gen.start_scale is None and s < res.min_start):
            return None
        tok = pol.token
        need_rho = (gen.start_scale is None and pol.scale.criterion == "rho" and s < res.max_start
                    and has_entropy)
        layers: tuple[int, ...] = ()
        if res.ratios is None and has_entropy:
            depth = self.session.clock.depth or 0
            layers = tuple(lay for lay in range(depth) if gen.layer_classes.get(lay) == "detail") or tuple(range(depth))
        phi = (s + 1) / res.num_scales if tok.phi == "linear" else 1.0
        return DecisionSpec(need_rho=need_rho, layers=layers, shared=tok.cfg == "shared",
                            mean_norm=tok.normalization == "mean", phi=phi,
                            alpha_min=tok.alpha_min, alpha_max=tok.alpha_max)

    def measure_spec(self, res, scale: int) -> DecisionSpec | None:
        """The decision a planned measured block of ``scale`` computes in its graph, or None when
        that block runs as any kept block (no device work to do, nothing to decide, decided or
        launched already, layer classes unknown, a test override, or the cached scale)."""
        cur, gen, pol = self.cur, self.gen, self.policy
        if self.override is not None or scale == 0 or (cur is not None and cur.scale == scale
                                                       and (cur.decided or cur.pending is not None)):
            return None
        if pol.restore.mode == "cached_scale" and res.cached_scale == scale:
            return None
        if not gen.layer_classes:
            self._maybe_classify(res, scale)
        if not gen.layer_classes and res.ratios is None:
            return None  # online classes not known yet: the dispatcher classifies first
        spec = self._decision_spec(res, scale, True)
        return spec if spec is not None and spec.computes else None

    def measured(self, spec: DecisionSpec, values: torch.Tensor) -> None:
        """A planned measured block computed its scale's decision ``values`` in its graph (after
        its tick): they go to the host as ``_launch_decision``'s would."""
        cur = self.cur
        if cur is not None and cur.pending is None and not cur.decided:
            cur.pending = self._pending(self._resolve(), spec, values)

    def layer_scores(self, spec: DecisionSpec, device: torch.device) -> torch.Tensor | None:
        """R(l) of ``spec.layers`` on ``device``: made once per generation (the classes are fixed
        per generation), so a graph taking it as input copies it once."""
        if not spec.gated:
            return None
        cached = self._scores
        if cached is not None and cached[0] == spec.layers and cached[1].device == device:
            return cached[1]
        r = torch.tensor([self.gen.layer_scores.get(lay, 1.0) for lay in spec.layers], dtype=torch.float32)
        # pinned and non-blocking: a plain host-to-device copy waits for the whole stream, which
        # made this line the scale decision's real synchronisation (H200 host profile)
        r = r.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else r.to(device)
        self._scores = (spec.layers, r)
        return r

    @staticmethod
    def _pending(res, spec: DecisionSpec | None, dev: torch.Tensor | None) -> PendingDecision:
        """The decision's device ``values`` on their way to the host (pinned, non-blocking)."""
        values, event = None, None
        if dev is not None:
            if dev.is_cuda:
                values = torch.empty(dev.shape, dtype=dev.dtype, pin_memory=True)
                values.copy_(dev, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            else:
                values = dev
        return PendingDecision(res, spec, values, event)

    def _finish_decision(self) -> None:
        """Read the pending decision's values (waiting only for its own device work) and apply them."""
        cur, gen, pol = self.cur, self.gen, self.policy
        pend, cur.pending = cur.pending, None
        cur.decided = True
        spec = pend.spec
        if spec is None:
            return
        if pend.event is not None:
            pend.event.synchronize()
        values = pend.values.tolist() if pend.values is not None else []
        res, need_rho, gated, layers = pend.res, spec.need_rho, spec.gated, spec.layers
        s = cur.scale
        n = gen.tokens[s]
        depth = self.session.clock.depth or 0
        if gen.start_scale is None:
            if pol.scale.criterion == "fixed" or s >= res.max_start:
                gen.start_scale = s
            elif need_rho:
                rho_s = gen.rho[s] = values[0]
                if (rho_s <= pol.scale.tau) if pol.scale.direction == "le" else (rho_s >= pol.scale.tau):
                    gen.start_scale = s
            if gen.start_scale is None:
                return
        cur.active = True
        gen.active[s] = True
        tok = pol.token
        if res.ratios is not None:
            ratio = res.ratios.get(s)
            if ratio is not None:
                cur.kept = dict.fromkeys(range(depth), n - math.floor(ratio * n))
            return
        if not gated:
            return
        for lay, c in zip(layers, values[1:] if need_rho else values):
            k = max(int(c), math.ceil(tok.min_keep_ratio * n))
            cur.kept[lay] = min(n, -(-k // tok.bucket) * tok.bucket)

    def _indices(self, x: torch.Tensor, k: int, tick) -> torch.Tensor:
        """Kept token positions ``[rows, k]``, sorted ascending."""
        tok = self.policy.token
        rows, n = int(x.shape[0]), int(x.shape[1])
        if tok.selection == "frequency":
            return frequency_indices(x, k)
        if tok.selection == "random":
            g = torch.Generator(device="cpu").manual_seed(tok.seed * 100003 + tick.scale * 1009 + tick.layer)
            return torch.randperm(n, generator=g)[:k].to(x.device).expand(rows, k).sort(dim=1).values
        ent = self.selection_entropy(tick.scale)
        idx = self.cached_selection(ent, k, rows)
        if idx is not None:
            return idx  # ~5 launches and their host time saved per pruned block
        idx = entropy_indices(ent, k, rows, tok.cfg == "shared")
        self.remember_selection(ent, k, rows, idx)
        return idx

    def selection_entropy(self, scale: int) -> torch.Tensor | None:
        """The entropy ``[rows, N]`` an entropy selection ranks at ``scale`` now (``token.entropy_source``)."""
        if self.policy.token.entropy_source == "latest_full" and self.latest_full is not None:
            return self.latest_full
        return self.gen.entropy.get((scale, self.policy.scale.measure_layer))

    def cached_selection(self, ent: torch.Tensor | None, k: int, rows: int) -> torch.Tensor | None:
        """The kept positions already selected from ``ent`` for ``k`` and ``rows``, if any: the blocks
        of a scale that share an entropy source and a kept count keep the same tokens."""
        last = self._selection
        if last is not None and last[0] is ent and last[1] == k and last[2] == rows:
            return last[3]
        return None

    def remember_selection(self, ent: torch.Tensor, k: int, rows: int, idx: torch.Tensor) -> None:
        self._selection = (ent, k, rows, idx)
