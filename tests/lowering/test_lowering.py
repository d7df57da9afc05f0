"""Lowering: Inductor-compiled branches, the dense/dispatcher switch, CUDA-graph guards."""

from __future__ import annotations

import contextlib
import warnings
import weakref
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.fx as fx

import toprovar_fx
from tests.backend.helpers import generate_twice, max_rel_diff, model, sampler_call
from toprovar_fx.lowering import cuda_graphs, runners
from toprovar_fx.lowering.cuda_graphs import CudaGraphCache, mutates_inputs
from toprovar_fx.policies import load_policy
from toprovar_fx.runtime.session import Session, last_session


def _graph(fn) -> fx.Graph:
    return fx.symbolic_trace(fn).graph


def test_mutates_inputs_sees_writes_into_inputs_and_their_views():
    assert mutates_inputs(_graph(lambda x: x.add_(1)))
    assert mutates_inputs(_graph(lambda x: x.view(-1).mul_(2)))
    assert mutates_inputs(_graph(lambda x, y: x.transpose(0, 1).copy_(y)))
    assert not mutates_inputs(_graph(lambda x: (x + 1).add_(1)))
    assert not mutates_inputs(_graph(lambda x: torch.cat((x, x)) * 2))


def test_cuda_graph_cache_runs_cpu_calls_directly():
    calls = []

    def fn(a, b):
        calls.append(1)
        return a + b

    cache = CudaGraphCache(fn, static=[False, True], max_bytes=1 << 20)
    out = cache(torch.ones(2), torch.ones(2))
    assert torch.equal(out, torch.full((2,), 2.0)) and calls == [1]
    assert list(cache.graphs.values()) == [None] and cache.replays == 0 and cache.disabled is None


def test_cuda_graph_key_tells_blocks_and_shapes_apart():
    cache = CudaGraphCache(lambda *a: None, static=[True, False, False], max_bytes=1 << 20)
    w1, w2, x = torch.ones(3), torch.ones(3), torch.ones(2, 4)
    assert cache._key((w1, x, 5)) == cache._key((w1, x.clone(), 5))  # same block, same shapes
    assert cache._key((w1, x, 5)) != cache._key((w2, x, 5))  # another block's parameters
    assert cache._key((w1, x, 5)) != cache._key((w1, torch.ones(3, 4), 5))  # another scale
    assert cache._key((w1, x, 5)) != cache._key((w1, x.t(), 5))  # other strides
    assert cache._key((w1, x, 5)) != cache._key((w1, x, 6))  # another token count


def test_guarded_tensor_inputs_leave_the_key_and_dynamo_fixes_their_layout():
    """``guarded`` inputs (a Dynamo graph's tensors) are keyed by the plain arguments only. The
    premise, checked on the installed torch: calls that reach one Dynamo graph with the same
    integer arguments have tensor inputs of the same sizes and strides (another stride recompiles,
    symbolic sizes and strides are integer arguments)."""
    cache = CudaGraphCache(lambda *a: None, static=[True, False, False], max_bytes=1 << 20,
                           guarded=[True, True, False])
    w, x = torch.ones(3), torch.ones(2, 4)
    assert cache._key((w, x, 5)) == cache._key((w, torch.ones(4, 4).t(), 5))
    assert cache._key((w, x, 5)) != cache._key((w, x, 6)) and cache._key((w, x, 5)) != cache._key((x, x, 5))
    with pytest.raises(ValueError, match="guarded"):
        CudaGraphCache(lambda *a: None, static=[True, False], max_bytes=1, guarded=[True])

    layouts: dict[tuple[int, tuple[int, ...]], set[tuple[Any, ...]]] = {}  # (graph, ints) -> layouts seen
    _graphs: list[Any] = []

    def backend(gm, example_inputs):
        graph = len(_graphs)
        _graphs.append(gm)

        def run(*args):
            ints = tuple(a for a in args if not isinstance(a, torch.Tensor))
            layouts.setdefault((graph, ints), set()).add(
                tuple((tuple(a.shape), a.stride()) for a in args if isinstance(a, torch.Tensor)))
            return gm.forward(*args)

        return run

    base = torch.randn(8, 24)
    inputs = [torch.ones(4, 6), torch.ones(5, 6), torch.ones(6, 5).t(), base[:5, ::2], base[1:6, :12],
              base[:, :6], torch.ones(7, 6), base.t()[:6, :5].t(), torch.ones(1, 6)]
    for dynamic in (None, True):
        torch._dynamo.reset()
        f = torch.compile(lambda t, b: t * 2 + b.sum(), backend=backend, dynamic=dynamic)
        for t in inputs:
            assert torch.allclose(f(t, torch.ones(3)), t * 2 + 3)
    assert len(_graphs) > 2 and all(len(seen) == 1 for seen in layouts.values()), layouts


def test_dense_variant_runs_until_the_policy_can_act(monkeypatch):
    """Scales before the policy's first active scale run the dense variant, later ones partly the dispatcher."""
    used: list[tuple[str, int]] = []
    orig = runners.ScaleSwitchRunner.__call__

    def spy(self, *args):
        dense = self.session.dense_ahead(self.self_sites, self.mixed)
        out = orig(self, *args)
        used.append(("dense" if dense else "pruned", self.session.clock.scale))
        return out

    monkeypatch.setattr(runners.ScaleSwitchRunner, "__call__", spy)
    m = model("var-tiny")
    call = sampler_call("var-tiny", 1)
    fast = torch.compile(m.autoregressive_infer_cfg, backend="toprovar", options={"policy": "var-tiny"})
    call(fast)
    used.clear()
    call(fast)
    first = last_session().decider.first_active_scale()
    assert 1 < first < 10
    assert all(how == "dense" for how, s in used if s <= first - 2)
    assert ("dense", first - 1) in used  # the scale before the first active one opens dense
    # from the first active scale on, the dispatcher decides (the measured layer's successor)
    assert any(how == "pruned" for how, s in used if s >= first)
    assert toprovar_fx.last_generation().start_scale is not None


def test_inductor_branches_match_the_fx_path_and_take_the_inductor_options(monkeypatch):
    from torch._inductor import compile_fx as compile_fx_module

    real, depth, patches = compile_fx_module.compile_fx, [0], []

    def spy(*args: Any, **kwargs: Any) -> Any:
        if depth[0] == 0:  # compile_fx calls itself once to apply its patches
            patches.append(dict(kwargs.get("config_patches") or {}))
        depth[0] += 1
        try:
            return real(*args, **kwargs)
        finally:
            depth[0] -= 1

    monkeypatch.setattr(compile_fx_module, "compile_fx", spy)
    m = model("var-tiny")
    call = sampler_call("var-tiny", 1)
    outs = {}
    for inductor in (False, True):
        torch._dynamo.reset()
        options = {"policy": "var-tiny", "inductor": inductor, "inductor_options": {"coordinate_descent_tuning": True}}
        fast = torch.compile(m.autoregressive_infer_cfg, backend="toprovar", options=options)
        call(fast)
        _, outs[inductor] = call(fast)
        compiled = list(last_session().compiled_branches.values())
        assert bool(compiled) == inductor
        assert all(c.compiled is not None for c in compiled)  # compiled at the first call, then reused
        assert bool(patches) == inductor
    assert max_rel_diff(outs[True], outs[False]) <= 1e-5
    # every graph and branch Inductor compiled got the option (dense graphs, the dispatcher's branches)
    assert len(patches) > len(compiled)
    assert all(p.get("coordinate_descent_tuning") is True for p in patches)


@pytest.mark.parametrize("name,preset", [("var-tiny", None), ("var-tiny", "fast"), ("infinity-tiny", None)])
def test_switching_to_the_dense_variant_changes_nothing(monkeypatch, name, preset):
    """Same logits, decisions and FLOP ratio with and without the dense variant."""
    m = model(name)
    call = sampler_call(name, 1)
    results = {}
    for switch in (True, False):
        torch._dynamo.reset()
        if not switch:
            monkeypatch.setattr(Session, "dense_ahead", lambda self, *args: False)
        opts = {"policy": name} | ({"preset": preset} if preset else {})
        fast = torch.compile(m.autoregressive_infer_cfg, backend="toprovar", options=opts)
        call(fast)
        _, logits = call(fast)
        rep = toprovar_fx.last_generation()
        results[switch] = (logits, rep.start_scale, rep.flop_ratio,
                           [[lay.action for lay in sc.layers] for sc in rep.scales])
    (a, *rest_a), (b, *rest_b) = results[True], results[False]
    assert rest_a == rest_b
    assert rest_a[0] is not None and rest_a[1] < 1.0  # the policy did prune
    assert max_rel_diff(a, b) <= 1e-5


class _FakeGraphAPI:
    """A stand-in for ``torch.cuda``'s graph API: "capture" records what to recompute, replay redoes it.

    Like a real capture, the function's outputs are left holding stale values after capture
    (they are filled with NaN), so a test passes only if ``CudaGraphCache`` replays before it
    reads them, copies new inputs into the graph's buffers, and clones the outputs out.
    """

    class CUDAGraph:
        def __init__(self) -> None:
            self.work = None
            # the outputs the capture allocated in its pool (kept by the pool's list, which outlives
            # the graph, as such memory does while a caller holds it)
            self.record = SimpleNamespace(outs=())
            self.pool_members: list | None = None  # the records of the graphs captured into the pool, in order

        def replay(self) -> None:
            # As on a GPU at worst: memory a capture freed (its intermediates) may back the outputs
            # of any graph captured after it into the same pool, and a replay writes it again.
            if self.pool_members is not None:
                mine = next(i for i, r in enumerate(self.pool_members) if r is self.record)
                for later in self.pool_members[mine + 1:]:
                    for o in later.outs:
                        o.fill_(float("nan"))
            self.work()

    class Stream:
        def wait_stream(self, other) -> None:
            pass

    capturing: list = []

    def __init__(self, fail: bool = False, empty: bool = False) -> None:
        self.live: dict = {}  # pool handle -> graphs captured into it and not destroyed yet
        self.fail = fail
        self.empty = empty  # captures "record no kernels", as torch.cuda warns then
        self.captures = 0
        self.pools: list = []  # the pool argument of every capture
        self.handles = 0
        self.reserved = 0  # bytes "reserved" by captures: ``private_cost`` per capture into a pool of its own
        self.private_cost = 0
        self.members: dict = {}  # pool handle -> the graphs captured into it, in order

    def memory_reserved(self) -> int:
        return self.reserved

    def _destroyed(self, pool) -> None:
        self.live[pool] -= 1

    def graph_pool_handle(self):
        self.handles += 1
        return ("pool", self.handles)

    def current_stream(self):
        return self.Stream()

    def stream(self, s):
        return contextlib.nullcontext()

    def is_current_stream_capturing(self) -> bool:
        return False

    @staticmethod
    def record_replay(fn):
        """What ``CudaGraphCache`` captures (the function and the copies into its lent outputs'
        homes), replayed by rerunning it."""
        return _replayable(fn)

    @contextlib.contextmanager
    def graph(self, g, pool=None):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        if pool is not None and self.live.get(pool, 1) == 0:
            # PyTorch's allocator marks a pool freeable once every graph captured into it is destroyed
            raise RuntimeError("INTERNAL ASSERT FAILED: it->second->use_count > 0")
        if pool is not None:
            self.live[pool] = self.live.get(pool, 0) + 1
            weakref.finalize(g, self._destroyed, pool)
        self.captures += 1
        self.pools.append(pool)
        if pool is None:
            self.reserved += self.private_cost
        else:
            g.pool_members = self.members.setdefault(pool, [])
            g.pool_members.append(g.record)
        _FakeGraphAPI.capturing[:] = [g]
        try:
            yield
        finally:
            _FakeGraphAPI.capturing[:] = []
        if self.empty:
            g.work = lambda: None
            warnings.warn("The CUDA Graph is empty. This usually means that the graph was attempted to be captured "
                          "on wrong device or stream.", UserWarning, stacklevel=2)


