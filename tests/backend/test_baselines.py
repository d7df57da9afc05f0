"""The peers reproduced as policies run through the same backend (tiny models, mechanics only)."""

import math

import pytest
import torch

import toprovar_fx

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


@pytest.mark.parametrize("preset", ["quality", "balanced", "fast"])
def test_toprovar_presets_run(preset):
    m = model("var-tiny")
    fast = torch.compile(m.autoregressive_infer_cfg, backend="toprovar",
                         options={"policy": "var-tiny", "preset": preset, "strict": True})
    sampler_call("var-tiny", 1)(fast)
    rep = toprovar_fx.last_generation()
    assert rep.fallbacks == [] and rep.start_scale is not None
    assert rep.flops_executed < rep.flops_dense
