"""Flash-Attention-Entropy (FAE): the public op ``toprovar::fae`` and its CPU implementation.

``fae(q, k, v, scale=None, *, head_mean=False) -> (out, entropy)`` computes unmasked softmax
attention ``out = softmax(q k^T * scale) v`` and the Shannon entropy (nats) of every query's
attention row, ``H_i = -sum_j a_ij log a_ij``, without materialising the ``Lq x Lk`` matrix on
the GPU. Shapes: q ``[B, Hq, Lq, D]``, k/v ``[B, Hkv, Lk, D]`` with ``Hq % Hkv == 0`` (GQA),
any strides; ``out`` ``[B, Hq, Lq, D]`` contiguous in q's dtype; ``entropy`` fp32 ``[B, Hq, Lq]``,
or ``[B, Lq]`` (mean over query heads) with ``head_mean=True``.

Dispatch (inside the custom op, so an FX graph holds a single ``FAE_OP`` node):

* CUDA tensors, fp16/bf16/fp32, head dim <= 256: the Triton kernel in ``fae_triton.py``
  (streaming entropy identity; see that module's docstring for the algorithm and cautions).
* everything else (CPU; fp64 anywhere; head dim > 256): ``fae_torch``, an exact chunked PyTorch
  implementation. It processes queries in chunks so that memory stays O(chunk x Lk), computes in
  fp32 (fp64 for fp64 inputs) and uses the same relative-to-max entropy formula as the kernel.
  On CUDA this route is logged once as a warning, never taken silently.
* ``TOPROVAR_FAE_IMPL=triton`` forces the kernel (on CPU only meaningful with
  ``TRITON_INTERPRET=1``), ``TOPROVAR_FAE_IMPL=torch`` forces the chunked path; tests and
  benchmarks use this to compare the two.

The head mean is a deterministic ``mean(dim=1)`` of the per-head entropy (see fae_triton.py).
``reference_attention_entropy`` is a materialising float64 reference for tests and benchmarks.
"""

from __future__ import annotations

import logging
import math
import os

import torch

logger = logging.getLogger(__name__)

try:
    from toprovar_fx.kernels import fae_triton as _fae_triton_mod
except ImportError as _err:  # pragma: no cover - triton is a declared dependency
    _fae_triton_mod = None
    logger.debug("triton unavailable, FAE uses the PyTorch path: %s", _err)

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Score elements (batch x heads x query chunk x Lk) per chunk of the PyTorch path: 2**24 fp32
# scores is 64 MiB, a few such temporaries stay well under typical host memory.
_TORCH_SCORE_BUDGET = 1 << 24
_IMPL_ENV = "TOPROVAR_FAE_IMPL"  # "auto" (default) | "triton" | "torch"
_IMPLS = ("auto", "triton", "torch")

_warned_fallback = False

__all__ = ["FAE_OP", "fae", "fae_torch", "reference_attention_entropy", "validate_fae_inputs"]


