"""``toprovar plan``: what a policy will do to a model, per scale, before anything is generated.

The plan mirrors the runtime's decisions (``runtime/decisions.py``) and its FLOP accounting
(``Decider._account``) without running the model:

* FLOPs per token of each residual branch are ``2 * in * out`` summed over the ``nn.Linear``
  layers of the block's self-attention, cross-attention (without its text-side K/V projection)
  and FFN submodules; self-attention adds ``4 * heads * head_dim`` per (query, key) pair, the
  keys being the K/V cache of earlier scales plus the current (kept) tokens. Everything is
  multiplied by the transformer rows (``2 * batch``: CFG doubles the batch).
* Scale 0, every layer up to ``scale.measure_layer`` (when entropy decides anything: criterion
  ``rho`` or selection ``entropy``), layers outside ``layer.layers`` and sublayers outside
  ``token.sublayers`` run on all tokens; ``skip_scales`` (and every scale after
  ``D`` with ``skip_after_D``) run no block at all; from ``cfg.reuse_cond_from`` on only the
  conditional half of the rows runs (where the runtime can apply it: a symbolic batch).
* Decisions that depend on entropy are *ranges* unless a calibration file is given: the start
  scale ``D`` lies in ``[min_start_scale, max_start_scale]`` (it is forced at
  ``max_start_scale``); with ``layer.mode: online`` any eligible layer may turn out Detail; the
  kept count of the entropy gate lies between its bounds for ``R = 1``:
  ``n (1 - alpha_min) - (alpha_max - alpha_min) phi(s) sum(Hhat)`` and ``n (1 - alpha_min)``
  (``sum(Hhat) = n`` with mean normalisation, 1 with sum normalisation), then at least
  ``ceil(min_keep_ratio n)`` and rounded up to a multiple of ``bucket``. The low end of every
  range is the most pruning the policy allows, the high end the least.
* With ``calibration`` (the JSON written by ``toprovar calibrate``), ``D``, the layer classes and
  the kept counts are computed from the measured entropies (median over the calibration items).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from toprovar_fx.policies import Policy, ResolvedScales, TokenStage

from .models import ModelAdapter, ToolError, load_model

__all__ = [
    "BlockFlops",
    "Plan",
    "ScalePlan",
    "block_flops",
    "gate_keep_count",
    "hhat_quantiles",
    "make_plan",
    "pick_schedule",
]


# ------------------------------------------------------------------------------------------------
# FLOP model
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockFlops:
    """Per-token FLOPs of one block's residual branches and the self-attention pair cost."""

    self_attn: float
    cross_attn: float
    ffn: float
    pair: float  # FLOPs per (query, key) pair of the self-attention: 4 * heads * head_dim
    source: str  # how they were found

    def linear(self, kind: str) -> float:
        return {"self_attn": self.self_attn, "cross_attn": self.cross_attn, "ffn": self.ffn}[kind]

    @property
    def kinds(self) -> tuple[str, ...]:
        return ("self_attn", "cross_attn", "ffn") if self.cross_attn else ("self_attn", "ffn")


def _linear_flops(module: torch.nn.Module, skip_kv: bool = False) -> float:
    total = 0.0
    for name, mod in module.named_modules():
        if isinstance(mod, torch.nn.Linear):
            if skip_kv and "kv" in name.rsplit(".", 1)[-1]:
                continue  # the cross-attention's K/V projection runs on the text, not per token
            total += 2.0 * mod.in_features * mod.out_features
    return total


