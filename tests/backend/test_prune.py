"""Prune mode: keep-all equals dense; fixed decisions equal the zoo's reference pruning path."""

import pytest
import torch

import toprovar_fx
from toprovar_fx.runtime.session import last_session
from toprovar_fx.zoo.reference_pruning import BlockDecision, RefPruning

from .helpers import max_rel_diff, model, sampler_call


@pytest.mark.parametrize("name", ["var-tiny", "infinity-tiny"])
def test_keepall_policy_equals_dense(name):
    call = sampler_call(name, 1)
    m = model(name)
    _, ref = call(m.autoregressive_infer_cfg)
    fast = torch.compile(m.autoregressive_infer_cfg, backend="toprovar", options={"policy": f"{name}-keepall"})
    _, got = call(fast)
    assert max_rel_diff(got, ref) <= 1e-5
    rep = toprovar_fx.last_generation()
    assert rep.mode == "prune" and rep.fallbacks == []
    assert rep.flops_executed == rep.flops_dense


def _fixed_decisions(name: str, tokens: list[int], rows: int, depth: int, kinds: tuple[str, ...]):
    """Skip one layer and prune tokens (random sorted indices) in others at the last two scales."""
    g = torch.Generator().manual_seed(3)
    decisions = {}
    last = len(tokens) - 1
    for s in (last - 1, last):
        n = tokens[s]
        decisions[(s, 1)] = BlockDecision("skip")
        for layer in range(2, depth):
            k = n // 2 + layer
            idx = torch.stack([torch.randperm(n, generator=g)[:k].sort().values for _ in range(rows)])
            decisions[(s, layer)] = BlockDecision("prune_tokens", {kind: idx for kind in kinds})
    return decisions


@pytest.mark.parametrize("restore", ["identity", "cached_scale"])
@pytest.mark.parametrize("name", ["var-tiny", "infinity-tiny"])
def test_fixed_decisions_match_reference_pruning_path(name, restore):
    m = model(name)
    fp = m.fingerprint()
    call = sampler_call(name, 1)
    _, dense = call(m.autoregressive_infer_cfg)
    tokens = [t.shape[1] for t in dense]
    kinds = ("self_attn", "cross_attn", "ffn") if name.startswith("infinity") else ("self_attn", "ffn")
    decisions = _fixed_decisions(name, tokens, rows=2, depth=fp["depth"], kinds=kinds)
    cached = len(tokens) - 3
    oracle = RefPruning(decisions, restore=restore, cached_scale=cached if restore == "cached_scale" else None)
    _, want = sampler_call(name, 1, ref_pruning=oracle)(m.autoregressive_infer_cfg)
    assert max_rel_diff(want, dense) > 1e-3  # the decisions matter

    policy = {"restore": {"mode": restore, "cached_scale": cached + 1}} if restore == "cached_scale" else {}
    from toprovar_fx.policies import load_policy

    base = load_policy(f"{name}-keepall").to_dict()
    base.update(policy)
    base["name"] = "fixed"
    fast = torch.compile(m.autoregressive_infer_cfg, backend="toprovar", options={"policy": base, "strict": True})
    call(fast)  # warm-up: compiles every scale
    last_session().decider.override = decisions
    _, got = call(fast)
    assert max_rel_diff(got, want) <= 1e-4
    rep = toprovar_fx.last_generation()
    s = len(tokens) - 1
    layers = {layer.index: layer for layer in rep.scales[s].layers}
    assert layers[1].action == "skip"
    assert layers[2].action == "prune_tokens" and layers[2].kept_tokens == tokens[s] // 2 + 2
    assert rep.flops_executed < rep.flops_dense


