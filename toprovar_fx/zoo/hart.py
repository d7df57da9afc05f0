"""HART-style hybrid generator: VAR-style blocks plus a residual diffusion head.

The transformer, sampler and VQ are the VAR-style ones (``var.py``), class-conditional
(HART proper is text-conditioned; see ``docs/zoo.md``). After the last scale a small MLP
denoiser (AdaLN residual MLP blocks conditioned on a timestep embedding and on the last
hidden state of each final-scale token) runs a few deterministic DDIM steps (eta = 0) on a
cosine noise schedule to produce the continuous residual ``[B, Cvae, h_K, w_K]`` that the
discrete tokens cannot express; it is added to ``f_hat`` before decoding. The denoiser uses
the same classifier-free guidance as the logits, ``(1 + t) * eps_cond - t * eps_uncond``,
and starts both halves from the same noise, drawn from the sampler's generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import NORM_EPS, init_linear_, modulate
from .var import VARConfig, VARStyle

HART_1024_PATCH_NUMS = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)


@dataclass(frozen=True)
class HARTConfig(VARConfig):
    """VAR-style config plus the residual diffusion head."""

    diff_width: int = 1024
    diff_depth: int = 6
    diff_steps: int = 8
    diff_train_steps: int = 1000
    # the denoiser works on residual / latent_scale; its x0 estimate is clipped to +-1
    latent_scale: float = 0.6


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[N, dim]`` of (possibly fractional) timesteps ``t [N]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat((args.cos(), args.sin()), dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedder(nn.Module):
    """Sinusoidal features -> ``Linear -> SiLU -> Linear``."""

    def __init__(self, width: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.fc1 = nn.Linear(freq_dim, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(timestep_embedding(t, self.freq_dim))))


class DenoiserBlock(nn.Module):
    """``x + gate * MLP(modulate(LN(x)))`` with shift/scale/gate from the condition."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=NORM_EPS)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.ada = nn.Linear(width, 3 * width)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.ada(F.silu(y)).chunk(3, dim=-1)
        h = self.fc2(F.silu(self.fc1(modulate(self.norm(x), scale, shift))))
        return x + gate * h


class MLPDenoiser(nn.Module):
    """Predicts the noise ``eps [N, Cvae]`` of ``x_t [N, Cvae]`` given ``t [N]`` and ``z [N, C]``."""

    def __init__(self, cvae: int, width: int, depth: int, cond_dim: int) -> None:
        super().__init__()
        self.input_proj = nn.Linear(cvae, width)
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.blocks = nn.ModuleList(DenoiserBlock(width) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, eps=NORM_EPS, elementwise_affine=False)
        self.final_ada = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, cvae)

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y = self.time_embed(t) + self.cond_embed(z)
        h = self.input_proj(x)
        for blk in self.blocks:
            h = blk(h, y)
        shift, scale = self.final_ada(F.silu(y)).chunk(2, dim=-1)
        return self.out(modulate(self.final_norm(h), scale, shift))


def cosine_alphas_cumprod(train_steps: int) -> list[float]:
    """``alpha_bar(t)`` of the cosine schedule (Nichol & Dhariwal), betas capped at 0.999."""

    def f(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    out, prod = [], 1.0
    for i in range(train_steps):
        beta = min(1 - f((i + 1) / train_steps) / f(i / train_steps), 0.999)
        prod *= 1 - beta
        out.append(prod)
    return out


class ResidualDiffusionHead(nn.Module):
    """Deterministic DDIM sampler around ``MLPDenoiser`` (HART's residual diffusion)."""

    def __init__(
        self,
        cvae: int,
        width: int,
        depth: int,
        cond_dim: int,
        steps: int,
        train_steps: int,
        latent_scale: float,
    ) -> None:
        super().__init__()
        self.cvae, self.steps, self.train_steps = cvae, steps, train_steps
        self.latent_scale = latent_scale
        self.net = MLPDenoiser(cvae, width, depth, cond_dim)
        self._alpha_bar = cosine_alphas_cumprod(train_steps)

    def timesteps(self) -> list[int]:
        """``steps`` evenly spaced training timesteps, from ``train_steps - 1`` down to 0."""
        if self.steps == 1:
            return [self.train_steps - 1]
        return [round((self.train_steps - 1) * (1 - i / (self.steps - 1))) for i in range(self.steps)]

    def sample(self, z: torch.Tensor, guidance: float, rng: torch.Generator | None) -> torch.Tensor:
        """Residual ``[N, Cvae]`` for the conditional rows; ``z [2N, C]`` = cond rows then uncond."""
        n = z.shape[0] // 2
        x = torch.randn(n, self.cvae, generator=rng, device=z.device, dtype=z.dtype)
        ts = self.timesteps()
        for i, t in enumerate(ts):
            t_vec = torch.full((2 * n,), t, device=z.device, dtype=torch.long)
            eps_c, eps_u = self.net(torch.cat((x, x), dim=0), t_vec, z).chunk(2, dim=0)
            eps = (1 + guidance) * eps_c - guidance * eps_u
            a_t = self._alpha_bar[t]
            a_prev = self._alpha_bar[ts[i + 1]] if i + 1 < len(ts) else 1.0
            x0 = ((x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)).clamp(-1, 1)
            x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
        return x * self.latent_scale


class HARTStyle(VARStyle):
    """VAR-style transformer plus a residual diffusion head on the last scale."""

    family = "hart"

    def __init__(self, cfg: HARTConfig) -> None:
        super().__init__(cfg)
        self.decoder_norm = nn.LayerNorm(cfg.width, eps=NORM_EPS)
        self.diffusion = ResidualDiffusionHead(
            cfg.cvae,
            cfg.diff_width,
            cfg.diff_depth,
            cfg.width,
            cfg.diff_steps,
            cfg.diff_train_steps,
            cfg.latent_scale,
        )

    @torch.no_grad()
    def _init_extra(self, gen: torch.Generator) -> None:
        """Norms to identity; denoiser AdaLN layers give +-0.3 modulation and gates ~ 1."""
        for m in (self.decoder_norm, *(b.norm for b in self.diffusion.net.blocks)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        net = self.diffusion.net
        init_linear_(net.final_ada, gen, gain=0.3)
        for blk in net.blocks:
            init_linear_(blk.ada, gen, gain=0.3)
            blk.ada.bias[2 * blk.ada.out_features // 3 :].fill_(1.0)  # gate ~ 1

    def refine_f_hat(
        self,
        f_hat: torch.Tensor,
        last_hidden: torch.Tensor,
        idx_Bl: torch.Tensor,
        guidance: float,
        rng: torch.Generator | None,
    ) -> torch.Tensor:
        """Add the diffusion residual, conditioned on each final-scale token's hidden state."""
        b = idx_Bl.shape[0]
        h, w = self.schedule[-1]
        discrete = self.word_embed(self.vae.quantize.embedding(idx_Bl))  # [B, L, C]
        z = self.decoder_norm(last_hidden + discrete.repeat(2, 1, 1))  # [2B, L, C]
        length = z.shape[1]
        # token-major rows so that the cond half stays first: [2B*L, C]
        resid = self.diffusion.sample(z.reshape(2 * b * length, -1), guidance, rng)
        resid = resid.view(b, length, self.cvae).transpose(1, 2).reshape(b, self.cvae, h, w)
        return f_hat + resid
