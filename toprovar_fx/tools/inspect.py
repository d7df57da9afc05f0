"""``toprovar inspect``: one generation under a policy, drawn.

Writes to ``out``:

* ``overlay.png``: the generated image once per scale at which anything was pruned, kept
  tokens in colour and pruned ones grey (paper Fig. 9); a token's colour is the fraction of the
  scale's token-pruned layers that kept it (the conditional batch row);
* ``entropy_layers.png``: every layer's ``[h, w]`` attention-entropy map at the representative
  scale (the maps the layer classification uses);
* ``rho.png``: ``rho_s`` per scale with ``tau``, the candidate start scales and ``D``;
* ``r_scores.png``: ``R`` per layer with the Global/Detail split;
* ``flops.png``: executed vs dense FLOPs per scale;
* ``pair.png``: the dense image next to the pruned one (unless ``dense=False``);
* ``report.json``: the generation report (``GenerationReport.to_dict()`` plus fidelity);
* ``index.html``: all of it on one static page, with the report as tables.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from toprovar_fx.policies import Policy, load_policy

from .calibrate import apply_sampling, check_sampling
from .models import ModelAdapter, load_model
from .progress import progress

__all__ = ["InspectResult", "inspect_policy", "overlay_panels"]


@dataclass
class InspectResult:
    """Files written and the numbers behind them."""

    files: dict[str, Path] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    fidelity: dict[str, Any] = field(default_factory=dict)


def _ranges(ids: list[int]) -> str:
    """``[3, 4, 5, 9]`` -> ``"3-5,9"``."""
    out: list[str] = []
    for i in sorted(ids):
        if out and i == int(out[-1].split("-")[-1]) + 1:
            out[-1] = f"{out[-1].split('-')[0]}-{i}"
        else:
            out.append(str(i))
    return ",".join(out)


def overlay_panels(report: Any, kept_idx: dict[tuple[int, int], torch.Tensor]) -> list[dict[str, Any]]:
    """Panels for ``pictures.save_token_overlay``: one per scale where any layer pruned tokens
    or was skipped (the whole scale greyed when it was skipped)."""
    from .pictures import keep_fraction

    panels = []
    for s in report.scales:
        pruned = [lr for lr in s.layers if lr.action == "prune_tokens"]
        skipped = [lr for lr in s.layers if lr.action == "skip"]
        if s.skipped:
            panels.append({"keep": torch.zeros(s.h, s.w).numpy(), "h": s.h, "w": s.w,
                           "title": f"scale {s.index + 1} ({s.h}x{s.w}): skipped"})
            continue
        if not pruned and not skipped:
            continue
        sets = [kept_idx[(s.index, lr.index)][0] for lr in pruned if (s.index, lr.index) in kept_idx]
        keep = keep_fraction(sets, s.h, s.w) if sets else torch.ones(s.h, s.w).numpy()
        ks = sorted({lr.kept_tokens for lr in pruned if lr.kept_tokens is not None})
        kept_txt = f"kept {'/'.join(map(str, ks))} of {s.tokens}" if ks else f"{s.tokens} tokens"
        parts = [kept_txt]
        if pruned:
            parts.append(f"layers {_ranges([lr.index for lr in pruned])} pruned")
        if skipped:
            parts.append(f"layers {_ranges([lr.index for lr in skipped])} skipped")
        panels.append({"keep": keep, "h": s.h, "w": s.w,
                       "title": f"scale {s.index + 1} ({s.h}x{s.w}): {parts[0]}\n" + "; ".join(parts[1:])})
    return panels


def inspect_policy(
    model: str | ModelAdapter,
    policy: str | Policy,
    out: str | Path,
    *,
    preset: str | None = None,
    condition: Any | None = None,
    seed: int = 0,
    resolution: str | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    dense: bool = True,
    dynamic: bool | None = None,
    show_progress: bool = False,
    cfg: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
) -> InspectResult:
    """Generate once with ``policy`` and write the pictures and page listed in the module docstring.

    ``cfg`` / ``top_p`` / ``top_k``: sampling overrides (``None``: the checkpoint's recorded settings,
    else the tool's defaults; ``calibrate.sampling_for``)."""
    import toprovar_fx
    from toprovar_fx.metrics import psnr, ssim, token_agreement
    from toprovar_fx.runtime.session import last_session

    from . import pictures

    pol = load_policy(policy, preset=preset) if not isinstance(policy, Policy) else policy
    check_sampling(cfg, top_p, top_k)
    adapter = load_model(model, device=device, dtype=dtype, seed=seed)
    adapter.set_schedule(resolution)
    apply_sampling(adapter, cfg=cfg, top_p=top_p, top_k=top_k)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prepared = adapter.prepare(adapter.conditions(condition, 1))
    result = InspectResult()
    steps = 3 if dense else 2
    with progress(steps, "inspect", show_progress) as bar:
        bar.set_note("compiling and generating with the policy")
        fast = torch.compile(adapter.sampler, backend="toprovar", options={"policy": pol.to_dict()},
                             dynamic=dynamic)
        gen = adapter.generate(fast, prepared, seed)
        rep = toprovar_fx.last_generation()
        sess = last_session()
        if rep is None or sess is None or sess.gen is None:
            raise RuntimeError("the toprovar backend recorded no generation: is the sampler compiled?")
        maps = toprovar_fx.entropy_maps()
        kept_idx = {k: v.detach().cpu() for k, v in sess.gen.kept_idx.items()}
        bar.update(note="dense reference" if dense else "pictures")
        ref = None
        if dense:
            ref = adapter.generate(adapter.sampler, prepared, seed)
            bar.update(note="pictures")
        if ref is not None:
            a, b = gen.images.float().cpu(), ref.images.float().cpu()
            p = psnr(a, b)
            result.fidelity = {"psnr_db": None if math.isinf(p) else p, "ssim": ssim(a, b)}
            if gen.logits is not None and ref.logits is not None:
                result.fidelity["token_agreement"] = [token_agreement(x.float().cpu(), y.float().cpu())
                                                      for x, y in zip(gen.logits, ref.logits)]
        files = result.files
        schedule = adapter.schedule if adapter.schedule in pol.schedules else None
        res = pol.resolved(schedule) if schedule is not None else None
        title = f"{adapter.name}, policy {pol.name}" + (f" ({pol.preset})" if pol.preset else "")
        image = gen.images[0]
        panels = overlay_panels(rep, kept_idx)
        if not panels:
            panels = [{"keep": None, "h": 1, "w": 1, "title": "nothing was pruned in this generation"}]
        files["overlay"] = pictures.save_token_overlay(image, panels, out / "overlay.png",
                                                       title=f"pruned tokens per scale: {title}")
        rep_scale = res.representative if res is not None else None
        if rep_scale is not None:
            layer_maps = {layer: m for (s, layer), m in maps.items() if s == rep_scale}
            if layer_maps:
                h, w = rep.scales[rep_scale].h, rep.scales[rep_scale].w
                cls = {lr.index: lr for lr in rep.scales[-1].layers}
                labels = {}
                for layer in layer_maps:
                    lr = cls.get(layer)
                    extra = ""
                    if lr is not None and lr.r_score is not None:
                        extra = f": R {lr.r_score:.2f} {lr.layer_class}"
                    labels[layer] = f"layer {layer}{extra}"
                files["entropy"] = pictures.save_entropy_maps(
                    layer_maps, out / "entropy_layers.png", labels=labels,
                    title=f"attention entropy per layer at the representative scale {rep_scale + 1} ({h}x{w})")
        rho = [s.rho for s in rep.scales]
        files["rho"] = pictures.save_rho(
            rho, out / "rho.png", tau=pol.scale.tau if pol.scale.criterion == "rho" else None,
            direction=pol.scale.direction, start=rep.start_scale,
            candidates=(res.min_start, res.max_start) if res is not None else None,
            title=f"rho_s at layer {pol.scale.measure_layer} ({title})")
        last = rep.scales[-1].layers if rep.scales else []
        files["r_scores"] = pictures.save_r_scores(
            [lr.r_score for lr in last], [lr.layer_class for lr in last], out / "r_scores.png",
            threshold=pol.layer.detail_threshold if pol.layer.mode == "online" else None,
            band=pol.layer.ambiguity_band if pol.layer.mode == "online" else None,
            dense_layers=pol.scale.measure_layer + 1,
            title=f"layer scores R ({pol.layer.mode}) and the Global/Detail split")
        files["flops"] = pictures.save_flops(
            [s.flops_dense for s in rep.scales], [s.flops_executed for s in rep.scales],
            [f"{s.index + 1}\n{s.h}x{s.w}" for s in rep.scales], out / "flops.png")
        if ref is not None:
            fid = result.fidelity
            ptxt = "identical" if fid["psnr_db"] is None else f"PSNR {fid['psnr_db']:.1f} dB"
            files["pair"] = pictures.save_pair(ref.images[0], image, out / "pair.png",
                                               labels=("dense", f"toprovar ({pol.name})"),
                                               title=f"{ptxt}, SSIM {fid['ssim']:.3f}, FLOP ratio {rep.flop_ratio:.3f}")
        result.report = {**rep.to_dict(), "flop_ratio": rep.flop_ratio, "fidelity": result.fidelity,
                         "model": adapter.name, "policy_source": pol.source, "preset": pol.preset,
                         "schedule": adapter.schedule, "condition": adapter.conditions(condition, 1)[0],
                         "seed": seed, "sampling": adapter.extra.get("sampling")}
        (out / "report.json").write_text(json.dumps(result.report, indent=1, default=str), encoding="utf-8")
        files["report"] = out / "report.json"
        files["index"] = _write_index(out, title, rep, result, files, pol)
        bar.update(note="done")
    return result


def _write_index(out: Path, title: str, rep: Any, result: InspectResult, files: dict[str, Path], pol: Policy) -> Path:
    from .pictures import write_index_html

    fid = result.fidelity
    summary: dict[str, Any] = {
        "model": result.report["model"],
        "policy": f"{pol.name} ({pol.source})" + (f", preset {pol.preset}" if pol.preset else ""),
        "schedule": result.report["schedule"],
        "condition / seed": f"{result.report['condition']} / {result.report['seed']}",
        "transformer rows (CFG)": rep.rows,
        "start scale D (1-based)": "never" if rep.start_scale is None else rep.start_scale + 1,
        "executed / dense FLOPs": f"{rep.flop_ratio:.4f} ({rep.flops_executed / 1e9:.4g} / "
                                  f"{rep.flops_dense / 1e9:.4g} GFLOPs)",
        "attention rewritten": f"{rep.attention_rewrites} ({rep.attention_kinds}); refused: "
                               f"{len(rep.attention_skipped)}",
        "graphs compiled (this generation)": rep.compiles,
        "fallbacks": "; ".join(rep.fallbacks) or "none",
    }
    if fid:
        summary["fidelity vs dense"] = (("identical" if fid["psnr_db"] is None else f"PSNR {fid['psnr_db']:.2f} dB")
                                        + f", SSIM {fid['ssim']:.4f}")
    captions = {
        "pair": "dense (left) and toprovar (right), same seed",
        "overlay": "pruned tokens per scale: kept in colour, pruned in grey (paper Fig. 9)",
        "entropy": "per-layer attention entropy at the representative scale",
        "rho": "rho_s per scale, tau and the start scale D",
        "r_scores": "R per layer: Global / Detail",
        "flops": "executed vs dense FLOPs per scale",
    }
    figures = [(files[k].name, cap) for k, cap in captions.items() if k in files]
    depth = max((len(s.layers) for s in rep.scales), default=0)
    scale_rows = []
    for s in rep.scales:
        acts = []
        for lr in s.layers:
            a = {"keep": "K", "skip": "S", "prune_tokens": "P"}.get(lr.action, lr.action)
            acts.append(f"{a}{lr.kept_tokens}" if lr.action == "prune_tokens" else a)
        scale_rows.append([s.index + 1, f"{s.h}x{s.w}", s.tokens, "-" if s.rho is None else f"{s.rho:.3f}",
                           "yes" if s.pruning_active else "", "yes" if s.skipped else "", " ".join(acts),
                           f"{s.flops_dense / 1e6:.4g}", f"{s.flops_executed / 1e6:.4g}",
                           f"{s.flops_executed / s.flops_dense:.3f}" if s.flops_dense else "-"])
    layer_rows = []
    last = rep.scales[-1].layers if rep.scales else []
    for lr in last:
        ents = [sc.layers[lr.index].mean_entropy for sc in rep.scales
                if lr.index < len(sc.layers) and sc.layers[lr.index].mean_entropy is not None]
        layer_rows.append([lr.index, lr.layer_class or "-", "-" if lr.r_score is None else f"{lr.r_score:.3f}",
                           "-" if not ents else f"{ents[-1]:.3f}"])
    fid_rows = [[i + 1, f"{t:.3f}"] for i, t in enumerate(fid.get("token_agreement", []))]
    tables = [
        ("Per scale", ["scale", "h x w", "tokens", "rho", "active", "skipped",
                       f"layers 0-{depth - 1} (K keep, S skip, Pk pruned to k tokens)",
                       "MFLOPs dense", "MFLOPs executed", "ratio"], scale_rows),
        ("Per layer", ["layer", "class", "R", "mean entropy (last scale it ran dense)"], layer_rows),
    ]
    if fid_rows:
        tables.append(("Token agreement with dense per scale (arg-max of the guided logits)",
                       ["scale", "agreement"], fid_rows))
    if rep.attention_skipped:
        tables.append(("Attention sites left as they were", ["site", "reason"],
                       [[d.get("node", d.get("site", "?")), d.get("reason", "")] for d in rep.attention_skipped]))
    return write_index_html(out / "index.html", f"toprovar inspect: {title}", summary, figures, tables)
