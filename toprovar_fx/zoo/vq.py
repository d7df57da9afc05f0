"""Multi-scale residual VQ (decoder side) for the VAR-style stand-ins.

What the generator needs from a VAR tokenizer, and nothing more:

* a codebook ``embedding [V, Cvae]`` that turns sampled ids into latent vectors;
* the residual accumulation across scales: the scale-``k`` token map ``z_k [B, Cvae, h_k, w_k]``
  is upsampled (bicubic) to the final latent size, passed through a small 3x3 conv ``phi``
  blended with its input (VAR's ``Phi``: ``(1 - r) * z + r * conv(z)``, 4 convs partially
  shared over the scale ratio), and added to ``f_hat``; the next scale's input is
  ``f_hat`` area-downsampled to the next scale's size (VAR's ``get_next_autoregressive_input``);
* a convolutional decoder ``f_hat [B, Cvae, H/d, W/d] -> image [B, 3, H, W]`` in ``[-1, 1]``.

The encoder and the training losses are not here: the stand-ins generate, they do not
tokenize. Weights are random unless a checkpoint is loaded; ``init_weights`` gives them a
scale at which the decoded image depends on every token map.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import init_conv_, init_conv_net_


class Phi(nn.Module):
    """``(1 - ratio) * z + ratio * conv3x3(z)``: refines an upsampled token map."""

    def __init__(self, channels: int, ratio: float = 0.5) -> None:
        super().__init__()
        self.ratio = ratio
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * (1 - self.ratio) + self.conv(z) * self.ratio


class PartiallySharedPhi(nn.Module):
    """``n`` ``Phi`` modules; scale ratio ``si / (K - 1)`` picks the one with the nearest tick."""

    def __init__(self, channels: int, n: int = 4, ratio: float = 0.5) -> None:
        super().__init__()
        self.phis = nn.ModuleList(Phi(channels, ratio) for _ in range(n))
        margin = 1 / (3 * n)
        self.ticks = [margin + i * (1 - 2 * margin) / max(n - 1, 1) for i in range(n)]

    def pick(self, at: float) -> Phi:
        """The ``Phi`` for a scale at relative position ``at`` in ``[0, 1]``."""
        best = 0
        for i, tick in enumerate(self.ticks):
            if abs(tick - at) < abs(self.ticks[best] - at):
                best = i
        return self.phis[best]


class MultiScaleQuantizer(nn.Module):
    """Codebook plus the residual ``f_hat`` accumulation over a scale schedule."""

    def __init__(self, vocab_size: int, cvae: int, n_phi: int = 4, phi_ratio: float = 0.5) -> None:
        super().__init__()
        self.vocab_size, self.cvae = vocab_size, cvae
        self.embedding = nn.Embedding(vocab_size, cvae)
        self.quant_resi = PartiallySharedPhi(cvae, n_phi, phi_ratio)

    def next_autoregressive_input(
        self,
        si: int,
        schedule: list[tuple[int, int]],
        f_hat: torch.Tensor,
        h_BChw: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add scale ``si``'s token map ``h_BChw`` to ``f_hat``; return ``(f_hat, next_input)``.

        ``next_input`` is ``f_hat`` area-downsampled to scale ``si + 1`` (``f_hat`` itself
        after the last scale).
        """
        num_scales = len(schedule)
        phi = self.quant_resi.pick(si / max(num_scales - 1, 1))
        final_hw = tuple(f_hat.shape[-2:])
        if si != num_scales - 1:
            f_hat = f_hat + phi(F.interpolate(h_BChw, size=final_hw, mode="bicubic"))
            return f_hat, F.interpolate(f_hat, size=schedule[si + 1], mode="area")
        f_hat = f_hat + phi(h_BChw)
        return f_hat, f_hat

    def idx_to_f_hat(
        self, idx_per_scale: list[torch.Tensor], schedule: list[tuple[int, int]]
    ) -> torch.Tensor:
        """Accumulate ``f_hat [B, Cvae, h_K, w_K]`` from token ids ``[B, h_k * w_k]`` per scale."""
        b = idx_per_scale[0].shape[0]
        f_hat = self.embedding.weight.new_zeros(b, self.cvae, *schedule[-1])
        for si, (idx, (h, w)) in enumerate(zip(idx_per_scale, schedule)):
            h_BChw = self.embedding(idx).transpose(1, 2).reshape(b, self.cvae, h, w)
            f_hat, _ = self.next_autoregressive_input(si, schedule, f_hat, h_BChw)
        return f_hat


def _groups(channels: int) -> int:
    return 8 if channels % 8 == 0 else 1


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, plus a (1x1 if needed) skip."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ConvDecoder(nn.Module):
    """Latent ``[B, Cvae, h, w]`` -> image ``[B, 3, h * 2**(len(ch_mult)-1), ...]``."""

    def __init__(self, cvae: int, ch: int, ch_mult: tuple[int, ...]) -> None:
        super().__init__()
        chans = [ch * m for m in ch_mult]
        self.conv_in = nn.Conv2d(cvae, chans[-1], 3, padding=1)
        self.mid = ResBlock(chans[-1], chans[-1])
        layers: list[nn.Module] = []
        cin = chans[-1]
        for level in reversed(range(len(chans))):
            layers.append(ResBlock(cin, chans[level]))
            cin = chans[level]
            if level != 0:
                layers.append(Upsample(cin))
        self.up = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(_groups(cin), cin)
        self.conv_out = nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


class MultiScaleVQ(nn.Module):
    """The tokenizer half a VAR sampler uses: ``quantize`` plus ``fhat_to_img``."""

    def __init__(
        self,
        vocab_size: int,
        cvae: int,
        ch: int,
        ch_mult: tuple[int, ...],
        n_phi: int = 4,
        phi_ratio: float = 0.5,
    ) -> None:
        super().__init__()
        self.vocab_size, self.cvae = vocab_size, cvae
        self.downsample = 2 ** (len(ch_mult) - 1)
        self.quantize = MultiScaleQuantizer(vocab_size, cvae, n_phi, phi_ratio)
        self.post_quant_conv = nn.Conv2d(cvae, cvae, 3, padding=1)
        self.decoder = ConvDecoder(cvae, ch, ch_mult)

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Decode the accumulated latent to an image in ``[-1, 1]``."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)

    @torch.no_grad()
    def init_weights(self, gen: torch.Generator, codebook_std: float = 0.5) -> None:
        """Random weights at a scale where images depend on the tokens (see ``docs/zoo.md``)."""
        nn.init.normal_(self.quantize.embedding.weight, std=codebook_std, generator=gen)
        init_conv_net_(self, gen)
        # a smaller output layer keeps most pixels inside the [-1, 1] clamp
        init_conv_(self.decoder.conv_out, gen, gain=0.5)
