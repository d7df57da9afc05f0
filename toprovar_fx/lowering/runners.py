"""The callables the backend hands back to Dynamo, one per graph."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class GraphRunner:
    """Runs one compiled graph, then records the entropy outputs it returned.

    ``hoisted`` lists ``(site id, key length follows)`` in the order the entropy outputs follow
    the graph's own ``n_outputs`` outputs. ``dense_variant``: this is the dense stand-in of a
    dispatcher graph (prune mode, scales where the policy cannot act), whose self-attentions
    tick the scale clock themselves instead of through the dispatcher.
    """

    def __init__(self, session: Any, fn: Callable, hoisted: list[tuple[int, bool]], n_outputs: int,
                 sequence: bool, dense_variant: bool = False):
        self.session = session
        self.fn = fn
        self.hoisted = hoisted
        self.n_outputs = n_outputs
        self.sequence = sequence
        self.dense_variant = dense_variant

    def __call__(self, *args: Any) -> Any:
        outs = self.fn(*args)
        if not self.hoisted:
            return outs
        n = self.n_outputs
        record = self.session.record_attention
        i = n
        for sid, with_len in self.hoisted:
            key_len = int(outs[i + 1]) if with_len else None
            record(sid, outs[i], key_len=key_len, dense_variant=self.dense_variant)
            i += 2 if with_len else 1
        return tuple(outs[:n]) if self.sequence else outs[0]


class ScaleSwitchRunner:
    """Prune mode: the dense variant while the policy cannot act yet, else the dispatcher variant.

    The dense variant is the observe-mode rewrite of the same Dynamo graph (Inductor whole,
    CUDA graphs for small inputs); it is bit-for-bit the computation the dispatcher runs when
    it keeps every branch. ``session.dense_ahead()`` is True only when the next call cannot
    belong to a scale at which the policy skips, prunes, caches or reuses anything.
    """

    def __init__(self, session: Any, dense: GraphRunner, pruned: GraphRunner, self_sites: int):
        self.session = session
        self.dense = dense
        self.pruned = pruned
        self.self_sites = self_sites

    def __call__(self, *args: Any) -> Any:
        if self.session.dense_ahead(self.self_sites):
            return self.dense(*args)
        return self.pruned(*args)
