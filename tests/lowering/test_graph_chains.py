"""Whole-scale capture (``lowering/graph_chains.py``): a recurring chain of replays runs as one graph.

The stand-in graph API of ``test_lowering`` "captures" by recording what to recompute; its
outputs hold NaN until a replay, so a served call that handed out something the chain did not
compute would fail the comparisons with plain torch.
"""

from __future__ import annotations

import torch

from tests.lowering.test_lowering import _FakeGraphAPI, _replayable
from toprovar_fx.lowering import graph_chains
from toprovar_fx.lowering.cuda_graphs import CudaGraphCache, SharedPool

N = 5  # graphs in the chain: more than graph_chains.MIN_CHAIN


def _block(x: torch.Tensor, w: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A block: the next hidden state (lent, read in place by the next block) and a small
    statistic (cloned out, as the hoisted entropies are)."""
    y = torch.tanh(x @ w) + n
    return y, y.sum(-1)


class _Chain:
    """``N`` blocks with their own parameters, each a ``CudaGraphCache`` of one shared, lending pool."""

    def __init__(self, chains: bool = True, pool: SharedPool | None = None, width: int = 4) -> None:
        torch.manual_seed(width)
        self.api = _FakeGraphAPI() if pool is None else pool.api
        self.pool = SharedPool(lending=True, chains=chains) if pool is None else pool
        self.pool.api = self.api
        self.width = width
        self.caches = [CudaGraphCache(_replayable(_block), static=[False, True, False], max_bytes=1 << 20,
                                      api=self.api, device_type="cpu", pool=self.pool, lend=True, own_outputs=1)
                       for _ in range(N)]
        self.ws = [torch.randn(width, width) for _ in range(N)]

    def run(self, x: torch.Tensor, between=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One "generation": the blocks in order; ``between(i, h)`` may replace the hidden state
        before block ``i``. Returns a copy of the last hidden state (the caller lets go of the lent
        one, as a sampler does) and the statistics."""
        stats = []
        for i, (cache, w) in enumerate(zip(self.caches, self.ws)):
            if between is not None:
                x = between(i, x)
            x, s = cache(x, w, i)
            stats.append(s)
        return x.clone(), stats

    def reference(self, x: torch.Tensor, between=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        stats = []
        for i, w in enumerate(self.ws):
            if between is not None:
                x = between(i, x.clone())
            x, s = _block(x, w, i)
            stats.append(s)
        return x, stats

    def check(self, x: torch.Tensor, between=None) -> None:
        got, got_stats = self.run(x, between)
        want, want_stats = self.reference(x, between)
        torch.testing.assert_close(got, want)
        for a, b in zip(got_stats, want_stats):
            torch.testing.assert_close(a, b)

    @property
    def chains(self) -> graph_chains.GraphChains:
        return self.pool.chains

    def replays(self) -> int:
        return sum(c.replays for c in self.caches)


def _warm(chain: _Chain, generations: int = 2) -> None:
    """Capture the graphs and record the chain (first generation), fuse it (second)."""
    for _ in range(generations):
        chain.check(torch.randn(2, chain.width))


def test_a_recurring_chain_runs_as_one_graph_and_hands_out_the_same_values():
    chain = _Chain()
    chain.check(torch.randn(2, 4))  # the generation that captures the graphs records the chain too
    assert len(chain.chains.current) == N and not chain.chains.fused  # closed by the next chain's head
    chain.check(torch.randn(2, 4))
    assert chain.chains.captures == 1 and chain.api.captures == N + 1
    replays, served = chain.replays(), chain.chains.served
    for _ in range(3):
        chain.check(torch.randn(2, 4))
    assert chain.chains.served - served == 3 * (N - 1)  # every call after the head, every generation
    assert chain.replays() - replays == 3 * N  # served calls count as replays
    assert chain.api.captures == N + 1  # nothing captured again


def test_a_copied_input_starts_the_next_chain():
    """Two chains in a row (two scales): the head of the second copies its input in, so it starts
    a chain of its own, in the generation that captures the graphs as in later ones."""
    first = _Chain()
    second = _Chain(pool=first.pool, width=3)
    for _ in range(3):
        first.check(torch.randn(2, 4))
        second.check(torch.randn(2, 3))
    assert first.chains.captures == 2 and first.chains.served == 2 * 2 * (N - 1) and not first.chains.dropped


def test_without_the_option_every_graph_replays_on_its_own():
    chain = _Chain(chains=False)
    _warm(chain, 4)
    assert chain.pool.chains is None and chain.api.captures == N


def test_a_call_the_chain_did_not_record_runs_on_its_own_and_twice_drops_the_chain():
    """A new tensor in the middle (it is copied in), or an in-place write into a handed-out
    output: the call and the rest of the chain replay their own graphs, with the values a
    generation without chains would give."""
    chain = _Chain()
    _warm(chain)

    def new_tensor(i, h):
        return h.clone() if i == 2 else h

    def in_place(i, h):
        return h.mul_(0.5) if i == 3 else h

    served, busy = chain.chains.served, chain.pool.busy
    chain.check(torch.randn(2, 4), new_tensor)
    # block 1 served; block 2 and those after it read another tensor than the one their graphs
    # borrow, so they run without a graph, as they would without chains
    assert chain.chains.served - served == 1 and chain.pool.busy - busy == N - 2
    assert graph_chains.MISS_LIMIT == 2 and chain.chains.fused  # one miss: kept
    chain.check(torch.randn(2, 4), in_place)
    assert not chain.chains.fused and chain.chains.dropped == 1
    served = chain.chains.served
    for _ in range(2):
        chain.check(torch.randn(2, 4))  # dropped for good: not recorded or fused again
    assert chain.chains.captures == 1 and chain.chains.served == served == 0


def test_a_held_output_of_the_chain_keeps_it_from_replaying():
    """A caller holding a lent output of a later block: the chain would overwrite it, so the head
    runs its own graph; the held values never change."""
    chain = _Chain()
    _warm(chain)
    held = {}

    def hold(i, h):
        if i == 3:
            held.setdefault("h", h)  # block 2's lent output (the reference run comes second)
        return h

    chain.check(torch.randn(2, 4), hold)
    kept = held["h"].clone()
    served = chain.chains.served
    chain.check(torch.randn(2, 4))
    torch.testing.assert_close(held["h"], kept)
    assert chain.chains.served == served  # the chain did not run
    del held["h"]
    chain.check(torch.randn(2, 4))
    assert chain.chains.served == served + N - 1  # free again: the chain runs
