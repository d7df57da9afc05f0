"""Save and load zoo weights as safetensors, with strict key and shape checking.

Only ``safetensors`` is used (never pickle). A checkpoint that does not match the model is
refused with a ``ValueError`` that names the missing, unexpected and mis-shaped keys, so a
checkpoint built for another size or family cannot load silently.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

_MAX_LISTED = 10


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    more = f" (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return f"[{shown}]{more}"


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise ``ValueError`` unless ``state`` has exactly ``model``'s keys with its shapes."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"missing keys {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_listing(unexpected)}")
        if misshaped:
            parts.append(f"mis-shaped keys {_listing(misshaped)}")
        raise ValueError(f"{source} does not match {type(model).__name__}: " + "; ".join(parts))


def save_checkpoint(
    model: nn.Module, path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``model.state_dict()`` to ``path`` (safetensors); the fingerprint goes in the metadata."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = dict(metadata or {})
    fingerprint = getattr(model, "fingerprint", None)
    if callable(fingerprint):
        meta.setdefault("fingerprint", json.dumps(fingerprint(), sort_keys=True))
    save_file(state, os.fspath(path), metadata=meta)


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load safetensors weights from ``path`` into ``model`` (strict keys and shapes); returns it.

    Tensors are cast to the dtype of the parameter they replace. A model on the ``meta``
    device gets the loaded tensors assigned (on CPU).
    """
    path = os.fspath(path)
    try:
        state = load_file(path)
    except SafetensorError as exc:
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc
    check_state_dict(model, state, source=path)
    on_meta = any(p.is_meta for p in model.parameters())
    model.load_state_dict(state, strict=True, assign=on_meta)
    return model
