"""The callables the backend hands back to Dynamo, one per graph."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
from torch.profiler import record_function

from ..runtime.block_plans import PlanRun, apply_plan_effects, cached_inputs, plan_next_block
from ..runtime.decision_ops import decision_values
from ..runtime.token_ops import entropy_indices


def _own_outputs(outs: Any, n: int, sequence: bool) -> Any:
    """The graph's own outputs (the first ``n``), as Dynamo expects them back."""
    return tuple(outs[:n]) if sequence else outs[0]


class GraphRunner:
    """Runs one compiled graph, then records the entropy outputs it returned.

    ``hoisted`` lists ``(site id, key length follows)`` in the order the entropy outputs follow
    the graph's own ``n_outputs`` outputs. ``dense_variant``: this is the dense stand-in of a
    dispatcher graph (prune mode, scales where the policy cannot act), whose self-attentions
    tick the scale clock themselves instead of through the dispatcher.
    """

    def __init__(self, session: Any, fn: Callable, hoisted: list[tuple[int, bool]], n_outputs: int,
                 sequence: bool, dense_variant: bool = False):
        self.session = session
        self.fn = fn
        self.hoisted = hoisted
        self.n_outputs = n_outputs
        self.sequence = sequence
        self.dense_variant = dense_variant

    def __call__(self, *args: Any) -> Any:
        outs = self.fn(*args)
        if not self.hoisted:
            return outs
        n = self.n_outputs
        record = self.session.record_attention
        i = n
        for sid, with_len in self.hoisted:
            key_len = int(outs[i + 1]) if with_len else None
            record(sid, outs[i], None, key_len, self.dense_variant)
            i += 2 if with_len else 1
        return _own_outputs(outs, n, self.sequence)


class ScaleSwitchRunner:
    """Prune mode: the dense variant while the policy cannot act yet, else the dispatcher variant.

    The dense variant is the observe-mode rewrite of the same Dynamo graph (Inductor whole,
    CUDA graphs for small inputs); it is bit-for-bit the computation the dispatcher runs when
    it keeps every branch. ``session.dense_ahead()`` is True only when the next call cannot
    belong to a scale at which the policy skips, prunes, caches or reuses anything.
    """

    def __init__(self, session: Any, dense: GraphRunner, pruned: GraphRunner, self_sites: int,
                 leading_specs: tuple[int, ...], planned: PlannedBlockRunner | None = None):
        self.session = session
        self.dense = dense
        self.pruned = pruned
        self.self_sites = self_sites
        # routed branches before the graph's first self-attention: they belong to the block that
        # is running when the graph is called (a block split over graphs)
        self.leading_specs = leading_specs
        self.mixed = bool(leading_specs) and self_sites > 0  # ends one block and starts the next
        self.planned = planned

    def __call__(self, *args: Any) -> Any:
        planned = self.planned
        if self.session.dense_ahead(self.self_sites, self.mixed, planned is not None and not planned.disabled):
            if self.leading_specs:  # the self-attentions account their blocks' branches when they record
                self.session.decider.account_kept(self.leading_specs)
            return self.dense(*args)
        if planned is not None:
            done, out = planned.try_call(args)
            if done:
                return out
        return self.pruned(*args)


