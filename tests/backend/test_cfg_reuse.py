"""SkipVAR's CFG shortcut: from a scale on, the unconditional rows reuse the conditional ones."""

import pytest
import torch

import toprovar_fx
from toprovar_fx.policies import load_policy
from toprovar_fx.zoo.var import AdaLNSelfAttnBlock

from .helpers import max_rel_diff, model, sampler_call


def test_reuse_cond_matches_a_hand_written_reference(monkeypatch):
    m = model("var-tiny")
    call = sampler_call("var-tiny", 1)
    _, dense = call(m.autoregressive_infer_cfg)
    tokens = [t.shape[1] for t in dense]
    start = len(tokens) - 2  # 0-based: the last two scales reuse the cond branch
    d = load_policy("var-tiny-keepall").to_dict()
    d["name"] = "reuse"
    d["cfg"] = {"reuse_cond_from": -2}
    # the batch dimension must be symbolic for the cond half to run alone
    fast = torch.compile(m.autoregressive_infer_cfg, backend="toprovar", options={"policy": d, "strict": True},
                         dynamic=True)
    _, got = call(fast)
    rep = toprovar_fx.last_generation()
    assert rep.fallbacks == []
    for s in rep.scales:
        ratio = s.flops_executed / s.flops_dense
        assert ratio == (0.5 if s.index >= start else 1.0)
    torch._dynamo.reset()

    # reference: every block at those scales runs on the cond rows; uncond rows get a copy
    original = AdaLNSelfAttnBlock.forward

    def cond_only(self, x, cond_BD):
        if x.shape[1] < tokens[start]:
            return original(self, x, cond_BD)
        b = x.shape[0] // 2
        attn = self.attn
        attn.cached_k, attn.cached_v = attn.cached_k[:b], attn.cached_v[:b]
        out = original(self, x[:b], cond_BD[:b])
        attn.cached_k = torch.cat((attn.cached_k, attn.cached_k))
        attn.cached_v = torch.cat((attn.cached_v, attn.cached_v))
        return torch.cat((out, out))

    monkeypatch.setattr(AdaLNSelfAttnBlock, "forward", cond_only)
    _, want = call(m.autoregressive_infer_cfg)
    assert max_rel_diff(want, dense) > 1e-3
    assert max_rel_diff(got, want) <= 1e-5


def test_reuse_cond_with_a_specialised_batch_warns_and_runs_both_halves():
    m = model("var-tiny")
    call = sampler_call("var-tiny", 1)
    _, dense = call(m.autoregressive_infer_cfg)
    d = load_policy("var-tiny-keepall").to_dict()
    d["name"] = "reuse"
    d["cfg"] = {"reuse_cond_from": -2}
    fast = torch.compile(m.autoregressive_infer_cfg, backend="toprovar", options={"policy": d})
    with pytest.warns(RuntimeWarning, match="dynamic=True"):
        _, got = call(fast)
    assert max_rel_diff(got, dense) <= 1e-5
