"""Where a toprovar generation's host time goes at each scale: inside our block runners, between
block calls, and between scales.

Why: ``block_call_cost.py`` puts the floor of one block call (Dynamo's frame plus a CUDA-graph
replay, nothing of ours) at 32-49 us on the H200 host, while the early scales of a toprovar
generation take 170-183 us of wall per block call. This script times, in a real compiled
generation, every call of the backend's per-graph runner of a prune-mode block
(``ScaleSwitchRunner``: prediction, dense graph or planned block, entropy record): how long the call
took (ours and the replay), the gap before it since the previous block call of the same scale
(Dynamo's frame and the module call, the sampler's loop), and the host time between a scale's
last block call and the next scale's first (head, sampling, next input). Host clocks only
(``perf_counter_ns``); medians over ``--gens`` generations after ``--warmup``.

``--stand-in-graphs`` (CPU): the backend "captures" its CUDA graphs with a stand-in API whose
replay does nothing (the outputs keep the values of the capture) and runs its graphs as FX, so
``inside`` is our runner's host time alone (prediction, graph cache, lending checks, entropy
record) on the machine at hand: the part of a dense block call we own, measurable without a GPU.
The images are meaningless in that mode.

    PYTHONPATH=. python3 benchmarks/block_timeline.py --out out/timeline                       # H200
    PYTHONPATH=. python3 benchmarks/block_timeline.py --device cpu --model infinity-tiny --out /tmp/t
    PYTHONPATH=. python3 benchmarks/block_timeline.py --device cpu --model infinity-tiny --stand-in-graphs --out /tmp/t
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import build_model, sampler_call, sync, variant_by_key  # noqa: E402

from toprovar_fx import backend  # noqa: E402
from toprovar_fx.lowering import runners  # noqa: E402
from toprovar_fx.runtime.session import last_session  # noqa: E402
from toprovar_fx.tools.bench import environment, model_bench_parser, write_markdown  # noqa: E402

Call = tuple[int, int, int]  # (scale, enter ns, exit ns)


class Recorder:
    """Records every ``ScaleSwitchRunner`` call while ``on``: the scale it ticked, enter, exit."""

    def __init__(self) -> None:
        self.on = False
        self.calls: list[Call] = []
        self._orig = runners.ScaleSwitchRunner.__call__

    def __enter__(self) -> Recorder:
        orig, rec = self._orig, self

        def timed(runner: Any, *args: Any) -> Any:
            if not rec.on:
                return orig(runner, *args)
            t0 = time.perf_counter_ns()
            out = orig(runner, *args)
            rec.calls.append((runner.session.clock.scale, t0, time.perf_counter_ns()))
            return out

        runners.ScaleSwitchRunner.__call__ = timed
        return self

    def __exit__(self, *exc: Any) -> None:
        runners.ScaleSwitchRunner.__call__ = self._orig


class NoReplayGraphs:
    """A stand-in for ``torch.cuda``'s graph API: capture runs the function once, replay does nothing."""

    class CUDAGraph:
        def replay(self) -> None:
            pass

    class Stream:
        def wait_stream(self, _other: Any) -> None:
            pass

    def current_stream(self) -> Stream:
        return self.Stream()

    def stream(self, _s: Any) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def graph(self, _g: Any, pool: Any = None) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def graph_pool_handle(self) -> tuple[str]:
        return ("stand-in pool",)

    def is_current_stream_capturing(self) -> bool:
        return False


@contextlib.contextmanager
def stand_in_graphs() -> Any:
    """While active, the backend captures with ``NoReplayGraphs`` on CPU tensors (graphs compiled
    meanwhile keep it)."""
    made, on_cuda = backend.CudaGraphCache, backend._on_cuda
    api = NoReplayGraphs()

    def cache(*args: Any, **kwargs: Any) -> Any:
        return made(*args, api=api, device_type="cpu", **kwargs)

    backend.CudaGraphCache, backend._on_cuda = cache, (lambda _example_inputs: True)
    try:
        yield
    finally:
        backend.CudaGraphCache, backend._on_cuda = made, on_cuda


