"""VAR-style stand-in: end-to-end generation, determinism, CFG, the reference pruning oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from toprovar_fx.zoo import build, reference_pruning
from toprovar_fx.zoo.common import sample_top_k_top_p
from toprovar_fx.zoo.reference_pruning import BlockDecision, RefPruning


@pytest.fixture(scope="module")
def model(single_thread):
    return build("var-tiny")


def tokens_per_scale(m) -> list[int]:
    return [h * w for h, w in m.schedule]


def uniform_attention(q, k, v, *args, **kwargs):
    """Attention that ignores q and k: every query gets the mean of v."""
    return v.mean(dim=-2, keepdim=True).expand(*q.shape[:-1], v.shape[-1])


def random_kept_idx(rows: int, length: int, keep: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(length, generator=g)[:keep].sort().values for _ in range(rows)])


def attn_call_lengths(m, layer: int) -> tuple[list[int], callable]:
    """Record the K/V cache length of ``layer`` after each of its attention calls."""
    lengths: list[int] = []
    handle = m.blocks[layer].attn.register_forward_hook(
        lambda mod, a, o: lengths.append(mod.cached_k.shape[2])
    )
    return lengths, handle.remove


@pytest.mark.parametrize("batch", [1, 2])
def test_generates_images_in_unit_range(model, batch):
    img = model.autoregressive_infer_cfg(batch, label_B=torch.arange(batch), g_seed=0)
    size = model.cfg.image_size
    assert img.shape == (batch, 3, size, size)
    assert img.dtype == torch.float32
    assert torch.isfinite(img).all() and img.min() >= 0 and img.max() <= 1
    assert img.std() > 0.02  # not a constant image


def test_same_seed_same_image_different_seed_different(model):
    a = model.autoregressive_infer_cfg(2, label_B=None, g_seed=7)
    b = model.autoregressive_infer_cfg(2, label_B=None, g_seed=7)
    c = model.autoregressive_infer_cfg(2, label_B=None, g_seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert (a - c).abs().mean() > 1e-3


def test_logits_shape_at_every_scale(model):
    for batch in (1, 2):
        img, logits = model.autoregressive_infer_cfg(batch, label_B=1, g_seed=0, return_logits=True)
        assert len(logits) == len(model.patch_nums) == model.fingerprint()["num_scales"]
        for lg, n in zip(logits, tokens_per_scale(model)):
            assert lg.shape == (batch, n, model.vocab_size)
            assert lg.dtype == torch.float32
        assert img.shape[0] == batch


def test_cfg_doubles_batch_and_guides_logits(model):
    """Guided logits are (1 + t) cond - t uncond with t = cfg * si / (K - 1); cfg=0 is off."""
    raw: list[torch.Tensor] = []
    block_rows: list[int] = []
    h1 = model.head.register_forward_hook(lambda mod, a, out: raw.append(out.float()))
    h2 = model.blocks[0].register_forward_pre_hook(lambda mod, args: block_rows.append(args[0].shape[0]))
    try:
        _, off = model.autoregressive_infer_cfg(2, label_B=3, g_seed=0, cfg=0.0, return_logits=True)
        raw_off, raw[:] = list(raw), []
        _, on = model.autoregressive_infer_cfg(2, label_B=3, g_seed=0, cfg=4.0, return_logits=True)
    finally:
        h1.remove()
        h2.remove()
    assert set(block_rows) == {4}  # CFG doubles the batch even when guidance is off
    k = len(model.patch_nums)
    assert torch.equal(off[0], raw_off[0][:2]) and torch.equal(off[1], raw_off[1][:2])
    assert torch.equal(on[0], off[0])  # t = 0 at the first scale: same tokens sampled
    t = 4.0 / (k - 1)
    assert torch.equal(raw[1], raw_off[1])  # same tokens at scale 0, so the same raw logits
    torch.testing.assert_close(on[1], (1 + t) * raw[1][:2] - t * raw[1][2:])
    assert not torch.allclose(on[1], off[1])


def test_label_forms(model):
    by_int = model.autoregressive_infer_cfg(2, label_B=4, g_seed=3)
    by_tensor = model.autoregressive_infer_cfg(2, label_B=torch.tensor([4, 4]), g_seed=3)
    null = model.autoregressive_infer_cfg(2, label_B=-1, g_seed=3)
    assert torch.equal(by_int, by_tensor)
    assert not torch.equal(by_int, null)


def test_top_k_one_is_greedy(model):
    a = model.autoregressive_infer_cfg(1, label_B=2, g_seed=0, top_k=1)
    b = model.autoregressive_infer_cfg(1, label_B=2, g_seed=99, top_k=1)
    assert torch.equal(a, b)


def test_top_p_and_more_smooth_run(model):
    img = model.autoregressive_infer_cfg(1, label_B=2, g_seed=0, top_k=50, top_p=0.9, more_smooth=True)
    assert torch.isfinite(img).all()


def test_sampler_filters():
    logits = torch.tensor([[[0.0, 3.0, 1.0, 2.0]]]).expand(1, 50, 4)
    rng = torch.Generator().manual_seed(0)
    assert (sample_top_k_top_p(logits, rng, top_k=1) == 1).all()
    assert (sample_top_k_top_p(logits, rng, top_p=1e-3) == 1).all()
    top2 = sample_top_k_top_p(logits, rng, top_k=2)
    assert set(top2.unique().tolist()) <= {1, 3}
    before = logits.clone()
    sample_top_k_top_p(logits, rng, top_k=2, top_p=0.5)
    assert torch.equal(logits, before)


def test_plain_path_never_touches_the_oracle(model, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("reference pruning called on the plain path")

    monkeypatch.setattr(reference_pruning, "run_branch", boom)
    model.autoregressive_infer_cfg(1, label_B=0, g_seed=0)


def test_keep_everything_reference_path_is_exact(model):
    img, plain = model.autoregressive_infer_cfg(2, label_B=None, g_seed=5, return_logits=True)
    for pruning in (RefPruning(), RefPruning(restore="cached_scale", cached_scale=4)):
        img_ref, ref = model.autoregressive_infer_cfg(
            2, label_B=None, g_seed=5, return_logits=True, ref_pruning=pruning
        )
        assert all(torch.equal(a, b) for a, b in zip(plain, ref))
        assert torch.equal(img, img_ref)


@pytest.mark.parametrize("restore", ["identity", "cached_scale"])
def test_prune_tokens_changes_logits_and_appends_only_kept_kv(model, restore):
    batch, scale, layer = 2, 7, 1
    n = tokens_per_scale(model)[scale]
    keep = n // 2
    kept = {
        "self_attn": random_kept_idx(2 * batch, n, keep, seed=0),
        "ffn": random_kept_idx(2 * batch, n, keep, seed=1),
    }
    pruning = RefPruning(
        decisions={(scale, layer): BlockDecision("prune_tokens", kept), (scale, 2): BlockDecision("skip")},
        restore=restore,
        cached_scale=4 if restore == "cached_scale" else None,
    )
    _, plain = model.autoregressive_infer_cfg(batch, label_B=1, g_seed=0, return_logits=True)
    lengths, remove = attn_call_lengths(model, layer)
    try:
        img, pruned = model.autoregressive_infer_cfg(
            batch, label_B=1, g_seed=0, return_logits=True, ref_pruning=pruning
        )
    finally:
        remove()
    assert torch.isfinite(img).all()
    for s in range(scale):
        assert torch.equal(plain[s], pruned[s])
    assert not torch.allclose(plain[scale], pruned[scale])
    full = [sum(tokens_per_scale(model)[: s + 1]) for s in range(len(model.patch_nums))]
    assert lengths[scale] == full[scale] - n + keep
    assert lengths[-1] == full[-1] - n + keep


def test_skip_appends_nothing_to_the_cache(model):
    scale, layer = 5, 3
    pruning = RefPruning(decisions={(scale, layer): BlockDecision("skip")})
    _, plain = model.autoregressive_infer_cfg(1, label_B=1, g_seed=0, return_logits=True)
    lengths, remove = attn_call_lengths(model, layer)
    try:
        _, skipped = model.autoregressive_infer_cfg(
            1, label_B=1, g_seed=0, return_logits=True, ref_pruning=pruning
        )
    finally:
        remove()
    assert len(lengths) == len(model.patch_nums) - 1  # the skipped block never ran attention
    n = tokens_per_scale(model)
    assert lengths[scale] == sum(n[: scale + 2]) - n[scale]
    assert torch.equal(plain[scale - 1], skipped[scale - 1])
    assert not torch.allclose(plain[scale], skipped[scale])


def test_attention_matters(model, monkeypatch):
    _, dense = model.autoregressive_infer_cfg(1, label_B=1, g_seed=0, return_logits=True)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", uniform_attention)
    assert F.scaled_dot_product_attention is uniform_attention
    _, uniform = model.autoregressive_infer_cfg(1, label_B=1, g_seed=0, return_logits=True)
    # scale 0 has one query and one key: uniform attention is exact there
    torch.testing.assert_close(dense[0], uniform[0])
    assert (dense[1] - uniform[1]).abs().max() > 1e-2


def test_kv_cache_is_cleared_after_generation(model):
    model.autoregressive_infer_cfg(1, label_B=1, g_seed=0)
    for blk in model.blocks:
        assert blk.attn.cached_k is None and not blk.attn.caching


def test_bfloat16_generation_keeps_fp32_logits():
    m = build("var-tiny", dtype=torch.bfloat16)
    img, logits = m.autoregressive_infer_cfg(1, label_B=0, g_seed=0, return_logits=True)
    assert all(lg.dtype == torch.float32 for lg in logits)
    assert torch.isfinite(img.float()).all()


def test_dynamo_sees_one_plain_graph_per_block_forward(model):
    """The sampler's graph breaks leave ``Block.forward`` graphs holding one SDPA each."""
    torch._dynamo.reset()  # graphs cached by earlier compiles would hide this one's
    graphs: list[torch.fx.GraphModule] = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    fast = torch.compile(model.autoregressive_infer_cfg, backend=recording_backend)
    try:
        img_c, logits_c = fast(1, label_B=1, g_seed=0, return_logits=True)
    finally:
        torch._dynamo.reset()
    img_e, logits_e = model.autoregressive_infer_cfg(1, label_B=1, g_seed=0, return_logits=True)
    torch.testing.assert_close(img_c, img_e)
    assert all(torch.equal(a, b) for a, b in zip(logits_c, logits_e))
    sdpa_counts = [sum(n.target is F.scaled_dot_product_attention for n in g.graph.nodes) for g in graphs]
    assert max(sdpa_counts) == 1  # one block per graph, not the unrolled stack
    assert sum(c > 0 for c in sdpa_counts) < len(model.blocks) * len(model.patch_nums)
