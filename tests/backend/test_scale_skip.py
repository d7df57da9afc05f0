"""Whole-scale skipping: the transformer work of a skipped scale is gone and its tokens never
reach the image; where the accumulation is not in a compiled graph, the scale runs (one warning)."""

import pytest
import torch

import toprovar_fx
from toprovar_fx.policies import load_policy

from .helpers import max_rel_diff, model, sampler_call


def _skip_policy(name: str) -> dict:
    d = load_policy(f"{name}-keepall").to_dict()
    d["name"] = "skip-last-two"
    d["skip_scales"] = [-2, -1]
    d["scale"].update({"mode": "prune_from_D", "criterion": "fixed", "min_start_scale": -3})
    return d


def test_skipped_scales_add_nothing_to_the_image(monkeypatch):
    m = model("var-tiny")
    call = sampler_call("var-tiny", 1)
    fast = torch.compile(m.autoregressive_infer_cfg, backend="toprovar",
                         options={"policy": _skip_policy("var-tiny"), "strict": True})
    img_fast, logits_fast = call(fast)
    rep = toprovar_fx.last_generation()
    n = len(logits_fast)
    assert [s.skipped for s in rep.scales] == [False] * (n - 2) + [True, True]
    assert all(layer.action == "skip" for s in rep.scales[-2:] for layer in s.layers)
    assert sum(s.flops_executed for s in rep.scales[-2:]) == 0
    torch._dynamo.reset()

    # hand-written reference: the same sampler whose accumulation ignores the last two scales
    quant = m.vae.quantize
    original = quant.next_autoregressive_input

    def skip_last_two(si, schedule, f_hat, h_BChw):
        if si >= len(schedule) - 2:
            h_BChw = torch.zeros_like(h_BChw)
        return original(si, schedule, f_hat, h_BChw)

    monkeypatch.setattr(quant, "next_autoregressive_input", skip_last_two)
    img_ref, logits_ref = call(m.autoregressive_infer_cfg)
    assert max_rel_diff(logits_fast[: n - 2], logits_ref[: n - 2]) <= 1e-5
    torch.testing.assert_close(img_fast, img_ref, rtol=1e-5, atol=1e-5)


def test_infinity_scales_are_skipped_too():
    m = model("infinity-tiny")
    fast = torch.compile(m.autoregressive_infer_cfg, backend="toprovar",
                         options={"policy": _skip_policy("infinity-tiny"), "strict": True})
    sampler_call("infinity-tiny", 1)(fast)
    assert [s.skipped for s in toprovar_fx.last_generation().scales][-3:] == [False, True, True]


def test_skip_is_refused_where_accumulation_is_not_compiled(monkeypatch):
    m = model("infinity-tiny")
    call = sampler_call("infinity-tiny", 1)
    _, ref = call(m.autoregressive_infer_cfg)
    # as in samplers that accumulate inline in a loop Dynamo skips: the add is never compiled
    monkeypatch.setattr(m, "next_scale_input", torch._dynamo.disable(m.next_scale_input))
    fast = torch.compile(m.autoregressive_infer_cfg, backend="toprovar",
                         options={"policy": _skip_policy("infinity-tiny")})
    with pytest.warns(RuntimeWarning, match="cannot be skipped; it runs"):
        _, got = call(fast)
    assert max_rel_diff(got, ref) <= 1e-5
    assert not any(s.skipped for s in toprovar_fx.last_generation().scales)
