"""Hand-written reference pruning path: the test oracle for the compiler's pruning.

The zoo models call these helpers from their block loops when a ``RefPruning`` is passed to
the sampler. They implement the semantics in ``docs/architecture.md`` ("Semantics") directly
in eager PyTorch, without any graph machinery, so that the compiled path can be compared with
them. Never used for speed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

Action = Literal["keep", "skip", "prune_tokens"]
SUBLAYERS = ("self_attn", "cross_attn", "ffn")


@dataclass
class BlockDecision:
    """What happens to one block at one scale.

    ``kept_idx`` maps a sublayer kind (``self_attn``, ``cross_attn``, ``ffn``) to a LongTensor
    ``[rows, k]`` of kept token positions (sorted ascending); sublayers not in the mapping run
    on all tokens. Only meaningful with ``action="prune_tokens"``.
    """

    action: Action = "keep"
    kept_idx: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.action not in ("keep", "skip", "prune_tokens"):
            raise ValueError(f"BlockDecision.action must be keep|skip|prune_tokens, got {self.action!r}")
        for kind, idx in self.kept_idx.items():
            if kind not in SUBLAYERS:
                raise ValueError(f"BlockDecision.kept_idx key {kind!r} is not one of {SUBLAYERS}")
            if idx.dim() != 2 or idx.dtype != torch.long:
                raise ValueError(f"BlockDecision.kept_idx[{kind!r}] must be a [rows, k] int64 tensor")


@dataclass
class RefPruning:
    """Decisions per ``(scale, layer)`` (both 0-based) plus the restore mode.

    ``restore="cached_scale"`` needs ``cached_scale`` (0-based scale index): every branch
    output recorded on all tokens at that scale is area-interpolated to restore pruned tokens.
    """

    decisions: dict[tuple[int, int], BlockDecision] = field(default_factory=dict)
    restore: Literal["identity", "cached_scale"] = "identity"
    cached_scale: int | None = None
    # (layer, sublayer kind) -> branch output [rows, L_c, C] recorded at the cached scale
    _cache: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict, repr=False)
    _cached_hw: tuple[int, int] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.restore not in ("identity", "cached_scale"):
            raise ValueError(f"RefPruning.restore must be identity|cached_scale, got {self.restore!r}")
        if self.restore == "cached_scale" and self.cached_scale is None:
            raise ValueError("RefPruning.restore='cached_scale' needs cached_scale (0-based scale index)")

    def decision(self, scale: int, layer: int) -> BlockDecision:
        return self.decisions.get((scale, layer), BlockDecision("keep"))

    def reset(self) -> None:
        """Forget recorded branch outputs (call at the start of a generation)."""
        self._cache.clear()
        self._cached_hw = None


def gather_tokens(t: torch.Tensor, idx: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Gather rows ``idx [rows, k]`` of ``t`` along its token dimension ``dim``.

    ``t``'s batch dimension (0) may be 1 (broadcast tables such as RoPE) or ``rows``.
    """
    dim = dim % t.dim()
    rows, k = idx.shape
    shape = [1] * t.dim()
    shape[0], shape[dim] = rows, k
    index = idx.view(shape)
    expand = list(t.shape)
    expand[0], expand[dim] = rows, k
    src = t.expand(rows, *t.shape[1:]) if t.shape[0] == 1 and rows != 1 else t
    return torch.gather(src, dim, index.expand(expand))


def run_branch(
    pruning: RefPruning | None,
    scale: int,
    layer: int,
    kind: str,
    hw: tuple[int, int],
    x: torch.Tensor,
    branch,
    positional: tuple[tuple[torch.Tensor, int], ...] = (),
) -> torch.Tensor:
    """Apply one residual sublayer ``x + branch(x, *positional)`` under the reference decisions.

    ``branch(x_tokens, *positional_tensors)`` computes the sublayer output for the given tokens;
    ``positional`` lists the position-dependent tensors with their token dimension; they are
    passed to ``branch`` (gathered when tokens are pruned). Returns the new residual stream.
    """
    pos = tuple(t for t, _ in positional)
    dec = pruning.decision(scale, layer) if pruning is not None else BlockDecision("keep")
    if pruning is not None and pruning.restore == "cached_scale" and scale == pruning.cached_scale:
        delta = branch(x, *pos)
        pruning._cache[(layer, kind)] = delta
        pruning._cached_hw = hw
        return x + delta
    if dec.action == "skip":
        return x
    if dec.action == "keep" or kind not in dec.kept_idx:
        return x + branch(x, *pos)
    idx = dec.kept_idx[kind].to(x.device)
    xk = gather_tokens(x, idx, 1)
    pk = tuple(gather_tokens(t, idx, d) for t, d in positional)
    dk = branch(xk, *pk)
    idx_c = idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])
    if pruning.restore == "identity":
        return x.scatter_add(1, idx_c, dk)
    cached = pruning._cache.get((layer, kind))
    if cached is None or pruning._cached_hw is None:
        raise RuntimeError(
            f"reference pruning: no branch output recorded at cached scale {pruning.cached_scale} "
            f"for layer {layer} {kind}; the cached scale must come before every pruned scale"
        )
    rows, _, c = cached.shape
    hc, wc = pruning._cached_hw
    grid = cached.transpose(1, 2).reshape(rows, c, hc, wc)
    base = F.interpolate(grid, size=hw, mode="area").reshape(rows, c, hw[0] * hw[1]).transpose(1, 2)
    return x + base.scatter(1, idx_c, dk)
