"""GPU time of the token gathers and restores a pruned block runs, in the ways torch can do them.

Why: on the H200 the glue a planned block adds around its branches (gathers of the hidden state
and of the RoPE rows, the restore's copy and scatter, the adds) costs 5.0 ms of the balanced
policy's last two scales on Infinity-2B and 8.5 ms on 8B (e2e.md, e2e-8b-2026-11-30-fourteenth.md).
``torch.gather`` with an index expanded over the channels takes its vectorised kernel only when the
iteration collapses to two dimensions, which two CFG rows prevent (``fast_gather_kernel_eligible``
in ATen's IndexKernelUtils.h), so each gather ran the generic elementwise kernel. This script times
each candidate alone, replayed from a CUDA graph (20 calls per replay, so launches cost nothing), on
the shapes of the last four scales, and checks that every candidate gives the same tensor as the
ATen op. Since this session (2026-11-30) ``gather_tokens`` and the restores run
``kernels/token_rows.py`` on the GPU; the ATen ops they replaced are timed next to them.

    PYTHONPATH=. python3 benchmarks/token_ops_micro.py --out out/micro            # H200
    PYTHONPATH=. python3 benchmarks/token_ops_micro.py --device cpu --out /tmp/m  # checks only
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from toprovar_fx.kernels.token_rows import IMPL_ENV  # noqa: E402
from toprovar_fx.runtime.token_ops import gather_tokens, restore_identity, restore_kept  # noqa: E402
from toprovar_fx.tools.bench import environment, write_markdown  # noqa: E402

CALLS_PER_REPLAY = 20
# (model, width, head_dim, N, k): the last four scales of the balanced policy (kept fraction from
# the e2e reports' FLOP ratios, roughly)
CASES = [
    ("2b", 2048, 128, 1024, 384), ("2b", 2048, 128, 1600, 480), ("2b", 2048, 128, 2304, 580),
    ("2b", 2048, 128, 4096, 730),
    ("8b", 3584, 128, 1024, 384), ("8b", 3584, 128, 1600, 480), ("8b", 3584, 128, 2304, 580),
    ("8b", 3584, 128, 4096, 730),
]
ROWS = 2  # batch 1 with CFG


def _aten(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with ``TOPROVAR_TOKEN_ROWS_IMPL=aten``: the ATen ops the token ops ran before the kernel
    (read when the call runs, so also when it is captured)."""
    def run() -> object:
        old = os.environ.get(IMPL_ENV)
        os.environ[IMPL_ENV] = "aten"
        try:
            return fn()
        finally:
            if old is None:
                del os.environ[IMPL_ENV]
            else:
                os.environ[IMPL_ENV] = old
    return run


def _offsets(idx: torch.Tensor, n: int) -> torch.Tensor:
    return (idx + torch.arange(idx.shape[0], device=idx.device).unsqueeze(1) * n).reshape(-1)


def gather_candidates(x: torch.Tensor, rope: torch.Tensor, idx: torch.Tensor) -> dict[str, Callable[[], object]]:
    rows, k = idx.shape
    n, c = x.shape[1], x.shape[2]
    return {
        "x: torch.gather (ATen, before)": _aten(lambda: gather_tokens(x, idx, 1)),
        "x: gather_tokens (token_rows kernel on CUDA)": lambda: gather_tokens(x, idx, 1),
        "x: flat index_select": lambda: x.reshape(rows * n, c).index_select(0, _offsets(idx, n)).view(rows, k, c),
        "x: flat advanced index": lambda: x.reshape(rows * n, c)[_offsets(idx, n)].view(rows, k, c),
        "x: flat torch.gather": lambda: torch.gather(
            x.reshape(1, rows * n, c), 1, _offsets(idx, n).view(1, -1, 1).expand(1, rows * k, c)).view(rows, k, c),
        "x: two-index advanced index": lambda: x[torch.arange(rows, device=x.device).unsqueeze(1), idx],
        "x: index_select, rows share idx": lambda: x.index_select(1, idx[0]),
        "rope: torch.gather (ATen, gather_tokens)": _aten(lambda: gather_tokens(rope, idx, 2)),
        "rope: flat index_select": lambda: rope.index_select(2, idx.reshape(-1)).unflatten(2, (rows, k))
        .movedim(2, 0).squeeze(1),
        "rope: index_select, rows share idx (batch 1 out)": lambda: rope.index_select(2, idx[0]),
    }


