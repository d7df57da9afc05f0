"""Reference VAR-family models written from scratch (VAR-, HART- and Infinity-style).

Public API: ``build(name, ...)``, ``list_models()``, ``model_card(name)``; see
``docs/architecture.md`` ("Zoo model contract") and ``docs/zoo.md``.
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .registry import build, list_models, model_card

__all__ = ["build", "list_models", "load_checkpoint", "model_card", "save_checkpoint"]
