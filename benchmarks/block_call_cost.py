"""Host time of one transformer-block call, layer by layer: eager, CUDA-graph replay, Dynamo's frame.

Why: at batch 1 the early scales of a VAR sampler are host-bound (e2e.md: about 170-190 us of host
time per block call on the H200 for 100-130 us of GPU work), and after our runtime's bookkeeping
was cut (ninth session) the rest is torch's. This script splits it without our backend: one block
of the zoo model, called with the arguments it got at ``--scale`` in a real generation (K/V cache
off, so every call is the same), timed per call on the host (``perf_counter_ns`` around the call;
the device is synchronised every ``SYNC_EVERY`` calls, outside the timed calls, so the launch
queue never fills):

* ``eager``: ``block(*args)`` in eager mode (one launch per kernel);
* ``replay``: ``CUDAGraph.replay()`` of that call captured once (CUDA only);
* ``dynamo``: the block under ``torch.compile`` with a backend that does no work (it returns the
  outputs of its first call): Dynamo's frame, guards and wrappers plus the module call;
* ``dynamo_replay``: the same frame whose backend replays the captured graph (CUDA only): a block
  call with nothing of ours in it, the floor for toprovar's dense block calls.

    PYTHONPATH=. python3 benchmarks/block_call_cost.py --out out/block                       # H200
    PYTHONPATH=. python3 benchmarks/block_call_cost.py --device cpu --model infinity-tiny --out /tmp/b
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import build_model, sampler_call, sync  # noqa: E402

from toprovar_fx.tools.bench import environment, model_bench_parser, write_markdown  # noqa: E402

SYNC_EVERY = 16
WARMUP = 20


def block_arguments(model: torch.nn.Module, block: torch.nn.Module, scale: int, device: str) -> tuple[tuple, dict]:
    """The ``(args, kwargs)`` ``block`` was called with at 0-based ``scale`` in one eager generation
    (tensors cloned: the sampler reuses its buffers)."""
    seen: list[tuple[tuple, dict]] = []

    def clone(v: Any) -> Any:
        return v.detach().clone() if isinstance(v, torch.Tensor) else v

    def hook(_mod: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if len(seen) == scale:
            seen.append((tuple(torch.utils._pytree.tree_map(clone, list(args))),
                         torch.utils._pytree.tree_map(clone, kwargs)))
        elif len(seen) < scale:
            seen.append(((), {}))

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            sampler_call(model, 1, device)(model.autoregressive_infer_cfg)
    finally:
        handle.remove()
    if len(seen) <= scale:
        raise ValueError(f"the block was called at {len(seen)} scales; --scale {scale + 1} is past the last")
    return seen[scale]


def host_us(fn: Callable[[], Any], calls: int, device: str) -> list[float]:
    """Host microseconds of each of ``calls`` calls of ``fn`` (after ``WARMUP`` untimed ones)."""
    for _ in range(WARMUP):
        fn()
    sync(device)
    out = []
    for i in range(calls):
        if i % SYNC_EVERY == 0:
            sync(device)
        t = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - t) / 1e3)
    sync(device)
    return out


def capture(fn: Callable[[], Any]) -> tuple[torch.cuda.CUDAGraph, Any]:
    """``fn`` captured in a CUDA graph (warmed up on a side stream first); the graph and its outputs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = fn()
    return graph, outs


