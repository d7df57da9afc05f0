"""VAR-style class-conditional next-scale generator (a from-scratch stand-in).

Architecture (see ``docs/zoo.md`` for what is reproduced and what is simplified):

* condition: a class embedding (``num_classes + 1`` rows, the last one is the null class used
  by the unconditional CFG half); it is also the start token (plus a learned ``pos_start``);
* input of scale ``k > 0``: ``word_embed(f_hat area-downsampled to scale k)``; every scale adds
  a level embedding and a learned absolute positional embedding;
* ``depth`` blocks, each ``x = x + f_sa(x); x = x + f_ffn(x)`` with AdaLN modulation from one
  *shared* ``SiLU -> Linear(C, 6C)`` plus per-block learnable gains (VAR's ``shared_aln``);
  self-attention attends to the K/V cache of every earlier scale plus the current tokens;
* head: AdaLN before the head, then ``Linear(C, V)``;
* sampling: CFG on a doubled batch (conditional rows first, then the null class), guidance
  ``t = cfg * si / (K - 1)`` ramping from 0 at the first scale to ``cfg`` at the last, guided
  logits ``(1 + t) * cond - t * uncond``, top-k / top-p multinomial sampling from a seeded
  ``torch.Generator``; tokens are accumulated into ``f_hat`` by the multi-scale residual VQ
  and decoded to an image in ``[0, 1]``.

``cfg=0`` turns guidance off (the logits are the conditional rows'); the batch is doubled
regardless, as in VAR.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from . import reference_pruning
from .common import (
    FFN,
    NORM_EPS,
    AdaLNBeforeHead,
    CachedSelfAttention,
    SharedAdaLin,
    gumbel_softmax,
    init_linear_,
    make_generator,
    modulate,
    sample_top_k_top_p,
)
from .vq import MultiScaleVQ

VAR_256_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)

# more_smooth (visualisation only, as in VAR): Gumbel temperature max(T0 * (1 - 0.95 r), T_MIN)
_GUMBEL_T0, _GUMBEL_DECAY, _GUMBEL_T_MIN = 0.27, 0.95, 0.005


@dataclass(frozen=True)
class VARConfig:
    """Hyper-parameters of a VAR-style model (widths in channels, ``patch_nums`` square sides)."""

    depth: int
    width: int
    heads: int
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    vocab_size: int = 4096
    cvae: int = 32
    patch_nums: tuple[int, ...] = VAR_256_PATCH_NUMS
    qk_norm: bool = True
    vq_ch: int = 128
    vq_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    # init: attention logit scale = attn_temperature * sqrt(head_dim) * cos(q, k) at init
    attn_temperature: float = 2.0

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be a multiple of heads {self.heads}")
        if not self.patch_nums or list(self.patch_nums) != sorted(self.patch_nums):
            raise ValueError(f"patch_nums must be non-empty and increasing, got {self.patch_nums}")

    @property
    def image_size(self) -> int:
        return self.patch_nums[-1] * 2 ** (len(self.vq_ch_mult) - 1)

    def to_dict(self) -> dict:
        return asdict(self)


class AdaLNSelfAttnBlock(nn.Module):
    """``x = x + f_sa(x); x = x + f_ffn(x)``, both AdaLN-modulated, gains from the shared AdaLN.

    ``cond_BD`` is the shared AdaLN output ``[N, 1, 6, C]``; the block adds its own gains
    ``ada_gss [1, 1, 6, C]`` and splits into ``gamma1, gamma2, scale1, scale2, shift1, shift2``.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, qk_norm: bool = True) -> None:
        super().__init__()
        self.width = width
        self.ada_gss = nn.Parameter(torch.empty(1, 1, 6, width))
        self.norm = nn.LayerNorm(width, eps=NORM_EPS, elementwise_affine=False)
        self.attn = CachedSelfAttention(width, heads, qk_norm)
        self.ffn = FFN(width, mlp_ratio)

    def attn_branch(
        self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, gamma: torch.Tensor
    ) -> torch.Tensor:
        """Self-attention sublayer output for the tokens ``x`` (appends their K/V when caching)."""
        return self.attn(modulate(self.norm(x), scale, shift)) * gamma

    def ffn_branch(
        self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, gamma: torch.Tensor
    ) -> torch.Tensor:
        """FFN sublayer output for the tokens ``x``."""
        return self.ffn(modulate(self.norm(x), scale, shift)) * gamma

    def forward(self, x: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss + cond_BD).unbind(2)
        x = x + self.attn_branch(x, scale1, shift1, gamma1)
        x = x + self.ffn_branch(x, scale2, shift2, gamma2)
        return x

    def forward_ref_pruning(
        self,
        x: torch.Tensor,
        cond_BD: torch.Tensor,
        pruning: reference_pruning.RefPruning,
        scale: int,
        layer: int,
        hw: tuple[int, int],
    ) -> torch.Tensor:
        """The same block under the reference pruning decisions (test oracle, slow path)."""
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss + cond_BD).unbind(2)

        def sa(t: torch.Tensor) -> torch.Tensor:
            return self.attn_branch(t, scale1, shift1, gamma1)

        def ffn(t: torch.Tensor) -> torch.Tensor:
            return self.ffn_branch(t, scale2, shift2, gamma2)

        x = reference_pruning.run_branch(pruning, scale, layer, "self_attn", hw, x, sa)
        return reference_pruning.run_branch(pruning, scale, layer, "ffn", hw, x, ffn)


