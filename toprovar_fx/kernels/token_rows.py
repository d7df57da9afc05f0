"""Row gathers and scatters of token maps on the GPU: one Triton program copies one token's channels.

Why: a pruned block gathers the kept tokens of its hidden state and writes the branch results back
(``runtime/token_ops.py``). ATen's ``gather`` / ``scatter`` / ``scatter_add`` with an index
expanded over the channels run an elementwise kernel that computes an offset per element: with two
CFG rows the iteration does not collapse to the two dimensions its vectorised gather needs
(``fast_gather_kernel_eligible``), and the scatter has no vectorised path. On the H200 they take
18 us (gather) and 19 us (scatter, on top of the 29 us copy) for 730 of 4,096 tokens of Infinity-8B's
width, where moving the bytes takes 2-3 us (``benchmarks/results/token-ops-micro-2026-11-30.md``).
Here each program loads one kept token's index once and moves up to ``BLOCK`` contiguous channels.

Preconditions (``rows_eligible``): a plain CUDA tensor ``t [rows or 1, N, *rest]`` whose ``rest`` dims are
contiguous (a batch of 1 broadcasts over the rows), token dim 1, indices ``idx [rows, k]``
contiguous int64 on the same device, each row's indices in ``[0, N)`` and, for the scatters,
distinct within the row (``topk`` gives both). Nothing checks the range on the GPU: callers
pass indices from ``topk``. Everything else keeps to the ATen ops.

``TOPROVAR_TOKEN_ROWS_IMPL``: ``auto`` (default: the kernel for eligible CUDA tensors), ``aten``
(never the kernel), ``triton`` (also CPU tensors, under ``TRITON_INTERPRET=1``: tests run the
runtime's planned blocks through the kernel on the CPU with it).
"""

from __future__ import annotations

import math
import os

import torch

try:
    import triton
    import triton.language as tl

    from .fae_triton import _round_fp32_to_bf16_rne, interpret_mode
except ImportError:  # pragma: no cover - triton is a declared dependency
    triton = None

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
IMPL_ENV = "TOPROVAR_TOKEN_ROWS_IMPL"
_IMPLS = ("auto", "aten", "triton")
_MAX_BLOCK = 1024  # channels per program: 2 KiB of bf16, 16-byte vector loads over 4 warps

__all__ = ["gather_rows", "rows_eligible", "scatter_eligible", "scatter_rows"]


