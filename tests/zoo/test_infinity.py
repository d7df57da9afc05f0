"""Tests of the Infinity-style zoo model (tiny config, CPU)."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from toprovar_fx.zoo.infinity import (
    BASE_SIDES,
    CONFIGS,
    build_infinity,
    default_scale_schedules,
    derive_schedule,
    encode_prompts,
    nearest_schedule_key,
    sample_bits,
)
from toprovar_fx.zoo.reference_pruning import BlockDecision, RefPruning, gather_tokens
from toprovar_fx.zoo.rope2d import apply_rope2d, rope2d_table

PROMPTS = ["a red fox jumping over a lazy dog in the snow", "cat"]


@pytest.fixture(scope="module")
def model():
    return build_infinity("tiny", seed=0)


@pytest.fixture(scope="module")
def label2(model):
    return model.encode_prompts(PROMPTS)


def _gen(model, label, **kw):
    kw.setdefault("B", len(label[1]))
    kw.setdefault("g_seed", 7)
    kw.setdefault("cfg_list", 3.0)
    return model.autoregressive_infer_cfg(label, return_logits=True, **kw)


# ----------------------------------------------------------------------------- schedules / text


def test_schedules():
    sched = default_scale_schedules()
    sq = sched["1024:1:1"]
    assert [h for h, _ in sq] == list(BASE_SIDES[1024]) and all(h == w for h, w in sq)
    assert sum(h * w for h, w in sq) == 10521 and len(sq) == 13
    assert sched["256:1:1"] == [(s, s) for s in (1, 2, 4, 6, 8, 12, 16)]
    assert sched["256:1:2"] == [(1, 1), (1, 2), (2, 4), (3, 6), (4, 8), (6, 12), (8, 16)]
    for key, s in sched.items():
        assert s[0] == (1, 1), key
        assert all(a[0] <= b[0] and a[1] <= b[1] and a[0] * a[1] < b[0] * b[1] for a, b in zip(s, s[1:])), key
        _, a, b = (int(v) for v in key.split(":"))
        h, w = s[-1]
        assert abs(h / w - a / b) < 0.05, key
    assert sched["1024:2:1"] == [(w, h) for h, w in sched["1024:1:2"]]
    assert len([k for k in sched if k.startswith("1024:")]) == 15
    assert nearest_schedule_key(0.52) == "1024:1:2" and nearest_schedule_key(1.0, 256) == "256:1:1"
    assert nearest_schedule_key(16 / 9) == "1024:7:4"
    wide = derive_schedule(BASE_SIDES[1024], 9, 16)
    assert wide[0] == (1, 1) and len(wide) == 13 and abs(wide[-1][0] / wide[-1][1] - 9 / 16) < 0.02
    assert abs(wide[-1][0] * wide[-1][1] / 4096 - 1) < 0.05


@pytest.mark.parametrize("policy,config", [("infinity-2b", "2b"), ("infinity-8b", "8b"), ("infinity-tiny", "tiny")])
def test_schedules_agree_with_shipped_policies(policy, config):
    yaml = pytest.importorskip("yaml")
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "toprovar_fx" / "policies" / f"{policy}.yaml"
    if not path.exists():
        pytest.skip(f"{path} not shipped")
    doc = yaml.safe_load(path.read_text())
    m = build_infinity(config, device="meta")
    for key, grid in doc["schedules"].items():
        assert m.scale_schedules[key] == [tuple(hw) for hw in grid], key
    fp = {k: v for k, v in doc["model"].items() if v is not None}
    assert {k: m.fingerprint()[k] for k in fp} == fp


def test_encode_prompts():
    kv, lens, cu, mx = encode_prompts(["a b c", "", "hello world"], text_channels=8, text_maxlen=2)
    assert lens == [2, 1, 2] and mx == 2
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 2, 3, 5]
    assert kv.shape == (5, 8)
    kv2 = encode_prompts(["a b c", "", "hello world"], text_channels=8, text_maxlen=2)[0]
    assert torch.equal(kv, kv2)
    # the same word at the same position embeds identically across prompts
    assert torch.equal(encode_prompts(["x y"], text_channels=8)[0][0], encode_prompts(["x z"], text_channels=8)[0][0])


# ----------------------------------------------------------------------------- generation


def test_end_to_end_tiny(model, label2):
    t0 = time.perf_counter()
    images, logits = _gen(model, label2)
    elapsed = time.perf_counter() - t0
    assert elapsed < 10.0
    sched = model.scale_schedules["256:1:1"]
    assert images.shape == (2, 3, 256, 256) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0.01
    assert len(logits) == len(sched)
    for (h, w), lg in zip(sched, logits):
        assert lg.shape == (2, h * w, model.d_bits, 2) and lg.dtype == torch.float32
        assert torch.isfinite(lg).all()
    assert model.fingerprint() == dict(family="infinity", depth=4, width=64, heads=4, num_scales=7)
    # caches are released after a generation
    assert all(b.sa.cached_k is None and not b.sa.caching for b in model.blocks())


def test_deterministic(model, label2):
    a_img, a_lg = _gen(model, label2)
    b_img, b_lg = _gen(model, label2)
    assert torch.equal(a_img, b_img) and all(torch.equal(x, y) for x, y in zip(a_lg, b_lg))
    other = build_infinity("tiny", seed=0)
    sd1, sd2 = model.state_dict(), other.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    c_img, _ = _gen(other, label2)
    assert torch.equal(a_img, c_img)
    d_img, d_lg = _gen(model, label2, g_seed=8)
    assert torch.equal(a_lg[0], d_lg[0]) and not torch.equal(a_img, d_img)
    e_img, _ = _gen(build_infinity("tiny", seed=1), label2)
    assert not torch.equal(a_img, e_img)


def test_global_rng_untouched():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    build_infinity("tiny", seed=3)
    assert torch.equal(state, torch.get_rng_state())


def test_batch_one_and_two(model):
    lab1 = model.encode_prompts(PROMPTS[:1])
    img1, lg1 = _gen(model, lab1, B=1)
    assert img1.shape == (1, 3, 256, 256)
    img2, lg2 = _gen(model, model.encode_prompts(PROMPTS), B=2)
    assert img2.shape == (2, 3, 256, 256)
    # scale 0 precedes any sampling: row 0 of the batch matches the single-prompt run
    torch.testing.assert_close(lg1[0], lg2[0][:1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="B="):
        model.autoregressive_infer_cfg(lab1, B=2)


def test_variable_length_prompts(model):
    lab = model.encode_prompts(["one", "two words here and more words", "three three three"])
    assert lab[1] == [1, 6, 3]
    _, lg = _gen(model, lab, B=3)
    for i, p in enumerate(["one", "two words here and more words", "three three three"]):
        _, lg_i = _gen(model, model.encode_prompts([p]), B=1)
        torch.testing.assert_close(lg[0][i : i + 1], lg_i[0], rtol=1e-5, atol=1e-5)
    # another sample's text never leaks into a row (key-padding mask)
    _, lg_b = _gen(model, model.encode_prompts(["one", "completely different", "three three three"]), B=3)
    torch.testing.assert_close(lg[0][0], lg_b[0][0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(lg[0][1], lg_b[0][1])


def test_cfg_on_off(model, label2):
    seen = []
    hook = model.head_nm.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
    try:
        img1, lg1 = _gen(model, label2, cfg_list=1.0)
        img3, lg3 = _gen(model, label2, cfg_list=3.0)
    finally:
        hook.remove()
    n = len(lg1)
    assert seen == [2] * n + [4] * n  # CFG doubles the transformer batch
    assert img1.shape == img3.shape == (2, 3, 256, 256)
    assert not torch.allclose(lg1[0], lg3[0])
    # cfg=1 at every scale but one still runs the doubled batch and mixes only there
    cfgs = [1.0] * n
    cfgs[-1] = 2.0
    _, lg_mix = _gen(model, label2, cfg_list=cfgs)
    torch.testing.assert_close(lg_mix[0], lg1[0], rtol=1e-5, atol=1e-5)
    # explicit negative prompt
    neg = model.encode_prompts(["blurry", "ugly low quality"])
    _, lg_neg = _gen(model, label2, negative_label_B_or_BLT=neg)
    assert not torch.allclose(lg_neg[0], lg3[0])


def test_non_square_schedule(model, label2):
    for key, (hf, wf) in (("256:1:2", (8, 16)), ("256:2:1", (16, 8))):
        img, lg = _gen(model, label2, scale_schedule=key)
        assert img.shape == (2, 3, 16 * hf, 16 * wf)
        for (h, w), x in zip(model.scale_schedules[key], lg):
            assert x.shape == (2, h * w, model.d_bits, 2)
    # an explicit (t, h, w) schedule not registered on the model
    custom = [(1, 1, 1), (1, 2, 3), (1, 4, 6)]
    img, lg = _gen(model, label2, scale_schedule=custom)
    assert img.shape == (2, 3, 64, 96) and [x.shape[1] for x in lg] == [1, 6, 24]


def test_forward_cfg_infer_equals_sampler(model, label2):
    img, lg = _gen(model, label2)
    img_f, lg_f = model(label2, 2, None, 7, 3.0, cfg_infer=True, return_logits=True)
    assert torch.equal(img, img_f) and all(torch.equal(a, b) for a, b in zip(lg, lg_f))
    img_k = model(label2, B=2, g_seed=7, cfg_infer=True)
    assert torch.equal(img, img_k)


def test_top_k_top_p(model, label2):
    img_a, lg_a = _gen(model, label2, top_k=1, g_seed=1)
    img_b, lg_b = _gen(model, label2, top_k=1, g_seed=2)
    assert torch.equal(img_a, img_b)  # greedy per bit
    logits = torch.tensor([[[[0.0, 3.0], [2.0, 0.0]]]])
    bits = sample_bits(logits, top_p=0.5, rng=torch.Generator().manual_seed(0))
    assert bits.tolist() == [[[1, 0]]]
    img_p, _ = _gen(model, label2, top_p=0.9, tau_list=0.5)
    assert img_p.shape == (2, 3, 256, 256)


def test_teacher_forced_forward_matches_sampler(model, label2):
    _, lg = _gen(model, label2, cfg_list=1.0, top_k=1)
    bits = [x.argmax(-1) for x in lg]
    x_in = model.teacher_inputs(bits)
    out = model(label2, x_in)  # cfg_infer=False -> training forward
    torch.testing.assert_close(out, torch.cat(lg, dim=1), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- reference pruning


def _random_decisions(model, rows, seed, *, skip=True):
    g = torch.Generator().manual_seed(seed)
    sched = model.scale_schedules["256:1:1"]
    decisions = {}
    for si in (3, 4, 5, 6):
        n = sched[si][0] * sched[si][1]
        for layer in (1, 2):
            kept = {}
            for j, kind in enumerate(("self_attn", "cross_attn", "ffn")):
                k = max(1, n // (2 + j))
                kept[kind] = torch.stack([torch.randperm(n, generator=g)[:k].sort().values for _ in range(rows)])
            decisions[(si, layer)] = BlockDecision("prune_tokens", kept)
        if skip:
            decisions[(si, 3)] = BlockDecision("skip")
    return decisions


def test_ref_pruning_keep_all_is_exact(model, label2):
    img, lg = _gen(model, label2)
    img_r, lg_r = _gen(model, label2, ref_pruning=RefPruning())
    assert torch.equal(img, img_r) and all(torch.equal(a, b) for a, b in zip(lg, lg_r))
    img_c, lg_c = _gen(model, label2, ref_pruning=RefPruning(restore="cached_scale", cached_scale=2))
    assert torch.equal(img, img_c) and all(torch.equal(a, b) for a, b in zip(lg, lg_c))


@pytest.mark.parametrize("restore", ["identity", "cached_scale"])
def test_ref_pruning_decisions(model, label2, restore):
    _, lg = _gen(model, label2)
    rp = RefPruning(
        decisions=_random_decisions(model, rows=4, seed=0),
        restore=restore,
        cached_scale=2 if restore == "cached_scale" else None,
    )
    cache_lens = []
    hook = model.head_nm.register_forward_hook(
        lambda m, a, o: cache_lens.append([b.sa.cached_k.shape[2] for b in model.blocks()])
    )
    try:
        img, lg_p = _gen(model, label2, ref_pruning=rp)
    finally:
        hook.remove()
    assert img.shape == (2, 3, 256, 256) and all(torch.isfinite(x).all() for x in lg_p)
    for s in range(3):
        assert torch.equal(lg[s], lg_p[s])
    assert not torch.allclose(lg[3], lg_p[3])
    if restore == "cached_scale":
        assert set(rp._cache) == {(layer, k) for layer in range(4) for k in ("self_attn", "cross_attn", "ffn")}
    # K/V cache semantics: kept tokens only are appended; a skipped block appends nothing
    sched = model.scale_schedules["256:1:1"]
    cum = [sum(h * w for h, w in sched[: s + 1]) for s in range(len(sched))]
    assert cache_lens[2] == [cum[2]] * 4
    after3 = cache_lens[3]
    assert after3[0] == cum[3]
    assert after3[1] == after3[2] == cum[2] + rp.decisions[(3, 1)].kept_idx["self_attn"].shape[1]
    assert after3[3] == cum[2]  # skipped at scale 3

    # the two restore modes give different results
    other = "identity" if restore == "cached_scale" else "cached_scale"
    rp2 = RefPruning(
        decisions=_random_decisions(model, rows=4, seed=0),
        restore=other,
        cached_scale=2 if other == "cached_scale" else None,
    )
    _, lg_o = _gen(model, label2, ref_pruning=rp2)
    assert not torch.allclose(lg_o[3], lg_p[3])


def test_ref_pruning_without_cfg_rows(model, label2):
    rp = RefPruning(decisions=_random_decisions(model, rows=2, seed=1, skip=False))
    _, lg = _gen(model, label2, cfg_list=1.0)
    _, lg_p = _gen(model, label2, cfg_list=1.0, ref_pruning=rp)
    assert torch.equal(lg[2], lg_p[2]) and not torch.allclose(lg[4], lg_p[4])


def test_rope_rows_gather_like_tokens():
    sched = [(1, 1), (2, 2), (3, 5)]
    table = rope2d_table(16, sched)
    assert table.shape == (1, 1, 1 + 4 + 15, 8, 2)
    rows = table[:, :, 5:20]
    q, k = torch.randn(2, 3, 15, 16), torch.randn(2, 3, 15, 16)
    qr, kr = apply_rope2d(q, k, rows)
    idx = torch.tensor([[0, 3, 7, 14], [1, 2, 9, 10]])
    qg = gather_tokens(q, idx, 2)
    kg = gather_tokens(k, idx, 2)
    qgr, kgr = apply_rope2d(qg, kg, gather_tokens(rows, idx, 2))
    torch.testing.assert_close(qgr, gather_tokens(qr, idx, 2))
    torch.testing.assert_close(kgr, gather_tokens(kr, idx, 2))
    # RoPE keeps norms (cosine attention stays bounded) and position 0 is the identity
    torch.testing.assert_close(qr.norm(dim=-1), q.norm(dim=-1))
    q0, _ = apply_rope2d(q[:, :, :1], k[:, :, :1], table[:, :, :1])
    torch.testing.assert_close(q0, q[:, :, :1])


# ----------------------------------------------------------------------------- weights


def test_uniform_attention_changes_logits(model, label2, monkeypatch):
    _, lg = _gen(model, label2)

    def uniform(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        return v.mean(dim=-2, keepdim=True).expand(*q.shape[:-1], v.shape[-1])

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", uniform)
    _, lg_u = _gen(model, label2)
    assert F.scaled_dot_product_attention is uniform
    diff = (lg[2] - lg_u[2]).abs().mean() / lg[2].abs().mean()
    assert diff > 0.05


def test_checkpoint_round_trip(model, label2, tmp_path):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "infinity-tiny.safetensors"
    save_file(model.state_dict(), str(path))
    fresh = build_infinity("tiny", seed=99)
    fresh.load_state_dict(load_file(str(path)), strict=True)
    img, lg = _gen(model, label2)
    img2, lg2 = _gen(fresh, label2)
    assert torch.equal(img, img2) and all(torch.equal(a, b) for a, b in zip(lg, lg2))
    assert not any("rope2d" in k for k in model.state_dict())


def test_structure(model):
    assert len(model.block_chunks) == CONFIGS["tiny"].block_chunks
    blk = model.block_chunks[1].module[0]
    assert blk is model.blocks()[2]
    assert blk.ada_gss.shape == (1, 1, 6, 64)
    assert model.head.out_features == 2 * model.d_bits
    assert model.rope2d_256_1_1.shape == (1, 1, 521, 8, 2)


@pytest.mark.parametrize(
    "name,depth,width,heads,bits,lo,hi",
    [("2b", 32, 2048, 16, 32, 2.0e9, 2.4e9), ("8b", 40, 3584, 28, 56, 8.0e9, 8.6e9)],
)
def test_full_size_on_meta(name, depth, width, heads, bits, lo, hi):
    m = build_infinity(name, device="meta")
    assert m.fingerprint() == dict(family="infinity", depth=depth, width=width, heads=heads, num_scales=13)
    n = sum(p.numel() for p in m.parameters())
    assert lo < n < hi
    assert m.head.out_features == 2 * bits
    assert m.blocks()[0].sa.head_dim == 128
    assert m.rope2d_1024_1_1.shape == (1, 1, 10521, 64, 2)
    assert all(p.device.type == "meta" for p in m.parameters())
    small = build_infinity(name, device="meta", depth=8, dtype=torch.bfloat16)
    assert small.depth == 8 and small.head.weight.dtype == torch.bfloat16
    with pytest.raises(TypeError):
        build_infinity(name, device="meta", not_a_field=1)
