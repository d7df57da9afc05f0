"""SkipVAR's CFG shortcut: from a scale on, the unconditional rows reuse the conditional ones."""

import pytest
import torch

import toprovar_fx
from toprovar_fx.policies import load_policy
from toprovar_fx.runtime.session import last_session
from toprovar_fx.zoo.var import AdaLNSelfAttnBlock

from .helpers import generate_twice, max_rel_diff, model, sampler_call


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


# var-tiny's "fast" also checks that its accumulation is gated under dynamic=True (the added
# token map's size is read from the accumulator: a size, not a value, dependency)
@pytest.mark.parametrize("name,preset", [("infinity-tiny-skipvar", "fast"), ("infinity-tiny-skipvar", None),
                                         ("var-tiny-skipvar", "fast"), ("var-tiny-skipvar", "quality")])
def test_cond_only_blocks_run_planned_and_change_nothing(monkeypatch, name, preset):
    """A kept block of a cond-only scale runs as a planned block (``cond`` plans: one call, so one
    CUDA-graph replay on a GPU, instead of three dispatches with eager glue: SkipVAR's cond-only
    40x40 launched 1,567 kernels on the H200), with the dispatcher's results and report."""
    from toprovar_fx.lowering import runners

    cond_plans: list[tuple[int, int]] = []
    apply = runners.apply_plan_effects

    def recording(decider, plan, *args):
        if plan.cond_only:
            cond_plans.append((plan.scale, plan.layer))
        return apply(decider, plan, *args)

    monkeypatch.setattr(runners, "apply_plan_effects", recording)
    family = name.removesuffix("-skipvar")
    results = {}
    for planned in (False, True):
        opts = {"policy": name, "strict": True, "planned_blocks": planned} | ({"preset": preset} if preset else {})
        logits, before = generate_twice(family, opts, on_warm=cond_plans.clear, dynamic=True)
        rep = toprovar_fx.last_generation()
        assert rep.fallbacks == []
        results[planned] = (logits, last_session().planned_calls - before,
                            [(s.skipped, s.flops_executed, s.flops_dense) for s in rep.scales],
                            sorted(last_session().gen.entropy))
    (a, runs_off, *rest_off), (b, runs_on, *rest_on) = results[False], results[True]
    reuse = load_policy(name, preset=preset).resolved(last_session().clock.candidates[0]).reuse_cond_from
    cond_scales = [i for i, (skipped, done, dense) in enumerate(rest_on[0]) if not skipped and done < dense]
    assert cond_scales and cond_scales[0] == reuse  # half the rows ran there
    depth = last_session().clock.depth
    assert runs_off == 0 and runs_on > 0
    # every block of the cond-only scales ran planned, but maybe each scale's first (the dispatcher
    # may take that scale's decision there)
    assert {s for s, _ in cond_plans} == set(cond_scales)
    assert {(s, layer) for s in cond_scales for layer in range(1, depth)} <= set(cond_plans)
    assert rest_on == rest_off
    assert max_rel_diff(b, a) <= 1e-5
