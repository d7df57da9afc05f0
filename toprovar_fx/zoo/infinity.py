"""Infinity-style text-conditional next-scale (bitwise) generator, written from scratch.

Structure (see ``docs/zoo.md``, section "Infinity-style"):

* text: packed variable-length embeddings ``label_B_or_BLT = (kv_compact [sum(lens), Ct], lens,
  cu_seqlens_k int32 [B+1], max_seqlen_k)``; RMS-normalised, pooled by a learned-query attention
  into the condition vector ``cond_BD`` and projected by an MLP into the cross-attention K/V
  source. :meth:`InfinityLike.encode_prompts` makes that tuple from a deterministic toy encoder.
* blocks (:class:`CrossAttnBlock`) grouped in chunks (``block_chunks[i].module[j]``): shared AdaLN
  (``cond -> 6*C`` once, plus per-block learnable ``ada_gss``), self-attention with cosine
  attention, 2-D RoPE sliced from a precomputed schedule table at the scale's sequence offset
  and a K/V cache (``cached_k``/``cached_v``), cross-attention to the text with a key-padding
  mask, and a GELU FFN::

      x = x + f_sa(x); x = x + f_ca(x); x = x + f_ffn(x)

* bitwise head: ``d`` bits per token, logits ``[B, L, d, 2]``; bits -> ±1/sqrt(d) codes ->
  accumulated at the final resolution; the next scale's input is the accumulated codes
  area-downsampled to its grid and embedded by ``word_embed`` (Linear d -> C).
* a small random conv decoder maps the final summed codes to an image in ``[0, 1]``.

Weights are random (deterministic from ``seed``) and initialised so that attention matters.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import reference_pruning
from .bsq import BitwiseDecoder, bits_to_codes, downsample_codes, upsample_codes
from .rope2d import apply_rope2d, rope2d_table

Schedule = list[tuple[int, int]]
TextCond = tuple[torch.Tensor, list[int], torch.Tensor, int]

# ----------------------------------------------------------------------------------------------
# scale schedules
# ----------------------------------------------------------------------------------------------

#: side lengths of the square schedules
BASE_SIDES: dict[int, tuple[int, ...]] = {
    1024: (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64),
    256: (1, 2, 4, 6, 8, 12, 16),
}

# The published ~1M-pixel grids (13 scales, 16 px per token) of the Infinity family for its
# tall aspect-ratio templates, h:w -> [(h, w), ...]; the wide ones are their transposes. The
# shipped policies (toprovar_fx/policies/infinity-2b.yaml, -8b) list the same grids, so the
# runtime recognises every scale of every aspect ratio.
_TALL_1024: dict[tuple[int, int], Schedule] = {
    (5, 4): [(1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24), (35, 28),
             (45, 36), (55, 44), (70, 56)],
    (4, 3): [(1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21), (36, 27),
             (48, 36), (60, 45), (72, 54)],
    (3, 2): [(1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22), (39, 26),
             (48, 32), (63, 42), (78, 52)],
    (7, 4): [(1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20), (42, 24),
             (56, 32), (70, 40), (84, 48)],
    (2, 1): [(1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19), (46, 23),
             (60, 30), (74, 37), (90, 45)],
    (5, 2): [(1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16), (50, 20),
             (65, 26), (80, 32), (100, 40)],
    (3, 1): [(1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15), (54, 18),
             (72, 24), (90, 30), (111, 37)],
}

# The small (256 px) family: the square one is the first 7 scales of the 1024 one; the
# non-square ones hold exactly 1:2 / 2:1 at every scale but the first.
_SMALL_256: dict[tuple[int, int], Schedule] = {
    (1, 1): [(s, s) for s in BASE_SIDES[256]],
    (1, 2): [(1, 1), (1, 2), (2, 4), (3, 6), (4, 8), (6, 12), (8, 16)],
    (2, 1): [(1, 1), (2, 1), (4, 2), (6, 3), (8, 4), (12, 6), (16, 8)],
}


def _round_half_up(v: float) -> int:
    return int(math.floor(v + 0.5))


def derive_schedule(sides: Sequence[int], h_ratio: int, w_ratio: int) -> Schedule:
    """A schedule for an aspect ratio without a template: grids ``h:w ~ h_ratio:w_ratio``, ~``s*s`` tokens.

    For each square side ``s`` the short side is ``round(s * sqrt(r))`` and the long side
    ``round(short / r)`` with ``r = min(h/w, w/h)`` (area-preserving, the ratio held exactly
    where rounding allows); the first scale is always ``(1, 1)`` and sides never shrink. Pass
    the result as ``scale_schedule=`` (its RoPE table is built on first use).
    """
    r = h_ratio / w_ratio
    rs = min(r, 1.0 / r)
    out: Schedule = []
    for i, s in enumerate(sides):
        if i == 0:
            hw = (1, 1)
        else:
            short = max(1, _round_half_up(s * math.sqrt(rs)))
            long = max(1, _round_half_up(short / rs))
            hw = (short, long) if r <= 1.0 else (long, short)
            ph, pw = out[-1]
            hw = (max(hw[0], ph), max(hw[1], pw))
        out.append(hw)
    return out


def default_scale_schedules() -> dict[str, Schedule]:
    """All registered schedules, keyed ``"<px>:<h>:<w>"`` (``"1024:1:2"`` is twice as wide as high)."""
    out: dict[str, Schedule] = {"1024:1:1": [(s, s) for s in BASE_SIDES[1024]]}
    for (a, b), sched in _TALL_1024.items():
        out[f"1024:{a}:{b}"] = list(sched)
        out[f"1024:{b}:{a}"] = [(w, h) for h, w in sched]
    for (a, b), sched in _SMALL_256.items():
        out[f"256:{a}:{b}"] = list(sched)
    return out


def _key_ratio(key: str) -> float:
    _, a, b = key.split(":")
    return int(a) / int(b)


def nearest_schedule_key(h_div_w: float, resolution: int = 1024) -> str:
    """The registered key of ``resolution`` whose aspect ratio (h/w) is closest to ``h_div_w``."""
    keys = [k for k in default_scale_schedules() if k.startswith(f"{resolution}:")]
    if not keys:
        raise ValueError(f"no schedules for resolution {resolution}")
    return min(keys, key=lambda k: abs(math.log(_key_ratio(k)) - math.log(h_div_w)))


# ----------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InfinityConfig:
    """Hyper-parameters of an Infinity-style model (every field can be overridden in ``build_infinity``)."""

    depth: int
    width: int
    heads: int
    bits: int
    text_channels: int
    text_maxlen: int = 512
    mlp_ratio: float = 4.0
    block_chunks: int = 1
    default_schedule: str = "1024:1:1"
    rope_normalized: bool = True
    rope_base: float = 10000.0
    #: cosine-attention temperature per head, geometric from the first to the second value
    attn_scale_range: tuple[float, float] = (4.0, 16.0)
    decoder_channels: tuple[int, ...] = (64, 32, 32, 16, 16)
    norm_eps: float = 1e-6
    #: seed of the toy text encoder (independent of the model's weight seed)
    text_encoder_seed: int = 20240607

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def ffn_hidden(self) -> int:
        hidden = round(self.width * self.mlp_ratio / 256) * 256
        return hidden if hidden > 0 else int(self.width * self.mlp_ratio)


CONFIGS: dict[str, InfinityConfig] = {
    "tiny": InfinityConfig(
        depth=4, width=64, heads=4, bits=16, text_channels=32, text_maxlen=32, block_chunks=2,
        default_schedule="256:1:1", decoder_channels=(16, 8, 8, 8, 8),
    ),
    "2b": InfinityConfig(depth=32, width=2048, heads=16, bits=32, text_channels=2048, block_chunks=8),
    "8b": InfinityConfig(depth=40, width=3584, heads=28, bits=56, text_channels=2048, block_chunks=8),
}


# ----------------------------------------------------------------------------------------------
# toy text encoder
# ----------------------------------------------------------------------------------------------


def _word_vector(word: str, channels: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed((zlib.crc32(word.encode("utf-8")) * 1_000_003 + seed) % (2**62))
    return torch.randn(channels, generator=g)


def _position_vector(pos: int, channels: int) -> torch.Tensor:
    i = torch.arange(channels, dtype=torch.float64)
    return torch.sin(pos / (100.0 ** (i / channels)) + i).to(torch.float32)


def encode_prompts(
    prompts: Sequence[str],
    *,
    text_channels: int,
    text_maxlen: int = 512,
    seed: int = 20240607,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TextCond:
    """Deterministic toy text encoder standing in for T5.

    Each whitespace-separated word (lower-cased) hashes to a seeded Gaussian vector; a small
    sinusoidal term marks its position. An empty prompt is one ``<empty>`` token; prompts are
    truncated to ``text_maxlen`` tokens. Returns the packed tuple
    ``(kv_compact [sum(lens), text_channels], lens, cu_seqlens_k int32 [B+1], max_seqlen_k)``.
    """
    if len(prompts) == 0:
        raise ValueError("encode_prompts needs at least one prompt")
    rows: list[torch.Tensor] = []
    lens: list[int] = []
    for prompt in prompts:
        words = prompt.lower().split()[:text_maxlen] or ["<empty>"]
        for pos, word in enumerate(words):
            rows.append(_word_vector(word, text_channels, seed) + 0.25 * _position_vector(pos, text_channels))
        lens.append(len(words))
    kv_compact = torch.stack(rows).to(device=device, dtype=dtype)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int32), 0)
    return kv_compact, lens, cu.to(device), max(lens)


def unpack_index(
    cu_seqlens_k: torch.Tensor, max_seqlen_k: int, total: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index ``[rows, max_seqlen_k]`` into the packed rows and the validity mask of the same shape.

    Padding positions point at a valid row (clamped) and are ``False`` in the mask.
    """
    cu = cu_seqlens_k.to(device=device, dtype=torch.long)
    starts = cu[:-1]
    lens = cu[1:] - starts
    ar = torch.arange(max_seqlen_k, device=device)
    idx = (starts[:, None] + ar[None, :]).clamp(max=total - 1)
    valid = ar[None, :] < lens[:, None]
    return idx, valid


