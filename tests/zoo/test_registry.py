"""Zoo registry: names, configs, overrides, seeds, meta builds of the full-size models."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from toprovar_fx.zoo import build, list_models, model_card

ALL_NAMES = [
    "var-tiny",
    "infinity-tiny",
    "hart-tiny",
    "var-d16",
    "var-d20",
    "var-d24",
    "var-d30",
    "infinity-2b",
    "infinity-8b",
    "hart-0.7b",
    "var-ref",
]


def test_list_models_has_the_contract_names():
    assert sorted(list_models()) == sorted(ALL_NAMES)


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown zoo model 'var-d99'.*var-tiny.*hart-0.7b"):
        build("var-d99")
    with pytest.raises(ValueError, match="valid names"):
        model_card("nope")


def test_unknown_override_is_refused():
    with pytest.raises(ValueError, match="unknown overrides \\['dept'\\]"):
        build("var-tiny", dept=2)


def test_overrides_replace_config_fields():
    m = build("var-tiny", device="meta", depth=2, patch_nums=(1, 2, 4))
    assert m.fingerprint() == {"family": "var", "depth": 2, "width": 64, "heads": 4, "num_scales": 3}
    assert m.scale_schedules == {"64:1:1": [(1, 1), (2, 2), (4, 4)]}


def test_pretrained_without_shipped_checkpoint_fails_clearly():
    with pytest.raises(ValueError, match="'var-d16' has no shipped checkpoint"):
        build("var-d16", pretrained=True, device="meta")
    with pytest.raises(ValueError, match="either pretrained=True or checkpoint"):
        build("var-tiny", pretrained=True, checkpoint="x.safetensors")


def test_seed_makes_init_deterministic():
    a, b, c = build("var-tiny", seed=0), build("var-tiny", seed=0), build("var-tiny", seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["head.weight"], sc["head.weight"])
    torch.manual_seed(123)  # the global RNG plays no part
    d = build("var-tiny", seed=0)
    assert torch.equal(d.state_dict()["class_emb.weight"], sa["class_emb.weight"])


def test_dtype_and_eval_mode():
    m = build("hart-tiny", dtype=torch.bfloat16)
    assert not m.training
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())


@pytest.mark.parametrize(
    ("name", "depth", "width", "transformer_params"),
    [
        ("var-d16", 16, 1024, 216e6),
        ("var-d20", 20, 1280, 414e6),
        ("var-d24", 24, 1536, 708e6),
        ("var-d30", 30, 1920, 1369e6),
    ],
)
def test_full_size_var_shapes_on_meta(name, depth, width, transformer_params):
    m = build(name, device="meta")
    assert m.fingerprint() == {
        "family": "var",
        "depth": depth,
        "width": width,
        "heads": depth,
        "num_scales": 10,
    }
    assert m.scale_schedules == {"256:1:1": [(p, p) for p in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)]}
    assert len(m.blocks) == depth
    assert m.blocks[0].attn.qkv.weight.shape == (3 * width, width)
    assert m.blocks[0].ffn.fc1.weight.shape == (4 * width, width)
    assert m.head.weight.shape == (4096, width)
    assert m.vae.quantize.embedding.weight.shape == (4096, 32)
    assert m.shared_ada_lin.lin.weight.shape == (6 * width, width)
    n = sum(p.numel() for p in m.parameters()) - sum(p.numel() for p in m.vae.parameters())
    assert abs(n - transformer_params) / transformer_params < 0.01
    assert all(p.is_meta for p in m.parameters())


def test_model_card():
    card = model_card("var-d16")
    assert card["family"] == "var" and card["pretrained"] is False
    assert card["fingerprint"]["depth"] == 16
    assert card["config"]["width"] == 1024 and card["image_size"] == 256
    assert card["params"] > 200e6
    assert model_card("hart-tiny")["config"]["diff_steps"] == 8


def test_infinity_names_call_build_infinity_lazily(monkeypatch):
    calls = []

    def fake_build_infinity(config_name, *, seed=0, device="cpu", dtype=torch.float32, **overrides):
        calls.append((config_name, seed, torch.device(device).type, overrides))
        return torch.nn.Linear(2, 2)

    fake = types.ModuleType("toprovar_fx.zoo.infinity")
    fake.build_infinity = fake_build_infinity
    monkeypatch.setitem(sys.modules, "toprovar_fx.zoo.infinity", fake)
    import toprovar_fx.zoo as zoo_pkg

    monkeypatch.setattr(zoo_pkg, "infinity", fake, raising=False)
    for name, cfg in [("infinity-tiny", "tiny"), ("infinity-2b", "2b"), ("infinity-8b", "8b")]:
        build(name, seed=3, device="meta", depth=2)
        assert calls[-1] == (cfg, 3, "meta", {"depth": 2})


def test_var_ref_loads_the_shipped_trained_checkpoint():
    m = build("var-ref", pretrained=True)
    assert m.fingerprint() == {"family": "var", "depth": 8, "width": 288, "heads": 6, "num_scales": 10}
    assert model_card("var-ref")["pretrained"]
    random = build("var-ref")
    w = dict(m.named_parameters())
    differs = [n for n, p in random.named_parameters() if not torch.equal(p, w[n])]
    assert differs  # the trained weights were loaded, not the seeded init