def gpu_us_per_replay(graph: torch.cuda.CUDAGraph, calls: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(calls):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return 1e3 * start.elapsed_time(end) / calls


def compiled_block(block: torch.nn.Module, work: Callable[[Any], Any] | None) -> Callable[..., Any]:
    """``block`` under ``torch.compile`` with a backend that runs the graph once, then returns
    ``work(first outputs)`` (None: the first outputs) on every call."""
    def backend(gm: torch.fx.GraphModule, _example: list[Any]) -> Callable[..., Any]:
        state: dict[str, Any] = {}

        def run(*args: Any) -> Any:
            if "out" not in state:
                state["out"] = gm(*args)
            return state["out"] if work is None else work(state["out"])
        return run

    torch._dynamo.reset()
    return torch.compile(block, backend=backend)


def measure(model_name: str, device: str, scale: int, calls: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, _ = build_model(model_name, device, dtype)
    blocks = [m for m in model.modules() if type(m).__name__ == "CrossAttnBlock"]
    if len(blocks) < 2:
        raise ValueError(f"{model_name}: no Infinity-style blocks (CrossAttnBlock) to time")
    block = blocks[1]
    args, kwargs = block_arguments(model, block, scale, device)
    model.set_kv_caching(False)
    x = args[0] if args else next(iter(kwargs.values()))
    facts = {"tokens": int(x.shape[1]), "rows": int(x.shape[0]), "params": sum(1 for _ in block.parameters())}
    rows: list[dict[str, Any]] = []

    def row(name: str, what: str, times: list[float] | None, gpu: float | None = None, why: str = "") -> None:
        rows.append({"name": name, "what": what, "median_us": statistics.median(times) if times else None,
                     "p10_us": statistics.quantiles(times, n=10)[0] if times else None,
                     "p90_us": statistics.quantiles(times, n=10)[-1] if times else None,
                     "gpu_us": gpu, "note": why})

    with torch.no_grad():
        row("eager", "`block(*args)`, eager", host_us(lambda: block(*args, **kwargs), calls, device))
        graph = None
        if device == "cuda":
            graph, _ = capture(lambda: block(*args, **kwargs))
            row("replay", "`CUDAGraph.replay()` of that call", host_us(graph.replay, calls, device),
                gpu_us_per_replay(graph, calls))
        else:
            row("replay", "`CUDAGraph.replay()` of that call", None, why="n/a: no CUDA")
        fn = compiled_block(block, None)
        row("dynamo", "`torch.compile(block)`, a backend doing no work", host_us(lambda: fn(*args, **kwargs),
                                                                               calls, device))
        if graph is not None:
            replayed = graph

            def replay(outs: Any) -> Any:
                replayed.replay()
                return outs
            fn = compiled_block(block, replay)
            row("dynamo_replay", "`torch.compile(block)`, a backend replaying the captured graph",
                host_us(lambda: fn(*args, **kwargs), calls, device))
        else:
            row("dynamo_replay", "`torch.compile(block)`, a backend replaying the captured graph", None,
                why="n/a: no CUDA")
    torch._dynamo.reset()
    return rows, facts


def markdown(rows: list[dict[str, Any]], facts: dict[str, Any], args: argparse.Namespace, env: dict[str, Any]) -> str:
    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    lines = [f"# Host time of one block call: {args.model} ({datetime.date.today().isoformat()})", "",
             " · ".join(f"{k} {v}" for k, v in env.items() if v is not None), "",
             f"Command: `{' '.join(sys.argv)}`. Block 2 of the model, the arguments of its call at scale "
             f"{args.scale} ({facts['tokens']} tokens, {facts['rows']} rows, {facts['params']} parameters), "
             f"K/V cache off; {args.calls} timed calls per row after {WARMUP} untimed, host time per call "
             f"(`perf_counter_ns`), device synchronised every {SYNC_EVERY} calls outside the timed ones.", "",
             "| row | what | host us median | p10 | p90 | GPU us per call | note |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['what']} | {num(r['median_us'])} | {num(r['p10_us'])} | {num(r['p90_us'])} | "
              f"{num(r['gpu_us'])} | {r['note']} |" for r in rows]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = model_bench_parser(__doc__, "block_call_cost.md")
    ap.add_argument("--scale", type=int, default=3, help="1-based scale whose block arguments are used")
    ap.add_argument("--calls", type=int, default=2000)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.scale < 1 or args.calls < 10:
        raise SystemExit("--scale is 1-based (>= 1) and --calls at least 10")
    rows, facts = measure(args.model, args.device, args.scale - 1, args.calls)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    write_markdown(args.out, "block_call_cost.md", markdown(rows, facts, args, environment(torch.device(args.device), dtype)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