# ----------------------------------------------------------------------------------------------
# layers
# ----------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learnable gain."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class TextAttentivePool(nn.Module):
    """Pool packed text tokens into one vector per sample with a learned multi-head query.

    Written with explicit softmax (not SDPA) so it is not mistaken for a block's attention.
    """

    def __init__(self, text_channels: int, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.query = nn.Parameter(torch.empty(heads, self.head_dim))
        self.mat_kv = nn.Linear(text_channels, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, kv_compact: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_k: int) -> torch.Tensor:
        """``kv_compact [N, Ct]`` -> ``[rows, dim]``."""
        n = kv_compact.shape[0]
        idx, valid = unpack_index(cu_seqlens_k, max_seqlen_k, n, kv_compact.device)
        rows, lt = idx.shape
        kv = self.mat_kv(kv_compact)[idx].view(rows, lt, 2, self.heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # [rows, H, Lt, hd]
        scores = torch.einsum("hd,bhld->bhl", self.query.to(k.dtype), k) * self.head_dim**-0.5
        scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
        attn = scores.float().softmax(-1).to(v.dtype)
        out = torch.einsum("bhl,bhld->bhd", attn, v).reshape(rows, -1)
        return self.proj(out)


class SharedAdaLin(nn.Linear):
    """``cond [rows, D] -> [rows, 1, 6, C]`` (gamma1, gamma2, scale1, scale2, shift1, shift2)."""

    def forward(self, cond_BD: torch.Tensor) -> torch.Tensor:
        c = self.weight.shape[0] // 6
        return super().forward(cond_BD).reshape(-1, 1, 6, c)


class SelfAttention(nn.Module):
    """Multi-head cosine self-attention with 2-D RoPE and a K/V cache held on the module.

    ``cached_k`` / ``cached_v`` (``[rows, H, L_cached, hd]``, RoPE already applied to K) grow
    by ``torch.cat`` once per scale while ``caching`` is on.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"width {dim} is not a multiple of heads {heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.scale_mul_1H11 = nn.Parameter(torch.zeros(1, heads, 1, 1))
        self.max_scale_mul = math.log(100.0)
        self.proj = nn.Linear(dim, dim)
        self.caching = False
        self.cached_k: torch.Tensor | None = None
        self.cached_v: torch.Tensor | None = None

    def kv_caching(self, enable: bool) -> None:
        """Switch caching on/off; both clear the cache."""
        self.caching = enable
        self.cached_k = None
        self.cached_v = None

    def forward(
        self,
        x: torch.Tensor,
        rope_table: torch.Tensor,
        scale_schedule: Sequence[tuple[int, int]],
        scale_ind: int,
        attn_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend ``x [rows, L, C]``; RoPE rows are ``rope_table[:, :, start:start+L]``.

        ``start`` is the number of tokens of the scales before ``scale_ind``.
        """
        seq_len = x.shape[1]
        start = sum(h * w for h, w in scale_schedule[:scale_ind])
        rope = rope_table[:, :, start : start + seq_len]
        return self.attend(x, rope, attn_bias)

    def attend(self, x: torch.Tensor, rope: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        """Attention on the tokens ``x`` whose RoPE rows are ``rope`` (``[1 or rows, 1, L, hd/2, 2]``)."""
        b, seq_len, c = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(b, seq_len, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [rows, H, L, hd]
        scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
        q = F.normalize(q, dim=-1).mul(scale_mul)
        k = F.normalize(k, dim=-1)
        q, k = apply_rope2d(q, k, rope)
        if self.caching:
            if self.cached_k is None:
                self.cached_k, self.cached_v = k, v
            else:
                k = self.cached_k = torch.cat((self.cached_k, k), dim=2)
                v = self.cached_v = torch.cat((self.cached_v, v), dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=1.0)
        return self.proj(out.transpose(1, 2).reshape(b, seq_len, c))


class CrossAttention(nn.Module):
    """Multi-head attention from image tokens to packed variable-length text.

    The packed K/V rows are projected, unpacked to ``[rows, max_seqlen_k]`` by an index and
    attended with a boolean key-padding mask.
    """

    def __init__(self, dim: int, kv_dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.mat_q = nn.Linear(dim, dim)
        self.mat_kv = nn.Linear(kv_dim, 2 * dim, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, ca_kv: tuple[torch.Tensor, torch.Tensor, int]) -> torch.Tensor:
        """``x [rows, L, C]``, ``ca_kv = (kv_compact [N, C], cu_seqlens_k [rows+1], max_seqlen_k)``."""
        kv_compact, cu_seqlens_k, max_seqlen_k = ca_kv
        b, seq_len, c = x.shape
        n = kv_compact.shape[0]
        bias = torch.cat((torch.zeros_like(self.v_bias), self.v_bias))
        kv = F.linear(kv_compact, self.mat_kv.weight, bias)
        idx, valid = unpack_index(cu_seqlens_k, max_seqlen_k, n, kv.device)
        rows, lt = idx.shape
        k, v = kv[idx].view(rows, lt, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q = self.mat_q(x).view(b, seq_len, self.heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])
        return self.proj(out.transpose(1, 2).reshape(b, seq_len, c))


class FFN(nn.Module):
    """``fc2(gelu_tanh(fc1(x)))``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CrossAttnBlock(nn.Module):
    """Shared-AdaLN block: self-attention (RoPE, K/V cache), cross-attention to text, FFN."""

    def __init__(self, dim: int, heads: int, kv_dim: int, ffn_hidden: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.C = dim
        self.sa = SelfAttention(dim, heads)
        self.ca = CrossAttention(dim, kv_dim, heads)
        self.ffn = FFN(dim, ffn_hidden)
        self.ln_wo_grad = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.ca_norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=True)
        self.ada_gss = nn.Parameter(torch.zeros(1, 1, 6, dim))

    def forward(
        self,
        x: torch.Tensor,
        cond_BD: torch.Tensor,
        ca_kv: tuple[torch.Tensor, torch.Tensor, int],
        rope_table: torch.Tensor,
        scale_schedule: Sequence[tuple[int, int]],
        scale_ind: int,
        attn_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One block on ``x [rows, L, C]``; ``cond_BD`` is the shared AdaLN output ``[rows, 1, 6, C]``."""
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss + cond_BD).unbind(2)
        x = x + self.sa(
            self.ln_wo_grad(x).mul(scale1.add(1)).add(shift1), rope_table, scale_schedule, scale_ind, attn_bias
        ).mul(gamma1)
        x = x + self.ca(self.ca_norm(x), ca_kv)
        x = x + self.ffn(self.ln_wo_grad(x).mul(scale2.add(1)).add(shift2)).mul(gamma2)
        return x

    # --- the three residual branches, used by the reference pruning path only -----------------

    def sa_branch(self, x: torch.Tensor, cond_BD: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """Self-attention delta for the tokens ``x`` with their RoPE rows ``rope``."""
        gamma1, _, scale1, _, shift1, _ = (self.ada_gss + cond_BD).unbind(2)
        return self.sa.attend(self.ln_wo_grad(x).mul(scale1.add(1)).add(shift1), rope).mul(gamma1)

    def ca_branch(self, x: torch.Tensor, ca_kv: tuple[torch.Tensor, torch.Tensor, int]) -> torch.Tensor:
        """Cross-attention delta."""
        return self.ca(self.ca_norm(x), ca_kv)

    def ffn_branch(self, x: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        """FFN delta."""
        _, gamma2, _, scale2, _, shift2 = (self.ada_gss + cond_BD).unbind(2)
        return self.ffn(self.ln_wo_grad(x).mul(scale2.add(1)).add(shift2)).mul(gamma2)


class BlockChunk(nn.Module):
    """A run of consecutive blocks (``chunk.module[j]``)."""

    def __init__(self, blocks: Sequence[CrossAttnBlock]) -> None:
        super().__init__()
        self.module = nn.ModuleList(blocks)

    def forward(
        self,
        x: torch.Tensor,
        cond_BD: torch.Tensor,
        ca_kv: tuple[torch.Tensor, torch.Tensor, int],
        rope_table: torch.Tensor,
        scale_schedule: Sequence[tuple[int, int]],
        scale_ind: int,
        attn_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        for blk in self.module:
            x = blk(x, cond_BD, ca_kv, rope_table, scale_schedule, scale_ind, attn_bias)
        return x


class AdaLNBeforeHead(nn.Module):
    """``LN(x) * (1 + scale) + shift`` with ``(scale, shift)`` from the condition."""

    def __init__(self, dim: int, cond_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.C = dim
        self.ln_wo_grad = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim))

    def forward(self, x: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x).mul(scale.add(1)).add(shift)


# ----------------------------------------------------------------------------------------------
# sampling helper
# ----------------------------------------------------------------------------------------------


def sample_bits(
    logits: torch.Tensor, *, top_k: int = 0, top_p: float = 0.0, rng: torch.Generator | None = None
) -> torch.Tensor:
    """Sample each bit from ``logits [B, L, d, 2]`` -> LongTensor ``[B, L, d]`` of 0/1.

    ``top_k`` (``0`` = off; with two outcomes only ``1`` changes anything) and nucleus
    ``top_p`` (``0`` = off) filter per bit; sampling uses ``torch.multinomial(generator=rng)``.
    """
    *lead, v = logits.shape
    lg = logits.reshape(-1, v).float()
    if 0 < top_k < v:
        kth = lg.topk(top_k, dim=-1).values[:, -1:]
        lg = lg.masked_fill(lg < kth, float("-inf"))
    if top_p > 0.0:
        sorted_lg, sorted_idx = lg.sort(dim=-1, descending=False)
        remove_sorted = sorted_lg.softmax(-1).cumsum(-1) <= (1.0 - top_p)
        remove_sorted[:, -1] = False
        lg = lg.masked_fill(remove_sorted.scatter(1, sorted_idx, remove_sorted), float("-inf"))
    idx = torch.multinomial(lg.softmax(-1), num_samples=1, generator=rng)
    return idx.view(*lead)


def _per_scale(value: float | Sequence[float], n: int, name: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * n
    vals = [float(v) for v in value]
    if len(vals) < n:
        raise ValueError(f"{name} has {len(vals)} entries but the schedule has {n} scales")
    return vals[:n]


# ----------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------


class InfinityLike(nn.Module):
    """Infinity-style text-to-image next-scale model with bitwise heads (random weights).

    Sampler: :meth:`autoregressive_infer_cfg` or ``forward(..., cfg_infer=True)``. Teacher-forced
    training forward: ``forward(label_B_or_BLT, x_BLC_wo_prefix, scale_schedule)``.
    """

    def __init__(self, cfg: InfinityConfig) -> None:
        super().__init__()
        if cfg.depth % cfg.block_chunks != 0:
            raise ValueError(f"depth {cfg.depth} is not a multiple of block_chunks {cfg.block_chunks}")
        self.cfg = cfg
        self.C = self.D = cfg.width
        self.depth, self.num_heads, self.d_bits = cfg.depth, cfg.heads, cfg.bits
        self.Ct5, self.text_maxlen = cfg.text_channels, cfg.text_maxlen
        self.scale_schedules: dict[str, Schedule] = default_scale_schedules()
        if cfg.default_schedule not in self.scale_schedules:
            raise ValueError(f"default_schedule {cfg.default_schedule!r} is not one of {sorted(self.scale_schedules)}")
        max_scales = max(len(s) for s in self.scale_schedules.values())

        # text conditioning
        self.cfg_uncond = nn.Parameter(torch.empty(cfg.text_maxlen, cfg.text_channels))
        self.text_norm = RMSNorm(cfg.text_channels, eps=cfg.norm_eps)
        self.text_proj_for_sos = TextAttentivePool(cfg.text_channels, self.D, cfg.heads)
        self.text_proj_for_ca = nn.Sequential(
            nn.Linear(cfg.text_channels, self.D), nn.GELU(approximate="tanh"), nn.Linear(self.D, self.D)
        )
        # input embeddings
        self.pos_start = nn.Parameter(torch.empty(1, 1, self.C))
        self.lvl_embed = nn.Embedding(max(15, max_scales), self.C)
        self.word_embed = nn.Linear(cfg.bits, self.C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), SharedAdaLin(self.D, 6 * self.C))
        # blocks
        blocks = [
            CrossAttnBlock(self.C, cfg.heads, self.D, cfg.ffn_hidden, eps=cfg.norm_eps) for _ in range(cfg.depth)
        ]
        per = cfg.depth // cfg.block_chunks
        self.block_chunks = nn.ModuleList(
            BlockChunk(blocks[i * per : (i + 1) * per]) for i in range(cfg.block_chunks)
        )
        # head and decoder
        self.head_nm = AdaLNBeforeHead(self.C, self.D, eps=cfg.norm_eps)
        self.head = nn.Linear(self.C, 2 * cfg.bits)
        self.decoder = BitwiseDecoder(cfg.bits, cfg.decoder_channels)
        # RoPE tables, one non-persistent buffer per registered schedule
        self._rope_names: dict[tuple[tuple[int, int], ...], str] = {}
        for key, sched in self.scale_schedules.items():
            self._register_rope(sched, "rope2d_" + key.replace(":", "_"))

    # --- construction helpers ----------------------------------------------------------------

    def _register_rope(self, schedule: Schedule, name: str) -> torch.Tensor:
        dev = self.pos_start.device
        if dev.type == "meta":  # shapes only: the values are computed by init_weights
            total = sum(h * w for h, w in schedule)
            table = torch.empty(1, 1, total, self.cfg.head_dim // 2, 2, device=dev)
        else:
            table = self._rope_values(schedule).to(dev, copy=True)
        self.register_buffer(name, table, persistent=False)
        self._rope_names[tuple(schedule)] = name
        return getattr(self, name)

    def _rope_values(self, schedule: Schedule) -> torch.Tensor:
        return _cached_rope_table(self.cfg.head_dim, tuple(schedule), self.cfg.rope_normalized, self.cfg.rope_base)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Deterministic random init from ``seed`` (values drawn on CPU, independent of device).

        Linear/conv weights ``N(0, 1/fan_in)`` (the head is not scaled down), biases zero,
        AdaLN gains ``1 + 0.1 N`` and scales/shifts ``0.1 N`` (so attention branches carry
        weight), cosine-attention temperatures from ``cfg.attn_scale_range``. Also recomputes the
        RoPE buffers (needed after ``to_empty``).
        """
        g = torch.Generator().manual_seed(seed)
        done: set[int] = set()

        def fill(p: torch.Tensor, value: torch.Tensor) -> None:
            p.copy_(value.to(device=p.device, dtype=p.dtype))
            done.add(id(p))

        def normal(p: torch.Tensor, std: float, mean: float = 0.0) -> None:
            fill(p, torch.randn(p.shape, generator=g) * std + mean)

        for _, m in self.named_modules():
            if isinstance(m, nn.Linear):
                normal(m.weight, m.in_features**-0.5)
                if m.bias is not None:
                    fill(m.bias, torch.zeros(m.bias.shape))
            elif isinstance(m, nn.Conv2d):
                fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                normal(m.weight, (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    normal(m.bias, 0.05)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                fill(m.weight, torch.ones(m.weight.shape))
                fill(m.bias, torch.zeros(m.bias.shape))
            elif isinstance(m, RMSNorm):
                fill(m.weight, torch.ones(m.weight.shape))
            elif isinstance(m, nn.Embedding):
                normal(m.weight, 0.5)
            elif isinstance(m, TextAttentivePool):
                normal(m.query, 1.0)
            elif isinstance(m, SelfAttention):
                fill(m.q_bias, torch.zeros(m.q_bias.shape))
                fill(m.v_bias, torch.zeros(m.v_bias.shape))
                lo, hi = self.cfg.attn_scale_range
                temps = torch.logspace(math.log10(lo), math.log10(hi), m.heads) if m.heads > 1 else torch.tensor([lo])
                fill(m.scale_mul_1H11, temps.log().view(1, -1, 1, 1))
            elif isinstance(m, CrossAttention):
                fill(m.v_bias, torch.zeros(m.v_bias.shape))
            elif isinstance(m, CrossAttnBlock):
                gss = torch.randn(m.ada_gss.shape, generator=g) * 0.1
                gss[:, :, :2] += 1.0
                fill(m.ada_gss, gss)
        # overrides after the generic pass
        normal(self.shared_ada_lin[1].weight, 0.5 * self.D**-0.5)
        normal(self.pos_start, 0.5)
        normal(self.cfg_uncond, 1.0)
        missing = [n for n, p in self.named_parameters() if id(p) not in done]
        if missing:
            raise RuntimeError(f"init_weights left parameters uninitialised: {missing}")
        for sched, name in self._rope_names.items():
            buf = getattr(self, name)
            table = self._rope_values(list(sched))
            setattr(self, name, table.to(device=buf.device, dtype=buf.dtype, copy=True))

    # --- public helpers ---------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.pos_start.device

    def fingerprint(self) -> dict[str, Any]:
        """``dict(family, depth, width, heads, num_scales)`` of the default schedule."""
        return dict(
            family="infinity",
            depth=self.depth,
            width=self.C,
            heads=self.num_heads,
            num_scales=len(self.scale_schedules[self.cfg.default_schedule]),
        )

    def encode_prompts(self, prompts: Sequence[str]) -> TextCond:
        """Packed toy text embeddings for ``prompts`` on this model's device and dtype."""
        return encode_prompts(
            prompts,
            text_channels=self.Ct5,
            text_maxlen=self.text_maxlen,
            seed=self.cfg.text_encoder_seed,
            device=self.device,
            dtype=self.pos_start.dtype,
        )

    def resolve_schedule(self, scale_schedule: str | Sequence[Sequence[int]] | None) -> Schedule:
        """``None`` -> default; a key of :attr:`scale_schedules`; or a list of ``(h, w)`` / ``(1, h, w)``."""
        if scale_schedule is None:
            return list(self.scale_schedules[self.cfg.default_schedule])
        if isinstance(scale_schedule, str):
            if scale_schedule not in self.scale_schedules:
                raise KeyError(f"unknown scale schedule {scale_schedule!r}; known: {sorted(self.scale_schedules)}")
            return list(self.scale_schedules[scale_schedule])
        out: Schedule = []
        for item in scale_schedule:
            t = tuple(int(v) for v in item)
            if len(t) == 3:
                if t[0] != 1:
                    raise ValueError(f"only single-frame schedules are supported, got {t}")
                t = t[1:]
            if len(t) != 2 or min(t) < 1:
                raise ValueError(f"bad scale {item!r} in scale_schedule")
            out.append((t[0], t[1]))
        if not out:
            raise ValueError("empty scale_schedule")
        return out

    def rope_table(self, schedule: Schedule) -> torch.Tensor:
        """The RoPE buffer of ``schedule`` (registered on first use for a custom schedule)."""
        name = self._rope_names.get(tuple(schedule))
        if name is None:
            return self._register_rope(schedule, f"rope2d_custom_{len(self._rope_names)}")
        return getattr(self, name)

    def get_logits(self, h: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        """Head: ``h [rows, L, C]`` -> logits ``[rows, L, 2d]``."""
        return self.head(self.head_nm(h, cond_BD))

    def set_kv_caching(self, enable: bool) -> None:
        """Switch every block's self-attention K/V cache on or off (clears it)."""
        for chunk in self.block_chunks:
            for blk in chunk.module:
                blk.sa.kv_caching(enable)

    def blocks(self) -> list[CrossAttnBlock]:
        """All blocks in order (layer index = position)."""
        return [blk for chunk in self.block_chunks for blk in chunk.module]

    # --- conditioning -----------------------------------------------------------------------

    def _cfg_text(
        self, label_B_or_BLT: TextCond, negative_label_B_or_BLT: TextCond | None
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Append the unconditional rows (learned null text, or the negative prompt)."""
        kv_compact, lens, cu, max_len = label_B_or_BLT
        cu = cu.to(kv_compact.device)
        if negative_label_B_or_BLT is None:
            if max(lens) > self.text_maxlen:
                raise ValueError(f"prompt of {max(lens)} tokens exceeds text_maxlen {self.text_maxlen}")
            null = self.cfg_uncond.to(kv_compact.dtype)
            kv_un = torch.cat([null[:le] for le in lens], dim=0)
            cu_un = cu[1:] + cu[-1]
        else:
            kv_un, lens_un, cu_n, max_un = negative_label_B_or_BLT
            if len(lens_un) != len(lens):
                raise ValueError("negative_label_B_or_BLT must have as many prompts as label_B_or_BLT")
            cu_un = cu_n.to(cu.device)[1:] + cu[-1]
            max_len = max(max_len, max_un)
        return torch.cat((kv_compact, kv_un.to(kv_compact)), 0), torch.cat((cu, cu_un.to(cu.dtype)), 0), max_len

    def _condition(
        self, kv_compact: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_k: int
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, int], torch.Tensor]:
        """-> ``cond_BD [rows, D]``, cross-attention ``ca_kv``, shared AdaLN ``[rows, 1, 6, C]``."""
        kv = self.text_norm(kv_compact.to(self.pos_start.dtype))
        cond_BD = self.text_proj_for_sos(kv, cu_seqlens_k, max_seqlen_k)
        ca_kv = (self.text_proj_for_ca(kv), cu_seqlens_k, max_seqlen_k)
        return cond_BD, ca_kv, self.shared_ada_lin(cond_BD)

    def next_scale_input(
        self, summed_codes: torch.Tensor, codes: torch.Tensor, si: int, schedule: Schedule
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Accumulate ``codes [B, d, h, w]`` of scale ``si``; return ``(summed, next tokens [B, L', d] or None)``."""
        final = schedule[-1]
        summed_codes = summed_codes + upsample_codes(codes, final)
        if si == len(schedule) - 1:
            return summed_codes, None
        nxt = downsample_codes(summed_codes, schedule[si + 1])
        return summed_codes, nxt.flatten(2).transpose(1, 2)

    # --- block loops ------------------------------------------------------------------------

    def _run_blocks_ref(
        self,
        x: torch.Tensor,
        gss: torch.Tensor,
        ca_kv: tuple[torch.Tensor, torch.Tensor, int],
        rope: torch.Tensor,
        schedule: tuple[tuple[int, int], ...],
        si: int,
        ref_pruning: reference_pruning.RefPruning,
    ) -> torch.Tensor:
        """The block loop under reference pruning decisions (test oracle, slow)."""
        hw = schedule[si]
        start = sum(h * w for h, w in schedule[:si])
        rope_rows = rope[:, :, start : start + hw[0] * hw[1]]
        run = reference_pruning.run_branch
        for layer, blk in enumerate(self.blocks()):
            sa = functools.partial(_sa_call, blk, gss)
            ca = functools.partial(_ca_call, blk, ca_kv)
            ffn = functools.partial(_ffn_call, blk, gss)
            x = run(ref_pruning, si, layer, "self_attn", hw, x, sa, positional=((rope_rows, 2),))
            x = run(ref_pruning, si, layer, "cross_attn", hw, x, ca)
            x = run(ref_pruning, si, layer, "ffn", hw, x, ffn)
        return x

    # --- sampler ----------------------------------------------------------------------------

    @torch.no_grad()
    def autoregressive_infer_cfg(
        self,
        label_B_or_BLT: TextCond,
        B: int = 1,
        scale_schedule: str | Sequence[Sequence[int]] | None = None,
        g_seed: int | None = None,
        cfg_list: float | Sequence[float] = 3.0,
        tau_list: float | Sequence[float] = 1.0,
        top_k: int = 0,
        top_p: float = 0.0,
        *,
        return_logits: bool = False,
        ref_pruning: reference_pruning.RefPruning | None = None,
        negative_label_B_or_BLT: TextCond | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Generate ``B`` images ``[B, 3, 16*h_K, 16*w_K]`` in ``[0, 1]`` from packed text.

        CFG (any ``cfg != 1``) doubles the transformer batch: conditional rows first, then the
        unconditional ones (learned null text of the same lengths, or ``negative_label_B_or_BLT``).
        Guidance mixes logits: ``cfg * l_cond + (1 - cfg) * l_uncond`` after dividing by ``tau``.
        ``return_logits=True`` also returns, per scale, these guided fp32 logits ``[B, L_s, d, 2]``
        (before top-k/top-p filtering). ``g_seed`` seeds a private ``torch.Generator``;
        ``ref_pruning`` routes the block loop through the reference pruning oracle.
        """
        schedule = tuple(self.resolve_schedule(scale_schedule))
        n = len(schedule)
        cfgs = _per_scale(cfg_list, n, "cfg_list")
        taus = _per_scale(tau_list, n, "tau_list")
        kv_compact, lens, cu, max_len = label_B_or_BLT
        if len(lens) != B:
            raise ValueError(f"label_B_or_BLT holds {len(lens)} prompts but B={B}")
        dev, dt = self.device, self.pos_start.dtype
        rng = None if g_seed is None else torch.Generator(device=dev).manual_seed(g_seed)
        use_cfg = any(c != 1.0 for c in cfgs)
        kv_compact = kv_compact.to(device=dev, dtype=dt)
        cu = cu.to(dev)
        if use_cfg:
            kv_compact, cu, max_len = self._cfg_text((kv_compact, lens, cu, max_len), negative_label_B_or_BLT)
        rows = 2 * B if use_cfg else B
        cond_BD, ca_kv, gss = self._condition(kv_compact, cu, max_len)
        rope = self.rope_table(list(schedule))
        x = cond_BD.unsqueeze(1) + self.pos_start.expand(rows, 1, -1)
        final_h, final_w = schedule[-1]
        summed = torch.zeros(B, self.d_bits, final_h, final_w, device=dev, dtype=torch.float32)
        all_logits: list[torch.Tensor] = []
        if ref_pruning is not None:
            ref_pruning.reset()
        self.set_kv_caching(True)
        try:
            for si, (h, w) in enumerate(schedule):
                x = x + self.lvl_embed.weight[si]
                if ref_pruning is None:
                    # blocks called from the scale loop itself: with the sampler frame skipped by
                    # Dynamo (graph breaks at sampling), each Block.forward is its own graph
                    for chunk in self.block_chunks:
                        for blk in chunk.module:
                            x = blk(x, gss, ca_kv, rope, schedule, si)
                else:
                    x = self._run_blocks_ref(x, gss, ca_kv, rope, schedule, si, ref_pruning)
                logits = self.get_logits(x, cond_BD).float().view(rows, h * w, self.d_bits, 2) / taus[si]
                if use_cfg:
                    logits = cfgs[si] * logits[:B] + (1.0 - cfgs[si]) * logits[B:]
                if return_logits:
                    all_logits.append(logits.clone())
                bits = sample_bits(logits, top_k=top_k, top_p=top_p, rng=rng)
                codes = bits_to_codes(bits, (h, w))
                summed, nxt = self.next_scale_input(summed, codes, si, list(schedule))
                if nxt is not None:
                    x = self.word_embed(nxt.to(dt)).repeat(rows // B, 1, 1)
        finally:
            self.set_kv_caching(False)
        images = self.decoder(summed.to(dt)).float()
        return (images, all_logits) if return_logits else images

    def forward(self, label_B_or_BLT: TextCond, *args: Any, cfg_infer: bool = False, **kwargs: Any) -> Any:
        """``cfg_infer=True``: the sampler (same arguments as :meth:`autoregressive_infer_cfg`).

        ``cfg_infer=False``: teacher-forced training forward, see :meth:`forward_train`.
        """
        if cfg_infer:
            return self.autoregressive_infer_cfg(label_B_or_BLT, *args, **kwargs)
        return self.forward_train(label_B_or_BLT, *args, **kwargs)

    # --- teacher forcing ----------------------------------------------------------------------

    def teacher_inputs(self, bits_per_scale: Sequence[torch.Tensor], scale_schedule: Any = None) -> torch.Tensor:
        """Ground-truth bits per scale (``[B, L_s, d]``) -> ``x_BLC_wo_prefix [B, L - 1, d]``.

        The same accumulate/downsample chain as the sampler; the last scale's bits are unused.
        """
        schedule = self.resolve_schedule(scale_schedule)
        b = bits_per_scale[0].shape[0]
        final_h, final_w = schedule[-1]
        summed = torch.zeros(b, self.d_bits, final_h, final_w, device=bits_per_scale[0].device)
        outs = []
        for si in range(len(schedule) - 1):
            codes = bits_to_codes(bits_per_scale[si], schedule[si])
            summed, nxt = self.next_scale_input(summed, codes, si, schedule)
            outs.append(nxt)
        if not outs:
            return torch.zeros(b, 0, self.d_bits, device=summed.device)
        return torch.cat(outs, dim=1)

    def forward_train(
        self,
        label_B_or_BLT: TextCond,
        x_BLC_wo_prefix: torch.Tensor,
        scale_schedule: Any = None,
        *,
        uncond_rows: Sequence[bool] | None = None,
    ) -> torch.Tensor:
        """Teacher-forced logits ``[B, L, d, 2]`` for every scale at once (block-causal mask).

        ``uncond_rows[i]`` replaces sample ``i``'s text by the learned null text (CFG dropout,
        chosen by the caller so that the forward stays deterministic).
        """
        schedule = tuple(self.resolve_schedule(scale_schedule))
        kv_compact, lens, cu, max_len = label_B_or_BLT
        dev, dt = self.device, self.pos_start.dtype
        kv_compact = kv_compact.to(device=dev, dtype=dt)
        cu = cu.to(dev)
        if uncond_rows is not None:
            parts, start = [], 0
            for le, drop in zip(lens, uncond_rows):
                parts.append(self.cfg_uncond[:le].to(dt) if drop else kv_compact[start : start + le])
                start += le
            kv_compact = torch.cat(parts, 0)
        cond_BD, ca_kv, gss = self._condition(kv_compact, cu, max_len)
        b = len(lens)
        sizes = [h * w for h, w in schedule]
        total = sum(sizes)
        if x_BLC_wo_prefix.shape[1] != total - 1:
            raise ValueError(f"x_BLC_wo_prefix has {x_BLC_wo_prefix.shape[1]} tokens, expected {total - 1}")
        sos = cond_BD.unsqueeze(1) + self.pos_start.expand(b, 1, -1)
        x = torch.cat((sos, self.word_embed(x_BLC_wo_prefix.to(dt))), dim=1)
        lvl = torch.cat([torch.full((s,), i, device=dev, dtype=torch.long) for i, s in enumerate(sizes)])
        x = x + self.lvl_embed(lvl)[None]
        attn_bias = torch.where(lvl[:, None] >= lvl[None, :], 0.0, float("-inf")).to(dt)[None, None]
        rope = self.rope_table(list(schedule))
        self.set_kv_caching(False)
        for chunk in self.block_chunks:
            x = chunk(x, gss, ca_kv, rope, schedule, 0, attn_bias)
        return self.get_logits(x, cond_BD).float().view(b, total, self.d_bits, 2)


@functools.lru_cache(maxsize=64)
def _cached_rope_table(
    head_dim: int, schedule: tuple[tuple[int, int], ...], normalized: bool, base: float
) -> torch.Tensor:
    """CPU fp32 RoPE table, shared between builds (callers copy it)."""
    return rope2d_table(head_dim, list(schedule), normalized=normalized, base=base, device="cpu")


def _sa_call(blk: CrossAttnBlock, gss: torch.Tensor, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    return blk.sa_branch(x, gss, rope)


def _ca_call(blk: CrossAttnBlock, ca_kv: tuple[torch.Tensor, torch.Tensor, int], x: torch.Tensor) -> torch.Tensor:
    return blk.ca_branch(x, ca_kv)


def _ffn_call(blk: CrossAttnBlock, gss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return blk.ffn_branch(x, gss)


# ----------------------------------------------------------------------------------------------
# builder
# ----------------------------------------------------------------------------------------------


def build_infinity(
    config_name: str,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> InfinityLike:
    """Build the ``tiny``, ``2b`` or ``8b`` Infinity-style model with deterministic random weights.

    ``overrides`` replace :class:`InfinityConfig` fields (e.g. ``depth=2``). ``device="meta"``
    builds shapes only (no memory, no init), for parameter counts of the full-size models.
    The global RNG is not touched. Returned in eval mode.
    """
    if config_name not in CONFIGS:
        raise KeyError(f"unknown Infinity config {config_name!r}; known: {sorted(CONFIGS)}")
    known = {f.name for f in fields(InfinityConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise TypeError(f"unknown Infinity config override(s) {bad}; known: {sorted(known)}")
    cfg = replace(CONFIGS[config_name], **overrides)
    with torch.device("meta"):
        model = InfinityLike(cfg)
    device = torch.device(device)
    if device.type == "meta":
        return model.to(dtype=dtype).eval()
    model = model.to_empty(device=device)
    model.init_weights(seed)
    return model.to(dtype=dtype).eval()
