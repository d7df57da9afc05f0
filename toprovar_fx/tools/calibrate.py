"""``toprovar calibrate``: the paper's pre-sampling (appendix A.2), written as a policy.

The model runs dense (the backend in observe mode: attention rewritten to FAE, entropy
recorded, outputs unchanged) over a calibration set. Per item it records, at the base
policy's ``scale.measure_layer``, the low-entropy ratio ``rho_s`` of every scale and the
distribution of mean-normalised entropies (for kept-count predictions), and at the
representative scale the ``sigma1 / sigma2`` ratio of every layer's (centred) ``[h, w]``
entropy map, exactly as the runtime's online classification computes it.

Choices (documented in the written YAML):

* **tau**: the paper's default 0.4, clipped into the spread of the measured ``rho_s`` over the
  candidate start scales ``[min_start_scale, max_start_scale)`` (their 10th to 90th percentile
  over items and scales). Inside that range the start scale ``D`` depends on each generation's
  entropy, which is the point of the criterion; a tau outside it would make ``D`` always the
  earliest or always the latest allowed scale. ``--tau`` overrides the rule.
* **layer classes**: ``R = exp(-beta (ratio - 1))`` from the median ratio of each layer over
  the items; Detail iff ``R >= detail_threshold`` and ``R`` outside ``ambiguity_band`` (the
  runtime's rule), written *frozen* (``layer.mode: frozen``) so that every generation uses the
  calibrated split without an SVD.

Everything else comes from the base policy (default: the shipped policy of a zoo model, or the
schema defaults for the model's fingerprint and schedules).

Sampling (``--cfg``, ``--top-p``, ``--top-k``; shared with ``toprovar bench``): a zoo model is
sampled with the settings its shipped checkpoint records (``config.json`` ``training.sampling``;
var-ref: cfg 2.0, top-p 0.9), else with the tool's defaults (VAR / HART: cfg 1.5, Infinity:
``cfg_list`` 3.0; no top-k / top-p); each flag overrides one value. A ``module:factory`` model
samples as its ``sampler_call`` does, so the flags are refused for it.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from toprovar_fx.policies import Policy, PolicyError, list_policies, load_policy

from .models import ModelAdapter, ToolError, load_model
from .plan import gate_keep_count, hhat_quantiles, start_scale_for
from .progress import progress

__all__ = [
    "PAPER_TAU",
    "TOOL_SAMPLING",
    "CalibrationResult",
    "apply_sampling",
    "base_policy_for",
    "calibrate_policy",
    "check_sampling",
    "describe_sampling",
    "recorded_sampling",
    "sampling_for",
]

PAPER_TAU = 0.4  # ToProVAR appendix A.2: generations within SSIM 0.8 of dense cluster at rho_s ~ 0.4

# What the zoo adapters (tools/models.py) pass when neither the checkpoint nor a flag says otherwise.
TOOL_SAMPLING: dict[str, dict[str, float | int]] = {
    "var": {"cfg": 1.5, "top_p": 0.0, "top_k": 0},
    "hart": {"cfg": 1.5, "top_p": 0.0, "top_k": 0},
    "infinity": {"cfg": 3.0, "top_p": 0.0, "top_k": 0},  # cfg is Infinity's cfg_list
}
SAMPLING_FLAGS = "--cfg / --top-p / --top-k"


def check_sampling(cfg: float | None = None, top_p: float | None = None, top_k: int | None = None) -> None:
    """Range checks of the sampling flags (``None`` = not given); raises :class:`ToolError`."""
    if cfg is not None and not (math.isfinite(cfg) and cfg >= 0.0):
        raise ToolError(f"--cfg must be a finite number >= 0, got {cfg}")
    if top_p is not None and not 0.0 <= top_p <= 1.0:
        raise ToolError(f"--top-p must be in [0, 1] (0 = off), got {top_p}")
    if top_k is not None and (int(top_k) != top_k or top_k < 0):
        raise ToolError(f"--top-k must be an integer >= 0 (0 = off), got {top_k}")


def recorded_sampling(name: str) -> dict[str, float | int] | None:
    """``training.sampling`` (cfg, top_p, top_k) of zoo model ``name``'s shipped checkpoint, or None."""
    from toprovar_fx import zoo
    from toprovar_fx.zoo import registry
    from toprovar_fx.zoo.ref_model import read_reference_config

    if name not in zoo.list_models():
        return None
    ckpt = registry._spec(name).pretrained_checkpoint  # the registry's own record of the shipped files
    if ckpt is None or not Path(ckpt).is_dir():
        return None
    try:
        rec = read_reference_config(ckpt).get("training", {}).get("sampling")
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or "cfg" not in rec:
        return None
    return {"cfg": float(rec["cfg"]), "top_p": float(rec.get("top_p") or 0.0), "top_k": int(rec.get("top_k") or 0)}


