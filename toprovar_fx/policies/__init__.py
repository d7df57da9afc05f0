"""Pruning policies: typed, versioned config objects with YAML as their serialisation.

>>> from toprovar_fx.policies import load_policy, list_policies
>>> p = load_policy("infinity-2b", preset="fast")       # a shipped name, a .yaml path or a dict
>>> p.resolved("1024:1:1").min_start                      # scale refs resolved, 0-based
9

Schema, semantics and the shipped policies: ``docs/policies.md``.
"""

from .loader import list_policies, load_policy, read_policy_yaml, read_shipped
from .schema import (
    SCHEMA_VERSION,
    CFGHandling,
    Fallback,
    FrozenDict,
    KVHandling,
    LayerStage,
    ModelFingerprint,
    Policy,
    PolicyError,
    ResolvedScales,
    Restore,
    ScaleRef,
    ScaleStage,
    TokenStage,
    parse_scale_ref,
    resolve_scale_ref,
)

__all__ = [
    "SCHEMA_VERSION",
    "CFGHandling",
    "Fallback",
    "FrozenDict",
    "KVHandling",
    "LayerStage",
    "ModelFingerprint",
    "Policy",
    "PolicyError",
    "ResolvedScales",
    "Restore",
    "ScaleRef",
    "ScaleStage",
    "TokenStage",
    "list_policies",
    "load_policy",
    "parse_scale_ref",
    "read_policy_yaml",
    "read_shipped",
    "resolve_scale_ref",
]
