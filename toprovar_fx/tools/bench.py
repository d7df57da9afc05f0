"""``toprovar bench``: latency, speedup, FLOPs, fidelity and memory of policies against dense.

Protocol (every number in the output says what it is):

* Variants: ``dense`` (the eager sampler, the baseline), ``observe`` (the backend with attention
  rewritten to FAE and nothing pruned: the backend's own overhead) and policies (``NAME``,
  ``NAME:PRESET`` or a YAML path). Each compiled variant is its own ``torch.compile`` call.
* Per batch size: the first call of every variant is timed alone (``first_call_s``: Dynamo
  tracing, the toprovar passes, Inductor on CUDA, and one generation); then ``warmup``
  untimed rounds; then ``runs`` timed rounds, the variants *interleaved* in each round (the
  order rotates per round) so that all see the same machine state. Latency is the median and
  the minimum of the timed calls; throughput is ``batch / median``.
* Timer: ``time.perf_counter`` on CPU; on CUDA ``torch.cuda.Event`` pairs around the call,
  with ``torch.cuda.synchronize()`` after it. What one call includes is the model adapter's
  ``timing_scope`` (text encoding is done before timing).
* Sampling: a zoo model samples with the settings its checkpoint records, else the tool's
  defaults, each overridable (``cfg`` / ``top_p`` / ``top_k``; ``calibrate.sampling_for``); every
  variant, dense included, samples the same way.
* Fidelity of the last timed call against dense's (same seed, same conditions): SSIM and PSNR
  of the decoded images, token agreement (arg-max of the guided logits) per scale.
* FLOP ratio: the backend's executed/dense accounting of the last timed call (1 for dense).
* Memory: peak ``torch.cuda.max_memory_allocated`` over a variant's timed calls (weights
  included; "n/a" on CPU). K/V cache: after all timed calls, one extra untimed call per variant
  reads every module attribute ``cached_k`` / ``cached_v`` at its largest (each such module's
  ``kv_caching`` is wrapped to read the cache just before the sampler clears it; the wrapper
  changes what Dynamo guards on, hence outside the timing); the runtime's estimate from the
  kept counts is reported next to it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from toprovar_fx.policies import Policy, PolicyError

from .calibrate import apply_sampling, check_sampling, describe_sampling
from .models import ModelAdapter, ToolError, load_model, load_policy_arg
from .progress import progress

__all__ = ["BenchResult", "Variant", "bench_policies", "environment", "parse_variants"]

SCHEMA = "toprovar-bench/1"


@dataclass
class Variant:
    """One column of the benchmark."""

    label: str
    kind: str  # dense | observe | policy
    policy: Policy | None = None


def parse_variants(spec: str | Sequence[str]) -> list[Variant]:
    """``"dense,observe,var-tiny,var-tiny:fast,my.yaml"`` -> variants; ``dense`` is added first if missing."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not items:
        raise ToolError("--policies is empty; e.g. --policies dense,var-tiny")
    out: list[Variant] = []
    for item in items:
        if item == "dense":
            out.append(Variant("dense", "dense"))
            continue
        if item == "observe":
            out.append(Variant("observe", "observe"))
            continue
        try:
            pol = load_policy_arg(item)
        except PolicyError as e:
            raise ToolError(str(e)) from None
        out.append(Variant(item, "policy", pol))
    labels = [v.label for v in out]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ToolError(f"--policies lists {dup} more than once")
    if out[0].kind != "dense":
        out = [v for v in out if v.kind != "dense"]
        out.insert(0, Variant("dense", "dense"))
    return out


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def model_bench_parser(doc: str, out_file: str) -> argparse.ArgumentParser:
    """The arguments every one-model GPU benchmark script takes: ``--out`` (folder of ``out_file``),
    ``--model`` (a zoo name, Infinity-2B by default), ``--device``; ``doc``'s first paragraph describes it."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--out", required=True, help=f"folder for {out_file}")
    ap.add_argument("--model", default="infinity-2b")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    return ap


def write_markdown(folder: str | Path, name: str, text: str) -> Path:
    """Write a benchmark's Markdown ``text`` to ``folder/name`` (folder created) and print it."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(text)
    print(text)
    return path


