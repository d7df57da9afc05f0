"""The scale clock: which generation, scale and layer is running, learned at run time.

Dynamo hands the backend graphs that may hold part of a block, one block shared by every
layer, or the whole unrolled sampler (docs/architecture.md), so layer and scale cannot be
read from a graph. They are counted instead: every self-attention of the residual stream is
one *tick* carrying the number of query tokens of the current scale. Within a generation the
token count of a VAR sampler only grows, so

* a count smaller than the current one starts a new generation (scale 0, layer 0);
* a different count starts the next scale (layer 0);
* the same count is the next layer of the same scale.

With schedules (from the policy or the options) each tick is also checked against them;
schedules that no longer fit the observed counts are dropped, and when none is left the
clock reports a mismatch instead of guessing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple


class Tick(NamedTuple):
    """Where one self-attention event falls. A named tuple, not a frozen dataclass: one is made
    per block call, and at the launch-bound scales the host time per call is the latency."""

    generation: int
    scale: int
    layer: int
    tokens: int
    new_generation: bool
    new_scale: bool


def guess_hw(tokens: int) -> tuple[int, int]:
    """A token map shape for ``tokens`` when no schedule says: square if possible, else 1 x n."""
    r = math.isqrt(tokens)
    if r * r == tokens:
        return r, r
    for h in range(r, 0, -1):
        if tokens % h == 0:
            return h, tokens // h
    return 1, tokens


class ScaleClock:
    """Counts generations, scales and layers from self-attention query token counts."""

    def __init__(self, schedules: Mapping[str, Sequence[Sequence[int]]] | None = None) -> None:
        self.schedules: dict[str, tuple[tuple[int, int], ...]] = {
            name: tuple((int(h), int(w)) for h, w in sched) for name, sched in (schedules or {}).items()
        }
        self.generation = -1
        self.scale = -1
        self.layer = -1
        self.tokens: int | None = None
        self.depth: int | None = None  # layers per scale, learned at the end of scale 0
        self.candidates: list[str] = list(self.schedules)
        self.mismatch: str | None = None
        self.token_history: list[int] = []

    def tick(self, tokens: int) -> Tick:
        """Advance the clock by one self-attention event of ``tokens`` query tokens."""
        if tokens == self.tokens and self.depth is not None and self.layer + 1 < self.depth:
            # the next layer of the running scale: most ticks, one per block call at the
            # launch-bound scales, so it skips the general path below (the same result)
            self.layer += 1
            return Tick(self.generation, self.scale, self.layer, tokens, False, False)
        new_gen = self.tokens is None or tokens < self.tokens
        new_scale = new_gen or tokens != self.tokens
        if not new_scale and self.depth is not None and self.layer + 1 >= self.depth:
            new_scale = True  # two consecutive scales of equal size: the layer count tells
        if new_gen:
            if self.generation >= 0 and self.scale == 0 and self.depth is None:
                self.depth = self.layer + 1
            self.generation += 1
            self.scale, self.layer = 0, 0
            self.candidates = list(self.schedules)
            self.mismatch = None
            self.token_history = [tokens]
        elif new_scale:
            if self.scale == 0 and self.depth is None:
                self.depth = self.layer + 1
            self.scale += 1
            self.layer = 0
            self.token_history.append(tokens)
        else:
            self.layer += 1
        self.tokens = tokens
        if new_scale and self.schedules:
            self._match_schedules()
        return Tick(self.generation, self.scale, self.layer, tokens, new_gen, new_scale)

    def next_block(self) -> tuple[int, int, bool]:
        """``(scale, layer, same)`` of the block after the current one (``same``: in the running
        scale; else the next scale's first). Precondition: ``depth`` is known."""
        if self.layer + 1 < self.depth:
            return self.scale, self.layer + 1, True
        return self.scale + 1, 0, False

    def expected_self_keys(self, tokens: int) -> int:
        """Keys a self-attention of ``tokens`` queries sees if it is the next tick: every token so far."""
        if self.tokens is None or tokens < self.tokens:
            return tokens
        done = sum(self.token_history)
        return done if tokens == self.tokens else done + tokens

    def _match_schedules(self) -> None:
        s, n = self.scale, self.tokens
        keep = [c for c in self.candidates if s < len(self.schedules[c]) and _area(self.schedules[c][s]) == n]
        if not keep and self.mismatch is None:
            seen = ", ".join(str(t) for t in self.token_history)
            known = "; ".join(
                f"{name}: {[_area(hw) for hw in sched]}" for name, sched in self.schedules.items()
            )
            self.mismatch = (
                f"observed token counts per scale [{seen}] match no schedule of the policy "
                f"({known}); add this resolution's schedule to the policy's 'schedules'"
            )
        self.candidates = keep

    @property
    def schedule(self) -> tuple[tuple[int, int], ...] | None:
        """The schedule the current generation follows, if exactly determined."""
        if self.mismatch is None and self.candidates:
            return self.schedules[self.candidates[0]]
        return None

    def hw(self, scale: int, tokens: int) -> tuple[int, int]:
        sched = self.schedule
        if sched is not None and scale < len(sched) and _area(sched[scale]) == tokens:
            return sched[scale]
        return guess_hw(tokens)

    def num_scales(self) -> int | None:
        sched = self.schedule
        return len(sched) if sched is not None else None


def _area(hw: Sequence[int]) -> int:
    return int(hw[0]) * int(hw[1])
