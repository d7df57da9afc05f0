"""Lowering: Inductor-compiled branches, the dense/dispatcher switch, CUDA-graph guards."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

import toprovar_fx
from tests.backend.helpers import max_rel_diff, model, sampler_call
from toprovar_fx.lowering import runners
from toprovar_fx.lowering.cuda_graphs import CudaGraphCache, mutates_inputs
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


def test_dense_variant_runs_until_the_policy_can_act(monkeypatch):
    """Scales before the policy's first active scale run the dense variant, later ones partly the dispatcher."""
    used: list[tuple[str, int]] = []
    orig = runners.ScaleSwitchRunner.__call__

    def spy(self, *args):
        dense = self.session.dense_ahead(self.self_sites)
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


def test_inductor_branches_match_the_fx_path():
    m = model("var-tiny")
    call = sampler_call("var-tiny", 1)
    outs = {}
    for inductor in (False, True):
        torch._dynamo.reset()
        fast = torch.compile(m.autoregressive_infer_cfg, backend="toprovar",
                             options={"policy": "var-tiny", "inductor": inductor})
        call(fast)
        _, outs[inductor] = call(fast)
        compiled = list(last_session().compiled_branches.values())
        assert bool(compiled) == inductor
        assert all(c.compiled is not None for c in compiled)  # compiled at the first call, then reused
    assert max_rel_diff(outs[True], outs[False]) <= 1e-5


@pytest.mark.parametrize("name,preset", [("var-tiny", None), ("var-tiny", "fast"), ("infinity-tiny", None)])
def test_switching_to_the_dense_variant_changes_nothing(monkeypatch, name, preset):
    """Same logits, decisions and FLOP ratio with and without the dense variant."""
    m = model(name)
    call = sampler_call(name, 1)
    results = {}
    for switch in (True, False):
        torch._dynamo.reset()
        if not switch:
            monkeypatch.setattr(Session, "dense_ahead", lambda self, self_sites=1: False)
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
