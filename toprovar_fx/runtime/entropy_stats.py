"""Entropy statistics shared by the report and the decisions (computed on the device)."""

from __future__ import annotations

import torch


def per_image(ent: torch.Tensor) -> torch.Tensor:
    """Entropy ``[rows, L]`` -> ``[images, L]``: the cond and uncond halves of a CFG batch (cond
    rows first, as VAR-family samplers lay it out) averaged per image; odd row counts (no CFG
    doubling) are taken as they are."""
    e = ent.float()
    rows = e.shape[0]
    return (e[: rows // 2] + e[rows // 2:]) / 2 if rows % 2 == 0 else e


def low_entropy_ratio(ent: torch.Tensor) -> torch.Tensor:
    """rho_s: per image, the fraction of tokens with entropy below that image's mean, averaged
    over the images of the batch (a 0-d tensor; no host synchronisation)."""
    h = per_image(ent)
    return (h < h.mean(-1, keepdim=True)).float().mean()