def block_flops(model: torch.nn.Module, fingerprint: Mapping[str, Any] | None) -> BlockFlops:
    """FLOPs per token of each branch of the model's first block (see the module docstring).

    A block is the parent of the first module with a ``cached_k`` attribute (the self-attention
    of VAR-family code); its children are sorted into self-attention (holds ``cached_k``),
    cross-attention (name ``ca`` / ``cross_attn`` or a class name containing ``Cross``) and FFN
    (``ffn`` / ``mlp``). Without such a module the standard block of the fingerprint's width is
    assumed (``8 C^2`` attention and ``16 C^2`` FFN per token).
    """
    named = dict(model.named_modules())
    attn_name = next((n for n, m in named.items() if hasattr(m, "cached_k") and n), None)
    width = int((fingerprint or {}).get("width") or 0)
    if attn_name is not None and "." in attn_name:
        attn = named[attn_name]
        heads = int(getattr(attn, "heads", 0) or getattr(attn, "num_heads", 0) or 0)
        head_dim = int(getattr(attn, "head_dim", 0) or 0)
        pair = 4.0 * heads * head_dim if heads and head_dim else 4.0 * width
        block = named[attn_name.rsplit(".", 1)[0]]
        sa = ca = ffn = 0.0
        for cname, child in block.named_children():
            lname, cls = cname.lower(), type(child).__name__.lower()
            if any(m is attn for m in child.modules()):
                sa += _linear_flops(child)
            elif lname in ("ca", "cross_attn", "cross_attention", "crossattn") or "cross" in cls:
                ca += _linear_flops(child, skip_kv=True)
            elif lname in ("ffn", "mlp") or cls in ("ffn", "mlp") or "ffn" in cls or "mlp" in cls:
                ffn += _linear_flops(child)
        if sa and ffn:
            return BlockFlops(sa, ca, ffn, pair, f"nn.Linear layers of {type(block).__name__}")
    if not width:
        raise ToolError("cannot count FLOPs: the model has no module with cached_k and the fingerprint no width")
    c2 = float(width) ** 2
    return BlockFlops(8 * c2, 0.0, 16 * c2, 4.0 * width, f"standard block of width {width} (assumed)")


# ------------------------------------------------------------------------------------------------
# the entropy gate (runtime/decisions.py, Decider._decide_scale)
# ------------------------------------------------------------------------------------------------


def hhat_quantiles(hmap: torch.Tensor, points: int = 64) -> list[float]:
    """Mean-normalised entropies ``H_i / mean(H)`` of a map, as ``points`` mid-quantiles
    (all values, sorted, when the map has at most ``points`` tokens)."""
    h = hmap.float().flatten()
    hhat = (h / h.mean().clamp_min(1e-12)).sort().values
    n = hhat.numel()
    if n <= points:
        return [round(float(v), 5) for v in hhat]
    q = (torch.arange(points, dtype=torch.float32) + 0.5) / points
    return [round(float(v), 5) for v in torch.quantile(hhat, q)]