def _recorded(x, w, n):
    """x @ w + n and a column sum, "recorded" into the graph being captured."""
    out, col = x @ w + n, x.sum(0)
    if _FakeGraphAPI.capturing:
        g = _FakeGraphAPI.capturing[0]

        def work(out=out, col=col):
            out.copy_(x @ w + n)
            col.copy_(x.sum(0))

        g.work = work
        out.fill_(float("nan"))
        col.fill_(float("nan"))
    return out, col


def test_cuda_graph_cache_copies_in_replays_and_clones_out():
    api = _FakeGraphAPI()
    cache = CudaGraphCache(_recorded, static=[False, True, False], max_bytes=1 << 20, api=api, device_type="cpu")
    w1, w2 = torch.randn(4, 3), torch.randn(4, 3)
    x1, x2 = torch.randn(2, 4), torch.randn(2, 4)
    first = cache(x1, w1, 1)
    second = cache(x2, w1, 1)  # same shapes and parameters: a replay with the new input copied in
    assert api.captures == 1 and cache.replays == 2
    for (out, col), x in ((first, x1), (second, x2)):
        torch.testing.assert_close(out, x @ w1 + 1)
        torch.testing.assert_close(col, x.sum(0))
    assert first[0].data_ptr() != second[0].data_ptr()  # clones: a later replay leaves earlier results alone
    x2_was = x2.clone()
    x2.add_(100.0)  # the graph read its own copy, not the caller's tensor
    torch.testing.assert_close(second[0], x2_was @ w1 + 1)
    torch.testing.assert_close(cache(x1, w2, 1)[0], x1 @ w2 + 1)  # another block's parameters: own graph
    torch.testing.assert_close(cache(x1, w1, 2)[0], x1 @ w1 + 2)  # another plain value: own graph
    assert api.captures == 3
    big = torch.randn(600, 4)  # over max_bytes: runs directly, never captured
    small_cache = CudaGraphCache(_recorded, static=[False, True, False], max_bytes=1024, api=api, device_type="cpu")
    torch.testing.assert_close(small_cache(big, w1, 0)[0], big @ w1)
    assert api.captures == 3 and small_cache.replays == 0


def test_graphs_share_one_pool_per_session_unless_private():
    from toprovar_fx.lowering.cuda_graphs import SharedPool
    from toprovar_fx.runtime.session import Session
    from toprovar_fx.settings import parse_options

    api = _FakeGraphAPI()
    pool = SharedPool()
    shared = [CudaGraphCache(_recorded, static=[False, True, False], max_bytes=1 << 20, api=api, device_type="cpu",
                             pool=pool) for _ in range(2)]
    private = CudaGraphCache(_recorded, static=[False, True, False], max_bytes=1 << 20, api=api, device_type="cpu")
    x, w = torch.randn(2, 4), torch.randn(4, 3)
    for cache in (*shared, private):
        torch.testing.assert_close(cache(x, w, 0)[0], x @ w)
    assert api.pools == [("pool", 1), ("pool", 1), None] and api.handles == 1
    key = next(iter(shared[0].graphs))
    a, b = shared[0].graphs[key], shared[1].graphs[key]
    assert a.inputs[0] is b.inputs[0]  # one static input buffer for both graphs
    assert private.graphs[key].inputs[0] is not a.inputs[0]
    w2 = torch.randn(4, 3)
    for _ in range(3):  # interleaved calls through the shared buffer stay separate
        x1, x2 = torch.randn(2, 4), torch.randn(2, 4)
        o1, o2 = shared[0](x1, w, 0)[0], shared[1](x2, w2, 0)[0]
        torch.testing.assert_close(o1, x1 @ w)
        torch.testing.assert_close(o2, x2 @ w2)
    assert Session(parse_options({"mode": "observe", "cuda_graph_pool": "private"}), None).graph_pool() is None
    sess = Session(parse_options({"mode": "observe"}), None)
    assert sess.graph_pool() is sess.graph_pool() is not None


def test_an_input_is_copied_again_only_when_it_may_have_changed():
    """The same tensor at the same version is not copied twice into a buffer; an in-place
    change, a new tensor, another graph's input through the shared buffer, or an
    inference-mode tensor (no version counter) are."""
    from toprovar_fx.lowering.cuda_graphs import SharedPool

    api = _FakeGraphAPI()
    pool = SharedPool()
    a, b = (CudaGraphCache(_recorded, static=[False, True, False], max_bytes=1 << 20, api=api, device_type="cpu",
                           pool=pool) for _ in range(2))
    w1, w2 = torch.randn(4, 3), torch.randn(4, 3)
    x, y = torch.randn(2, 4), torch.randn(2, 4)

    def copies() -> int:
        return sum(g.copies for c in (a, b) for g in c.graphs.values() if g is not None)

    torch.testing.assert_close(a(x, w1, 0)[0], x @ w1)  # capture: one copy
    torch.testing.assert_close(a(x, w1, 0)[0], x @ w1)
    torch.testing.assert_close(b(x, w2, 0)[0], x @ w2)  # b's own capture copies x once
    torch.testing.assert_close(b(x, w2, 0)[0], x @ w2)
    base = copies()
    x.mul_(2.0)  # in place: the version moves, so the next call copies again
    torch.testing.assert_close(a(x, w1, 0)[0], x @ w1)
    assert copies() == base + 1
    torch.testing.assert_close(b(x, w2, 0)[0], x @ w2)  # the shared buffer already holds it
    assert copies() == base + 1
    torch.testing.assert_close(b(y, w2, 0)[0], y @ w2)  # another tensor through the shared buffer
    torch.testing.assert_close(a(x, w1, 0)[0], x @ w1)  # so x must be copied back in
    assert copies() == base + 3
    same_values = x.clone()
    torch.testing.assert_close(a(same_values, w1, 0)[0], x @ w1)
    assert copies() == base + 4
    with torch.inference_mode():
        z = torch.randn(2, 4)
    for _ in range(2):
        torch.testing.assert_close(a(z, w1, 0)[0], z @ w1)
    assert copies() == base + 6


def test_lent_outputs_are_read_in_place_and_never_overwritten_while_held(monkeypatch):
    """cuda_graph_lend_outputs: a graph's output goes out as an alias, the next graph reads it in
    place (no copy); while a caller holds an output (or a view of it), its graph runs without
    replay, so the held values never change."""
    from toprovar_fx.lowering.cuda_graphs import SharedPool

    api = _FakeGraphAPI()
    pool = SharedPool(lending=True)
    first, second = (CudaGraphCache(_recorded, static=[False, True, False], max_bytes=1 << 20, api=api,
                                    device_type="cpu", pool=pool, lend=True) for _ in range(2))
    w1, w2 = torch.randn(4, 4), torch.randn(4, 4)

    def chain(x):
        h, _ = first(x, w1, 0)
        out, _ = second(h, w2, 1)
        return h, out

    x = torch.randn(2, 4)
    chain(x)  # captures both graphs; the second is captured on the first's output
    (g1,), (g2,) = first.graphs.values(), second.graphs.values()
    assert g2.borrowed and not g2.buffers.get(0)  # position 0 is read in place
    for _ in range(3):
        x = torch.randn(2, 4)
        h, out = chain(x)
        torch.testing.assert_close(h, x @ w1)
        torch.testing.assert_close(out, (x @ w1) @ w2 + 1)
        del h, out
    assert g2.copies == 0 and g1.busy == g2.busy == 0
    replays = first.replays
    held, _ = first(x, w1, 0)
    view = held[:1]
    del held
    y = torch.randn(2, 4)
    torch.testing.assert_close(first(y, w1, 0)[0], y @ w1)  # runs without the graph: view still held
    torch.testing.assert_close(view, (x @ w1)[:1])
    assert first.replays == replays + 1 and g1.busy == 1
    h = first(y, w1, 0)[0]  # the busy call's output is an ordinary tensor, not the lender's memory
    torch.testing.assert_close(second(h + 0, w2, 1)[0], (y @ w1) @ w2 + 1)  # elsewhere: runs without
    assert g2.busy == 1


def test_lending_starts_by_capturing_again_and_lends_every_output():
    """Graphs captured before lending started clone their outputs; ``start_lending`` drops them so
    they are captured again, lending every tensor output (the entropies after the caller's own too)."""
    from toprovar_fx.lowering.cuda_graphs import SharedPool

    api = _FakeGraphAPI()
    pool = SharedPool()
    cache = CudaGraphCache(_recorded, static=[False, True, False], max_bytes=1 << 20, api=api, device_type="cpu",
                           pool=pool, lend=True)
    w = torch.randn(4, 4)
    x = torch.randn(8, 4)
    out, col = cache(x, w, 0)
    (before,) = cache.graphs.values()
    assert not before.watch and api.captures == 1  # not lending yet: clones
    assert pool.start_lending() == 1 and pool.start_lending() == 0 and not cache.graphs
    out, col = cache(x, w, 0)
    (after,) = cache.graphs.values()
    assert api.captures == 2 and set(after.watch) == {0, 1}
    assert out.data_ptr() == after.outputs[0].data_ptr() and col.data_ptr() == after.outputs[1].data_ptr()
    torch.testing.assert_close(out, x @ w)
    torch.testing.assert_close(col, x.sum(0))
    held = col  # as the generation's state holds an entropy: the graph runs without replay meanwhile
    del out, col
    x2 = torch.randn(8, 4)
    out2, col2 = cache(x2, w, 0)
    assert after.busy == 1 and col2.data_ptr() != held.data_ptr()
    torch.testing.assert_close(held, x.sum(0))
    torch.testing.assert_close(col2, x2.sum(0))
    del held, out2, col2
    out, col = cache(x2, w, 0)  # nothing held: replayed again
    assert after.busy == 1 and col.data_ptr() == after.outputs[1].data_ptr()
    assert CudaGraphCache._lendable((out, 3, col)) == {0, 2}
    del out, col
    # a view into a larger buffer (K of a fused QKV) is handed out from its home, allocated outside
    # the capture (the memory pool) and laid out as a clone: it reaches the caller with the strides
    # it had before lending started, so Dynamo does not recompile for it
    def k_of_qkv(x, w, n):
        return (torch.cat([x @ w, x], 1) + n)[:, :4], x.sum(0)

    split = CudaGraphCache(_replayable(k_of_qkv), static=[False, True, False], max_bytes=1 << 20, api=api,
                           device_type="cpu", pool=pool, lend=True)
    for _ in range(2):
        x = torch.randn(2, 4)
        k, sums = split(x, w, 1)
        torch.testing.assert_close(k, x @ w + 1)
        (entry,) = split.graphs.values()
        assert k.stride() == (4, 1) and k.data_ptr() == entry.outputs[0].data_ptr()
        del k, sums
    assert set(entry.watch) == {0, 1} and split.replays == 2
    # the sums are lent in place, from the pool of the graphs with these input layouts
    assert entry.pooled == frozenset({1}) and len(pool.groups) == 2  # a group per input layout
    assert any(entry in g.members for g in pool.groups.values()) and api.pools[-1] != pool.get(api)


