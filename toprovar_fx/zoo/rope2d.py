"""2-D rotary position embedding (RoPE) for multi-scale token maps.

A table is precomputed for a whole scale schedule: the rows of every scale's ``h x w`` grid
(row-major) are concatenated in schedule order, so the rows of scale ``si`` are
``[start, start + h*w)`` with ``start = sum(h_j * w_j for j < si)``. Self-attention slices
the table at that offset.

Layout: ``[1, 1, L_total, head_dim // 2, 2]`` where the last dimension holds ``(cos, sin)``.
The leading ``1, 1`` broadcast over ``[batch, heads]``; the token dimension is 2, so a
token-pruning pass (or :func:`toprovar_fx.zoo.reference_pruning.gather_tokens` with
``dim=2``) gathers rows with the same indices as the tokens.

Half of the rotated pairs encode the row (height) coordinate, the other half the column
(width) coordinate. With ``normalized=True`` a scale's coordinates are stretched to the final
grid of the schedule (``i * H / h``), so every scale spans the same spatial extent.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def rope2d_table(
    head_dim: int,
    schedule: Sequence[tuple[int, int]],
    *,
    normalized: bool = True,
    base: float = 10000.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Precompute the concatenated ``(cos, sin)`` table for ``schedule``.

    Returns fp32 ``[1, 1, sum(h*w), head_dim // 2, 2]``. ``head_dim`` must be a multiple of 4.
    """
    if head_dim % 4 != 0:
        raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    inv_freq = 1.0 / (base ** (torch.arange(quarter, dtype=torch.float64, device=device) / quarter))
    final_h, final_w = schedule[-1]
    parts = []
    for h, w in schedule:
        ys = torch.arange(h, dtype=torch.float64, device=device)
        xs = torch.arange(w, dtype=torch.float64, device=device)
        if normalized:
            ys = ys * (final_h / h)
            xs = xs * (final_w / w)
        yy = ys[:, None].expand(h, w).reshape(-1)
        xx = xs[None, :].expand(h, w).reshape(-1)
        ang = torch.cat((yy[:, None] * inv_freq, xx[:, None] * inv_freq), dim=-1)  # [h*w, hd/2]
        parts.append(ang)
    angles = torch.cat(parts, dim=0)
    table = torch.stack((angles.cos(), angles.sin()), dim=-1).to(torch.float32)
    return table[None, None]


def apply_rope2d(q: torch.Tensor, k: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` and ``k`` (``[B, H, L, head_dim]``) by the rows ``rope`` (``[b, 1, L, hd/2, 2]``).

    ``b`` is 1 (a slice of the shared table) or ``B`` (rows gathered per sample). Consecutive
    channel pairs ``(2i, 2i+1)`` are rotated by the angle of pair ``i``.
    """
    rope = rope.to(q.dtype)
    cos, sin = rope[..., 0], rope[..., 1]
    qk = torch.stack((q, k), dim=0).unflatten(-1, (-1, 2))  # [2, B, H, L, hd/2, 2]
    a, b = qk[..., 0], qk[..., 1]
    rotated = torch.stack((cos * a - sin * b, sin * a + cos * b), dim=-1).flatten(-2)
    q_out, k_out = rotated.unbind(0)
    return q_out, k_out