class PlannedBlockRunner:
    """Prune mode, one-block dispatcher graphs: run a block whose decisions are known as data.

    When ``plan_next_block`` gives the next block's plan, the dispatcher graph runs with the
    decider in plan mode (no decisions, no side effects) inside ``wrap(fn, n_extra)`` (a
    ``CudaGraphCache`` per plan signature: replayed from a CUDA graph on CUDA, called directly
    elsewhere), with the kept indices and the cached-scale outputs as more inputs; the
    dispatcher's side effects are applied afterwards (``apply_plan_effects``). Preconditions:
    the graph's stream input is argument ``hidden_arg``, it hoists no entropy of its own (every
    attention is inside a routed branch), its routed branches are ``spec_ids`` in graph order,
    and it writes into none of its inputs.

    A block whose every branch is skipped (a skipped scale, a skipped layer) usually returns its
    inputs unchanged, yet replaying it from a CUDA graph clones them and runs the work outside its
    branches (2.3-2.6 ms of GPU per skipped scale on Infinity-2B). The first such call runs the
    graph directly and records which input each output is (``skip_outputs``); later ones hand the
    inputs back without running anything. A graph whose outputs are not all inputs always runs.
    """

    def __init__(self, session: Any, fn: Callable, spec_ids: list[int], hidden_arg: int, n_outputs: int,
                 sequence: bool, wrap: Callable[[Callable, int], Callable]):
        self.session = session
        self.fn = fn
        self.spec_ids = spec_ids
        self.hidden_arg = hidden_arg
        self.n_outputs = n_outputs
        self.sequence = sequence
        self.wrap = wrap
        self.by_signature: dict[tuple[Any, ...], Callable] = {}
        self.disabled = False  # a planned call failed: the dispatcher runs every block
        # with every branch skipped, the input each output is (False: some output is not an input;
        # None: not known yet)
        self.skip_outputs: tuple[int, ...] | bool | None = None

    def _planned_fn(self, *args_and_extra: Any) -> tuple[Any, ...]:
        """The graph's arguments, then the kept indices (None: none, or selected in the graph),
        then the cached-scale outputs; returns the graph's outputs, the entropies, the first
        in-graph selection if there is one, and the kept branches' outputs if the plan records
        the cached scale."""
        decider = self.session.decider
        run = decider.plan_run
        n = len(args_and_extra) - 1 - run.n_cached
        run.idx, run.cached = args_and_extra[n], tuple(args_and_extra[n + 1:])
        run.step, run.pruned, run.first_idx, run.entropies, run.deltas = 0, 0, None, [], []
        plan = run.plan
        if plan.select_entropy:  # the extra input is the entropy to rank: select here, once per block
            run.idx = run.first_idx = entropy_indices(run.idx, plan.k, plan.rows,
                                                      decider.policy.token.cfg == "shared")
        try:
            outs = self.fn(*args_and_extra[:n])
            outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
            decision = (self._decision(run),) if plan.measure is not None else ()
        finally:
            # Not held past the call: under a CUDA-graph capture these are aliases of other graphs'
            # lent outputs, and one still alive when the capture counts the references it leaves
            # behind (``CudaGraphCache._capture``) makes the lender look held once it is let go:
            # the lender then never replays, nor does any graph reading its outputs in place
            run.idx, run.cached = None, ()
        first = (run.first_idx,) if run.first_idx is not None else ()
        return (*outs, *[e for ents in run.entropies for e in ents], *first, *run.deltas, *decision)

    def _decision(self, run: PlanRun) -> torch.Tensor:
        """A measured block's scale decision, from its self-attention's entropy (``run.idx``: R(l))."""
        sites = self.session.sites
        ent = next(e for spec, ents in zip(run.specs, run.entropies)
                   for sid, e in zip(spec.site_ids, ents) if sites[sid].kind == "self")
        return decision_values(ent, run.idx, run.plan.measure)

    def try_call(self, args: tuple[Any, ...]) -> tuple[bool, Any]:
        session = self.session
        decider = session.decider
        if self.disabled:
            return False, None
        specs = [session.branches[i] for i in self.spec_ids]
        plan = plan_next_block(decider, specs)
        x = args[self.hidden_arg]
        if (plan is None or not isinstance(x, torch.Tensor) or x.dim() < 2
                or int(x.shape[0]) != plan.rows or int(x.shape[1]) != plan.tokens):
            return False, None
        if plan.skips_all and self.skip_outputs is not False:
            outs = self._skipped(plan, specs, args)
            if outs is not None:
                return True, outs
        given = None  # the plan's own input (``PlanRun.idx``)
        if plan.measure is not None:
            given = decider.layer_scores(plan.measure, x.device)
        elif plan.select_entropy:
            given = decider.selection_entropy(plan.scale)  # ranked inside the graph
        elif plan.prunes and not plan.select_in_graph:
            where = SimpleNamespace(scale=plan.scale, layer=plan.layer)  # the tick this block will get
            with record_function("toprovar.select_tokens"):
                given = decider._indices(x, plan.k, where)
        cached = cached_inputs(decider, plan, specs)
        fn = self.by_signature.get(plan.signature)
        if fn is None:
            fn = self.by_signature[plan.signature] = self.wrap(self._planned_fn, 1 + len(cached))
        decider.plan_run = PlanRun(plan, specs=tuple(specs), cached=cached)
        try:
            outs = fn(*args, given, *cached)
        except Exception as err:  # noqa: BLE001 - nothing happened yet: the dispatcher runs the block
            if session.settings.strict or isinstance(err, torch.OutOfMemoryError):
                raise  # out of memory with the graphs' memory given back (``SharedPool.relieve``): not the plan's fault
            self.disabled = True
            session.fallback(f"a planned block failed ({type(err).__name__}: {err}); pruned blocks run through "
                             "the dispatcher from now on")
            return False, None
        finally:
            decider.plan_run = None
        tick = self._tick(plan)
        n = self.n_outputs
        extra = tuple(outs[n:])
        if plan.measure is not None:
            extra, decision = extra[:-1], extra[-1]
        deltas: tuple[Any, ...] = ()
        if plan.record_cache:
            n_kept = plan.actions.count("keep")
            extra, deltas = extra[:-n_kept], extra[-n_kept:]
        idx = given if plan.prunes else None  # the kept positions (a measured block prunes nothing)
        if plan.select_entropy:
            extra, idx = extra[:-1], extra[-1]
            decider.remember_selection(given, plan.k, plan.rows, idx)
        elif plan.select_in_graph and plan.prunes:
            extra, idx = extra[:-1], extra[-1]
        apply_plan_effects(decider, plan, specs, extra, tick, idx, deltas)
        if plan.measure is not None:
            decider.measured(plan.measure, decision)
        return True, _own_outputs(outs, n, self.sequence)

    def _tick(self, plan: Any) -> Any:
        """The clock tick of the block just run, which must be the plan's."""
        tick = self.session.tick(plan.tokens, plan.rows)
        if (tick.scale, tick.layer) != (plan.scale, plan.layer):
            raise RuntimeError(f"toprovar: planned block {(plan.scale, plan.layer)} ran as {(tick.scale, tick.layer)}")
        self.session.planned_calls += 1
        return tick

    def _skipped(self, plan: Any, specs: list[Any], args: tuple[Any, ...]) -> Any:
        """A block with every branch skipped: its inputs handed back. The first such call runs the
        graph directly to learn which input each output is; None if it failed or they are not
        all inputs (the caller then runs the block as any other plan)."""
        session = self.session
        if self.skip_outputs is None:
            session.decider.plan_run = PlanRun(plan, specs=tuple(specs))
            try:
                outs = self._planned_fn(*args, None)
            except Exception:  # noqa: BLE001 - nothing happened yet: the plan's own call reports it
                if session.settings.strict:
                    raise
                self.skip_outputs = False
                return None
            finally:
                session.decider.plan_run = None
            where = [next((i for i, a in enumerate(args) if a is o), None) for o in outs]
            self.skip_outputs = tuple(where) if len(outs) == self.n_outputs and None not in where else False
        else:
            outs = tuple(args[i] for i in self.skip_outputs)
        apply_plan_effects(session.decider, plan, specs, (), self._tick(plan), None)
        return _own_outputs(outs, self.n_outputs, self.sequence)