def test_lending_drops_the_graphs_of_every_cache_of_the_pool_so_the_old_pool_is_freed():
    """A cache that never lends (the hoisted context's refill) shares the session's pool too: its
    graph must go with the others when lending starts, or it keeps the old pool, and with it every
    intermediate captured there, for the session (Infinity-8B: 54.5 against 31.8 GiB of pools)."""
    import gc

    from toprovar_fx.lowering.cuda_graphs import SharedPool

    api = _FakeGraphAPI()
    pool = SharedPool()
    lending = CudaGraphCache(_recorded, static=[False, True, False], max_bytes=1 << 20, api=api, device_type="cpu",
                             pool=pool, lend=True)
    refill = CudaGraphCache(_recorded, static=[False, True, False], max_bytes=1 << 20, api=api, device_type="cpu",
                            pool=pool)
    w, x = torch.randn(4, 4), torch.randn(8, 4)
    lending(x, w, 0)
    refill(x, w, 1)
    old = pool.get(api)
    assert api.live[old] == 2
    assert pool.start_lending() == 2 and not lending.graphs and not refill.graphs
    gc.collect()
    assert api.live[old] == 0  # every graph of the old pool destroyed: it is freed
    out, _ = refill(x, w, 1)  # captured again, into the new pool
    assert api.captures == 3 and api.pools[-1] == pool.get(api) != old
    torch.testing.assert_close(out, x @ w + 1)


def test_no_graph_is_captured_while_the_device_is_short_of_free_memory(caplog):
    """Below ``min_free`` (free plus what the allocator caches unused) a new shape runs without a
    graph, is not remembered as uncapturable, and is captured once memory is free again; one warning."""
    from toprovar_fx.lowering.cuda_graphs import SharedPool

    class Tight(_FakeGraphAPI):
        free = 1 << 20

        def mem_get_info(self):
            return self.free, 64 << 30

        def memory_reserved(self):
            return 3 << 20

        def memory_allocated(self):
            return 2 << 20

    api = Tight()
    pool = SharedPool(min_free=4 << 20)  # 1 MiB free + 1 MiB cached: short
    cache = CudaGraphCache(_recorded, static=[False, True, False], max_bytes=1 << 20, api=api, device_type="cpu",
                           pool=pool)
    w, x = torch.randn(4, 4), torch.randn(8, 4)
    with caplog.at_level("WARNING", logger="toprovar"):
        for _ in range(2):
            out, _ = cache(x, w, 0)
            torch.testing.assert_close(out, x @ w)
    assert api.captures == 0 and not cache.graphs and pool.refused == 2
    assert sum("cuda_graph_min_free_mib" in r.getMessage() for r in caplog.records) == 1
    api.free = 8 << 20
    out, _ = cache(x, w, 0)
    assert api.captures == 1 and cache.replays == 1
    torch.testing.assert_close(out, x @ w)
    default = SharedPool()  # the default: 1/32 of the device, resolved at the first check
    assert default.min_free is None and not default.room(api) and default.min_free == (64 << 30) // 32
    assert SharedPool(min_free=0).room(api) and SharedPool().room(_FakeGraphAPI())  # no mem_get_info: room


def test_a_refusal_asks_the_device_once_per_position_and_reads_the_allocator_once_per_query():
    """Refused at a position (generation, scale), later captures there are refused without asking
    the device again; the next position asks again, and captures once memory is free. Each query
    reads the allocator's statistics once (``memory_stats_as_nested_dict``, as torch.cuda has it),
    not once per figure."""
    from toprovar_fx.lowering.cuda_graphs import SharedPool

    class Counted(_FakeGraphAPI):
        free, queries, stats = 1 << 20, 0, 0

        def mem_get_info(self):
            self.queries += 1
            return self.free, 64 << 30

        def memory_stats_as_nested_dict(self):
            self.stats += 1
            return {"reserved_bytes": {"all": {"current": 3 << 20}}, "allocated_bytes": {"all": {"current": 2 << 20}}}

        def memory_reserved(self):
            raise AssertionError("read through memory_stats_as_nested_dict")

        memory_allocated = memory_reserved

    api = Counted()
    where = [(1, 0)]
    pool = SharedPool(min_free=4 << 20, position=lambda: where[0])
    blocks = [CudaGraphCache(_recorded, static=[False, True, False], max_bytes=1 << 20, api=api, device_type="cpu",
                             pool=pool) for _ in range(3)]
    w, x = torch.randn(4, 4), torch.randn(8, 4)
    for block in blocks:
        out, _ = block(x, w, 0)
        torch.testing.assert_close(out, x @ w)
    assert pool.refused == 3 and api.queries == 1 and api.stats == 1 and api.captures == 0
    api.free = 8 << 20
    blocks[0](x, w, 0)  # memory freed, but still the refused position
    assert pool.refused == 4 and api.queries == 1 and api.captures == 0
    where[0] = (1, 1)
    blocks[0](x, w, 0)
    assert api.queries == 2 and api.stats == 2 and api.captures == 1 and pool.refused == 4


def test_out_of_memory_in_a_call_drops_the_graphs_runs_the_call_and_raises_the_floor(caplog):
    """The GPU out of memory inside a call of ours (here: a new shape's warm-up before its capture):
    every graph of the session is dropped, the call runs without a graph and gives its result, the
    free-memory floor of generations of that many rows rises to what dropping freed, and one
    warning says so. A shape seen next in such a generation while less than that is free runs
    without a graph, while a generation of fewer rows still captures; an out-of-memory error with
    no graph left to drop is raised."""
    from toprovar_fx.lowering.cuda_graphs import SharedPool

    class Tight(_FakeGraphAPI):
        free = 64 << 20

        def mem_get_info(self):
            return self.free, 64 << 30

        def memory_allocated(self):
            return self.reserved

        def empty_cache(self):
            self.reserved = 0  # the dropped graphs' pools go back to the device

    api = Tight()
    api.private_cost = 0
    generation = {"rows": 2}
    pool = SharedPool(min_free=1 << 20, rows=lambda: generation["rows"])
    failing = {"rows": None}

    def fn(x, w, n):
        if x.shape[0] == failing["rows"]:
            failing["rows"] = None  # once: after the relief the call fits
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1008.00 MiB")
        return _recorded(x, w, n)

    blocks = [CudaGraphCache(fn, static=[False, True, False], max_bytes=1 << 20, api=api, device_type="cpu",
                             pool=pool) for _ in range(2)]
    w, x = torch.randn(4, 4), torch.randn(8, 4)
    for block in blocks:
        block(x, w, 0)
    assert api.captures == 2 and all(len(b.graphs) == 1 for b in blocks)
    api.reserved = 24 << 20  # what the two graphs' pools hold
    failing["rows"] = 16
    generation["rows"] = 16  # a generation of batch 8 (x CFG)
    big = torch.randn(16, 4)
    with caplog.at_level("WARNING", logger="toprovar"):
        out, _ = blocks[0](big, w, 1)
    torch.testing.assert_close(out, big @ w + 1)
    assert pool.reliefs == 1 and not any(b.graphs for b in blocks) and not pool.lent
    assert pool.floors == {16: 24 << 20} and pool.min_free == 1 << 20  # what the graphs held stays free
    assert pool.floors_text() == "24 MiB at 16 rows"
    assert sum("ran out of memory" in r.getMessage() for r in caplog.records) == 1
    api.free = 16 << 20  # less than the new floor: the shape runs, without a graph
    out, _ = blocks[1](big, w, 2)
    torch.testing.assert_close(out, big @ w + 2)
    assert api.captures == 2 and pool.refused == 1
    generation["rows"] = 2  # batch 1 again: its graphs fit beside it, as before
    out, _ = blocks[1](x, w, 3)
    torch.testing.assert_close(out, x @ w + 3)
    assert api.captures == 3 and pool.refused == 1
    generation["rows"] = 16
    failing["rows"] = 16
    blocks[1](big, w, 4)  # the batch-1 graph is given back
    assert pool.reliefs == 2 and not blocks[1].graphs
    failing["rows"] = 16
    with pytest.raises(torch.OutOfMemoryError):  # nothing left to give back: the error is the caller's
        blocks[1](big, w, 5)