def test_flop_ratio_agrees_with_an_independent_count():
    """Executed/dense FLOPs from the report equal a count from the kept tokens alone."""
    name = "var-tiny"
    m = model(name)
    fp = m.fingerprint()
    call = sampler_call(name, 1)
    fast = torch.compile(m.autoregressive_infer_cfg, backend="toprovar", options={"policy": "var-tiny-keepall"})
    _, dense = call(fast)
    tokens = [t.shape[1] for t in dense]
    decisions = _fixed_decisions(name, tokens, rows=2, depth=fp["depth"], kinds=("self_attn", "ffn"))
    last_session().decider.override = decisions
    call(fast)
    rep = toprovar_fx.last_generation()
    c, heads = fp["width"], fp["heads"]
    lin = 2.0 * (c * 3 * c + c * c) + 2.0 * (c * 4 * c + 4 * c * c)  # qkv + proj, fc1 + fc2 (mlp ratio 4)
    pair = 4.0 * c  # 4 * heads * head_dim

    def count(kept_of):
        total = 0.0
        for layer in range(fp["depth"]):
            kv = 0
            for s, n in enumerate(tokens):
                run = kept_of(s, layer, n)
                if run is None:  # skipped: no FLOPs, nothing appended to the cache
                    continue
                kv += run
                total += 2 * (run * lin + pair * run * kv)
        return total

    def executed(s, layer, n):
        d = decisions.get((s, layer))
        if d is None:
            return n
        return None if d.action == "skip" else d.kept_idx["self_attn"].shape[1]

    dense_count = count(lambda s, layer, n: n)
    assert heads * (c // heads) == c
    assert rep.flops_dense == pytest.approx(dense_count, rel=1e-9)
    assert rep.flops_executed == pytest.approx(count(executed), rel=1e-9)


@pytest.mark.parametrize("name", ["var-tiny", "infinity-tiny"])
def test_blocks_run_dense_are_accounted_as_the_dispatcher_accounts_them(name):
    """The dense variant's blocks are accounted when the report asks (``Session.defer_kept``):
    per scale and layer the same FLOPs and actions as the dispatcher running every block."""
    m = model(name)
    call = sampler_call(name, 1)
    fast = torch.compile(m.autoregressive_infer_cfg, backend="toprovar", options={"policy": f"{name}-keepall"})
    call(fast)
    call(fast)
    session = last_session()
    assert session.gen.kept_blocks and not session.gen.flops  # deferred until a report asks
    deferred = toprovar_fx.last_generation()
    assert not session.gen.kept_blocks and session.gen.flops
    session.decider.override = {}  # every block through the dispatcher, every branch kept
    call(fast)
    dispatched = toprovar_fx.last_generation()

    def per_layer(rep):
        return [(s.index, s.flops_dense, s.flops_executed, [(lay.index, lay.action) for lay in s.layers])
                for s in rep.scales]

    assert per_layer(deferred) == per_layer(dispatched)
    assert deferred.flops_dense > 0 and deferred.flops_dense == dispatched.flops_dense


def test_entropy_decisions_are_per_image_and_shared_by_cfg_halves():
    """Batch 2 with CFG: rows are [cond0, cond1, uncond0, uncond1]; each image keeps its own
    tokens, its cond and uncond rows the same ones, every row the same count."""
    from toprovar_fx.runtime.session import last_session

    m = model("var-tiny")
    fast = torch.compile(m.autoregressive_infer_cfg, backend="toprovar", options={"policy": "var-tiny"})
    sampler_call("var-tiny", 2)(fast)
    kept = last_session().gen.kept_idx
    assert kept, "the policy pruned nothing"
    differs = False
    for idx in kept.values():
        assert idx.shape[0] == 4
        assert torch.equal(idx[0], idx[2]) and torch.equal(idx[1], idx[3])
        differs |= not torch.equal(idx[0], idx[1])
    assert differs  # two images, two entropy maps, different kept tokens somewhere


def test_batch_8_after_batch_1_prunes_like_batch_1_without_warnings_at_run_time():
    """After batch 1, Dynamo compiles batch 8 with symbolic rows; at the 4x4 scale its 16 rows and
    16 tokens get one symbol, so that graph cannot be routed. The scale is before the policy acts:
    the generations after the compile report no fallback, and the pruned scales keep what they
    keep at batch 1."""
    from toprovar_fx.policies import load_policy

    m = model("infinity-tiny")
    pol = load_policy("infinity-tiny")
    frozen = {"global": [0, 1], "detail": list(range(2, pol.model.depth))}  # decisions that do not depend on the batch
    pol = pol.derive("infinity-tiny-frozen", {"scale": {"criterion": "fixed"}, "layer": {"mode": "frozen", "frozen": frozen}})
    torch._dynamo.reset()
    fast = torch.compile(m.autoregressive_infer_cfg, backend="toprovar", options={"policy": pol})
    sampler_call("infinity-tiny", 1)(fast)
    one = [s.flops_executed / s.flops_dense for s in toprovar_fx.last_generation().scales]
    for _ in range(2):
        sampler_call("infinity-tiny", 8)(fast)
    rep = toprovar_fx.last_generation()
    assert rep.rows == 16 and rep.compiles == 0 and rep.fallbacks == []
    assert min(one) < 1 and [s.flops_executed / s.flops_dense for s in rep.scales] == pytest.approx(one, abs=0.02)


def test_the_scale_decision_is_read_at_the_first_layer_that_needs_it(monkeypatch):
    """Layers between the measured layer and the first Detail layer keep every branch whatever the
    decision says: the decision's device work is launched at the first of them and read (the host
    synchronisation) only before the Detail layer. Decisions and logits are those of deciding at
    once."""
    from toprovar_fx.policies import load_policy
    from toprovar_fx.runtime import decisions

    # measure_layer 1; layer 2 Global, layer 3 Detail
    spec = load_policy("infinity-tiny").derive("infinity-tiny-late-detail", {
        "scale": {"criterion": "fixed"}, "layer": {"mode": "frozen", "frozen": {"detail": [3]}}})
    m, call = model("infinity-tiny"), sampler_call("infinity-tiny", 1)
    read_at: list[tuple[int, int]] = []
    finish = decisions.Decider._finish_decision

    def spy(self):
        read_at.append((self.tick.scale, self.tick.layer))
        return finish(self)

    monkeypatch.setattr(decisions.Decider, "_finish_decision", spy)

    def run():
        torch._dynamo.reset()
        fast = torch.compile(m.autoregressive_infer_cfg, backend="toprovar", options={"policy": spec})
        call(fast)
        read_at.clear()
        _, logits = call(fast)
        rep = toprovar_fx.last_generation()
        return logits, [(s.index, [(lay.action, lay.kept_tokens) for lay in s.layers]) for s in rep.scales]

    deferred, deferred_rep = run()
    pruned = [s for s, layers in deferred_rep if any(a != "keep" for a, _ in layers)]
    # read after layer 2 ran, before layer 3, once per scale from the first the policy may act on
    assert pruned and {lay for _, lay in read_at} == {2} and set(pruned) <= {s for s, _ in read_at}
    assert len(read_at) == len({s for s, _ in read_at})
    monkeypatch.setattr(decisions.Decider, "_keeps_regardless", lambda self, res, layer: False)
    at_once, at_once_rep = run()
    assert {lay for _, lay in read_at} == {1} and set(pruned) <= {s for s, _ in read_at}  # right after the measured layer
    assert deferred_rep == at_once_rep
    assert max_rel_diff(deferred, at_once) == 0.0
