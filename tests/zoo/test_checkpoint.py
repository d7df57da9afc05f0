"""Safetensors checkpoints: round trip, strict key/shape errors, metadata."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from toprovar_fx.zoo import build, load_checkpoint, save_checkpoint


@pytest.mark.parametrize("name", ["var-tiny", "hart-tiny"])
def test_round_trip_reproduces_weights_and_images(tmp_path, name):
    src = build(name, seed=0)
    path = tmp_path / f"{name}.safetensors"
    save_checkpoint(src, path)
    dst = build(name, seed=1, checkpoint=path)
    s, d = src.state_dict(), dst.state_dict()
    assert s.keys() == d.keys() and all(torch.equal(s[k], d[k]) for k in s)
    a = src.autoregressive_infer_cfg(1, label_B=2, g_seed=0)
    b = dst.autoregressive_infer_cfg(1, label_B=2, g_seed=0)
    assert torch.equal(a, b)
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["fingerprint"]) == src.fingerprint()


def test_checkpoint_onto_meta_and_other_dtype(tmp_path):
    path = tmp_path / "v.safetensors"
    src = build("var-tiny")
    save_checkpoint(src, path)
    on_meta = build("var-tiny", device="meta")
    load_checkpoint(on_meta, path)
    assert not any(p.is_meta for p in on_meta.parameters())
    half = build("var-tiny", checkpoint=path, dtype=torch.bfloat16)
    assert torch.equal(half.head.weight, src.head.weight.bfloat16())


def test_wrong_family_names_missing_and_unexpected_keys(tmp_path):
    path = tmp_path / "var.safetensors"
    save_checkpoint(build("var-tiny"), path)
    with pytest.raises(ValueError, match=r"missing keys \[decoder_norm\.bias.*\(\+\d+ more\)") as err:
        build("hart-tiny", checkpoint=path)
    assert "does not match HARTStyle" in str(err.value) and str(path) in str(err.value)
    path2 = tmp_path / "hart.safetensors"
    save_checkpoint(build("hart-tiny"), path2)
    with pytest.raises(ValueError, match=r"unexpected keys \[decoder_norm\.bias"):
        build("var-tiny", checkpoint=path2)


def test_wrong_size_names_misshaped_keys(tmp_path):
    path = tmp_path / "small_vocab.safetensors"
    save_checkpoint(build("var-tiny", vocab_size=256), path)
    with pytest.raises(
        ValueError, match=r"mis-shaped keys \[head\.bias: checkpoint \(256,\) vs model \(512,\)"
    ):
        build("var-tiny", checkpoint=path)


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x80\x04definitely not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        build("var-tiny", checkpoint=path)