def test_graphs_lend_in_place_from_their_groups_pool_and_replay_only_while_later_outputs_are_free():
    """Graphs with the same input layouts captured at one position (the blocks of one scale) lend
    in place from one pool of their group, no copy into homes. A replay may overwrite the outputs
    of any member captured after it (the stand-in API does so), so a member replays only while
    none of those is held; a graph captured at another position starts another group."""
    from toprovar_fx.lowering.cuda_graphs import SharedPool

    api = _FakeGraphAPI()
    where = ["scale 3"]
    pool = SharedPool(lending=True, position=lambda: where[0])
    blocks = [CudaGraphCache(_recorded, static=[False, True, False], max_bytes=1 << 20, api=api, device_type="cpu",
                             pool=pool, lend=True) for _ in range(3)]
    ws = [torch.randn(4, 4) for _ in blocks]

    def scale(x):
        outs = []
        for block, w in zip(blocks, ws):
            x, col = block(x, w, 0)
            outs.append(col)  # held, as a generation's state holds the entropies, until the scale ends
        return x, outs

    def expected(x):
        cols = []
        for w in ws:
            cols.append(x.sum(0))
            x = x @ w
        return x, cols

    for _ in range(3):
        x = torch.randn(4, 4)
        got, cols = scale(x)
        ref, ref_cols = expected(x)
        torch.testing.assert_close(got, ref)
        torch.testing.assert_close(cols, ref_cols)
        del got, cols
    entries = [next(iter(b.graphs.values())) for b in blocks]
    ((key, group),) = pool.groups.items()
    assert key[0] == "scale 3" and group.members == entries and len(set(api.pools)) == 1
    assert api.pools[0] == group.handle != pool.get(api)
    assert all(e.pooled == frozenset({0, 1}) for e in entries)  # in place: nothing goes through a home
    assert all(b.replays == 3 for b in blocks) and not any(e.busy for e in entries)
    got, cols = scale(torch.randn(4, 4))
    last = cols[-1]  # an output of the last member, held: the earlier members must not replay
    del got, cols
    x = torch.randn(4, 4)
    held = last.clone()
    out, col = blocks[0](x, ws[0], 0)
    torch.testing.assert_close(last, held)  # untouched: the call ran without the graph
    torch.testing.assert_close(out, x @ ws[0])
    assert entries[0].busy == 1 and blocks[0].replays == 4
    del last, out, col
    # out of order: with the last member's output held (and nothing of the middle one's), the
    # middle member must wait
    h0, c0 = blocks[0](x, ws[0], 0)
    h1, c1 = blocks[1](h0, ws[1], 0)
    late, late_col = blocks[2](h1, ws[2], 0)
    want = late.clone()
    del h1, c1, late_col
    torch.testing.assert_close(blocks[1](h0, ws[1], 0)[0], x @ ws[0] @ ws[1])
    torch.testing.assert_close(late, want)
    assert entries[1].busy == 1 and [b.replays for b in blocks] == [5, 5, 5]
    del h0, c0, late
    got, cols = scale(x)  # all free again: every member replays
    torch.testing.assert_close(got, expected(x)[0])
    assert [b.replays for b in blocks] == [6, 6, 6] and group.free_from == 3
    del got, cols
    # a graph of the same layouts captured elsewhere (another scale or generation) starts a group
    where[0] = "scale 4"
    extra = CudaGraphCache(_recorded, static=[False, True, False], max_bytes=1 << 20, api=api, device_type="cpu",
                           pool=pool, lend=True)
    out, col = extra(x, torch.randn(4, 4), 0)
    (other,) = extra.graphs.values()
    assert len(pool.groups) == 2 and api.pools[-1] != group.handle and other.group is not group
    del out, col


def test_a_function_that_fails_in_its_warm_up_fails_as_itself():
    """A call whose function raises during the capture's warm-up disables capturing and raises the
    function's own error from the plain call, not one of the cache's."""
    from toprovar_fx.lowering.cuda_graphs import SharedPool

    def broken(x, w, n):
        raise ValueError("shapes do not match")

    cache = CudaGraphCache(broken, static=[False, True, False], max_bytes=1 << 20, api=_FakeGraphAPI(),
                           device_type="cpu", pool=SharedPool(lending=True), lend=True)
    with pytest.raises(ValueError, match="shapes do not match"):
        cache(torch.ones(2, 4), torch.eye(4), 0)
    assert cache.disabled == "ValueError: shapes do not match" and not cache.pool.groups


def test_a_group_no_graph_was_captured_into_is_forgotten():
    """A capture that records nothing keeps no graph in its group's pool, which may then be freed:
    the group is dropped, and the next capture starts a new one."""
    from toprovar_fx.lowering.cuda_graphs import SharedPool

    api = _FakeGraphAPI(empty=True)
    pool = SharedPool(lending=True)
    cache = CudaGraphCache(_recorded, static=[False, True, False], max_bytes=1 << 20, api=api, device_type="cpu",
                           pool=pool, lend=True)
    out, _ = cache(torch.ones(2, 4), torch.eye(4), 0)
    torch.testing.assert_close(out, torch.ones(2, 4))
    assert api.captures == 1 and cache.empty == 1 and api.pools[0] is not None and not pool.groups


def test_large_lent_outputs_are_lent_in_place_from_a_private_pool(monkeypatch):
    """A graph whose lendable outputs total ``PRIVATE_LEND_MIN_BYTES`` is captured into a pool of
    its own and hands out its captured outputs themselves (no home, no copy); an output laid out
    unlike its clone still goes through a home. Held outputs still keep the graph from replaying."""
    from toprovar_fx.lowering.cuda_graphs import SharedPool

    monkeypatch.setattr(cuda_graphs, "PRIVATE_LEND_MIN_BYTES", 64)
    api = _FakeGraphAPI()
    pool = SharedPool(lending=True)

    def block(x, w, n):
        h = x @ w + n
        return h, torch.cat([h, x], 1)[:, :4]  # a dense output, then a view into a larger buffer

    cache = CudaGraphCache(_replayable(block), static=[False, True, False], max_bytes=1 << 20, api=api,
                           device_type="cpu", pool=pool, lend=True)
    w = torch.randn(4, 4)
    for _ in range(3):
        x = torch.randn(4, 4)
        h, k = cache(x, w, 1)
        torch.testing.assert_close(h, x @ w + 1)
        torch.testing.assert_close(k, x @ w + 1)
        assert k.stride() == (4, 1)
        del h, k
    (entry,) = cache.graphs.values()
    assert api.pools == [None] and cache.private == 1 and cache.replays == 3
    assert set(entry.watch) == {0, 1}
    held, _ = cache(x, w, 1)
    torch.testing.assert_close(cache(torch.zeros(4, 4), w, 1)[0], torch.ones(4, 4))  # runs without the graph
    torch.testing.assert_close(held, x @ w + 1)
    assert entry.busy == 1 and cache.replays == 4


def test_pools_of_their_own_stop_at_the_memory_budget(monkeypatch):
    """Graphs lend in place from pools of their own only while those pools reserve less than the
    budget (``cuda_graph_private_max_mib``); later large graphs lend through homes, with the same
    values. A graph captured again without lending gives its pool's bytes back."""
    from toprovar_fx.lowering.cuda_graphs import SharedPool

    monkeypatch.setattr(cuda_graphs, "PRIVATE_LEND_MIN_BYTES", 64)
    api = _FakeGraphAPI()
    api.private_cost = 1000
    pool = SharedPool(lending=True, private_budget=1500)
    caches = [CudaGraphCache(_replayable(lambda x, w: (x @ w,)), static=[False, True], max_bytes=1 << 20, api=api,
                             device_type="cpu", pool=pool, lend=True) for _ in range(3)]
    ws = [torch.randn(4, 4) for _ in caches]
    for _ in range(2):
        x = torch.randn(4, 4)
        for cache, w in zip(caches, ws):
            (h,) = cache(x, w)
            torch.testing.assert_close(h, x @ w)
            del h
    # the first fits, the second overshoots by what only its capture could tell, the third gets a home
    assert [c.private for c in caches] == [1, 1, 0] and api.pools[:2] == [None, None]
    assert pool.private_bytes == 2000 and api.pools[2] is not None
    (third,) = caches[2].graphs.values()
    assert third.own_pool_bytes == 0 and set(third.watch) == {0}  # lent, through a home
    (first,) = caches[0].graphs.values()
    caches[0]._capture_without_lending(next(iter(caches[0].graphs)), first, (x, ws[0]))
    assert pool.private_bytes == 1000


def test_the_private_pool_budget_defaults_to_a_sixteenth_of_the_device():
    from toprovar_fx.lowering.cuda_graphs import SharedPool

    class Device:
        def current_device(self):
            return 0

        def get_device_properties(self, index):
            return type("Props", (), {"total_memory": 16 << 30})()

    pool = SharedPool(lending=True)
    assert pool.private_room(Device()) and pool.private_budget == 1 << 30
    pool.private_bytes = 1 << 30
    assert not pool.private_room(Device())
    assert SharedPool(lending=True).private_room(_FakeGraphAPI())  # no device to ask: no budget


def test_a_graph_kept_from_replaying_is_captured_again_without_lending(monkeypatch):
    """A caller that keeps every output: after ``BUSY_LIMIT`` calls without replay the graph is
    captured again, cloning, and replays from then on; what the caller kept never changes."""
    from toprovar_fx.lowering.cuda_graphs import BUSY_LIMIT, SharedPool

    api = _FakeGraphAPI()
    pool = SharedPool(lending=True)
    cache = CudaGraphCache(_recorded, static=[False, True, False], max_bytes=1 << 20, api=api, device_type="cpu",
                           pool=pool, lend=True)
    w = torch.randn(4, 4)
    kept, inputs = [], []
    for _ in range(BUSY_LIMIT + 3):
        inputs.append(torch.randn(2, 4))
        kept.append(cache(inputs[-1], w, 0)[0])
    (entry,) = cache.graphs.values()
    assert api.captures == 2 and not entry.watch  # the second capture lends nothing
    assert cache.replays == 1 + 2  # the first call, then the calls after the second capture
    assert pool.busy == BUSY_LIMIT and not pool.lent
    for out, x in zip(kept, inputs):
        torch.testing.assert_close(out, x @ w)
    # a caller that holds the previous output only during the next call blocks every other call:
    # counted in total, it loses lending as well
    cache = CudaGraphCache(_recorded, static=[False, True, False], max_bytes=1 << 20, api=api, device_type="cpu",
                           pool=pool, lend=True)
    prev = None
    for _ in range(2 * BUSY_LIMIT + 2):
        x = torch.randn(2, 4)
        out = cache(x, w, 1)[0]
        torch.testing.assert_close(out, x @ w + 1)
        prev = out  # noqa: F841 - held until the next call returns
    (entry,) = cache.graphs.values()
    assert not entry.watch and entry.busy == 0 and api.captures == 4


def test_a_capture_that_records_nothing_is_not_replayed():
    """An empty graph would replay nothing and leave stale outputs: the call runs directly."""
    api = _FakeGraphAPI(empty=True)
    cache = CudaGraphCache(_recorded, static=[False, True, False], max_bytes=1 << 20, api=api, device_type="cpu")
    w = torch.randn(4, 3)
    for _ in range(3):
        x = torch.randn(2, 4)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the capture's "empty" warning is consumed, not shown
            out, col = cache(x, w, 1)
        torch.testing.assert_close(out, x @ w + 1)
        torch.testing.assert_close(col, x.sum(0))
    assert api.captures == 1 and cache.empty == 1 and cache.replays == 0 and not cache.disabled


def test_cuda_graph_cache_falls_back_when_capture_fails(caplog):
    api = _FakeGraphAPI(fail=True)
    cache = CudaGraphCache(_recorded, static=[False, True, False], max_bytes=1 << 20, api=api, device_type="cpu")
    x, w = torch.randn(2, 4), torch.randn(4, 3)
    with caplog.at_level("WARNING", logger="toprovar"):
        out, _ = cache(x, w, 0)
        out2, _ = cache(x, w, 0)
    torch.testing.assert_close(out, x @ w)
    torch.testing.assert_close(out2, x @ w)
    assert cache.disabled and cache.replays == 0
    assert sum("cannot be captured" in r.message for r in caplog.records) == 1