def environment(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """What the numbers were measured on."""
    env: dict[str, Any] = {
        "device": device.type,
        "gpu": None,
        "cuda": torch.version.cuda,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "toprovar_fx": _version("toprovar_fx"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "dtype": str(dtype).replace("torch.", ""),
    }
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        env["gpu"] = torch.cuda.get_device_name(idx)
        props = torch.cuda.get_device_properties(idx)
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return env


class _Timer:
    """Wall time of one call: perf_counter on CPU, CUDA events (and a synchronize) on GPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.name = "torch.cuda.Event (synchronised after each call)" if self.cuda else "time.perf_counter"

    def time(self, fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
        """Seconds taken by ``fn(*args)``, and its result."""
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(*args)
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3, out
        t0 = time.perf_counter()
        out = fn(*args)
        return time.perf_counter() - t0, out


class _KVProbe:
    """Largest bytes held by the modules' ``cached_k`` / ``cached_v`` during one generation.

    Samplers clear their caches when they finish (``kv_caching(False)``), so the probe wraps
    each such module's ``kv_caching`` to read the cache just before it is cleared, and reads
    what is left after the call. The reading runs outside Dynamo (``torch.compiler.disable``:
    under tracing the cache shapes are symbolic). Installing it changes what Dynamo guards on,
    so it is used only for an extra, untimed call.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.mods = [m for m in model.modules() if hasattr(m, "cached_k") and hasattr(m, "cached_v")]
        self.peak: dict[int, int] = {}
        self._read = torch.compiler.disable(self._read_eager)

    def _read_eager(self, i: int, m: torch.nn.Module) -> None:
        total = sum(int(t.nbytes) for t in (m.cached_k, m.cached_v) if isinstance(t, torch.Tensor))
        self.peak[i] = max(self.peak.get(i, 0), total)

    def __enter__(self) -> _KVProbe:
        for i, m in enumerate(self.mods):
            orig = getattr(m, "kv_caching", None)
            if callable(orig) and "kv_caching" not in m.__dict__:
                def wrapped(*a: Any, _i: int = i, _m: torch.nn.Module = m, _o: Callable = orig, **k: Any) -> Any:
                    self._read(_i, _m)
                    return _o(*a, **k)

                m.__dict__["kv_caching"] = wrapped
        return self

    def __exit__(self, *exc: object) -> None:
        for i, m in enumerate(self.mods):
            self._read_eager(i, m)
            m.__dict__.pop("kv_caching", None)

    @property
    def bytes(self) -> int | None:
        """Bytes at the cache's largest (None when the model has no such cache)."""
        return sum(self.peak.values()) if self.mods and any(self.peak.values()) else None


def _kv_estimate(report: Any, width: int, item_bytes: int) -> float:
    """K/V bytes at the end of a generation from the report's per-layer actions and kept counts."""
    total_tokens = 0
    for s in report.scales:
        for lr in s.layers:
            if lr.action == "skip":
                continue
            total_tokens += s.tokens if lr.kept_tokens is None else lr.kept_tokens
    return float(total_tokens * report.rows * 2 * width * item_bytes)


@dataclass
class BenchResult:
    """All numbers of one ``toprovar bench`` run (``to_dict`` follows ``SCHEMA``)."""

    environment: dict[str, Any]
    settings: dict[str, Any]
    results: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "environment": self.environment, "settings": self.settings,
                "results": self.results, "notes": self.notes}

    def to_markdown(self) -> str:
        """The Markdown report: what was measured, on what, then the table."""
        env, st = self.environment, self.settings
        where = env["gpu"] if env["device"] == "cuda" else f"CPU {env['cpu']} ({env['cpu_threads']} threads)"
        lines = [
            f"# toprovar bench: {st['model']}",
            "",
            f"* machine: {where}; torch {env['torch']}, triton {env['triton'] or 'not installed'}, "
            f"CUDA {env['cuda'] or 'n/a'}, Python {env['python']}",
            f"* model: {st['model']} {st['fingerprint']}, dtype {env['dtype']}, schedule {st['schedule']}, "
            f"images {st['resolution']}",
            f"* batch sizes {st['batches']} (transformer batch = {st['cfg_rows']} x batch: classifier-free "
            "guidance doubles it); latency is batch 1, throughput batch N",
            f"* timed: {st['timing_scope']}",
            f"* timer: {st['timer']}; {st['runs']} timed runs after {st['warmup']} warm-up, variants interleaved; "
            "first call (compile + one generation) reported separately",
            f"* condition {st['condition']!r}, seed {st['seed']}; sampling: {describe_sampling(st.get('sampling'))}",
            "",
            "| variant | batch | median ms | min ms | speedup | img/s | FLOP ratio | SSIM | PSNR dB | "
            "token agr. (last scale) | peak mem MiB | K/V cache MiB | first call s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.results:
            fid = r["fidelity"]
            agr = fid["token_agreement"]
            mem = "n/a" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**20:.0f}"
            kv = "n/a" if r["kv_cache_bytes"] is None else f"{r['kv_cache_bytes'] / 2**20:.2f}"
            psnr = "identical" if fid["psnr_db"] is None else f"{fid['psnr_db']:.2f}"
            agr_txt = f"{agr[-1]:.3f}" if agr else "n/a"
            lines.append(
                f"| {r['variant']} | {r['batch']} | {r['latency_ms']['median']:.1f} | {r['latency_ms']['min']:.1f} | "
                f"{r['speedup']:.2f}x | {r['throughput_img_s']:.2f} | {r['flop_ratio']:.3f} | {fid['ssim']:.4f} | "
                f"{psnr} | {agr_txt} | {mem} | {kv} | {r['first_call_s']:.2f} |")
        lines.append("")
        lines.append("Token agreement with dense per scale (1-based):")
        lines.append("")
        n = max((len(r["fidelity"]["token_agreement"]) for r in self.results), default=0)
        if n:
            lines.append("| variant | batch | " + " | ".join(str(i + 1) for i in range(n)) + " |")
            lines.append("|---|---:|" + "---:|" * n)
            for r in self.results:
                agr = r["fidelity"]["token_agreement"]
                lines.append(f"| {r['variant']} | {r['batch']} | " + " | ".join(f"{a:.3f}" for a in agr) + " |")
        if self.notes:
            lines.append("")
            lines.extend(f"* note: {n_}" for n_ in self.notes)
        return "\n".join(lines) + "\n"


def bench_policies(
    model: str | ModelAdapter,
    variants: str | Sequence[str] | Sequence[Variant],
    *,
    runs: int = 5,
    warmup: int = 1,
    batches: Sequence[int] = (1,),
    condition: Any | None = None,
    seed: int = 0,
    resolution: str | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    out: str | Path | None = None,
    kv_probe: bool = True,
    dynamic: bool | None = None,
    cfg: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    show_progress: bool = False,
) -> BenchResult:
    """Benchmark ``variants`` on ``model`` (module docstring); with ``out`` write bench.md and bench.json.

    ``cfg`` / ``top_p`` / ``top_k``: sampling overrides (``None``: the checkpoint's recorded settings,
    else the tool's defaults); a :class:`ModelAdapter` passed in keeps its own ``run`` unless one is
    given."""
    if runs < 1:
        raise ToolError("--runs must be >= 1")
    if warmup < 0:
        raise ToolError("--warmup must be >= 0")
    if not batches or any(int(b) < 1 for b in batches):
        raise ToolError("--batch sizes must be >= 1")
    check_sampling(cfg, top_p, top_k)
    vs = parse_variants(variants) if not (variants and isinstance(list(variants)[0], Variant)) else list(variants)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ToolError("--device cuda: CUDA is not available")
    adapter = load_model(model, device=dev, dtype=dtype, seed=seed)
    if not (isinstance(model, ModelAdapter) and cfg is None and top_p is None and top_k is None):
        apply_sampling(adapter, cfg=cfg, top_p=top_p, top_k=top_k)
    adapter.set_schedule(resolution)
    timer = _Timer(dev)
    fp = adapter.fingerprint or {}
    width = int(fp.get("width") or 0)
    item_bytes = torch.empty((), dtype=dtype).element_size()
    res = BenchResult(environment=environment(dev, dtype), settings={})
    compiled = sum(v.kind != "dense" for v in vs)
    # every compiled variant adds its own Dynamo cache entries for the same code objects
    limit = 64 * max(compiled, 1) * len(batches)
    steps = len(batches) * len(vs) * (1 + warmup + runs + (1 if kv_probe else 0))
    return _bench(adapter, vs, res, kv_probe, timer, runs=runs, warmup=warmup, batches=batches, condition=condition,
                  seed=seed, dev=dev, dynamic=dynamic, limit=limit, steps=steps, width=width, item_bytes=item_bytes,
                  fp=fp, out=out, show_progress=show_progress)


def _bench(adapter: ModelAdapter, vs: list[Variant], res: BenchResult, kv_probe: bool, timer: _Timer, *,
           runs: int, warmup: int, batches: Sequence[int], condition: Any, seed: int, dev: torch.device,
           dynamic: bool | None, limit: int, steps: int, width: int, item_bytes: int, fp: dict[str, Any],
           out: str | Path | None, show_progress: bool) -> BenchResult:
    """The measuring loop of :func:`bench_policies` (arguments checked there)."""
    import json

    import toprovar_fx
    from toprovar_fx.metrics import psnr, ssim, token_agreement

    resolution_px = None
    with progress(steps, "bench", show_progress) as bar:
        for batch in batches:
            batch = int(batch)
            prepared = adapter.prepare(adapter.conditions(condition, batch))
            fns: dict[str, Callable[..., Any]] = {}
            for v in vs:
                if v.kind == "dense":
                    fns[v.label] = adapter.sampler
                else:
                    opts: dict[str, Any] = {"recompile_limit": limit}
                    if v.kind == "observe":
                        opts.update(mode="observe", schedules=adapter.schedules or {})
                    else:
                        opts["policy"] = v.policy.to_dict()
                    fns[v.label] = torch.compile(adapter.sampler, backend="toprovar", options=opts,
                                                 dynamic=dynamic)
            first: dict[str, float] = {}
            backend_compile: dict[str, float] = {}
            for v in vs:
                bar.set_note(f"batch {batch}: first call of {v.label}" + (" (compiling)" if v.kind != "dense" else ""))
                t, _ = timer.time(adapter.generate, fns[v.label], prepared, seed)
                first[v.label] = t
                if v.kind != "dense":
                    rep = toprovar_fx.last_generation()
                    backend_compile[v.label] = rep.compile_seconds if rep is not None else 0.0
                bar.update()
            for w in range(warmup):
                for v in vs:
                    bar.set_note(f"batch {batch}: warm-up {w + 1}/{warmup} {v.label}")
                    adapter.generate(fns[v.label], prepared, seed)
                    bar.update()
            times: dict[str, list[float]] = {v.label: [] for v in vs}
            last: dict[str, Any] = {}
            reports: dict[str, Any] = {}
            recompiles: dict[str, int] = {v.label: 0 for v in vs}
            peak: dict[str, int | None] = {v.label: None for v in vs}
            kv_measured: dict[str, int | None] = {v.label: None for v in vs}
            for r in range(runs):
                order = vs[r % len(vs):] + vs[: r % len(vs)]
                for v in order:
                    bar.set_note(f"batch {batch}: run {r + 1}/{runs} {v.label}")
                    if dev.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(dev)
                    t, gen = timer.time(adapter.generate, fns[v.label], prepared, seed)
                    if dev.type == "cuda":
                        peak[v.label] = max(peak[v.label] or 0, int(torch.cuda.max_memory_allocated(dev)))
                    times[v.label].append(t)
                    last[v.label] = gen
                    if v.kind != "dense":
                        rep = toprovar_fx.last_generation()
                        reports[v.label] = rep
                        recompiles[v.label] += rep.compiles if rep is not None else 0
                    bar.update()
            for v in vs if kv_probe else ():  # after every timed call: the probe changes Dynamo's guards
                bar.set_note(f"batch {batch}: K/V probe {v.label} (untimed)")
                with _KVProbe(adapter.model) as probe:
                    adapter.generate(fns[v.label], prepared, seed)
                kv_measured[v.label] = probe.bytes
                bar.update()
            dense = last["dense"]
            resolution_px = f"{dense.images.shape[-2]}x{dense.images.shape[-1]}"
            med_dense = statistics.median(times["dense"])
            rows = adapter.cfg_rows * batch
            total_tokens = sum(h * w for h, w in ((adapter.schedules or {}).get(adapter.schedule or "", []) or []))
            kv_dense_est = float(total_tokens * rows * 2 * width * item_bytes * int(fp.get("depth") or 0))
            for v in vs:
                ts = times[v.label]
                gen = last[v.label]
                a, b = gen.images.float().cpu(), dense.images.float().cpu()
                p = psnr(a, b)
                agr = []
                if gen.logits is not None and dense.logits is not None:
                    agr = [token_agreement(x.float().cpu(), y.float().cpu()) for x, y in zip(gen.logits, dense.logits)]
                rep = reports.get(v.label)
                med = statistics.median(ts)
                res.results.append({
                    "variant": v.label,
                    "kind": v.kind,
                    "policy": None if v.policy is None else v.policy.name,
                    "preset": None if v.policy is None else v.policy.preset,
                    "batch": batch,
                    "rows": rows,
                    "latency_ms": {"median": 1e3 * med, "min": 1e3 * min(ts), "all": [1e3 * t for t in ts]},
                    "throughput_img_s": batch / med,
                    "speedup": med_dense / med,
                    "first_call_s": first[v.label],
                    "backend_compile_s": backend_compile.get(v.label),
                    "recompiles_in_timed_runs": recompiles[v.label],
                    "flop_ratio": 1.0 if rep is None else rep.flop_ratio,
                    "gflops_executed": None if rep is None else rep.flops_executed / 1e9,
                    "gflops_dense": None if rep is None else rep.flops_dense / 1e9,
                    "start_scale": None if rep is None else rep.start_scale,
                    "fallbacks": [] if rep is None else list(rep.fallbacks),
                    "fidelity": {"ssim": ssim(a, b), "psnr_db": None if math.isinf(p) else p,
                                 "token_agreement": agr},
                    "peak_memory_bytes": peak[v.label],
                    "kv_cache_bytes": kv_measured[v.label],
                    "kv_cache_estimate_bytes": (kv_dense_est if rep is None else _kv_estimate(rep, width, item_bytes))
                    if width else None,
                })
                if rep is not None and rep.fallbacks:
                    note = f"{v.label}: " + "; ".join(dict.fromkeys(rep.fallbacks))  # each message once
                    if note not in res.notes:
                        res.notes.append(note)
                if recompiles[v.label]:
                    res.notes.append(f"{v.label} at batch {batch}: {recompiles[v.label]} graph(s) compiled during "
                                     "the timed runs (their time is inside the latency)")
    res.settings = {
        "model": adapter.name,
        "family": adapter.family,
        "fingerprint": fp,
        "schedule": adapter.schedule,
        "resolution": resolution_px,
        "batches": [int(b) for b in batches],
        "cfg_rows": adapter.cfg_rows,
        "runs": runs,
        "warmup": warmup,
        "seed": seed,
        "condition": adapter.conditions(condition, 1)[0],
        "variants": [v.label for v in vs],
        "timing_scope": adapter.timing_scope,
        "timer": timer.name,
        "first_call": "Dynamo tracing + toprovar passes (+ Inductor on CUDA) + one generation; eager dense: "
                      "one cold generation",
        "pretrained": bool(adapter.extra.get("pretrained", False)),
        "dynamic": dynamic,
        "sampling": adapter.extra.get("sampling"),
    }
    if not res.settings["pretrained"] and adapter.family != "custom":
        res.notes.append("random weights: attention is near-uniform, so entropy-driven decisions mean little "
                         "(fidelity numbers are not quality numbers)")
    if dev.type == "cpu":
        res.notes.append("CPU: the dispatcher's Python overhead can exceed the FLOPs saved on small models; "
                         "speed is a GPU claim")
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(res.to_dict(), indent=1), encoding="utf-8")
        (out / "bench.md").write_text(res.to_markdown(), encoding="utf-8")
    return res
