"""Options of the ``toprovar`` backend, parsed once per ``torch.compile`` call.

``torch.compile(fn, backend="toprovar", options={...})`` hands the ``options`` dict to the
backend for every graph Dynamo produces. It is parsed here into a frozen ``Settings``;
unknown keys are errors that list the valid ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

VALID_MODES = ("observe", "prune")
CUDA_GRAPH_POOLS = ("shared", "private")


# the text-length bucket (tokens) of prune mode when option ``context_bucket`` is not given
DEFAULT_CONTEXT_BUCKET = 16


@dataclass(frozen=True)
class Settings:
    """What one ``torch.compile(..., backend="toprovar")`` call asked for."""

    # A shipped policy name, a YAML path, a dict, or None (observe only).
    policy: Any = None
    # Preset of the policy (quality | balanced | fast | fastest); None = the policy's default_preset.
    preset: str | None = None
    # "observe": rewrite attention and record entropy only; "prune": apply the policy.
    # None = "prune" when a policy is given, else "observe".
    mode: str | None = None
    # Hand rewritten graphs to Inductor. None = on for CUDA graphs, off for CPU graphs.
    inductor: bool | None = None
    # Replay graphs whose per-call inputs are small (the early, launch-bound scales) from CUDA
    # graphs captured by the backend. None = on for CUDA graphs.
    cuda_graphs: bool | None = None
    # Largest per-call input size (MiB, copied into the graph's buffers each call) captured.
    cuda_graph_max_mib: float = 64.0
    # One memory pool for all CUDA graphs of a session ("shared") or one per graph ("private").
    cuda_graph_pool: str = "shared"
    # Hand CUDA-graph outputs out as aliases instead of clones, and let a graph read another
    # graph's output in place (no copy); a graph whose output is still held runs without replay.
    cuda_graph_lend_outputs: bool = True
    # Most memory (MiB) the pools of graphs that lend large outputs in place may reserve in all;
    # past it such graphs lend from their group's shared pool. None = 1/16 of the GPU's memory.
    cuda_graph_private_max_mib: float | None = None
    # Free device memory (MiB) a new CUDA-graph capture must leave; below it new shapes run
    # without graphs until memory is free again. None = 1/32 of the GPU's memory.
    cuda_graph_min_free_mib: float | None = None
    # Prune mode: run blocks whose decisions are known in advance as planned blocks, replayed from
    # CUDA graphs per decision signature (runtime/block_plans.py).
    planned_blocks: bool = True
    # Compute each cross-attention's text K/V once per block and text, not in every block call
    # (passes/hoist_context.py).
    hoist_context: bool = True
    # Pad the hoisted text context to a multiple of this many tokens where that is exact, so texts
    # of several lengths share block graphs (passes/bucket_context.py); 0 = off. None = by mode
    # (``resolved_context_bucket``): on the H200 a new text length in a seen bucket costs ~0.1 s
    # instead of 2.5-4 s of captures and graph pools halve with two lengths, for <= 1% latency
    # (benchmarks/results/e2e-2026-12-01-buckets.md, before the planned blocks were captured per kept
    # count, which new prompts may add); but in bfloat16 the longer masked key length
    # changes the rounding, and observe mode promises dense's output.
    context_bucket: int | None = None
    # Inductor config patches (``torch._inductor.config`` names -> values) for every graph and
    # branch the backend hands to Inductor, e.g. ``{"coordinate_descent_tuning": True}``; None = none.
    inductor_options: Mapping[str, Any] | None = None
    # Raise instead of falling back to dense execution.
    strict: bool = False
    # Dynamo's recompile limit is raised to at least this so that every scale of a
    # 10-13 scale sampler runs compiled (Dynamo's default of 8 silently falls back to eager).
    recompile_limit: int = 64
    # Extra per-scale token-count schedules (name -> [[h, w], ...]) used to recognise scales
    # when no policy is given (observe mode); the policy's schedules are used otherwise.
    schedules: Mapping[str, Any] | None = None

    @property
    def resolved_mode(self) -> str:
        if self.mode is not None:
            return self.mode
        return "prune" if self.policy is not None else "observe"

    @property
    def resolved_context_bucket(self) -> int:
        """``context_bucket``, or by default 16 tokens when pruning (whose images differ from dense's
        by design) and 0 in observe mode (whose images must stay dense's, also in bfloat16)."""
        if self.context_bucket is not None:
            return self.context_bucket
        return DEFAULT_CONTEXT_BUCKET if self.resolved_mode == "prune" else 0


_OPTION_DOCS = {
    "policy": "shipped policy name, path to a YAML file, a dict, or a Policy",
    "preset": "quality | balanced | fast | fastest (a preset defined by the policy)",
    "mode": "observe | prune",
    "inductor": "bool: hand rewritten graphs to Inductor (default: on for CUDA, off for CPU)",
    "cuda_graphs": "bool: replay small graphs (early scales) from CUDA graphs (default: on for CUDA)",
    "cuda_graph_max_mib": "number > 0: largest per-call input size (MiB) replayed from a CUDA graph "
                          "(block graphs in prune mode: 8x that)",
    "cuda_graph_pool": "shared | private: one CUDA-graph memory pool per session (default) or per graph",
    "cuda_graph_lend_outputs": "bool: hand CUDA-graph outputs out without a clone and read them in place "
                               "in the next graph, from the first generation after one that compiled nothing (default on; "
                               "needs cuda_graph_pool: shared)",
    "cuda_graph_private_max_mib": "number >= 0: most memory (MiB) reserved in all by the own pools of graphs "
                                  "that lend large outputs in place; past it they lend from their group's pool "
                                  "(default: 1/16 of the GPU's memory)",
    "cuda_graph_min_free_mib": "number >= 0: free GPU memory (MiB) below which new shapes are not captured "
                               "in CUDA graphs and run without (prompts of many text lengths capture graphs per "
                               "length; default: 1/32 of the GPU's memory)",
    "planned_blocks": "bool: prune mode, replay pruned blocks with known decisions from CUDA graphs "
                      "(default on)",
    "hoist_context": "bool: compute the cross-attention K/V of the text once per block and text instead of "
                     "at every scale (default on)",
    "context_bucket": "int >= 0: pad the hoisted text context to a multiple of this many tokens (exact: masked "
                      "keys), so prompts of several lengths share CUDA graphs and their memory (default: 16 in prune mode, "
                      "0 = off in observe mode)",
    "inductor_options": "dict: torch._inductor.config patches (name -> bool, int, float or str) for every graph "
                        "the backend compiles with Inductor, e.g. {coordinate_descent_tuning: true}; Inductor's "
                        "own CUDA graphs (triton.cudagraphs) are refused: use cuda_graphs",
    "strict": "bool: raise instead of falling back to dense",
    "recompile_limit": "int >= 16: Dynamo recompile budget raised to at least this",
    "schedules": "dict name -> [[h, w], ...]: token-map schedules for observe mode",
}


def _optional_mib(options: Mapping[str, Any], key: str) -> float | None:
    """Option ``key``: None (its default, resolved from the device) or a number of MiB >= 0."""
    value = options.get(key)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
        raise ValueError(f"toprovar: option {key!r} must be a number >= 0, got {value!r}")
    return float(value)


# Inductor settings that would capture CUDA graphs inside ours (the backend captures its own:
# option cuda_graphs), so they are refused rather than left to fail inside a capture
_REFUSED_INDUCTOR_OPTIONS = ("triton.cudagraphs", "triton.cudagraph_trees")


def _inductor_options(value: Any) -> dict[str, Any] | None:
    """Option ``inductor_options``: None, or a dict of known ``torch._inductor.config`` names to plain values."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValueError(f"toprovar: option 'inductor_options' must be a dict of torch._inductor.config names "
                         f"to values, got {type(value).__name__}")
    from torch._inductor import config as inductor_config

    known = inductor_config.get_config_copy()
    for key, val in value.items():
        if not isinstance(key, str) or key not in known:
            raise ValueError(f"toprovar: option 'inductor_options' has {key!r}, which is not a torch._inductor.config "
                             f"name (e.g. 'coordinate_descent_tuning', 'combo_kernels', 'triton.max_tiles')")
        if key in _REFUSED_INDUCTOR_OPTIONS:
            raise ValueError(f"toprovar: option 'inductor_options' sets {key!r}: the backend captures its own CUDA "
                             "graphs; use option 'cuda_graphs' instead")
        if not isinstance(val, (bool, int, float, str)):
            raise ValueError(f"toprovar: option 'inductor_options' sets {key!r} to {type(val).__name__}; only "
                             "bool, int, float and str values are taken")
    return dict(value)


def parse_options(options: Mapping[str, Any] | None) -> Settings:
    """Validate ``options`` and return ``Settings``; raise ``ValueError`` naming the bad key."""
    if options is None:
        return Settings()
    if not isinstance(options, Mapping):
        raise ValueError(f"toprovar: options must be a dict, got {type(options).__name__}")
    unknown = sorted(set(options) - set(_OPTION_DOCS))
    if unknown:
        valid = "; ".join(f"{k}: {v}" for k, v in _OPTION_DOCS.items())
        raise ValueError(f"toprovar: unknown option(s) {unknown}; valid options are {valid}")
    mode = options.get("mode")
    if mode is not None and mode not in VALID_MODES:
        raise ValueError(f"toprovar: option 'mode' must be one of {VALID_MODES}, got {mode!r}")
    if mode == "prune" and options.get("policy") is None:
        raise ValueError("toprovar: option mode='prune' needs option 'policy' (a name, YAML path or dict)")
    for key in ("inductor", "strict", "cuda_graphs", "planned_blocks", "cuda_graph_lend_outputs", "hoist_context"):
        val = options.get(key)
        if val is not None and not isinstance(val, bool):
            raise ValueError(f"toprovar: option {key!r} must be a bool, got {val!r}")
    limit = options.get("recompile_limit", 64)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 16:
        raise ValueError(f"toprovar: option 'recompile_limit' must be an int >= 16, got {limit!r}")
    max_mib = options.get("cuda_graph_max_mib", 64.0)
    if not isinstance(max_mib, (int, float)) or isinstance(max_mib, bool) or not max_mib > 0:
        raise ValueError(f"toprovar: option 'cuda_graph_max_mib' must be a number > 0, got {max_mib!r}")
    private_mib = _optional_mib(options, "cuda_graph_private_max_mib")
    min_free_mib = _optional_mib(options, "cuda_graph_min_free_mib")
    bucket = options.get("context_bucket")
    if bucket is not None and (not isinstance(bucket, int) or isinstance(bucket, bool) or bucket < 0):
        raise ValueError(f"toprovar: option 'context_bucket' must be an int >= 0 (tokens; 0 = off), got {bucket!r}")
    inductor_options = _inductor_options(options.get("inductor_options"))
    pool = options.get("cuda_graph_pool", "shared")
    if pool not in CUDA_GRAPH_POOLS:
        raise ValueError(f"toprovar: option 'cuda_graph_pool' must be one of {CUDA_GRAPH_POOLS}, got {pool!r}")
    policy = options.get("policy")
    from .policies import Policy

    if policy is not None and not isinstance(policy, (str, Mapping, Policy)) and not hasattr(policy, "__fspath__"):
        raise ValueError(
            f"toprovar: option 'policy' must be a policy name, a YAML path or a dict, got {type(policy).__name__}"
        )
    schedules = options.get("schedules")
    if schedules is not None and not isinstance(schedules, Mapping):
        raise ValueError("toprovar: option 'schedules' must be a dict name -> [[h, w], ...]")
    return Settings(
        policy=policy,
        preset=options.get("preset"),
        mode=mode,
        inductor=options.get("inductor"),
        cuda_graphs=options.get("cuda_graphs"),
        cuda_graph_max_mib=float(max_mib),
        cuda_graph_pool=pool,
        cuda_graph_lend_outputs=bool(options.get("cuda_graph_lend_outputs", True)),
        cuda_graph_private_max_mib=private_mib,
        cuda_graph_min_free_mib=min_free_mib,
        planned_blocks=bool(options.get("planned_blocks", True)),
        hoist_context=bool(options.get("hoist_context", True)),
        context_bucket=bucket,
        inductor_options=inductor_options,
        strict=bool(options.get("strict", False)),
        recompile_limit=limit,
        schedules=schedules,
    )