def _is_zoo(adapter: ModelAdapter) -> bool:
    from toprovar_fx import zoo

    return adapter.family in TOOL_SAMPLING and adapter.name in zoo.list_models()


def sampling_for(adapter: ModelAdapter, *, cfg: float | None = None, top_p: float | None = None,
                 top_k: int | None = None) -> dict[str, Any] | None:
    """The sampling settings a zoo adapter will use: the checkpoint's record (when its trained weights
    are loaded), else the tool's defaults, each overridden by a given flag; ``source`` says which.
    ``None`` for a ``module:factory`` model (its ``sampler_call`` decides); flags are refused for it."""
    check_sampling(cfg, top_p, top_k)
    given = {k: v for k, v in (("cfg", cfg), ("top_p", top_p), ("top_k", top_k)) if v is not None}
    if not _is_zoo(adapter):
        if given:
            raise ToolError(f"{SAMPLING_FLAGS} apply to zoo models; {adapter.name!r} samples as its "
                            "factory's sampler_call does (set cfg / top_p / top_k there)")
        return None
    rec = recorded_sampling(adapter.name) if adapter.extra.get("pretrained") else None
    base = rec if rec is not None else TOOL_SAMPLING[adapter.family]
    where = "the checkpoint's training.sampling" if rec is not None else "the tool's default"
    out: dict[str, Any] = {**base, **given}
    out["cfg"], out["top_p"], out["top_k"] = float(out["cfg"]), float(out["top_p"]), int(out["top_k"])
    if not given:
        out["source"] = where
    elif len(given) == 3:
        out["source"] = "given"
    else:
        out["source"] = f"{', '.join(k.replace('_', '-') for k in given)} given, the rest {where}"
    return out


def apply_sampling(adapter: ModelAdapter, *, cfg: float | None = None, top_p: float | None = None,
                   top_k: int | None = None) -> dict[str, Any] | None:
    """Make a zoo adapter sample with :func:`sampling_for`'s settings (replaces ``adapter.run``) and
    record them in ``adapter.extra["sampling"]``; returns them (``None``: a factory model, unchanged)."""
    st = sampling_for(adapter, cfg=cfg, top_p=top_p, top_k=top_k)
    if st is None:
        return None
    g, p, k = st["cfg"], st["top_p"], st["top_k"]
    if adapter.family == "infinity":
        def run(fn: Any, cond: Any, seed_: int) -> Any:
            return fn(cond, B=len(cond[1]), scale_schedule=adapter.schedule, g_seed=seed_, cfg_list=g, top_k=k,
                      top_p=p, return_logits=True)
    else:
        def run(fn: Any, labels: torch.Tensor, seed_: int) -> Any:
            return fn(B=int(labels.shape[0]), label_B=labels, g_seed=seed_, cfg=g, top_k=k, top_p=p,
                      return_logits=True)
    adapter.run = run
    adapter.extra["sampling"] = dict(st)
    return st


def describe_sampling(st: dict[str, Any] | None) -> str:
    """One line: ``cfg 2, top-p 0.9, top-k 0 (where the values come from)``."""
    if st is None:
        return "as the adapter's run (a factory's sampler_call) does; not recorded"
    return f"cfg {st['cfg']:g}, top-p {st['top_p']:g}, top-k {st['top_k']} ({st['source']})"