def validate_fae_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> None:
    """Raise ``ValueError`` naming the offending argument and the expected shape/dtype."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"fae: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            expected = "[B, Hq, Lq, D]" if name == "q" else "[B, Hkv, Lk, D]"
            raise ValueError(f"fae: {name} must be a 4-D tensor {expected}, got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(
                f"fae: {name} must have a floating dtype (float16, bfloat16, float32, float64), got {t.dtype}"
            )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"fae: q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"fae: q, k and v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    batch, heads_q, _, head_dim = q.shape
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"fae: v must have k's shape [B, Hkv, Lk, D] = {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[0] != batch:
        raise ValueError(f"fae: k must have q's batch size B={batch} in [B, Hkv, Lk, D], got {tuple(k.shape)}")
    if k.shape[3] != head_dim:
        raise ValueError(f"fae: k must have q's head dim D={head_dim} in [B, Hkv, Lk, D], got {tuple(k.shape)}")
    heads_kv = k.shape[1]
    if heads_kv == 0 or heads_q % heads_kv != 0:
        raise ValueError(
            f"fae: q's head count Hq={heads_q} must be a multiple of k's Hkv={heads_kv} (k: [B, Hkv, Lk, D])"
        )
    if k.shape[2] == 0:
        raise ValueError(f"fae: k must have at least one key (Lk >= 1) in [B, Hkv, Lk, D], got {tuple(k.shape)}")
    if head_dim == 0:
        raise ValueError(f"fae: q must have a head dim D >= 1 in [B, Hq, Lq, D], got {tuple(q.shape)}")
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"fae: scale must be a finite float > 0 or None, got {scale}")


def fae_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact FAE in PyTorch, chunked over queries (memory O(B * Hq * chunk * Lk)).

    q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D] -> out [B, Hq, Lq, D] (q.dtype, contiguous),
    entropy [B, Hq, Lq] fp32. Math in fp32, or fp64 for fp64 inputs.
    """
    batch, heads_q, len_q, head_dim = q.shape
    heads_kv, len_k = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty((batch, heads_q, len_q, head_dim), dtype=q.dtype, device=q.device)
    ent = torch.empty((batch, heads_q, len_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, ent
    # [B, Hkv, 1, Lk, D]: broadcast over the G query heads that share a key/value head.
    k_c = k.to(compute).unsqueeze(2)
    v_c = v.to(compute).unsqueeze(2)
    chunk = max(1, _TORCH_SCORE_BUDGET // (batch * heads_q * len_k))
    log_lk = math.log(len_k)
    for start in range(0, len_q, chunk):
        stop = min(len_q, start + chunk)
        rows = stop - start
        q_c = q[:, :, start:stop].to(compute).reshape(batch, heads_kv, group, rows, head_dim)
        x = torch.matmul(q_c, k_c.transpose(-1, -2)).mul_(scale)  # [B, Hkv, G, rows, Lk]
        x.sub_(x.amax(dim=-1, keepdim=True))  # x = s - max(s) <= 0
        p = torch.exp(x)
        l_sum = p.sum(dim=-1, keepdim=True)
        t_sum = (p * x).sum(dim=-1, keepdim=True)  # sum p (s - m) <= 0
        o = torch.matmul(p, v_c).div_(l_sum)
        h = (torch.log(l_sum) - t_sum / l_sum).squeeze(-1).clamp_(0.0, log_lk)
        out[:, :, start:stop] = o.reshape(batch, heads_q, rows, head_dim).to(q.dtype)
        ent[:, :, start:stop] = h.reshape(batch, heads_q, rows).to(torch.float32)
    return out, ent


def _impl_choice() -> str:
    impl = os.environ.get(_IMPL_ENV, "auto").lower()
    if impl not in _IMPLS:
        raise ValueError(f"fae: environment variable {_IMPL_ENV} must be one of {_IMPLS}, got {impl!r}")
    return impl


def _use_triton(q: torch.Tensor) -> bool:
    global _warned_fallback
    impl = _impl_choice()
    if impl == "torch":
        return False
    if impl == "triton":
        if _fae_triton_mod is None:
            raise RuntimeError(f"fae: {_IMPL_ENV}=triton but triton could not be imported")
        return True
    if q.device.type != "cuda":
        return False
    fits = (
        _fae_triton_mod is not None
        and q.dtype in _TRITON_DTYPES
        and q.shape[-1] <= _fae_triton_mod.MAX_HEAD_DIM
    )
    if not fits and not _warned_fallback:
        _warned_fallback = True
        logger.warning(
            "fae: CUDA input (dtype %s, head dim %d) is outside the Triton kernel's range; "
            "using the chunked PyTorch path",
            q.dtype,
            q.shape[-1],
        )
    return fits


_OP_SCHEMA = "(Tensor q, Tensor k, Tensor v, float? scale=None, bool head_mean=False) -> (Tensor, Tensor)"


@torch.library.custom_op("toprovar::fae", mutates_args=(), schema=_OP_SCHEMA)
def _fae_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, head_mean: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    validate_fae_inputs(q, k, v, scale)
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if _use_triton(q):
        out, ent = _fae_triton_mod.fae_triton(q, k, v, sm_scale)
    else:
        out, ent = fae_torch(q, k, v, sm_scale)
    if head_mean:
        ent = ent.mean(dim=1)
    return out, ent


@_fae_op.register_fake
def _fae_fake(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, head_mean: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    # Symbolic sizes flow through unchanged (no int() on them): Dynamo keeps Lq dynamic.
    batch, heads_q, len_q, head_dim = q.shape
    out = q.new_empty((batch, heads_q, len_q, head_dim))
    ent_shape = (batch, len_q) if head_mean else (batch, heads_q, len_q)
    return out, q.new_empty(ent_shape, dtype=torch.float32)


FAE_OP = torch.ops.toprovar.fae.default
"""The ``OpOverload`` that graph rewrites emit as the FX target."""


def fae(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, *, head_mean: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and per-query attention entropy (nats) in one pass.

    Args:
        q: ``[B, Hq, Lq, D]`` queries (fp16, bf16, fp32 or fp64; any strides).
        k: ``[B, Hkv, Lk, D]`` keys, ``Hq % Hkv == 0``, ``Lk >= 1``.
        v: ``[B, Hkv, Lk, D]`` values.
        scale: softmax scale > 0; ``None`` means ``1 / sqrt(D)``.
        head_mean: return the entropy averaged over query heads, ``[B, Lq]``.

    Returns:
        ``(out, entropy)``: ``out`` ``[B, Hq, Lq, D]`` in q's dtype, ``entropy`` fp32
        ``[B, Hq, Lq]`` (or ``[B, Lq]``).

    Raises:
        ValueError: on a bad shape, dtype, device or scale (the message names the argument).
    """
    validate_fae_inputs(q, k, v, scale)
    return FAE_OP(q, k, v, scale, head_mean)


def reference_attention_entropy(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialising float64 reference: ``(out [B, Hq, Lq, D], entropy [B, Hq, Lq])``, both fp64.

    Memory is O(B * Hq * Lq * Lk); for tests and benchmarks only.
    """
    validate_fae_inputs(q, k, v, scale)
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    group = q.shape[1] // k.shape[1]
    q64 = q.to(torch.float64)
    k64 = k.to(torch.float64).repeat_interleave(group, dim=1)
    v64 = v.to(torch.float64).repeat_interleave(group, dim=1)
    scores = torch.matmul(q64, k64.transpose(-1, -2)) * sm_scale
    log_a = torch.log_softmax(scores, dim=-1)
    a = log_a.exp()
    return torch.matmul(a, v64), -(a * log_a).sum(dim=-1)
