"""Reference tokenizer and model plumbing: quantiser <-> sampler, teacher forcing, shards, sizes."""

from __future__ import annotations

import json
import os

import pytest
import torch

from toprovar_fx.zoo.ref_model import (
    block_causal_bias,
    load_reference,
    load_reference_tokenizer,
    read_reference_state,
    save_reference,
    teacher_forced_logits,
    training_init_,
)
from toprovar_fx.zoo.ref_tokenizer import RefTokenizer, TokenizerConfig
from toprovar_fx.zoo.var import VARConfig, VARStyle

PN = (1, 2, 3, 4)


def _pair(seed: int = 0) -> tuple[VARStyle, RefTokenizer]:
    model = VARStyle(VARConfig(depth=2, width=32, heads=2, num_classes=4, vocab_size=64, cvae=8, patch_nums=PN,
                               vq_ch=8, vq_ch_mult=(1, 2, 2)))
    model.init_weights(torch.Generator().manual_seed(seed))
    tok = RefTokenizer(TokenizerConfig(vocab_size=64, cvae=8, ch=8, ch_mult=(1, 2, 2), enc_ch=8,
                                       enc_ch_mult=(1, 2, 2), patch_nums=PN))
    tok.init_weights(torch.Generator().manual_seed(seed + 1))
    tok.vae.load_state_dict(model.vae.state_dict())
    return model.eval(), tok.eval()


def test_vae_is_the_zoo_class():
    model, tok = _pair()
    assert type(tok.vae) is type(model.vae)
    assert set(tok.vae.state_dict()) == set(model.vae.state_dict())


def test_quantize_matches_sampler_accumulation():
    _, tok = _pair()
    img = torch.rand(3, 3, 16, 16) * 2 - 1
    q = tok.quantize(tok.encode(img))
    assert [i.shape for i in q.idx] == [(3, p * p) for p in PN]
    f_replay = tok.vae.quantize.idx_to_f_hat(q.idx, tok.schedule)
    torch.testing.assert_close(f_replay, q.f_hat, atol=1e-5, rtol=1e-5)
    rec = tok.reconstruct(img)
    assert rec.shape == (3, 3, 16, 16) and rec.min() >= 0 and rec.max() <= 1


def test_quantize_gradients_reach_encoder_and_codebook():
    _, tok = _pair()
    tok.train()
    rec, q = tok(torch.rand(2, 3, 16, 16) * 2 - 1)
    (rec.square().mean() + q.vq_loss).backward()
    assert tok.encoder.conv_in.weight.grad.abs().sum() > 0
    assert tok.codebook.weight.grad.abs().sum() > 0
    assert tok.vae.decoder.conv_out.weight.grad.abs().sum() > 0


def test_dead_code_restart():
    _, tok = _pair()
    tok.usage.zero_()
    tok.usage[:10] = 1
    rest = torch.randn(50, 8)
    before = tok.codebook.weight.detach().clone()
    dead = tok.restart_dead_codes(rest, torch.Generator().manual_seed(0))
    assert int(dead.sum()) == 54 and not dead[:10].any()
    torch.testing.assert_close(tok.codebook.weight[:10], before[:10])
    assert not torch.allclose(tok.codebook.weight[10:], before[10:])
    assert tok.usage.sum() == 0


def test_block_causal_bias():
    bias = block_causal_bias(PN)
    assert bias.shape == (1, 1, 30, 30)
    lvl = torch.repeat_interleave(torch.arange(4), torch.tensor([1, 4, 9, 16]))
    allowed = lvl[:, None] >= lvl[None, :]
    assert torch.equal(bias[0, 0] == 0, allowed)
    assert torch.isinf(bias[0, 0][~allowed]).all()


