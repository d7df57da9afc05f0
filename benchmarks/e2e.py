"""End-to-end batch-1 latency of the zoo's Infinity models, dense vs the toprovar backend (issue 8).

Variants (all built and compiled up front, then timed in interleaved rounds): dense eager, dense
Inductor (default and ``mode="reduce-overhead"``), toprovar observe (FAE only), toprovar with the
FastVAR policy, with the model's ToProVAR policy, and with the ToProVAR policy cut down to its
scale stage / scale+layer stages. Per variant: first-call (compile) time, median/min latency,
speedups from the same run, executed/dense FLOPs and the speedup they bound, recompiles during the
timed runs, peak memory and K/V-cache bytes at batch 1 and 8; per scale: wall time, and from one
profiled generation kernel launches and GPU-busy time; the issue's targets at the end.
``docs/benchmarks.md`` explains every column.

    PYTHONPATH=. python3 benchmarks/e2e.py --out out/e2e                        # H200, ~9 min
    PYTHONPATH=. python3 benchmarks/e2e.py --device cpu --models infinity-tiny \\
        --variants eager,observe,toprovar --out /tmp/e2e                        # CPU smoke

Everything is bounded by ``--budget-s``: work that does not fit is skipped and listed as such, and
the results are rewritten after every phase, so a run that is killed still leaves its numbers.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import datetime
import gc
import json
import logging
import math
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

import toprovar_fx
from toprovar_fx import zoo
from toprovar_fx.policies import list_policies, load_policy
from toprovar_fx.runtime.session import last_session
from toprovar_fx.tools.bench import environment

log = logging.getLogger("e2e")
T_START = time.perf_counter()  # the budget counts from here (after the imports, a few seconds)

PROMPT = "a red cat on a mat"
G_SEED = 7
CFG = 3.0

GEN_RANGE = "e2e.generation"  # profiler range around one generation
MARK_RANGE = "e2e.scale_end"  # profiler range at the end of every scale (ScaleMarks)
LAUNCH_EVENTS = frozenset({
    "cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
    "cudaLaunchCooperativeKernel", "cudaLaunchCooperativeKernelMultiDevice", "cudaGraphLaunch",
})
TOP_N = 8

# The targets.
TARGET_VS_EAGER = 4.0  # toprovar (model policy) vs dense eager
TARGET_VS_COMPILED = 2.0  # toprovar vs the best dense compiled baseline
TARGET_FLOP_FRACTION = 0.8  # measured speedup / FLOP-bound speedup at the last two scales
TARGET_OBSERVE = 1.05  # observe latency / the best compiled dense latency (Inductor, CUDA graphs)

# Budget planning before anything of a kind has been measured: first-call seconds per cost
# class (Inductor compiles every block graph once per scale; toprovar prune graphs run as FX).
COMPILE_PRIOR_S = {
    "cuda": {"eager": 5.0, "inductor": 150.0, "toprovar_inductor": 120.0, "toprovar_fx": 60.0},
    "cpu": {"eager": 1.0, "inductor": 120.0, "toprovar_inductor": 20.0, "toprovar_fx": 15.0},
}
# The run's first toprovar variant also compiles what later ones share (the FAE kernels, Inductor's
# cached block kernels): on the H200 (2026-11-29, Infinity-2B) it took 110 s and the four after it
# 27-31 s. Estimating those from the first made the Infinity-8B run skip two variants with 169 s
# unused; a compile that overruns is aborted at its deadline anyway.
LATER_TOPROVAR_FRACTION = 0.5
PROFILE_OVERHEAD_S = {"cuda": 6.0, "cpu": 1.0}  # trace export and parsing, per profiled generation
# A timed or profiled call that outlives the budget by this much is aborted (the numbers so far stay).
GRACE_S = 30.0


# ----------------------------------------------------------------------------------------------
# variants
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One way of running the sampler; ``build`` makes its own ``torch.compile`` call."""

    key: str
    label: str
    kind: str  # eager | inductor | toprovar
    definition: str
    compile_kwargs: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] | None = None  # toprovar options (copied: one session per dict)
    prunes: bool = False  # a pruning policy (its scales are checked against the dense launch counts)

    def cost_class(self, device: str) -> str:
        if self.kind != "toprovar":
            return self.kind
        if self.options.get("mode") == "observe" and self.options.get("inductor", device == "cuda"):
            return "toprovar_inductor"
        return "toprovar_fx"

    def build(self, model: torch.nn.Module) -> Callable[..., Any]:
        sampler = model.autoregressive_infer_cfg
        if self.kind == "eager":
            return sampler
        if self.kind == "inductor":
            return torch.compile(sampler, **self.compile_kwargs)
        return torch.compile(sampler, backend=toprovar_backend(), options=dict(self.options), **self.compile_kwargs)


def toprovar_backend() -> str | Callable[..., Any]:
    """``"toprovar"`` when the entry point is installed, else the same function (PYTHONPATH=. runs)."""
    if "toprovar" in torch._dynamo.list_backends(exclude_tags=()):
        return "toprovar"
    from toprovar_fx.backend import toprovar_backend as fn

    return fn


def stage_policy(base: str, stage: str) -> dict[str, Any]:
    """The model's ToProVAR policy cut down to some of its stages, as a policy dict.

    ``scale``: the scale stage alone, the paper's "Scale Depth Loc." (``scale.mode: skip_after_D``,
    docs/policies.md): dense up to the start scale D, every scale after D skipped; no layer
    classes (``layer.mode: off``) and no token pruning (every action ``keep``).
    ``scale_layer``: scale and layer stages, the paper's "Scale Depth Loc. + Layer Repr. Ident.":
    Global layers kept, Detail layers skipped whole at scales >= D (no token selection).
    The third step, scale+layer+token, is the policy itself (variant ``toprovar``).
    """
    if stage == "scale":
        what = "scale stage only (skip every scale after D)"
        overrides = {"scale": {"mode": "skip_after_D"},
                     "layer": {"mode": "off", "frozen": None, "actions": {"global": "keep", "detail": "keep"}}}
    elif stage == "scale_layer":
        what = "scale + layer stages (Detail layers skipped whole from D)"
        overrides = {"layer": {"actions": {"global": "keep", "detail": "skip"}}}
    else:
        raise ValueError(f"unknown stage {stage!r}")
    return load_policy(base).derive(f"{base}-e2e-{stage.replace('_', '-')}", overrides, f"{base}: {what}")


# torch.compile arguments of toprovar variants beside backend and options: SkipVAR's CFG shortcut
# runs the cond half alone, which needs graphs whose batch size is symbolic
TOPROVAR_COMPILE_KWARGS: dict[str, dict[str, Any]] = {"skipvar": {"dynamic": True}}


def model_variants(model_name: str) -> list[Variant]:
    """Every variant for one zoo model, in priority order (what is compiled first when time is short)."""
    fastvar = f"{model_name}-fastvar-released"

    def policy_or_missing(name: str) -> str:
        if name not in list_policies():
            raise ValueError(f"no shipped policy {name!r}")
        return name

    # Random weights carry no entropy signal (rho_s stays above tau, SVD classes are noise), so the
    # ToProVAR rows use the policy with its entropy-driven choices frozen when one is shipped.
    main = f"{model_name}-frozen" if f"{model_name}-frozen" in list_policies() else model_name

    def stage(name: str) -> Any:
        return stage_policy(policy_or_missing(main), name)

    def guard_filter() -> Callable[..., Any]:
        fn = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)
        if fn is None:
            raise ValueError(f"torch {torch.__version__} has no torch.compiler.skip_guard_on_all_nn_modules_unsafe")
        return fn

    specs: list[tuple[str, str, str, str, Callable[[], dict[str, Any]], bool]] = [
        # key, label, kind, definition, options/kwargs factory, prunes
        ("eager", "dense eager", "eager", "plain `m.autoregressive_infer_cfg`", dict, False),
        ("toprovar", f"toprovar {main} (scale+layer+token)", "toprovar",
         f"policy `{main}` (all three stages)",
         lambda: {"policy": policy_or_missing(main)}, True),
        ("inductor", "dense Inductor", "inductor", "`torch.compile(sampler)` (Inductor defaults)", dict, False),
        ("fastvar", "toprovar FastVAR", "toprovar", f"policy `{fastvar}`",
         lambda: {"policy": policy_or_missing(fastvar)}, True),
        ("toprovar_fastest", f"toprovar {main}, preset fastest", "toprovar",
         f"policy `{main}`, preset `fastest`: the last two scales skipped as FastVAR's released sampler does, "
         "the token stage at the scale before them (on var-ref fewer FLOPs than FastVAR and closer to dense: "
         "fidelity.md)",
         lambda: {"policy": policy_or_missing(main), "preset": "fastest"}, True),
        ("skipvar", "toprovar SkipVAR", "toprovar",
         f"policy `{model_name}-skipvar`, preset `fast` (the last two scales skipped, the scale before them "
         "conditional only), compiled with `dynamic=True` as its CFG shortcut needs",
         lambda: {"policy": policy_or_missing(f"{model_name}-skipvar"), "preset": "fast"}, True),
        ("toprovar_online", f"toprovar {model_name} (online decisions)", "toprovar",
         f"policy `{model_name}`: the start scale D from rho_s and the layer classes from one SVD per layer of "
         "the entropy map at the representative scale, every generation. On random weights its decisions are "
         "not the frozen policy's, so its `toprovar.*` host ranges are what it measures (the cost of deciding "
         "online), not its latency",
         lambda: {"policy": policy_or_missing(model_name)}, True),
        ("observe", "toprovar observe", "toprovar", "`mode: observe` (SDPA -> FAE, entropy recorded, no pruning)",
         lambda: {"mode": "observe"}, False),
        ("toprovar_noplan", f"toprovar {main}, no planned blocks", "toprovar",
         f"policy `{main}` with `planned_blocks: False` (pruned blocks through the dispatcher: what planned "
         "blocks contribute)", lambda: {"policy": policy_or_missing(main), "planned_blocks": False}, True),
        ("toprovar_nocg", f"toprovar {main}, no CUDA graphs", "toprovar",
         f"policy `{main}` with `cuda_graphs: False` (what the backend's own CUDA graphs contribute)",
         lambda: {"policy": policy_or_missing(main), "cuda_graphs": False}, True),
        ("toprovar_nolend", f"toprovar {main}, CUDA-graph outputs cloned", "toprovar",
         f"policy `{main}` with `cuda_graph_lend_outputs: False` (every CUDA-graph output cloned, every per-call "
         "input copied in: what lending contributes)",
         lambda: {"policy": policy_or_missing(main), "cuda_graph_lend_outputs": False}, True),
        ("toprovar_nohoist", f"toprovar {main}, text K/V at every scale", "toprovar",
         f"policy `{main}` with `hoist_context: False` (every block projects the text into its cross-attention "
         "K/V at every scale, as the model does: what computing it once per block and text contributes)",
         lambda: {"policy": policy_or_missing(main), "hoist_context": False}, True),
        ("toprovar_nobucket", f"toprovar {main}, text not padded to buckets", "toprovar",
         f"policy `{main}` with `context_bucket: 0` (the hoisted text context at its own length: every text "
         "length captures its own block graphs, with their memory; what the default buckets of 16 tokens "
         "contribute, seen with several `--prompt`s)",
         lambda: {"policy": policy_or_missing(main), "context_bucket": 0}, True),
        ("toprovar_guardfilter", f"toprovar {main}, fewer Dynamo guards", "toprovar",
         f"policy `{main}` with `guard_filter_fn=torch.compiler.skip_guard_on_all_nn_modules_unsafe` (Dynamo "
         "skips the guards on module state: less host time per block call; unsafe if module attributes change "
         "between calls, so not a default)",
         lambda: {"policy": policy_or_missing(main), "guard_filter_fn": guard_filter()}, True),
        ("toprovar_cdtune", f"toprovar {main}, Inductor coordinate-descent tuning", "toprovar",
         f"policy `{main}` with `inductor_options: {{coordinate_descent_tuning: true}}` (Inductor benchmarks "
         "block sizes of its fused kernels at compile time: their GPU time against a longer first call)",
         lambda: {"policy": policy_or_missing(main), "inductor_options": {"coordinate_descent_tuning": True}}, True),
        ("toprovar_combo", f"toprovar {main}, Inductor combo kernels", "toprovar",
         f"policy `{main}` with `inductor_options: {{combo_kernels: true}}` (Inductor fuses independent kernels "
         "side by side into one launch: fewer kernels per block)",
         lambda: {"policy": policy_or_missing(main), "inductor_options": {"combo_kernels": True}}, True),
        ("cudagraphs", "dense Inductor + CUDA graphs", "inductor",
         '`torch.compile(sampler, mode="reduce-overhead")`', lambda: {"mode": "reduce-overhead"}, False),
        ("scale", "toprovar stage: scale", "toprovar",
         f"`{main}` with `scale.mode: skip_after_D`, `layer.mode: off`, all actions `keep`",
         lambda: {"policy": stage("scale")}, True),
        ("scale_layer", "toprovar stage: scale+layer", "toprovar",
         f"`{main}` with `layer.actions.detail: skip` (no token stage)",
         lambda: {"policy": stage("scale_layer")}, True),
    ]
    out = []
    for key, label, kind, definition, make, prunes in specs:
        try:
            made = make()
        except ValueError as err:  # a missing policy: the variant is listed as failed, not dropped
            out.append(Variant(key, label, "missing", f"{definition}: {err}"))
            continue
        if kind == "toprovar":
            out.append(Variant(key, label, kind, definition, compile_kwargs=TOPROVAR_COMPILE_KWARGS.get(key, {}),
                               options=made, prunes=prunes))
        else:
            out.append(Variant(key, label, kind, definition, compile_kwargs=made, prunes=prunes))
    return out


