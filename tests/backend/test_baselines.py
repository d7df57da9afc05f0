"""The peers reproduced as policies run through the same backend (tiny models, mechanics only)."""

import math

import pytest
import torch

import toprovar_fx
from toprovar_fx.policies import load_policy

from .helpers import model, sampler_call


@pytest.mark.parametrize("name", ["var-tiny", "infinity-tiny"])
def test_fastvar_released_policy(name):
    m = model(name)
    call = sampler_call(name, 1)
    fast = torch.compile(m.autoregressive_infer_cfg, backend="toprovar",
                         options={"policy": f"{name}-fastvar-released", "strict": True})
    call(fast)
    rep = toprovar_fx.last_generation()
    n = len(rep.scales)
    assert [s.skipped for s in rep.scales] == [False] * (n - 2) + [True, True]
    for s, ratio in ((n - 4, 0.4), (n - 3, 0.5)):
        scale = rep.scales[s]
        kept = scale.tokens - math.floor(ratio * scale.tokens)
        for layer in scale.layers:
            if 1 <= layer.index <= 2:  # the policy keeps the first and last block dense
                assert layer.action == "prune_tokens" and layer.kept_tokens == kept, (s, layer)
    assert rep.flops_executed < rep.flops_dense


@pytest.mark.parametrize("preset", ["quality", "balanced", "fast", "fastest"])
def test_toprovar_presets_run(preset):
    m = model("var-tiny")
    fast = torch.compile(m.autoregressive_infer_cfg, backend="toprovar",
                         options={"policy": "var-tiny", "preset": preset, "strict": True})
    sampler_call("var-tiny", 1)(fast)
    rep = toprovar_fx.last_generation()
    assert rep.fallbacks == [] and rep.start_scale is not None
    assert rep.flops_executed < rep.flops_dense


@pytest.mark.parametrize("name", ["var-tiny", "infinity-tiny"])
def test_fastest_preset_skips_the_last_two_scales_and_prunes_the_one_before(name):
    m = model(name)
    fast = torch.compile(m.autoregressive_infer_cfg, backend="toprovar",
                         options={"policy": name, "preset": "fastest", "strict": True})
    sampler_call(name, 1)(fast)
    rep = toprovar_fx.last_generation()
    n = len(rep.scales)
    assert rep.fallbacks == [] and rep.start_scale == n - 3
    assert [s.skipped for s in rep.scales] == [False] * (n - 2) + [True, True]
    for s in rep.scales[:n - 3]:
        assert all(layer.action == "keep" for layer in s.layers), s.index
    last = rep.scales[n - 3]
    assert last.layers[0].action == "keep"  # measure_layer 0: the gate waits for its entropy
    pruned = [layer for layer in last.layers if layer.action == "prune_tokens"]
    assert pruned and all(layer.kept_tokens < last.tokens for layer in pruned)


def test_a_fixed_start_with_random_selection_takes_its_kept_counts_from_the_gate():
    """The gate's k needs the measured entropy even when neither D nor the selection does."""
    fixed = {"scale": {"criterion": "fixed", "min_start_scale": -2, "max_start_scale": -2},
             "layer": {"mode": "off"}}
    reports = {}
    for sel in ("entropy", "random"):
        torch._dynamo.reset()
        pol = load_policy("var-tiny").derive(f"var-tiny-fixed-{sel}", {**fixed, "token": {"selection": sel}})
        fast = torch.compile(model("var-tiny").autoregressive_infer_cfg, backend="toprovar",
                             options={"policy": pol, "strict": True})
        sampler_call("var-tiny", 1)(fast)
        reports[sel] = toprovar_fx.last_generation()
    d = len(reports["entropy"].scales) - 2
    kept = {sel: [(layer.action, layer.kept_tokens) for layer in rep.scales[d].layers] for sel, rep in reports.items()}
    assert kept["random"] == kept["entropy"]
    assert any(action == "prune_tokens" and k < reports["random"].scales[d].tokens for action, k in kept["random"])
