"""Reading policies: a shipped name, a YAML path, a mapping, or a ``Policy``.

YAML is parsed with ``yaml.safe_load`` only: tags such as ``!!python/object`` are refused by the
parser (never constructed), and the error names the file and line. Shipped policies are the
``*.yaml`` files next to this module, read through ``importlib.resources`` so they work from a
wheel or a zip as well as from a source tree.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from importlib import resources
from typing import Any

import yaml

from .schema import Policy, PolicyError

__all__ = ["load_policy", "list_policies", "read_policy_yaml", "read_shipped"]

_PACKAGE = __package__ or "toprovar_fx.policies"
_YAML_SUFFIXES = (".yaml", ".yml")


def list_policies() -> list[str]:
    """Names of the shipped policies (file stems), sorted."""
    root = resources.files(_PACKAGE)
    return sorted(p.name.rsplit(".", 1)[0] for p in root.iterdir()
                  if p.is_file() and p.name.endswith(_YAML_SUFFIXES))


def read_policy_yaml(text: str, source: str) -> Any:
    """Parse YAML text with ``yaml.safe_load``; syntax errors and unsafe tags become ``PolicyError``
    with the line and column."""
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "<unknown line>"
        problem = " ".join(str(x) for x in (e.context, e.problem) if x)
        if isinstance(e, yaml.constructor.ConstructorError):
            raise PolicyError(source, where, f"refused YAML: {problem}",
                              "plain YAML (mappings, lists, strings, numbers, booleans, null); "
                              "tags such as !!python/object are never constructed") from None
        raise PolicyError(source, where, f"YAML syntax error: {problem}", "well-formed YAML") from None
    except yaml.YAMLError as e:
        raise PolicyError(source, "<yaml>", f"YAML error: {e}", "well-formed YAML") from None


def read_shipped(name: str) -> Mapping:
    """The YAML document of the shipped policy ``name`` as written (presets not applied)."""
    fname = f"{name}.yaml"
    text = resources.files(_PACKAGE).joinpath(fname).read_text(encoding="utf-8")
    return _as_mapping(read_policy_yaml(text, fname), fname)


@functools.lru_cache(maxsize=128)
def _load_shipped(name: str, preset: str | None) -> Policy:
    return Policy.from_dict(read_shipped(name), source=f"{name}.yaml", preset=preset)


def _as_mapping(doc: Any, source: str) -> Mapping:
    if doc is None:
        raise PolicyError(source, "<top>", "the document is empty", "a policy mapping (version, name, schedules, ...)")
    if not isinstance(doc, Mapping):
        raise PolicyError(source, "<top>", f"the document is a {type(doc).__name__}, not a mapping",
                          "a policy mapping (version, name, schedules, ...)")
    return doc


def load_policy(source: str | os.PathLike | Mapping[str, Any] | Policy, *, preset: str | None = None) -> Policy:
    """Load and validate a policy.

    ``source``: a shipped name (``"infinity-2b"``, see :func:`list_policies`), a path to a
    ``.yaml`` / ``.yml`` file, a mapping with the schema's keys, or a ``Policy`` (returned as is;
    ``preset`` must then be ``None``). ``preset``: one of the policy's ``presets`` (``quality``,
    ``balanced``, ``fast`` for the shipped ToProVAR policies); default: its ``default_preset``.
    Every error is a :class:`PolicyError` naming the file, the field and what was expected.
    """
    if preset is not None and not isinstance(preset, str):
        raise PolicyError("<load_policy>", "preset", f"{preset!r} is not a string", "a preset name or None")
    if isinstance(source, Policy):
        if preset is not None:
            raise PolicyError(source.source, "preset", "cannot apply a preset to an already built Policy",
                              "load the policy from its name, file or mapping with preset=...")
        return source
    if isinstance(source, Mapping):
        return Policy.from_dict(source, source="<dict>", preset=preset)
    if isinstance(source, os.PathLike) or (isinstance(source, str) and source.endswith(_YAML_SUFFIXES)):
        path = os.fspath(source)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise PolicyError(path, "<file>", f"cannot read the policy file ({e.strerror or e})",
                              "a readable .yaml/.yml file") from None
        return Policy.from_dict(_as_mapping(read_policy_yaml(text, path), path), source=path, preset=preset)
    if isinstance(source, str):
        names = list_policies()
        if source not in names:
            raise PolicyError("<load_policy>", "policy", f"unknown policy name {source!r}",
                              "a path ending .yaml/.yml, a mapping, or a shipped name: " + ", ".join(names))
        return _load_shipped(source, preset)
    raise PolicyError("<load_policy>", "policy", f"cannot load a policy from a {type(source).__name__}",
                      "a shipped name, a path ending .yaml/.yml, a mapping or a Policy")
