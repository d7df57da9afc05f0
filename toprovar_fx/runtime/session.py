"""Per-``torch.compile`` state: sites found at compile time, events seen at run time, reports.

One ``Session`` exists per options dict passed to ``torch.compile(..., backend="toprovar")``
(Dynamo passes the same dict object for every graph of one compiled function). Graph code
refers to its session by an integer id, so the graphs stay plain FX (no Python objects in
node arguments).

Run-time cost: events only append tensors to lists (no host synchronisation). Statistics
(means, rho, entropy maps) are computed when a report is asked for; pruning decisions
synchronise at most once per scale, at the first block that needs them (``runtime/decisions.py``).
"""

from __future__ import annotations

import itertools
import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from .clock import ScaleClock, Tick
from .entropy_stats import low_entropy_ratio
from .report import GenerationReport, LayerReport, ScaleReport

log = logging.getLogger("toprovar")

_SESSIONS: dict[int, Session] = {}
_ids = itertools.count()
_LAST: list[Session] = []  # the session that ran most recently


@dataclass
class SiteInfo:
    """An attention site found in some graph at compile time."""

    site_id: int
    pattern: str  # sdpa | flash_attn | explicit_softmax
    kind: str  # self | cross
    heads: int
    head_dim: int
    graph_id: int
    # Matmul FLOPs per query token of the block this self-attention opens (linear layers of
    # its residual branches); used for the executed/dense FLOP accounting.
    linear_flops_per_token: float = 0.0


@dataclass
class GenerationState:
    """Everything recorded during one generation."""

    index: int
    started: float
    compiles_before: int
    compile_seconds_before: float
    planned_before: int = 0
    graph_counts_before: tuple[int, int] | None = None  # shared pool's (replays, busy) at the start
    entropy: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # (scale, layer) -> [rows, L]
    tokens: dict[int, int] = field(default_factory=dict)  # scale -> token count
    hw: dict[int, tuple[int, int]] = field(default_factory=dict)
    rows: int = 0
    flops: dict[tuple[int, int], list[float]] = field(default_factory=dict)  # (scale, layer) -> [dense, executed]
    # blocks that ran dense outside the dispatcher, accounted when a report asks (``Session.settle_flops``):
    # (scale, layer, rows, the block's routed spec ids or its SiteInfo)
    kept_blocks: list[tuple[int, int, int, Any]] = field(default_factory=list)
    kept_keys: set[tuple[int, int]] = field(default_factory=set)
    actions: dict[tuple[int, int], tuple[str, int | None]] = field(default_factory=dict)
    kept_idx: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # (scale, layer) -> [rows, k] kept positions (device)
    rho: dict[int, float] = field(default_factory=dict)
    active: dict[int, bool] = field(default_factory=dict)
    skipped: set[int] = field(default_factory=set)  # scales whose token maps were not accumulated
    accumulations: int = 0  # gated accumulations run in this generation
    start_scale: int | None = None
    layer_scores: dict[int, float] = field(default_factory=dict)  # layer -> R
    layer_classes: dict[int, str] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)