def restore_candidates(base: torch.Tensor, idx: torch.Tensor, kept: torch.Tensor) -> dict[str, Callable[[], object]]:
    rows, k = idx.shape
    n, c = base.shape[1], base.shape[2]

    def index_copy() -> torch.Tensor:
        out = base.clone()
        out.view(rows * n, c).index_copy_(0, _offsets(idx, n), kept.reshape(rows * k, c))
        return out

    def index_put() -> torch.Tensor:
        out = base.clone()
        out.view(rows * n, c)[_offsets(idx, n)] = kept.reshape(rows * k, c)
        return out

    def index_copy_shared() -> torch.Tensor:
        return base.index_copy(1, idx[0], kept)

    return {
        "restore: scatter (ATen, before)": _aten(lambda: restore_kept(base, idx, kept)),
        "restore: restore_kept (token_rows kernel on CUDA)": lambda: restore_kept(base, idx, kept),
        "restore: scatter_add (ATen, before)": _aten(lambda: restore_identity(base, idx, kept)),
        "restore: restore_identity (token_rows kernel on CUDA)": lambda: restore_identity(base, idx, kept),
        "restore: clone + flat index_copy_": index_copy,
        "restore: clone + flat index_put_": index_put,
        "restore: index_copy, rows share idx": index_copy_shared,
        "restore: clone alone (floor)": lambda: base.clone(),
    }


def time_gpu(fn: Callable[[], object], reps: int) -> float:
    """Median microseconds of one call, from CUDA-graph replays of ``CALLS_PER_REPLAY`` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS_PER_REPLAY):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / CALLS_PER_REPLAY)
    return statistics.median(times)


def run(device: str, dtype: torch.dtype, reps: int) -> tuple[list[str], list[list[str]]]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    names: list[str] = []
    rows_out: list[list[str]] = []
    for model, width, head_dim, n, k in CASES:
        if device == "cpu":
            width, n, k = width // 16, n // 16, k // 16
        x = torch.randn(ROWS, n, width, generator=gen).to(device, dtype)
        # the RoPE cos rows as the zoo's blocks take them: a view of the fp32 table [1, 1, N, hd/2, 2]
        rope = torch.randn(1, 1, n, head_dim // 2, 2, generator=gen).to(device)[..., 0]
        # one kept set for both CFG rows (token.cfg: shared at batch 1, the balanced policies)
        idx = torch.randperm(n, generator=gen)[:k].sort().values.to(device).expand(ROWS, k).contiguous()
        kept = torch.randn(ROWS, k, width, generator=gen).to(device, dtype)
        cands = gather_candidates(x, rope, idx) | restore_candidates(x, idx, kept)
        ref = {key: cands[name]() for key, name in (  # the ATen ops
            ("x", "x: torch.gather (ATen, before)"), ("rope", "rope: torch.gather (ATen, gather_tokens)"),
            ("restore", "restore: scatter (ATen, before)"), ("add", "restore: scatter_add (ATen, before)"))}
        row = [model, str(n), str(k)]
        for name, fn in cands.items():
            if "floor" not in name:
                got = fn()
                want = ref["add" if "add" in name or "identity" in name else name.split(":")[0]]
                if "batch 1 out" in name:
                    want = want[:1]
                if got.shape != want.shape or not torch.equal(got, want):
                    raise AssertionError(f"{name} differs from the current op at N={n}, k={k}")
            row.append(f"{time_gpu(fn, reps):.1f}" if device == "cuda" else "ok")
        names = list(cands)
        rows_out.append(row)
    return ["model", "N", "k", *names], rows_out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=50)
    args = p.parse_args(argv)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    header, rows = run(args.device, dtype, args.reps)
    env = environment(torch.device(args.device), dtype)
    timing = (f"median of {args.reps} CUDA-graph replays of {CALLS_PER_REPLAY} calls each" if args.device == "cuda"
              else "equality checks only (no timing off the GPU), shapes divided by 16")
    lines = [
        f"# Token gathers and restores, GPU microseconds per call ({datetime.date.today()})",
        "",
        f"{env['gpu'] or args.device} · torch {torch.__version__} · triton {env['triton']} · {dtype} · rows {ROWS} (batch 1, CFG) · "
        f"{timing}",
        "",
        "Every candidate was checked equal (`torch.equal`) to the ATen op `gather_tokens` / `restore_kept` / "
        "`restore_identity` ran before `kernels/token_rows.py` before it was timed. "
        "x: the hidden state `[2, N, C]`; rope: the RoPE cos rows, a `[1, 1, N, 64]` fp32 view of the `[1, 1, N, 64, 2]` table; restore: "
        "the kept rows written back into a copy of the hidden state. Both rows keep the same tokens "
        "(`token.cfg: shared` at batch 1, as the balanced policies).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *["| " + " | ".join(r) + " |" for r in rows],
    ]
    write_markdown(args.out, "token-ops-micro.md", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
