"""Model registry of the zoo: names, configs, and the ``build`` factory.

``build`` constructs every VAR/HART model on the ``meta`` device first, then (unless
``device="meta"``) materialises it on CPU and initialises it from a ``torch.Generator``
seeded with ``seed`` (so weights do not depend on torch's global RNG nor on the target
device), optionally loads a safetensors checkpoint, and finally moves it to ``device`` and
``dtype``. Infinity models come from ``toprovar_fx.zoo.infinity.build_infinity``, imported
only when one is built, as ``build_infinity(config_name, seed=, device=, **overrides)``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from .checkpoint import load_checkpoint
from .hart import HART_1024_PATCH_NUMS, HARTConfig, HARTStyle
from .ref_model import load_into as _load_reference_into
from .ref_model import read_reference_config, var_config_of
from .var import VARConfig, VARStyle

# The trained reference model (docs/reference-model.md): fp16 safetensors shards shipped here.
_VAR_REF_DIR = os.path.join(os.path.dirname(__file__), "weights", "var-ref")


@dataclass(frozen=True)
class ModelSpec:
    """One registered model: its family, config (infinity: its config name) and a line of text."""

    name: str
    family: str
    description: str
    config: VARConfig | str
    pretrained_checkpoint: str | None = None  # path of a shipped safetensors file


def _var(depth: int) -> VARConfig:
    # VAR-d{depth}: width = 64 * depth, heads = depth, V = 4096, Cvae = 32, 256px, 10 scales
    return VARConfig(depth=depth, width=64 * depth, heads=depth, vq_ch=160)


_TINY = {
    "depth": 4,
    "width": 64,
    "heads": 4,
    "num_classes": 10,
    "vocab_size": 512,
    "cvae": 16,
    "vq_ch": 16,
}

_SPECS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec(
            "var-tiny", "var", "tiny VAR-style model for tests (4 blocks, width 64)", VARConfig(**_TINY)
        ),
        ModelSpec("infinity-tiny", "infinity", "tiny Infinity-style model for tests", "tiny"),
        ModelSpec(
            "var-ref",
            "var",
            "trained VAR-style reference model (16 procedural classes, 256px, depth 8, width 288)",
            var_config_of(read_reference_config(_VAR_REF_DIR)),
            pretrained_checkpoint=_VAR_REF_DIR,
        ),
        ModelSpec(
            "hart-tiny",
            "hart",
            "tiny HART-style model for tests (VAR-style blocks + residual diffusion MLP)",
            HARTConfig(**_TINY, diff_width=64, diff_depth=2, diff_steps=8),
        ),
        ModelSpec(
            "var-d16", "var", "VAR-d16 shapes, shared AdaLN (216M transformer), random weights", _var(16)
        ),
        ModelSpec(
            "var-d20", "var", "VAR-d20 shapes, shared AdaLN (414M transformer), random weights", _var(20)
        ),
        ModelSpec(
            "var-d24", "var", "VAR-d24 shapes, shared AdaLN (708M transformer), random weights", _var(24)
        ),
        ModelSpec(
            "var-d30", "var", "VAR-d30 shapes, shared AdaLN (1.37B transformer), random weights", _var(30)
        ),
        ModelSpec("infinity-2b", "infinity", "Infinity-2B shapes, random weights", "2b"),
        ModelSpec("infinity-8b", "infinity", "Infinity-8B shapes, random weights", "8b"),
        ModelSpec(
            "hart-0.7b",
            "hart",
            "HART-0.7B shapes at 1024px (14 scales) + 37M residual diffusion MLP, random weights",
            HARTConfig(
                depth=24,
                width=1536,
                heads=24,
                patch_nums=HART_1024_PATCH_NUMS,
                vq_ch=160,
                diff_width=1024,
                diff_depth=6,
                diff_steps=8,
            ),
        ),
    )
}

_FAMILIES: dict[str, type[VARStyle]] = {"var": VARStyle, "hart": HARTStyle}


def list_models() -> list[str]:
    """Names accepted by ``build``, in registry order."""
    return list(_SPECS)


def _spec(name: str) -> ModelSpec:
    try:
        return _SPECS[name]
    except KeyError:
        raise ValueError(f"unknown zoo model {name!r}; valid names: {', '.join(_SPECS)}") from None


def _config_with(spec: ModelSpec, overrides: dict) -> VARConfig:
    assert isinstance(spec.config, VARConfig)
    valid = {f.name for f in dataclasses.fields(spec.config)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"unknown overrides {unknown} for {spec.name}; valid: {sorted(valid)}")
    return dataclasses.replace(spec.config, **overrides)


def model_card(name: str) -> dict:
    """What the registry knows about ``name``; the model is built on ``meta`` (no weights)."""
    spec = _spec(name)
    model = build(name, device="meta")
    card = {
        "name": spec.name,
        "family": spec.family,
        "description": spec.description,
        "pretrained": spec.pretrained_checkpoint is not None,
        "fingerprint": model.fingerprint(),
        "scale_schedules": model.scale_schedules,
        "params": sum(p.numel() for p in model.parameters()),
    }
    if isinstance(spec.config, str):
        card["config_name"] = spec.config
    else:
        card["config"] = spec.config.to_dict()
        card["image_size"] = spec.config.image_size
    return card


def _resolve_checkpoint(
    spec: ModelSpec, pretrained: bool, checkpoint: str | os.PathLike | None
) -> str | None:
    if pretrained and checkpoint is not None:
        raise ValueError("pass either pretrained=True or checkpoint=path, not both")
    if pretrained:
        if spec.pretrained_checkpoint is None:
            shipped = [s.name for s in _SPECS.values() if s.pretrained_checkpoint] or "none yet"
            raise ValueError(
                f"zoo model {spec.name!r} has no shipped checkpoint (models with one: {shipped}); "
                "build it with random weights (pretrained=False) or pass checkpoint=path"
            )
        return spec.pretrained_checkpoint
    return None if checkpoint is None else os.fspath(checkpoint)


def build(
    name: str,
    *,
    pretrained: bool = False,
    checkpoint: str | os.PathLike | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    **overrides,
) -> nn.Module:
    """Build zoo model ``name`` in eval mode; ``overrides`` replace fields of its config.

    ``device="meta"`` gives a weightless model (shapes and parameter counts only).
    ``checkpoint`` loads safetensors weights with strict key/shape checks; ``pretrained=True``
    loads the shipped checkpoint and fails clearly for models without one.
    """
    spec = _spec(name)
    ckpt = _resolve_checkpoint(spec, pretrained, checkpoint)
    device = torch.device(device)
    if spec.family == "infinity":
        model = _build_infinity(spec, seed, device, overrides)
    else:
        cfg = _config_with(spec, overrides)
        with torch.device("meta"):
            model = _FAMILIES[spec.family](cfg)
        if device.type != "meta":
            model = model.to_empty(device="cpu")
            model.init_weights(torch.Generator(device="cpu").manual_seed(seed))
    if ckpt is not None:
        ckpt = os.fspath(ckpt)
        model = _load_reference_into(model, ckpt) if os.path.isdir(ckpt) else load_checkpoint(model, ckpt)
    return model.to(device=device, dtype=dtype).eval()


def _build_infinity(spec: ModelSpec, seed: int, device: torch.device, overrides: dict) -> nn.Module:
    """Infinity-style models come from their own module (seeded, meta-capable factory)."""
    from . import infinity  # imported lazily: written separately

    assert isinstance(spec.config, str)
    return infinity.build_infinity(spec.config, seed=seed, device=device, **overrides)