class _WorkspaceAPI(_FakeGraphAPI):
    """A stand-in API with a BLAS workspace cache: ``events`` logs syncs, clears and captures,
    and each capture notes whether it found the cache empty (so it allocated in its own pool)."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__(fail=fail)
        self.events: list[str] = []
        self.workspace: object | None = ("default pool",)  # cached by an earlier GEMM
        self.used: list = []  # per capture, the workspace its GEMMs embed

    def synchronize(self) -> None:
        self.events.append("sync")

    def clear_blas_workspaces(self) -> None:
        self.events.append("clear")
        self.workspace = None

    @contextlib.contextmanager
    def graph(self, g, pool=None):
        self.events.append("capture:fresh" if self.workspace is None else "capture:cached")
        if self.workspace is None:  # the capture's first GEMM allocates it, inside the capture's pool
            self.workspace = ("in pool", pool if pool is not None else ("own", id(g)))
        self.used.append(self.workspace)
        with super().graph(g, pool=pool):
            yield


@pytest.mark.parametrize("fail", [False, True])
def test_capture_allocates_its_blas_workspace_in_its_own_pool(fail):
    """Inductor's CUDA-graph trees (and, in torch 2.11, destroying any graph) drop cuBLAS's cached
    workspaces; a captured GEMM whose workspace came from the default pool would then write into
    memory handed to others. Each capture starts from an empty cache (after the queued work) and
    leaves it empty, also when it fails."""
    api = _WorkspaceAPI(fail=fail)
    cache = CudaGraphCache(_recorded, static=[False, True, False], max_bytes=1 << 20, api=api, device_type="cpu")
    x, w = torch.randn(2, 4), torch.randn(4, 3)
    torch.testing.assert_close(cache(x, w, 0)[0], x @ w)
    torch.testing.assert_close(cache(x, w, 1)[0], x @ w + 1)  # another graph (fail: captures are off by now)
    per_capture = ["sync", "clear", "capture:fresh", "clear"]  # no shared pool: each graph its own
    assert api.events == per_capture * (1 if fail else 2)
    assert api.workspace is None and all(w[1][0] == "own" for w in api.used)


def test_graphs_lending_in_place_embed_the_shared_pools_workspace(monkeypatch):
    """With a shared pool, every graph's GEMMs use a workspace allocated in that pool: the shared
    graphs' own capture allocates it; a graph lending in place from a pool of its own gets it from
    a primer captured into the shared pool just before (one workspace, not one per own pool).
    The primer graph is kept (it keeps the pool alive) until lending restarts the pool."""
    from toprovar_fx.lowering.cuda_graphs import SharedPool

    monkeypatch.setattr(cuda_graphs, "PRIVATE_LEND_MIN_BYTES", 64)
    api = _WorkspaceAPI()
    pool = SharedPool(lending=True)
    big = CudaGraphCache(_replayable(lambda x, w: (x @ w,)), static=[False, True], max_bytes=1 << 20, api=api,
                         device_type="cpu", pool=pool, lend=True)
    small = CudaGraphCache(_recorded, static=[False, True, False], max_bytes=1 << 20, api=api, device_type="cpu",
                           pool=pool)
    x, w = torch.randn(4, 4), torch.randn(4, 3)
    torch.testing.assert_close(small(x, w, 0)[0], x @ w)
    (h,) = big(x, torch.randn(4, 4))
    del h
    shared = pool.get(api)
    assert big.private == 1 and api.pools == [shared, shared, None]  # small, primer, big (own pool)
    assert api.events == ["sync", "clear", "capture:fresh",  # small: allocates it in the shared pool
                          "sync", "clear", "capture:fresh", "capture:cached"]  # primer, then big uses it
    assert api.used == [("in pool", shared)] * 3 and pool.primer is not None
    pool.lending = False
    pool.start_lending()
    assert pool.primer is None


def test_graphs_lending_from_their_groups_pools_keep_the_shared_pool_alive():
    """Graphs lending from their groups' pools get their workspace from a primer in the shared pool,
    which then may hold no other graph: replacing the primer for the next such capture must not
    leave the shared pool without graphs (PyTorch's allocator, and the stand-in API, refuse a
    capture into a pool whose graphs were all destroyed)."""
    from toprovar_fx.lowering.cuda_graphs import SharedPool

    api = _WorkspaceAPI()
    pool = SharedPool(lending=True)
    caches = [CudaGraphCache(_replayable(lambda x, w: (x @ w,)), static=[False, True], max_bytes=1 << 20, api=api,
                             device_type="cpu", pool=pool, lend=True) for _ in range(3)]
    w = torch.eye(4)
    for _ in range(2):
        x = torch.randn(4, 4)
        for cache in caches:
            (h,) = cache(x, w)
            torch.testing.assert_close(h, x)
            del h
    assert not any(c.disabled for c in caches) and all(c.replays == 2 for c in caches)
    shared = pool.get(api)
    ((_, group),) = pool.groups.items()
    assert api.pools == [shared, group.handle] * 3  # a primer before each capture
    assert api.used == [("in pool", shared)] * 6 and pool.keeper is not None


def _skip_after_d(name: str) -> dict:
    """``name``'s policy as a scale stage: D fixed at min_start_scale, every later scale skipped."""
    return load_policy(name).derive(f"{name}-test-skip-after-d",
                                    {"scale": {"mode": "skip_after_D", "criterion": "fixed"}})


def _cached_restore(name: str) -> dict:
    """``name``'s entropy policy with FastVAR's restoration from the scale before its earliest D."""
    return load_policy(name).derive(f"{name}-test-cached-restore",
                                    {"restore": {"mode": "cached_scale", "cached_scale": -4}})


_VARIANTS = {"skip-after-d": _skip_after_d, "cached-restore": _cached_restore}


@pytest.mark.parametrize("name,preset,policy", [
    ("var-tiny", None, None), ("infinity-tiny", None, None), ("var-tiny", "quality", None),
    ("var-tiny", "fast", None),  # Detail layers skipped whole: planned skips
    ("infinity-tiny", "fast", None),
    ("var-tiny", None, "skip-after-d"),  # whole scales skipped: the blocks after each scale's first
    ("var-tiny", "fastest", None),  # the last two scales skipped, the one before pruned
    ("infinity-tiny", "fastest", None),
    ("var-tiny", None, "cached-restore"),  # entropy policy, FastVAR's restore: the cached scale is planned
    ("var-tiny-fastvar-released", None, None),  # per-sublayer frequency selection, cached-scale restore
    ("infinity-tiny-fastvar-released", None, None),
])
def test_planned_blocks_change_nothing(name, preset, policy):
    """Blocks run from a plan (option planned_blocks) exactly as through the dispatcher."""
    family = name.removesuffix("-fastvar-released")
    results = {}
    for planned in (False, True):
        opts = ({"policy": _VARIANTS[policy](name) if policy else name, "planned_blocks": planned}
                | ({"preset": preset} if preset else {}))
        logits, planned_before = generate_twice(family, opts)
        rep = toprovar_fx.last_generation()
        sess = last_session()
        runs = sess.planned_calls
        assert rep.planned_blocks == runs - planned_before  # the report counts this generation's
        kept = {key: idx.tolist() for key, idx in sess.gen.kept_idx.items()}
        results[planned] = (logits, runs, rep.start_scale, rep.flop_ratio,
                            [[(lay.action, lay.kept_tokens, lay.mean_entropy) for lay in sc.layers] for sc in rep.scales], kept,
                            sorted(sess.gen.entropy))
    (a, runs_off, *rest_off), (b, runs_on, *rest_on) = results[False], results[True]
    assert runs_off == 0 and runs_on > 0  # the planned path ran, and only when asked for
    assert rest_on == rest_off
    if preset in ("fast", "fastest") or policy == "skip-after-d":  # those planned blocks were skips
        assert any(action == "skip" for sc in rest_on[2] for action, _, _ in sc)
    if policy == "cached-restore":  # tokens were pruned and restored from the cached scale
        assert rest_on[1] < 1.0 and any(action == "prune_tokens" for sc in rest_on[2] for action, _, _ in sc)
    assert max_rel_diff(b, a) <= 1e-5


@pytest.mark.parametrize("name,preset", [("infinity-tiny", None), ("infinity-tiny", "fastest"), ("var-tiny", None)])
def test_planned_blocks_decide_and_select_inside_their_graphs(monkeypatch, name, preset):
    """A pruned scale's decision and token selection cost no eager kernels of their own: the
    measured block computes the decision in its graph (``measure`` plans, rho and kept counts),
    and the first pruned block ranks the entropy in its graph; the later blocks take its indices."""
    from toprovar_fx.lowering import runners as runners_mod
    from toprovar_fx.runtime import decisions

    eager: list[str] = []
    in_graph: list[tuple[str, int]] = []

    def counting(module, fn_name: str, kind: str, graph: bool) -> None:
        fn = getattr(module, fn_name)

        def counted(*args):
            if graph:
                in_graph.append((kind, last_session().decider.plan_run.plan.scale))
            else:
                eager.append(kind)
            return fn(*args)

        monkeypatch.setattr(module, fn_name, counted)

    counting(decisions, "decision_values", "decision", graph=False)
    counting(decisions, "entropy_indices", "selection", graph=False)
    counting(runners_mod, "decision_values", "decision", graph=True)
    counting(runners_mod, "entropy_indices", "selection", graph=True)
    torch._dynamo.reset()
    call = sampler_call(name, 1)
    fast = torch.compile(model(name).autoregressive_infer_cfg, backend="toprovar",
                         options={"policy": name, "strict": True} | ({"preset": preset} if preset else {}))
    call(fast)
    eager.clear()
    in_graph.clear()
    call(fast)
    rep = toprovar_fx.last_generation()
    pruned = sorted(sc.index for sc in rep.scales if any(lay.action == "prune_tokens" for lay in sc.layers))
    assert pruned and eager == []  # nothing decided or selected outside a graph
    assert [s for kind, s in in_graph if kind == "selection"] == pruned  # one ranking per pruned scale
    decided = [s for kind, s in in_graph if kind == "decision"]
    assert decided == sorted(set(decided)) and set(pruned) <= set(decided)
    assert decided[0] == rep.start_scale or (rep.scales[decided[0]].rho is not None and decided[0] < rep.start_scale)