def variant_by_key(model_name: str, key: str) -> Variant:
    """One of ``model_variants(model_name)``; an unknown key is an error that lists the known ones."""
    variants = model_variants(model_name)
    for v in variants:
        if v.key == key:
            return v
    raise ValueError(f"no variant {key!r} for {model_name}; known: {', '.join(v.key for v in variants)}")


# display order of the tables (the rotation order of the timed rounds too)
DISPLAY_ORDER = ("eager", "inductor", "cudagraphs", "observe", "fastvar", "skipvar", "toprovar_fastest", "scale",
                 "scale_layer", "toprovar_nocg", "toprovar_noplan", "toprovar_nolend", "toprovar_nohoist",
                 "toprovar_nobucket", "toprovar_guardfilter", "toprovar_cdtune", "toprovar_combo",
                 "toprovar_online", "toprovar")
VARIANT_KEYS = DISPLAY_ORDER


# ----------------------------------------------------------------------------------------------
# the model and its sampler call
# ----------------------------------------------------------------------------------------------


def build_model(name: str, device: str, dtype: torch.dtype) -> tuple[torch.nn.Module, float]:
    t0 = time.perf_counter()
    model = zoo.build(name, device=device, dtype=dtype)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the fp32 copy the zoo initialised
    return model, time.perf_counter() - t0


class SamplerCall:
    """``call(fn)`` runs one generation of ``batch`` images (CFG on: transformer batch ``2 * batch``).

    With several prompts, the k-th call of a given ``fn`` takes prompt k mod n: every variant makes
    the same calls in the same order (first call, warm-ups, logits, rounds, profile), so the
    variants of one run see the same prompt at the same call and their images stay comparable.
    Prompts of other text lengths make Dynamo recompile once with a symbolic length (what a user
    who changes prompts gets); the warm-ups cover every prompt, so the timed runs compile nothing.
    """

    def __init__(self, model: torch.nn.Module, batch: int, device: str, prompts: Sequence[str]) -> None:
        if not hasattr(model, "encode_prompts"):
            raise ValueError("e2e.py drives Infinity-family zoo models (text-conditional samplers) only")
        self.batch = batch
        self.conds = [tuple(c.to(device) if isinstance(c, torch.Tensor) else c for c in model.encode_prompts([p] * batch))
                      for p in prompts]
        self.calls: dict[int, int] = defaultdict(int)

    def __call__(self, fn: Callable[..., Any]) -> Any:
        k = self.calls[id(fn)]
        self.calls[id(fn)] = k + 1
        return fn(self.conds[k % len(self.conds)], B=self.batch, g_seed=G_SEED, cfg_list=CFG)


def sampler_call(model: torch.nn.Module, batch: int, device: str,
                 prompts: Sequence[str] = (PROMPT,)) -> SamplerCall:
    """``call(fn)`` runs one generation of ``batch`` images (the other benchmark scripts' entry)."""
    return SamplerCall(model, batch, device, prompts)


def _prompts_text(prompts: Sequence[str]) -> str:
    if len(prompts) == 1:
        return f"prompt \"{prompts[0]}\""
    return (f"{len(prompts)} prompts taken in turn (" + ", ".join(f"\"{p}\"" for p in prompts)
            + "; every variant's k-th call takes the same one)")