class VARStyle(nn.Module):
    """Class-conditional VAR-style generator; see the module docstring."""

    family = "var"

    def __init__(self, cfg: VARConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.width
        self.depth, self.width, self.heads = cfg.depth, cfg.width, cfg.heads
        self.num_classes, self.vocab_size, self.cvae = cfg.num_classes, cfg.vocab_size, cfg.cvae
        self.patch_nums = tuple(cfg.patch_nums)
        self.schedule = [(p, p) for p in self.patch_nums]
        self.scale_schedules = {f"{cfg.image_size}:1:1": list(self.schedule)}
        self.first_l = self.patch_nums[0] ** 2
        self.begin_ends: list[tuple[int, int]] = []
        cur = 0
        for p in self.patch_nums:
            self.begin_ends.append((cur, cur + p * p))
            cur += p * p
        self.total_tokens = cur

        self.vae = MultiScaleVQ(cfg.vocab_size, cfg.cvae, cfg.vq_ch, tuple(cfg.vq_ch_mult))
        self.word_embed = nn.Linear(cfg.cvae, c)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, c)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, c))
        self.pos_1LC = nn.Parameter(torch.empty(1, self.total_tokens, c))
        self.lvl_embed = nn.Embedding(len(self.patch_nums), c)
        self.shared_ada_lin = SharedAdaLin(c, c)
        self.blocks = nn.ModuleList(
            AdaLNSelfAttnBlock(c, cfg.heads, cfg.mlp_ratio, cfg.qk_norm) for _ in range(cfg.depth)
        )
        self.head_nm = AdaLNBeforeHead(c, c)
        self.head = nn.Linear(c, cfg.vocab_size)

    # ------------------------------------------------------------------ metadata
    def fingerprint(self) -> dict:
        """``dict(family, depth, width, heads, num_scales)`` (the zoo contract)."""
        return {
            "family": self.family,
            "depth": self.depth,
            "width": self.width,
            "heads": self.heads,
            "num_scales": len(self.patch_nums),
        }

    @property
    def device(self) -> torch.device:
        return self.class_emb.weight.device

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, gen: torch.Generator) -> None:
        """Random weights at which attention, AdaLN and the head all matter (``docs/zoo.md``).

        Linear layers: std ``1/sqrt(fan_in)``, zero bias; embeddings: unit-ish; per-block AdaLN
        gains ``gamma ~ 1`` (VAR trains from ~1e-5, which would make every block a no-op here);
        the head is not scaled down. Deterministic for a given generator state.
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                init_linear_(m, gen)
        self.vae.init_weights(gen)
        nn.init.normal_(self.class_emb.weight, std=1.0, generator=gen)
        nn.init.normal_(self.pos_start, std=0.5, generator=gen)
        nn.init.normal_(self.pos_1LC, std=0.5, generator=gen)
        nn.init.normal_(self.lvl_embed.weight, std=0.5, generator=gen)
        # the shared AdaLN and the head's AdaLN vary the modulation by +-0.3 around the gains
        init_linear_(self.shared_ada_lin.lin, gen, gain=0.3)
        init_linear_(self.head_nm.ada_lin, gen, gain=0.3)
        for blk in self.blocks:
            nn.init.normal_(blk.ada_gss, std=0.1, generator=gen)
            blk.ada_gss[:, :, :2].add_(1.0)  # gamma1, gamma2 ~ 1
            if blk.attn.log_scale is not None:
                blk.attn.log_scale.fill_(math.log(self.cfg.attn_temperature * math.sqrt(blk.attn.head_dim)))
        self._init_extra(gen)

    def _init_extra(self, gen: torch.Generator) -> None:
        """Hook for subclasses with extra modules (HART's diffusion head)."""

    # ------------------------------------------------------------------ pieces of the sampler
    def get_logits(self, h: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        """AdaLN-before-head then the vocabulary head; fp32 logits ``[N, L, V]``."""
        return self.head(self.head_nm(h, cond_BD)).float()

    def level_pos_all(self) -> torch.Tensor:
        """Level plus positional embedding of every token of the pyramid: ``[1, L_total, C]``."""
        lvl_ids = torch.repeat_interleave(
            torch.arange(len(self.patch_nums), device=self.pos_1LC.device),
            torch.tensor([e - b for b, e in self.begin_ends], device=self.pos_1LC.device),
        )
        return self.lvl_embed(lvl_ids).unsqueeze(0) + self.pos_1LC

    def set_kv_caching(self, enable: bool) -> None:
        """Turn every block's K/V cache on or off (either way it starts empty)."""
        for blk in self.blocks:
            blk.attn.kv_caching(enable)

    def run_blocks_ref_pruning(
        self,
        x: torch.Tensor,
        cond_BD_or_gss: torch.Tensor,
        si: int,
        ref_pruning: reference_pruning.RefPruning,
    ) -> torch.Tensor:
        """All blocks at scale ``si`` through the reference pruning oracle (test path only)."""
        hw = self.schedule[si]
        for layer, blk in enumerate(self.blocks):
            x = blk.forward_ref_pruning(x, cond_BD_or_gss, ref_pruning, si, layer, hw)
        return x

    def refine_f_hat(
        self,
        f_hat: torch.Tensor,
        last_hidden: torch.Tensor,
        idx_Bl: torch.Tensor,
        guidance: float,
        rng: torch.Generator | None,
    ) -> torch.Tensor:
        """Hook after the last scale (identity for VAR; HART adds its diffusion residual)."""
        return f_hat

    # ------------------------------------------------------------------ sampler
    @torch.no_grad()
    def autoregressive_infer_cfg(
        self,
        B: int,
        label_B: int | torch.Tensor | None = None,
        g_seed: int | None = None,
        cfg: float = 1.5,
        top_k: int = 0,
        top_p: float = 0.0,
        more_smooth: bool = False,
        *,
        return_logits: bool = False,
        ref_pruning: reference_pruning.RefPruning | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Generate ``B`` images ``[B, 3, H, W]`` in ``[0, 1]``.

        ``label_B``: class ids ``[B]``, one int for all (negative: the null class), or ``None``
        to sample classes uniformly with the seeded generator. ``g_seed``: seed of the
        sampler's ``torch.Generator`` (``None``: torch's global RNG). ``cfg``: guidance at the
        last scale (ramps linearly from 0; ``0`` disables it). With ``return_logits`` also
        returns the guided fp32 logits ``[B, h_s*w_s, V]`` of every scale. ``ref_pruning``
        runs the blocks through the reference pruning oracle.
        """
        device = self.device
        rng = make_generator(device, g_seed)
        if label_B is None:
            uniform = torch.full((1, self.num_classes), 1.0 / self.num_classes, device=device)
            label_B = torch.multinomial(uniform, num_samples=B, replacement=True, generator=rng).reshape(B)
        elif isinstance(label_B, int):
            label_B = torch.full((B,), self.num_classes if label_B < 0 else label_B, device=device)
        if ref_pruning is not None:
            ref_pruning.reset()

        num_scales = len(self.patch_nums)
        labels = torch.cat((label_B, torch.full_like(label_B, self.num_classes)), dim=0)
        sos = cond_BD = self.class_emb(labels)
        cond_BD_or_gss = self.shared_ada_lin(cond_BD)
        lvl_pos = self.level_pos_all()
        next_token_map = (
            sos.unsqueeze(1).expand(2 * B, self.first_l, -1)
            + self.pos_start.expand(2 * B, self.first_l, -1)
            + lvl_pos[:, : self.first_l]
        )
        f_hat = sos.new_zeros(B, self.cvae, *self.schedule[-1])
        all_logits: list[torch.Tensor] = []

        self.set_kv_caching(True)
        for si, (ph, pw) in enumerate(self.schedule):
            ratio = si / max(num_scales - 1, 1)
            x = next_token_map
            if ref_pruning is None:
                for blk in self.blocks:
                    x = blk(x, cond_BD_or_gss)
            else:
                x = self.run_blocks_ref_pruning(x, cond_BD_or_gss, si, ref_pruning)
            logits_BlV = self.get_logits(x, cond_BD)
            t = cfg * ratio
            logits_BlV = (1 + t) * logits_BlV[:B] - t * logits_BlV[B:]
            if return_logits:
                all_logits.append(logits_BlV)

            idx_Bl = sample_top_k_top_p(logits_BlV, rng, top_k=top_k, top_p=top_p, num_samples=1)[:, :, 0]
            codebook = self.vae.quantize.embedding
            if not more_smooth:
                h_BlC = codebook(idx_Bl)
            else:
                tau = max(_GUMBEL_T0 * (1 - ratio * _GUMBEL_DECAY), _GUMBEL_T_MIN)
                h_BlC = gumbel_softmax(logits_BlV * (1 + ratio), tau, rng) @ codebook.weight.unsqueeze(0)
            h_BChw = h_BlC.transpose(1, 2).reshape(B, self.cvae, ph, pw)
            f_hat, next_token_map = self.vae.quantize.next_autoregressive_input(
                si, self.schedule, f_hat, h_BChw
            )
            if si != num_scales - 1:
                next_token_map = next_token_map.view(B, self.cvae, -1).transpose(1, 2)
                begin, end = self.begin_ends[si + 1]
                next_token_map = self.word_embed(next_token_map) + lvl_pos[:, begin:end]
                next_token_map = next_token_map.repeat(2, 1, 1)  # CFG: conditional rows, then null class
            else:
                f_hat = self.refine_f_hat(f_hat, x, idx_Bl, t, rng)
        self.set_kv_caching(False)

        images = self.vae.fhat_to_img(f_hat).add(1).mul(0.5)
        if return_logits:
            return images, all_logits
        return images
