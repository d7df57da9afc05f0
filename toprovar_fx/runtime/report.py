"""The generation report: what the backend did during one generation, JSON-able."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class LayerReport:
    """One block at one scale."""

    index: int
    layer_class: str | None = None  # "global" | "detail" | None (not classified)
    r_score: float | None = None  # R(l) = exp(-beta (sigma1/sigma2 - 1)) at the representative scale
    action: str = "keep"  # keep | skip | prune_tokens
    kept_tokens: int | None = None  # tokens the block ran on (None = all)
    mean_entropy: float | None = None  # head- and row-averaged self-attention entropy (nats)


@dataclass
class ScaleReport:
    index: int
    h: int
    w: int
    tokens: int
    rho: float | None = None  # fraction of tokens with entropy below the mean, at the measured layer
    pruning_active: bool = False
    skipped: bool = False  # the whole scale was skipped (no transformer work, nothing accumulated)
    layers: list[LayerReport] = field(default_factory=list)
    flops_dense: float = 0.0
    flops_executed: float = 0.0


@dataclass
class GenerationReport:
    """Most recent generation; ``toprovar_fx.last_generation()`` returns it."""

    mode: str = "observe"
    policy: str | None = None
    attention_rewrites: int = 0
    attention_kinds: dict[str, int] = field(default_factory=dict)  # pattern -> count rewritten
    attention_skipped: list[dict[str, str]] = field(default_factory=list)  # refusals with reasons
    rows: int = 0  # transformer batch rows (2B with CFG)
    depth: int | None = None
    heads: int | None = None  # of the self-attention, as traced
    head_dim: int | None = None
    width: int | None = None  # heads * head_dim
    start_scale: int | None = None  # D (0-based), None = pruning never active
    rho_layer: int = 0  # the layer whose entropy gives rho (the policy's measure_layer; 0 without policy)
    scales: list[ScaleReport] = field(default_factory=list)
    flops_dense: float = 0.0
    flops_executed: float = 0.0
    graphs: int = 0  # graphs the backend compiled in this session so far
    compiles: int = 0  # graphs compiled while this generation ran
    recompiles: int = 0  # compiles during a generation that was not the session's first
    compile_seconds: float = 0.0
    planned_blocks: int = 0  # blocks run from a plan inside a CUDA graph (option planned_blocks)
    # hoisted cross-attention contexts (text K/V) computed in this session so far: one per block
    # and text (option hoist_context), not one per block call
    context_computes: int = 0
    # calls of this generation (from its first attention on) replayed from a CUDA graph, and calls
    # that had a graph but ran without it because an output it lent was still held (option
    # cuda_graph_lend_outputs); None with cuda_graph_pool: private
    graph_replays: int | None = None
    graph_calls_without_replay: int | None = None
    fallbacks: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def flop_ratio(self) -> float:
        return self.flops_executed / self.flops_dense if self.flops_dense else 1.0
