"""Flash-Attention-Entropy (FAE): a Triton forward kernel that returns softmax attention and the
exact Shannon entropy of every query's attention row in one streaming pass.

Algorithm
---------
For one query row with scores ``s_j = scale * q . k_j`` (j = 1..Lk) the attention weights are
``a_j = exp(s_j - m) / l`` with ``m = max_j s_j`` and ``l = sum_j exp(s_j - m)``. Their entropy is

    H = -sum_j a_j log a_j = log(l) - (1 / l) * sum_j exp(s_j - m) * (s_j - m).

Both sums are streamed over key blocks exactly like FlashAttention-2 streams ``l`` and the output
accumulator. We keep, per row, the running maximum ``m``, ``l = sum exp(s - m)`` and
``t = sum exp(s - m) * (s - m)`` *relative to the current maximum*. When a block raises the
maximum from ``m`` to ``m'`` (``alpha = exp(m - m')``)::

    l' = alpha * l + sum_blk exp(s - m')
    t' = alpha * (t - (m' - m) * l) + sum_blk exp(s - m') * (s - m')

because ``s - m = (s - m') + (m' - m)``. Every term of ``t`` is <= 0, so at the end
``H = log(l) - t / l`` is a sum of two non-negative numbers: there is no cancellation, unlike the
equivalent ``H = m + log(l) - (sum exp(s - m) * s) / l`` whose three terms can each be large.
The kernel works in the log2 domain (scores pre-multiplied by ``log2(e)``, ``exp2`` on the
special-function unit) and converts once at the end: ``H = ln(2) * (log2(l) - t2 / l)`` where
``t2`` is ``t`` in log2 units. Per score element the entropy costs one extra fused multiply-add
(``p * x`` into a row sum) on top of FlashAttention's work; per row it costs a few scalars.

Origin and what changed
-----------------------
The loop structure follows FlashAttention-2 (Dao, 2023) as written in Triton's tutorial
``06-fused-attention.py``; this file is an independent rewrite, not a copy. Changes:

* the entropy accumulator ``t`` above, and an fp32 entropy output ``[B, Hq, Lq]``;
* no causal stage and no backward (the op serves unmasked inference attention);
* arbitrary strides for q/k/v (``[B, L, H, D]`` tensors viewed as ``[B, H, L, D]`` need no copy),
  GQA (query head ``h`` reads key/value head ``h // (Hq // Hkv)``), ``Lq != Lk``;
* any head dim 1..256: the tile width is the next power of two (at least 16, ``tl.dot``'s minimum)
  and the padded columns are masked to zero on load;
* lengths that are not multiples of the block sizes: the key loop runs unmasked over full blocks
  and a peeled last block masks its scores. Ragged Lq/Lk are runtime branches (they touch only the
  prologue, epilogue and the tail block), so one compiled kernel serves every VAR scale; only
  ``EVEN_D`` (head dim already a power of two) is a compile-time heuristic;
* a second variant (``use_tma``) loads q/k/v through Hopper's tensor-memory accelerator with
  4-D host tensor descriptors (zero-filled out of bounds, any 16-byte aligned strides);
* launch parameters come from two small tables keyed by padded head dim and dtype, the choice
  between them bucketed by the number of programs relative to the SM count (fewer than 4 waves
  of 128-row programs: smaller tiles), never by sequence length itself: VAR models change
  Lq/Lk at every scale and an autotuner keyed on lengths would re-tune (and re-compile) at every
  scale. Lq and Lk are not specialised on, so one compiled kernel serves all scales;
* an optional lazy rescaling of the output accumulator (FlashAttention-4's trick: rescale only
  when the running maximum grows by more than 2**8). It is correct but slower on the H200 with
  Triton 3.6 (the block-uniform branch around the accumulator breaks the async-wgmma pipeline),
  so the tables do not use it.

Cautions
--------
* Scores of masked (out of range) keys are set to a large finite negative number, not ``-inf``:
  ``p * x`` would be ``0 * -inf = nan``. The running maximum starts at the same finite value so
  that ``(m' - m) * l`` is ``1e30 * 0 = 0`` on the first block.
* fp32 inputs use ``input_precision="ieee"`` (no tf32) so that fp32 accuracy matches a plain fp32
  attention; that path does not use the tensor cores' fast modes.
* Offsets inside one (batch, head) slab are 32-bit: each slab must hold < 2**31 elements.
* The entropy is clamped to ``[0, log(Lk)]``, its mathematical range; the clamp only removes
  rounding excursions of a few ulps.
* Head-mean entropy is *not* fused here: the caller averages the per-head output with one tiny
  torch reduction, which is deterministic (a fused ``atomic_add`` over heads would make the
  result depend on the order in which programs finish).

* Host overhead: a TMA launch costs ~100 us of CPU (four host tensor descriptors are encoded per
  call) against ~55 us with pointer loads, and the Python custom op adds ~45 us (H200 machine,
  torch 2.11). Kernels shorter than that are CPU-bound unless the caller uses CUDA graphs.
* The interpreter's bf16 support is partial (``tl.dot`` multiplies bf16 bit patterns and the
  fp32 -> bf16 cast truncates): ``UPCAST_DOT`` widens the operands and rounds p and the output
  to nearest-even bf16 by hand, so CPU tests see the GPU's numerics. GPU code never takes it.

GPUs tested
-----------
NVIDIA H200 (sm_90, 132 SMs; torch 2.11 + triton 3.6): every head dim 16..256, fp16/bf16/fp32,
GQA, [B, L, H, D] views, both load variants, against a float64 reference; Infinity-2B's last
three 1024px scales (bf16, D=128) run at 1.05x / 1.08x / 1.06x the fastest torch SDPA backend
(cuDNN): 0.247 / 0.505 / 1.353 ms, 437-522 TFLOP/s, with wgmma (HGMMA) and TMA in the compiled
code, 251 registers and no spills. The entropy costs 2-5% over the same kernel without it.
The CPU interpreter (``TRITON_INTERPRET=1``, triton 3.9) runs the same kernels in CI.
See ``docs/fae.md`` and ``benchmarks/results/fae.md``.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

try:  # host-side TMA descriptors appeared in triton 3.3
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - old triton
    TensorDescriptor = None

logger = logging.getLogger(__name__)

LOG2E = 1.4426950408889634  # log2(e): scores are kept in log2 units inside the kernel
LN2 = 0.6931471805599453  # ln(2): converts the log2-domain entropy back to nats
# Stand-in for -inf (see Cautions): finite so 0 * score stays 0, far below any real score.
_NEG_BIG = tl.constexpr(-1.0e30)
_LN2 = tl.constexpr(LN2)
# Lazy rescaling threshold in log2 units: p = 2**(s - m_ref) stays <= 2**8 between rescales.
_LAZY_RESCALE_LOG2 = tl.constexpr(8.0)
MIN_DOT_DIM = 16  # tl.dot needs every operand dimension >= 16
MAX_HEAD_DIM = 256  # the largest head dim the tables below are sized for (registers, smem)
_TMA_ALIGN_BYTES = 16  # TMA needs 16-byte aligned base pointers and non-unit strides
# Use the TMA (tensor-descriptor) variant wherever it applies (sm_90+, 16-byte aligned strides):
# 7-12% faster than pointer loads at every Infinity-2B shape on the H200 sweep.
PREFER_TMA = True


@dataclass(frozen=True)
class FaeConfig:
    """Launch parameters of one FAE kernel instance.

    ``block_m`` query rows per program, ``block_n`` keys per inner step, ``num_warps`` and
    ``num_stages`` (software-pipelining depth of the key/value loads), ``use_tma`` selects the
    tensor-descriptor variant (sm_90+ only), ``warp_specialize`` asks Triton to split the key
    loop into producer/consumer warps (only where the Triton build supports it),
    ``lazy_rescale`` skips the output rescale until the running maximum grows by 2**8.
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    use_tma: bool = False
    warp_specialize: bool = False
    lazy_rescale: bool = False