@pytest.mark.parametrize("name", ["var-tiny", "infinity-tiny"])
def test_blocks_with_every_branch_skipped_hand_their_inputs_back(monkeypatch, name):
    """After the first, a planned block whose every branch is skipped runs nothing: its outputs
    are its inputs (what the first call showed), so neither graph nor CUDA-graph copy is needed."""
    from toprovar_fx.lowering.runners import PlannedBlockRunner

    ran: list[bool] = []
    planned_fn = PlannedBlockRunner._planned_fn

    def counting(self, *args):
        ran.append(self.session.decider.plan_run.plan.skips_all)
        return planned_fn(self, *args)

    monkeypatch.setattr(PlannedBlockRunner, "_planned_fn", counting)
    torch._dynamo.reset()
    call = sampler_call(name, 1)
    fast = torch.compile(model(name).autoregressive_infer_cfg, backend="toprovar",
                         options={"policy": name, "preset": "fastest", "strict": True})
    call(fast)
    learned = ran.count(True)
    ran.clear()
    call(fast)
    rep = toprovar_fx.last_generation()
    skipped_blocks = sum(len(sc.layers) for sc in rep.scales if sc.skipped)
    assert 1 <= learned < skipped_blocks  # the first skip-all call of each block graph ran it
    assert True not in ran and False in ran  # then none did; the pruned scale's plans still ran
    assert rep.planned_blocks >= skipped_blocks - 2  # each skipped scale's first block is dispatched
    assert all(lay.action == "skip" for sc in rep.scales if sc.skipped for lay in sc.layers)


@pytest.mark.parametrize("name", ["var-tiny-fastvar-released", "infinity-tiny-fastvar-released"])
def test_the_cached_scale_is_planned_and_caches_the_same_outputs(monkeypatch, name):
    """restore.mode cached_scale: the blocks of the cached scale run planned (no dispatcher
    ``_keep``, the first block included), and the branch outputs the decider keeps are the
    dispatcher's."""
    from toprovar_fx.runtime.decisions import Decider

    family = name.removesuffix("-fastvar-released")
    m = model(family)
    call = sampler_call(family, 1)
    kept_at: list[tuple[int, int]] = []
    keep = Decider._keep

    def counting_keep(self, spec, branch, inputs, x, tick):
        res = self._restore_scale()
        if tick is not None and res is not None and res.cached_scale == tick.scale:
            kept_at.append((tick.scale, tick.layer))
        return keep(self, spec, branch, inputs, x, tick)

    monkeypatch.setattr(Decider, "_keep", counting_keep)
    caches = {}
    for planned in (False, True):
        torch._dynamo.reset()
        fast = torch.compile(m.autoregressive_infer_cfg, backend="toprovar",
                             options={"policy": name, "planned_blocks": planned})
        call(fast)
        kept_at.clear()
        call(fast)
        caches[planned] = ({k: v.clone() for k, v in last_session().decider.cache.items()}, set(kept_at))
    (ref, ref_layers), (got, got_layers) = caches[False], caches[True]
    depth = max(layer for _, layer in ref_layers) + 1
    assert {layer for _, layer in ref_layers} == set(range(depth))  # the dispatcher ran every block there
    assert got_layers == set()  # planned: none, the first block's (predicted a scale ahead) included
    assert ref.keys() == got.keys()
    assert len(ref) == depth * len({kind for _, kind in ref}) >= 2 * depth  # every branch of every layer
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["var-tiny-fastvar-released", "infinity-tiny-fastvar-released"])
def test_fixed_ratio_policies_plan_every_block_of_the_scales_they_prune(monkeypatch, name):
    """A fixed-ratio policy decides nothing from entropy, so every block of a cached or pruned
    scale is predicted, its first included (on an H200 a block through the dispatcher launched
    42 kernels more than a planned one: FastVAR's pruned scales launched 105 against the dense
    baseline's 63). Only the first block of a skipped scale (and maybe of a generation) is dispatched."""
    from toprovar_fx.runtime.decisions import Decider

    family = name.removesuffix("-fastvar-released")
    dispatched: list[tuple[int, int]] = []
    act = Decider._act

    def counting_act(self, spec, branch, inputs, x, tick):
        dispatched.append((tick.scale, tick.layer))
        return act(self, spec, branch, inputs, x, tick)

    monkeypatch.setattr(Decider, "_act", counting_act)
    torch._dynamo.reset()
    call = sampler_call(family, 1)
    fast = torch.compile(model(family).autoregressive_infer_cfg, backend="toprovar",
                         options={"policy": name, "strict": True})
    call(fast)
    dispatched.clear()
    call(fast)
    rep = toprovar_fx.last_generation()
    pruned = {sc.index for sc in rep.scales if any(lay.action == "prune_tokens" for lay in sc.layers)}
    skipped = {sc.index for sc in rep.scales if sc.skipped}
    res = last_session().decider.resolved
    assert len(pruned) == 2 and len(skipped) == 2 and res.cached_scale is not None
    assert set(dispatched) - {(0, 0)} == {(s, 0) for s in skipped}


def _replayable(fn):
    """``fn`` as a stand-in capture sees it: a replay reruns it on the graph's static inputs and
    writes into the outputs of the capture run (poisoned with NaN until then)."""

    def wrapped(*args):
        outs = fn(*args)
        if _FakeGraphAPI.capturing:
            g = _FakeGraphAPI.capturing[0]
            flat = outs if isinstance(outs, (tuple, list)) else (outs,)

            def work(flat=flat):
                new = fn(*args)
                for o, v in zip(flat, new if isinstance(new, (tuple, list)) else (new,)):
                    if isinstance(o, torch.Tensor):
                        o.copy_(v)

            g.work = work
            # a capture leaves its outputs holding garbage, but never writes into its inputs: an
            # output that is (a view of) an input keeps its values; nor into homes, allocated
            # before the capture, outside its pool
            taken = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
            taken |= {h.untyped_storage().data_ptr() for h in getattr(fn, "homes", {}).values()}
            g.record.outs = tuple(o for o in flat if isinstance(o, torch.Tensor) and o.is_floating_point()
                                  and o.untyped_storage().data_ptr() not in taken)
            for o in g.record.outs:
                o.fill_(float("nan"))
        return outs

    return wrapped


def _stand_in_graphs(monkeypatch) -> tuple[_FakeGraphAPI, list[CudaGraphCache]]:
    """Make the backend capture every graph it would capture on a GPU with the stand-in API; the
    API and the list of every ``CudaGraphCache`` made from now on."""
    import toprovar_fx.backend as backend

    api = _FakeGraphAPI()
    made: list[CudaGraphCache] = []

    def cache(fn, static, max_bytes, name="graph", pool=None, lend=False, guarded=None):
        made.append(CudaGraphCache(_replayable(fn), static, max_bytes, name=name, api=api, device_type="cpu",
                                   pool=pool, lend=lend, guarded=guarded))
        return made[-1]

    monkeypatch.setattr(backend, "CudaGraphCache", cache)
    monkeypatch.setattr(backend, "_on_cuda", lambda example_inputs: True)
    return api, made


class _NoReferenceGraphAPI(_FakeGraphAPI):
    """A stand-in that, like a real CUDA graph, keeps no reference to what it was captured with:
    capture runs the function once, replay does nothing (outputs keep their capture values). The
    values are meaningless; the reference counts that decide whether a lent output is free are
    those of a GPU run (``_FakeGraphAPI``'s replays rerun the function, so they keep its inputs)."""

    class CUDAGraph(_FakeGraphAPI.CUDAGraph):
        def replay(self) -> None:
            pass

    record_replay = None


@pytest.mark.parametrize("name,policy", [("infinity-tiny", "fastest"), ("infinity-tiny", "frozen-classes"),
                                         ("var-tiny", None)])
def test_lent_outputs_are_free_again_when_replays_keep_no_reference(monkeypatch, name, policy):
    """Every graph replays once lending started, also when the capture itself holds nothing: no
    alias of a borrowed input may outlive the capture's count of the references it keeps (the
    cuBLAS primer's tensor, a planned block's kept indices), or the lender waits for it forever."""
    import toprovar_fx.backend as backend

    api = _NoReferenceGraphAPI()

    def cache(fn, static, max_bytes, name="graph", pool=None, lend=False, guarded=None):
        return CudaGraphCache(fn, static, max_bytes, name=name, api=api, device_type="cpu", pool=pool, lend=lend,
                              guarded=guarded)

    monkeypatch.setattr(backend, "CudaGraphCache", cache)
    monkeypatch.setattr(backend, "_on_cuda", lambda example_inputs: True)
    opts: dict[str, Any] = {"policy": name, "inductor": False, "cuda_graph_lend_outputs": True}
    if policy == "fastest":
        opts["preset"] = "fastest"
    elif policy == "frozen-classes":  # Global layers before the Detail ones: the selection's entropy is lent
        opts["policy"] = load_policy(name).derive(f"{name}-test-frozen", {
            "layer": {"mode": "frozen", "frozen": {"global": [0, 1], "detail": [2, 3]}},
            "scale": {"criterion": "fixed", "min_start_scale": -3, "max_start_scale": -3, "measure_layer": 0}})
    torch._dynamo.reset()
    call = sampler_call(name, 1)
    fast = torch.compile(model(name).autoregressive_infer_cfg, backend="toprovar", options=opts)
    for _ in range(5):
        call(fast)
    pool = last_session().graph_pool()
    rep = toprovar_fx.last_generation()
    assert pool.lending and rep.graph_replays > 0 and last_session().planned_calls > 0
    assert pool.busy_by == {}


def test_out_of_memory_in_a_replay_mid_generation_gives_the_same_logits_and_graphs_come_back(monkeypatch):
    """An out-of-memory error raised by one replay in the middle of a pruned generation, lending
    (``SharedPool.relieve``): that generation's logits are the plain path's, and the next
    generations capture again, into new pools, and replay with nothing left busy."""
    name = "infinity-tiny"
    m = model(name)
    call = sampler_call(name, 1)
    torch._dynamo.reset()
    plain = torch.compile(m.autoregressive_infer_cfg, backend="toprovar", options={"policy": name, "inductor": False})
    call(plain)
    _, ref = call(plain)

    api, made = _stand_in_graphs(monkeypatch)
    torch._dynamo.reset()
    fast = torch.compile(m.autoregressive_infer_cfg, backend="toprovar",
                         options={"policy": name, "inductor": False, "cuda_graph_lend_outputs": True})
    for _ in range(3):  # compiles, then lending from the third generation on
        call(fast)
    pool = last_session().graph_pool()
    assert pool.lending
    raised = cuda_graphs.fail_one_replay(made, "CUDA out of memory. Tried to allocate 1008.00 MiB")
    handles = api.handles
    _, during = call(fast)
    assert raised and pool.reliefs == 1 and max_rel_diff(during, ref) <= 1e-5
    with pytest.raises(ValueError, match="no captured graph"):
        cuda_graphs.fail_one_replay([])
    for _ in range(2):
        _, got = call(fast)
        assert max_rel_diff(got, ref) <= 1e-5
    rep = toprovar_fx.last_generation()
    assert api.handles > handles  # captured again into new pools
    assert rep.graph_replays > 0 and rep.graph_calls_without_replay == 0 and pool.busy_by == {}


