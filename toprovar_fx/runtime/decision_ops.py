"""A scale decision's device work: rho_s and every prunable layer's kept count from the measured
layer's entropy, as one float vector the host reads in one transfer (``runtime/decisions.py``).

Pure functions of their tensor inputs and a hashable ``DecisionSpec``, so the same computation
runs eagerly (the dispatcher, ``Decider._launch_decision``) or inside the CUDA graph of the
measured block itself (a planned ``measure`` block, ``runtime/block_plans.py``), where its dozen
small kernels cost no launch of their own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .entropy_stats import low_entropy_ratio, per_image


@dataclass(frozen=True)
class DecisionSpec:
    """What one scale's decision computes (part of a planned block's signature)."""

    need_rho: bool  # rho_s first (criterion rho, start scale not found yet)
    layers: tuple[int, ...]  # the layers whose kept count follows, in order (empty: no entropy gate)
    shared: bool  # token.cfg shared: one count per image from the CFG halves' mean entropy
    mean_norm: bool  # token.normalization mean (else sum)
    phi: float  # phi(s) of this scale
    alpha_min: float
    alpha_max: float

    @property
    def gated(self) -> bool:
        return bool(self.layers)

    @property
    def computes(self) -> bool:
        """Whether there is device work (a value for the host to read) at all."""
        return self.need_rho or self.gated


def kept_counts(ent: torch.Tensor, scores: torch.Tensor, spec: DecisionSpec) -> torch.Tensor:
    """Per layer of ``spec.layers``, ``sum_i P_keep(i)`` (the largest over the images); ``scores``
    holds those layers' R(l) on ``ent``'s device (paper Eq. 6)."""
    h = per_image(ent) if spec.shared else ent.float()  # [images or rows, L]
    hhat = h / (h.mean(-1, keepdim=True) if spec.mean_norm else h.sum(-1, keepdim=True))
    q = spec.phi * scores.view(-1, *([1] * hhat.dim())) * hhat.unsqueeze(0)
    p_keep = 1 - (spec.alpha_min + (spec.alpha_max - spec.alpha_min) * q).clamp(0, 1)
    return p_keep.sum(-1).reshape(len(spec.layers), -1).amax(-1)


def decision_values(ent: torch.Tensor, scores: torch.Tensor | None, spec: DecisionSpec) -> torch.Tensor:
    """``[rho_s?, rounded kept count per layer...]`` (float32) from the measured entropy ``[rows, L]``.
    Precondition: ``spec.computes``; ``scores`` given when ``spec.gated``."""
    parts = []
    if spec.need_rho:
        parts.append(low_entropy_ratio(ent).view(1))
    if spec.gated:
        parts.append(kept_counts(ent, scores, spec).round())
    return torch.cat(parts).float()