# Launch tables for 16-bit inputs, keyed by padded head dim, from the H200 sweeps in
# benchmarks/bench_fae.py (see benchmarks/results/fae.md). Two tables, chosen by how many
# programs the launch has, not by Lq/Lk themselves: with at least _MIN_WAVES_FOR_LARGE_TILES
# waves of 128-row programs, D=128 runs fastest with 128x128 tiles and 8 warps (two
# warpgroups, each a 64-row wgmma tile); with fewer, the last partial wave dominates and 64-row
# tiles with one warpgroup (two programs per SM) win. At Infinity-2B's scale 11 (416 programs of
# 128 rows on 132 SMs) that is 0.247 ms vs 0.274 ms; at scales 12-13 the large tiles are 6-9%
# faster. D <= 64 prefers 64x64 tiles at any size (0.625 vs 0.707 ms at 4x16x2304x64, Lk 6425),
# D=256 prefers 128x64 tiles with 8 warps (0.625 vs 0.773 ms at 2x8x2304x256, Lk 6425).
_TABLE_16BIT_LARGE: dict[int, FaeConfig] = {
    16: FaeConfig(64, 64, 4, 3),
    32: FaeConfig(64, 64, 4, 3),
    64: FaeConfig(64, 64, 4, 3),
    128: FaeConfig(128, 128, 8, 3),  # smem: q 32 KiB + 3 stages x (k + v) 64 KiB = 224 KiB
    256: FaeConfig(128, 64, 8, 2),  # smem: q 64 KiB + 2 stages x (k + v) 64 KiB = 192 KiB
}
_TABLE_16BIT_SMALL: dict[int, FaeConfig] = {
    16: FaeConfig(64, 64, 4, 3),
    32: FaeConfig(64, 64, 4, 3),
    64: FaeConfig(64, 64, 4, 3),
    128: FaeConfig(64, 64, 4, 3),
    256: FaeConfig(128, 64, 8, 2),  # also best with few programs (288 at 2x8x2304x256)
}
_MIN_WAVES_FOR_LARGE_TILES = 4
# fp32 inputs: operands are twice as wide and use the ieee (FMA, not tensor-core) dot; small
# tiles, pointer loads. fp32 is a correctness path here, not a tuned one.
_TABLE_32BIT: dict[int, FaeConfig] = {
    16: FaeConfig(64, 64, 4, 2),
    32: FaeConfig(64, 64, 4, 2),
    64: FaeConfig(64, 32, 4, 2),
    128: FaeConfig(64, 32, 4, 2),
    256: FaeConfig(32, 32, 4, 1),
}
# Under TRITON_INTERPRET=1 (CPU tests) every tl op is a numpy call: small tiles keep the test
# shapes multi-block (exercising the masking and the streaming update) and the run short.
_INTERPRET_CONFIG = FaeConfig(32, 32, 4, 1)


