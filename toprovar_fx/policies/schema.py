"""Typed, versioned policy objects: what the pruning runtime reads.

A *policy* says, for one model (or model family) and one method (ToProVAR, or a baseline such as
FastVAR / SkipVAR / keep-everything), which scales, layers and tokens are pruned and how pruned
tokens are restored. YAML is only its serialisation (``loader.py``); the objects here are frozen
dataclasses that validate themselves in ``__post_init__``, so a ``Policy`` built in Python is as
safe as one read from a file.

Scales are never addressed by width. A *scale ref* is a position in the schedule:

* an ``int >= 1`` is a 1-based index (``1`` = the first, coarsest scale);
* an ``int <= -1`` counts from the end (``-1`` = the last scale);
* a ``float`` in ``(0, 1]`` is a fraction of the schedule length ``K``:
  index ``max(1, ceil(f * K))`` (so ``1.0`` is the last scale, **not** the first);
* ``0`` and anything else is invalid.

so one policy covers every resolution and aspect ratio of a model. ``resolve_scale_ref`` turns a
ref into a 0-based index for a schedule of ``K`` scales. Layers are 0-based block indices.

Every problem raises :class:`PolicyError` (a ``ValueError``) whose message reads
``"{source}: {field.path}: {problem}; expected {allowed}"``.

The field-by-field reference, with the semantics the runtime implements, is ``docs/policies.md``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "SCHEMA_VERSION",
    "PolicyError",
    "FrozenDict",
    "ScaleRef",
    "parse_scale_ref",
    "resolve_scale_ref",
    "ModelFingerprint",
    "ScaleStage",
    "LayerStage",
    "TokenStage",
    "Restore",
    "KVHandling",
    "CFGHandling",
    "Fallback",
    "ResolvedScales",
    "Policy",
]

SCHEMA_VERSION = 1

# Allowed values of every enumerated field, in one place (the docs list the same values).
FAMILIES = ("var", "infinity", "hart", "any")
SCALE_MODES = ("off", "prune_from_D", "skip_after_D")
SCALE_CRITERIA = ("rho", "fixed")
RHO_DIRECTIONS = ("le", "ge")
LAYER_MODES = ("online", "frozen", "off")
LAYER_CLASSES = ("global", "detail")
ACTIONS = ("keep", "skip", "prune_tokens")
SELECTIONS = ("entropy", "frequency", "random")
PHIS = ("linear", "constant")
NORMALIZATIONS = ("mean", "sum")
SUBLAYERS = ("self_attn", "cross_attn", "ffn")
TOKEN_CFG = ("shared", "per_row")
ENTROPY_SOURCES = ("latest_full", "measure_layer")
SELECT_PER = ("block", "sublayer")
RESTORE_MODES = ("identity", "cached_scale")
INTERPOLATIONS = ("area", "bilinear", "nearest")
KV_PRUNED = ("drop",)
KV_NOT_YET = ("keep",)
ON_MISMATCH = ("dense", "error")

# Source label of objects built in Python (``from_dict`` relabels errors with the real source).
PYTHON_SOURCE = "<python>"

# Tolerance for ``ceil(f * K)`` so that e.g. 0.7 * 10 = 7.000000000000001 resolves to 7, not 8.
_FRACTION_EPS = 1e-9

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

ScaleRef = int | float


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


class PolicyError(ValueError):
    """A policy is invalid (or cannot be found / parsed).

    Attributes ``source`` (file name, path or ``<dict>``), ``field`` (dotted path such as
    ``token.alpha_max``), ``problem`` and ``expected`` (what would have been accepted) make the
    message ``"{source}: {field}: {problem}; expected {expected}"``.
    """

    def __init__(self, source: str, field: str, problem: str, expected: str | None = None) -> None:
        self.source = source
        self.field = field
        self.problem = problem
        self.expected = expected
        msg = f"{source}: {field}: {problem}"
        if expected:
            msg += f"; expected {expected}"
        super().__init__(msg)

    def relocated(self, source: str, prefix: str = "") -> PolicyError:
        """The same error attributed to ``source`` with ``prefix.`` prepended to the field path."""
        path = f"{prefix}.{self.field}" if prefix and self.field else (prefix or self.field)
        return PolicyError(source, path, self.problem, self.expected)


def _err(field_path: str, problem: str, expected: str | None = None) -> PolicyError:
    return PolicyError(PYTHON_SOURCE, field_path, problem, expected)


# --------------------------------------------------------------------------------------------
# a read-only mapping that pickles, deep-copies and hashes
# --------------------------------------------------------------------------------------------


class FrozenDict(dict):
    """A ``dict`` that refuses mutation, hashes by content and survives pickle/deepcopy.

    Used for the mapping-valued fields of the frozen dataclasses (schedules, ratios, frozen layer
    lists, actions) so that policies are hashable and cannot be edited behind the runtime's back.
    """

    def _readonly(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("policy mappings are read-only; build a new Policy (e.g. dataclasses.replace)")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _readonly  # type: ignore[assignment]
    __ior__ = _readonly  # type: ignore[assignment]

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(((repr(k), v) for k, v in self.items()), key=lambda kv: kv[0])))

    def __reduce__(self) -> tuple:
        return (FrozenDict, (dict(self),))

    def __copy__(self) -> FrozenDict:
        return self

    def __deepcopy__(self, memo: dict) -> FrozenDict:
        return FrozenDict({copy.deepcopy(k, memo): copy.deepcopy(v, memo) for k, v in self.items()})

    def __repr__(self) -> str:
        return f"FrozenDict({dict.__repr__(self)})"


# --------------------------------------------------------------------------------------------
# value checks (each returns the normalised value or raises PolicyError with the field path)
# --------------------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    return repr(v) if isinstance(v, str) else str(v)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _number(path: str, v: Any, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False,
            lo_name: str | None = None, hi_name: str | None = None) -> float:
    """A finite real number in the interval; ints are accepted and returned as float."""
    lo_txt = f"{lo_name}={lo}" if lo_name else f"{lo:g}"
    hi_txt = "inf" if hi == math.inf else (f"{hi_name}={hi}" if hi_name else f"{hi:g}")
    interval = f"{'(' if lo_open else '['}{lo_txt}, {hi_txt}{')' if hi_open or hi == math.inf else ']'}"
    if not _is_number(v):
        raise _err(path, f"{_fmt(v)} is not a number", f"a number in {interval}")
    x = float(v)
    below = x <= lo if lo_open else x < lo
    above = x >= hi if hi_open else x > hi
    if below or above:
        raise _err(path, f"{_fmt(v)} is out of range", f"a number in {interval}")
    return x


def _integer(path: str, v: Any, lo: int, hi: int | None = None) -> int:
    """An ``int`` (not bool, not an integral float) in ``[lo, hi]`` (``hi=None``: unbounded)."""
    rng = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
    if isinstance(v, bool) or not isinstance(v, int):
        raise _err(path, f"{_fmt(v)} is not an integer", rng)
    if v < lo or (hi is not None and v > hi):
        raise _err(path, f"{v} is out of range", rng)
    return v


def _enum(path: str, v: Any, allowed: Sequence[str]) -> str:
    """One of ``allowed``. YAML 1.1 reads a bare ``off`` as ``False``: taken as ``"off"`` when allowed."""
    if v is False and "off" in allowed:
        return "off"
    if not isinstance(v, str) or v not in allowed:
        hint = ""
        if isinstance(v, str):
            close = difflib.get_close_matches(v, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise _err(path, f"{_fmt(v)} is not allowed{hint}", "one of " + " | ".join(allowed))
    return v


def _boolean(path: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise _err(path, f"{_fmt(v)} is not a boolean", "true or false")
    return v


def _sequence(path: str, v: Any, what: str) -> list:
    if isinstance(v, (str, bytes, Mapping)) or not isinstance(v, Iterable):
        raise _err(path, f"{_fmt(v)} is not a list", what)
    return list(v)


def parse_scale_ref(v: Any, path: str = "scale ref") -> ScaleRef:
    """Check the *form* of a scale ref (``int != 0`` or ``float`` in ``(0, 1]``); strings of
    numbers (YAML mapping keys such as ``"10"`` or ``"0.75"``) are converted.

    Whether it fits a schedule is checked by :func:`resolve_scale_ref`.
    """
    expected = "a scale ref: an int >= 1 (1-based), an int <= -1 (from the end) or a float in (0, 1] (fraction)"
    if isinstance(v, str):
        s = v.strip()
        try:
            v = int(s)
        except ValueError:
            try:
                v = float(s)
            except ValueError:
                raise _err(path, f"{v!r} is not a scale ref", expected) from None
    if isinstance(v, bool) or not _is_number(v):
        raise _err(path, f"{_fmt(v)} is not a scale ref", expected)
    if isinstance(v, int):
        if v == 0:
            raise _err(path, "0 is not a scale ref (indices are 1-based)", expected)
        return v
    if not 0.0 < v <= 1.0:
        raise _err(path, f"{v} is out of range for a fractional scale ref", expected)
    return float(v)


def resolve_scale_ref(ref: ScaleRef, num_scales: int, *, field: str = "scale ref",
                      source: str = PYTHON_SOURCE) -> int:
    """0-based index of scale ref ``ref`` in a schedule of ``num_scales`` scales.

    ``3 -> 2``; ``-1 -> num_scales - 1``; ``0.5 -> ceil(0.5 * K) - 1``. Raises :class:`PolicyError`
    if the ref is malformed or falls outside the schedule.
    """
    try:
        ref = parse_scale_ref(ref, field)
    except PolicyError as e:
        raise e.relocated(source) from None
    if isinstance(num_scales, bool) or not isinstance(num_scales, int) or num_scales < 1:
        raise PolicyError(source, field, f"cannot resolve against a schedule of {num_scales!r} scales",
                          "num_scales >= 1")
    k = num_scales
    if isinstance(ref, float):
        return max(1, math.ceil(ref * k - _FRACTION_EPS)) - 1
    if 1 <= ref <= k:
        return ref - 1
    if -k <= ref <= -1:
        return k + ref
    raise PolicyError(source, field, f"scale ref {ref} is out of range for a schedule of {k} scales",
                      f"an int in [1, {k}] or [-{k}, -1], or a float in (0, 1]")


def _ref_sort_key(r: ScaleRef) -> tuple:
    return (isinstance(r, float), r)


# --------------------------------------------------------------------------------------------
# dataclasses
# --------------------------------------------------------------------------------------------


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)


def _plain(v: Any) -> Any:
    """Dataclass field value -> plain YAML/JSON-able value (tuples -> lists, FrozenDict -> dict)."""
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    return v


class _Section:
    """Shared ``to_dict`` / ``from_dict`` of the section dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, d: Any, *, path: str = "", source: str = "<dict>") -> Any:
        """Build from a mapping; unknown keys and bad values raise ``PolicyError`` naming ``path``."""
        label = path or cls.__name__
        if d is None:
            d = {}
        if not isinstance(d, Mapping):
            raise PolicyError(source, label, f"{_fmt(d)} is not a mapping", "a mapping of " + ", ".join(
                f.name for f in dataclasses.fields(cls)))  # type: ignore[arg-type]
        _check_keys(d, [f.name for f in dataclasses.fields(cls)], path, source)  # type: ignore[arg-type]
        try:
            return cls(**d)
        except PolicyError as e:
            raise e.relocated(source, path) from None


