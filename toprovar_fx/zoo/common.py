"""Building blocks shared by the zoo's VAR-family stand-ins.

Everything here is plain eager PyTorch written the way released VAR-family models are
written, because these modules are what the compiler is meant to receive:

* attention is ``F.scaled_dot_product_attention`` looked up on ``F`` at call time, with no
  mask (inference attends to every cached scale plus the current one);
* the K/V cache lives in module attributes (``cached_k``/``cached_v``) extended with
  ``torch.cat`` at every scale while ``caching`` is on;
* sampling seeds a ``torch.Generator`` and calls ``torch.multinomial(..., generator=)``
  (a graph break under Dynamo, as in the real samplers).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

NORM_EPS = 1e-6


def modulate(x_normed: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """AdaLN modulation ``x * (1 + scale) + shift``; ``scale``/``shift`` broadcast over tokens."""
    return x_normed * (1 + scale) + shift


class SharedAdaLin(nn.Module):
    """One ``SiLU -> Linear(cond_dim, 6 * C)`` shared by every block (VAR's ``shared_aln``).

    Returns ``[N, 1, 6, C]``; each block adds its own learnable ``[1, 1, 6, C]`` gains.
    """

    def __init__(self, cond_dim: int, width: int) -> None:
        super().__init__()
        self.width = width
        self.lin = nn.Linear(cond_dim, 6 * width)

    def forward(self, cond_BD: torch.Tensor) -> torch.Tensor:
        return self.lin(F.silu(cond_BD)).view(-1, 1, 6, self.width)


class AdaLNBeforeHead(nn.Module):
    """LayerNorm (no affine) modulated by the condition, applied before the vocabulary head."""

    def __init__(self, width: int, cond_dim: int) -> None:
        super().__init__()
        self.width = width
        self.norm = nn.LayerNorm(width, eps=NORM_EPS, elementwise_affine=False)
        self.ada_lin = nn.Linear(cond_dim, 2 * width)

    def forward(self, x: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(F.silu(cond_BD)).view(-1, 1, 2, self.width).unbind(2)
        return modulate(self.norm(x), scale, shift)


class FFN(nn.Module):
    """Two-layer MLP with tanh-GELU, ``C -> mlp_ratio * C -> C``."""

    def __init__(self, width: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = round(width * mlp_ratio)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CachedSelfAttention(nn.Module):
    """Multi-head self-attention over the K/V cache of earlier scales plus the given tokens.

    With ``qk_norm`` (VAR's ``attn_l2_norm``) queries and keys are L2-normalised per head and
    the query is multiplied by a learnable per-head scale (stored as a log, clamped at
    ``log(100)``); attention then runs with ``scale=1``. Without it, ``scale=head_dim**-0.5``.

    While ``caching`` is on, the K/V of exactly the tokens this call receives are appended to
    ``cached_k``/``cached_v`` (``[N, heads, L_cached, head_dim]``) with ``torch.cat``.
    """

    MAX_LOG_SCALE = math.log(100.0)

    def __init__(self, width: int, heads: int, qk_norm: bool = True) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.width, self.heads, self.head_dim = width, heads, width // heads
        self.qk_norm = qk_norm
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        if qk_norm:
            self.log_scale = nn.Parameter(torch.empty(1, heads, 1, 1))
            self.scale = 1.0
        else:
            self.register_parameter("log_scale", None)
            self.scale = self.head_dim**-0.5
        self.caching = False
        self.cached_k: torch.Tensor | None = None
        self.cached_v: torch.Tensor | None = None

    def kv_caching(self, enable: bool) -> None:
        """Turn the K/V cache on or off; either way the cache starts empty."""
        self.caching = enable
        self.cached_k = None
        self.cached_v = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        qkv = self.qkv(x).view(n, length, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [N, heads, L, head_dim]
        if self.qk_norm:
            q = F.normalize(q, dim=-1) * self.log_scale.clamp(max=self.MAX_LOG_SCALE).exp()
            k = F.normalize(k, dim=-1)
        if self.caching:
            if self.cached_k is None:
                self.cached_k, self.cached_v = k, v
            else:
                k = self.cached_k = torch.cat((self.cached_k, k), dim=2)
                v = self.cached_v = torch.cat((self.cached_v, v), dim=2)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(n, length, self.width))


def sample_top_k_top_p(
    logits_BlV: torch.Tensor,
    rng: torch.Generator | None,
    top_k: int = 0,
    top_p: float = 0.0,
    num_samples: int = 1,
) -> torch.Tensor:
    """Sample token ids ``[B, l, num_samples]`` from logits ``[B, l, V]`` (not modified).

    ``top_k > 0`` keeps the ``top_k`` largest logits per position; ``0 < top_p < 1`` keeps the
    smallest set of most likely tokens whose probability reaches ``top_p`` (always at least
    one). Sampling is ``torch.multinomial(..., generator=rng)``.
    """
    b, length, vocab = logits_BlV.shape
    logits = logits_BlV
    if top_k > 0:
        kth = logits.topk(min(top_k, vocab), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if 0.0 < top_p < 1.0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_before >= top_p  # the most likely token always has mass_before 0
        drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, -torch.inf)
    probs = logits.softmax(dim=-1).reshape(-1, vocab)
    idx = torch.multinomial(probs, num_samples=num_samples, replacement=True, generator=rng)
    return idx.view(b, length, num_samples)


def gumbel_softmax(
    logits: torch.Tensor, tau: float, rng: torch.Generator | None, dim: int = -1
) -> torch.Tensor:
    """Soft Gumbel-softmax sample ``softmax((logits + g) / tau)`` with noise from ``rng``."""
    gumbels = -torch.empty_like(logits).exponential_(generator=rng).log()
    return ((logits + gumbels) / tau).softmax(dim)


def make_generator(device: torch.device, seed: int | None) -> torch.Generator | None:
    """A ``torch.Generator`` on ``device`` seeded with ``seed``; ``None`` (global RNG) if no seed."""
    if seed is None:
        return None
    rng = torch.Generator(device=device)
    rng.manual_seed(seed)
    return rng


def init_linear_(lin: nn.Linear, gen: torch.Generator, gain: float = 1.0) -> None:
    """Normal init with std ``gain / sqrt(fan_in)`` (variance preserving), zero bias."""
    nn.init.normal_(lin.weight, std=gain / math.sqrt(lin.in_features), generator=gen)
    if lin.bias is not None:
        nn.init.zeros_(lin.bias)


def init_conv_(conv: nn.Conv2d, gen: torch.Generator, gain: float = 1.0) -> None:
    """Normal init with std ``gain / sqrt(fan_in)``, zero bias."""
    fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] // conv.groups
    nn.init.normal_(conv.weight, std=gain / math.sqrt(fan_in), generator=gen)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def init_conv_net_(module: nn.Module, gen: torch.Generator) -> None:
    """``init_conv_`` on every conv of ``module`` (in module order), unit-weight zero-bias GroupNorms."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            init_conv_(m, gen)
        elif isinstance(m, nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