@dataclass
class CalibrationResult:
    """What ``calibrate_policy`` measured and wrote."""

    policy: Policy
    yaml_text: str
    data: dict[str, Any]  # the calibration JSON (also written next to the policy)
    paths: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def base_policy_for(adapter: ModelAdapter, base: str | Policy | None) -> Policy:
    """The policy calibration starts from: ``base``, else the shipped policy named like the zoo
    model, else the schema defaults for the model's fingerprint and schedules."""
    if isinstance(base, Policy):
        return base
    if base is not None:
        return load_policy(base)
    if adapter.name in list_policies():
        return load_policy(adapter.name)
    if adapter.schedules is None or adapter.fingerprint is None:
        raise ToolError(f"model {adapter.name!r} has no fingerprint()/scale_schedules: pass --base POLICY")
    fp = adapter.fingerprint
    if fp.get("family") not in ("var", "infinity", "hart", "any"):
        fp = {**fp, "family": "any"}
    sched = {k: [list(hw) for hw in v] for k, v in adapter.schedules.items()}
    lengths = {len(v) for v in sched.values()}
    if fp.get("num_scales") not in lengths:
        fp = {**fp, "num_scales": None}
    return Policy.from_dict({"version": 1, "name": f"{_slug(adapter.name)}-base", "model": fp,
                             "schedules": sched}, source="<calibrate base>")


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in name).strip("-") or "model"


def _rho(hmap: torch.Tensor) -> float:
    """Fraction of tokens with entropy below the map's mean (runtime ``Decider._rho``)."""
    h = hmap.float().flatten()
    return float((h < h.mean()).float().mean())


def _sv_ratio(hmap: torch.Tensor, center: bool) -> float:
    """``sigma1 / sigma2`` of an entropy map (runtime ``Decider._maybe_classify``)."""
    m = hmap.float()
    m = m - m.mean() if center else m
    sv = torch.linalg.svdvals(m)
    return float(sv[0] / sv[1].clamp_min(1e-12)) if sv.numel() > 1 else 1.0


def _pick_tau(rhos: list[list[float | None]], lo: int, hi: int, tau: float | None) -> tuple[float, str]:
    if tau is not None:
        return float(tau), f"given (--tau {tau})"
    vals = sorted(r for item in rhos for r in item[lo:hi] if r is not None)
    if not vals:  # min_start == max_start: D is fixed, tau is never consulted
        return PAPER_TAU, "paper default 0.4 (D is fixed by min/max_start_scale; tau is unused)"
    q = torch.tensor(vals)
    p10, p90 = (round(float(x), 4) for x in torch.quantile(q, torch.tensor([0.1, 0.9])))
    value = min(max(PAPER_TAU, p10), p90)
    how = "paper default 0.4" if value == PAPER_TAU else f"paper default 0.4 clipped to {value:g}"
    return value, (f"{how}: measured rho_s over the candidate start scales spans [{p10:g}, {p90:g}] "
                   "(10th-90th percentile)")