def kv_cache_bytes(model: torch.nn.Module) -> int:
    """Bytes held by every ``cached_k`` / ``cached_v`` of the model right now."""
    total = 0
    for mod in model.modules():
        for name in ("cached_k", "cached_v"):
            t = getattr(mod, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass
class Generation:
    wall_ms: float
    segments_ms: list[float] | None  # one per scale, then the decode tail; None if marks != scales
    marks: int
    # per mark (every scale end, then the sampler's return): how long before the GPU reached it the
    # host had queued it; ~0 where the GPU waited for the host. CUDA only, None if marks != scales
    lead_ms: list[float] | None = None
    kv_bytes: int | None = None
    output: Any = None  # what the sampler returned (the images)
    logits: list[torch.Tensor] = field(default_factory=list)  # per scale (CPU fp32), when captured


class ScaleMarks:
    """Measurement-only wrapper of ``model.get_logits``: a mark at the end of every scale.

    The zoo samplers call ``get_logits`` once per scale from the sampler frame (which Dynamo does
    not compile as a whole), so the wrapper runs under every variant. The mark itself is
    ``torch.compiler.disable``d: under a compiled variant Dynamo still compiles the head, breaks the
    graph at the mark, and resumes. A mark records a CUDA event (stream time), ``perf_counter``
    (host time), a profiler range ``e2e.scale_end`` while profiling and, when asked, the K/V-cache
    bytes at the last scale (the sampler clears its caches before returning). Installed for the
    whole benchmark so that no variant recompiles because of it; ``restore`` removes it.
    """

    def __init__(self, model: torch.nn.Module, num_scales: int, device: str) -> None:
        self.model = model
        self.num_scales = num_scales
        self.cuda = device == "cuda"
        self._mark = torch.compiler.disable(self._on_mark)
        self._host: list[float] = []
        self._events: list[Any] = []
        self._profiling = False
        self._capture_kv = False
        self._kv: int | None = None
        self._capture_logits = False
        self.logits: list[torch.Tensor] = []  # per scale, when asked (``begin(capture_logits=True)``)

    def install(self) -> None:
        original = self.model.get_logits
        mark = self._mark

        def get_logits(h: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
            out = original(h, cond_BD)
            mark(out)
            return out

        self.model.get_logits = get_logits

    def restore(self) -> None:
        self.model.__dict__.pop("get_logits", None)

    def _stamp(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._events.append(ev)
        self._host.append(time.perf_counter())

    def _on_mark(self, logits: torch.Tensor) -> None:
        self._stamp()
        if self._capture_logits:
            self.logits.append(logits.detach().float().cpu())
        if self._profiling:
            with torch.profiler.record_function(MARK_RANGE):
                pass
        if self._capture_kv and len(self._host) - 1 == self.num_scales:
            self._kv = kv_cache_bytes(self.model)

    def begin(self, *, profiling: bool = False, capture_kv: bool = False, capture_logits: bool = False) -> None:
        self._host, self._events, self._kv = [], [], None
        self._profiling, self._capture_kv, self._capture_logits = profiling, capture_kv, capture_logits
        self.logits = []
        self._stamp()

    def finish(self) -> None:
        """Right after the sampler returned (before synchronising): the end of the decode tail."""
        self._stamp()

    def end(self, wall_ms: float) -> Generation:
        """After ``finish`` and a synchronisation: the generation's per-scale segments."""
        host = [1e3 * (t - self._host[0]) for t in self._host]
        lead = None
        if self.cuda:
            self._events[-1].synchronize()
            # the first event is recorded on an idle, synchronised stream: both clocks start together
            stamps = [0.0] + [self._events[0].elapsed_time(e) for e in self._events[1:]]
            lead = [g - h for g, h in zip(stamps[1:], host[1:])]
        else:
            stamps = host
        marks = len(stamps) - 2
        whole = marks == self.num_scales
        segments = [b - a for a, b in zip(stamps, stamps[1:])] if whole else None
        self._profiling = self._capture_kv = self._capture_logits = False
        return Generation(wall_ms=wall_ms, segments_ms=segments, marks=marks, kv_bytes=self._kv,
                          logits=self.logits, lead_ms=lead if whole else None)


def run_generation(fn: Callable[..., Any], call: Callable[[Callable[..., Any]], Any], marks: ScaleMarks,
                   device: str, *, profiling: bool = False, capture_kv: bool = False,
                   capture_logits: bool = False) -> Generation:
    """One synchronised generation: wall time from ``perf_counter``, per-scale times from the marks."""
    torch.compiler.cudagraph_mark_step_begin()  # a new CUDA-graph step (a no-op for other variants)
    sync(device)
    marks.begin(profiling=profiling, capture_kv=capture_kv, capture_logits=capture_logits)
    t0 = time.perf_counter()
    out = call(fn)
    marks.finish()
    sync(device)
    g = marks.end(1e3 * (time.perf_counter() - t0))
    g.output = out
    return g


def dynamo_frames() -> int:
    """Frames Dynamo has tried to compile so far (any compile during timed runs is a recompile)."""
    return int(torch._dynamo.utils.counters["frames"]["total"])


# ----------------------------------------------------------------------------------------------
# time budget
# ----------------------------------------------------------------------------------------------


class DeadlineExceeded(BaseException):
    """Raised by the alarm inside whatever call overran (BaseException: compiler code catches Exception)."""


@contextlib.contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """Abort the block with ``DeadlineExceeded`` after ``seconds`` (main thread, POSIX; else no limit)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def fire(signum: int, frame: Any) -> None:
        raise DeadlineExceeded(f"{what} ran past the time budget ({seconds:.0f} s allowed)")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Budget:
    end: float  # perf_counter time

    def left(self) -> float:
        return self.end - time.perf_counter()

    def share(self, parts: int) -> Budget:
        """A budget ending after ``1 / parts`` of what is left (one of several models)."""
        return Budget(time.perf_counter() + self.left() / max(parts, 1))


# ----------------------------------------------------------------------------------------------
# per-variant state
# ----------------------------------------------------------------------------------------------


@dataclass
class VariantRun:
    variant: Variant
    status: str = "pending"  # pending | ok | failed | skipped
    error: str | None = None  # one line
    skipped: list[str] = field(default_factory=list)  # parts not measured, and why
    first_call_ms: float | None = None
    warmup_ms: list[float] = field(default_factory=list)
    # warm-up calls added until a prompt cycle captured no CUDA graph (``settle``), in order
    settle_ms: list[float] = field(default_factory=list)
    times_ms: list[float] = field(default_factory=list)
    segments_ms: list[list[float]] = field(default_factory=list)  # per timed run
    lead_ms: list[list[float]] = field(default_factory=list)  # per timed run (``Generation.lead_ms``)
    mark_counts: list[int] = field(default_factory=list)
    dynamo_frames_timed: int = 0
    toprovar_compiles_timed: int = 0
    # per timed generation: (CUDA-graph replays, calls that had a graph but ran without it)
    graph_calls_timed: list[tuple[int, int]] = field(default_factory=list)
    busy_graphs: dict[str, int] = field(default_factory=dict)  # graphs that ran without replay, session totals
    # calls whose CUDA-graph capture was refused for the free-memory floor (option
    # cuda_graph_min_free_mib), session total after the timed rounds: they ran without a graph
    refused_captures: int = 0
    # times the session dropped every CUDA graph after the GPU ran out of memory inside one of its
    # calls (``SharedPool.relieve``), session total after the timed rounds
    reliefs: int = 0
    peak_bytes_b1: int | None = None
    # what the caching allocator still holds for the variant after its warm-up and an
    # ``empty_cache`` (CUDA-graph pools included, whose freed intermediates the allocated peak
    # does not count; the allocator's cache of free blocks excluded)
    reserved_bytes_b1: int | None = None
    # of those, what the variant's CUDA-graph memory pools hold (``graph_pool_bytes``); and what
    # the --batch-mem call added to them
    pool_bytes_b1: int | None = None
    pool_bytes_b8: int | None = None
    image: torch.Tensor | None = None  # the last warm-up generation's images (CPU, fp32)
    logits: list[torch.Tensor] = field(default_factory=list)  # per scale, one extra generation after warm-up
    kv_bytes_b1: int | None = None
    peak_bytes_b8: int | None = None
    kv_bytes_b8: int | None = None
    b8_note: str | None = None
    report: dict[str, Any] | None = None
    profile: dict[str, Any] | None = None
    fn: Callable[..., Any] | None = None

    @property
    def key(self) -> str:
        return self.variant.key

    @property
    def live(self) -> bool:
        return self.status == "ok" and self.fn is not None

    def fail(self, stage: str, err: BaseException) -> None:
        self.error = f"{stage}: {one_line(err)}"
        self.status = "failed"
        self.fn = None
        log.warning("%s failed (%s)", self.key, self.error)

    def skip(self, what: str) -> None:
        self.skipped.append(what)
        if self.status == "pending":
            self.status = "skipped"
        log.info("%s: skipped %s", self.key, what)

    def warm_s(self) -> float:
        """Expected seconds of one batch-1 generation: the median of the timed ones, else the
        fastest warm-up. Not the warm-ups' median: a warm-up may still record or capture graphs
        (Inductor's CUDA graphs: 20 s for the first, 0.37 s after; toprovar captures again when
        lending starts), and such an estimate reserved 7x that for the measurements, pushing
        variants that would have fit out of the budget."""
        if self.times_ms:
            return statistics.median(self.times_ms) / 1e3
        ms = self.warmup_ms or ([self.first_call_ms] if self.first_call_ms else [])
        return min(ms) / 1e3 if ms else 0.0

    def median_ms(self) -> float | None:
        return statistics.median(self.times_ms) if self.times_ms else None

    def segment_medians(self) -> list[float] | None:
        return _column_medians(self.segments_ms)

    def lead_medians(self) -> list[float] | None:
        return _column_medians(self.lead_ms)

    def to_dict(self) -> dict[str, Any]:
        # not asdict(self): it would deep-copy ``fn`` (a bound method of the model)
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("fn", "variant", "image", "logits")}
        d.update(key=self.key, label=self.variant.label, kind=self.variant.kind,
                 definition=self.variant.definition, options=_jsonable(self.variant.options),
                 compile_kwargs=dict(self.variant.compile_kwargs), median_ms=self.median_ms(),
                 min_ms=min(self.times_ms) if self.times_ms else None,
                 segment_medians_ms=self.segment_medians(), lead_medians_ms=self.lead_medians())
        return d


def one_line(err: BaseException, limit: int = 240) -> str:
    """``Type: first line`` of an error and of its root cause (Dynamo wraps backend errors)."""

    def first(e: BaseException) -> str:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__

    root = err
    for _ in range(8):
        inner = getattr(root, "inner_exception", None) or root.__cause__
        if not isinstance(inner, BaseException) or inner is root:
            break
        root = inner
    text = first(err) if root is err else f"{type(err).__name__} <- {first(root)}"
    return text[:limit]


def _finite(obj: Any) -> Any:
    """JSON has no infinity: a speedup over a skipped scale is written as the string "inf"."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str)) if value is not None else None


def report_summary(rep: Any) -> dict[str, Any]:
    """What the toprovar report says about one generation (``toprovar_fx/runtime/report.py``)."""
    return {
        "mode": rep.mode,
        "policy": rep.policy,
        "attention_rewrites": rep.attention_rewrites,
        "start_scale": rep.start_scale,
        "flops_dense": rep.flops_dense,
        "flops_executed": rep.flops_executed,
        "flop_ratio": rep.flop_ratio,
        "scales": [{
            "index": s.index, "h": s.h, "w": s.w, "tokens": s.tokens, "rho": s.rho,
            "pruning_active": s.pruning_active, "skipped": s.skipped,
            "flops_dense": s.flops_dense, "flops_executed": s.flops_executed,
            "layers_not_kept": sum(1 for lr in s.layers if lr.action != "keep"),
        } for s in rep.scales],
        "compiles": rep.compiles,
        "compile_seconds": rep.compile_seconds,
        "planned_blocks": rep.planned_blocks,
        "graph_replays": rep.graph_replays,
        "graph_calls_without_replay": rep.graph_calls_without_replay,
        "fallbacks": list(dict.fromkeys(rep.fallbacks)),
    }


# ----------------------------------------------------------------------------------------------
# phases
# ----------------------------------------------------------------------------------------------


@dataclass
class Bench:
    """Everything one model's measurement needs."""

    name: str
    model: torch.nn.Module
    device: str
    schedule: list[tuple[int, int]]
    marks: ScaleMarks
    call_b1: Callable[[Callable[..., Any]], Any]
    runs: list[VariantRun]
    budget: Budget
    args: argparse.Namespace
    estimates: dict[str, float] = field(default_factory=dict)  # first-call seconds per cost class
    # CUDA bytes allocated once the model and its prompt are on the device: the peaks reported are
    # this plus what a variant allocated beyond what was allocated before its first call, so that
    # CUDA-graph pools or caches of variants compiled earlier in the same process are not counted
    base_bytes: int = 0
    rounds_done: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def gen(self, run: VariantRun, **kw: Any) -> Generation:
        return run_generation(run.fn, self.call_b1, self.marks, self.device, **kw)

    def compile_estimate(self, run: VariantRun) -> float:
        """First-call seconds: measured for this cost class, else dense Inductor's for observe, else the prior;
        a toprovar variant after the run's first one gets ``LATER_TOPROVAR_FRACTION`` of that one's."""
        cls = run.variant.cost_class(self.device)
        first_toprovar = next((r.first_call_ms for r in self.runs
                               if r.variant.kind == "toprovar" and r.first_call_ms is not None), None)
        if run.variant.kind == "toprovar" and first_toprovar is not None:
            return LATER_TOPROVAR_FRACTION * 1.1 * first_toprovar / 1e3
        if cls in self.estimates:
            return self.estimates[cls]
        if cls == "toprovar_inductor" and "inductor" in self.estimates:
            return self.estimates["inductor"]
        return COMPILE_PRIOR_S[self.device][cls]

    def measurement_reserve(self, runs: Sequence[VariantRun], extra_gen_s: float = 0.0) -> float:
        """Seconds the timed rounds (the minimum of 5) and the profiles of ``runs`` will need."""
        gens = sum(r.warm_s() for r in runs) + extra_gen_s
        profiles = len(runs) * PROFILE_OVERHEAD_S[self.device] if self.args.profile else 0.0
        return min(5, self.args.rounds) * gens + 2 * gens + profiles


# a variant about to be compiled needs this many times the largest batch-1 peak of those before it
MEMORY_MARGIN = 1.25


def memory_shortfall(peaks: Sequence[int], free: int) -> str | None:
    """Why the next variant should not be compiled in this process: ``peaks`` are the batch-1
    peaks (bytes beyond the weights and prompt) of the variants compiled so far, ``free`` the
    device's free bytes now. Every compiled variant stays alive for the interleaved rounds, with
    its CUDA graphs; once one more does not fit, the next generation of every variant runs out of
    memory too (Infinity-8B with six variants, ``benchmarks/results/e2e-8b-oom-six-variants.md``).
    None: go ahead (also before the first variant, whose need is unknown)."""
    if not peaks:
        return None
    need = MEMORY_MARGIN * max(peaks)
    if free >= need:
        return None
    return (f"memory: about {need / 2**30:.1f} GiB needed ({MEMORY_MARGIN:g} x the largest batch-1 peak so far), "
            f"{free / 2**30:.1f} GiB free with the variants before it alive; measure it in a separate call "
            "(--variants)")


def batch_shortfall(peak_b1: int, batch: int, free: int, alive: int) -> str | None:
    """Why a variant should not be called at ``batch`` images in this process: ``peak_b1`` is its
    batch-1 peak beyond the weights and prompt, ``free`` the device's free bytes now, ``alive``
    how many variants (with their CUDA graphs) share the process. The estimate scales the
    batch-1 peak linearly (activations and K/V cache do; on the zoo's Infinity-2B it gave 48.7
    GiB for eager's measured 48.0). Calling anyway runs every later variant out of memory too,
    and a compiled variant's graphs drop to their fallbacks on the way. None: go ahead."""
    need = peak_b1 * batch
    if free >= need:
        return None
    return (f"memory: about {need / 2**30:.0f} GiB estimated ({batch} x the batch-1 peak beyond the weights), "
            f"{free / 2**30:.0f} GiB free with {alive} variants alive")


def compile_phase(b: Bench) -> None:
    """Build every variant; first call (= compile), warm-up calls, batch-1 memory and the report."""
    for run in b.runs:
        if run.variant.kind == "missing":
            run.status, run.error = "failed", run.variant.definition
            continue
        if run.key == "cudagraphs" and not b.cuda:
            run.skip("CUDA graphs need a CUDA device")
            continue
        done = [r for r in b.runs if r.live]
        guess_gen = max((r.warm_s() for r in done), default=0.0)
        need = b.compile_estimate(run) + (1 + b.args.warmup) * guess_gen
        reserve = b.measurement_reserve(done, extra_gen_s=guess_gen)
        if b.budget.left() < need + reserve:
            run.skip(f"everything: time budget (about {need:.0f} s to compile and warm up, "
                     f"{b.budget.left() - reserve:.0f} s left after reserving the measurements)")
            continue
        if b.cuda:
            torch.cuda.empty_cache()  # free memory as it is; and cached blocks of earlier variants would back this one's
            short = memory_shortfall([r.peak_bytes_b1 - b.base_bytes for r in b.runs if r.peak_bytes_b1 is not None],
                                     torch.cuda.mem_get_info()[0])
            if short is not None:
                run.skip(f"everything: {short}")
                continue
        allowed = b.budget.left() - b.measurement_reserve(done)
        log.info("%s: compiling (estimate %.0f s, allowed %.0f s)", run.key, need, allowed)
        try:
            with deadline(allowed, f"{run.key} compile and warm-up"):
                compile_and_warm(b, run)
        except DeadlineExceeded as err:
            run.fail("compile", err)
            b.notes.append(f"{run.key}: compile aborted at the time budget; Dynamo may hold partial state")
        except Exception as err:  # noqa: BLE001 - a failing variant is reported, the run goes on
            run.fail("compile/warm-up", err)
        if run.first_call_ms is not None:
            cls = run.variant.cost_class(b.device)
            b.estimates[cls] = max(b.estimates.get(cls, 0.0), 1.1 * run.first_call_ms / 1e3)


def graph_pool_bytes() -> int | None:
    """Bytes the caching allocator holds in memory pools other than the default one: the pools of
    CUDA graphs (toprovar's shared and own pools, Inductor's). Their static outputs and kept
    intermediates live there; lent outputs in homes do not. None where the allocator cannot say
    (no CUDA, or a torch without ``memory_snapshot``)."""
    if not torch.cuda.is_available():
        return None
    try:
        segments = torch.cuda.memory_snapshot()
    except Exception:  # noqa: BLE001 - a measurement, never worth failing the run for
        return None
    return sum(int(seg.get("total_size", 0)) for seg in segments if in_graph_pool(seg))


def in_graph_pool(segment: dict[str, Any]) -> bool:
    """Whether a ``torch.cuda.memory_snapshot()`` segment lies in a pool other than the default one."""
    return tuple(segment.get("segment_pool_id") or (0, 0)) != (0, 0)


def allocated_breakdown(segments: list[dict[str, Any]], top: int = 5) -> str:
    """What is allocated, from ``torch.cuda.memory_snapshot()`` segments: GiB in the default pool and
    in other pools (CUDA graphs'), and the most frequent allocated block sizes in each; for a
    failed call, what outlived it (its own tensors are gone by then)."""
    totals: dict[bool, int] = {False: 0, True: 0}
    sizes: dict[bool, Counter[int]] = {False: Counter(), True: Counter()}
    for seg in segments:
        pooled = in_graph_pool(seg)
        for blk in seg.get("blocks", []):
            if blk.get("state") == "active_allocated":
                totals[pooled] += int(blk["size"])
                sizes[pooled][int(blk["size"])] += 1

    def common(pooled: bool) -> str:
        return ", ".join(f"{n} x {size / 2**20:.0f} MiB" for size, n in sizes[pooled].most_common(top))

    return (f"allocated {totals[False] / 2**30:.1f} GiB in the default pool ({common(False) or 'none'}) and "
            f"{totals[True] / 2**30:.1f} GiB in graph pools ({common(True) or 'none'})")


def _memory_after_failure() -> str:
    """``allocated_breakdown`` of the device now and the peak since the last reset ('' without CUDA)."""
    if not torch.cuda.is_available():
        return ""
    try:
        segments = torch.cuda.memory_snapshot()
    except Exception:  # noqa: BLE001 - a diagnosis, never worth failing the run for
        return ""
    return (f"after the failure {allocated_breakdown(segments)}; peak before it "
            f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


def _delta(after: int | None, before: int | None) -> int | None:
    return None if after is None or before is None else after - before


def _own_peak(b: Bench, before: int) -> int:
    """The peak since the last reset, as if this variant were the only one in the process."""
    return torch.cuda.max_memory_allocated() - before + b.base_bytes


# prompt cycles ``settle`` may add to a variant's warm-up
SETTLE_MAX_CYCLES = 4


def graph_activity() -> tuple[int, int] | None:
    """(CUDA graphs captured, graph calls run without replay) so far by the toprovar session last
    called; None without one or with graphs in pools of their own."""
    session = last_session()
    pool = session.graph_pool() if session is not None else None
    return None if pool is None else (pool.captures, pool.busy)


def settle(b: Bench, run: VariantRun, activity: list[tuple[int, int] | None]) -> None:
    """Warm ``run`` up further, a prompt cycle at a time, until its last ``n`` calls (``n``
    prompts) captured no CUDA graph and ran every graph call with a replay; ``activity`` holds
    ``graph_activity()`` after each call so far. Whole cycles keep every variant's k-th call on
    the same prompt.

    Why: toprovar captures its graphs again when it starts lending outputs (after the first
    generation that compiled nothing), and graphs per text length when a length is new to them,
    seconds per generation that captures. With several prompts of other lengths, the warm-up
    count alone left them in the timed rounds (2B on the H200, 2026-11-30: 2.5 s in two rounds)."""
    if run.variant.kind != "toprovar" or activity[-1] is None or activity[-1][0] == 0:
        return  # no CUDA graphs (CPU, or the option off)
    n = len(b.args.prompt)
    for _ in range(SETTLE_MAX_CYCLES):
        if len(activity) > n and activity[-1] == activity[-1 - n]:
            return
        for _ in range(n):
            run.settle_ms.append(b.gen(run).wall_ms)
            activity.append(graph_activity())
    if activity[-1] != activity[-1 - n]:
        b.notes.append(f"{run.key}: CUDA graphs still captured after {SETTLE_MAX_CYCLES} more warm-up cycles "
                       f"of the {n} prompt(s); the timed rounds may include captures")


def compile_and_warm(b: Bench, run: VariantRun) -> None:
    """Precondition on CUDA: the allocator's cache was just emptied (``compile_phase``), so the
    reserved memory measured from here is this variant's."""
    before = torch.cuda.memory_allocated() if b.cuda else 0
    before_reserved = torch.cuda.memory_reserved() if b.cuda else 0
    pools_before = graph_pool_bytes() if b.cuda else None
    run.fn = run.variant.build(b.model)
    first = b.gen(run)
    run.first_call_ms = first.wall_ms
    run.status = "ok"
    activity = [graph_activity()]
    for i in range(b.args.warmup):
        last = i == b.args.warmup - 1
        if last:
            settle(b, run, activity)
        if last and b.cuda:
            torch.cuda.reset_peak_memory_stats()
        g = b.gen(run, capture_kv=last)
        run.warmup_ms.append(g.wall_ms)
        activity.append(graph_activity())
        if last:
            run.kv_bytes_b1 = g.kv_bytes
            if b.cuda:
                run.peak_bytes_b1 = _own_peak(b, before)
                torch.cuda.empty_cache()  # what stays reserved: persistent tensors and CUDA-graph pools
                run.reserved_bytes_b1 = torch.cuda.memory_reserved() - before_reserved + b.base_bytes
                run.pool_bytes_b1 = _delta(graph_pool_bytes(), pools_before)
            out = g.output[0] if isinstance(g.output, (tuple, list)) else g.output
            run.image = out.detach().float().cpu() if isinstance(out, torch.Tensor) else None
        if g.segments_ms is None:
            b.notes.append(f"{run.key}: {g.marks} scale marks in a generation, expected {len(b.schedule)}")
    if run.variant.kind == "toprovar":
        rep = toprovar_fx.last_generation()
        run.report = report_summary(rep) if rep is not None else None
    # same seed (and, with one prompt, the same generation as the last warm-up): logits kept
    run.logits = b.gen(run, capture_logits=True).logits


def timed_phase(b: Bench) -> None:
    """Interleaved rounds: every live variant once per round, the order rotated by one each round."""
    gc.collect()
    order = sorted((r for r in b.runs if r.live), key=lambda r: DISPLAY_ORDER.index(r.key)
                   if r.key in DISPLAY_ORDER else len(DISPLAY_ORDER))
    for rnd in range(b.args.rounds):
        order = [r for r in order if r.live]
        if not order:
            break
        cost = sum(r.warm_s() for r in order)
        profile_reserve = 2 * cost + len(order) * PROFILE_OVERHEAD_S[b.device] if b.args.profile else 0.0
        if b.budget.left() < cost + profile_reserve:
            b.notes.append(f"timed rounds stopped after {rnd} of {b.args.rounds}: time budget")
            break
        shift = rnd % len(order)
        for run in order[shift:] + order[:shift]:
            before = dynamo_frames()
            try:
                with deadline(max(b.budget.left(), 0.0) + GRACE_S, f"{run.key} timed run"):
                    g = b.gen(run)
            except (Exception, DeadlineExceeded) as err:  # noqa: BLE001
                run.fail(f"timed run {rnd + 1}", err)
                continue
            run.dynamo_frames_timed += dynamo_frames() - before
            run.times_ms.append(g.wall_ms)
            run.mark_counts.append(g.marks)
            if g.segments_ms is not None:
                run.segments_ms.append(g.segments_ms)
            if g.lead_ms is not None:
                run.lead_ms.append(g.lead_ms)
            if run.variant.kind == "toprovar":
                rep = toprovar_fx.last_generation()
                run.toprovar_compiles_timed += rep.compiles if rep is not None else 0
                if rep is not None and rep.graph_replays is not None:
                    run.graph_calls_timed.append((rep.graph_replays, rep.graph_calls_without_replay or 0))
                    pool = last_session().graph_pool()
                    if rep.graph_calls_without_replay and pool is not None:
                        run.busy_graphs = dict(sorted(pool.busy_by.items(), key=lambda kv: -kv[1])[:8])
                    if pool is not None:
                        run.refused_captures, run.reliefs = pool.refused, pool.reliefs
        b.rounds_done = rnd + 1
    if 0 < b.rounds_done < 5:
        b.notes.append(f"only {b.rounds_done} timed generation(s) per variant (target: at least 5)")


def profile_phase(b: Bench) -> None:
    """One profiled generation per live variant: launches, GPU-busy time, top kernels and host ops."""
    if not b.args.profile:
        for run in b.runs:
            if run.live:
                run.skip("profile: --no-profile")
        return
    for run in sorted((r for r in b.runs if r.live), key=lambda r: b.runs.index(r)):
        need = 3 * run.warm_s() + PROFILE_OVERHEAD_S[b.device]
        if b.budget.left() < need:
            run.skip(f"profile: time budget (about {need:.0f} s needed, {b.budget.left():.0f} s left)")
            continue
        try:
            with deadline(max(b.budget.left(), 0.0) + GRACE_S, f"{run.key} profile"):
                run.profile = profile_generation(b, run)
        except (Exception, DeadlineExceeded) as err:  # noqa: BLE001
            run.skip(f"profile: {one_line(err)}")


def profile_generation(b: Bench, run: VariantRun) -> dict[str, Any]:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if b.cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with tempfile.TemporaryDirectory() as tmp:
        with torch.profiler.profile(activities=activities) as prof, torch.profiler.record_function(GEN_RANGE):
            b.gen(run, profiling=True)
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f).get("traceEvents", [])
    return summarize_trace(events, len(b.schedule), gpu=b.cuda)


def batch_memory_phase(b: Bench) -> None:
    """Peak memory and K/V bytes at ``--batch-mem`` images (compiled variants recompile for it)."""
    batch = b.args.batch_mem
    if batch <= 0 or not b.cuda:
        reason = "not requested" if batch <= 0 else "no CUDA memory statistics on CPU"
        for run in b.runs:
            if run.live:
                run.b8_note = f"skipped: {reason}"
        return
    try:
        call = sampler_call(b.model, batch, b.device, b.args.prompt)
    except Exception as err:  # noqa: BLE001
        b.notes.append(f"batch {batch}: {type(err).__name__}: {err}")
        return
    for run in b.runs:  # priority order
        if not run.live:
            continue
        gen_s = run.warm_s() * batch
        compile_s = 0.0 if run.variant.kind == "eager" else (run.first_call_ms or 0.0) / 1e3
        if b.budget.left() < compile_s + gen_s:
            run.b8_note = f"skipped: time budget (about {compile_s + gen_s:.0f} s needed, {b.budget.left():.0f} s left)"
            run.skipped.append(f"memory at batch {batch}: time budget")
            continue
        separate_first = compile_s > 0 and b.budget.left() >= compile_s + 2 * gen_s
        torch.cuda.empty_cache()  # the blocks cached for the previous variant cannot back CUDA-graph pools
        if run.peak_bytes_b1 is not None and not b.args.batch_mem_force:
            short = batch_shortfall(run.peak_bytes_b1 - b.base_bytes, batch, torch.cuda.mem_get_info()[0],
                                    alive=sum(r.live for r in b.runs))
            if short is not None:
                run.b8_note = f"skipped: {short}; measure it with --variants eager,{run.key}"
                run.skipped.append(f"memory at batch {batch}: memory")
                continue
        before = torch.cuda.memory_allocated()
        pools_before = graph_pool_bytes()
        reliefs_before = _reliefs()
        try:
            with deadline(max(b.budget.left(), 5.0), f"{run.key} batch {batch}"):
                if separate_first:
                    run_generation(run.fn, call, b.marks, b.device)
                torch.cuda.reset_peak_memory_stats()
                g = run_generation(run.fn, call, b.marks, b.device, capture_kv=True)
        except (Exception, DeadlineExceeded) as err:  # noqa: BLE001
            run.b8_note = f"failed: {one_line(err)}"
            if isinstance(err, torch.OutOfMemoryError):
                run.b8_note += f" ({_memory_after_failure()})"
            continue
        run.peak_bytes_b8 = _own_peak(b, before)
        run.kv_bytes_b8 = g.kv_bytes
        run.pool_bytes_b8 = _delta(graph_pool_bytes(), pools_before)
        if compile_s > 0 and not separate_first:
            run.b8_note = "measured on the call that compiled for this batch"
        if run.variant.kind == "toprovar" and _reliefs() > reliefs_before:
            run.b8_note = "; ".join(filter(None, [run.b8_note, f"the GPU ran out of memory {_reliefs() - reliefs_before} "
                                                  "time(s) inside the backend, which dropped its CUDA graphs and went on",
                                                  batch1_after_relief(b, run)]))


def batch1_after_relief(b: Bench, run: VariantRun) -> str:
    """Batch-1 latency after a relief at the larger batch: the relief dropped every graph, batch-1
    ones included, and raised the free-memory floor, so batch 1 captures again within it and may
    keep fewer graphs than before. Warm-up as in the timed phase (``settle``), then up to
    ``--rounds`` timed calls (the budget permitting); returns the note's sentence."""
    if not run.times_ms:
        return ""
    pool = last_session().graph_pool()
    settled = len(run.settle_ms)  # settle() appends there: those are the first warm-up's, not these
    try:
        activity = [graph_activity()]
        with deadline(max(b.budget.left(), 5.0), f"{run.key} batch 1 after the relief"):
            for _ in range(2):
                b.gen(run)
                activity.append(graph_activity())
            settle(b, run, activity)
            times, replayed, refused = [], 0, 0
            while len(times) < b.args.rounds and b.budget.left() > 2 * run.warm_s():
                refused_before = pool.refused
                times.append(b.gen(run).wall_ms)
                rep = toprovar_fx.last_generation()
                replayed, refused = rep.graph_replays or 0, pool.refused - refused_before
    except (Exception, DeadlineExceeded) as err:  # noqa: BLE001
        return f"batch 1 afterwards failed: {one_line(err)}"
    finally:
        del run.settle_ms[settled:]
    if not times:
        return "batch 1 afterwards: not timed (time budget)"
    return (f"batch 1 afterwards: median {statistics.median(times):.1f} ms over {len(times)} call(s), against "
            f"{run.median_ms():.1f} ms before; per generation {replayed} graph replays and {refused} calls refused a "
            f"capture by the free-memory floor ({pool.floor() / 2**20:.0f} MiB; after the relief, "
            f"{pool.floors_text()})")


def _reliefs() -> int:
    """``SharedPool.reliefs`` of the last toprovar session (0 without one)."""
    session = last_session()
    pool = session.graph_pool() if session is not None else None
    return pool.reliefs if pool is not None else 0


# ----------------------------------------------------------------------------------------------
# profiler trace
# ----------------------------------------------------------------------------------------------


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -math.inf
    for a, z in sorted(intervals):
        if z <= end:
            continue
        total += z - max(a, end)
        end = z
    return total / 1e3


def _self_times(ops: list[dict[str, Any]]) -> dict[str, list[float]]:
    """name -> [self us, calls] of host ops, their nested ops' time subtracted (per thread)."""
    by_thread: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for e in ops:
        by_thread[(e.get("pid"), e.get("tid"))].append(e)
    out: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for evs in by_thread.values():
        evs.sort(key=lambda e: (e["ts"], -e.get("dur", 0)))
        stack: list[list[Any]] = []  # [end, name, dur, children]

        def close(entry: list[Any]) -> None:
            out[entry[1]][0] += max(entry[2] - entry[3], 0.0)
            out[entry[1]][1] += 1

        for e in evs:
            dur = float(e.get("dur", 0))
            while stack and stack[-1][0] <= e["ts"]:
                close(stack.pop())
            if stack:
                stack[-1][3] += dur
            stack.append([e["ts"] + dur, e["name"], dur, 0.0])
        while stack:
            close(stack.pop())
    return out


# kernel classes, in the order ``kernel_class`` tries them (and the markdown shows them)
KERNEL_CLASSES = ("attention", "gather/scatter", "copy", "gemm", "triton fused", "other")
# the classes a dense compiled model barely launches at the last two scales: what pruning adds
ADDED_CLASSES = ("gather/scatter", "copy", "other")
_CLASS_PATTERNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("fae_", "sdpa", "flash", "fmha", "attention")),
    ("gather/scatter", ("scatter_gather", "index_select", "indexSelect", "index_put", "index_elementwise_kernel",
                        "gather", "scatter")),
    ("copy", ("direct_copy_kernel", "copy_kernel", "CatArrayBatchedCopy", "Memcpy", "memcpy", "Memset", "memset")),
    ("gemm", ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas", "Kernel2", "splitK")),
)


def kernel_class(name: str) -> str:
    """The class of a GPU kernel by its name: one of ``KERNEL_CLASSES``.

    The classes say what limits the pruned last scales, where the pruned model reaches only part of
    its FLOP-bound speedup: attention (our Triton FAE kernels ``_fae_fwd*``, cuDNN / flash SDPA),
    GEMMs (cuBLAS / nvjet / CUTLASS), or the gathers / scatters and copies that pruning adds (token
    selection, K/V write-back, ``cat``), against Inductor's fused pointwise / reduction kernels
    (``triton_*``) and the rest. Patterns are case-sensitive substrings, tried in the order of
    ``KERNEL_CLASSES`` (attention first: SDPA kernels may name ``cutlass`` or ``gather``). Any name
    with ``copy`` is a copy, except Inductor's ``triton_*`` kernels, whose names list the fused aten
    ops and so often ``_to_copy`` (a dtype cast fused with arithmetic).
    """
    for cls, patterns in _CLASS_PATTERNS:
        if any(p in name for p in patterns):
            return cls
        if cls == "copy" and "copy" in name and not name.startswith("triton_"):
            return cls
    return "triton fused" if name.startswith("triton_") else "other"


def _tally(table: dict[str, list[float]], name: str, dur: float) -> None:
    """One more kernel of ``name``: its duration added, its count raised."""
    table[name][0] += dur
    table[name][1] += 1


def summarize_trace(events: list[dict[str, Any]], num_scales: int, *, gpu: bool) -> dict[str, Any]:
    """Per-scale launches and GPU-busy ms, top kernels / host ops, ``toprovar.*`` ranges of one generation.

    Scale ``i`` is the time between the end marks of scales ``i - 1`` and ``i`` (scale 0 from the
    start of the generation); the segment after the last mark is the decode tail. A launch
    belongs to the segment its runtime call falls in; a kernel to the segment of its launch.
    ``class_ms`` / ``class_calls``: per segment, the summed durations (not the union) and the number
    of kernels per ``kernel_class``. Without ``gpu`` launches, busy times and classes are None (a CPU
    trace has none).
    """
    gens = [e for e in events if e.get("name") == GEN_RANGE and e.get("cat") == "user_annotation"]
    if not gens:
        raise RuntimeError(f"no '{GEN_RANGE}' range in the trace")
    g0 = gens[0]["ts"]
    g1 = g0 + gens[0].get("dur", 0)
    inside = [e for e in events if e.get("ph") == "X" and g0 <= e.get("ts", -1) <= g1]
    marks = sorted(e["ts"] for e in inside if e.get("name") == MARK_RANGE and e.get("cat") == "user_annotation")
    per_scale = len(marks) == num_scales

    def segment(ts: float) -> int:
        return min(bisect.bisect_left(marks, ts), num_scales) if per_scale else 0

    launches_at: dict[Any, float] = {}
    launches = [0] * (num_scales + 1)
    for e in inside:
        if e.get("name") in LAUNCH_EVENTS:
            launches[segment(e["ts"])] += 1
            corr = (e.get("args") or {}).get("correlation")
            if corr is not None:
                launches_at[corr] = e["ts"]
    kernels = [e for e in events if e.get("cat") == "kernel" and e.get("ph") == "X"]
    busy: list[list[tuple[float, float]]] = [[] for _ in range(num_scales + 1)]
    all_busy: list[tuple[float, float]] = []
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    class_us = [dict.fromkeys(KERNEL_CLASSES, 0.0) for _ in range(num_scales + 1)]
    class_calls = [dict.fromkeys(KERNEL_CLASSES, 0) for _ in range(num_scales + 1)]
    # kernels pruning adds at the last two scales, by name: what the "other" count is made of
    added_last2: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    last2 = range(num_scales - 2, num_scales) if per_scale else range(0)
    for k in kernels:
        launched = launches_at.get((k.get("args") or {}).get("correlation"))
        if launched is None and not g0 <= k["ts"] <= g1:
            continue
        span = (k["ts"], k["ts"] + k.get("dur", 0))
        seg = segment(launched if launched is not None else k["ts"])
        busy[seg].append(span)
        cls = kernel_class(str(k.get("name", "")))
        class_us[seg][cls] += k.get("dur", 0)
        class_calls[seg][cls] += 1
        if seg in last2 and cls in ADDED_CLASSES:
            _tally(added_last2, f"{cls}: {k['name']}", k.get("dur", 0))
        all_busy.append(span)
        _tally(per_kernel, k["name"], k.get("dur", 0))
    host = _self_times([e for e in inside if e.get("cat") == "cpu_op"])
    ranges: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in inside:
        if e.get("cat") == "user_annotation" and str(e.get("name", "")).startswith("toprovar."):
            ranges[e["name"]][0] += e.get("dur", 0) / 1e3
            ranges[e["name"]][1] += 1

    def top(table: dict[str, list[float]], n: int = TOP_N) -> list[dict[str, Any]]:
        rows = sorted(table.items(), key=lambda kv: -kv[1][0])[:n]
        return [{"name": n, "ms": v[0] / 1e3, "calls": int(v[1])} for n, v in rows]

    return {
        "wall_ms": (g1 - g0) / 1e3,
        "marks": len(marks),
        "launches": launches if per_scale and gpu else None,
        "busy_ms": [_union_ms(s) for s in busy] if per_scale and gpu else None,
        "class_ms": [{c: us / 1e3 for c, us in seg.items()} for seg in class_us] if per_scale and gpu else None,
        "class_calls": class_calls if per_scale and gpu else None,
        "launches_total": sum(launches) if gpu else None,
        "busy_ms_total": _union_ms(all_busy) if gpu else None,
        "top_kernels": top(per_kernel),
        "last_two_added": top(added_last2, 2 * TOP_N) if per_scale and gpu else None,
        "top_host_ops": top(host),
        "toprovar_ranges": {n: {"ms": v[0], "count": int(v[1])} for n, v in sorted(ranges.items())},
    }


# ----------------------------------------------------------------------------------------------
# analysis
# ----------------------------------------------------------------------------------------------


def _rel_diff(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def image_agreement(runs: Sequence[VariantRun]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per variant and reference (``eager``, ``toprovar``): the relative max difference of the
    images, and the first scale (1-based) whose logits differ at all, with the difference there.
    Sampling turns any difference into different tokens from that scale on, so the first
    differing scale says where two variants part: at a pruned scale by design, or earlier."""
    refs = {r.key: r for r in runs if r.key in ("eager", "toprovar") and r.image is not None}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for r in runs:
        if r.image is None:
            continue
        row: dict[str, dict[str, Any]] = {}
        for name, ref in refs.items():
            if name == r.key or ref.image.shape != r.image.shape:
                continue
            first = next(((i, _rel_diff(a, b)) for i, (a, b) in enumerate(zip(r.logits, ref.logits))
                          if a.shape != b.shape or not torch.equal(a, b)), None)
            row[name] = {"image": _rel_diff(r.image, ref.image),
                         "first_scale": None if first is None else first[0] + 1,
                         "logits_at_first": None if first is None or math.isnan(first[1]) else first[1],
                         "scales_compared": min(len(r.logits), len(ref.logits))}
        out[r.key] = row
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None if a is None or b is None else math.inf
    return a / b


def _last_two(values: Sequence[float] | None, num_scales: int) -> float | None:
    return None if values is None else sum(values[num_scales - 2:num_scales])


def analyse(b: Bench) -> dict[str, Any]:
    """Speedups, FLOP bounds, per-scale tables and targets from the measured numbers."""
    k = len(b.schedule)
    runs = {r.key: r for r in b.runs}
    med = {key: r.median_ms() for key, r in runs.items()}
    dense_keys = [key for key in ("eager", "inductor", "cudagraphs") if med.get(key) is not None]
    compiled = [key for key in ("inductor", "cudagraphs") if med.get(key) is not None]
    best_compiled = min(compiled, key=lambda key: med[key]) if compiled else None
    seg = {key: r.segment_medians() for key, r in runs.items()}
    lead = {key: r.lead_medians() for key, r in runs.items()}
    dense_last2 = {key: _last_two(seg.get(key), k) for key in dense_keys if seg.get(key) is not None}
    best_dense_last2 = min(dense_last2, key=dense_last2.get) if dense_last2 else None

    rows = {}
    for key, r in runs.items():
        rep = r.report
        dense = r.variant.kind in ("eager", "inductor") and r.first_call_ms is not None
        flop_ratio = rep["flop_ratio"] if rep else (1.0 if dense else None)
        bound_last2 = 1.0 if dense else None
        if rep and len(rep["scales"]) >= 2:
            last = rep["scales"][-2:]
            bound_last2 = _ratio(sum(s["flops_dense"] for s in last), sum(s["flops_executed"] for s in last))
        measured_last2 = _ratio(dense_last2.get(best_dense_last2), _last_two(seg.get(key), k))
        rows[key] = {
            "vs_eager": _ratio(med.get("eager"), med[key]),
            "vs_inductor": _ratio(med.get("inductor"), med[key]),
            "vs_best_compiled": _ratio(med.get(best_compiled), med[key]) if best_compiled else None,
            "flop_ratio": flop_ratio,
            "flop_bound": _ratio(1.0, flop_ratio) if flop_ratio is not None else None,
            "last2_measured": measured_last2,
            "last2_flop_bound": bound_last2,
            # a skipped scale has no finite bound: no fraction then
            "last2_fraction": (_ratio(measured_last2, bound_last2) if measured_last2 and bound_last2
                               and math.isfinite(bound_last2) else None),
        }

    per_scale = []
    for i, (h, w) in enumerate(b.schedule):
        entry: dict[str, Any] = {"index": i, "h": h, "w": w, "tokens": h * w, "wall_ms": {}, "lead_ms": {},
                                 "launches": {}, "busy_ms": {}, "flop_ratio": {}}
        for key, r in runs.items():
            if seg.get(key):
                entry["wall_ms"][key] = seg[key][i]
            if lead.get(key):
                entry["lead_ms"][key] = lead[key][i]
            prof = r.profile or {}
            if prof.get("launches"):
                entry["launches"][key] = prof["launches"][i]
            if prof.get("busy_ms"):
                entry["busy_ms"][key] = prof["busy_ms"][i]
            scales = {s["index"]: s for s in (r.report or {}).get("scales", [])}
            if i in scales:
                entry["flop_ratio"][key] = _ratio(scales[i]["flops_executed"], scales[i]["flops_dense"])
        per_scale.append(entry)
    tail = {"wall_ms": {key: s[k] for key, s in seg.items() if s},
            "lead_ms": {key: s[k] for key, s in lead.items() if s},
            "launches": {key: r.profile["launches"][k] for key, r in runs.items()
                         if r.profile and r.profile.get("launches")},
            "busy_ms": {key: r.profile["busy_ms"][k] for key, r in runs.items()
                        if r.profile and r.profile.get("busy_ms")}}
    return {
        "best_compiled": best_compiled,
        "best_dense_last2": best_dense_last2,
        "rows": rows,
        "per_scale": per_scale,
        "decode": tail,
        "targets": targets(b, rows, per_scale, best_compiled),
    }


def _column_medians(rows: list[list[float]]) -> list[float] | None:
    """Per position, the median over the rows (the timed runs)."""
    return [statistics.median(col) for col in zip(*rows)] if rows else None


def _target(name: str, value: str, met: bool | None, miss: str = "", na: str = "") -> dict[str, str]:
    status = f"n/a: {na}" if met is None else ("met" if met else f"missed by {miss}")
    return {"target": name, "value": value, "status": status}


def targets(b: Bench, rows: dict[str, dict[str, Any]], per_scale: list[dict[str, Any]],
            best_compiled: str | None) -> list[dict[str, str]]:
    runs = {r.key: r for r in b.runs}
    tp = rows.get("toprovar", {})
    out = []

    def speed(name: str, value: float | None, goal: float, what: str) -> None:
        if value is None:
            out.append(_target(name, "-", None, na=f"{what} not measured"))
        else:
            out.append(_target(name, f"{value:.2f}x", value >= goal, f"{goal / value:.2f}x"))

    speed(f"toprovar ({b.name} policy) >= {TARGET_VS_EAGER:g}x faster than dense eager",
          tp.get("vs_eager"), TARGET_VS_EAGER, "toprovar or dense eager")
    speed(f"toprovar >= {TARGET_VS_COMPILED:g}x faster than the best dense compiled baseline"
          + (f" ({best_compiled})" if best_compiled else ""),
          tp.get("vs_best_compiled"), TARGET_VS_COMPILED, "toprovar or a compiled baseline")
    def faster(name: str, ours: str, peer: str) -> None:
        ratio = _ratio(runs[peer].median_ms() if peer in runs else None,
                       runs[ours].median_ms() if ours in runs else None)
        speed(name, ratio, 1.0 + 1e-9, f"{ours} or {peer}")

    faster("toprovar faster than the FastVAR policy (FastVAR ms / toprovar ms > 1)", "toprovar", "fastvar")
    if "toprovar_fastest" in runs:
        faster("toprovar preset fastest faster than the FastVAR policy (fidelity: fidelity.md)",
               "toprovar_fastest", "fastvar")
        if "skipvar" in runs:
            faster("toprovar preset fastest faster than the SkipVAR policy (SkipVAR is closer to dense on var-ref)",
                   "toprovar_fastest", "skipvar")
    frac = tp.get("last2_fraction")
    if frac is None:
        out.append(_target(f"measured speedup >= {TARGET_FLOP_FRACTION:.0%} of the FLOP-bound speedup, last two scales",
                           "-", None, na="per-scale times or the toprovar report missing"))
    elif best_compiled is None:
        # against eager the fraction flatters: eager's last scales are slower than compiled dense ones
        out.append(_target(
            f"measured speedup >= {TARGET_FLOP_FRACTION:.0%} of the FLOP-bound speedup, last two scales",
            f"{frac:.0%} against eager", None, na="no compiled dense baseline in this run"))
    else:
        out.append(_target(
            f"measured speedup >= {TARGET_FLOP_FRACTION:.0%} of the FLOP-bound speedup, last two scales",
            f"{tp['last2_measured']:.2f}x of {tp['last2_flop_bound']:.2f}x = {frac:.0%}",
            frac >= TARGET_FLOP_FRACTION, f"{TARGET_FLOP_FRACTION - frac:.0%} points"))
    # observe runs Inductor graphs replayed from CUDA graphs: the best compiled dense variant measured
    # (Inductor, or Inductor with CUDA graphs) is the same backend without the FAE op and its statistics
    name = f"observe <= {TARGET_OBSERVE:g}x dense " + (best_compiled or "Inductor")
    obs = _ratio(runs["observe"].median_ms() if "observe" in runs else None,
                 runs[best_compiled].median_ms() if best_compiled else None)
    if obs is None:
        out.append(_target(name, "-", None, na="observe or a compiled dense baseline not measured"))
    else:
        out.append(_target(name, f"{obs:.3f}x", obs <= TARGET_OBSERVE, f"{100 * (obs / TARGET_OBSERVE - 1):.1f}%"))
    timed = [r for r in b.runs if r.times_ms]
    recompiles = sum(r.dynamo_frames_timed + r.toprovar_compiles_timed for r in timed)
    detail = ", ".join(f"{r.key} {r.dynamo_frames_timed + r.toprovar_compiles_timed}" for r in timed
                       if r.dynamo_frames_timed + r.toprovar_compiles_timed)
    out.append(_target("zero recompiles in timed runs", f"{recompiles}" + (f" ({detail})" if detail else ""),
                       recompiles == 0 if timed else None, f"{recompiles}", na="no timed runs"))
    for ref in ("inductor", "eager"):
        out.append(launch_target(b, per_scale, ref))
    # the dense variants with CUDA graphs launch ~63 kernels per scale: the strict comparison
    for ref in ("observe", "cudagraphs"):
        if any(ref in s["launches"] for s in per_scale):
            out.append(launch_target(b, per_scale, ref))
    return out


def launch_target(b: Bench, per_scale: list[dict[str, Any]], ref: str) -> dict[str, str]:
    """Pruned scales (executed < dense FLOPs) of every pruning variant vs ``ref``'s launches."""
    name = f"pruned scales never launch more kernels than dense {ref}"
    if not any(ref in s["launches"] for s in per_scale):
        return _target(name, "-", None, na=f"no profiled launches of dense {ref}")
    checked, over = 0, []
    for r in b.runs:
        if not r.variant.prunes or not r.report or not (r.profile or {}).get("launches"):
            continue
        for s in r.report["scales"]:
            if s["flops_executed"] >= s["flops_dense"] or s["index"] >= len(per_scale):
                continue
            counts = per_scale[s["index"]]["launches"]
            checked += 1
            if counts[r.key] > counts[ref]:
                over.append(f"{r.key}@{s['index'] + 1}: {counts[r.key]} > {counts[ref]}")
    if not checked:
        return _target(name, "-", None, na="no profiled pruned scale")
    value = f"{checked - len(over)}/{checked} pruned scales ok" + (f"; {', '.join(over[:6])}" if over else "")
    return _target(name, value, not over, f"{len(over)} scale(s)")


# ----------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------


def _f(v: Any, spec: str = ".1f", suffix: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{v:{spec}}{suffix}"


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _status(r: VariantRun) -> str:
    if r.status == "failed":
        return f"failed: {r.error}"
    if r.status == "skipped":
        return "skipped: " + "; ".join(r.skipped)
    return "ok" if not r.skipped else "ok (not measured: " + "; ".join(r.skipped) + ")"


def graph_calls_cell(calls: Sequence[tuple[int, int]]) -> str:
    """``replays / without replay`` medians over timed generations, ``-`` when none were counted."""
    if not calls:
        return "-"
    return f"{statistics.median(c[0] for c in calls):.0f} / {statistics.median(c[1] for c in calls):.0f}"


def scale_class_rows(runs: Sequence[VariantRun], scales: range) -> list[list[str]]:
    """Rows of a "GPU ms by kernel class" table over ``scales`` (0-based), one per run with
    ``class_ms``: variant, per ``KERNEL_CLASSES`` ``ms (calls)`` summed over those scales, the total
    kernel ms and the GPU-busy ms (union) of the same scales."""
    rows = []
    for r in runs:
        prof = r.profile or {}
        class_ms, class_calls = prof.get("class_ms"), prof.get("class_calls")
        if not class_ms or not class_calls:
            continue
        ms = {c: sum(class_ms[i].get(c, 0.0) for i in scales) for c in KERNEL_CLASSES}
        calls = {c: sum(class_calls[i].get(c, 0) for i in scales) for c in KERNEL_CLASSES}
        busy = prof.get("busy_ms")
        rows.append([r.key] + [f"{ms[c]:.2f} ({calls[c]})" for c in KERNEL_CLASSES]
                    + [_f(sum(ms.values()), ".2f"), _f(busy and sum(busy[i] for i in scales), ".2f")])
    return rows


def class_section(title: str, runs: Sequence[VariantRun], scales: range, note: str = "") -> list[str]:
    """A "GPU ms by kernel class" section over ``scales`` (0-based)."""
    lines = [f"### {title}: GPU ms by kernel class (profiled generation)", "",
             f"Sums of kernel durations in ms (kernel count in parentheses) of the kernels launched in {title.lower()}; "
             "kernels that overlap count twice, so the total may exceed the GPU-busy ms (the union). Names are "
             f"classed by `kernel_class` in `benchmarks/e2e.py`.{note}", ""]
    rows = scale_class_rows(runs, scales)
    return lines + (_table(["variant", *KERNEL_CLASSES, "kernel ms", "GPU-busy ms"], rows) if rows
                    else ["(not measured)", ""])


def model_markdown(b: Bench, a: dict[str, Any], build_s: float) -> list[str]:
    k = len(b.schedule)
    runs = sorted(b.runs, key=lambda r: DISPLAY_ORDER.index(r.key) if r.key in DISPLAY_ORDER else 99)
    shown = [r for r in runs if r.times_ms or r.profile or r.report]
    weights = sum(p.numel() * p.element_size() for p in b.model.parameters())
    tokens = sum(h * w for h, w in b.schedule)
    lines = [f"## {b.name}", "",
             f"Schedule {k} scales ({b.schedule[0][0]}x{b.schedule[0][1]} ... {b.schedule[-1][0]}x{b.schedule[-1][1]}, "
             f"{tokens} tokens), {_prompts_text(b.args.prompt)}, CFG {CFG:g} (transformer batch 2 at batch 1), g_seed {G_SEED}, "
             f"random weights ({weights / 2**30:.2f} GiB); model built in {build_s:.1f} s. "
             f"{b.rounds_done} interleaved timed round(s) after {b.args.warmup} warm-up call(s) per variant.", ""]
    lines += ["### Latency (batch 1)", ""]
    rows = []
    for r in runs:
        x = a["rows"][r.key]
        rec = f"{r.dynamo_frames_timed} / {r.toprovar_compiles_timed}" if r.times_ms else "-"
        rows.append([r.key, _f(r.first_call_ms and r.first_call_ms / 1e3, ".1f"), _f(r.median_ms()),
                     _f(min(r.times_ms) if r.times_ms else None), len(r.times_ms),
                     _f((r.profile or {}).get("busy_ms_total")), _f(x["vs_eager"], ".2f", "x"),
                     _f(x["vs_inductor"], ".2f", "x"), rec, _status(r)])
    lines += _table(["variant", "first call s", "median ms", "min ms", "runs", "GPU-busy ms", "vs eager",
                     "vs Inductor", "compiles in timed runs (Dynamo / toprovar)", "status"], rows)
    settled = [f"{r.key} {len(r.settle_ms)} ({', '.join(f'{ms:.0f}' for ms in r.settle_ms)} ms)"
               for r in runs if r.settle_ms]
    if settled:
        lines += ["Warm-up calls added until a cycle of the prompts captured no CUDA graph and ran every graph call "
                  f"with a replay (`settle`), with their wall ms: {'; '.join(settled)}. What a user pays at a new "
                  "text length, or when lending starts.", ""]
    lines += ["### FLOPs and memory", ""]
    bm = b.args.batch_mem or 8  # the "b8" fields hold the --batch-mem measurement
    rows = []
    for r in runs:
        x = a["rows"][r.key]
        rows.append([r.key, _f(x["flop_ratio"], ".3f"), _f(x["vs_eager"], ".2f", "x"), _f(x["flop_bound"], ".2f", "x"),
                     _f(x["last2_measured"], ".2f", "x"), _f(x["last2_flop_bound"], ".2f", "x"),
                     _f(x["last2_fraction"] and 100 * x["last2_fraction"], ".0f", "%"),
                     _gib(r.peak_bytes_b1), _gib(r.reserved_bytes_b1), _gib(r.pool_bytes_b1), _mib(r.kv_bytes_b1),
                     _gib(r.peak_bytes_b8), _gib(r.pool_bytes_b8), _mib(r.kv_bytes_b8), r.b8_note or ""])
    lines += _table(["variant", "FLOP ratio", "measured vs eager", "FLOP-bound", f"last 2 measured (vs {a['best_dense_last2'] or '-'})",
                     "last 2 FLOP-bound", "measured/bound", "peak GiB B=1", "reserved GiB B=1", "graph pools GiB B=1",
                     "K/V MiB B=1", f"peak GiB B={bm}", f"graph pools added GiB B={bm}", f"K/V MiB B={bm}",
                     f"B={bm} note"], rows)

    def scale_table(title: str, field_: str, spec: str, keys: list[str]) -> list[str]:
        if not keys:
            return [f"### {title}", "", "(not measured)", ""]
        body = []
        for s in a["per_scale"]:
            body.append([s["index"] + 1, f"{s['h']}x{s['w']}", s["tokens"]]
                        + [_f(s[field_].get(key), spec) for key in keys])
        if field_ in a["decode"]:
            body.append(["decode", "", ""] + [_f(a["decode"][field_].get(key), spec) for key in keys])
        return [f"### {title}", ""] + _table(["scale", "h x w", "tokens"] + keys, body)

    def have(field_: str) -> list[str]:
        return [r.key for r in shown if any(r.key in s[field_] for s in a["per_scale"])]

    lines += scale_table("Per-scale wall ms (median of the timed runs; time between scale-end marks)",
                         "wall_ms", ".2f", have("wall_ms"))
    lines += scale_table("Per-scale host lead ms (median of the timed runs; how long before the GPU reached a "
                         "scale's end mark the host had queued it: about 0 where the GPU waited for the host)",
                         "lead_ms", ".2f", have("lead_ms"))
    lines += scale_table("Per-scale kernel launches (profiled generation)", "launches", "d", have("launches"))
    lines += scale_table("Per-scale GPU-busy ms (profiled generation, union of kernel intervals)", "busy_ms",
                         ".2f", have("busy_ms"))
    early = range(0, min(5, max(k - 2, 0)))
    if early:
        rows_lo, rows_hi = (2 * b.schedule[i][0] * b.schedule[i][1] for i in (early[0], early[-1]))
        lines += class_section(f"The first {len(early)} scales", shown, early,
                               f" Each scale reads every weight of the model ({weights / 2**30:.2f} GiB) at least "
                               f"once for {rows_lo} to {rows_hi} token rows (batch 1, CFG): memory- and "
                               "kernel-count-bound, not FLOP-bound.")
    lines += class_section("The last two scales", shown, range(max(k - 2, 0), k))
    added = [(r.key, (r.profile or {}).get("last_two_added")) for r in shown]
    added = [(key, rows) for key, rows in added if rows]
    if added:
        lines += [f"Largest {'/'.join(ADDED_CLASSES)} kernels of the last two scales, by name (ms, count); "
                  "a dense compiled model launches few of these:", ""]
        lines += [f"* **{key}**: " + ", ".join(f"`{x['name'][:90]}` {x['ms']:.2f} ms x{x['calls']}" for x in rows)
                  for key, rows in added] + [""]
    lines += scale_table("Per-scale executed / dense FLOPs (toprovar report)", "flop_ratio", ".3f",
                         have("flop_ratio"))
    lines += ["### Host time in `toprovar.*` profiler ranges (profiled generation)", ""]
    ranges = [(r.key, n, v) for r in shown for n, v in ((r.profile or {}).get("toprovar_ranges") or {}).items()]
    lines += (_table(["variant", "range", "ms", "count"], [[key, n, _f(v["ms"], ".2f"), v["count"]]
                                                         for key, n, v in ranges])
              if ranges else ["(none recorded: the runtime has no `toprovar.*` ranges yet)", ""])
    lines += ["### Targets (issue 8)", ""]
    lines += _table(["target", "measured", "status"], [[t["target"], t["value"], t["status"]] for t in a["targets"]])
    lines += ["### Variants", ""]
    lines += _table(["key", "label", "definition"], [[r.key, r.variant.label, r.variant.definition] for r in runs])
    reports = [(r.key, r.report, r.graph_calls_timed) for r in runs if r.report]
    if reports:
        lines += ["### toprovar reports (last warm-up generation)", ""]
        lines += ["Graph calls: per timed generation (median), calls replayed from a CUDA graph / calls that "
                  "had a graph but ran without it because an output it lent was still held "
                  "(`cuda_graph_lend_outputs`).", ""]
        lines += _table(["variant", "rewrites", "start scale D (1-based)", "pruned scales", "planned blocks",
                         "graph calls", "fallbacks"], [
            [key, rep["attention_rewrites"], "-" if rep["start_scale"] is None else rep["start_scale"] + 1,
             ", ".join(str(s["index"] + 1) + ("(skip)" if s["skipped"] else "") for s in rep["scales"]
                       if s["flops_executed"] < s["flops_dense"]) or "none", rep.get("planned_blocks", 0),
             graph_calls_cell(calls), "; ".join(f[:160] for f in rep["fallbacks"][:3]) or "none"]
            for key, rep, calls in reports])
        busy = [f"{r.key}: " + ", ".join(f"{n} x{c}" for n, c in r.busy_graphs.items()) for r in runs if r.busy_graphs]
        if busy:
            lines += ["Graphs that ran without replay (session totals, most first): " + "; ".join(busy) + ".", ""]
        refused = [f"{r.key} {r.refused_captures}" for r in runs if r.refused_captures]
        if refused:
            lines += ["Calls that ran without a CUDA graph because the GPU had less free memory than "
                      "`cuda_graph_min_free_mib` (session totals; the variants alive together share the GPU): "
                      + "; ".join(refused) + ".", ""]
        reliefs = [f"{r.key} {r.reliefs}" for r in runs if r.reliefs]
        if reliefs:
            lines += ["Times the GPU ran out of memory inside a call of the backend, which then dropped every "
                      "CUDA graph and ran the call without (session totals by the end of the timed rounds): "
                      + "; ".join(reliefs) + ".", ""]
    agree = image_agreement(b.runs)
    if agree:
        lines += ["### Image agreement (last warm-up generation)", "",
                  "Max |difference| of the decoded images over the max |value| of the reference, and the "
                  "first scale whose logits (one more generation after warm-up) differ at all. Variants "
                  "that take the same decisions by different routes (`toprovar`, `toprovar_noplan`, "
                  "`toprovar_nocg`, `toprovar_nolend`) run the same kernels on the same tokens, so they should agree with "
                  "`toprovar` exactly or to rounding; pruned variants differ from dense by design.", ""]
        def cell(d: dict[str, Any] | None) -> str:
            if not d:
                return "-"
            where = ("logits equal at all " f"{d['scales_compared']} scales" if d["first_scale"] is None
                     else f"logits first differ at scale {d['first_scale']} ({_f(d['logits_at_first'], '.1e')})")
            return f"{d['image']:.2e}; {where}"

        lines += _table(["variant", "vs eager", "vs toprovar"],
                        [[k, cell(v.get("eager")), cell(v.get("toprovar"))] for k, v in agree.items()])
    lines += ["### Profile: top kernels and host ops (profiled generation)", ""]
    for r in shown:
        if not r.profile:
            continue
        kern = ", ".join(f"`{x['name'][:60]}` {x['ms']:.2f} ms x{x['calls']}" for x in r.profile["top_kernels"])
        host = ", ".join(f"`{x['name'][:40]}` {x['ms']:.2f} ms x{x['calls']}" for x in r.profile["top_host_ops"])
        lines += [f"* **{r.key}** ({_f(r.profile['wall_ms'], '.1f')} ms profiled, "
                  f"{_f(r.profile['launches_total'], 'd')} launches)",
                  f"  * kernels: {kern or 'none (CPU)'}", f"  * host ops (self time): {host or 'none'}"]
    lines.append("")
    if b.notes:
        lines += ["### Notes", ""] + [f"* {n}" for n in dict.fromkeys(b.notes)] + [""]
    return lines


@dataclass
class Output:
    """The results so far; ``write`` rewrites e2e.md and e2e.json (after every phase)."""

    out: Path
    args: argparse.Namespace
    argv: list[str]
    env: dict[str, Any]
    started: str
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"json", "md"}
    notes: list[str] = field(default_factory=list)

    def update(self, b: Bench, build_s: float) -> None:
        a = analyse(b)
        self.models[b.name] = {
            "json": {"schedule": [list(hw) for hw in b.schedule], "build_s": build_s,
                     "rounds": b.rounds_done, "notes": list(dict.fromkeys(b.notes)),
                     "variants": [r.to_dict() for r in b.runs], "image_agreement": image_agreement(b.runs), **a},
            "md": model_markdown(b, a, build_s),
        }

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        elapsed = time.perf_counter() - T_START
        doc = {"schema": "toprovar-e2e/1", "started": self.started, "elapsed_s": elapsed,
               "command": self.argv, "environment": self.env,
               "settings": {"models": self.args.models, "device": self.args.device, "dtype": self.args.dtype,
                            "budget_s": self.args.budget_s, "rounds": self.args.rounds,
                            "warmup": self.args.warmup, "batch_mem": self.args.batch_mem,
                            "profile": self.args.profile, "prompts": self.args.prompt, "g_seed": G_SEED, "cfg": CFG},
               "notes": self.notes,
               "models": {name: m["json"] for name, m in self.models.items()}}
        (self.out / "e2e.json").write_text(json.dumps(_finite(doc), indent=1, default=str) + "\n")
        env = self.env
        head = [f"# End-to-end latency: dense vs toprovar ({self.started[:10]})", "",
                f"{env.get('gpu') or 'CPU'} · torch {env.get('torch')} · triton {env.get('triton') or '-'} · "
                f"CUDA {env.get('cuda') or '-'} · Python {env.get('python')} · {env.get('dtype')} · "
                f"started {self.started}, {elapsed:.0f} s of a {self.args.budget_s:.0f} s budget", "",
                f"Command: `{' '.join(self.argv)}`", "",
                "A generation is one sampler call `m.autoregressive_infer_cfg(cond, B, g_seed, cfg_list)` "
                "(all scales, sampling and the image decoder; the toy text encoding is done once, outside), "
                "synchronised before and after, timed with `perf_counter`. Variants are timed in interleaved "
                "rounds (order rotated each round); speedups are ratios of medians from this run. Columns: "
                "`docs/benchmarks.md`.", ""]
        head += [f"* {n}" for n in self.notes] + ([""] if self.notes else [])
        body = [line for m in self.models.values() for line in m["md"]]
        (self.out / "e2e.md").write_text("\n".join(head + body) + "\n")


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for e2e.md and e2e.json")
    ap.add_argument("--models", default="infinity-2b", help="comma-separated Infinity zoo models (infinity-2b, "
                    "infinity-8b, infinity-tiny); several share the budget evenly")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                    help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--budget-s", type=float, default=500.0,
                    help="wall-clock budget counted from the end of the imports; what does not fit is "
                    "skipped (default 500: about 9 minutes in all)")
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds (each variant once per round); default 7")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up calls after the first call (>= 1); default 2")
    ap.add_argument("--variants", default=",".join(VARIANT_KEYS),
                    help=f"comma-separated subset of {','.join(VARIANT_KEYS)}")
    ap.add_argument("--batch-mem", type=int, default=None,
                    help="batch for the extra memory measurement (default 8 on CUDA, 0 = off on CPU)")
    ap.add_argument("--batch-mem-force", action="store_true",
                    help="measure --batch-mem even where the estimate (the batch-1 peak beyond the weights, times "
                    "the batch) says it may not fit; an out-of-memory error is then the variant's batch note")
    ap.add_argument("--no-profile", dest="profile", action="store_false", help="skip the profiled generations")
    ap.add_argument("--prompt", action="append", default=None,
                    help=f"a prompt; repeat for several, taken in turn by every variant's calls (texts of other "
                    f"lengths: what a user who changes prompts gets; --warmup is raised to cover them all); "
                    f"default \"{PROMPT}\"")
    args = ap.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown_models = sorted(set(args.models) - set(zoo.list_models()))
    if unknown_models:
        ap.error(f"unknown model(s) {unknown_models}; zoo models: {', '.join(zoo.list_models())}")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(args.variants) - set(VARIANT_KEYS))
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; valid: {', '.join(VARIANT_KEYS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available (use --device cpu for the smoke run)")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.batch_mem is None:
        args.batch_mem = 8 if args.device == "cuda" else 0
    if args.warmup < 1 or args.rounds < 1:
        ap.error("--warmup and --rounds must be >= 1")
    args.prompt = args.prompt or [PROMPT]
    args.warmup_asked = args.warmup
    # the first call and the warm-ups take every prompt once: one first seen in a timed round would
    # compile there (a new text length)
    args.warmup = max(args.warmup, len(args.prompt) - 1)
    return args


def bench_model(name: str, args: argparse.Namespace, budget: Budget, output: Output,
                extra_variants: Sequence[Variant]) -> None:
    model, build_s = build_model(name, args.device, getattr(torch, args.dtype))
    schedule = [tuple(hw) for hw in model.resolve_schedule(None)]
    marks = ScaleMarks(model, len(schedule), args.device)
    variants = [v for v in model_variants(name) if v.key in args.variants] + list(extra_variants)
    b = Bench(name=name, model=model, device=args.device, schedule=schedule, marks=marks,
              call_b1=sampler_call(model, 1, args.device, args.prompt), runs=[VariantRun(v) for v in variants],
              budget=budget, args=args)
    marks.install()
    if args.device == "cuda":
        torch.cuda.synchronize()
        b.base_bytes = torch.cuda.memory_allocated()
    try:
        for phase in (compile_phase, timed_phase, profile_phase, batch_memory_phase):
            log.info("%s: %s (%.0f s left)", name, phase.__name__, budget.left())
            phase(b)
            output.update(b, build_s)
            output.write()
    finally:
        marks.restore()
        for r in b.runs:
            r.fn = None
        del b, model
        torch._dynamo.reset()
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()


def main(argv: Sequence[str] | None = None, extra_variants: Sequence[Variant] = ()) -> Path:
    """Run the benchmark; ``extra_variants`` (tests) are appended to every model's variants."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = Path(args.out)
    command = ["benchmarks/e2e.py", *(sys.argv[1:] if argv is None else argv)]
    output = Output(out=out, args=args, argv=command,
                    env=environment(torch.device(args.device), getattr(torch, args.dtype)),
                    started=datetime.datetime.now().isoformat(timespec="seconds"))
    if not isinstance(toprovar_backend(), str):
        output.notes.append("backend passed as `toprovar_fx.backend.toprovar_backend` (the `toprovar` entry "
                            "point is not installed here); same function")
    if args.warmup != args.warmup_asked:
        output.notes.append(f"--warmup raised from {args.warmup_asked} to {args.warmup}: the first call and the "
                            f"warm-ups take each of the {len(args.prompt)} prompts once before the timed rounds")
    budget = Budget(T_START + args.budget_s)
    # Every variant compiles the same block code objects: Dynamo's per-code-object limits must hold
    # all of them (toprovar raises recompile_limit to 64 only), scoped to this run.
    with torch._dynamo.config.patch(recompile_limit=1024, accumulated_recompile_limit=8192):
        for i, name in enumerate(args.models):
            share = budget.share(len(args.models) - i)
            if share.left() <= 0:
                output.notes.append(f"{name}: skipped entirely (time budget)")
                continue
            try:
                bench_model(name, args, share, output, extra_variants)
            except (Exception, DeadlineExceeded) as err:  # noqa: BLE001 - keep what the other models gave
                output.notes.append(f"{name}: stopped: {one_line(err)}")
                log.exception("%s failed", name)
            output.write()
    log.info("wrote %s and %s", out / "e2e.md", out / "e2e.json")
    return out


if __name__ == "__main__":
    main()