def test_after_a_relief_calls_refused_a_capture_hand_on_replay_layouts_and_nothing_recompiles(monkeypatch):
    """After a relief, with every new capture refused for memory, the blocks run without graphs:
    their outputs (the K/V cache, a strided view at the first scale) are handed on laid out as a
    replay hands them, so the next generation compiles no frame again (Dynamo guards those strides;
    before, every block frame compiled once more) and gives the plain path's logits."""
    name = "infinity-tiny"
    m = model(name)
    call = sampler_call(name, 1)
    torch._dynamo.reset()
    plain = torch.compile(m.autoregressive_infer_cfg, backend="toprovar", options={"policy": name, "inductor": False})
    call(plain)
    _, ref = call(plain)

    api, made = _stand_in_graphs(monkeypatch)
    torch._dynamo.reset()
    fast = torch.compile(m.autoregressive_infer_cfg, backend="toprovar", options={"policy": name, "inductor": False})
    for _ in range(3):
        call(fast)
    pool = last_session().graph_pool()
    cuda_graphs.fail_one_replay(made, "CUDA out of memory. Tried to allocate 1008.00 MiB")
    call(fast)
    assert pool.reliefs == 1
    api.mem_get_info = lambda: (1 << 20, 64 << 30)  # short of memory from now on: every new shape refused
    api.memory_allocated = api.memory_reserved
    refused = pool.refused
    for _ in range(2):
        _, got = call(fast)
        rep = toprovar_fx.last_generation()
        assert rep.compiles == 0 and max_rel_diff(got, ref) <= 1e-5
    assert pool.refused > refused


def test_a_call_run_without_its_graph_hands_outputs_laid_out_as_a_replay_does():
    """Refused a capture, a call's output that is a strided view comes back as its clone, as a
    replay gives it; dense outputs come back as they are."""
    from toprovar_fx.lowering.cuda_graphs import SharedPool

    class Short(_FakeGraphAPI):
        free = 1 << 20

        def mem_get_info(self):
            return self.free, 64 << 30

        def memory_allocated(self):
            return self.memory_reserved()

    def fused(x, w, n):
        qkv = x @ w
        return qkv[:, :2], qkv + n  # K of a fused projection: a view that is not dense

    api = Short()
    cache = CudaGraphCache(fused, static=[False, True, False], max_bytes=1 << 20, api=api, device_type="cpu",
                           pool=SharedPool(min_free=4 << 20))
    w, x = torch.randn(4, 4), torch.randn(8, 4)
    refused_k, refused_full = cache(x, w, 0)
    api.free = 8 << 20
    cache(x, w, 0)  # captured
    replayed_k, replayed_full = cache(x, w, 0)
    assert api.captures == 1 and cache.replays >= 1
    assert refused_k.stride() == replayed_k.stride() == (2, 1) and refused_full.stride() == replayed_full.stride()
    torch.testing.assert_close(refused_k, (x @ w)[:, :2])


def _busy(caches: list[CudaGraphCache]) -> int:
    return sum(e.busy for c in caches for e in c.graphs.values() if e is not None)


@pytest.mark.parametrize("name,preset,lend", [("var-tiny", None, False), ("infinity-tiny", None, False),
                                              ("var-tiny", "fast", False), ("var-tiny-fastvar-released", None, False),
                                              ("infinity-tiny", None, True), ("var-tiny-fastvar-released", None, True),
                                              ("infinity-tiny", None, "private")])
def test_cuda_graph_lowering_end_to_end_with_a_stand_in_graph_api(monkeypatch, name, preset, lend):
    """Every graph the backend would capture on a GPU (dense variants, planned blocks) is
    "captured" by the stand-in API and replayed: logits and decisions stay those of the plain path."""

    m = model(name.removesuffix("-fastvar-released"))
    call = sampler_call(name.removesuffix("-fastvar-released"), 1)
    torch._dynamo.reset()
    extra = {"preset": preset} if preset else {}
    fast = torch.compile(m.autoregressive_infer_cfg, backend="toprovar",
                         options={"policy": name, "planned_blocks": False} | extra)  # the dispatcher path
    call(fast)
    _, ref = call(fast)
    ref_rep = toprovar_fx.last_generation()

    api, made = _stand_in_graphs(monkeypatch)
    if lend == "private":  # the tiny model's larger graphs lend in place from pools of their own
        monkeypatch.setattr(cuda_graphs, "PRIVATE_LEND_MIN_BYTES", 4096)
        lend = True
    torch._dynamo.reset()
    fast = torch.compile(m.autoregressive_infer_cfg, backend="toprovar",
                         options={"policy": name, "inductor": False, "planned_blocks": True,
                                  "cuda_graph_lend_outputs": lend} | extra)
    call(fast)
    _, got = call(fast)
    if lend:
        # lending starts after a generation without compiles (the second), from the third on
        assert not last_session().graph_pool().lending
        got = None  # the caller lets go of its images: nothing of ours is held between generations
        call(fast)
        pool = last_session().graph_pool()
        # captured again, in a new shared pool and one pool per group of graphs lending in place
        assert pool.lending and pool.groups and api.handles == 2 + len(pool.groups)
        replays, busy = sum(c.replays for c in made), _busy(made)
        _, got = call(fast)
        replays, busy = sum(c.replays for c in made) - replays, _busy(made) - busy
        assert busy == 0, last_session().graph_pool().busy_by  # every lent output is free again when its graph runs next
        lent = set(last_session().graph_pool().lent)
        assert lent and not any(t.data_ptr() in lent for t in last_session().decider.cache.values())
        assert (sum(c.private for c in made) > 0) == (cuda_graphs.PRIVATE_LEND_MIN_BYTES == 4096)
    rep = toprovar_fx.last_generation()
    if lend:
        # counted from the generation's first attention on: graphs called before it (the first
        # scale's embedding) are not in the report
        assert 0.9 * replays <= rep.graph_replays <= replays and rep.graph_calls_without_replay == busy
    else:
        assert rep.graph_replays > 0 and rep.graph_calls_without_replay == 0
    assert api.captures > 0 and sum(c.replays for c in made) > api.captures  # graphs were replayed
    entries = [e for c in made for e in c.graphs.values() if e is not None]
    assert (sum(len(e.borrowed) for e in entries) > 0) == lend  # graphs read lent outputs in place
    assert last_session().planned_calls > 0
    private = cuda_graphs.PRIVATE_LEND_MIN_BYTES == 4096
    groups = len(last_session().graph_pool().groups)
    assert api.handles == 1 + lend + groups and set(api.pools) - {None} == {("pool", h) for h in range(1, 2 + lend + groups)}
    assert (None in api.pools) == private  # pools of their own only for graphs lending in place
    assert (rep.start_scale, rep.flop_ratio) == (ref_rep.start_scale, ref_rep.flop_ratio)
    assert [[lay.action for lay in s.layers] for s in rep.scales] == [[lay.action for lay in s.layers]
                                                                      for s in ref_rep.scales]
    assert max_rel_diff(got, ref) <= 1e-5


def test_lent_entropies_never_keep_the_next_generations_graphs_from_replaying(monkeypatch):
    """Observe mode lends every graph output, the entropies too, and holds the entropies until the
    next generation's first tick, which comes after that generation's first graph call. The
    entropy recorded at a generation's first tick is therefore a copy: held as lent, its graph
    would run without replay, and with it every graph reading its outputs in place (a whole
    generation without graphs, three generations in a row)."""

    m = model("infinity-tiny")
    call = sampler_call("infinity-tiny", 1)
    api, made = _stand_in_graphs(monkeypatch)
    torch._dynamo.reset()
    fast = torch.compile(m.autoregressive_infer_cfg, backend="toprovar",
                         options={"mode": "observe", "inductor": False, "cuda_graph_lend_outputs": True})
    for _ in range(3):
        _, got = call(fast)
    session = last_session()
    assert session.graph_pool().lending and session.gen.entropy
    lent = set(session.graph_pool().lent)
    first = min(session.gen.entropy)
    assert session.gen.entropy[first].data_ptr() not in lent  # the copy
    assert any(e.data_ptr() in lent for e in session.gen.entropy.values())  # the others: lent, no clone
    busy = _busy(made)
    for _ in range(2):
        _, got = call(fast)
    assert _busy(made) == busy == 0, session.graph_pool().busy_by
    rep = toprovar_fx.last_generation()
    assert rep.graph_replays > 0 and rep.graph_calls_without_replay == 0


def test_graphs_downstream_of_each_text_length_replay_on_their_own_captures(monkeypatch):
    """Prompts of three text lengths in turn, lending: the graphs upstream are captured per length
    (the text is in their shapes), the graphs after them per scale only, so each length hands them
    its own lent outputs. Each gets a sibling capture per lender (``CudaGraphCache._run_moved``):
    no call runs without replay, and the logits are eager's."""
    m = model("infinity-tiny")
    api, made = _stand_in_graphs(monkeypatch)
    torch._dynamo.reset()
    fast = torch.compile(m.autoregressive_infer_cfg, backend="toprovar",
                         options={"mode": "observe", "inductor": False, "cuda_graph_lend_outputs": True,
                                  "context_bucket": 0})  # a block graph per length: their own lenders
    conds = [m.encode_prompts([p]) for p in ("a cat", "two blue squares on a red mat today", "a red cat on a mat")]
    assert len({c[0].shape[0] for c in conds}) == 3
    for k in range(6):  # compiles (one recompile with a symbolic length), lending from the fourth on
        fast(conds[k % 3], B=1, g_seed=7, cfg_list=3.0)
    got = [fast(c, B=1, g_seed=7, cfg_list=3.0, return_logits=True)[1] for c in conds]
    pool = last_session().graph_pool()
    assert pool.lending and pool.busy_by == {}
    assert any(e.siblings for c in made for e in c.graphs.values() if e is not None)
    for c, logits in zip(conds, got):
        want = m.autoregressive_infer_cfg(c, B=1, g_seed=7, cfg_list=3.0, return_logits=True)[1]
        assert max_rel_diff(list(logits), list(want)) < 1e-5


def _warmed_on_three_text_lengths(monkeypatch, options: dict):
    """infinity-tiny compiled with ``options`` (no Inductor) over the stand-in graph API, after two
    rounds of prompts of 2, 8 and 6 tokens (Dynamo's recompile with a symbolic length, lending):
    the model, the compiled sampler, the API, whose ``captures`` count what comes next, and the
    ``CudaGraphCache`` list."""
    m = model("infinity-tiny")
    api, made = _stand_in_graphs(monkeypatch)
    torch._dynamo.reset()
    fast = torch.compile(m.autoregressive_infer_cfg, backend="toprovar", options={**options, "inductor": False})
    for p in ("a cat", "two blue squares on a red mat today", "a red cat on a mat") * 2:
        fast(m.encode_prompts([p]), B=1, g_seed=7, cfg_list=3.0)
    return m, fast, api, made