def _bucketed(k: int, n: int, token: TokenStage) -> int:
    k = max(k, math.ceil(token.min_keep_ratio * n))
    return min(n, -(-k // token.bucket) * token.bucket)


def gate_keep_count(hhat: Sequence[float], n: int, token: TokenStage, scale: int, num_scales: int,
                    r: float = 1.0) -> int:
    """Tokens a layer keeps at ``scale`` under the entropy gate, from mean-normalised entropies
    ``hhat`` (all ``n`` of them or quantiles standing for them), for layer score ``r``."""
    phi = (scale + 1) / num_scales if token.phi == "linear" else 1.0
    vals = torch.tensor(list(hhat), dtype=torch.float32)
    if token.normalization != "mean":
        vals = vals / n  # H / sum(H) = (H / mean(H)) / n
    q = phi * r * vals
    p = 1 - (token.alpha_min + (token.alpha_max - token.alpha_min) * q).clamp(0, 1)
    count = round(float(p.sum()) * n / max(len(vals), 1))
    return _bucketed(count, n, token)


def _gate_bounds(n: int, token: TokenStage, scale: int, num_scales: int) -> tuple[int, int]:
    """Fewest and most tokens the gate can keep (``R = 1``), bucketed."""
    phi = (scale + 1) / num_scales if token.phi == "linear" else 1.0
    sum_hhat = n if token.normalization == "mean" else 1.0
    lo = max(0.0, n * (1 - token.alpha_min) - (token.alpha_max - token.alpha_min) * phi * sum_hhat)
    hi = n * (1 - token.alpha_min)
    return _bucketed(round(lo), n, token), _bucketed(round(hi), n, token)


# ------------------------------------------------------------------------------------------------
# simulation of one generation's decisions
# ------------------------------------------------------------------------------------------------


@dataclass
class _Scenario:
    start: int | None  # D
    classes: dict[int, str]  # layer -> global | detail
    scores: dict[int, float]  # layer -> R
    kept: Any  # callable (scale, layer, r) -> k or None
    reuse_cond: bool = True  # cfg.reuse_cond_from takes effect (needs a symbolic batch dimension)


@dataclass
class _ScaleSim:
    actions: list[str]
    kept: list[int | None]  # tokens each layer's token-pruned sublayers ran on
    kv: list[int]  # tokens appended to each layer's K/V cache
    dense: float
    executed: float
    active: bool
    skipped: bool


def _simulate(policy: Policy, res: ResolvedScales, depth: int, bf: BlockFlops, rows: int,
              sc: _Scenario) -> list[_ScaleSim]:
    pol = policy
    tokens = [h * w for h, w in res.hw]
    kv_len = [0] * depth
    # as the runtime: layers up to measure_layer run dense only when entropy decides something
    first_decided = pol.scale.measure_layer + 1 if pol.needs_entropy else 0
    out: list[_ScaleSim] = []
    for s, n in enumerate(tokens):
        active = sc.start is not None and s >= sc.start and s > 0 and pol.scale.mode != "off"
        skipped = s > 0 and (s in res.skip_scales or (pol.scale.mode == "skip_after_D" and sc.start is not None
                                                      and s > sc.start))
        lk_dense = sum(tokens[: s + 1])
        # SkipVAR's CFG shortcut: the cond half runs alone, the uncond half copies it
        frac = 0.5 if (sc.reuse_cond and res.reuse_cond_from is not None and s >= res.reuse_cond_from
                       and rows % 2 == 0) else 1.0
        acts: list[str] = []
        kept: list[int | None] = []
        kv: list[int] = []
        dense = executed = 0.0
        for layer in range(depth):
            action, k = "keep", None
            if skipped:
                action = "skip"
            elif s > 0 and active and layer >= first_decided and pol.layer.eligible(layer):
                cls = sc.classes.get(layer, "global")
                action = pol.layer.actions[cls]
                if action == "prune_tokens":
                    k = sc.kept(s, layer, sc.scores.get(layer, 1.0))
                    if k is None or k >= n:
                        action, k = "keep", None
            runs = {}
            for kind in bf.kinds:
                if action == "skip":
                    runs[kind] = 0
                elif action == "prune_tokens" and kind in pol.token.sublayers:
                    runs[kind] = k
                else:
                    runs[kind] = n
            if action == "prune_tokens" and all(v == n for v in runs.values()):
                action, k = "keep", None
            for kind in bf.kinds:
                run = runs[kind]
                dense += rows * n * bf.linear(kind)
                executed += frac * rows * run * bf.linear(kind)
                if kind == "self_attn":
                    dense += rows * bf.pair * n * lk_dense
                    executed += frac * rows * bf.pair * run * (kv_len[layer] + run)
            kv_len[layer] += runs["self_attn"]
            acts.append(action)
            kept.append(k)
            kv.append(runs["self_attn"])
        out.append(_ScaleSim(acts, kept, kv, dense, executed, active, skipped))
    return out


# ------------------------------------------------------------------------------------------------
# the plan
# ------------------------------------------------------------------------------------------------


Range = tuple[float, float]


@dataclass
class ScalePlan:
    """One scale of the plan; ``(lo, hi)`` pairs are ranges (equal when the decision is known)."""

    index: int  # 0-based
    h: int
    w: int
    tokens: int
    active: str  # no | maybe | yes
    skipped: str  # no | maybe | yes
    layers_kept: tuple[int, int]
    layers_skipped: tuple[int, int]
    layers_pruned: tuple[int, int]
    kept_tokens: tuple[int, int] | None  # per token-pruned layer (None: no layer prunes tokens)
    kv_kept: Range  # fraction of this scale's K/V the layers append (1 = dense)
    flops_dense: float
    flops_planned: Range


@dataclass
class Plan:
    """A dry run of a policy on a model (``to_dict`` is JSON-able, ``to_text`` a table)."""

    model: str
    fingerprint: dict[str, Any]
    policy: str
    preset: str | None
    policy_source: str
    schedule: str
    batch: int
    rows: int
    dtype: str
    flop_model: str
    start_scale: tuple[int, int] | None  # D range, 0-based (None: pruning never starts)
    layer_classes: dict[str, list[int]] | None  # known classes (frozen / off / calibration) or None
    source: str  # "ranges" or "calibration FILE"
    scales: list[ScalePlan] = field(default_factory=list)
    flops_dense: float = 0.0
    flops_planned: Range = (0.0, 0.0)
    kv_bytes_dense: float = 0.0
    kv_bytes_planned: Range = (0.0, 0.0)
    notes: list[str] = field(default_factory=list)

    @property
    def flop_ratio(self) -> Range:
        d = self.flops_dense or 1.0
        return self.flops_planned[0] / d, self.flops_planned[1] / d

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["flop_ratio"] = list(self.flop_ratio)
        return d

    def to_text(self) -> str:
        """The table ``toprovar plan`` prints."""

        def rng(lo: float, hi: float, fmt: Any = "{:g}") -> str:
            f = fmt if callable(fmt) else fmt.format
            return f(lo) if f(lo) == f(hi) else f"{f(lo)}-{f(hi)}"

        def num(v: float) -> str:
            return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"

        def gf(v: float) -> str:
            return num(v / 1e9)

        def mib(v: float) -> str:
            return f"{v / 2**30:.2f} GiB" if v >= 2**30 else f"{v / 2**20:.2f} MiB"

        fp = self.fingerprint
        lines = [
            f"model {self.model} ({fp.get('family')} depth {fp.get('depth')}, width {fp.get('width')}, "
            f"heads {fp.get('heads')}), schedule {self.schedule}, batch {self.batch} "
            f"(transformer rows {self.rows}: CFG doubles the batch), {self.dtype}",
            f"policy {self.policy}" + (f" preset {self.preset}" if self.preset else "") + f" ({self.policy_source})",
            f"decisions: {self.source}; FLOP model: {self.flop_model}",
        ]
        if self.start_scale is None:
            lines.append("start scale D: pruning never starts")
        else:
            lo, hi = self.start_scale
            lines.append(f"start scale D (1-based): {rng(lo + 1, hi + 1)}")
        if self.layer_classes is not None:
            lines.append(f"layer classes: detail {self.layer_classes.get('detail', [])}, "
                         f"global {self.layer_classes.get('global', [])}")
        else:
            lines.append("layer classes: decided online from entropy (any eligible layer may be Detail)")
        head = ["scale", "h x w", "tokens", "active", "skip", "layers keep/skip/prune", "kept tokens",
                "K/V kept", "GFLOPs dense", "GFLOPs planned", "ratio"]
        rows = []
        for s in self.scales:
            ratio_lo = s.flops_planned[0] / s.flops_dense if s.flops_dense else 1.0
            ratio_hi = s.flops_planned[1] / s.flops_dense if s.flops_dense else 1.0
            rows.append([
                str(s.index + 1), f"{s.h}x{s.w}", str(s.tokens), s.active, s.skipped,
                "/".join(rng(*p) for p in (s.layers_kept, s.layers_skipped, s.layers_pruned)),
                "-" if s.kept_tokens is None else rng(*s.kept_tokens),
                rng(100 * s.kv_kept[0], 100 * s.kv_kept[1], "{:.0f}") + "%",
                gf(s.flops_dense), rng(s.flops_planned[0] / 1e9, s.flops_planned[1] / 1e9, num),
                rng(ratio_lo, ratio_hi, "{:.2f}"),
            ])
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        lines.append("  ".join(h.rjust(w) for h, w in zip(head, widths)))
        lines.extend("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)
        lo, hi = self.flop_ratio
        lines.append(f"total: {gf(self.flops_dense)} GFLOPs dense, "
                     f"{rng(self.flops_planned[0] / 1e9, self.flops_planned[1] / 1e9, num)} planned "
                     f"(ratio {rng(lo, hi, '{:.3f}')}); K/V cache at the end {mib(self.kv_bytes_dense)} dense, "
                     f"{rng(self.kv_bytes_planned[0], self.kv_bytes_planned[1], mib)} planned ({self.dtype})")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def pick_schedule(policy: Policy, adapter: ModelAdapter | None, resolution: str | None) -> str:
    """The schedule to plan for: ``resolution`` if given, else the model's default if the policy
    lists it, else the policy's first schedule."""
    if resolution is not None:
        if resolution not in policy.schedules:
            raise ToolError(f"--resolution {resolution!r} is not a schedule of policy {policy.name}; "
                            f"valid: {', '.join(policy.schedules)}")
        return resolution
    if adapter is not None and adapter.schedule in policy.schedules:
        return str(adapter.schedule)
    return next(iter(policy.schedules))


def _classify(policy: Policy, ratios: Sequence[float]) -> tuple[dict[int, str], dict[int, float]]:
    """Online classification (runtime ``_maybe_classify``) from sigma1/sigma2 ratios per layer."""
    lay = policy.layer
    lo, hi = lay.ambiguity_band
    classes, scores = {}, {}
    for layer, ratio in enumerate(ratios):
        r = math.exp(-lay.beta * (ratio - 1.0))
        detail = r >= lay.detail_threshold and not (lo <= r <= hi)
        classes[layer], scores[layer] = ("detail" if detail else "global"), r
    return classes, scores


def _fixed_classes(policy: Policy, depth: int) -> tuple[dict[int, str], dict[int, float]] | None:
    lay = policy.layer
    if lay.mode == "off":
        return dict.fromkeys(range(depth), "detail"), dict.fromkeys(range(depth), 1.0)
    if lay.mode == "frozen":
        detail = set(lay.frozen.get("detail", ()))
        return ({i: "detail" if i in detail else "global" for i in range(depth)},
                {i: 1.0 if i in detail else 0.0 for i in range(depth)})
    return None


def start_scale_for(policy: Policy, res: ResolvedScales, rho: Sequence[float | None]) -> int | None:
    """``D`` for one generation whose per-scale rho values are ``rho`` (runtime ``_decide_scale``)."""
    sc = policy.scale
    if sc.mode == "off":
        return None
    for s in range(max(res.min_start, 1), res.num_scales):
        if sc.criterion == "fixed" or s >= res.max_start:
            return s
        r = rho[s] if s < len(rho) else None
        if r is not None and (r <= sc.tau if sc.direction == "le" else r >= sc.tau):
            return s
    return None


def load_calibration(path: str | Path) -> dict[str, Any]:
    """Read and check a calibration JSON written by ``toprovar calibrate``."""
    p = Path(path)
    if not p.is_file():
        raise ToolError(f"calibration file {str(p)!r} does not exist")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ToolError(f"calibration file {str(p)!r} is not JSON ({e})") from None
    need = ("schedule", "hw", "rho", "layer_ratio", "hhat_quantiles", "measure_layer")
    if not isinstance(data, dict) or any(k not in data for k in need):
        raise ToolError(f"calibration file {str(p)!r} lacks {', '.join(need)} (write it with toprovar calibrate)")
    return data


def make_plan(model: str | ModelAdapter, policy: Policy, *, resolution: str | None = None, batch: int = 1,
              dtype: torch.dtype = torch.float32, calibration: str | Path | dict[str, Any] | None = None) -> Plan:
    """Plan ``policy`` on ``model`` (built without weights when it is a zoo name); see the module docstring."""
    if batch < 1:
        raise ToolError("--batch must be >= 1")
    adapter = load_model(model, device="meta", dtype=dtype) if isinstance(model, str) else model
    fp = adapter.fingerprint or {k: v for k, v in policy.model.to_dict().items() if v is not None}
    if not fp.get("depth"):
        raise ToolError(f"the depth of {adapter.name} is unknown: the model has no fingerprint() and the "
                        "policy's model.depth is null")
    depth = int(fp["depth"])
    bf = block_flops(adapter.model, fp)
    schedule = pick_schedule(policy, adapter, resolution)
    res = policy.resolved(schedule)
    rows = adapter.cfg_rows * batch
    notes: list[str] = []
    problems = policy.check_fingerprint({**fp, "num_scales": res.num_scales})
    if problems:
        notes.append("the policy does not fit this model (" + "; ".join(problems) + "): the runtime runs it "
                     f"dense ({policy.fallback.on_mismatch})")
    model_sched = (adapter.schedules or {}).get(schedule)
    if model_sched is not None and tuple(model_sched) != tuple(res.hw):
        notes.append(f"the model's schedule {schedule!r} differs from the policy's: the runtime runs it dense")
    if adapter.schedules is not None and schedule not in adapter.schedules:
        notes.append(f"the model has no schedule {schedule!r}")
    if policy.cfg.reuse_cond_from is not None:
        notes.append(f"cfg.reuse_cond_from: from scale {res.reuse_cond_from + 1} on only the cond half of the CFG "
                     "batch runs; this needs torch.compile(..., dynamic=True) (a symbolic batch), else both halves "
                     "run" + (" (the high end of the range)" if calibration is None else ""))
    if res.skip_scales or policy.scale.mode == "skip_after_D":
        notes.append("skipped scales assume the sampler's scale accumulation is compiled (else the runtime "
                     "runs them, with a warning)")

    tok = policy.token
    fixed = _fixed_classes(policy, depth)
    if calibration is not None:
        cal = calibration if isinstance(calibration, dict) else load_calibration(calibration)
        scenarios = [_calibrated_scenario(policy, res, depth, cal, fixed, notes)]
        source = "calibration" + (f" {calibration}" if not isinstance(calibration, dict) else "")
    else:
        def h_w(s: int) -> int:
            return res.hw[s][0] * res.hw[s][1]

        def k_lo(s: int, layer: int, r: float) -> int | None:
            if res.ratios is not None:
                ratio = res.ratios.get(s)
                return None if ratio is None else (h_w(s) - math.floor(ratio * h_w(s)))
            return _gate_bounds(h_w(s), tok, s, res.num_scales)[0]

        def k_hi(s: int, layer: int, r: float) -> int | None:
            if res.ratios is not None:
                return k_lo(s, layer, r)
            return _gate_bounds(h_w(s), tok, s, res.num_scales)[1]

        # most pruning: D as early as allowed, every eligible layer Detail; least: D forced at
        # max_start_scale (fixed criterion: always min_start_scale), every layer Global
        most_cls = fixed or (dict.fromkeys(range(depth), "detail"), dict.fromkeys(range(depth), 1.0))
        least_cls = fixed or (dict.fromkeys(range(depth), "global"), dict.fromkeys(range(depth), 0.0))
        d_most: int | None = max(res.min_start, 1)
        d_least: int | None = max(res.max_start if policy.scale.criterion == "rho" else res.min_start, 1)
        if policy.scale.mode == "off":
            d_most = d_least = None
        scenarios = [_Scenario(d_most, most_cls[0], most_cls[1], k_lo),
                     _Scenario(d_least, least_cls[0], least_cls[1], k_hi, reuse_cond=False)]
        source = "ranges (no calibration file)"
    sims = [_simulate(policy, res, depth, bf, rows, sc) for sc in scenarios]
    starts = [sc.start for sc in scenarios]
    plan = Plan(
        model=adapter.name, fingerprint=dict(fp), policy=policy.name, preset=policy.preset,
        policy_source=policy.source, schedule=schedule, batch=batch, rows=rows,
        dtype=str(dtype).replace("torch.", ""), flop_model=f"{bf.source}: per token self-attn "
        f"{bf.self_attn:.3g}, cross-attn {bf.cross_attn:.3g}, FFN {bf.ffn:.3g}; attention {bf.pair:.3g} per "
        "(query, key) pair", start_scale=None if any(d is None for d in starts) else (min(starts), max(starts)),
        layer_classes=None, source=source, notes=notes,
    )
    known = fixed if calibration is None else (scenarios[0].classes, scenarios[0].scores)
    if known is not None:
        plan.layer_classes = {c: sorted(i for i, k in known[0].items() if k == c) for c in ("detail", "global")}
    item_bytes = torch.empty((), dtype=dtype).element_size()
    width = int(fp.get("width") or 0)
    kv_unit = rows * 2 * width * item_bytes  # K and V of one token in one layer
    for s, (h, w) in enumerate(res.hw):
        per = [sim[s] for sim in sims]
        n = h * w

        def count(sim: _ScaleSim, what: str) -> int:
            return sum(a == what for a in sim.actions)

        def span(vals: Sequence[float]) -> tuple[Any, Any]:
            return min(vals), max(vals)

        kept_vals = [k for sim in per for k in sim.kept if k is not None]
        if kept_vals and calibration is None and res.ratios is None:
            lo_k, hi_k = _gate_bounds(n, tok, s, res.num_scales)
            kept_vals += [lo_k, hi_k]  # the gate may keep anything in between (all of them = keep)
        flags = {sim.active for sim in per}
        skip_flags = {sim.skipped for sim in per}
        plan.scales.append(ScalePlan(
            index=s, h=h, w=w, tokens=n,
            active="yes" if flags == {True} else "no" if flags == {False} else "maybe",
            skipped="yes" if skip_flags == {True} else "no" if skip_flags == {False} else "maybe",
            layers_kept=span([count(p, "keep") for p in per]),
            layers_skipped=span([count(p, "skip") for p in per]),
            layers_pruned=span([count(p, "prune_tokens") for p in per]),
            kept_tokens=span(kept_vals) if kept_vals else None,
            kv_kept=span([sum(p.kv) / (depth * n) for p in per]),
            flops_dense=per[0].dense,
            flops_planned=span([p.executed for p in per]),
        ))
    plan.flops_dense = sum(s.flops_dense for s in plan.scales)
    totals = [sum(sim[s].executed for s in range(res.num_scales)) for sim in sims]
    plan.flops_planned = (min(totals), max(totals))
    total_tokens = sum(h * w for h, w in res.hw)
    plan.kv_bytes_dense = kv_unit * depth * total_tokens
    kv_totals = [kv_unit * sum(sum(sim[s].kv) for s in range(res.num_scales)) for sim in sims]
    plan.kv_bytes_planned = (min(kv_totals), max(kv_totals))
    return plan


def _calibrated_scenario(policy: Policy, res: ResolvedScales, depth: int, cal: dict[str, Any],
                         fixed: tuple[dict[int, str], dict[int, float]] | None, notes: list[str]) -> _Scenario:
    """``D``, classes and kept counts from a calibration file (medians over its items)."""
    if cal["schedule"] != res.schedule or [tuple(x) for x in cal["hw"]] != list(res.hw):
        raise ToolError(f"the calibration file measured schedule {cal['schedule']!r}, not {res.schedule!r}")
    if int(cal["measure_layer"]) != policy.scale.measure_layer:
        notes.append(f"the calibration measured layer {cal['measure_layer']}, the policy measures layer "
                     f"{policy.scale.measure_layer}: kept counts use the calibrated layer")
    starts = [start_scale_for(policy, res, rho) for rho in cal["rho"]]
    known = [d for d in starts if d is not None]
    start = int(statistics.median_low(known)) if known else None
    if fixed is None:
        ratios = [statistics.median(col) for col in zip(*cal["layer_ratio"])]
        classes, scores = _classify(policy, ratios)
    else:
        classes, scores = fixed
    tok = policy.token
    cache: dict[tuple[int, float], int | None] = {}

    def kept(s: int, layer: int, r: float) -> int | None:
        key = (s, r)
        if key not in cache:
            n = res.hw[s][0] * res.hw[s][1]
            if res.ratios is not None:
                ratio = res.ratios.get(s)
                cache[key] = None if ratio is None else n - math.floor(ratio * n)
            else:
                ks = [gate_keep_count(item[s], n, tok, s, res.num_scales, r) for item in cal["hhat_quantiles"]]
                cache[key] = int(statistics.median_low(ks))
        return cache[key]

    # the runtime's gate uses the Detail layers' R (all layers' when none is Detail)
    if not any(c == "detail" for c in classes.values()):
        scores = {i: scores.get(i, 1.0) for i in range(depth)}
    notes.append(f"start scale from the calibration items: D (1-based) per item "
                 f"{[d + 1 if d is not None else None for d in starts]}, median {None if start is None else start + 1}")
    return _Scenario(start, classes, scores, kept)