def calibrate_policy(
    model: str | ModelAdapter,
    *,
    classes: int | None = None,
    prompts: list[str] | None = None,
    out: str | Path | None = None,
    base: str | Policy | None = None,
    name: str | None = None,
    tau: float | None = None,
    resolution: str | None = None,
    seed: int = 0,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    cfg: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    show_progress: bool = False,
) -> CalibrationResult:
    """Run the calibration (module docstring) and return the calibrated policy.

    With ``out`` (a ``.yaml`` path) also writes the commented policy there and the measurements to
    ``<out stem>.calibration.json`` (input of ``toprovar plan --calibration``). ``cfg`` / ``top_p`` /
    ``top_k`` override the sampling (module docstring); a :class:`ModelAdapter` passed in keeps its
    own ``run`` unless one of them is given.
    """
    import toprovar_fx
    from toprovar_fx.runtime.session import last_session

    if tau is not None and not 0.0 <= tau <= 1.0:
        raise ToolError(f"--tau must be in [0, 1], got {tau}")
    if out is not None and not str(out).endswith((".yaml", ".yml")):
        raise ToolError(f"--out must end with .yaml or .yml, got {str(out)!r}")
    check_sampling(cfg, top_p, top_k)
    adapter = load_model(model, device=device, dtype=dtype, seed=seed)
    if isinstance(model, ModelAdapter) and cfg is None and top_p is None and top_k is None:
        sampling = adapter.extra.get("sampling")  # the caller's adapter samples as it was set up
    else:
        sampling = apply_sampling(adapter, cfg=cfg, top_p=top_p, top_k=top_k)
    base_pol = base_policy_for(adapter, base)
    adapter.set_schedule(resolution)
    schedule = adapter.schedule
    if schedule not in base_pol.schedules:
        raise ToolError(f"the base policy {base_pol.name!r} has no schedule {schedule!r} "
                        f"(it lists {', '.join(base_pol.schedules)}); pick one with --resolution")
    res = base_pol.resolved(schedule)
    items = adapter.calibration_set(classes=classes, prompts=prompts)
    measure = base_pol.scale.measure_layer
    rep_scale = res.representative
    center = base_pol.layer.center
    schedules = adapter.schedules or {k: [list(x) for x in v] for k, v in base_pol.schedules.items()}
    fast = torch.compile(adapter.sampler, backend="toprovar", options={"mode": "observe", "schedules": schedules})

    rho_items: list[list[float | None]] = []
    ratio_items: list[list[float]] = []
    hhat_items: list[list[list[float]]] = []
    mean_h: list[list[list[float]]] = []  # item -> scale -> layer
    depth = None
    with progress(len(items), "calibrate", show_progress) as bar:
        for i, cond in enumerate(items):
            bar.set_note(f"item {i + 1}: {str(cond)[:40]}" + (" (compiling)" if i == 0 else ""))
            adapter.generate(fast, adapter.prepare([cond]), seed + i)
            rep = toprovar_fx.last_generation()
            sess = last_session()
            if rep is None or sess is None or not rep.scales:
                raise RuntimeError("the toprovar backend recorded no generation: is the sampler compiled?")
            if rep.fallbacks:
                raise RuntimeError("observe mode fell back: " + "; ".join(rep.fallbacks))
            maps = toprovar_fx.entropy_maps()
            depth = rep.depth or depth
            if len(rep.scales) != res.num_scales:
                raise RuntimeError(f"the sampler ran {len(rep.scales)} scales, schedule {schedule!r} has "
                                   f"{res.num_scales}")
            rho_items.append([_rho(maps[(s, measure)]) if (s, measure) in maps else None
                              for s in range(res.num_scales)])
            hhat_items.append([hhat_quantiles(maps[(s, measure)]) if (s, measure) in maps else [1.0]
                               for s in range(res.num_scales)])
            ratio_items.append([_sv_ratio(maps[(rep_scale, layer)], center) for layer in range(rep.depth or 0)])
            mean_h.append([[lr.mean_entropy for lr in sr.layers] for sr in rep.scales])
            bar.update()
    if depth is None:
        raise RuntimeError("no layer depth observed")

    lay = base_pol.layer
    ratio_med = [statistics.median(col) for col in zip(*ratio_items)]
    scores = [math.exp(-lay.beta * (r - 1.0)) for r in ratio_med]
    lo_b, hi_b = lay.ambiguity_band
    classes_out = ["detail" if r >= lay.detail_threshold and not (lo_b <= r <= hi_b) else "global" for r in scores]
    tau_value, tau_rule = _pick_tau(rho_items, res.min_start, res.max_start, tau)
    notes: list[str] = []
    if "detail" in classes_out and all(i <= measure for i, c in enumerate(classes_out) if c == "detail"):
        notes.append(f"every Detail layer is at or below scale.measure_layer ({measure}), which always runs "
                     "dense: the calibrated policy prunes no tokens")
    if "detail" not in classes_out:
        notes.append("no layer was classified Detail: the calibrated policy prunes no tokens (lower "
                     "layer.detail_threshold or beta in --base to change that)")

    d = base_pol.to_dict()
    d["name"] = name or f"{_slug(base_pol.name)}-calibrated"
    d["description"] = (f"Calibrated by toprovar calibrate on {adapter.name} ({len(items)} "
                        f"{'class labels' if adapter.conditioning == 'class' else 'prompts'}, schedule "
                        f"{schedule}) from {base_pol.name}.")
    fp = adapter.fingerprint
    if fp is not None:
        d["model"] = {**d["model"], **{k: v for k, v in fp.items() if k in ("depth", "width", "heads")}}
    d["scale"]["tau"] = round(tau_value, 4)
    d["layer"]["mode"] = "frozen"
    d["layer"]["frozen"] = {"global": [i for i, c in enumerate(classes_out) if c == "global"],
                            "detail": [i for i, c in enumerate(classes_out) if c == "detail"]}
    policy = Policy.from_dict(d, source=str(out) if out else "<calibrate>")
    res_new = policy.resolved(schedule)
    starts = [start_scale_for(policy, res_new, r) for r in rho_items]

    tok = policy.token
    kept: list[list[int | None]] = []
    for s, (h, w) in enumerate(res_new.hw):
        n = h * w
        row: list[int | None] = []
        for layer in range(depth):
            ks = [gate_keep_count(item[s], n, tok, s, res_new.num_scales, 1.0) for item in hhat_items]
            row.append(int(statistics.median_low(ks)) if classes_out[layer] == "detail" else None)
        kept.append(row)

    def stats(col: list[float | None]) -> tuple[float | None, float | None]:
        vals = [v for v in col if v is not None]
        if not vals:
            return None, None
        return statistics.fmean(vals), (statistics.pstdev(vals) if len(vals) > 1 else 0.0)

    rho_stats = [stats([item[s] for item in rho_items]) for s in range(res.num_scales)]
    data: dict[str, Any] = {
        "version": 1,
        "tool": "toprovar calibrate",
        "model": adapter.name,
        "fingerprint": fp,
        "base_policy": base_pol.name,
        "policy": policy.name,
        "schedule": schedule,
        "hw": [list(x) for x in res.hw],
        "items": [{"condition": c, "seed": seed + i} for i, c in enumerate(items)],
        "sampling": sampling,
        "measure_layer": measure,
        "representative_scale": rep_scale,
        "candidate_start_scales": [res.min_start, res.max_start],
        "rho": rho_items,
        "rho_mean": [m for m, _ in rho_stats],
        "rho_std": [sd for _, sd in rho_stats],
        "mean_entropy": [[statistics.fmean(v for v in col if v is not None) if any(v is not None for v in col)
                          else None for col in zip(*[mh[s] for mh in mean_h])] for s in range(res.num_scales)],
        "layer_ratio": ratio_items,
        "layer_ratio_median": ratio_med,
        "r_score": scores,
        "layer_class": classes_out,
        "beta": lay.beta,
        "detail_threshold": lay.detail_threshold,
        "ambiguity_band": list(lay.ambiguity_band),
        "tau": tau_value,
        "direction": policy.scale.direction,
        "tau_rule": tau_rule,
        "start_scale": starts,
        "kept_tokens": kept,
        "hhat_quantiles": hhat_items,
        "notes": notes,
    }
    text = _commented_yaml(policy, data, adapter)
    result = CalibrationResult(policy=policy, yaml_text=text, data=data, notes=notes)
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        try:
            result.policy = load_policy(path)  # what we wrote must validate
        except PolicyError as e:  # pragma: no cover - a bug in the writer
            raise RuntimeError(f"the calibrated policy does not validate: {e}") from None
        data["policy_file"] = str(path)
        cal_path = path.with_name(path.name.rsplit(".", 1)[0] + ".calibration.json")
        cal_path.write_text(json.dumps(data, indent=1), encoding="utf-8")
        result.paths = {"policy": path, "calibration": cal_path}
        try:
            from .pictures import save_calibration

            pic = path.with_name(path.name.rsplit(".", 1)[0] + ".calibration.png")
            save_calibration(data, pic)
            result.paths["picture"] = pic
        except ImportError:  # matplotlib is optional for calibration
            notes.append("matplotlib is not installed: no calibration picture")
    return result