def per_scale(calls: list[Call]) -> dict[int, dict[str, float]]:
    """One generation's calls -> per scale: calls, median inside / gap us, the scale's span and the
    host time from its last call to the next scale's first (ms)."""
    by: dict[int, list[Call]] = defaultdict(list)
    for c in calls:
        by[c[0]].append(c)
    scales = sorted(by)
    out = {}
    for i, s in enumerate(scales):
        cs = sorted(by[s], key=lambda c: c[1])
        inside = [(c[2] - c[1]) / 1e3 for c in cs]
        gaps = [(b[1] - a[2]) / 1e3 for a, b in zip(cs, cs[1:])]
        nxt = by[scales[i + 1]] if i + 1 < len(scales) else None
        out[s] = {"calls": len(cs), "inside_us": statistics.median(inside),
                  "gap_us": statistics.median(gaps) if gaps else float("nan"),
                  "span_ms": (cs[-1][2] - cs[0][1]) / 1e6,
                  "between_ms": (min(c[1] for c in nxt) - cs[-1][2]) / 1e6 if nxt else float("nan")}
    return out


def run(model_name: str, device: str, warmup: int, gens: int, stand_in: bool = False) -> dict[int, dict[str, float]]:
    if stand_in and device != "cpu":
        raise ValueError("--stand-in-graphs is for --device cpu (on CUDA the backend captures real graphs)")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, _ = build_model(model_name, device, dtype)
    variant = variant_by_key(model_name, "toprovar")
    if stand_in:
        # FX graphs: no C++ compiles on the CPU
        variant = dataclasses.replace(variant, options={**variant.options, "inductor": False})
    fn = variant.build(model)
    call = sampler_call(model, 1, device)
    results: list[dict[int, dict[str, float]]] = []
    with contextlib.ExitStack() as stack:
        rec = stack.enter_context(Recorder())
        if stand_in:
            stack.enter_context(stand_in_graphs())
        for _ in range(warmup):
            call(fn)
        for _ in range(gens):
            sync(device)
            rec.calls, rec.on = [], True
            call(fn)
            rec.on = False
            sync(device)
            results.append(per_scale(rec.calls))
    if last_session() is None or not results[-1]:
        raise RuntimeError("no ScaleSwitchRunner call was recorded: the variant did not run prune-mode block graphs")
    keys = sorted(set.intersection(*(set(r) for r in results)))
    return {s: {k: statistics.median(r[s][k] for r in results) for k in results[0][s]} for s in keys}


def markdown(table: dict[int, dict[str, float]], args: argparse.Namespace, env: dict[str, Any]) -> str:
    def num(v: float, digits: int = 1) -> str:
        return "-" if v != v else f"{v:.{digits}f}"

    lines = [f"# Host time per scale, inside and between block calls: {args.model} "
             f"({datetime.date.today().isoformat()})", "",
             " · ".join(f"{k} {v}" for k, v in env.items() if v is not None), "",
             f"Command: `{' '.join(sys.argv)}`. Variant `toprovar` of `e2e.py`; medians over {args.gens} "
             f"generations after {args.warmup} warm-up calls. `inside`: one call of the block graph's runner "
             "(prediction, replay or planned block, entropy record); `gap`: from one block call's return to "
             "the next block call of the scale (Dynamo's frame, the module call, the sampler's loop); `span`: "
             "first block call to last return; `to next scale`: the last return to the next scale's first "
             "call (head, sampling, next input).", "",
             "| scale (1-based) | block calls | inside us | gap us | span ms | to next scale ms |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {s + 1} | {r['calls']:.0f} | {num(r['inside_us'])} | {num(r['gap_us'])} | {num(r['span_ms'], 2)} | "
              f"{num(r['between_ms'], 2)} |" for s, r in table.items()]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = model_bench_parser(__doc__, "block_timeline.md")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--gens", type=int, default=5)
    ap.add_argument("--stand-in-graphs", action="store_true",
                    help="CPU: capture with a graph API whose replay does nothing (our runner's host time alone)")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    table = run(args.model, args.device, args.warmup, args.gens, args.stand_in_graphs)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    write_markdown(args.out, "block_timeline.md", markdown(table, args, environment(torch.device(args.device), dtype)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
