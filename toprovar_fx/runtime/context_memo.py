"""The hoisted cross-attention context of one graph, computed again only when its inputs change.

Why: ``passes/hoist_context.py`` cuts the text's K/V projection out of a block graph; this runs
it once per block and text instead of once per block call (13 times per generation on a
13-scale sampler). The values live in buffers at fixed addresses: the main graph's CUDA graphs
read them in place, keyed by their address as they are by a parameter's, so a new text is
copied into the same buffers rather than into new ones (which would capture new graphs).

Inputs are the same as last time when every tensor is the same object (held by a weak reference,
so a text that died is never mistaken for a new one at the same ``id``) at the same version (an
in-place write bumps it) and every other input is equal. Inference tensors have no version:
their context is computed on every call. Entries are keyed by the identity of the graph's
parameter inputs: one per block that calls the graph; where the text length is symbolic
(``sized``), also by the other inputs' sizes (tensors) and values (the lengths Dynamo passes as
integers): one per block and text length, each with buffers of its size.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch


class _Entry:
    """One block's context values, the inputs they were computed from, and the function that
    computes them again into the same buffers."""

    __slots__ = ("checks", "fill", "values")

    def __init__(self, values: tuple[torch.Tensor, ...]) -> None:
        self.values = values
        self.fill: Callable[..., None] | None = None
        # per input: (weak reference, version) for a tensor, (None, value) otherwise; None: never fresh
        self.checks: tuple[tuple[Any, Any], ...] | None = None

    def fresh(self, inputs: Sequence[Any]) -> bool:
        checks = self.checks
        if checks is None:
            return False
        for a, (ref, val) in zip(inputs, checks):  # noqa: SIM110 - runs before every block call
            if ref is None:
                if type(a) is not type(val) or a != val:
                    return False
            elif ref() is not a or a._version != val:
                return False
        return True

    def remember(self, inputs: Sequence[Any]) -> None:
        checks = []
        for a in inputs:
            if not isinstance(a, torch.Tensor):
                checks.append((None, a))
                continue
            if a.is_inference():
                self.checks = None
                return
            checks.append((weakref.ref(a), a._version))
        self.checks = tuple(checks)


def _size(a: Any) -> Any:
    """What fixes the context's sizes: a tensor's shape, an integer's value (a symbolic length)."""
    return a.shape if isinstance(a, torch.Tensor) else a


def context_buffer(value: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``value``: the layout the main graph is compiled for, whether ``pre``
    ran eagerly or compiled (which may give other strides)."""
    return torch.empty(value.shape, dtype=value.dtype, device=value.device).copy_(value)


class ContextMemo:
    """``memo(inputs)``: the context values computed by ``pre(*inputs)``, from the last call with the
    same inputs where there was one. ``static[j]`` marks the inputs that are module state (their
    identities key the entry). Graphs whose context is the same computation share one memo."""

    def __init__(self, pre: Callable, static: Sequence[bool],
                 capture: Callable[[Callable[..., None]], Callable[..., None]] | None = None,
                 sized: bool = False) -> None:
        self.pre = pre
        self.n_inputs = len(static)
        self.static = tuple(j for j, s in enumerate(static) if s)
        self.others = tuple(j for j, s in enumerate(static) if not s) if sized else ()
        self.entries: dict[tuple[Any, ...], _Entry] = {}
        self.computes = 0
        # wraps an entry's ``fill`` (e.g. in a ``CudaGraphCache``: one replay instead of the
        # context's launches and copies, which cost ~140 us of host per block on Infinity-2B)
        self.capture = capture

    def __call__(self, inputs: Sequence[Any]) -> tuple[torch.Tensor, ...]:
        key = tuple([id(inputs[j]) for j in self.static])
        if self.others:
            key += tuple([_size(inputs[j]) for j in self.others])
        entry = self.entries.get(key)
        if entry is None or not entry.fresh(inputs):
            entry = self._compute(key, inputs, entry)
        return entry.values

    def _compute(self, key: tuple[Any, ...], inputs: Sequence[Any], entry: _Entry | None) -> _Entry:
        with torch.no_grad():
            if entry is None:
                entry = self.entries[key] = _Entry(tuple(map(context_buffer, self.pre(*inputs))))
                entry.fill = self._filler(entry.values)
            else:
                # the same graph inputs' layouts (the memo is per layout: ``ContextSplit.signature``),
                # so the same value shapes: the same buffers, which captured graphs read in place
                entry.fill(*inputs)
        entry.remember(inputs)
        self.computes += 1
        return entry

    def _filler(self, buffers: tuple[torch.Tensor, ...]) -> Callable[..., None]:
        pre = self.pre

        def fill(*inputs: Any) -> None:
            for buf, value in zip(buffers, pre(*inputs)):
                buf.copy_(value)

        return fill if self.capture is None else self.capture(fill)


class ContextRunner:
    """Calls ``runner`` (the main graph's) with the original arguments followed by the context,
    computed by ``memo`` from arguments ``positions``."""

    def __init__(self, runner: Callable, memo: ContextMemo, positions: Sequence[int]) -> None:
        if len(positions) != memo.n_inputs:
            raise ValueError(f"ContextRunner: {len(positions)} positions for a context of {memo.n_inputs} inputs")
        self.runner = runner
        self.memo = memo
        self.positions = tuple(positions)

    def __call__(self, *args: Any) -> Any:
        return self.runner(*args, *self.memo([args[i] for i in self.positions]))
