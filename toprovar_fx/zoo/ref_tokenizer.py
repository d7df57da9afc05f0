"""Multi-scale residual VQ tokenizer of the reference model (``var-ref``), trainable here.

The generator side is ``vq.MultiScaleVQ`` itself: the trained tokenizer *owns* one
(``RefTokenizer.vae``), so its weights load unchanged into ``VARStyle.vae`` (same class, same
keys: ``quantize.embedding``, ``quantize.quant_resi.phis.*``, ``post_quant_conv``,
``decoder.*``). What the zoo's VQ lacks, and is added here, is the tokenizing half:

* ``Encoder``: image ``[B, 3, H, W]`` in ``[-1, 1]`` -> latent ``f [B, Cvae, H/16, W/16]``
  (a stride-2 4x4 stem, then ResBlock + stride-2 conv per level, a mid ResBlock, GroupNorm,
  SiLU, 3x3 conv), then ``quant_conv`` (3x3);
* ``quantize``: VAR's multi-scale residual quantisation over ``patch_nums`` with one shared
  codebook. For scale ``k``: ``r_k = area(f - f_hat, p_k)`` (the full residual at the last
  scale), ``idx_k = argmin_v ||r_k - e_v||^2``, ``z_k = phi_k(bicubic(e[idx_k], p_K))`` with the
  same partially shared ``Phi`` the sampler uses, ``f_hat += z_k``. This is exactly the
  accumulation of ``MultiScaleQuantizer.next_autoregressive_input``, so ids produced here
  and replayed by the sampler give the same ``f_hat`` (tested).
* losses as in VAR's quantiser: ``mean_k beta * ||sg(f_hat_k) - f||^2 + ||f_hat_k - sg(f)||^2``
  and the straight-through estimator ``f + sg(f_hat - f)`` into the decoder.
* ``restart_dead_codes``: codes unused since the last call are re-seeded with residual
  vectors of the current batch (no codebook collapse in a short training run).

``img_to_idx`` and ``idx_to_var_input`` give the token maps and the teacher-forcing inputs
(VAR's ``idxBl_to_var_input``) for training the transformer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import init_conv_, init_conv_net_
from .var import VAR_256_PATCH_NUMS
from .vq import MultiScaleVQ, ResBlock, _groups


@dataclass(frozen=True)
class TokenizerConfig:
    """Sizes of the reference tokenizer (``ch``/``ch_mult``: the decoder, as in ``VARConfig``)."""

    vocab_size: int = 2048
    cvae: int = 32
    ch: int = 32
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    enc_ch: int = 32
    enc_ch_mult: tuple[int, ...] = (1, 2, 2, 4, 4)
    patch_nums: tuple[int, ...] = VAR_256_PATCH_NUMS
    beta: float = 0.25

    def __post_init__(self) -> None:
        if len(self.ch_mult) < 2 or len(self.enc_ch_mult) != len(self.ch_mult):
            raise ValueError("ch_mult and enc_ch_mult need the same length (>= 2)")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def image_size(self) -> int:
        return self.patch_nums[-1] * self.downsample

    def to_dict(self) -> dict:
        return asdict(self)


class Encoder(nn.Module):
    """Image ``[B, 3, H, W]`` -> latent ``[B, cvae, H / 2**(n-1), W / 2**(n-1)]``, ``n = len(ch_mult)``."""

    def __init__(self, cvae: int, ch: int, ch_mult: tuple[int, ...]) -> None:
        super().__init__()
        chans = [ch * m for m in ch_mult]
        self.conv_in = nn.Conv2d(3, chans[0], 4, stride=2, padding=1)  # first /2, cheap at full size
        layers: list[nn.Module] = []
        for i in range(1, len(chans)):
            layers.append(ResBlock(chans[i - 1], chans[i]))
            if i < len(chans) - 1:
                layers.append(nn.Conv2d(chans[i], chans[i], 3, stride=2, padding=1))
        self.down = nn.Sequential(*layers)
        self.mid = ResBlock(chans[-1], chans[-1])
        self.norm_out = nn.GroupNorm(_groups(chans[-1]), chans[-1])
        self.conv_out = nn.Conv2d(chans[-1], cvae, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


@dataclass
class QuantOut:
    """What ``RefTokenizer.quantize`` returns."""

    f_hat: torch.Tensor  # straight-through: value f_hat, gradient to f
    idx: list[torch.Tensor]  # per scale [B, p*p] int64
    vq_loss: torch.Tensor
    rest: torch.Tensor  # [N, Cvae] residual vectors that were quantised (detached, for restarts)


class RefTokenizer(nn.Module):
    """Encoder + multi-scale residual VQ + (``vq.MultiScaleVQ``) decoder; see the module docstring."""

    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_nums = tuple(cfg.patch_nums)
        self.schedule = [(p, p) for p in self.patch_nums]
        self.encoder = Encoder(cfg.cvae, cfg.enc_ch, tuple(cfg.enc_ch_mult))
        self.quant_conv = nn.Conv2d(cfg.cvae, cfg.cvae, 3, padding=1)
        self.vae = MultiScaleVQ(cfg.vocab_size, cfg.cvae, cfg.ch, tuple(cfg.ch_mult))
        self.register_buffer("usage", torch.zeros(cfg.vocab_size), persistent=False)

    @property
    def codebook(self) -> nn.Embedding:
        return self.vae.quantize.embedding

    @torch.no_grad()
    def init_weights(self, gen: torch.Generator) -> None:
        """Variance-preserving conv init, unit GroupNorm, small codebook; seeded by ``gen``."""
        init_conv_net_(self, gen)
        init_conv_(self.vae.decoder.conv_out, gen, gain=0.5)
        init_conv_(self.encoder.conv_out, gen, gain=0.5)
        nn.init.normal_(self.codebook.weight, std=0.1, generator=gen)

    # ------------------------------------------------------------------ encode / quantise / decode
    def encode(self, img: torch.Tensor) -> torch.Tensor:
        """Continuous latent ``f`` of images in ``[-1, 1]``."""
        return self.quant_conv(self.encoder(img))

    def _nearest(self, rest_NC: torch.Tensor) -> torch.Tensor:
        w = self.codebook.weight.float()
        d = (rest_NC.square().sum(1, keepdim=True) + w.square().sum(1)[None]).addmm_(rest_NC, w.t(), alpha=-2)
        return d.argmin(1)

    def quantize(self, f: torch.Tensor) -> QuantOut:
        """VAR's multi-scale residual quantisation of ``f`` (in fp32, autocast off)."""
        with torch.autocast(device_type=f.device.type, enabled=False):
            f = f.float()
            b, c, h, w = f.shape
            f_ng = f.detach()
            f_rest = f_ng.clone()
            f_hat = torch.zeros_like(f)
            k = len(self.schedule)
            idx_all: list[torch.Tensor] = []
            rests: list[torch.Tensor] = []
            loss = f.new_zeros(())
            for si, (ph, pw) in enumerate(self.schedule):
                rest = f_rest if si == k - 1 else F.interpolate(f_rest, size=(ph, pw), mode="area")
                rest_NC = rest.permute(0, 2, 3, 1).reshape(-1, c)
                idx = self._nearest(rest_NC)
                rests.append(rest_NC)
                idx_all.append(idx.view(b, ph * pw))
                z = self.codebook(idx).view(b, ph, pw, c).permute(0, 3, 1, 2)
                phi = self.vae.quantize.quant_resi.pick(si / max(k - 1, 1))
                z = phi(z if si == k - 1 else F.interpolate(z, size=(h, w), mode="bicubic"))
                f_hat = f_hat + z
                f_rest = f_rest - z.detach()
                loss = loss + self.cfg.beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f_ng)
            f_st = (f_hat.detach() - f_ng) + f
            return QuantOut(f_st, idx_all, loss / k, torch.cat(rests, 0))

    def decode(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Decoder output (not clamped; ``vae.fhat_to_img`` clamps)."""
        return self.vae.decoder(self.vae.post_quant_conv(f_hat))

    def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, QuantOut]:
        """Reconstruction of ``img`` (unclamped) through the quantiser, and the ``QuantOut``."""
        q = self.quantize(self.encode(img))
        return self.decode(q.f_hat), q

    # ------------------------------------------------------------------ codebook maintenance
    @torch.no_grad()
    def count_usage(self, idx: list[torch.Tensor]) -> None:
        """Accumulate how often each code was used (for ``restart_dead_codes``)."""
        self.usage += torch.bincount(torch.cat([i.reshape(-1) for i in idx]), minlength=self.cfg.vocab_size).float()

    @torch.no_grad()
    def restart_dead_codes(self, rest: torch.Tensor, gen: torch.Generator, noise: float = 0.01) -> torch.Tensor:
        """Re-seed codes unused since the last call with random rows of ``rest``; reset the counts.

        Returns the boolean mask of re-seeded codes (so an optimiser's moments can be reset).
        """
        dead = self.usage == 0
        n = int(dead.sum())
        if n:
            pick = torch.randint(0, rest.shape[0], (n,), generator=gen, device=gen.device).to(rest.device)
            new = rest[pick].float()
            new = new + noise * new.std() * torch.randn(new.shape, generator=gen, device=gen.device).to(rest.device)
            self.codebook.weight[dead] = new.to(self.codebook.weight.dtype)
        self.usage.zero_()
        return dead

    # ------------------------------------------------------------------ token maps
    @torch.no_grad()
    def img_to_idx(self, img: torch.Tensor) -> list[torch.Tensor]:
        """Token ids per scale (``[B, p*p]`` each) of images in ``[-1, 1]``."""
        return self.quantize(self.encode(img)).idx

    @torch.no_grad()
    def idx_to_var_input(self, idx: list[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing inputs ``[B, L - p_0^2, Cvae]``: ``f_hat`` after scales ``< k``,
        area-downsampled to scale ``k``, for ``k = 1 .. K-1`` (the sampler's ``next_token_map``
        before ``word_embed``), computed with ``MultiScaleQuantizer.next_autoregressive_input``."""
        b = idx[0].shape[0]
        q = self.vae.quantize
        f_hat = self.codebook.weight.new_zeros(b, self.cfg.cvae, *self.schedule[-1])
        outs = []
        for si in range(len(self.schedule) - 1):
            ph, pw = self.schedule[si]
            h = self.codebook(idx[si]).transpose(1, 2).reshape(b, self.cfg.cvae, ph, pw)
            f_hat, nxt = q.next_autoregressive_input(si, self.schedule, f_hat, h)
            outs.append(nxt.reshape(b, self.cfg.cvae, -1).transpose(1, 2))
        return torch.cat(outs, 1)

    @torch.no_grad()
    def reconstruct(self, img: torch.Tensor) -> torch.Tensor:
        """Tokenise and decode images in ``[-1, 1]``; returns ``[0, 1]`` images (clamped)."""
        idx = self.img_to_idx(img)
        return self.vae.fhat_to_img(self.vae.quantize.idx_to_f_hat(idx, self.schedule)).add(1).mul(0.5)


def count_params(module: nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())


def psnr_batch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of ``[B, C, H, W]`` images in ``[0, 1]``."""
    mse = (a.float() - b.float()).square().flatten(1).mean(1).clamp_min(1e-10)
    return -10 * torch.log10(mse)


__all__ = [
    "Encoder",
    "QuantOut",
    "RefTokenizer",
    "TokenizerConfig",
    "count_params",
    "psnr_batch",
]
