"""Observe mode: attention rewritten to FAE, entropy recorded, outputs equal eager."""

import pytest
import torch

import toprovar_fx

from .helpers import max_rel_diff, model, sampler_call, uniform_sdpa

FAMILIES = ["var-tiny", "infinity-tiny", "hart-tiny"]


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("batch", [1, 2])
def test_observe_equals_eager_at_every_scale(name, batch):
    call = sampler_call(name, batch)
    m = model(name)
    _, ref = call(m.autoregressive_infer_cfg)
    fast = torch.compile(m.autoregressive_infer_cfg, backend="toprovar", options={"mode": "observe"})
    _, got = call(fast)
    assert max_rel_diff(got, ref) <= 1e-5
    rep = toprovar_fx.last_generation()
    fp = m.fingerprint()
    # every layer of every scale went through FAE: the sampler ran compiled at every scale
    assert rep.depth == fp["depth"]
    assert [s.tokens for s in rep.scales] == [t.shape[1] for t in ref]
    assert all(len(s.layers) == fp["depth"] for s in rep.scales)
    assert all(layer.mean_entropy is not None for s in rep.scales for layer in s.layers)
    assert rep.rows == 2 * batch  # CFG doubles the transformer batch
    assert rep.attention_rewrites > 0 and set(rep.attention_kinds) == {"sdpa"}
    assert rep.fallbacks == []
    # masked cross-attention stays SDPA, with the reason recorded
    reasons = {r["reason"] for r in rep.attention_skipped}
    assert reasons == ({"masked"} if name.startswith("infinity") else set())
    assert rep.flops_dense > 0 and rep.flops_executed == rep.flops_dense
    maps = toprovar_fx.entropy_maps()
    last = len(ref) - 1
    h, w = rep.scales[last].h, rep.scales[last].w
    assert maps[(last, 0)].shape == (h, w)


@pytest.mark.parametrize("name", FAMILIES)
def test_attention_moves_the_logits(name, monkeypatch):
    """Without this, observe-mode equality would prove nothing about the attention rewrite."""
    call = sampler_call(name, 1)
    m = model(name)
    _, ref = call(m.autoregressive_infer_cfg)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", uniform_sdpa)
    _, uni = call(m.autoregressive_infer_cfg)
    assert max_rel_diff(uni[1:], ref[1:]) > 1e-2


def test_second_generation_compiles_nothing():
    call = sampler_call("var-tiny", 1)
    m = model("var-tiny")
    fast = torch.compile(m.autoregressive_infer_cfg, backend="toprovar", options={"mode": "observe"})
    call(fast)
    first = toprovar_fx.last_generation()
    assert first.compiles > 0 and first.recompiles == 0 and first.compile_seconds > 0
    _, a = call(fast)
    second = toprovar_fx.last_generation()
    assert second.compiles == 0 and second.recompiles == 0
    _, b = call(fast)
    assert max_rel_diff(a, b) == 0.0


def test_entropy_is_exactly_recorded_per_layer():
    """Recorded entropy equals a float64 recomputation from the same attention inputs."""
    m = model("var-tiny")
    call = sampler_call("var-tiny", 1)
    fast = torch.compile(m.autoregressive_infer_cfg, backend="toprovar", options={"mode": "observe"})
    call(fast)
    maps = toprovar_fx.entropy_maps()
    rep = toprovar_fx.last_generation()
    for s in rep.scales:
        for layer in s.layers:
            ent = maps[(s.index, layer.index)]
            assert torch.all(ent >= -1e-5)
            # at most log of the keys seen so far: the cumulative token count
            lk = sum(t.tokens for t in rep.scales[: s.index + 1])
            assert float(ent.max()) <= torch.log(torch.tensor(float(lk))) + 1e-4


def test_compiling_the_module_whose_forward_samples():
    """Infinity's ``forward(..., cfg_infer=True)`` is the sampler: ``torch.compile(model)`` works too."""
    m = model("infinity-tiny")
    cond = m.encode_prompts(["a red cat on a mat"])
    _, ref = m(cond, B=1, g_seed=7, cfg_list=3.0, cfg_infer=True, return_logits=True)
    fast = torch.compile(m, backend="toprovar", options={"policy": "infinity-tiny-keepall"})
    _, got = fast(cond, B=1, g_seed=7, cfg_list=3.0, cfg_infer=True, return_logits=True)
    assert max_rel_diff(got, ref) <= 1e-5
    rep = toprovar_fx.last_generation()
    assert rep.fallbacks == [] and rep.depth == m.fingerprint()["depth"]
