"""Fidelity against dense vs executed FLOPs: ToProVAR and the baselines on the trained ``var-ref``.

Issue 7. Every method generates the same seeded samples as the dense model (same class labels,
same ``g_seed`` per batch, same sampler settings) and is compared with the dense generation:

* **SSIM** and **PSNR** of the decoded 256 px image against the dense image;
* **token agreement** at the last scale: the fraction of positions where the arg-max of the
  guided logits equals dense's (``n/a`` where a method skips the last scale);
* **executed FLOP ratio**: the backend's executed / dense FLOP accounting
  (``toprovar_fx.last_generation()``), summed over all batches.

Methods (each budget is one ``torch.compile`` of the unmodified sampler with one policy):

* ``dense``: the eager sampler (the reference; FLOP ratio 1).
* ``keepall``: compiled, nothing pruned (machinery check: must equal dense).
* ``toprovar``: the policy calibrated by ``toprovar calibrate`` on var-ref
  (``benchmarks/results/var-ref-calibrated.yaml``), plus budget variants of it (``tau``,
  ``alpha_max``, ``min_keep_ratio``).
* ``random`` / ``frequency``: *the same policy* with only ``token.selection`` changed. The start
  scale, the layer classes and every kept count ``k`` come from the same entropy gate, so the
  kept-token budget per (scale, layer) is toprovar's; only *which* tokens are kept differs. The
  kept counts actually executed are compared with toprovar's and reported.
* ``fastvar``: FastVAR's released mechanics transposed onto var-ref by position (from
  ``var-tiny-fastvar-released``: frequency selection recomputed per sublayer, fixed ratios,
  restoration from a cached scale), at three budgets.
* ``skipvar``: the ``var-tiny-skipvar`` presets transposed (late scales skipped, the
  unconditional CFG branch replaced by the conditional one; needs ``dynamic=True``).

The sampler is stochastic: once pruning changes the logits of a scale, the tokens sampled from
then on can differ from dense's, and later scales are conditioned on different tokens. That
divergence is part of what is measured.

Run ``python benchmarks/fidelity.py --help``. Outputs: ``fidelity.md``, ``fidelity.json``,
``fidelity.png`` (fidelity vs FLOP ratio, one curve per method) and ``fidelity_grid.png``
(dense next to toprovar, every class).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.metadata
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import toprovar_fx  # noqa: E402
import toprovar_fx.data  # noqa: E402
from toprovar_fx import zoo  # noqa: E402
from toprovar_fx.metrics import psnr, ssim  # noqa: E402
from toprovar_fx.policies import Policy, load_policy, read_shipped  # noqa: E402

__all__ = [
    "CALIBRATED",
    "FAMILIES",
    "Method",
    "MethodRun",
    "Sampling",
    "build_methods",
    "calibrate",
    "generate_dense",
    "load_model",
    "main",
    "run_fidelity",
    "run_method",
    "sample_plan",
]

MODEL = "var-ref"
RESULTS = ROOT / "benchmarks" / "results"
CALIBRATED = RESULTS / "var-ref-calibrated.yaml"
FAMILIES = ("keepall", "toprovar", "random", "frequency", "fastvar", "skipvar", "resample")
DATE = "2026-11-30"

# Calibration base: the shipped var-tiny ToProVAR policy (paper defaults), transposed onto var-ref,
# with one change: layer.beta 0.5 instead of 1.0. With beta 1 every var-ref layer's R falls at or
# below the ambiguity band [0.4, 0.6] (median sigma1/sigma2 at 8x8: 1.54-2.08 -> R 0.34-0.58) and
# the calibrated policy would prune nothing; beta 0.5 maps the same ratios to R 0.58-0.76.
CALIBRATION_BETA = 0.5



# ToProVAR budgets: deep-merged over the calibrated policy. tau: with direction `le` a higher tau
# starts pruning at an earlier scale D; alpha_max / min_keep_ratio: how many tokens the gate keeps.
# `fastest` is the shipped policies' preset of that name (the last two scales skipped, D fixed at the
# scale before them).
TOPROVAR_BUDGETS: dict[str, dict[str, Any]] = {
    "gentle": {"scale": {"tau": 0.35}, "token": {"alpha_max": 0.75, "min_keep_ratio": 0.25}},
    "calibrated": {},
    "strong": {"scale": {"tau": 0.6}, "token": {"alpha_max": 1.0, "min_keep_ratio": 0.05}},
    "max": {"scale": {"tau": 1.0}, "token": {"alpha_max": 1.0, "min_keep_ratio": 0.05}},
    "fastest": copy.deepcopy(read_shipped(MODEL)["presets"]["fastest"]),
}

# FastVAR transposed from var-tiny-fastvar-released (4 blocks, layers [1, 2]) to 8 blocks: the first
# and the last block stay dense, as FastVAR's released Infinity code keeps 3 of 32 first / 4 last.
FASTVAR_LAYERS = [1, 6]
FASTVAR_BUDGETS: dict[str, tuple[str | None, dict[str, Any]]] = {
    # released preset prune_only: 8x8 40%, 10x10 50% pruned, restored from 6x6
    "prune_only": ("prune_only", {}),
    # FastVAR's released HART ratios by position: the last two scales 50% / 75%, restored from 10x10
    "hart_ratios": ("prune_only", {"token": {"ratios": {-2: 0.5, -1: 0.75}},
                                   "restore": {"cached_scale": -3}, "scale": {"min_start_scale": -2,
                                                                            "max_start_scale": -2}}),
    # the released Infinity loop: prune_only + the last two scales never run
    "released": ("released", {}),
}

SKIPVAR_BUDGETS = ("quality", "balanced", "fast")

# Reference lines, not methods: the dense model with the tokens of its last k scales drawn from an
# independent generator. Any method that changes the logits of those scales resamples (part of) them.
RESAMPLE_LAST = (1, 2)


# ---------------------------------------------------------------------------------------- setup
@dataclass(frozen=True)
class Sampling:
    """Sampler settings (var-ref's training defaults: cfg 2.0, top-p 0.9)."""

    cfg: float = 2.0
    top_p: float = 0.9
    top_k: int = 0


@dataclass(frozen=True)
class Method:
    """One curve point: a method family at one budget, compiled once with one policy."""

    family: str  # dense | keepall | toprovar | random | frequency | fastvar | skipvar
    budget: str
    policy: Policy | None = None
    dynamic: bool = False  # torch.compile(dynamic=True): what cfg.reuse_cond_from needs
    matches: str | None = None  # label of the toprovar run whose kept counts this one shares

    @property
    def label(self) -> str:
        return self.family if self.family == "dense" else f"{self.family}:{self.budget}"


def load_model(device: str = "cpu") -> torch.nn.Module:
    """The trained reference model, fp32, eval mode."""
    return zoo.build(MODEL, pretrained=True, device=device).eval()


def sample_plan(samples: int, batch: int, seed: int, num_classes: int) -> list[tuple[torch.Tensor, int]]:
    """``(labels [batch], g_seed)`` per batch: sample ``i`` has class ``i % num_classes``; batch ``b``
    uses ``g_seed = seed + b``. Raises ``ValueError`` unless ``batch`` divides ``samples``."""
    if samples < 1 or batch < 1 or samples % batch:
        raise ValueError(f"--samples ({samples}) must be a positive multiple of --batch ({batch})")
    return [(torch.arange(b * batch, (b + 1) * batch) % num_classes, seed + b) for b in range(samples // batch)]


def _call(fn: Callable[..., Any], labels: torch.Tensor, g_seed: int, sampling: Sampling) -> tuple[torch.Tensor, Any]:
    return fn(B=int(labels.shape[0]), label_B=labels, g_seed=g_seed, cfg=sampling.cfg, top_k=sampling.top_k,
              top_p=sampling.top_p, return_logits=True)


def _fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    return dict(model.fingerprint())


def _schedules(model: torch.nn.Module) -> dict[str, list[list[int]]]:
    return {k: [list(hw) for hw in v] for k, v in model.scale_schedules.items()}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep merge as policy presets do: mappings key by key; token.ratios replaced whole."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "ratios":
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def transpose(shipped: str, model: torch.nn.Module, *, preset: str | None = None, name: str | None = None,
              overrides: dict[str, Any] | None = None) -> Policy:
    """A shipped var-tiny policy put onto ``model``: its fingerprint and schedules, the rest kept."""
    d = load_policy(shipped, preset=preset).to_dict()
    d["model"] = _fingerprint(model)
    d["schedules"] = _schedules(model)
    d["name"] = name or shipped.replace("var-tiny", MODEL)
    d = _merge(d, overrides or {})
    return Policy.from_dict(d, source=f"<{shipped} transposed onto {MODEL}>")


# ---------------------------------------------------------------------------------- calibration
def calibrate(model: torch.nn.Module, out: str | Path = CALIBRATED, *, items: int = 32, seed: int = 1000,
              sampling: Sampling = Sampling(), show_progress: bool = False) -> Policy:
    """Run ``toprovar calibrate``'s function on var-ref and write the policy to ``out``.

    The sampling settings are passed as ``toprovar calibrate``'s ``--cfg`` / ``--top-p`` / ``--top-k``
    (``calibrate_policy(cfg=, top_p=, top_k=)``), so calibration sees the generations this benchmark
    measures. Equivalent command (the base here is ``var-tiny`` transposed with ``layer.beta`` 0.5,
    whose behavioural fields equal the shipped ``var-ref`` policy's apart from the ones calibration
    writes)::

        toprovar calibrate --model var-ref --classes 32 --seed 1000 --base var-ref \\
            --name var-ref-calibrated --cfg 2.0 --top-p 0.9 --top-k 0 --out var-ref-calibrated.yaml

    Calibration seeds (``seed + i``) are disjoint from the benchmark's (``0..samples/batch - 1``).
    """
    from toprovar_fx.tools import calibrate_policy
    from toprovar_fx.tools import load_model as tool_model

    adapter = tool_model(MODEL)
    adapter.model = model  # the model already built here (the same checkpoint)
    adapter.sampler = model.autoregressive_infer_cfg
    base = transpose("var-tiny", model, name=MODEL, overrides={"layer": {"beta": CALIBRATION_BETA}})
    torch._dynamo.reset()
    res = calibrate_policy(adapter, classes=items, base=base, seed=seed, out=out, name=f"{MODEL}-calibrated",
                           cfg=sampling.cfg, top_p=sampling.top_p, top_k=sampling.top_k,
                           show_progress=show_progress)
    torch._dynamo.reset()
    return res.policy


# --------------------------------------------------------------------------------------- methods
def build_methods(model: torch.nn.Module, calibrated: Policy, families: Sequence[str] = FAMILIES,
                  toprovar_budgets: Sequence[str] | None = None) -> list[Method]:
    """The methods of the benchmark, in run order (toprovar before the ones that match it)."""
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown method families {unknown}; valid: {', '.join(FAMILIES)}")
    budgets = list(TOPROVAR_BUDGETS) if toprovar_budgets is None else list(toprovar_budgets)
    bad = sorted(set(budgets) - set(TOPROVAR_BUDGETS))
    if bad:
        raise ValueError(f"unknown toprovar budgets {bad}; valid: {', '.join(TOPROVAR_BUDGETS)}")
    cal = calibrated.to_dict()
    methods: list[Method] = []
    if "keepall" in families:
        methods.append(Method("keepall", "-", Policy.keepall(_schedules(model), name=f"{MODEL}-keepall",
                                                               model=_fingerprint(model))))
    for fam in ("toprovar", "random", "frequency"):
        if fam not in families:
            continue
        for b in budgets:
            d = _merge(cal, TOPROVAR_BUDGETS[b])
            d["name"] = f"{MODEL}-{fam}-{b}"
            if fam != "toprovar":
                d["token"]["selection"] = fam
            pol = Policy.from_dict(d, source=f"<{calibrated.source} budget {b}, selection {d['token']['selection']}>")
            methods.append(Method(fam, b, pol, matches=None if fam == "toprovar" else f"toprovar:{b}"))
    if "fastvar" in families:
        for b, (preset, over) in FASTVAR_BUDGETS.items():
            pol = transpose("var-tiny-fastvar-released", model, preset=preset, name=f"{MODEL}-fastvar-{b}",
                            overrides=_merge({"layer": {"layers": FASTVAR_LAYERS}}, over))
            methods.append(Method("fastvar", b, pol))
    if "skipvar" in families:
        for b in SKIPVAR_BUDGETS:
            pol = transpose("var-tiny-skipvar", model, preset=b, name=f"{MODEL}-skipvar-{b}")
            methods.append(Method("skipvar", b, pol, dynamic=True))
    if "resample" in families:
        methods += [Method("resample", f"last{k}") for k in RESAMPLE_LAST]
    return methods


@contextlib.contextmanager
def resampled_last_scales(model: torch.nn.Module, k: int, state: dict[str, Any]) -> Iterator[None]:
    """Within the block, the VAR sampler draws the tokens of its last ``k`` scales from an independent
    generator seeded with ``state["seed"]`` (set per call), everything else unchanged."""
    import toprovar_fx.zoo.var as var_module

    original = var_module.sample_top_k_top_p
    first = model.patch_nums[-k] ** 2

    def sample(logits: torch.Tensor, rng: torch.Generator | None, *args: Any, **kwargs: Any) -> torch.Tensor:
        if logits.shape[1] >= first:
            if state.get("rng") is None:
                state["rng"] = torch.Generator(device=logits.device).manual_seed(state["seed"])
            rng = state["rng"]
        return original(logits, rng, *args, **kwargs)

    var_module.sample_top_k_top_p = sample
    try:
        yield
    finally:
        var_module.sample_top_k_top_p = original


# ------------------------------------------------------------------------------------- running
@dataclass
class DenseRef:
    """The dense generations every method is compared with."""

    images: torch.Tensor  # [N, 3, H, W] in [0, 1]
    last_tokens: torch.Tensor  # [N, L_last] arg-max of the guided logits at the last scale
    seconds: float


@dataclass
class MethodRun:
    """Per-sample metrics and the backend's accounting of one method."""

    method: Method
    ssim: list[float] = field(default_factory=list)
    psnr: list[float] = field(default_factory=list)
    mse: list[float] = field(default_factory=list)
    agreement: list[float | None] = field(default_factory=list)
    flops_dense: float = 0.0
    flops_executed: float = 0.0
    kept: list[list[list[int]]] = field(default_factory=list)  # batch -> scale -> layer: tokens run on
    start_scales: list[int | None] = field(default_factory=list)  # per batch, 0-based
    skipped_scales: list[list[int]] = field(default_factory=list)  # per batch
    fallbacks: list[str] = field(default_factory=list)
    compiles: list[int] = field(default_factory=list)
    first_call_s: float = 0.0
    seconds: float = 0.0
    images: torch.Tensor | None = None  # uint8 [N, 3, H, W] when kept

    @property
    def flop_ratio(self) -> float:
        return self.flops_executed / self.flops_dense if self.flops_dense else 1.0

    def summary(self) -> dict[str, Any]:
        """Aggregates over samples (JSON-able)."""
        n = len(self.ssim)
        mean = statistics.fmean(self.ssim)
        sd = statistics.stdev(self.ssim) if n > 1 else 0.0
        mse = statistics.fmean(self.mse)
        finite = [p for p in self.psnr if math.isfinite(p)]
        agree = [a for a in self.agreement if a is not None]
        return {
            "label": self.method.label,
            "family": self.method.family,
            "budget": self.method.budget,
            "policy": self.method.policy.name if self.method.policy is not None else None,
            "samples": n,
            "flop_ratio": self.flop_ratio,
            "ssim_mean": mean,
            "ssim_std": sd,
            "ssim_ci95": 1.96 * sd / math.sqrt(n) if n > 1 else 0.0,
            "psnr_pooled": float("inf") if mse == 0 else 10 * math.log10(1.0 / mse),
            "psnr_median": statistics.median(self.psnr),
            "psnr_mean_finite": statistics.fmean(finite) if finite else None,
            "identical_images": sum(1 for m in self.mse if m == 0),
            "token_agreement": statistics.fmean(agree) if agree else None,
            "start_scales": self.start_scales,
            "skipped_scales": sorted({s for b in self.skipped_scales for s in b}),
            "fallbacks": self.fallbacks,
            "compiles_per_batch": self.compiles,
            "first_call_s": self.first_call_s,
            "seconds": self.seconds,
        }


def generate_dense(model: torch.nn.Module, plan: Sequence[tuple[torch.Tensor, int]],
                   sampling: Sampling = Sampling()) -> DenseRef:
    """The eager (uncompiled) sampler on every batch of ``plan``."""
    t0 = time.perf_counter()
    images, tokens = [], []
    for labels, g_seed in plan:
        img, logits = _call(model.autoregressive_infer_cfg, labels.to(model.device), g_seed, sampling)
        images.append(img.float().cpu())
        tokens.append(logits[-1].argmax(-1).cpu())
    return DenseRef(torch.cat(images), torch.cat(tokens), time.perf_counter() - t0)


def _kept_matrix(rep: Any) -> list[list[int]]:
    """Tokens each (scale, layer) block ran on: all when kept, 0 when skipped."""
    out = []
    for s in rep.scales:
        row = []
        for layer in s.layers:
            if s.skipped or layer.action == "skip":
                row.append(0)
            else:
                row.append(s.tokens if layer.kept_tokens is None else int(layer.kept_tokens))
        out.append(row)
    return out


def run_method(model: torch.nn.Module, method: Method, plan: Sequence[tuple[torch.Tensor, int]], dense: DenseRef,
               sampling: Sampling = Sampling(), keep_images: bool = False) -> MethodRun:
    """Compile the sampler once with ``method``'s policy and generate every batch of ``plan``."""
    run = MethodRun(method)
    if method.family == "resample":
        return _run_resample(model, run, plan, dense, sampling)
    torch._dynamo.reset()
    kwargs: dict[str, Any] = {"backend": "toprovar", "options": {"policy": method.policy}}
    if method.dynamic:
        kwargs["dynamic"] = True
    fn = torch.compile(model.autoregressive_infer_cfg, **kwargs)
    images: list[torch.Tensor] = []
    offset = 0
    t0 = time.perf_counter()
    for bi, (labels, g_seed) in enumerate(plan):
        tb = time.perf_counter()
        img, logits = _call(fn, labels.to(model.device), g_seed, sampling)
        if bi == 0:
            run.first_call_s = time.perf_counter() - tb
        rep = toprovar_fx.last_generation()
        if rep is None or not rep.scales:
            raise RuntimeError(f"{method.label}: the toprovar backend recorded no generation")
        img = img.float().cpu()
        n = img.shape[0]
        _metrics(run, img, None if rep.scales[-1].skipped else logits[-1].argmax(-1).cpu(), dense, offset)
        run.flops_dense += rep.flops_dense
        run.flops_executed += rep.flops_executed
        run.kept.append(_kept_matrix(rep))
        run.start_scales.append(rep.start_scale)
        run.skipped_scales.append([s.index for s in rep.scales if s.skipped])
        run.compiles.append(rep.compiles)
        for f in rep.fallbacks:
            if f not in run.fallbacks:
                run.fallbacks.append(f)
        if keep_images:
            images.append((img.clamp(0, 1) * 255).round().to(torch.uint8))
        offset += n
    run.seconds = time.perf_counter() - t0
    if keep_images:
        run.images = torch.cat(images)
    torch._dynamo.reset()
    return run


def _metrics(run: MethodRun, img: torch.Tensor, tokens: torch.Tensor | None, dense: DenseRef, offset: int) -> None:
    for i in range(img.shape[0]):
        a, b = img[i:i + 1], dense.images[offset + i:offset + i + 1]
        run.ssim.append(ssim(a, b))
        run.psnr.append(psnr(a, b))
        run.mse.append(float(torch.mean((a - b) ** 2)))
        run.agreement.append(None if tokens is None else float((tokens[i] == dense.last_tokens[offset + i]).float().mean()))


def _run_resample(model: torch.nn.Module, run: MethodRun, plan: Sequence[tuple[torch.Tensor, int]],
                  dense: DenseRef, sampling: Sampling) -> MethodRun:
    """The eager dense sampler with its last k scales resampled (FLOP ratio 1 by construction)."""
    k = int(run.method.budget.removeprefix("last"))
    state: dict[str, Any] = {}
    offset = 0
    t0 = time.perf_counter()
    with resampled_last_scales(model, k, state):
        for labels, g_seed in plan:
            state.update(seed=10**6 + g_seed, rng=None)
            img, logits = _call(model.autoregressive_infer_cfg, labels.to(model.device), g_seed, sampling)
            _metrics(run, img.float().cpu(), logits[-1].argmax(-1).cpu(), dense, offset)
            offset += img.shape[0]
    run.flops_dense = run.flops_executed = 1.0
    run.seconds = time.perf_counter() - t0
    return run


def kept_match(run: MethodRun, ref: MethodRun) -> dict[str, Any]:
    """How closely ``run`` executed ``ref``'s kept-token budget (per batch, scale and layer)."""
    diff = total = exact = cells = 0
    for a, b in zip(run.kept, ref.kept):
        for ra, rb in zip(a, b):
            for x, y in zip(ra, rb):
                diff += abs(x - y)
                total += y
                exact += x == y
                cells += 1
    pruned_a = sum(x for batch in run.kept for row in batch for x in row)
    pruned_b = sum(x for batch in ref.kept for row in batch for x in row)
    return {
        "reference": ref.method.label,
        "cells_equal": exact / cells if cells else 1.0,
        "abs_diff_over_total": diff / total if total else 0.0,
        "tokens_run": pruned_a,
        "tokens_run_reference": pruned_b,
        "flop_ratio_reference": ref.flop_ratio,
    }


def run_fidelity(model: torch.nn.Module, methods: Sequence[Method], *, samples: int = 64, batch: int = 8,
                 seed: int = 0, sampling: Sampling = Sampling(), keep_images: Sequence[str] = (),
                 log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The benchmark's core: dense reference, then every method on the same samples.

    Returns ``{"dense": DenseRef, "runs": {label: MethodRun}, "matches": {label: kept_match},
    "plan": [(labels, seed)], "summary": [row per method]}``.
    """
    say = log or (lambda _msg: None)
    plan = sample_plan(samples, batch, seed, int(model.num_classes))
    dense = generate_dense(model, plan, sampling)
    say(f"dense: {samples} samples in {dense.seconds:.1f} s")
    runs: dict[str, MethodRun] = {}
    matches: dict[str, dict[str, Any]] = {}
    for m in methods:
        r = run_method(model, m, plan, dense, sampling, keep_images=m.label in keep_images)
        runs[m.label] = r
        if m.matches is not None and m.matches in runs:
            matches[m.label] = kept_match(r, runs[m.matches])
        s = r.summary()
        agree = "n/a" if s["token_agreement"] is None else f"{s['token_agreement']:.3f}"
        say(f"{m.label}: FLOP ratio {s['flop_ratio']:.3f}  SSIM {s['ssim_mean']:.4f} +- {s['ssim_std']:.4f}  "
            f"PSNR {s['psnr_pooled']:.2f}  agreement {agree}  ({r.seconds:.1f} s, first call "
            f"{r.first_call_s:.1f} s){'  FALLBACKS: ' + '; '.join(r.fallbacks) if r.fallbacks else ''}")
    dense_row = {"label": "dense", "family": "dense", "budget": "-", "policy": None, "samples": samples,
                 "flop_ratio": 1.0, "ssim_mean": 1.0, "ssim_std": 0.0, "ssim_ci95": 0.0,
                 "psnr_pooled": float("inf"), "psnr_median": float("inf"), "psnr_mean_finite": None,
                 "identical_images": samples, "token_agreement": 1.0, "seconds": dense.seconds}
    return {"dense": dense, "runs": runs, "matches": matches, "plan": plan,
            "summary": [dense_row] + [r.summary() for r in runs.values()]}


# ------------------------------------------------------------------------------------- outputs
def environment() -> dict[str, Any]:
    """What the numbers were measured on."""
    def version(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"cpu": platform.processor() or platform.machine(), "cpu_count": __import__("os").cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "toprovar_fx": version("toprovar_fx"), "device": "cpu",
            "dtype": "float32"}


def _jsonable(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def write_json(result: dict[str, Any], path: Path, settings: dict[str, Any],
               pooled: dict[str, Any] | None = None) -> dict[str, Any]:
    """Settings, environment, the summary table, kept-count matching and per-sample metrics; returns
    what it wrote (the input of ``write_markdown``)."""
    runs: dict[str, MethodRun] = result["runs"]
    data = {
        "schema": "toprovar-fidelity/1",
        "date": DATE,
        "settings": settings,
        "environment": environment(),
        "samples": [{"index": i, "label": int(lab), "batch": b, "g_seed": s}
                    for b, (labels, s) in enumerate(result["plan"]) for i, lab in
                    zip(range(b * len(labels), (b + 1) * len(labels)), labels.tolist())],
        "summary": result["summary"],
        "kept_budget_match": result["matches"],
        "policies": {label: r.method.policy.to_dict() for label, r in runs.items() if r.method.policy},
        "per_sample": {label: {"ssim": r.ssim, "psnr": r.psnr, "token_agreement": r.agreement}
                       for label, r in runs.items()},
        "kept_tokens_mean": {label: _mean_kept(r) for label, r in runs.items()},
        "dense_seconds": result["dense"].seconds,
    }
    if pooled is not None:
        data["pooled_batch"] = {"batch": settings["pooled_batch"], "summary": pooled["summary"],
                                "kept_budget_match": pooled["matches"],
                                "per_sample": {k: {"ssim": r.ssim, "psnr": r.psnr, "token_agreement": r.agreement}
                                               for k, r in pooled["runs"].items()}}
    data = _jsonable(data)
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    return data


def _mean_kept(r: MethodRun) -> list[list[float]]:
    """Mean over batches of the tokens each (scale, layer) block ran on."""
    if not r.kept:
        return []
    return [[statistics.fmean(b[s][j] for b in r.kept) for j in range(len(r.kept[0][s]))]
            for s in range(len(r.kept[0]))]


COLORS = {"toprovar": "tab:red", "random": "tab:gray", "frequency": "tab:blue", "fastvar": "tab:green",
          "skipvar": "tab:purple", "keepall": "black"}


def plot_fidelity(data: dict[str, Any], path: Path) -> None:
    """Fidelity vs executed FLOP ratio, one curve per method family, plus paired differences."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, per = data["summary"], data["per_sample"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    ax_ssim, ax_psnr, ax_agree, ax_pair = axes.flat
    for fam in ("toprovar", "random", "frequency", "fastvar", "skipvar"):
        rows = sorted((r for r in summary if r["family"] == fam), key=lambda r: r["flop_ratio"])
        if not rows:
            continue
        x = [r["flop_ratio"] for r in rows]
        kw = {"color": COLORS[fam], "marker": "o", "label": fam}
        ax_ssim.plot(x, [r["ssim_mean"] for r in rows], **kw)
        ax_psnr.plot(x, [r["psnr_pooled"] for r in rows], **kw)
        ag = [(xi, r["token_agreement"]) for xi, r in zip(x, rows) if r["token_agreement"] is not None]
        if ag:
            ax_agree.plot(*zip(*ag), **kw)
        if fam in ("toprovar", "fastvar", "skipvar"):
            for r in rows:
                ax_ssim.annotate(r["budget"], (r["flop_ratio"], r["ssim_mean"]), fontsize=7, xytext=(4, -9),
                                 textcoords="offset points", color=COLORS[fam])
        if fam in ("random", "frequency"):
            pts = []
            for r in rows:
                ref = per.get(f"toprovar:{r['budget']}")
                if ref is not None:
                    pts.append((r["flop_ratio"], *paired(per[r["label"]]["ssim"], ref["ssim"])))
            if pts:
                xs, ms, cis = zip(*pts)
                ax_pair.errorbar(xs, ms, yerr=cis, capsize=3, **{**kw, "label": f"{fam} - toprovar"})
    for r in summary:
        if r["family"] == "resample":
            k = r["budget"].removeprefix("last")
            for ax, key in ((ax_ssim, "ssim_mean"), (ax_psnr, "psnr_pooled"), (ax_agree, "token_agreement")):
                if r[key] is not None:
                    ax.axhline(r[key], color="tab:orange", ls="--", lw=1)
                    at = 0.25 if ax is ax_ssim else 0.01  # right of the SSIM panel's legend
                    ax.annotate(f"dense, last {k} scale(s) resampled", (at, r[key]), fontsize=7,
                                xycoords=("axes fraction", "data"), color="tab:orange", xytext=(0, 2),
                                textcoords="offset points")
    ax_ssim.plot([1.0], [1.0], "k*", ms=10, label="dense / keepall")
    ax_pair.axhline(0.0, color="tab:red", lw=1)
    cis = [r["ssim_ci95"] for r in summary if r["family"] not in ("dense", "keepall") and r.get("ssim_ci95")]
    ci_text = f"+-{min(cis):.2f}-{max(cis):.2f}" if cis else "n/a"
    titles = (f"SSIM vs dense (mean over samples; 95% CIs of the means in fidelity.md: {ci_text})",
              "PSNR vs dense, dB (pooled MSE)", "token agreement with dense, last scale (arg-max)",
              "paired SSIM difference to toprovar at the same kept-token budget (mean, 95% CI)")
    for ax, name in zip(axes.flat, titles):
        ax.axvline(1.0, color="black", lw=0.5, ls=":")
        ax.set_xlabel("executed / dense transformer FLOPs")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    ax_ssim.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0.0, 0.93))
    ax_pair.legend(fontsize=8)
    n, b = data["settings"]["samples"], data["settings"]["batch"]
    fig.suptitle(f"var-ref, {n} seeded samples ({n // 16 if n >= 16 else '<1'} per class, {b} per call), cfg "
                 f"{data['settings']['cfg']}, top-p {data['settings']['top_p']}: fidelity vs executed FLOPs",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


GRID_PER_CLASS = 2


def plot_grid(dense: torch.Tensor, columns: dict[str, torch.Tensor], labels: Sequence[int], class_names: Sequence[str],
              path: Path, per_class: int = GRID_PER_CLASS, thumb: int = 100) -> None:
    """Per class: a training image (procedural data set, seed 0), then for each of its first ``per_class``
    samples the dense generation and each method of ``columns`` (same label and seed)."""
    from PIL import Image, ImageDraw

    from toprovar_fx.data import make_sample

    def to_u8(t: torch.Tensor) -> torch.Tensor:
        return t if t.dtype == torch.uint8 else (t.clamp(0, 1) * 255).round().to(torch.uint8)

    def paste(canvas: Image.Image, arr: Any, x: int, y: int) -> None:
        canvas.paste(Image.fromarray(arr).resize((thumb, thumb), Image.BILINEAR), (x, y))

    dense = to_u8(dense)
    cols = {k: to_u8(v) for k, v in columns.items()}
    names = ["dense", *cols]
    ncls = len(class_names)
    picks = [[i for i, lab in enumerate(labels) if lab == c][:per_class] for c in range(ncls)]
    sample_w = len(names) * thumb + 6
    group_w = thumb + 10 + per_class * sample_w
    per_row, gap, label_h, head = 2, 24, 14, 34
    nrows = math.ceil(ncls / per_row)
    canvas = Image.new("RGB", (per_row * group_w + (per_row - 1) * gap, head + nrows * (thumb + label_h + 8)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), "per class: a training image (data), then per sample (same label and seed): "
              + " | ".join(names), fill="black")
    draw.text((4, 16), "var-ref samples, cfg 2.0, top-p 0.9; toprovar = the calibrated policy and its strongest "
              "budget", fill="black")
    for c in range(ncls):
        r, k = divmod(c, per_row)
        x0, y0 = k * (group_w + gap), head + r * (thumb + label_h + 8)
        draw.text((x0 + 2, y0), f"{c}: {class_names[c]}", fill="black")
        paste(canvas, make_sample(0, c)[0], x0, y0 + label_h)
        for j, idx in enumerate(picks[c]):
            xs = x0 + thumb + 10 + j * sample_w
            for m, name in enumerate(names):
                src = dense[idx] if name == "dense" else cols[name][idx]
                paste(canvas, src.permute(1, 2, 0).numpy(), xs + m * thumb, y0 + label_h)
    canvas.save(path)


def _fmt(x: Any, spec: str) -> str:
    if x is None:
        return "n/a"
    if x in ("inf", "-inf") or (isinstance(x, float) and math.isinf(x)):
        return "inf"
    return format(x, spec)


def markdown_table(summary: Sequence[dict[str, Any]], matches: dict[str, Any]) -> str:
    """The per-method table of fidelity.md (from JSON-able summary rows)."""
    lines = ["| method | budget | FLOP ratio | SSIM mean +- std (95% CI of the mean) | PSNR dB pooled / median | "
             "token agreement (last scale) | identical images | kept tokens vs toprovar |",
             "|---|---|---|---|---|---|---|---|"]
    for r in summary:
        m = matches.get(r["label"])
        match = "-" if m is None else (f"{m['cells_equal'] * 100:.1f}% of (sample, scale, layer) equal, "
                                       f"sum abs diff {m['abs_diff_over_total'] * 100:.2f}%")
        lines.append(
            f"| {r['family']} | {r['budget']} | {r['flop_ratio']:.3f} | {r['ssim_mean']:.4f} +- {r['ssim_std']:.4f} "
            f"(+-{r['ssim_ci95']:.4f}) | {_fmt(r['psnr_pooled'], '.2f')} / {_fmt(r['psnr_median'], '.2f')} | "
            f"{_fmt(r['token_agreement'], '.3f')} | {r['identical_images']}/{r['samples']} | {match} |")
    return "\n".join(lines)


def per_class_table(data: dict[str, Any], cols: Sequence[str], class_names: Sequence[str]) -> str:
    """Mean SSIM per class for the given method labels."""
    labels = [s["label"] for s in data["samples"]]
    per = data["per_sample"]
    cols = [k for k in cols if k in per]
    lines = ["| class | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for c, name in enumerate(class_names):
        idx = [i for i, lab in enumerate(labels) if lab == c]
        if idx:
            cells = [f"{statistics.fmean(per[k]['ssim'][i] for i in idx):.3f}" for k in cols]
            lines.append(f"| {c} {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Mean of the per-sample differences ``a - b`` and its 95% CI half-width (normal approximation)."""
    d = [x - y for x, y in zip(a, b)]
    sd = statistics.stdev(d) if len(d) > 1 else 0.0
    return statistics.fmean(d), 1.96 * sd / math.sqrt(len(d))


def paired_table(data: dict[str, Any]) -> str:
    """Paired SSIM / PSNR differences, toprovar minus random and minus frequency, at each budget."""
    per = data["per_sample"]
    lines = ["| budget | SSIM toprovar - random | SSIM toprovar - frequency | PSNR toprovar - random (dB, median "
             "of pairs) | PSNR toprovar - frequency (dB, median of pairs) |", "|---|---|---|---|---|"]
    any_row = False
    for b in data["settings"]["budgets"]:
        t = per.get(f"toprovar:{b}")
        if t is None:
            continue
        cells = []
        for other in ("random", "frequency"):
            o = per.get(f"{other}:{b}")
            cells.append("n/a" if o is None else "{:+.4f} +- {:.4f}".format(*paired(t["ssim"], o["ssim"])))
        for other in ("random", "frequency"):
            o = per.get(f"{other}:{b}")
            if o is None:
                cells.append("n/a")
                continue
            diffs = [float(x) - float(y) for x, y in zip(t["psnr"], o["psnr"]) if x != "inf" and y != "inf"]
            cells.append(f"{statistics.median(diffs):+.2f}" if diffs else "n/a")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
        any_row = True
    return "\n".join(lines) if any_row else ""


# ToProVAR against the peer operating point nearest to it in FLOPs, on the same samples.
PEER_PAIRS = (("toprovar:fastest", "fastvar:released"), ("toprovar:fastest", "skipvar:fast"),
              ("toprovar:calibrated", "fastvar:hart_ratios"), ("toprovar:strong", "skipvar:balanced"))


def peer_table(data: dict[str, Any]) -> str:
    """Paired SSIM / PSNR differences of toprovar budgets against the peers' nearby operating points."""
    per = data["per_sample"]
    flops = {r["label"]: r["flop_ratio"] for r in data["summary"]}
    lines = ["| toprovar | peer | FLOP ratio toprovar / peer | SSIM toprovar - peer | PSNR toprovar - peer (dB, "
             "median of pairs) | samples toprovar closer (SSIM) |", "|---|---|---|---|---|---|"]
    rows = 0
    for a, b in PEER_PAIRS:
        if a not in per or b not in per:
            continue
        ta, tb = per[a], per[b]
        diffs = [float(x) - float(y) for x, y in zip(ta["psnr"], tb["psnr"]) if x != "inf" and y != "inf"]
        closer = sum(x > y for x, y in zip(ta["ssim"], tb["ssim"]))
        psnr_cell = f"{statistics.median(diffs):+.2f}" if diffs else "n/a"
        ssim_cell = "{:+.4f} +- {:.4f}".format(*paired(ta["ssim"], tb["ssim"]))
        lines.append(f"| `{a}` | `{b}` | {flops[a]:.3f} / {flops[b]:.3f} | {ssim_cell} | {psnr_cell} | "
                     f"{closer}/{len(ta['ssim'])} |")
        rows += 1
    return "\n".join(lines) if rows else ""


ANALYSIS_START, ANALYSIS_END = "<!-- analysis:start -->", "<!-- analysis:end -->"


def write_markdown(data: dict[str, Any], path: Path, class_names: Sequence[str]) -> None:
    """fidelity.md from the fidelity.json data; the analysis between the markers of an existing file is kept."""
    settings, env = data["settings"], data["environment"]
    analysis = f"{ANALYSIS_START}\n(analysis not written yet)\n{ANALYSIS_END}"
    if path.exists():
        old = path.read_text(encoding="utf-8")
        if ANALYSIS_START in old and ANALYSIS_END in old:
            analysis = old[old.index(ANALYSIS_START):old.index(ANALYSIS_END) + len(ANALYSIS_END)]
    per = data["per_sample"]
    cols = [f"{f}:calibrated" for f in ("toprovar", "random", "frequency")]
    cols += ["fastvar:hart_ratios", "skipvar:quality", "skipvar:balanced", "resample:last1"]
    fallbacks = [f"* `{r['label']}`: {f}" for r in data["summary"] for f in r.get("fallbacks", ())]
    pt = paired_table(data)
    paired_text = "" if not pt else f"""Paired differences on the same samples (mean +- 95% CI; positive = toprovar closer to dense):

{pt}

"""
    peers = peer_table(data)
    if peers:
        paired_text += f"""Against the peers' operating points nearest in FLOPs, on the same samples (mean +- 95% CI of the
paired SSIM difference; positive = toprovar closer to dense):

{peers}

"""
    n_dense = len(per) and data["settings"]["samples"]
    # a run with --no-pictures draws neither picture: link only what is there
    figure = ("![fidelity vs FLOP ratio](fidelity.png)" if (path.parent / "fidelity.png").exists()
              else "(no figure: this run was made with `--no-pictures`)")
    samples = "" if not (path.parent / "fidelity_grid.png").exists() else f"""## Samples

![dense next to toprovar](fidelity_grid.png)

`fidelity_grid.png`: for every class a training image (procedural data set, seed 0; not the same
sample), then its first {GRID_PER_CLASS} benchmark samples, each as dense | toprovar at the calibrated budget |
toprovar at its strongest budget (same label and seed).

"""
    text = f"""# Fidelity vs executed FLOPs on the trained reference model (issue 7)

Generated by `python benchmarks/fidelity.py` ({' '.join(settings['argv']) or 'default flags'}) on {DATE}.
Machine: {env['cpu']}, {env['cpu_count']} cores ({env['threads']} torch thread(s)), {env['platform']};
Python {env['python']}, torch {env['torch']}, float32, CPU. Model `var-ref` (VAR-style, depth 8, width
288, 6 heads, 16 procedural classes, 256 px, 10 scales). {n_dense} seeded samples: sample `i` has
class `i % 16` ({n_dense // 16 if n_dense >= 16 else '<1'} per class), {settings['batch']} per sampler call
(`g_seed = {settings['seed']} + call index`), cfg {settings['cfg']}, top-p {settings['top_p']}; every method
generates the same labels and seeds as the dense (eager, uncompiled) reference. Total wall time
{settings['wall_s'] / 60:.1f} min.

* SSIM, PSNR: decoded image vs the dense image of the same sample (`toprovar_fx.metrics`); PSNR pooled
  = `10 log10(1 / mean MSE)` over samples (finite even when some images are identical), median =
  median of per-image PSNR.
* Token agreement: arg-max of the guided logits at the last scale (16x16) vs dense's; `n/a` when the
  last scale is skipped.
* FLOP ratio: executed / dense transformer FLOPs as the backend accounts them
  (`last_generation().flops_*`, summed over samples; the VQ decoder and sampling are not counted).
* `resample:lastk` is a reference line, not a method: the dense eager sampler with the tokens of its
  last k scales drawn from an independent generator (FLOP ratio 1 by construction). It is how far
  two equally valid samples that share the first scales are apart: any method that changes the
  logits of those scales resamples (some of) their tokens.
* `random`, `frequency`: the toprovar policy of the same budget with only `token.selection`
  changed; the last column compares the tokens every (sample, scale, layer) block actually ran on
  with toprovar's.

Policies: `toprovar:calibrated` is `benchmarks/results/var-ref-calibrated.yaml`, written by
`toprovar calibrate`'s function (`calibrate_policy`) on {settings.get('calibration_items', 32)} class labels
(seeds from 1000, disjoint from the benchmark's) with `layer.beta` {settings['calibration_beta']} in the base
policy; the other toprovar budgets change `scale.tau` and `token.alpha_max` / `min_keep_ratio` on top
of it (`TOPROVAR_BUDGETS` in the script); fastvar and skipvar are the shipped
`var-tiny-fastvar-released` / `var-tiny-skipvar` policies transposed onto var-ref (every policy in
full in `fidelity.json`).

## Results

{markdown_table(data['summary'], data['kept_budget_match'])}

{figure}

{paired_text}Mean SSIM per class:

{per_class_table(data, cols, class_names)}

Fallbacks reported by the backend: {'none' if not fallbacks else ''}
{chr(10).join(fallbacks)}

{_pooled_section(data)}{samples}
## Reproduce

```bash
python benchmarks/fidelity.py --pooled-batch 8   # everything above (~21 min on this 2-core CPU, 1 thread)
python benchmarks/fidelity.py --calibrate --pooled-batch 8   # the same after re-running the calibration (+ ~1 min)
python benchmarks/fidelity.py --grid-only        # fidelity_grid.png only (~70 s; the same images)
python benchmarks/fidelity.py --render-only      # fidelity.md and fidelity.png from fidelity.json
python -m pytest tests/benchmarks                # the CI-size machinery check (~30 s)
```

With the `toprovar` command: `toprovar bench --model var-ref --policies
dense,benchmarks/results/var-ref-calibrated.yaml` measures latency, FLOP ratio and the fidelity of one
sample; `toprovar calibrate --model var-ref --classes 32 --seed 1000 --base var-ref --name
var-ref-calibrated --out X.yaml` repeats the calibration. Both sample var-ref as this benchmark does
(cfg 2.0, top-p 0.9: the settings its checkpoint records, their default for this model; `--cfg`,
`--top-p`, `--top-k` override them), and `--calibrate` here passes the same values to
`calibrate_policy`.

## Ordering and explanation

{analysis}
"""
    path.write_text(text, encoding="utf-8")


def _pooled_section(data: dict[str, Any]) -> str:
    pooled = data.get("pooled_batch")
    if pooled is None:
        return ""
    b, n, seed = pooled["batch"], data["settings"]["samples"], data["settings"]["seed"]
    return f"""### Decisions pooled over a batch ({b} images per call)

The same {n} labels, generated {b} per sampler call (`g_seed = {seed} + call index`), against a dense
reference generated the same way (so the samples differ from the table above). The runtime takes
one decision per call: `rho_s` and `D` from the entropy averaged over all {2 * b} rows (CFG doubles
them), one kept count per layer, and with `token.cfg: shared` one set of kept positions for every
image of the call. `frequency` scores each row on its own.

{markdown_table(pooled['summary'], pooled['kept_budget_match'])}

"""


# ---------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmarks/fidelity.py",
        description=("Fidelity (SSIM, PSNR, last-scale token agreement vs the dense model) against the executed "
                     "FLOP ratio, for ToProVAR (calibrated policy at several budgets), random and frequency "
                     "token selection at ToProVAR's kept-token budget, FastVAR and SkipVAR, on the trained "
                     "var-ref model. Writes fidelity.md, fidelity.json, fidelity.png and fidelity_grid.png."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--samples", type=int, default=64, help="seeded samples (class i %% 16), a multiple of --batch")
    p.add_argument("--batch", type=int, default=1,
                   help="images per sampler call. 1 = per-sample decisions as ToProVAR is designed: the runtime "
                        "pools entropy over all rows of a call (rho_s, D and, with token.cfg shared, the kept "
                        "positions are one per call)")
    p.add_argument("--pooled-batch", type=int, default=0, metavar="B",
                   help="also run dense, toprovar and frequency at the calibrated budget with B images "
                        "per call (a separate dense reference), to show what pooling decisions over a batch costs")
    p.add_argument("--seed", type=int, default=0, help="g_seed of the first batch (batch b uses seed + b)")
    p.add_argument("--methods", default=",".join(FAMILIES),
                   help=f"comma-separated method families out of {', '.join(FAMILIES)} (dense always runs)")
    p.add_argument("--budgets", default=",".join(TOPROVAR_BUDGETS),
                   help="toprovar budgets (also used by random and frequency)")
    p.add_argument("--policy", default=str(CALIBRATED.relative_to(ROOT)),
                   help="calibrated ToProVAR policy YAML (written by --calibrate)")
    p.add_argument("--calibrate", action="store_true",
                   help="(re)run the calibration first and write --policy (+ .calibration.json/.png)")
    p.add_argument("--calibration-items", type=int, default=32, help="class labels for --calibrate")
    p.add_argument("--calibration-seed", type=int, default=1000, help="seed of the first calibration item")
    p.add_argument("--cfg", type=float, default=2.0, help="classifier-free guidance at the last scale")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling threshold (0 = off)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default=str(RESULTS.relative_to(ROOT)), help="output directory")
    p.add_argument("--no-pictures", action="store_true", help="skip fidelity.png and fidelity_grid.png")
    p.add_argument("--grid-only", action="store_true",
                   help=f"only regenerate fidelity_grid.png: dense and the two toprovar columns for the first "
                        f"{GRID_PER_CLASS} samples of every class (the same images as in the full run)")
    p.add_argument("--render-only", action="store_true",
                   help="generate nothing: rewrite fidelity.md and fidelity.png from OUT/fidelity.json (keeps the "
                        "analysis section of fidelity.md)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if args.render_only:
        data = json.loads((out / "fidelity.json").read_text(encoding="utf-8"))
        if not args.no_pictures:
            plot_fidelity(data, out / "fidelity.png")
        write_markdown(data, out / "fidelity.md", toprovar_fx.data.class_names())
        print(f"rewrote {out}/fidelity.md" + ("" if args.no_pictures else " and fidelity.png"))
        return 0
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    sampling = Sampling(cfg=args.cfg, top_p=args.top_p)
    model = load_model()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", flush=True)

    policy_path = Path(args.policy)
    if args.calibrate or not policy_path.exists():
        log(f"calibrating on {args.calibration_items} class labels -> {policy_path}")
        calibrated = calibrate(model, policy_path, items=args.calibration_items, seed=args.calibration_seed,
                               sampling=sampling)
    else:
        calibrated = load_policy(policy_path)
    families = [f.strip() for f in args.methods.split(",") if f.strip()]
    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    methods = build_methods(model, calibrated, families, budgets)
    strongest = f"toprovar:{budgets[-1]}"
    grid_cols = [k for k in ("toprovar:calibrated", strongest) if any(m.label == k for m in methods)]
    class_names = toprovar_fx.data.class_names()
    if args.grid_only:
        n = GRID_PER_CLASS * len(class_names)
        res = run_fidelity(model, [m for m in methods if m.label in grid_cols], samples=n, batch=args.batch,
                           seed=args.seed, sampling=sampling, keep_images=grid_cols, log=log)
        labels = [int(x) for lab, _ in res["plan"] for x in lab.tolist()]
        plot_grid(res["dense"].images, {k: res["runs"][k].images for k in grid_cols}, labels, class_names,
                  out / "fidelity_grid.png")
        log(f"wrote {out}/fidelity_grid.png")
        return 0
    result = run_fidelity(model, methods, samples=args.samples, batch=args.batch, seed=args.seed,
                          sampling=sampling, keep_images=grid_cols, log=log)
    pooled = None
    if args.pooled_batch:
        sub = [m for m in methods if m.budget == "calibrated" and m.family in ("toprovar", "frequency")]
        log(f"pooled: {len(sub)} methods with {args.pooled_batch} images per call")
        pooled = run_fidelity(model, sub, samples=args.samples, batch=args.pooled_batch, seed=args.seed,
                              sampling=sampling, log=lambda msg: log(f"pooled batch {args.pooled_batch}: {msg}"))
    settings = {"argv": list(argv if argv is not None else sys.argv[1:]), "samples": args.samples,
                "batch": args.batch, "seed": args.seed, "cfg": args.cfg, "top_p": args.top_p,
                "policy": str(policy_path), "methods": families, "budgets": budgets,
                "toprovar_budgets": {b: TOPROVAR_BUDGETS[b] for b in budgets},
                "calibration_beta": CALIBRATION_BETA, "calibration_items": args.calibration_items,
                "pooled_batch": args.pooled_batch,
                "wall_s": time.perf_counter() - t0}
    settings["wall_s"] = time.perf_counter() - t0
    data = write_json(result, out / "fidelity.json", settings, pooled)
    if not args.no_pictures:
        plot_fidelity(data, out / "fidelity.png")
        labels = [int(x) for lab, _ in result["plan"] for x in lab.tolist()]
        runs = result["runs"]
        plot_grid(result["dense"].images, {k: runs[k].images for k in grid_cols}, labels, class_names,
                  out / "fidelity_grid.png")
    write_markdown(data, out / "fidelity.md", class_names)
    log(f"wrote {out}/fidelity.md, .json" + ("" if args.no_pictures else ", .png, _grid.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