class Session:
    """State shared by every graph of one compiled sampler."""

    def __init__(self, settings: Any, policy: Any | None) -> None:
        self.id = next(_ids)
        self.settings = settings
        self.policy = policy
        schedules = policy.schedules if policy is not None else settings.schedules
        self.clock = ScaleClock(schedules)
        self.sites: list[SiteInfo] = []
        self.branches: list[Any] = []  # BranchSpec, indexed by spec id
        self.accumulation_sites = 0  # gated scale accumulations found in graphs
        self.unrouted: set[str] = set()  # why self-attention branches were not routed (compile time)
        self.graphs = 0
        self.compile_seconds = 0.0
        self.attention_kinds: dict[str, int] = {}
        self.attention_skipped: list[dict[str, str]] = []
        self.session_fallbacks: list[str] = []
        self._warned: set[str] = set()
        self.gen: GenerationState | None = None
        self.decider: Any | None = None  # set by the backend in prune mode
        self._in_branch = 0
        self.compiled_branches: dict[str, Any] = {}  # branch code -> compiled callable (lowering/)
        # self-attention site -> the routed branch specs of its block (the self-attention branch
        # and those after it up to the next one): what the dense variant of a routed graph
        # accounts when it runs the block, exactly as the dispatcher would for kept branches
        self.block_specs: dict[int, tuple[int, ...]] = {}
        self.planned_calls = 0  # blocks run from a plan (lowering.runners.PlannedBlockRunner)
        # every ContextMemo of the session (runtime/context_memo.py), by the signature of the context
        # it computes (graphs with the same one share it) or, unshareable, by its own identity
        self.context_memos: dict[Any, Any] = {}
        # the running generation's first active scale once the decider knows it
        # (``Decider.first_active_scale``), else -1: a graph call holding at most one self-attention
        # whose clock is two or more scales before it keeps every branch (``dense_ahead``, asked
        # before every block call in prune mode)
        self.dense_until = -1
        self._graph_pool: Any = None
        _SESSIONS[self.id] = self

    # ----- compile time -------------------------------------------------------------------
    def graph_pool(self) -> Any:
        """The ``SharedPool`` of this session's CUDA graphs; None with ``cuda_graph_pool: private``."""
        if self.settings.cuda_graph_pool != "shared":
            return None
        if self._graph_pool is None:
            from ..lowering.cuda_graphs import SharedPool

            mib = self.settings.cuda_graph_private_max_mib
            free_mib = self.settings.cuda_graph_min_free_mib
            clock = self.clock
            self._graph_pool = SharedPool(private_budget=None if mib is None else int(mib * 2**20),
                                          position=lambda: (clock.generation, clock.scale),
                                          min_free=None if free_mib is None else int(free_mib * 2**20),
                                          rows=lambda: self.gen.rows if self.gen is not None else 0)
        return self._graph_pool

    def add_site(self, **kw: Any) -> SiteInfo:
        site = SiteInfo(site_id=len(self.sites), **kw)
        self.sites.append(site)
        self.attention_kinds[site.pattern] = self.attention_kinds.get(site.pattern, 0) + 1
        return site

    def add_branch(self, spec: Any) -> int:
        self.branches.append(spec)
        return len(self.branches) - 1

    @property
    def context_computes(self) -> int:
        """Hoisted cross-attention contexts computed in this session so far."""
        return sum(memo.computes for memo in self.context_memos.values())

    def note_compile(self, seconds: float) -> None:
        self.graphs += 1
        self.compile_seconds += seconds

    def fallback(self, message: str) -> None:
        """Record a fallback; warn once per distinct message."""
        target = self.gen.fallbacks if self.gen is not None else self.session_fallbacks
        if message not in target:
            target.append(message)
        if message not in self._warned:
            self._warned.add(message)
            log.warning("toprovar: %s", message)
            warnings.warn(f"toprovar: {message}", RuntimeWarning, stacklevel=3)

    # ----- run time -----------------------------------------------------------------------
    def tick(self, tokens: int, rows: int) -> Tick:
        """Advance the scale clock by one self-attention of ``tokens`` query tokens."""
        t = self.clock.tick(tokens)
        if not t.new_scale and _LAST[0] is self:
            # the next layer of the running scale: most ticks, one per block call at the
            # launch-bound scales; nothing of the generation's or scale's state changes
            if self.decider is not None:
                self.decider.on_tick(t)
            return t
        if not _LAST or _LAST[0] is not self:
            _LAST[:] = [self]
        if t.new_generation:
            self._maybe_start_lending()
            self.gen = GenerationState(
                index=t.generation,
                started=time.perf_counter(),
                compiles_before=self.graphs,
                compile_seconds_before=self.compile_seconds,
                planned_before=self.planned_calls,
                graph_counts_before=self._graph_counts(),
            )
            self.gen.fallbacks.extend(self.session_fallbacks)
            self.session_fallbacks = []
            if self.decider is not None:
                self.decider.start_generation(self.gen)
        if self.decider is not None:
            self.decider.on_tick(t)
        gen = self.gen
        if t.new_scale:
            gen.tokens[t.scale] = tokens
            gen.hw[t.scale] = self.clock.hw(t.scale, tokens)
            gen.rows = rows
            if self.clock.mismatch is not None and self.policy is not None and t.scale == len(self.clock.token_history) - 1:
                self._policy_mismatch(self.clock.mismatch)
        return t

    def _graph_counts(self) -> tuple[int, int] | None:
        pool = self._graph_pool
        return None if pool is None else (pool.replays, pool.busy)

    def _maybe_start_lending(self) -> None:
        """Option ``cuda_graph_lend_outputs``: start lending CUDA-graph outputs after the first
        generation that compiled nothing (lent outputs taken while Dynamo compiles stay referenced
        by its example values; see ``SharedPool.start_lending``)."""
        prev, pool = self.gen, self._graph_pool
        if (pool is None or pool.lending or prev is None or not self.settings.cuda_graph_lend_outputs
                or self.graphs != prev.compiles_before):
            return
        dropped = pool.start_lending()
        log.info("toprovar: lending CUDA-graph outputs from generation %d on (1-based; %d graphs to capture again)",
                 prev.index + 2, dropped)

    def dense_ahead(self, self_sites: int = 1, mixed: bool = False, plannable: bool = False) -> bool:
        """Whether the next call of a graph holding ``self_sites`` self-attentions surely keeps
        every branch and computes nothing else (prune mode; ``Decider.keeps_all_next``; a
        ``plannable`` graph's measured block computes its scale's decision). Unknown is False."""
        if self_sites <= 1 and self.clock.scale + 1 < self.dense_until:
            return True  # before the first active scale (``Decider.first_active_scale``, remembered here)
        decider = self.decider
        if decider is None:
            return True
        if self.clock.generation < 0 or self.gen is None:
            return False
        return decider.keeps_all_next(self_sites, mixed, plannable)

    def _policy_may_act(self, scale: int) -> bool:
        """Whether the policy may skip or prune anything at ``scale`` (unknown: True). Before its
        first active scale a site outside a routed branch loses nothing: at batch 8 with CFG,
        Dynamo's graph for the 4x4 scale (16 rows, 16 tokens) cannot route, and warned each time."""
        first = self.decider.first_active_scale()
        return first is None or scale >= first

    def _policy_mismatch(self, message: str) -> None:
        """The policy does not fit what runs: raise (strict / on_mismatch: error) or go dense."""
        text = f"policy {self.policy.name!r}: {message}; running dense"
        if text in self.gen.fallbacks:
            return
        if self.settings.strict or self.policy.fallback.on_mismatch == "error":
            raise RuntimeError(f"toprovar: policy {self.policy.name!r} ({self.policy.source}): {message}")
        self.fallback(text)

    def record_attention(self, site_id: int, entropy: torch.Tensor, tick: Tick | None = None,
                         key_len: int | None = None, dense_variant: bool = False) -> None:
        """An attention site produced head-mean entropy ``[rows, Lq]``.

        ``key_len`` comes with sites whose kind could not be told from their graph (a block
        split over several graphs): it is self-attention when the keys are exactly the tokens
        of every scale so far (the K/V cache plus this scale). ``dense_variant``: the site ran
        in the dense stand-in of a routed graph (``dense_ahead``), not outside a routed branch.
        """
        site = self.sites[site_id]
        rows, lq = entropy.shape[0], entropy.shape[-1]
        kind = site.kind
        if kind == "unknown":
            kind = "self" if key_len == self.clock.expected_self_keys(int(lq)) else "cross"
        if kind != "self":
            return
        observe = tick is None  # in prune mode the dispatcher ticks and counts FLOPs itself
        if observe:
            tick = self.tick(int(lq), int(rows))
            if self.decider is not None and tick.scale > 0 and not dense_variant and self._policy_may_act(tick.scale):
                reasons = "; ".join(sorted(self.unrouted)) or "no residual branch found around it"
                self.fallback(
                    "a self-attention ran outside a routed residual branch, so its layer cannot be skipped "
                    f"or pruned and runs dense (compile-time reasons: {reasons})"
                )
        gen = self.gen
        key = (tick.scale, tick.layer)
        if lq == gen.tokens.get(tick.scale):
            ent = entropy.detach() if entropy.requires_grad else entropy
            if tick.new_generation:
                # A lent CUDA-graph output (``CudaGraphCache._lendable``) held until the next
                # generation's first tick, which comes after that generation's first graph call:
                # held, its graph would run without replay, and so would every graph reading
                # its outputs in place after it (their addresses differ), for the whole generation.
                ent = ent.clone()
            gen.entropy[key] = ent
            if dense_variant and self.decider is not None:
                self.decider.latest_full = ent  # as the dispatcher's keep path records
        if observe and key not in gen.kept_keys and key not in gen.flops:
            specs = self.block_specs.get(site_id) if dense_variant and self.decider is not None else None
            self.defer_kept(tick, specs or site)

    def defer_kept(self, tick: Tick, what: tuple[int, ...] | SiteInfo) -> None:
        """A block (its routed spec ids, or the SiteInfo of its self-attention in observe mode) ran
        dense at ``tick`` outside the dispatcher. Its FLOPs are computed when a report asks
        (``settle_flops``), not here: at the launch-bound early scales the host time per block call
        is the latency, and the accounting was the largest part of ours (about 12 us per call on
        the CPU host). Deferring it changes nothing: it reads only the token counts of this and
        earlier scales and the actions taken at earlier scales, none of which change later."""
        gen = self.gen
        gen.kept_keys.add((tick.scale, tick.layer))
        gen.kept_blocks.append((tick.scale, tick.layer, gen.rows, what))

    def settle_flops(self) -> None:
        """Account the blocks ``defer_kept`` recorded, in the order they ran."""
        gen = self.gen
        if gen is None or not gen.kept_blocks:
            return
        pending, gen.kept_blocks = gen.kept_blocks, []
        for scale, layer, rows, what in pending:
            if isinstance(what, SiteInfo):
                self._count_flops(what, scale, layer, rows)
            else:
                for spec_id in what:
                    self.decider.account(self.branches[spec_id], scale, layer, rows, "keep", gen.tokens[scale])

    def _count_flops(self, site: SiteInfo, scale: int, layer: int, rows: int) -> None:
        """FLOPs of one block run on every token: linear layers per token plus attention against
        the K/V cache."""
        gen = self.gen
        n = gen.tokens[scale]
        lk_dense = sum(gen.tokens[s] for s in range(scale + 1) if s in gen.tokens)
        lk_exec = self._kv_len(layer, scale) + n
        per_pair = 4.0 * site.heads * site.head_dim
        dense = rows * (n * site.linear_flops_per_token + per_pair * n * lk_dense)
        executed = rows * (n * site.linear_flops_per_token + per_pair * n * lk_exec)
        gen.flops[(scale, layer)] = [dense, executed]
        gen.actions.setdefault((scale, layer), ("keep", None))

    def _kv_len(self, layer: int, scale: int) -> int:
        """K/V tokens this layer holds from scales before ``scale`` (pruned tokens are not kept)."""
        gen = self.gen
        total = 0
        for s in range(scale):
            action, kept = gen.actions.get((s, layer), ("keep", None))
            if action == "skip":
                continue
            total += gen.tokens.get(s, 0) if kept is None else kept
        return total

    # ----- reports ------------------------------------------------------------------------
    def report(self) -> GenerationReport:
        self.settle_flops()
        gen = self.gen
        rep = GenerationReport(
            mode=self.settings.resolved_mode,
            policy=getattr(self.policy, "name", None),
            attention_rewrites=len(self.sites),
            attention_kinds=dict(self.attention_kinds),
            attention_skipped=list(self.attention_skipped),
            graphs=self.graphs,
            depth=self.clock.depth,
        )
        selfs = [site for site in self.sites if site.kind in ("self", "unknown")]
        if selfs:
            rep.heads, rep.head_dim = selfs[0].heads, selfs[0].head_dim
            rep.width = rep.heads * rep.head_dim
        if gen is None:
            rep.fallbacks = list(self.session_fallbacks)
            return rep
        rep.rows = gen.rows
        rep.start_scale = gen.start_scale
        rep.rho_layer = self._measure_layer()
        rep.compiles = self.graphs - gen.compiles_before
        rep.recompiles = rep.compiles if gen.index > 0 else 0
        rep.compile_seconds = self.compile_seconds - gen.compile_seconds_before
        rep.planned_blocks = self.planned_calls - gen.planned_before
        rep.context_computes = self.context_computes
        now, before = self._graph_counts(), gen.graph_counts_before
        if now is not None:
            before = before or (0, 0)
            rep.graph_replays, rep.graph_calls_without_replay = now[0] - before[0], now[1] - before[1]
        rep.fallbacks = list(gen.fallbacks)
        means = self._layer_means(gen)
        for s in sorted(gen.tokens):
            h, w = gen.hw[s]
            sr = ScaleReport(index=s, h=h, w=w, tokens=gen.tokens[s], rho=gen.rho.get(s),
                             pruning_active=gen.active.get(s, False), skipped=s in gen.skipped)
            layers = sorted({layer for (sc, layer) in gen.flops if sc == s})
            for layer in layers:
                action, kept = gen.actions.get((s, layer), ("keep", None))
                dense, executed = gen.flops[(s, layer)]
                sr.flops_dense += dense
                sr.flops_executed += executed
                sr.layers.append(LayerReport(
                    index=layer,
                    layer_class=gen.layer_classes.get(layer),
                    r_score=gen.layer_scores.get(layer),
                    action=action,
                    kept_tokens=kept,
                    mean_entropy=means.get((s, layer)),
                ))
            if sr.rho is None:
                sr.rho = self._rho(gen, s)
            rep.flops_dense += sr.flops_dense
            rep.flops_executed += sr.flops_executed
            rep.scales.append(sr)
        return rep

    def _measure_layer(self) -> int:
        if self.policy is not None:
            return int(self.policy.scale.measure_layer)
        return 0

    def _rho(self, gen: GenerationState, scale: int) -> float | None:
        ent = gen.entropy.get((scale, self._measure_layer()))
        return None if ent is None else float(low_entropy_ratio(ent))

    @staticmethod
    def _layer_means(gen: GenerationState) -> dict[tuple[int, int], float]:
        if not gen.entropy:
            return {}
        keys = list(gen.entropy)
        # one host transfer for all layers and scales
        vals = torch.stack([gen.entropy[k].float().mean() for k in keys]).tolist()
        return dict(zip(keys, vals))

    def entropy_maps(self) -> dict[tuple[int, int], torch.Tensor]:
        """``(scale, layer) -> [h, w]`` head- and row-averaged entropy maps (CPU, fp32)."""
        gen = self.gen
        if gen is None:
            return {}
        out = {}
        for (s, layer), ent in gen.entropy.items():
            h, w = gen.hw[s]
            out[(s, layer)] = ent.float().mean(0).reshape(h, w).cpu()
        return out


def get_session(session_id: int) -> Session:
    return _SESSIONS[session_id]


def last_session() -> Session | None:
    return _LAST[0] if _LAST else None


def last_generation() -> GenerationReport | None:
    """The report of the most recent generation run through the ``toprovar`` backend."""
    s = last_session()
    return s.report() if s is not None else None


def entropy_maps() -> dict[tuple[int, int], torch.Tensor]:
    """Entropy maps ``(scale, layer) -> [h, w]`` of the most recent generation."""
    s = last_session()
    return s.entropy_maps() if s is not None else {}
