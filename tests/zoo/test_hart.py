"""HART-style stand-in: VAR-style blocks plus the residual diffusion head."""

from __future__ import annotations

import pytest
import torch

from toprovar_fx.zoo import build
from toprovar_fx.zoo.hart import HARTStyle, cosine_alphas_cumprod
from toprovar_fx.zoo.reference_pruning import BlockDecision, RefPruning
from toprovar_fx.zoo.var import VARStyle


@pytest.fixture(scope="module")
def model(single_thread):
    m = build("hart-tiny")
    assert isinstance(m, HARTStyle)
    return m


def uniform_attention(q, k, v, *args, **kwargs):
    """Attention that ignores q and k: every query gets the mean of v."""
    return v.mean(dim=-2, keepdim=True).expand(*q.shape[:-1], v.shape[-1])


@pytest.mark.parametrize("batch", [1, 2])
def test_generates_images_in_unit_range(model, batch):
    img, logits = model.autoregressive_infer_cfg(batch, label_B=None, g_seed=0, return_logits=True)
    size = model.cfg.image_size
    assert img.shape == (batch, 3, size, size)
    assert torch.isfinite(img).all() and img.min() >= 0 and img.max() <= 1
    for lg, (h, w) in zip(logits, model.schedule):
        assert lg.shape == (batch, h * w, model.vocab_size) and lg.dtype == torch.float32
    assert model.fingerprint() == {"family": "hart", "depth": 4, "width": 64, "heads": 4, "num_scales": 10}


def test_deterministic_under_seed(model):
    a = model.autoregressive_infer_cfg(2, label_B=3, g_seed=11)
    b = model.autoregressive_infer_cfg(2, label_B=3, g_seed=11)
    c = model.autoregressive_infer_cfg(2, label_B=3, g_seed=12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_diffusion_residual_changes_the_image(model, monkeypatch):
    calls: list[int] = []
    handle = model.diffusion.net.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    try:
        with_residual = model.autoregressive_infer_cfg(1, label_B=3, g_seed=0)
    finally:
        handle.remove()
    h, w = model.schedule[-1]
    assert calls == [2 * h * w] * model.cfg.diff_steps  # cond + uncond rows of every final token
    monkeypatch.setattr(model, "refine_f_hat", VARStyle.refine_f_hat.__get__(model))
    without = model.autoregressive_infer_cfg(1, label_B=3, g_seed=0)
    assert (with_residual - without).abs().mean() > 1e-3


def test_ddim_schedule(model):
    ts = model.diffusion.timesteps()
    assert len(ts) == model.cfg.diff_steps
    assert ts[0] == model.cfg.diff_train_steps - 1 and ts[-1] == 0
    assert all(a > b for a, b in zip(ts, ts[1:]))
    abar = cosine_alphas_cumprod(1000)
    assert 0 < abar[-1] < abar[0] < 1


def test_keep_everything_reference_path_is_exact(model):
    img, plain = model.autoregressive_infer_cfg(2, label_B=None, g_seed=4, return_logits=True)
    img_ref, ref = model.autoregressive_infer_cfg(
        2, label_B=None, g_seed=4, return_logits=True, ref_pruning=RefPruning()
    )
    assert all(torch.equal(a, b) for a, b in zip(plain, ref))
    assert torch.equal(img, img_ref)


@pytest.mark.parametrize("restore", ["identity", "cached_scale"])
def test_pruning_decisions_change_logits(model, restore):
    scale = 8
    h, w = model.schedule[scale]
    g = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randperm(h * w, generator=g)[: h * w // 3].sort().values for _ in range(2)])
    pruning = RefPruning(
        decisions={
            (scale, 0): BlockDecision("prune_tokens", {"self_attn": idx, "ffn": idx}),
            (scale, 3): BlockDecision("skip"),
        },
        restore=restore,
        cached_scale=5 if restore == "cached_scale" else None,
    )
    _, plain = model.autoregressive_infer_cfg(1, label_B=2, g_seed=0, return_logits=True)
    img, pruned = model.autoregressive_infer_cfg(
        1, label_B=2, g_seed=0, return_logits=True, ref_pruning=pruning
    )
    assert torch.isfinite(img).all()
    assert torch.equal(plain[scale - 1], pruned[scale - 1])
    assert not torch.allclose(plain[scale], pruned[scale])


def test_attention_matters(model, monkeypatch):
    _, dense = model.autoregressive_infer_cfg(1, label_B=1, g_seed=0, return_logits=True)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", uniform_attention)
    _, uniform = model.autoregressive_infer_cfg(1, label_B=1, g_seed=0, return_logits=True)
    assert (dense[1] - uniform[1]).abs().max() > 1e-2


def test_full_size_shapes_on_meta():
    m = build("hart-0.7b", device="meta")
    assert m.fingerprint() == {"family": "hart", "depth": 24, "width": 1536, "heads": 24, "num_scales": 14}
    assert m.scale_schedules == {
        "1024:1:1": [(p, p) for p in (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)]
    }
    diff_params = sum(p.numel() for p in m.diffusion.parameters())
    assert 30e6 < diff_params < 45e6  # HART's residual diffusion MLP is ~37M
    assert m.diffusion.net.blocks[0].fc1.weight.shape == (1024, 1024)
    assert all(p.is_meta for p in m.parameters())