def _flow(value: Any) -> str:
    """One YAML value on one line (flow style)."""
    text = yaml.safe_dump([value], default_flow_style=True, width=10**6, sort_keys=False).strip()
    return text[1:-1]


def _dump(key: str, value: Any) -> list[str]:
    """``key: value`` in block style one level deep, every nested value in flow style on its line."""
    if isinstance(value, dict) and value and key != "model":
        return [f"{key}:"] + [f"  {_flow(k)}: {_flow(v)}" for k, v in value.items()]
    return [f"{key}: {_flow(value)}"]


def _commented_yaml(policy: Policy, data: dict[str, Any], adapter: ModelAdapter) -> str:
    """The policy as YAML, with what was measured in comments next to the values it chose."""
    d = policy.to_dict()
    n_items = len(data["items"])
    out = [
        f"# Calibrated ToProVAR policy for {adapter.name}, written by `toprovar calibrate`.",
        f"# {n_items} calibration {'class labels' if adapter.conditioning == 'class' else 'prompts'}, "
        f"schedule {data['schedule']}, measured dense (observe mode).",
        f"# Sampling: {describe_sampling(data.get('sampling'))}.",
        f"# Base policy: {data['base_policy']}; fields not mentioned below are its values.",
        "# Measurements: the .calibration.json next to this file (input of `toprovar plan --calibration`).",
        "# Field reference: docs/policies.md; the calibration rules: docs/cli.md.",
    ]
    out += [f"# NOTE: {n}" for n in data.get("notes", ())]
    for key in ("version", "name", "description", "model", "schedules"):
        out += _dump(key, d[key])
    out.append("")
    out.append(f"# rho_s (fraction of tokens below the mean entropy, layer {data['measure_layer']}), "
               f"mean +- std over {n_items} items:")
    for s, ((h, w), m, sd) in enumerate(zip(data["hw"], data["rho_mean"], data["rho_std"])):
        mark = ""
        lo, hi = data["candidate_start_scales"]
        if lo <= s <= hi:
            mark = "  <- candidate start scale"
        val = "n/a" if m is None else f"{m:.3f} +- {sd:.3f}"
        out.append(f"#   scale {s + 1:2d} ({h}x{w}): {val}{mark}")
    starts = [x + 1 if x is not None else None for x in data["start_scale"]]
    out.append(f"# start scale D (1-based) per item under the chosen tau: {starts}")
    for line in _dump("scale", d["scale"]):
        if line.strip().startswith("tau:"):
            line += f"  # {data['tau_rule']}"
        out.append(line)
    out.append("")
    rep = data["representative_scale"]
    h, w = data["hw"][rep]
    out.append(f"# Layer classes from the SVD of each layer's entropy map at scale {rep + 1} ({h}x{w}), "
               f"median over items;")
    out.append(f"# R = exp(-beta (sigma1/sigma2 - 1)) with beta {data['beta']:g}; Detail iff R >= "
               f"{data['detail_threshold']:g} and R outside {data['ambiguity_band']}:")
    for layer, (ratio, r, cls) in enumerate(zip(data["layer_ratio_median"], data["r_score"], data["layer_class"])):
        out.append(f"#   layer {layer:2d}: sigma1/sigma2 {ratio:6.3f}  R {r:.3f}  {cls}")
    out += _dump("layer", d["layer"])
    out.append("")
    for key in ("token", "restore", "kv", "cfg", "skip_scales", "fallback"):
        out += _dump(key, d[key])
    return "\n".join(out) + "\n"