def _rest_contiguous(t: torch.Tensor) -> bool:
    expected = 1
    for size, stride in zip(reversed(t.shape[2:]), reversed(t.stride()[2:])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _impl() -> str:
    impl = os.environ.get(IMPL_ENV, "auto").lower()
    if impl not in _IMPLS:
        raise ValueError(f"toprovar: environment variable {IMPL_ENV} must be one of {_IMPLS}, got {impl!r}")
    return impl


def rows_eligible(t: torch.Tensor, idx: torch.Tensor, dim: int, interpret: bool = False) -> bool:
    """Whether ``t`` and ``idx`` meet this module's preconditions (``interpret``: CPU tensors under
    ``TRITON_INTERPRET=1``, for tests; ``TOPROVAR_TOKEN_ROWS_IMPL`` may force either route)."""
    return dim == 1 and _route_open(t, interpret) and _fits(t, idx)


def scatter_eligible(base: torch.Tensor, idx: torch.Tensor, src: torch.Tensor, interpret: bool = False) -> bool:
    """Whether ``scatter_rows(base, idx, src, ...)`` may run: both meet ``rows_eligible``'s
    preconditions, ``base`` has all rows and ``src`` its channels and dtype."""
    return (base.shape[0] == src.shape[0] == idx.shape[0] and src.dtype == base.dtype
            and src.shape[2:] == base.shape[2:] and _route_open(base, interpret) and _fits(base, idx) and _fits(src, idx))


def _route_open(t: torch.Tensor, interpret: bool) -> bool:
    """The kernel may be used at all: triton present, not forced off, a device it runs on, not traced."""
    impl = _impl()
    if impl == "aten" or triton is None:
        return False
    return ((t.is_cuda or interpret or (impl == "triton" and interpret_mode()))
            and not torch.compiler.is_compiling())


def _fits(t: torch.Tensor, idx: torch.Tensor) -> bool:
    # plain tensors only: a subclass (a fake tensor under tracing, a parameter) keeps to ATen, whose
    # ops it knows how to handle
    return (type(t) is torch.Tensor and type(idx) is torch.Tensor and t.dim() >= 2 and t.dtype in _DTYPES
            and idx.dtype == torch.int64 and idx.dim() == 2 and idx.is_contiguous() and idx.device == t.device
            and t.shape[0] in (1, idx.shape[0]) and _rest_contiguous(t))


if triton is not None:

    @triton.jit(do_not_specialize=["k"])
    def _copy_rows_kernel(src, idx, dst, k, channels, src_row, src_tok, dst_row, dst_tok,
                          GATHER: tl.constexpr, ADD: tl.constexpr, RNE_BF16: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)  # one kept token of one row: idx is [rows, k] contiguous
        row = (pid // k).to(tl.int64)
        slot = (pid % k).to(tl.int64)
        tok = tl.load(idx + pid)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < channels
        if GATHER:  # dst[row, slot] = src[row, tok]
            s = src + row * src_row + tok * src_tok
            d = dst + row * dst_row + slot * dst_tok
        else:  # dst[row, tok] (+)= src[row, slot]
            s = src + row * src_row + slot * src_tok
            d = dst + row * dst_row + tok * dst_tok
        v = tl.load(s + offs, mask=mask)
        if ADD:  # in fp32, rounded once, as ATen's scatter_add
            total = v.to(tl.float32) + tl.load(d + offs, mask=mask).to(tl.float32)
            if RNE_BF16:  # the interpreter's fp32 -> bf16 cast truncates; the GPU's rounds to nearest even
                total = _round_fp32_to_bf16_rne(total)
            v = total.to(v.dtype)
        tl.store(d + offs, v, mask=mask)


def _launch(src: torch.Tensor, idx: torch.Tensor, dst: torch.Tensor, gather: bool, add: bool) -> None:
    rows, k = idx.shape
    channels = math.prod(src.shape[2:])
    if rows * k == 0 or channels == 0:
        return
    block = min(_MAX_BLOCK, triton.next_power_of_2(channels))
    grid = (rows * k, triton.cdiv(channels, block))
    _copy_rows_kernel[grid](src, idx, dst, k, channels,
                            src.stride(0) if src.shape[0] > 1 else 0, src.stride(1),
                            dst.stride(0) if dst.shape[0] > 1 else 0, dst.stride(1),
                            GATHER=gather, ADD=add, RNE_BF16=interpret_mode() and dst.dtype == torch.bfloat16,
                            BLOCK=block, num_warps=4 if block >= 512 else 1)


def gather_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t[r, idx[r, j]]`` as ``[rows, k, *rest]`` (contiguous); ``rows_eligible(t, idx, 1)`` holds."""
    rows, k = idx.shape
    out = torch.empty((rows, k, *t.shape[2:]), dtype=t.dtype, device=t.device)
    _launch(t, idx, out, gather=True, add=False)
    return out


def scatter_rows(base: torch.Tensor, idx: torch.Tensor, src: torch.Tensor, add: bool) -> torch.Tensor:
    """A copy of ``base [rows, N, *rest]`` with ``src [rows, k, *rest]`` written (``add``: added) at
    ``idx``: ``base.scatter(1, ...)`` / ``base.scatter_add(1, ...)`` with the index expanded over
    ``rest``. ``scatter_eligible(base, idx, src)`` holds."""
    out = base.clone()
    _launch(src, idx, out, gather=False, add=add)
    return out
