"""Token gather and restore used by the dispatcher (one gather per input, one scatter out), and
the kept tokens a planned block hands from one pruned branch to the next (one write-back per block).
On the GPU the hidden state's gathers and write-backs run ``kernels/token_rows.py`` (the same values
as the ATen ops they replace, in a fraction of the time); everything else runs the ATen ops."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels.token_rows import gather_rows, rows_eligible, scatter_eligible, scatter_rows
from .entropy_stats import per_image


def gather_tokens(t: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    """Rows ``idx [rows, k]`` of ``t`` along token dimension ``dim``; batch dim may broadcast (1)."""
    dim = dim % t.dim()
    if rows_eligible(t, idx, dim):  # the hidden state on the GPU: one program per kept token
        return gather_rows(t, idx)
    rows, k = idx.shape
    view = [1] * t.dim()
    view[0], view[dim] = rows, k
    size = list(t.shape)
    size[0], size[dim] = rows, k
    if t.shape[0] != rows:
        t = t.expand(rows, *t.shape[1:])
    return torch.gather(t, dim, idx.view(view).expand(size))


def frequency_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """FastVAR's selection: per row, the ``k`` tokens farthest from the mean token, sorted ``[rows, k]``."""
    dist = (x - x.mean(1, keepdim=True)).pow(2).sum(-1)
    return dist.topk(k, dim=1).indices.sort(dim=1).values


def entropy_indices(ent: torch.Tensor, k: int, rows: int, shared: bool) -> torch.Tensor:
    """ToProVAR's selection: per row, the ``k`` lowest-entropy tokens of ``ent [rows', N]``, sorted
    ``[rows, k]``; ``shared``: one set per image (``per_image``), repeated over its CFG rows."""
    if shared:
        idx = per_image(ent).topk(k, dim=-1, largest=False).indices  # [images, k]
        idx = idx.repeat(rows // idx.shape[0], 1) if rows % idx.shape[0] == 0 else idx[:1].expand(rows, k)
    else:
        idx = ent.float()[:rows].topk(k, dim=1, largest=False).indices
    return idx.sort(dim=1).values


def restore_identity(x: torch.Tensor, idx: torch.Tensor, delta_kept: torch.Tensor) -> torch.Tensor:
    """Pruned tokens pass unchanged: ``x`` with ``delta_kept`` added at the kept positions."""
    if scatter_eligible(x, idx, delta_kept):
        return scatter_rows(x, idx, delta_kept, add=True)
    return x.scatter_add(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]), delta_kept)


@dataclass(frozen=True, slots=True)
class KeptTokens:
    """The hidden state of a planned block between two pruned branches with the same kept set:
    ``base`` where nothing ran yet, ``kept`` the kept tokens ``[rows, k, C]`` with every branch so
    far added. Saves a scatter (and its copy of ``base``) and a gather per hand-on. Not a tuple, so
    that no code taking it for the outputs of a call would unpack it."""

    base: torch.Tensor
    kept: torch.Tensor


def restore_kept(base: torch.Tensor, idx: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``base`` with rows ``kept`` written at the kept positions: the chain of ``restore_identity``
    calls it replaces gives the same values (each adds a branch output at the same positions)."""
    if scatter_eligible(base, idx, kept):
        return scatter_rows(base, idx, kept, add=False)
    return base.scatter(1, idx.unsqueeze(-1).expand(-1, -1, base.shape[-1]), kept)


def restore_cached(x: torch.Tensor, idx: torch.Tensor, delta_kept: torch.Tensor, cached: torch.Tensor,
                   cached_hw: tuple[int, int], hw: tuple[int, int], mode: str) -> torch.Tensor:
    """Pruned tokens take the branch output recorded at an earlier scale, interpolated (FastVAR)."""
    rows, _, c = cached.shape
    grid = cached.transpose(1, 2).reshape(rows, c, *cached_hw)
    kw = {} if mode in ("area", "nearest") else {"align_corners": False}
    base = F.interpolate(grid, size=hw, mode=mode, **kw).reshape(rows, c, hw[0] * hw[1]).transpose(1, 2)
    return x + base.scatter(1, idx.unsqueeze(-1).expand(-1, -1, c), delta_kept)
