"""Whole-scale capture: one CUDA graph replays a chain of graph calls that recurs every generation.

Why: at batch 1 the dense early scales of a VAR sampler stay host-bound even with one CUDA graph
per block. Each block call still pays Dynamo's frame and guards, our runners, the input checks
and one replay launch; on the H200 (Infinity-2B) scales 1-9 took 70.6 ms of wall time for
52.4 ms of GPU work (``benchmarks/results/e2e-2026-11-29-cudagraphs.md``). The block calls of
such a scale are the same graphs with the same inputs every generation: each reads the previous
call's lent output and its layer's K/V cache, and copies nothing in. So the first call of the
chain can replay all of them at once, and the later calls only check that they are the calls
the chain recorded and hand out the outputs. The GPU then gets a whole scale of work at the
first block, and the host's per-block cost overlaps it instead of preceding each block.

What a chain is (``GraphChains``): in a generation with lending on, consecutive replays of the
session's graphs where every call after the first copies nothing into its static buffers (its
per-call inputs are other graphs' lent outputs read in place, or tensors its buffers already
hold). A call that copies, a call that runs without replay, or a capture ends the chain. A chain
recorded in one generation is captured (``FusedChain``) at its first call in a later one:
each recorded graph's function called on its static inputs, in order, writing its lent outputs
where that graph's replay would (its homes, or its own pool's outputs, copied in).

Served calls are checked, not assumed: the ``j``-th call after the first must be the chain's
``j``-th graph, its buffered inputs must be the tensors the buffers hold (same object, same
version), its borrowed inputs at the captured address and unchanged since the chain replayed
(the version counter of the lender's output, which the aliases handed out share). Anything else
ends the serving, and that call and the rest run as before (one replay each): the outputs the
chain computed ahead for them are not handed out. A chain that ends early twice is dropped for
good. Before the replay, every lent output of the chain must be free (``_Captured.watch``), so
writing them early never changes what a caller holds.

Preconditions, as for single graphs (``cuda_graphs``): the functions are pure apart from their
outputs, parameters are not written while a generation runs, and everything between two calls
of a chain that feeds the later one is an input the checks see.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .cuda_graphs import BUSY, SharedPool, _blas_workspace, _Captured, _storage_use_count, _use_count

log = logging.getLogger("toprovar")

# Shorter chains are not fused: a fused graph saves one replay launch and one set of checks per
# call after the first, and costs a capture, its outputs' memory and the checks on every serving.
MIN_CHAIN = 4
# A fused chain that stopped early this many times (a call it did not expect) is dropped.
MISS_LIMIT = 2
MISS = object()  # FusedChain.serve: not this chain's next call


class FusedChain:
    """One CUDA graph running the recorded graphs of a chain in order; see the module docstring.

    ``entries``: the chain's graphs (``_Captured``), first the head. ``outs[j]``: the flat outputs
    of entry ``j`` inside the fused graph (lent positions are the entry's own static outputs).
    """

    def __init__(self, graph: Any, entries: tuple[_Captured, ...], outs: list[list[Any]],
                 borrowed: list[list[tuple[int, int, torch.Tensor]]]):
        self.graph = graph
        self.entries = entries
        self.outs = outs
        # per entry: (argument position, captured address, the lender's static output)
        self.borrowed = borrowed
        self.versions: list[list[int]] = [[] for _ in entries]  # lenders' versions at the last replay
        self.next = 0
        self.misses = 0
        self.served = 0  # calls handed out without a replay of their own

    def free(self) -> bool:
        """Whether no caller holds a lent output of any entry (each may be written by the replay)."""
        return _all_free(self.entries)

    def start(self, args: Sequence[Any]) -> Any:
        """The chain's first call: copy its inputs in, replay the whole chain, hand out the head's
        outputs. ``BUSY`` (from ``cuda_graphs``) when the head's own checks or a held output forbid it."""
        head = self.entries[0]
        if (head.borrowed and head._blocked(args)) or not self.free():
            return BUSY
        for i, buf in head.buffers.items():
            head.copies += buf.refresh(args[i])
        self.graph.replay()
        # after the replay: a stand-in API's replay writes with tensor ops, which count as writes
        self.versions = [[src._version for _, _, src in b] for b in self.borrowed]
        self.next = 1
        return self._hand(0)

    def serve(self, entry: _Captured, args: Sequence[Any]) -> Any:
        """The outputs of call ``self.next`` if ``entry``/``args`` are what the chain recorded, else ``MISS``."""
        j = self.next
        if j >= len(self.entries) or entry is not self.entries[j]:
            return MISS
        for i, buf in entry.buffers.items():
            a = args[i]
            ref = buf._source
            if ref is None or ref() is not a or a.is_inference() or a._version != buf._version:
                return MISS
        for (i, ptr, _), version in zip(self.borrowed[j], self.versions[j]):
            a = args[i]
            if a.data_ptr() != ptr or a._version != version:
                return MISS
        self.next = j + 1
        self.served += 1
        return self._hand(j)

    @property
    def done(self) -> bool:
        return self.next >= len(self.entries)

    def _hand(self, j: int) -> Any:
        entry, outs = self.entries[j], self.outs[j]
        res = [o if h == 0 else o.detach() if h == 1 else f.clone()
               for o, h, f in zip(entry._flat, entry._hand, outs)]
        return res[0] if entry._sequence is None else entry._sequence(res)


class GraphChains:
    """Records chains of replays of one ``SharedPool`` and serves them from fused graphs.

    Called by ``CudaGraphCache`` for every call that has a captured graph while the pool lends
    (``call``) and for every call of the pool's caches that runs without replay (``interrupt``).
    """

    def __init__(self, pool: SharedPool) -> None:
        self.pool = pool
        self.current: list[_Captured] | None = None  # the chain being recorded
        self.recorded: dict[int, tuple[_Captured, ...]] = {}  # id(head) -> chain seen last
        self.fused: dict[int, FusedChain] = {}  # id(head) -> its fused chain
        self.rejected: set[int] = set()  # heads never fused again (capture failed, missed too often)
        self.serving: FusedChain | None = None
        self.captures = 0
        self.dropped = 0

    def reset(self) -> None:
        """The pool's graphs were dropped or replaced: forget every chain (they refer to them)."""
        self.current = None
        self.recorded.clear()
        self.fused.clear()
        self.rejected.clear()
        self.serving = None

    @property
    def served(self) -> int:
        return sum(f.served for f in self.fused.values())

    def summary(self) -> dict[str, Any]:
        """What the chains did so far: the fused chains' lengths, captures, chains dropped, calls served."""
        return {"fused_lengths": sorted((len(f.entries) for f in self.fused.values()), reverse=True),
                "captures": self.captures, "dropped": self.dropped, "served": self.served}

    def interrupt(self) -> None:
        """A call of the pool's caches ran without replay: no chain spans it."""
        self._stop_serving()
        self._close()

    def call(self, entry: _Captured, args: Sequence[Any], api: Any) -> Any:
        """Run one call of ``entry`` (a replay, a served chain call or a fused chain's start)."""
        serving = self.serving
        if serving is not None:
            out = serving.serve(entry, args)
            if out is not MISS:
                if serving.done:
                    self.serving = None
                return out
            self._stop_serving()
        if self.current is not None and self.current[0] is entry:
            self._close()  # the chain being recorded starts again: it is complete
        key = id(entry)
        fused = self.fused.get(key)
        if fused is None and key in self.recorded and self.recorded[key][0] is entry and _all_free(self.recorded[key]):
            fused = self._fuse(self.recorded.pop(key), api)
        if fused is not None:
            out = fused.start(args)
            if out is not BUSY:
                self._close()
                self.serving = fused
                return out
        copies = entry.copies - entry.unseen_copies
        entry.unseen_copies = 0
        out = entry.run(args)
        if out is BUSY:
            self.interrupt()
        elif entry.copies != copies or self.current is None:
            self._close()
            self.current = [entry]
        else:
            self.current.append(entry)
        return out

    def _stop_serving(self) -> None:
        serving, self.serving = self.serving, None
        if serving is None or serving.done:
            return
        serving.misses += 1
        if serving.misses >= MISS_LIMIT:
            head = id(serving.entries[0])
            self.fused.pop(head, None)
            self.rejected.add(head)
            self.dropped += 1
            log.info("toprovar: a fused chain of %d graphs stopped early %d times; its graphs replay one by one",
                     len(serving.entries), serving.misses)

    def _close(self) -> None:
        chain, self.current = self.current, None
        if chain is None or len(chain) < MIN_CHAIN:
            return
        head = id(chain[0])
        if head not in self.fused and head not in self.rejected:
            self.recorded[head] = tuple(chain)

    def _fuse(self, entries: tuple[_Captured, ...], api: Any) -> FusedChain | None:
        """Capture ``entries`` as one graph; None (and never again for this head) if that cannot be done."""
        head = id(entries[0])
        try:
            fused = _capture_chain(entries, self.pool, api)
        except Exception as err:  # noqa: BLE001 - fusing is an optimisation; the graphs replay one by one
            fused = None
            log.warning("toprovar: a chain of %d CUDA graphs cannot be captured as one (%s: %s); they replay "
                        "one by one", len(entries), type(err).__name__, err)
        if fused is None:
            self.rejected.add(head)
            return None
        self.captures += 1
        self.fused[head] = fused
        log.debug("toprovar: fused a chain of %d CUDA graphs", len(entries))
        return fused


def _all_free(entries: Sequence[_Captured]) -> bool:
    return not any(_storage_use_count(e._storages[i]) != base for e in entries for i, base in e.watch.items())


def _chain_inputs(entry: _Captured, pool: SharedPool) -> tuple[list[Any], list[tuple[int, int, torch.Tensor]]] | None:
    """The inputs ``entry`` was captured on, with each borrowed input replaced by its lender's
    static output (the same tensor object, so no reference to its storage is added); None if a
    lender is gone."""
    inputs = list(entry.inputs)
    borrowed = []
    for i, ptr in entry.borrowed.items():
        lender = pool.lent.get(ptr)
        if lender is None:
            return None
        owner, position = lender[1], lender[2]
        inputs[i] = owner._flat[position]
        borrowed.append((i, ptr, owner._flat[position]))
    return inputs, borrowed


def _capture_chain(entries: tuple[_Captured, ...], pool: SharedPool, api: Any) -> FusedChain | None:
    """Capture the chain into the session's shared pool (see ``SharedPool``: replays are
    sequential, and the chain's outputs outside homes are handed out before any other graph of
    the pool replays, since any other replay ends the serving). None when the capture would
    make the chain hold a caller-visible storage (a lent output counted as held for good)."""
    if len({id(e) for e in entries}) != len(entries):
        return None  # a graph twice in one chain: its second call would overwrite the first's outputs
    plans = []
    for e in entries:
        got = _chain_inputs(e, pool)
        if got is None or e.fn is None:
            return None
        plans.append(got)
    lenders = {id(src): src for _, b in plans for _, _, src in b}
    before = {k: _use_count(t) for k, t in lenders.items()}
    counts: list[int] = []

    def run_chain() -> list[Any]:
        flat_all: list[Any] = []
        counts.clear()
        for e, (inputs, _) in zip(entries, plans):
            outs = e.fn(*inputs)
            flat = list(outs) if isinstance(outs, (tuple, list)) else [outs]
            for i in e.watch:  # lent: where its own replay leaves it (a home already is)
                static = e._flat[i]
                if flat[i] is not static:
                    static.copy_(flat[i])
                    flat[i] = static
            counts.append(len(flat))
            flat_all.extend(flat)
        return flat_all

    record: Callable | None = getattr(api, "record_replay", None)  # a stand-in API replaying in Python
    fn = record(run_chain) if record is not None else run_chain
    graph = api.CUDAGraph()
    like = next((t for e in entries for t in e.inputs if isinstance(t, torch.Tensor) and t.is_floating_point()),
                torch.empty(0))
    with _blas_workspace(api, pool, False, like), api.graph(graph, pool=pool.get(api)):
        flat_all = fn()
    outs, start = [], 0
    for n in counts:
        outs.append(flat_all[start:start + n])
        start += n
    del flat_all
    held = not _all_free(entries) or any(_use_count(t) != before[k] for k, t in lenders.items())
    if held:
        log.debug("toprovar: a chain of %d CUDA graphs keeps a lent output referenced; not fused", len(entries))
        return None
    return FusedChain(graph, entries, outs, [b for _, b in plans])
