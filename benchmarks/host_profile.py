"""Where the host time of a generation goes: Python functions under ``cProfile``, per variant.

Why: at batch 1 the early scales of a VAR sampler are host-bound (e2e.md: 7-9 ms wall per scale
for 3-6 ms of GPU work), and ``torch.profiler`` attributes most of that host time to the
``Torch-Compiled Region`` ranges' self time, which hides whether it is Dynamo's frame handling or
our runners. ``cProfile`` names the Python functions. One model, each variant compiled and warmed,
``--gens`` timed generations (median wall), then one generation under ``cProfile``; the top
functions by own time and the cumulative time of the backend's entry points are written as
Markdown. Numbers under ``cProfile`` are inflated by its per-call cost (read the shares, not the
absolute times); the median wall times are measured without it.

    PYTHONPATH=. python3 benchmarks/host_profile.py --out out/host --variants toprovar      # H200
    PYTHONPATH=. python3 benchmarks/host_profile.py --device cpu --models infinity-tiny --out /tmp/h
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import pstats
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import build_model, sampler_call, sync, variant_by_key  # noqa: E402

from toprovar_fx.tools.bench import environment, model_bench_parser  # noqa: E402

# functions whose cumulative time says which layer the host time is in
ENTRY_POINTS = (
    ("torch/_dynamo/eval_frame.py", "_fn"),
    ("toprovar_fx/lowering/runners.py", "__call__"),
    ("toprovar_fx/lowering/runners.py", "try_call"),
    ("toprovar_fx/lowering/cuda_graphs.py", "__call__"),
    ("toprovar_fx/lowering/cuda_graphs.py", "run"),
    ("toprovar_fx/runtime/session.py", "record_attention"),
    ("toprovar_fx/runtime/session.py", "dense_ahead"),
    ("toprovar_fx/runtime/dispatch.py", "dispatch_branch"),
)


def _rows(stats: pstats.Stats, key: int, n: int) -> list[tuple[str, int, float, float]]:
    """Top ``n`` functions by own time (``key`` 2) or cumulative time (``key`` 3)."""
    entries = []
    for (path, line, name), (_cc, ncalls, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        entries.append((_short(path, line, name), ncalls, tt, ct))
    entries.sort(key=lambda e: -e[key])
    return entries[:n]


def _entry_rows(stats: pstats.Stats) -> list[tuple[str, int, float, float]]:
    out: dict[tuple[str, str], list[float]] = {}
    for (path, _line, name), (_cc, ncalls, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        for suffix, fname in ENTRY_POINTS:
            if path.endswith(suffix) and name == fname:
                acc = out.setdefault((suffix, fname), [0, 0.0, 0.0])
                acc[0] += ncalls
                acc[1] += tt
                acc[2] += ct
    return [(f"`{s} {f}`", int(v[0]), v[1], v[2]) for (s, f), v in out.items()]


def _short(path: str, line: int, name: str) -> str:
    short = "/".join(Path(path).parts[-3:]) if path != "~" else "builtin"
    return f"`{short}:{line} {name}`"


# torch's own wrappers: called several times per block call on the H200, from places the tables don't name
WRAPPERS = ("torch/_compile.py", "torch/_dynamo/eval_frame.py")


def _caller_rows(stats: pstats.Stats, files: Sequence[str], n_wrappers: int, n_callers: int) -> list[str]:
    """Who calls the ``n_wrappers`` most-called functions defined in ``files`` (path suffixes), their
    ``n_callers`` top callers each: at batch 1 each call is host time per block, and the summary
    tables do not say whose it is."""
    wrappers = [(k, v) for k, v in stats.stats.items() if k[0].endswith(tuple(files))]  # type: ignore[attr-defined]
    wrappers.sort(key=lambda kv: -kv[1][1])
    lines = ["| function | calls | caller | calls from it | cumulative ms from it |", "|---|---|---|---|---|"]
    for key, (_cc, ncalls, _tt, _ct, callers) in wrappers[:n_wrappers]:
        ranked = sorted(callers.items(), key=lambda kv: -kv[1][1])[:n_callers]
        for ckey, (_ccc, cn, _ctt, cct) in ranked:
            lines.append(f"| {_short(*key)} | {ncalls} | {_short(*ckey)} | {cn} | {1e3 * cct:.1f} |")
    return lines


def _table(rows: list[tuple[str, int, float, float]]) -> list[str]:
    lines = ["| function | calls | own ms | cumulative ms |", "|---|---|---|---|"]
    lines += [f"| {name} | {calls} | {1e3 * tt:.1f} | {1e3 * ct:.1f} |" for name, calls, tt, ct in rows]
    return lines


def profile_variant(model: torch.nn.Module, key: str, args: argparse.Namespace) -> list[str]:
    """Compile and warm one variant, time it, profile one generation; its Markdown section."""
    variant = variant_by_key(args.model, key)
    if variant.kind == "missing":
        return [f"## {key}", "", f"missing: {variant.definition}", ""]
    fn = variant.build(model)
    call = sampler_call(model, 1, args.device)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        call(fn)
        sync(args.device)
    warm_s = time.perf_counter() - t0
    walls = []
    for _ in range(args.gens):
        sync(args.device)
        t = time.perf_counter()
        call(fn)
        sync(args.device)
        walls.append(1e3 * (time.perf_counter() - t))
    prof = cProfile.Profile()
    sync(args.device)
    t = time.perf_counter()
    prof.enable()
    call(fn)
    sync(args.device)
    prof.disable()
    profiled = 1e3 * (time.perf_counter() - t)
    stats = pstats.Stats(prof)
    lines = [f"## {key}: {variant.label}", "",
             f"Warm-up {args.warmup} calls in {warm_s:.1f} s; median of {args.gens} generations "
             f"**{statistics.median(walls):.1f} ms** (min {min(walls):.1f}); under cProfile {profiled:.1f} ms.", "",
             "### Entry points (cumulative: the time spent in and below them)", ""]
    lines += _table(_entry_rows(stats))
    lines += ["", f"### Top {args.top} functions by own time", ""]
    lines += _table(_rows(stats, 2, args.top))
    lines += ["", f"### Top {args.top} functions by cumulative time", ""]
    lines += _table(_rows(stats, 3, args.top))
    lines += ["", "### Callers of torch's most-called wrappers", ""]
    lines += _caller_rows(stats, WRAPPERS, 3, 6)
    lines.append("")
    torch._dynamo.reset()
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = model_bench_parser(__doc__, "host_profile.md")
    ap.add_argument("--variants", default="toprovar", help="comma-separated e2e.py variant keys")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--gens", type=int, default=5)
    ap.add_argument("--top", type=int, default=30)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model, built_s = build_model(args.model, args.device, dtype)
    env = environment(torch.device(args.device), dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Host profile of one generation: {args.model} ({datetime.date.today().isoformat()})", "",
             " · ".join(f"{k} {v}" for k, v in env.items() if v is not None), "",
             f"Command: `{' '.join(sys.argv)}`; model built in {built_s:.1f} s, batch 1, CFG.", ""]
    for key in args.variants.split(","):
        try:
            lines += profile_variant(model, key, args)
        except Exception as err:  # noqa: BLE001 - one failed variant must not lose the others' numbers
            lines += [f"## {key}", "", f"failed: {type(err).__name__}: {err}", ""]
        (out / "host_profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