def interpret_mode() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def padded_head_dim(head_dim: int) -> int:
    """Tile width for a head dim: next power of two, at least ``MIN_DOT_DIM``."""
    return max(MIN_DOT_DIM, triton.next_power_of_2(head_dim))


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def select_config(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> FaeConfig:
    """Launch parameters from the tables: a function of (head dim, dtype, TMA support, number of
    128-row programs relative to the SM count), never of Lq/Lk directly (module docstring)."""
    if interpret_mode() or q.device.type != "cuda":
        return _INTERPRET_CONFIG
    d_pad = padded_head_dim(q.shape[-1])
    if q.dtype == torch.float32:
        return _TABLE_32BIT[d_pad]
    batch, heads_q, len_q, _ = q.shape
    programs = triton.cdiv(len_q, _TABLE_16BIT_LARGE[d_pad].block_m) * batch * heads_q
    many = programs >= _MIN_WAVES_FOR_LARGE_TILES * _sm_count(q.device.index or 0)
    table = _TABLE_16BIT_LARGE if many else _TABLE_16BIT_SMALL
    return replace(table[d_pad], use_tma=PREFER_TMA and tma_supported(q, k, v))


def tma_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the tensor-descriptor variant can read these tensors (sm_90+, aligned strides)."""
    if TensorDescriptor is None or q.device.type != "cuda" or interpret_mode():
        return False
    if torch.cuda.get_device_capability(q.device)[0] < 9:
        return False
    for t in (q, k, v):
        if t.stride(-1) != 1 or t.data_ptr() % _TMA_ALIGN_BYTES:
            return False
        if any((s * t.element_size()) % _TMA_ALIGN_BYTES for s in t.stride()[:-1]):
            return False
    return True


@triton.jit
def _round_fp32_to_bf16_rne(x):
    """fp32 -> fp32 holding the nearest-even bf16 value (round-to-nearest-even on the bits).

    Interpreter only: its fp32 -> bf16 cast truncates, unlike the GPU's cvt.rn, which would bias
    every rounded probability downward. Finite inputs only (p and the output are finite).
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _fae_scores(q, k, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Raw scores q k^T: q [BLOCK_M, D_PAD], k [BLOCK_N, D_PAD] -> [BLOCK_M, BLOCK_N] fp32.

    UPCAST_DOT is for the CPU interpreter, whose tl.dot cannot read bf16: operands are widened
    to fp32 (exact products of the bf16 values, as the tensor cores compute them).
    """
    if UPCAST_DOT:
        return tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    return tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)


@triton.jit
def _fae_softmax_pv(
    acc, l_i, m_i, t_i, s, v, qk_scale, n_ok,
    MASK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    ENTROPY: tl.constexpr, LAZY_RESCALE: tl.constexpr,
):  # fmt: skip
    """Streaming update with one block of raw scores; returns the new (acc, l_i, m_i, t_i).

    acc [BLOCK_M, D_PAD] fp32, l_i / m_i / t_i [BLOCK_M] fp32 (m_i, t_i in log2 units),
    s [BLOCK_M, BLOCK_N] raw scores, v [BLOCK_N, D_PAD], n_ok [BLOCK_N] bool (valid keys; read
    only when MASK_N). ``qk_scale > 0`` lets the row maximum be taken before scaling, so the
    shift is one fused multiply-add per score.

    LAZY_RESCALE keeps a stale reference maximum until some row's block maximum exceeds it by
    more than ``_LAZY_RESCALE_LOG2`` (p then stays <= 2**8, harmless in fp32 and after the cast
    to bf16/fp16), skipping the ``acc * alpha`` rescale on most blocks; the entropy identity holds
    for any reference, see the module docstring. ENTROPY=False drops the entropy accumulator
    (benchmark ablation only). With UPCAST_DOT (interpreter) p is rounded to bf16 as on the GPU.
    """
    if MASK_N:
        s = tl.where(n_ok[None, :], s, _NEG_BIG)
    m_blk = tl.max(s, 1) * qk_scale
    if LAZY_RESCALE:
        if tl.max(m_blk - m_i, 0) > _LAZY_RESCALE_LOG2:  # block-uniform branch
            m_new = tl.maximum(m_i, m_blk)
            alpha = tl.math.exp2(m_i - m_new)
            t_i = alpha * (t_i - (m_new - m_i) * l_i)
            l_i = alpha * l_i
            acc = acc * alpha[:, None]
            m_i = m_new
        x = s * qk_scale - m_i[:, None]  # (score - reference max) in log2 units, <= 8
        p = tl.math.exp2(x)
        if ENTROPY:
            t_i += tl.sum(p * x, 1)
        l_i += tl.sum(p, 1)
    else:
        m_new = tl.maximum(m_i, m_blk)
        x = s * qk_scale - m_new[:, None]  # (score - running max) in log2 units, <= 0
        p = tl.math.exp2(x)
        alpha = tl.math.exp2(m_i - m_new)
        if ENTROPY:
            t_i = alpha * (t_i - (m_new - m_i) * l_i) + tl.sum(p * x, 1)
        l_i = alpha * l_i + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        m_i = m_new
    if UPCAST_DOT:
        acc = tl.dot(_round_fp32_to_bf16_rne(p), v.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_i, t_i


@triton.jit
def _fae_update(
    acc, l_i, m_i, t_i, q, k, v, qk_scale, n_ok,
    MASK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    ENTROPY: tl.constexpr, LAZY_RESCALE: tl.constexpr,
):  # fmt: skip
    """One streaming step over a key block: scores, then the softmax/entropy/PV update."""
    s = _fae_scores(q, k, DOT_PRECISION, UPCAST_DOT)
    return _fae_softmax_pv(
        acc, l_i, m_i, t_i, s, v, qk_scale, n_ok, MASK_N, DOT_PRECISION, UPCAST_DOT, ENTROPY, LAZY_RESCALE
    )


@triton.jit
def _fae_finish(acc, l_i, t_i, log_lk, UPCAST_DOT: tl.constexpr):
    """Normalise the output and turn (l, t) into the entropy in nats, clamped to [0, log Lk]."""
    out = acc / l_i[:, None]
    if UPCAST_DOT:  # interpreter + bf16: round like the GPU before the (truncating) cast
        out = _round_fp32_to_bf16_rne(out)
    ent = _LN2 * (tl.math.log2(l_i) - t_i / l_i)
    ent = tl.minimum(tl.maximum(ent, 0.0), log_lk)
    return out, ent


@triton.jit
def _fae_ptr_step(
    acc, l_i, m_i, t_i, q, k_ptrs, v_ptrs, start_n, Lk, offs_n, d_ok, qk_scale,
    stride_kn, stride_vn,
    MASK_N: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr, ENTROPY: tl.constexpr, LAZY_RESCALE: tl.constexpr,
):  # fmt: skip
    """Load the key/value block at ``start_n`` through pointers (masked as needed), then update."""
    n_ok = (start_n + offs_n) < Lk
    if MASK_N:
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptrs + start_n * stride_kn, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs + start_n * stride_vn, mask=kv_mask, other=0.0)
    elif EVEN_D:
        k = tl.load(k_ptrs + start_n * stride_kn)
        v = tl.load(v_ptrs + start_n * stride_vn)
    else:
        k = tl.load(k_ptrs + start_n * stride_kn, mask=d_ok[None, :], other=0.0)
        v = tl.load(v_ptrs + start_n * stride_vn, mask=d_ok[None, :], other=0.0)
    return _fae_update(
        acc, l_i, m_i, t_i, q, k, v, qk_scale, n_ok, MASK_N, DOT_PRECISION, UPCAST_DOT, ENTROPY, LAZY_RESCALE
    )


# Only EVEN_D is a compile-time specialisation (it changes the loads inside the key loop and is
# fixed per model). Ragged Lq / Lk are handled by runtime branches that touch only the prologue,
# epilogue and one peeled tail block: as constexprs (EVEN_M / EVEN_N heuristics) they would
# multiply the compiled variants as VAR's token counts change from scale to scale.
@triton.heuristics({"EVEN_D": lambda a: a["HEAD_DIM"] == a["HEAD_DIM_PAD"]})
@triton.jit(do_not_specialize=["Lq", "Lk"])
def _fae_fwd_kernel(
    Q,  # [B, Hq, Lq, D], any strides
    K,  # [B, Hkv, Lk, D], any strides
    V,  # [B, Hkv, Lk, D], any strides
    Out,  # [B, Hq, Lq, D]
    Ent,  # [B, Hq, Lq] fp32
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_eb, stride_eh, stride_em,
    num_heads_q, group_size, Lq, Lk,
    qk_scale,  # softmax scale * log2(e)
    log_lk,  # ln(Lk): upper clamp of the entropy
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    ENTROPY: tl.constexpr,
    LAZY_RESCALE: tl.constexpr,
    WARP_SPEC: tl.constexpr,
    EVEN_D: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads_q).to(tl.int64)
    h = (pid_bh % num_heads_q).to(tl.int64)
    hk = h // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < Lq

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    k_ptrs = K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd

    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], _NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    t_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

    # Full key blocks without masks, then the partial last block (if any) with masks.
    n_full = (Lk // BLOCK_N) * BLOCK_N
    if WARP_SPEC:
        for start_n in tl.range(0, n_full, BLOCK_N, warp_specialize=True):
            acc, l_i, m_i, t_i = _fae_ptr_step(
                acc, l_i, m_i, t_i, q, k_ptrs, v_ptrs, tl.multiple_of(start_n, BLOCK_N), Lk, offs_n, d_ok,
                qk_scale, stride_kn, stride_vn, False, EVEN_D, DOT_PRECISION, UPCAST_DOT, ENTROPY, LAZY_RESCALE,
            )  # fmt: skip
    else:
        for start_n in tl.range(0, n_full, BLOCK_N):
            acc, l_i, m_i, t_i = _fae_ptr_step(
                acc, l_i, m_i, t_i, q, k_ptrs, v_ptrs, tl.multiple_of(start_n, BLOCK_N), Lk, offs_n, d_ok,
                qk_scale, stride_kn, stride_vn, False, EVEN_D, DOT_PRECISION, UPCAST_DOT, ENTROPY, LAZY_RESCALE,
            )  # fmt: skip
    if n_full < Lk:  # ragged tail: one masked block
        acc, l_i, m_i, t_i = _fae_ptr_step(
            acc, l_i, m_i, t_i, q, k_ptrs, v_ptrs, n_full, Lk, offs_n, d_ok,
            qk_scale, stride_kn, stride_vn, True, EVEN_D, DOT_PRECISION, UPCAST_DOT, ENTROPY, LAZY_RESCALE,
        )  # fmt: skip

    out, ent = _fae_finish(acc, l_i, t_i, log_lk, UPCAST_DOT)
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    e_ptrs = Ent + b * stride_eb + h * stride_eh + offs_m * stride_em
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(e_ptrs, ent, mask=m_ok)


@triton.jit
def _fae_tma_step(
    acc, l_i, m_i, t_i, q, desc_k, desc_v, b, hk, start_n, Lk, offs_n, qk_scale,
    BLOCK_N: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    MASK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr, ENTROPY: tl.constexpr, LAZY_RESCALE: tl.constexpr,
):  # fmt: skip
    """Load the key/value block at ``start_n`` through TMA (zero-filled past Lk and D), update."""
    k = desc_k.load([b, hk, start_n, 0]).reshape(BLOCK_N, HEAD_DIM_PAD)
    v = desc_v.load([b, hk, start_n, 0]).reshape(BLOCK_N, HEAD_DIM_PAD)
    n_ok = (start_n + offs_n) < Lk
    return _fae_update(
        acc, l_i, m_i, t_i, q, k, v, qk_scale, n_ok, MASK_N, DOT_PRECISION, UPCAST_DOT, ENTROPY, LAZY_RESCALE
    )


@triton.jit(do_not_specialize=["Lq", "Lk"])
def _fae_fwd_tma_kernel(
    desc_q,  # 4-D descriptor over q [B, Hq, Lq, D], block [1, 1, BLOCK_M, D_PAD]
    desc_k,  # 4-D descriptor over k [B, Hkv, Lk, D], block [1, 1, BLOCK_N, D_PAD]
    desc_v,  # 4-D descriptor over v [B, Hkv, Lk, D], block [1, 1, BLOCK_N, D_PAD]
    desc_o,  # 4-D descriptor over out [B, Hq, Lq, D], block [1, 1, BLOCK_M, D_PAD]
    Ent,  # [B, Hq, Lq] fp32
    stride_eb, stride_eh, stride_em,
    num_heads_q, group_size, Lq, Lk,
    qk_scale,
    log_lk,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    ENTROPY: tl.constexpr,
    LAZY_RESCALE: tl.constexpr,
    WARP_SPEC: tl.constexpr,
):  # fmt: skip
    # Out-of-bounds rows and columns of every TMA load read as zero and out-of-bounds parts of
    # the output store are dropped, so only the scores of the last key block need a mask.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads_q
    h = pid_bh % num_heads_q
    hk = h // group_size
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)

    q = desc_q.load([b, h, start_m, 0]).reshape(BLOCK_M, HEAD_DIM_PAD)
    m_i = tl.full([BLOCK_M], _NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    t_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

    n_full = (Lk // BLOCK_N) * BLOCK_N
    if WARP_SPEC:
        for start_n in tl.range(0, n_full, BLOCK_N, warp_specialize=True):
            acc, l_i, m_i, t_i = _fae_tma_step(
                acc, l_i, m_i, t_i, q, desc_k, desc_v, b, hk, tl.multiple_of(start_n, BLOCK_N), Lk, offs_n,
                qk_scale, BLOCK_N, HEAD_DIM_PAD, False, DOT_PRECISION, UPCAST_DOT, ENTROPY, LAZY_RESCALE,
            )  # fmt: skip
    else:
        for start_n in tl.range(0, n_full, BLOCK_N):
            acc, l_i, m_i, t_i = _fae_tma_step(
                acc, l_i, m_i, t_i, q, desc_k, desc_v, b, hk, tl.multiple_of(start_n, BLOCK_N), Lk, offs_n,
                qk_scale, BLOCK_N, HEAD_DIM_PAD, False, DOT_PRECISION, UPCAST_DOT, ENTROPY, LAZY_RESCALE,
            )  # fmt: skip
    if n_full < Lk:  # ragged tail: one masked block
        acc, l_i, m_i, t_i = _fae_tma_step(
            acc, l_i, m_i, t_i, q, desc_k, desc_v, b, hk, n_full, Lk, offs_n,
            qk_scale, BLOCK_N, HEAD_DIM_PAD, True, DOT_PRECISION, UPCAST_DOT, ENTROPY, LAZY_RESCALE,
        )  # fmt: skip

    out, ent = _fae_finish(acc, l_i, t_i, log_lk, UPCAST_DOT)
    desc_o.store([b, h, start_m, 0], out.to(desc_o.dtype).reshape(1, 1, BLOCK_M, HEAD_DIM_PAD))
    e_ptrs = Ent + b.to(tl.int64) * stride_eb + h.to(tl.int64) * stride_eh + offs_m * stride_em
    tl.store(e_ptrs, ent, mask=offs_m < Lq)


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get an exact fp32 dot (no tf32); 16-bit inputs use the tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _is_out_of_resources(err: Exception) -> bool:
    return type(err).__name__ == "OutOfResources"


def _shrink(config: FaeConfig) -> FaeConfig | None:
    """A smaller configuration to try when ``config`` does not fit this GPU's shared memory."""
    if config.num_stages > 1:
        return replace(config, num_stages=config.num_stages - 1)
    if config.block_n > MIN_DOT_DIM:
        return replace(config, block_n=config.block_n // 2)
    if config.block_m > MIN_DOT_DIM:
        return replace(config, block_m=config.block_m // 2)
    return None


# (head_dim_pad, dtype, device index, table config) -> the configuration that launched: differs
# from the table entry only when it had to be shrunk to fit this GPU's shared memory.
_FITTED: dict[tuple[int, torch.dtype, int, FaeConfig], FaeConfig] = {}


def launch_fae(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, ent: torch.Tensor,
    scale: float, config: FaeConfig, *, entropy: bool = True,
):  # fmt: skip
    """Launch one FAE kernel into preallocated ``out`` [B, Hq, Lq, D] / ``ent`` [B, Hq, Lq].

    Returns Triton's compiled-kernel handle (its ``asm`` dict holds ttgir/ptx for inspection).
    ``entropy=False`` compiles the kernel without the entropy accumulator (benchmark ablation;
    ``ent`` then holds zeros). ``scale`` must be > 0.
    """
    batch, heads_q, len_q, head_dim = q.shape
    heads_kv, len_k = k.shape[1], k.shape[2]
    d_pad = padded_head_dim(head_dim)
    grid = (triton.cdiv(len_q, config.block_m), batch * heads_q)
    common = dict(
        num_heads_q=heads_q,
        group_size=heads_q // heads_kv,
        Lq=len_q,
        Lk=len_k,
        qk_scale=scale * LOG2E,
        log_lk=math.log(len_k),
        HEAD_DIM_PAD=d_pad,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        DOT_PRECISION=_dot_precision(q.dtype),
        UPCAST_DOT=interpret_mode() and q.dtype == torch.bfloat16,
        ENTROPY=entropy,
        LAZY_RESCALE=config.lazy_rescale,
        WARP_SPEC=config.warp_specialize,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if config.use_tma:
        blk_q = [1, 1, config.block_m, d_pad]
        blk_kv = [1, 1, config.block_n, d_pad]
        return _fae_fwd_tma_kernel[grid](
            TensorDescriptor(q, list(q.shape), list(q.stride()), blk_q),
            TensorDescriptor(k, list(k.shape), list(k.stride()), blk_kv),
            TensorDescriptor(v, list(v.shape), list(v.stride()), blk_kv),
            TensorDescriptor(out, list(out.shape), list(out.stride()), blk_q),
            ent, *ent.stride(), **common,
        )  # fmt: skip
    return _fae_fwd_kernel[grid](
        q, k, v, out, ent,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *ent.stride(),
        HEAD_DIM=head_dim, **common,
    )  # fmt: skip


def fae_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, config: FaeConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the FAE kernel: q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D] (validated by the caller).

    Returns ``out`` [B, Hq, Lq, D] (contiguous, q.dtype) and the entropy [B, Hq, Lq] (fp32, nats).
    ``config`` overrides the launch table (benchmarks and tests); a table entry that does not
    fit the GPU's shared memory is shrunk step by step and the fitted entry remembered.
    """
    batch, heads_q, len_q, head_dim = q.shape
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"fae_triton: head dim {head_dim} > {MAX_HEAD_DIM} is not supported")
    if not scale > 0:
        raise ValueError(f"fae_triton: scale must be > 0, got {scale}")
    out = torch.empty((batch, heads_q, len_q, head_dim), dtype=q.dtype, device=q.device)
    ent = torch.empty((batch, heads_q, len_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, ent
    explicit = config is not None
    if config is None:
        config = select_config(q, k, v)
        key = (padded_head_dim(head_dim), q.dtype, q.device.index or 0, config)
        config = _FITTED.get(key, config)
    while True:
        try:
            launch_fae(q, k, v, out, ent, scale, config)
            break
        except Exception as err:  # triton raises its own OutOfResources type
            smaller = None if explicit or not _is_out_of_resources(err) else _shrink(config)
            if smaller is None:
                raise
            logger.info("fae_triton: %s does not fit (%s); trying %s", config, err, smaller)
            config = smaller
    if not explicit:
        _FITTED[key] = config
    return out, ent
