"""Which op or compiled region launches the kernels of one kind, in one toprovar generation.

Why: a CUDA-graph replay's kernels have no op of their own in a profile, so kernel-class tables
(``e2e.py``) say how many copies run but not whose. ``torch.profiler`` still links every device
kernel to the CPU op that was open when it was launched: for a replay from our runners that is
Dynamo's region of the calling frame (``Torch-Compiled Region: F/E``: frame F, cache entry E; the
block frame has one entry per scale), for an eager op the op itself. The tenth session found this
way that the 4 memcpy nodes of every dense block graph are the lent outputs' copies into their
homes (``docs/backend.md``). One model, the ``toprovar`` variant of ``e2e.py`` compiled and warmed,
one generation profiled; per (launching op, its parent, kernel name) the count and GPU ms of the
kernels whose name matches ``--match``.

    PYTHONPATH=. python3 benchmarks/kernel_origins.py --out out/origins                         # H200
    PYTHONPATH=. python3 benchmarks/kernel_origins.py --out out/origins --match 'gather|scatter'
    PYTHONPATH=. python3 benchmarks/kernel_origins.py --device cpu --model infinity-tiny --out /tmp/k
"""

from __future__ import annotations

import argparse
import datetime
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import build_model, sampler_call, sync, variant_by_key  # noqa: E402

from toprovar_fx.tools.bench import environment, model_bench_parser, write_markdown  # noqa: E402

Origin = tuple[str, str, str]  # (launching op, its parent op, kernel name)


def origins(events: Iterable[Any], pattern: str) -> tuple[Counter[Origin], dict[Origin, float]]:
    """Per (launching op, parent, kernel name): how many kernels matching ``pattern`` it launched,
    and their GPU ms. ``events``: ``torch.profiler``'s function events (each with the device
    ``kernels`` it launched, durations in us)."""
    rx = re.compile(pattern)
    counts: Counter[Origin] = Counter()
    ms: dict[Origin, float] = defaultdict(float)
    for ev in events:
        for kernel in getattr(ev, "kernels", ()) or ():
            if not rx.search(kernel.name):
                continue
            parent = ev.cpu_parent.name if ev.cpu_parent is not None else "-"
            key = (ev.name, parent, kernel.name[:80])
            counts[key] += 1
            ms[key] += kernel.duration / 1e3
    return counts, dict(ms)


def run(model_name: str, device: str, warmup: int, pattern: str) -> tuple[Counter[Origin], dict[Origin, float]]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, _ = build_model(model_name, device, dtype)
    fn = variant_by_key(model_name, "toprovar").build(model)
    call = sampler_call(model, 1, device)
    for _ in range(warmup):
        call(fn)
    sync(device)
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        call(fn)
        sync(device)
    return origins(prof.events(), pattern)


def markdown(counts: Counter[Origin], ms: dict[Origin, float], args: argparse.Namespace, env: dict[str, Any],
             top: int = 40) -> str:
    lines = [f"# Which op launches the `{args.match}` kernels: {args.model} ({datetime.date.today().isoformat()})", "",
             " · ".join(f"{k} {v}" for k, v in env.items() if v is not None), "",
             f"Command: `{' '.join(sys.argv)}`. Variant `toprovar` of `e2e.py`, one generation profiled after "
             f"{args.warmup} warm-up calls. `launched by`: the CPU op open when the kernel was launched (for a "
             "replay of our CUDA graphs, the Dynamo region of the calling frame: `Torch-Compiled Region: "
             "frame/entry`).", ""]
    if not counts:
        lines.append(f"No device kernel matched `{args.match}`"
                     + (" (a CPU run launches none)." if args.device == "cpu" else "."))
        return "\n".join(lines) + "\n"
    lines += [f"{sum(counts.values())} kernels, {sum(ms.values()):.2f} GPU ms in all.", "",
              "| kernels | GPU ms | launched by | its parent | kernel |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {ms[key]:.3f} | {key[0]} | {key[1]} | `{key[2]}` |" for key, n in counts.most_common(top)]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = model_bench_parser(__doc__, "kernel_origins.md")
    ap.add_argument("--warmup", type=int, default=4, help="generations before the profiled one (compiles, "
                                                            "lending starts at the third)")
    ap.add_argument("--match", default="memcpy|Memcpy|copy", help="regular expression on kernel names")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    counts, ms = run(args.model, args.device, args.warmup, args.match)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    write_markdown(args.out, "kernel_origins.md", markdown(counts, ms, args, environment(torch.device(args.device), dtype)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
