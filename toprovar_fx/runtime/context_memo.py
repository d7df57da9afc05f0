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
integers): one per block and text length, each with buffers of its size. With ``pads`` and a
``bucket`` (``passes/bucket_context.py``), the lengths of one bucket share one set of buffers
(a "slot", padded to the bucket): the main graph's CUDA graphs, keyed by those addresses, are
then shared too, and an entry is refilled when another length of its bucket used the slot since.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch


class _Entry:
    """One block's context values, the inputs they were computed from, and the function that
    computes them again into the same buffers."""

    __slots__ = ("checks", "fill", "slot", "values")

    def __init__(self, values: tuple[torch.Tensor, ...], slot: _Slot | None = None) -> None:
        self.values = values
        self.fill: Callable[..., None] | None = None
        self.slot = slot  # the bucket's buffers it shares (``pads``), else None: buffers of its own
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


class _Slot:
    """The padded buffers of one block and bucket, and the entry whose values they hold."""

    __slots__ = ("buffers", "owner")

    def __init__(self, buffers: tuple[torch.Tensor, ...]) -> None:
        self.buffers = buffers
        self.owner: _Entry | None = None


Pads = Sequence["tuple[int, Any] | None"]


def write_padded(buffers: Sequence[torch.Tensor], values: Sequence[torch.Tensor], pads: Pads) -> None:
    """Copy each value into its buffer; where ``pads[j]`` is (dim, fill), into the first
    ``value.shape[dim]`` entries along ``dim``, the rest set to ``fill``."""
    for buf, value, pad in zip(buffers, values, pads):
        if pad is None:
            buf.copy_(value)
            continue
        dim, fill = pad
        n = value.shape[dim]
        buf.narrow(dim, 0, n).copy_(value)
        if buf.shape[dim] > n:
            buf.narrow(dim, n, buf.shape[dim] - n).fill_(fill)


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
                 sized: bool = False, pads: Pads | None = None, bucket: int = 0) -> None:
        self.pre = pre
        self.n_inputs = len(static)
        self.static = tuple(j for j, s in enumerate(static) if s)
        self.others = tuple(j for j, s in enumerate(static) if not s) if sized else ()
        self.entries: dict[tuple[Any, ...], _Entry] = {}
        self.pads = tuple(pads) if pads is not None and bucket > 0 else None
        self.bucket = bucket
        self.slots: dict[tuple[Any, ...], _Slot] = {}  # (parameter identities, padded shapes) -> slot
        self.computes = 0
        # wraps an entry's ``fill`` (e.g. in a ``CudaGraphCache``: one replay instead of the
        # context's launches and copies, which cost ~140 us of host per block on Infinity-2B)
        self.capture = capture

    def __call__(self, inputs: Sequence[Any]) -> tuple[torch.Tensor, ...]:
        key = tuple([id(inputs[j]) for j in self.static])
        if self.others:
            key += tuple([_size(inputs[j]) for j in self.others])
        entry = self.entries.get(key)
        if entry is None or not entry.fresh(inputs) or (entry.slot is not None and entry.slot.owner is not entry):
            entry = self._compute(key, inputs, entry)
        return entry.values

    def _compute(self, key: tuple[Any, ...], inputs: Sequence[Any], entry: _Entry | None) -> _Entry:
        with torch.no_grad():
            if entry is None:
                values = self.pre(*inputs)
                if self.pads is None:
                    entry = _Entry(tuple(map(context_buffer, values)))
                else:
                    slot = self._slot(key[:len(self.static)], values)
                    write_padded(slot.buffers, values, self.pads)
                    entry = _Entry(slot.buffers, slot)
                self.entries[key] = entry
                entry.fill = self._filler(entry.values)
            else:
                # the same graph inputs' layouts (the memo is per layout: ``ContextSplit.signature``),
                # so the same value shapes: the same buffers, which captured graphs read in place
                entry.fill(*inputs)
        if entry.slot is not None:
            entry.slot.owner = entry
        entry.remember(inputs)
        self.computes += 1
        return entry

    def _slot(self, params: tuple[Any, ...], values: Sequence[torch.Tensor]) -> _Slot:
        """The slot of the block whose parameters are ``params`` for ``values``' bucket."""
        shapes = []
        for value, pad in zip(values, self.pads):
            shape = list(value.shape)
            if pad is not None:
                shape[pad[0]] = -(-shape[pad[0]] // self.bucket) * self.bucket
            shapes.append(tuple(shape))
        key = (params, tuple(shapes))
        slot = self.slots.get(key)
        if slot is None:
            slot = self.slots[key] = _Slot(tuple(torch.empty(shape, dtype=v.dtype, device=v.device)
                                                 for shape, v in zip(shapes, values)))
        return slot

    def _filler(self, buffers: tuple[torch.Tensor, ...]) -> Callable[..., None]:
        pre, pads = self.pre, self.pads or (None,) * len(buffers)

        def fill(*inputs: Any) -> None:
            write_padded(buffers, pre(*inputs), pads)

        return fill if self.capture is None else self.capture(fill)


class ContextRunner:
    """Calls ``runner`` (the main graph's) with the original arguments followed by the context,
    computed by ``memo`` from arguments ``positions``."""

    def __init__(self, runner: Callable, memo: ContextMemo, positions: Sequence[int],
                 keep: Sequence[int] | None = None) -> None:
        if len(positions) != memo.n_inputs:
            raise ValueError(f"ContextRunner: {len(positions)} positions for a context of {memo.n_inputs} inputs")
        self.runner = runner
        self.memo = memo
        self.positions = tuple(positions)
        self.keep = None if keep is None else tuple(keep)  # the arguments the main graph reads; None: all

    def __call__(self, *args: Any) -> Any:
        context = self.memo([args[i] for i in self.positions])
        if self.keep is not None:
            return self.runner(*[args[i] for i in self.keep], *context)
        return self.runner(*args, *context)