@pytest.mark.parametrize("init", ["zoo", "training"])
def test_teacher_forcing_equals_sampler(init):
    """Greedy, unguided sampling: the teacher-forced logits on the sampled tokens are the sampler's."""
    model, tok = _pair()
    if init == "training":
        training_init_(model, torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1, 3])
    imgs, logits = model.autoregressive_infer_cfg(3, label_B=labels, g_seed=0, cfg=0.0, top_k=1, return_logits=True)
    idx = [lg.argmax(-1) for lg in logits]
    x_in = tok.idx_to_var_input(idx)
    assert x_in.shape == (3, 29, 8)
    tf = teacher_forced_logits(model, labels, x_in, block_causal_bias(PN))
    torch.testing.assert_close(tf.float(), torch.cat(logits, 1), atol=1e-4, rtol=1e-4)
    img2 = model.vae.fhat_to_img(model.vae.quantize.idx_to_f_hat(idx, model.schedule)).add(1).mul(0.5)
    torch.testing.assert_close(img2, imgs)


def test_save_load_roundtrip(tmp_path):
    model, tok = _pair()
    files = save_reference(model, tok, tmp_path, {"training": {"note": "test"}}, max_shard_bytes=40_000)
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1
    for f in shards:
        assert os.path.getsize(tmp_path / f) <= 40_000 + 20_000  # payload limit + header
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["fingerprint"] == model.fingerprint() and cfg["training"] == {"note": "test"}
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    state = read_reference_state(tmp_path)
    assert set(index["weight_map"]) == set(state)
    assert all(v.dtype == torch.float16 for v in state.values())

    loaded = load_reference(tmp_path)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v.half().float())
    a = loaded.autoregressive_infer_cfg(2, label_B=1, g_seed=0)
    assert a.shape == (2, 3, 16, 16)
    tok2 = load_reference_tokenizer(tmp_path / shards[0])  # a file inside the directory works too
    for k, v in tok.state_dict().items():
        torch.testing.assert_close(tok2.state_dict()[k], v.half().float())


def test_load_refuses_mismatch(tmp_path):
    model, tok = _pair()
    save_reference(model, tok, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["var"]["depth"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing keys"):
        load_reference(tmp_path)
    cfg["format"] = "other"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not a"):
        load_reference(tmp_path)


def test_h200_preset_fits_the_size_budget():
    """The h200 preset's fp16 checkpoint (transformer + tokenizer) is at most 24 MB."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "train_reference", os.path.join(os.path.dirname(__file__), "..", "..", "tools", "train_reference.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    p = mod.PRESETS["h200"]
    with torch.device("meta"):
        model = VARStyle(VARConfig(depth=p["depth"], width=p["width"], heads=p["heads"], num_classes=16,
                                   vocab_size=p["vocab"], cvae=p["cvae"], patch_nums=p["patch_nums"],
                                   vq_ch=p["tok_ch"], vq_ch_mult=p["tok_ch_mult"]))
        tok = RefTokenizer(TokenizerConfig(vocab_size=p["vocab"], cvae=p["cvae"], ch=p["tok_ch"],
                                           ch_mult=p["tok_ch_mult"], enc_ch=p["enc_ch"],
                                           enc_ch_mult=p["enc_ch_mult"], patch_nums=p["patch_nums"]))
    n = sum(t.numel() for t in model.state_dict().values())
    n += sum(t.numel() for k, t in tok.state_dict().items() if not k.startswith("vae."))
    assert 2 * n <= 24_000_000
    assert model.cfg.image_size == 256 and model.patch_nums[-1] == 16


def test_load_into_existing_model(tmp_path):
    """What the registry does: build the config on meta (or with random weights), then load the shards."""
    from toprovar_fx.zoo.ref_model import load_into, read_reference_config, var_config_of

    model, tok = _pair()
    save_reference(model, tok, tmp_path)
    with torch.device("meta"):
        fresh = VARStyle(var_config_of(read_reference_config(tmp_path)))
    load_into(fresh, tmp_path)
    other, _ = _pair(seed=5)
    load_into(other, tmp_path)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v.half().float())
        torch.testing.assert_close(other.state_dict()[k], v.half().float())