def _captured_outside_planned_blocks(made: list[CudaGraphCache]) -> int:
    """Graphs held by the caches that are not planned blocks' (whose graphs are per kept count)."""
    return sum(e is not None for c in made if not c.name.startswith("planned block") for e in c.graphs.values())


def test_a_padded_context_lets_a_new_text_length_replay_the_captured_block_graphs(monkeypatch):
    """``context_bucket``: texts of new lengths in a bucket seen before capture only the graphs that
    see the packed text itself (the sampler's first, the context's refill), not the block graphs
    (36 captures per new length on infinity-tiny without it); the logits stay eager's."""
    m, fast, api, _ = _warmed_on_three_text_lengths(monkeypatch, {"mode": "observe", "context_bucket": 8})
    for p in ("one two three", "one two three four five"):  # new lengths, the bucket of 8 seen before
        cond = m.encode_prompts([p])
        before = api.captures
        _, got = fast(cond, B=1, g_seed=7, cfg_list=3.0, return_logits=True)
        assert api.captures - before <= 2
        want = m.autoregressive_infer_cfg(cond, B=1, g_seed=7, cfg_list=3.0, return_logits=True)[1]
        assert max_rel_diff(list(got), list(want)) < 1e-5


def test_when_pruning_texts_of_one_bucket_share_the_block_graphs_and_planned_blocks_follow_each_kept_count(
        monkeypatch):
    """Prune mode pads the text to buckets of 16 tokens by default: new lengths in the bucket seen
    before capture a handful of graphs outside the planned blocks (each block's context refill, the
    sampler's first), and only a length in a new bucket captures the block graphs again (26 outside
    the planned blocks at every new length on infinity-tiny with ``context_bucket: 0``).

    A planned block that ranks the entropy itself (``select_entropy``) takes no input of the kept
    count's size, so its graphs are per kept count (``BlockPlan.signature``). The entropy gate gives
    these prompts other counts than the warm-up's: before, the graph captured for one count replayed
    for the next (on a GPU it kept the captured count; the stand-in's replay fails on the shape).
    Strict mode, so a planned block that fails fails the test; the logits are the plain path's."""
    m = model("infinity-tiny")
    prompts = [" ".join(["word"] * n) for n in (3, 5, 17)]  # the bucket of 16 seen before, twice; then 32
    torch._dynamo.reset()
    plain = torch.compile(m.autoregressive_infer_cfg, backend="toprovar", options={"policy": "infinity-tiny"})
    want, kept = [], []
    for p in ("a cat", *prompts):
        want.append(plain(m.encode_prompts([p]), B=1, g_seed=7, cfg_list=3.0, return_logits=True)[1])
        kept.append([[lay.kept_tokens for lay in sc.layers] for sc in toprovar_fx.last_generation().scales])
    assert len({repr(k) for k in kept}) > 1  # the prompts' kept counts differ somewhere
    _, fast, api, made = _warmed_on_three_text_lengths(monkeypatch, {"policy": "infinity-tiny", "strict": True})
    captures, outside_planned = [], []
    for p, logits in zip(prompts, want[1:]):
        before, before_outside = api.captures, _captured_outside_planned_blocks(made)
        _, got = fast(m.encode_prompts([p]), B=1, g_seed=7, cfg_list=3.0, return_logits=True)
        captures.append(api.captures - before)
        outside_planned.append(_captured_outside_planned_blocks(made) - before_outside)
        assert max_rel_diff(list(got), list(logits)) < 1e-5
    assert last_session().planned_calls > 0
    assert max(outside_planned[:2]) <= 2 * m.depth < 6 * m.depth <= captures[2], (captures, outside_planned)


def _compiled_var_tiny(**options):
    """The var-tiny sampler call and a fresh toprovar compile of it with its policy and ``options``."""
    m = model("var-tiny")
    torch._dynamo.reset()
    fast = torch.compile(m.autoregressive_infer_cfg, backend="toprovar", options={"policy": "var-tiny", **options})
    return sampler_call("var-tiny", 1), fast


def test_a_failing_planned_block_hands_over_to_the_dispatcher(monkeypatch):
    """Nothing is ticked or recorded before a planned call succeeds, so the dispatcher can take over."""
    from toprovar_fx.runtime.decisions import Decider

    call, fast = _compiled_var_tiny(planned_blocks=False)
    call(fast)
    _, ref = call(fast)
    ref_rep = toprovar_fx.last_generation()

    def broken(self, spec, branch, inputs):
        raise RuntimeError("boom")

    monkeypatch.setattr(Decider, "_run_planned", broken)
    _, fast = _compiled_var_tiny(planned_blocks=True)
    with pytest.warns(RuntimeWarning, match="a planned block failed"):
        call(fast)
    _, got = call(fast)
    rep = toprovar_fx.last_generation()
    assert last_session().planned_calls == 0
    assert (rep.start_scale, rep.flop_ratio) == (ref_rep.start_scale, ref_rep.flop_ratio)
    assert max_rel_diff(got, ref) <= 1e-5


def test_blocks_split_over_graphs_switch_without_changing_anything(monkeypatch):
    """A block Dynamo splits in two (as the official Infinity's RoPE helper does): the FFN
    fragment holds no self-attention; its dense stand-in still keeps logits and FLOPs exact."""
    from toprovar_fx.zoo.var import AdaLNSelfAttnBlock

    def split_forward(self, x, cond_BD):
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss + cond_BD).unbind(2)
        x = x + self.attn_branch(x, scale1, shift1, gamma1)
        torch._dynamo.graph_break()
        return x + self.ffn_branch(x, scale2, shift2, gamma2)

    monkeypatch.setattr(AdaLNSelfAttnBlock, "forward", split_forward)
    m = model("var-tiny")
    call = sampler_call("var-tiny", 1)
    results = {}
    for switch in (True, False):
        torch._dynamo.reset()
        if not switch:
            monkeypatch.setattr(Session, "dense_ahead", lambda self, *args: False)
        fast = torch.compile(m.autoregressive_infer_cfg, backend="toprovar", options={"policy": "var-tiny"})
        call(fast)
        _, logits = call(fast)
        rep = toprovar_fx.last_generation()
        results[switch] = (logits, rep.start_scale, rep.flop_ratio, [[lay.action for lay in s.layers]
                                                                     for s in rep.scales])
    (a, *rest_a), (b, *rest_b) = results[True], results[False]
    assert rest_a[1] < 1.0 and rest_a == rest_b
    assert max_rel_diff(a, b) <= 1e-5


def test_no_compile_context_outlives_its_compile():
    """What the backend keeps after compiling (runners, planned-block wrappers) must not reach a
    ``PassContext``: it holds the compile's example inputs, real tensors of the first generation
    (K/V caches), which would stay allocated for good and, once lent outputs are among them, block
    their CUDA graphs."""
    import gc

    from toprovar_fx.passes.context import PassContext

    call, fast = _compiled_var_tiny(planned_blocks=True)
    call(fast)
    assert last_session().graphs > 0
    gc.collect()
    assert not [o for o in gc.get_objects() if type(o) is PassContext]


@pytest.mark.parametrize("name,chain", [("var-tiny", ["self_attn", "ffn"]),
                                        ("infinity-tiny", ["self_attn", "cross_attn", "ffn"])])
def test_planned_blocks_hand_kept_tokens_on_between_pruned_branches(monkeypatch, name, chain):
    """In a planned block whose branches all prune the same kept tokens, each branch after the
    first takes the previous one's kept tokens (no scatter, no gather between them) and the block
    writes them back once: the same logits, bit for bit, with one gather and one write-back per
    block instead of one of each per branch."""
    import toprovar_fx.passes.insert_branch_dispatch as ibd
    from toprovar_fx.runtime import decisions, token_ops

    calls: dict[str, int] = {}

    def counted(fn):
        def wrapper(*args, **kwargs):
            calls[fn.__name__] = calls.get(fn.__name__, 0) + 1
            return fn(*args, **kwargs)
        return wrapper

    for fn in (token_ops.gather_tokens, token_ops.restore_identity, token_ops.restore_kept):
        monkeypatch.setattr(decisions, fn.__name__, counted(fn))
    m = model(name)
    call = sampler_call(name, 1)
    results = {}
    for chains in (True, False):
        if not chains:
            monkeypatch.setattr(ibd, "_mark_chains", lambda gm, session: 0)
        torch._dynamo.reset()
        fast = torch.compile(m.autoregressive_infer_cfg, backend="toprovar", options={"policy": name})
        call(fast)
        calls.clear()
        _, logits = call(fast)
        marked = [b.kind for b in last_session().branches if b.hidden_from_previous]
        results[chains] = logits, dict(calls), marked, toprovar_fx.last_generation().planned_blocks
    (a, calls_on, marked_on, planned_on), (b, calls_off, marked_off, planned_off) = results[True], results[False]
    assert marked_on[: len(chain) - 1] == chain[1:] and marked_off == []  # every branch after a block's first
    assert planned_on == planned_off > 0
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    pruned_branches = calls_off["restore_identity"]
    blocks = calls_on["restore_kept"]
    assert blocks > 0 and "restore_identity" not in calls_on and pruned_branches == len(chain) * blocks
    assert calls_off["gather_tokens"] - calls_on["gather_tokens"] == pruned_branches - blocks


def test_hoisted_context_is_computed_again_by_a_replay_into_the_same_buffers():
    from toprovar_fx.runtime.context_memo import ContextMemo

    api = _FakeGraphAPI()
    caches = []

    def capture(fill):
        caches.append(CudaGraphCache(fill, static=[False, True], max_bytes=1 << 20, api=api, device_type="cpu"))
        return caches[-1]

    def pre(text, w):
        kv = text @ w
        return kv, kv.sum(0)

    memo = ContextMemo(pre, [False, True], capture=capture)
    w = torch.randn(4, 3)
    texts = [torch.randn(2, 4) for _ in range(3)]
    first = memo([texts[0], w])
    addresses = [v.data_ptr() for v in first]
    assert api.captures == 0  # the first text: computed directly, into new buffers
    for i, text in enumerate(texts[1:], start=1):
        got = memo([text, w])
        torch.testing.assert_close(got[0], text @ w)
        torch.testing.assert_close(got[1], (text @ w).sum(0))
        assert [v.data_ptr() for v in got] == addresses
        assert api.captures == 1 and caches[0].replays == i  # captured once, then replayed
    assert memo.computes == 3
    memo([texts[2], w])
    assert memo.computes == 3 and caches[0].replays == 2  # unchanged text: nothing run
