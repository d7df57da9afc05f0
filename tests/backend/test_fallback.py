"""A policy that does not fit falls back to dense with one warning, or raises when strict."""

import pytest
import torch

import toprovar_fx
from toprovar_fx.policies import load_policy

from .helpers import max_rel_diff, model, sampler_call


def _policy_with(name: str, **changes):
    d = load_policy(name).to_dict()
    for key, value in changes.items():
        d[key] = value
    return d


def test_schedule_mismatch_warns_once_and_runs_dense():
    m = model("var-tiny")
    call = sampler_call("var-tiny", 1)
    _, ref = call(m.autoregressive_infer_cfg)
    policy = _policy_with("var-tiny", schedules={"other": [[p, p] for p in (1, 3, 4, 5, 6, 7, 8, 10, 13, 16)]})
    fast = torch.compile(m.autoregressive_infer_cfg, backend="toprovar", options={"policy": policy})
    with pytest.warns(RuntimeWarning, match="match no schedule of the policy") as rec:
        _, got = call(fast)
    assert sum("match no schedule" in str(w.message) for w in rec) == 1
    assert max_rel_diff(got, ref) <= 1e-5
    rep = toprovar_fx.last_generation()
    assert rep.start_scale is None and rep.flops_executed == rep.flops_dense
    assert any("observed token counts per scale [1, 4" in f for f in rep.fallbacks)


def test_schedule_mismatch_raises_when_strict():
    m = model("var-tiny")
    policy = _policy_with("var-tiny", schedules={"other": [[p, p] for p in (1, 3, 4, 5, 6, 7, 8, 10, 13, 16)]})
    fast = torch.compile(m.autoregressive_infer_cfg, backend="toprovar", options={"policy": policy, "strict": True})
    with pytest.raises(Exception, match="match no schedule"):
        sampler_call("var-tiny", 1)(fast)


def test_fingerprint_mismatch_runs_dense():
    m = model("var-tiny")
    call = sampler_call("var-tiny", 1)
    _, ref = call(m.autoregressive_infer_cfg)
    policy = _policy_with("var-tiny", model={"family": "var", "depth": 16, "width": 1024, "heads": 16,
                                             "num_scales": 10})
    fast = torch.compile(m.autoregressive_infer_cfg, backend="toprovar", options={"policy": policy})
    with pytest.warns(RuntimeWarning, match="model.depth: expected 16, observed 4"):
        _, got = call(fast)
    assert max_rel_diff(got, ref) <= 1e-5
    assert toprovar_fx.last_generation().start_scale is None


def test_broken_yaml_falls_back_to_dense(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nname: [unclosed\n")
    m = model("var-tiny")
    call = sampler_call("var-tiny", 1)
    _, ref = call(m.autoregressive_infer_cfg)
    fast = torch.compile(m.autoregressive_infer_cfg, backend="toprovar", options={"policy": str(bad)})
    with pytest.warns(RuntimeWarning, match="bad.yaml.*running dense"):
        _, got = call(fast)
    assert max_rel_diff(got, ref) <= 1e-5
    rep = toprovar_fx.last_generation()
    assert rep.mode == "observe" and any("bad.yaml" in f for f in rep.fallbacks)
    fast_strict = torch.compile(m.autoregressive_infer_cfg, backend="toprovar",
                                options={"policy": str(bad), "strict": True})
    with pytest.raises(Exception, match="bad.yaml"):
        call(fast_strict)


def test_shipped_toprovar_policy_prunes_tiny_model():
    m = model("var-tiny")
    call = sampler_call("var-tiny", 1)
    _, ref = call(m.autoregressive_infer_cfg)
    fast = torch.compile(m.autoregressive_infer_cfg, backend="toprovar", options={"policy": "var-tiny"})
    _, got = call(fast)
    rep = toprovar_fx.last_generation()
    assert rep.fallbacks == []
    assert rep.start_scale is not None and rep.flops_executed < rep.flops_dense
    assert all(layer.layer_class in ("global", "detail") for layer in rep.scales[-1].layers)
    assert max_rel_diff(got[: rep.start_scale], ref[: rep.start_scale]) <= 1e-5


def test_dynamos_restart_signal_is_not_taken_for_a_failure(monkeypatch):
    """A graph whose lowering raises Dynamo's ``RestartAnalysis`` (Inductor's float-scalar pass does
    under ``dynamic=True``) is traced again by Dynamo and compiled by us on the second try; taken
    for a failure, it ran dense and its self-attentions never ticked the scale clock (on the H200,
    SkipVAR's policy then fell back: "observed token counts per scale [36] match no schedule")."""
    from torch._dynamo.exc import TensorifyScalarRestartAnalysis

    import toprovar_fx.backend as backend

    m = model("var-tiny")
    call = sampler_call("var-tiny", 1)
    results = []
    lower, raised = backend._lower_whole, []

    def restarting_once(work, ctx, max_bytes=None):
        if ctx.hoisted and not raised:  # a block graph (entropy outputs): its attention ticks the clock
            raised.append(ctx.graph_id)
            raise TensorifyScalarRestartAnalysis
        return lower(work, ctx, max_bytes)

    for restart in (False, True):
        if restart:
            monkeypatch.setattr(backend, "_lower_whole", restarting_once)
        torch._dynamo.reset()
        fast = torch.compile(m.autoregressive_infer_cfg, backend="toprovar", options={"policy": "var-tiny"})
        call(fast)
        compiled = toprovar_fx.last_generation().fallbacks  # the compile's fallbacks go to the first report
        _, logits = call(fast)
        rep = toprovar_fx.last_generation()
        results.append((logits, rep.start_scale, rep.flop_ratio, compiled + rep.fallbacks))
    (ref, *ref_rest), (got, *got_rest) = results
    assert raised and got_rest[2] == [] == ref_rest[2]
    assert got_rest == ref_rest and ref_rest[1] < 1.0  # the policy fit and pruned as without the restart
    assert max_rel_diff(got, ref) <= 1e-5
