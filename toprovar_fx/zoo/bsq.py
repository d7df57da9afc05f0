"""Bitwise multi-scale quantizer helpers and a small random image decoder.

A token at one scale is ``d`` binary bits. Following binary spherical quantization (BSQ), the
bits map to the code ``(2 * bit - 1) / sqrt(d)`` (a corner of the hypercube on the unit
sphere). The multi-scale residual scheme accumulates every scale's code map, upsampled to the
final resolution, into ``summed_codes``; the transformer's input for the next scale is the
accumulated map area-downsampled to that scale's grid. The decoder turns the final summed
codes into an RGB image in ``[0, 1]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def bits_to_codes(bits: torch.Tensor, hw: tuple[int, int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``bits [B, h*w, d]`` (0/1 integers) -> codes ``[B, d, h, w]`` with values ``±1/sqrt(d)``."""
    b, n, d = bits.shape
    h, w = hw
    if n != h * w:
        raise ValueError(f"bits_to_codes: {n} tokens do not fill a {h}x{w} grid")
    codes = bits.to(dtype).mul(2.0).sub(1.0).mul(d**-0.5)
    return codes.transpose(1, 2).reshape(b, d, h, w)


def upsample_codes(codes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Upsample a code map ``[B, d, h, w]`` to ``size`` (bilinear, as the reference VAE's ``up`` mode)."""
    if tuple(codes.shape[-2:]) == tuple(size):
        return codes
    return F.interpolate(codes, size=size, mode="bilinear", align_corners=False)


def downsample_codes(summed: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Area-downsample the accumulated codes ``[B, d, H, W]`` to ``size``."""
    if tuple(summed.shape[-2:]) == tuple(size):
        return summed
    return F.interpolate(summed, size=size, mode="area")


class BitwiseDecoder(nn.Module):
    """A small convolutional decoder: summed codes ``[B, d, h, w]`` -> image ``[B, 3, f*h, f*w]``.

    ``f = 2 ** (len(channels) - 1)``: one nearest-neighbour 2x upsample + 3x3 conv + SiLU per
    stage after the first width. Random weights; it stands in for the VAE decoder so that a
    generation ends in pixels.
    """

    def __init__(self, bits: int, channels: Sequence[int] = (32, 16, 16, 8, 8)) -> None:
        super().__init__()
        channels = tuple(channels)
        if len(channels) < 1:
            raise ValueError("BitwiseDecoder needs at least one channel width")
        self.bits = bits
        self.channels = channels
        self.conv_in = nn.Conv2d(bits, channels[0], 3, padding=1)
        self.ups = nn.ModuleList(
            nn.Conv2d(cin, cout, 3, padding=1) for cin, cout in zip(channels[:-1], channels[1:])
        )
        self.conv_out = nn.Conv2d(channels[-1], 3, 3, padding=1)

    @property
    def upsample_factor(self) -> int:
        """Pixels per token along each side."""
        return 2 ** len(self.ups)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """Decode ``codes [B, d, h, w]`` to an image ``[B, 3, f*h, f*w]`` in ``[0, 1]``."""
        x = F.silu(self.conv_in(codes * self.bits**0.5))
        for conv in self.ups:
            x = F.silu(conv(F.interpolate(x, scale_factor=2.0, mode="nearest")))
        return torch.tanh(self.conv_out(x)).add(1.0).mul(0.5).clamp(0.0, 1.0)