def _check_keys(d: Mapping, valid: Sequence[str], path: str, source: str) -> None:
    for k in d:
        if k not in valid:
            close = difflib.get_close_matches(str(k), valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            where = f"{path}.{k}" if path else str(k)
            raise PolicyError(source, where, f"unknown key{hint}", "one of " + ", ".join(valid))


@dataclass(frozen=True)
class ModelFingerprint(_Section):
    """What the policy was written for; each field ``None`` = not checked.

    ``family``: ``var | infinity | hart | any`` (``any`` = not checked). ``num_scales`` must equal
    the length of at least one schedule of the policy.
    """

    family: str | None = None
    depth: int | None = None
    width: int | None = None
    heads: int | None = None
    num_scales: int | None = None

    def __post_init__(self) -> None:
        if self.family is not None:
            _set(self, "family", _enum("family", self.family, FAMILIES))
        for name in ("depth", "width", "heads", "num_scales"):
            v = getattr(self, name)
            if v is not None:
                _integer(name, v, 1)
        if self.width is not None and self.heads is not None and self.width % self.heads:
            raise _err("heads", f"width {self.width} is not a multiple of heads {self.heads}",
                       "heads dividing width")

    def check(self, observed: Mapping[str, Any]) -> list[str]:
        """Mismatch messages (empty = compatible). Fields the observer does not report are skipped."""
        out = []
        for name in ("family", "depth", "width", "heads", "num_scales"):
            want = getattr(self, name)
            if want is None or (name == "family" and want == "any"):
                continue
            got = observed.get(name)
            if got is None:
                continue
            if got != want:
                out.append(f"model.{name}: expected {_fmt(want)}, observed {_fmt(got)}")
        return out


@dataclass(frozen=True)
class ScaleStage(_Section):
    """Depth localisation: which scale ``D`` pruning starts at (SPEC section 4, "Scale").

    ``mode``: ``off`` (nothing is pruned or skipped by the stages; ``skip_scales`` / ``cfg`` still
    apply), ``prune_from_D`` (layer and token stages act at scales ``>= D``), ``skip_after_D``
    (they act at ``D``; every scale after ``D`` is skipped). ``criterion``: ``rho`` (``D`` = the
    first scale in ``[min_start_scale, max_start_scale]`` whose low-entropy ratio ``rho_s``
    satisfies ``rho_s <= tau`` (``direction: le``) or ``>= tau`` (``ge``), else ``max_start_scale``)
    or ``fixed`` (``D = min_start_scale``). ``measure_layer``: the 0-based block whose
    self-attention entropy gives ``rho_s``.
    """

    mode: str = "prune_from_D"
    criterion: str = "rho"
    direction: str = "le"
    tau: float = 0.4
    measure_layer: int = 1
    min_start_scale: ScaleRef = 0.7
    max_start_scale: ScaleRef = -1

    def __post_init__(self) -> None:
        _set(self, "mode", _enum("mode", self.mode, SCALE_MODES))
        _set(self, "criterion", _enum("criterion", self.criterion, SCALE_CRITERIA))
        _set(self, "direction", _enum("direction", self.direction, RHO_DIRECTIONS))
        _set(self, "tau", _number("tau", self.tau, 0.0, 1.0))
        _integer("measure_layer", self.measure_layer, 0)
        _set(self, "min_start_scale", parse_scale_ref(self.min_start_scale, "min_start_scale"))
        _set(self, "max_start_scale", parse_scale_ref(self.max_start_scale, "max_start_scale"))


_DEFAULT_ACTIONS = FrozenDict({"global": "keep", "detail": "prune_tokens"})


@dataclass(frozen=True)
class LayerStage(_Section):
    """Semantic scope: Global vs Detail layers and what happens to each (SPEC section 4, "Layer").

    ``mode``: ``online`` (per generation: SVD of each layer's spatial entropy map at
    ``representative_scale``, ``R = exp(-beta (sigma1/sigma2 - 1))``; Detail iff
    ``R >= detail_threshold`` and ``R`` is outside ``ambiguity_band``), ``frozen`` (classes from
    ``frozen``; unlisted layers are Global; ``R = 1`` for Detail, ``0`` for Global) or ``off``
    (every layer is Detail with ``R = 1``). ``center``: subtract the map's mean before the SVD.
    ``actions``: per class, ``keep | skip | prune_tokens`` at scales ``>= D``. ``layers``:
    optional inclusive 0-based ``[first, last]``; layers outside always keep.
    """

    mode: str = "online"
    representative_scale: ScaleRef = 0.5
    beta: float = 1.0
    detail_threshold: float = 0.5
    ambiguity_band: tuple[float, float] = (0.4, 0.6)
    center: bool = True
    frozen: FrozenDict | None = None
    actions: FrozenDict = _DEFAULT_ACTIONS
    layers: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        _set(self, "mode", _enum("mode", self.mode, LAYER_MODES))
        _set(self, "representative_scale", parse_scale_ref(self.representative_scale, "representative_scale"))
        _set(self, "beta", _number("beta", self.beta, 0.0, math.inf, lo_open=True))
        _set(self, "detail_threshold", _number("detail_threshold", self.detail_threshold, 0.0, 1.0))
        band = _sequence("ambiguity_band", self.ambiguity_band, "a pair [lo, hi] with 0 <= lo <= hi <= 1")
        if len(band) != 2:
            raise _err("ambiguity_band", f"{band} has {len(band)} entries", "a pair [lo, hi] with 0 <= lo <= hi <= 1")
        lo = _number("ambiguity_band[0]", band[0], 0.0, 1.0)
        hi = _number("ambiguity_band[1]", band[1], lo, 1.0, lo_name="lo")
        _set(self, "ambiguity_band", (lo, hi))
        _boolean("center", self.center)

        actions = self.actions if self.actions is not None else {}
        if not isinstance(actions, Mapping):
            raise _err("actions", f"{_fmt(actions)} is not a mapping", "a mapping {global: ACTION, detail: ACTION}")
        _check_keys(actions, LAYER_CLASSES, "actions", PYTHON_SOURCE)
        merged = dict(_DEFAULT_ACTIONS)
        for cls_name, act in actions.items():
            merged[cls_name] = _enum(f"actions.{cls_name}", act, ACTIONS)
        _set(self, "actions", FrozenDict(merged))

        if self.mode == "frozen":
            if self.frozen is None:
                raise _err("frozen", "is required when mode is frozen",
                           "a mapping {global: [layer, ...], detail: [layer, ...]} of 0-based layer indices")
            if not isinstance(self.frozen, Mapping):
                raise _err("frozen", f"{_fmt(self.frozen)} is not a mapping",
                           "a mapping {global: [layer, ...], detail: [layer, ...]}")
            _check_keys(self.frozen, LAYER_CLASSES, "frozen", PYTHON_SOURCE)
            lists: dict[str, tuple[int, ...]] = {}
            for cls_name in LAYER_CLASSES:
                raw = self.frozen.get(cls_name) or []
                items = _sequence(f"frozen.{cls_name}", raw, "a list of 0-based layer indices")
                idx = [_integer(f"frozen.{cls_name}[{i}]", x, 0) for i, x in enumerate(items)]
                if len(set(idx)) != len(idx):
                    dup = sorted({x for x in idx if idx.count(x) > 1})
                    raise _err(f"frozen.{cls_name}", f"layer(s) {dup} listed more than once", "distinct indices")
                lists[cls_name] = tuple(sorted(idx))
            both = sorted(set(lists["global"]) & set(lists["detail"]))
            if both:
                raise _err("frozen", f"layer(s) {both} are both global and detail", "disjoint global and detail lists")
            _set(self, "frozen", FrozenDict(lists))
        elif self.frozen is not None:
            raise _err("frozen", f"is only used when mode is frozen (mode is {self.mode})", "null or mode: frozen")

        if self.layers is not None:
            rng = _sequence("layers", self.layers, "null or [first, last] (0-based, inclusive)")
            if len(rng) != 2:
                raise _err("layers", f"{rng} has {len(rng)} entries", "null or [first, last] (0-based, inclusive)")
            first = _integer("layers[0]", rng[0], 0)
            last = _integer("layers[1]", rng[1], first)
            _set(self, "layers", (first, last))

    def eligible(self, layer: int) -> bool:
        """Whether ``layer`` (0-based) may get a non-``keep`` action (the ``layers`` range)."""
        return self.layers is None or self.layers[0] <= layer <= self.layers[1]


@dataclass(frozen=True)
class TokenStage(_Section):
    """Semantic salience: which tokens a ``prune_tokens`` layer keeps (SPEC section 4, "Token").

    ``q_i = phi(s) R(l) Hhat_i``; ``P_keep(i) = 1 - clip(alpha_min + (alpha_max - alpha_min) q_i,
    0, 1)``; ``k = max(round(sum P_keep), ceil(min_keep_ratio N))`` rounded up to a multiple of
    ``bucket`` (capped at ``N``); the ``k`` tokens with the highest ``P_keep`` are kept. With
    ``ratios`` the number pruned at a listed scale is ``floor(ratio N)`` instead (no
    ``min_keep_ratio``; ``k`` may be 0) and unlisted scales are not pruned. See docs/policies.md.
    """

    selection: str = "entropy"
    alpha_min: float = 0.0
    alpha_max: float = 0.9
    phi: str = "linear"
    normalization: str = "mean"
    min_keep_ratio: float = 0.1
    bucket: int = 64
    ratios: FrozenDict | None = None
    sublayers: tuple[str, ...] = SUBLAYERS
    cfg: str = "shared"
    entropy_source: str = "latest_full"
    select_per: str = "block"
    seed: int = 0

    def __post_init__(self) -> None:
        _set(self, "selection", _enum("selection", self.selection, SELECTIONS))
        _set(self, "alpha_min", _number("alpha_min", self.alpha_min, 0.0, 1.0))
        _set(self, "alpha_max", _number("alpha_max", self.alpha_max, self.alpha_min, 1.0, lo_name="alpha_min"))
        _set(self, "phi", _enum("phi", self.phi, PHIS))
        _set(self, "normalization", _enum("normalization", self.normalization, NORMALIZATIONS))
        _set(self, "min_keep_ratio", _number("min_keep_ratio", self.min_keep_ratio, 0.0, 1.0, lo_open=True))
        _integer("bucket", self.bucket, 1)
        if self.ratios is not None:
            if not isinstance(self.ratios, Mapping):
                raise _err("ratios", f"{_fmt(self.ratios)} is not a mapping",
                           "null or a mapping {scale_ref: prune_ratio in [0, 1]}")
            norm: dict[ScaleRef, float] = {}
            for k, v in self.ratios.items():
                ref = parse_scale_ref(k, f"ratios[{k!r}]")
                if ref in norm:  # e.g. both 10 and "10"
                    raise _err(f"ratios[{k!r}]", f"scale ref {ref} is listed more than once", "distinct scale refs")
                norm[ref] = _number(f"ratios[{k!r}]", v, 0.0, 1.0)
            if not norm:
                raise _err("ratios", "is empty", "null or a non-empty mapping {scale_ref: prune_ratio}")
            _set(self, "ratios", FrozenDict(sorted(norm.items(), key=lambda kv: _ref_sort_key(kv[0]))))
        subs = _sequence("sublayers", self.sublayers, "a non-empty subset of " + ", ".join(SUBLAYERS))
        if not subs:
            raise _err("sublayers", "is empty", "a non-empty subset of " + ", ".join(SUBLAYERS))
        subs = [_enum(f"sublayers[{i}]", s, SUBLAYERS) for i, s in enumerate(subs)]
        if len(set(subs)) != len(subs):
            raise _err("sublayers", f"{subs} lists a sublayer twice", "distinct entries")
        _set(self, "sublayers", tuple(s for s in SUBLAYERS if s in subs))  # canonical order
        _set(self, "cfg", _enum("cfg", self.cfg, TOKEN_CFG))
        _set(self, "entropy_source", _enum("entropy_source", self.entropy_source, ENTROPY_SOURCES))
        _set(self, "select_per", _enum("select_per", self.select_per, SELECT_PER))
        _integer("seed", self.seed, 0)



@dataclass(frozen=True)
class Restore(_Section):
    """How a pruned token's sublayer output is restored.

    ``identity``: the token passes the sublayer unchanged. ``cached_scale``: FastVAR's restoration,
    the sublayer's output recorded (on all tokens) at ``cached_scale`` and resized to the current
    scale with ``interpolation``; ``cached_scale`` must precede every scale that can be pruned.
    """

    mode: str = "identity"
    cached_scale: ScaleRef | None = None
    interpolation: str = "area"

    def __post_init__(self) -> None:
        _set(self, "mode", _enum("mode", self.mode, RESTORE_MODES))
        if self.mode == "cached_scale":
            if self.cached_scale is None:
                raise _err("cached_scale", "is required when mode is cached_scale",
                           "a scale ref before every prunable scale")
            _set(self, "cached_scale", parse_scale_ref(self.cached_scale, "cached_scale"))
        elif self.cached_scale is not None:
            raise _err("cached_scale", "is only used when mode is cached_scale", "null or mode: cached_scale")
        _set(self, "interpolation", _enum("interpolation", self.interpolation, INTERPOLATIONS))


@dataclass(frozen=True)
class KVHandling(_Section):
    """K/V of pruned tokens. ``drop``: not appended to the layer's K/V cache (the only mode)."""

    pruned_tokens: str = "drop"

    def __post_init__(self) -> None:
        if self.pruned_tokens in KV_NOT_YET:
            raise _err("pruned_tokens", f"{self.pruned_tokens!r} is not supported yet", "drop")
        _set(self, "pruned_tokens", _enum("pruned_tokens", self.pruned_tokens, KV_PRUNED))


@dataclass(frozen=True)
class CFGHandling(_Section):
    """Classifier-free guidance. ``reuse_cond_from``: from this scale on, the unconditional half of
    the batch reuses the conditional half (SkipVAR's unconditional-branch replacement); null = off."""

    reuse_cond_from: ScaleRef | None = None

    def __post_init__(self) -> None:
        if self.reuse_cond_from is not None:
            _set(self, "reuse_cond_from", parse_scale_ref(self.reuse_cond_from, "reuse_cond_from"))


@dataclass(frozen=True)
class Fallback(_Section):
    """What happens when the policy does not fit the traced model (fingerprint mismatch, or a
    token count that matches no schedule): ``dense`` (one warning, run unpruned) or ``error``."""

    on_mismatch: str = "dense"

    def __post_init__(self) -> None:
        _set(self, "on_mismatch", _enum("on_mismatch", self.on_mismatch, ON_MISMATCH))


@dataclass(frozen=True)
class ResolvedScales:
    """A policy's scale refs resolved for one schedule; every index is 0-based.

    ``prunable``: the scales at which a ``prune_tokens`` action can take effect (for ``ratios``
    the listed scales with a positive ratio, else ``[min_start, num_scales)``; empty when the
    scale stage is off or no action prunes tokens).
    """

    schedule: str
    hw: tuple[tuple[int, int], ...]
    num_scales: int
    min_start: int
    max_start: int
    representative: int
    cached_scale: int | None
    ratios: FrozenDict | None
    skip_scales: frozenset[int]
    reuse_cond_from: int | None
    prunable: tuple[int, ...]


_TOP_LEVEL_KEYS = ("version", "name", "description", "model", "schedules", "scale", "layer", "token",
                   "restore", "kv", "cfg", "skip_scales", "fallback", "presets", "default_preset")
_SECTIONS: dict[str, type] = {
    "model": ModelFingerprint,
    "scale": ScaleStage,
    "layer": LayerStage,
    "token": TokenStage,
    "restore": Restore,
    "kv": KVHandling,
    "cfg": CFGHandling,
    "fallback": Fallback,
}
# Presets may override these sections; replaced whole rather than merged key by key: tables.
_PRESET_FORBIDDEN = ("version", "name", "presets", "default_preset")
_REPLACED_WHOLE = {("schedules",), ("token", "ratios"), ("layer", "frozen")}


def _deep_merge(base: Any, over: Any, path: tuple[str, ...] = ()) -> Any:
    """``over`` merged into ``base``: mappings key by key, everything else (and tables) replaced."""
    if isinstance(base, Mapping) and isinstance(over, Mapping) and path not in _REPLACED_WHOLE:
        out = dict(base)
        for k, v in over.items():
            out[k] = _deep_merge(base[k], v, (*path, str(k))) if k in base else copy.deepcopy(v)
        return out
    return copy.deepcopy(over)


def _schedule(name: Any, raw: Any) -> tuple[tuple[int, int], ...]:
    path = f"schedules.{name}"
    if not isinstance(name, str):
        raise _err(f"schedules.{name}", f"schedule name {name!r} is not a string (quote it: YAML reads "
                   "1024:1:1 as a base-60 integer)", 'a string such as "1024:1:1"')
    items = _sequence(path, raw, "a list of [h, w] pairs with strictly increasing h*w")
    if not items:
        raise _err(path, "is empty", "a non-empty list of [h, w] pairs")
    out: list[tuple[int, int]] = []
    for i, hw in enumerate(items):
        pair = _sequence(f"{path}[{i}]", hw, "a pair [h, w] of integers >= 1")
        if len(pair) != 2:
            raise _err(f"{path}[{i}]", f"{pair} has {len(pair)} entries", "a pair [h, w] of integers >= 1")
        h = _integer(f"{path}[{i}][0]", pair[0], 1)
        w = _integer(f"{path}[{i}][1]", pair[1], 1)
        if out and h * w <= out[-1][0] * out[-1][1]:
            raise _err(f"{path}[{i}]", f"[{h}, {w}] has {h * w} tokens, not more than the previous scale's "
                       f"{out[-1][0] * out[-1][1]}", "strictly increasing h*w along the schedule")
        out.append((h, w))
    return tuple(out)


@dataclass(frozen=True)
class Policy:
    """One validated pruning policy (see the module docstring and docs/policies.md).

    Build with :meth:`from_dict` (or ``toprovar_fx.policies.load_policy``); ``source`` names the
    file or ``<dict>`` in error messages; ``preset`` records which preset was applied (not part of
    equality or of :meth:`canonical_hash`).
    """

    version: int
    name: str
    schedules: FrozenDict
    description: str = ""
    model: ModelFingerprint = field(default_factory=ModelFingerprint)
    scale: ScaleStage = field(default_factory=ScaleStage)
    layer: LayerStage = field(default_factory=LayerStage)
    token: TokenStage = field(default_factory=TokenStage)
    restore: Restore = field(default_factory=Restore)
    kv: KVHandling = field(default_factory=KVHandling)
    cfg: CFGHandling = field(default_factory=CFGHandling)
    skip_scales: tuple[ScaleRef, ...] | None = None
    fallback: Fallback = field(default_factory=Fallback)
    source: str = field(default=PYTHON_SOURCE, compare=False)
    preset: str | None = field(default=None, compare=False)

    # ---------------------------------------------------------------- validation
    def __post_init__(self) -> None:
        try:
            self._validate()
        except PolicyError as e:
            if e.source == PYTHON_SOURCE and self.source != PYTHON_SOURCE:
                raise e.relocated(self.source) from None
            raise

    def _validate(self) -> None:
        if isinstance(self.version, bool) or self.version != SCHEMA_VERSION:
            raise _err("version", f"{_fmt(self.version)} is not supported", f"{SCHEMA_VERSION}")
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise _err("name", f"{_fmt(self.name)} is not a valid policy name",
                       "a non-empty string of letters, digits, '.', '_' or '-'")
        if not isinstance(self.description, str):
            raise _err("description", f"{_fmt(self.description)} is not a string", "a string")
        for sec, typ in _SECTIONS.items():
            if not isinstance(getattr(self, sec), typ):
                raise _err(sec, f"is a {type(getattr(self, sec)).__name__}", f"a {typ.__name__}")

        if not isinstance(self.schedules, Mapping) or not self.schedules:
            raise _err("schedules", "is empty" if isinstance(self.schedules, Mapping) else
                       f"{_fmt(self.schedules)} is not a mapping", 'a non-empty mapping name -> [[h, w], ...], e.g. "1024:1:1": [[1, 1], [2, 2], ...]')
        _set(self, "schedules", FrozenDict({n: _schedule(n, s) for n, s in self.schedules.items()}))

        if self.skip_scales is not None:
            refs = _sequence("skip_scales", self.skip_scales, "null or a list of scale refs")
            _set(self, "skip_scales", tuple(parse_scale_ref(r, f"skip_scales[{i}]") for i, r in enumerate(refs)))

        m = self.model
        lengths = sorted({len(s) for s in self.schedules.values()})
        if m.num_scales is not None and m.num_scales not in lengths:
            raise _err("model.num_scales", f"{m.num_scales} matches no schedule (schedule lengths: {lengths})",
                       "the length of at least one schedule")
        if m.depth is not None:
            self._check_depth(m.depth)
        for name in self.schedules:
            self._resolve(name)  # resolves every scale ref, raising on the first misfit

    def _check_depth(self, depth: int) -> None:
        sc, ly = self.scale, self.layer
        if sc.measure_layer >= depth:
            raise _err("scale.measure_layer", f"{sc.measure_layer} is out of range",
                       f"an integer in [0, depth-1={depth - 1}]")
        if ly.frozen is not None:
            for cls_name, idx in ly.frozen.items():
                bad = [i for i in idx if i >= depth]
                if bad:
                    raise _err(f"layer.frozen.{cls_name}", f"layer(s) {bad} out of range",
                               f"0-based indices in [0, depth-1={depth - 1}]")
        if ly.layers is not None and ly.layers[1] >= depth:
            raise _err("layer.layers", f"{list(ly.layers)} reaches past the last layer",
                       f"0 <= first <= last <= depth-1={depth - 1}")

    # ---------------------------------------------------------------- scale refs
    def _prunes_tokens(self) -> bool:
        return self.scale.mode != "off" and "prune_tokens" in self.layer.actions.values()

    def _acts(self) -> bool:
        return self.scale.mode != "off" and any(a != "keep" for a in self.layer.actions.values())

    @property
    def needs_entropy(self) -> bool:
        """Whether measured entropy decides anything: the start scale (``criterion: rho``), which
        tokens are kept (``selection: entropy``) or how many (the gate, whenever tokens are pruned
        without fixed ``token.ratios``). Blocks ``0..scale.measure_layer`` then run dense at every
        scale, because the scale's decision waits for the measured block's entropy."""
        gate = self.token.ratios is None and self._prunes_tokens()
        return self.scale.criterion == "rho" or self.token.selection == "entropy" or gate

    def resolved(self, schedule: str) -> ResolvedScales:
        """Every scale ref of the policy resolved (0-based) for ``schedule``."""
        try:
            return self._resolve(schedule)
        except PolicyError as e:
            raise (e.relocated(self.source) if e.source == PYTHON_SOURCE else e) from None

    def _resolve(self, schedule: str) -> ResolvedScales:
        """``resolved`` without relabelling; checks the rules that depend on the schedule length."""
        if schedule not in self.schedules:
            raise _err("schedules", f"no schedule named {schedule!r}",
                              "one of " + ", ".join(map(repr, self.schedules)))
        hw = self.schedules[schedule]
        k = len(hw)
        tag = f" (schedule {schedule!r}, {k} scales)"

        def res(ref: ScaleRef, path: str) -> int:
            try:
                return resolve_scale_ref(ref, k, field=path)
            except PolicyError as e:
                raise _err(path, e.problem + tag, e.expected) from None

        sc = self.scale
        lo = res(sc.min_start_scale, "scale.min_start_scale")
        hi = res(sc.max_start_scale, "scale.max_start_scale")
        if lo > hi:
            raise _err("scale.max_start_scale", f"resolves to scale {hi + 1}, before min_start_scale "
                       f"(scale {lo + 1}){tag}", "max_start_scale at or after min_start_scale")
        rep = res(self.layer.representative_scale, "layer.representative_scale")
        if self.layer.mode == "online" and self._acts() and rep >= lo:
            raise _err("layer.representative_scale", f"resolves to scale {rep + 1}, not before the earliest "
                       f"start scale (scale.min_start_scale = scale {lo + 1}){tag}",
                       "a scale before scale.min_start_scale (layers are classified before pruning starts)")

        ratios = None
        if self.token.ratios is not None:
            if sc.mode == "off":
                raise _err("token.ratios", "is set but scale.mode is off, so no scale is pruned",
                           "null, or scale.mode prune_from_D / skip_after_D")
            ratios_d: dict[int, float] = {}
            for ref, r in self.token.ratios.items():
                i = res(ref, f"token.ratios[{ref!r}]")
                if i in ratios_d:
                    raise _err(f"token.ratios[{ref!r}]", f"scale {i + 1} is listed twice{tag}", "distinct scales")
                if i < lo:
                    raise _err(f"token.ratios[{ref!r}]", f"scale {i + 1} is before scale.min_start_scale "
                               f"(scale {lo + 1}), so this ratio can never apply{tag}",
                               "ratio scales at or after scale.min_start_scale")
                ratios_d[i] = r
            ratios = FrozenDict(sorted(ratios_d.items()))

        if not self._prunes_tokens():
            prunable: tuple[int, ...] = ()
        elif ratios is not None:
            prunable = tuple(i for i, r in ratios.items() if r > 0)
        else:
            prunable = tuple(range(lo, k))

        skips: set[int] = set()
        for i, ref in enumerate(self.skip_scales or ()):
            j = res(ref, f"skip_scales[{i}]")
            if j in skips:
                raise _err(f"skip_scales[{i}]", f"scale {j + 1} is listed twice{tag}", "distinct scales")
            skips.add(j)

        cached = None
        if self.restore.mode == "cached_scale":
            cached = res(self.restore.cached_scale, "restore.cached_scale")  # type: ignore[arg-type]
            if prunable and cached >= min(prunable):
                raise _err("restore.cached_scale", f"resolves to scale {cached + 1}, which does not precede "
                           f"the first prunable scale (scale {min(prunable) + 1}){tag}",
                           "a scale before every scale that can be pruned")
            if cached in skips:
                raise _err("restore.cached_scale", f"scale {cached + 1} is in skip_scales{tag}",
                           "a scale that runs (its outputs are recorded for restoration)")

        reuse = None
        if self.cfg.reuse_cond_from is not None:
            reuse = res(self.cfg.reuse_cond_from, "cfg.reuse_cond_from")
        return ResolvedScales(schedule=schedule, hw=hw, num_scales=k, min_start=lo, max_start=hi,
                              representative=rep, cached_scale=cached, ratios=ratios,
                              skip_scales=frozenset(skips), reuse_cond_from=reuse, prunable=prunable)

    # ---------------------------------------------------------------- runtime helpers
    def check_fingerprint(self, observed: Mapping[str, Any]) -> list[str]:
        """Mismatch messages ``"model.depth: expected 32, observed 4"`` (empty list = fits)."""
        return self.model.check(observed)

    def check_schedules(self, observed: Mapping[str, Sequence[Sequence[int]]]) -> list[str]:
        """Conflicts with a model's ``scale_schedules``: a name both define with different grids.

        A model schedule the policy does not list is not a conflict (models support more
        resolutions than a policy covers); a generation that uses one matches no schedule at run
        time and gets ``fallback.on_mismatch``. :meth:`unknown_schedules` lists them.
        """
        out = []
        for name, sched in observed.items():
            got = tuple((int(h), int(w)) for h, w in sched)
            if name in self.schedules and self.schedules[name] != got:
                out.append(f"schedules.{name}: expected {[list(x) for x in self.schedules[name]]}, "
                           f"observed {[list(x) for x in got]}")
        return out

    def unknown_schedules(self, observed: Mapping[str, Sequence[Sequence[int]]]) -> list[str]:
        """Names of the model's schedules that this policy does not list (it runs them dense)."""
        return [name for name in observed if name not in self.schedules]

    def match_scale(self, tokens: int) -> list[tuple[str, int]]:
        """Every ``(schedule_name, scale_index)`` (0-based) whose ``h*w == tokens``."""
        return [(name, i) for name, sched in self.schedules.items()
                for i, (h, w) in enumerate(sched) if h * w == tokens]

    def schedule_for_tokens(self, token_counts_seen: Sequence[int]) -> list[str]:
        """Names of the schedules whose first scales have exactly the token counts seen so far
        (one count per scale, in order); more than one name means still ambiguous."""
        seen = list(token_counts_seen)
        return [name for name, sched in self.schedules.items()
                if len(seen) <= len(sched) and all(h * w == t for (h, w), t in zip(sched, seen))]

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (YAML/JSON-able) of the resolved policy; ``from_dict`` inverts it."""
        d: dict[str, Any] = {"version": self.version, "name": self.name, "description": self.description,
                             "model": self.model.to_dict(),
                             "schedules": {n: [list(hw) for hw in s] for n, s in self.schedules.items()}}
        for sec in ("scale", "layer", "token", "restore", "kv", "cfg"):
            d[sec] = getattr(self, sec).to_dict()
        d["skip_scales"] = list(self.skip_scales) if self.skip_scales is not None else None
        d["fallback"] = self.fallback.to_dict()
        return d

    def derive(self, name: str, overrides: Mapping[str, Any], description: str | None = None) -> dict[str, Any]:
        """This policy with ``overrides`` deep-merged as a preset is, renamed: a validated plain
        dict (what ``from_dict`` and the backend's ``policy`` option take), for variants of a
        shipped policy in benchmarks and tests."""
        d = _deep_merge(self.to_dict(), overrides)
        d["name"] = name
        if description is not None:
            d["description"] = description
        Policy.from_dict(d, source=name)  # fail here, not inside a compile
        return d

    def canonical_hash(self) -> str:
        """sha256 of the canonical JSON of everything that changes behaviour (not ``name``,
        ``description``, ``source`` or ``preset``): a compile-cache key."""
        d = self.to_dict()
        d.pop("name")
        d.pop("description")
        if d["token"]["ratios"] is not None:  # JSON keys must be strings; keep 1 and 1.0 distinct
            d["token"]["ratios"] = {repr(k): v for k, v in d["token"]["ratios"].items()}
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "<dict>", preset: str | None = None) -> Policy:
        """Validate a mapping (as read from YAML) and build the policy.

        ``presets`` / ``default_preset`` in ``d`` are handled here: every preset is validated, and
        ``preset`` (default: ``default_preset``) is deep-merged over the base before building.
        """
        if not isinstance(d, Mapping):
            raise PolicyError(source, "<top>", f"the document is a {type(d).__name__}, not a mapping",
                              "a mapping with keys " + ", ".join(_TOP_LEVEL_KEYS))
        _check_keys(d, _TOP_LEVEL_KEYS, "", source)
        for req in ("version", "name", "schedules"):
            if req not in d:
                raise PolicyError(source, req, "is required", {"version": str(SCHEMA_VERSION),
                                                                "name": "a policy name",
                                                                "schedules": "a mapping name -> [[h, w], ...]"}[req])
        base = {k: v for k, v in d.items() if k not in ("presets", "default_preset")}
        presets = d.get("presets")
        default = d.get("default_preset")
        if presets is None:
            if default is not None:
                raise PolicyError(source, "default_preset", f"{default!r} given but there are no presets",
                                  "null, or a presets mapping containing it")
            if preset is not None:
                raise PolicyError(source, "presets", f"preset {preset!r} requested but the policy has no presets",
                                  "no preset")
            return cls._build(base, source, None)
        if not isinstance(presets, Mapping) or not presets:
            raise PolicyError(source, "presets", f"{_fmt(presets)} is not a non-empty mapping",
                              "a mapping preset_name -> partial override (quality, balanced, fast)")
        if default is not None and default not in presets:
            raise PolicyError(source, "default_preset", f"{default!r} is not a preset",
                              "one of " + ", ".join(map(repr, presets)))
        base_policy = cls._build(base, source, None)  # the base must be valid on its own
        built: dict[str, Policy] = {}
        for pname, over in presets.items():
            if not isinstance(pname, str) or not _NAME_RE.match(pname):
                raise PolicyError(source, f"presets.{pname}", "is not a valid preset name",
                                  "letters, digits, '.', '_' or '-'")
            if over is None:
                over = {}
            if not isinstance(over, Mapping):
                raise PolicyError(source, f"presets.{pname}", f"{_fmt(over)} is not a mapping",
                                  "a partial policy (mapping) deep-merged over the base")
            for k in over:
                if k in _PRESET_FORBIDDEN:
                    raise PolicyError(source, f"presets.{pname}.{k}", "cannot be overridden by a preset",
                                      "any key except " + ", ".join(_PRESET_FORBIDDEN))
            try:
                built[pname] = cls._build(_deep_merge(base, over), source, pname)
            except PolicyError as e:
                raise e.relocated(source, f"presets.{pname}") from None
        chosen = preset if preset is not None else default
        if chosen is None:
            return base_policy
        if chosen not in built:
            raise PolicyError(source, "presets", f"no preset named {chosen!r}",
                              "one of " + ", ".join(map(repr, built)))
        return built[chosen]

    @classmethod
    def _build(cls, d: Mapping[str, Any], source: str, preset: str | None) -> Policy:
        kwargs: dict[str, Any] = {}
        for k, v in d.items():
            if k in _SECTIONS:
                kwargs[k] = _SECTIONS[k].from_dict(v, path=k, source=source)
            else:
                kwargs[k] = v
        if "schedules" in kwargs and not isinstance(kwargs["schedules"], Mapping):
            raise PolicyError(source, "schedules", f"{_fmt(kwargs['schedules'])} is not a mapping",
                              'a mapping name -> [[h, w], ...], e.g. "1024:1:1": [[1, 1], [2, 2], ...]')
        if kwargs.get("description") is None:
            kwargs.pop("description", None)
        return cls(**kwargs, source=source, preset=preset)

    @classmethod
    def keepall(cls, schedules: Mapping[str, Sequence[Sequence[int]]], *, name: str = "keepall",
                model: ModelFingerprint | Mapping[str, Any] | None = None) -> Policy:
        """A policy that changes nothing (its output must equal the dense model's)."""
        fp = model if isinstance(model, ModelFingerprint) else ModelFingerprint(**(model or {}))
        return cls(version=SCHEMA_VERSION, name=name, schedules=FrozenDict(schedules),
                   description="Everything kept: compiled output must equal the dense model.",
                   model=fp, scale=ScaleStage(mode="off"),
                   layer=LayerStage(actions=FrozenDict({"global": "keep", "detail": "keep"})))
