"""Pictures of what the pruning does (matplotlib, object API only: no pyplot, no global backend).

Every ``save_*`` function writes one PNG and returns its path; ``write_index_html`` writes a
static page that shows PNGs and tables together. Inputs are plain data (lists, numpy arrays,
CPU tensors), so the functions work on reports loaded from JSON as well.
"""

from __future__ import annotations

import html
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

__all__ = [
    "keep_fraction",
    "overlay",
    "save_calibration",
    "save_entropy_maps",
    "save_flops",
    "save_pair",
    "save_r_scores",
    "save_rho",
    "save_token_overlay",
    "to_uint8",
    "write_index_html",
]

KEEP_COLOUR = "#1f77b4"
DETAIL_COLOUR = "#d62728"
GLOBAL_COLOUR = "#7f7f7f"
DPI = 110


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI)
    return path


def to_uint8(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """An image ``[3, H, W]`` (or ``[H, W, 3]``) in ``[0, 1]`` -> ``uint8 [H, W, 3]``."""
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().numpy()
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return (np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8)


def keep_fraction(kept: Sequence[torch.Tensor | np.ndarray], h: int, w: int) -> np.ndarray:
    """``[h, w]`` fraction of the given kept-index sets (1-D token positions) that keep each token."""
    frac = np.zeros(h * w, dtype=np.float32)
    for idx in kept:
        ids = np.asarray(idx.cpu() if isinstance(idx, torch.Tensor) else idx, dtype=np.int64).reshape(-1)
        frac[ids] += 1.0
    if kept:
        frac /= len(kept)
    return frac.reshape(h, w)


def overlay(image: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Kept tokens in colour, pruned tokens grey and dimmed (paper Fig. 9); ``keep`` in [0, 1]."""
    img = image.astype(np.float32) / 255.0
    big_h, big_w = img.shape[:2]
    h, w = keep.shape
    rows = np.minimum((np.arange(big_h) * h) // big_h, h - 1)
    cols = np.minimum((np.arange(big_w) * w) // big_w, w - 1)
    k = keep[rows][:, cols][..., None]
    grey = img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    grey = (0.35 + 0.45 * grey)[..., None].repeat(3, axis=-1)
    return (np.clip(k * img + (1 - k) * grey, 0, 1) * 255 + 0.5).astype(np.uint8)


def _grid(ax: Any, h: int, w: int, big_h: int, big_w: int) -> None:
    if max(h, w) > 24:
        return
    for i in range(1, h):
        ax.axhline(i * big_h / h - 0.5, color="white", lw=0.4, alpha=0.5)
    for j in range(1, w):
        ax.axvline(j * big_w / w - 0.5, color="white", lw=0.4, alpha=0.5)


def save_token_overlay(image: torch.Tensor | np.ndarray, panels: Sequence[Mapping[str, Any]], path: str | Path,
                       title: str = "") -> Path:
    """One panel per scale: the generated image with that scale's pruned tokens in grey.

    ``panels``: mappings with ``keep`` (``[h, w]`` array in [0, 1], or ``None`` for a panel of
    the plain image), ``h``, ``w`` and ``title``.
    """
    img = to_uint8(image)
    n = max(len(panels), 1)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    width = max(3.3 * cols, 4.2)
    fig = Figure(figsize=(width, 3.5 * rows + 0.8), layout="constrained")
    for i, p in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        keep = p.get("keep")
        ax.imshow(img if keep is None else overlay(img, np.asarray(keep, dtype=np.float32)), interpolation="nearest")
        if keep is not None:
            _grid(ax, int(p["h"]), int(p["w"]), img.shape[0], img.shape[1])
        ax.set_title(str(p.get("title", "")), fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(textwrap.fill(title, int(width * 10)), fontsize=10)
    fig.supxlabel("colour: kept tokens; grey: pruned tokens (partly grey: kept by some of the scale's pruned "
                  "layers)" if width >= 6.5 else "colour: kept tokens; grey: pruned tokens", fontsize=8, color="#444")
    return _save(fig, path)


def save_pair(left: torch.Tensor | np.ndarray, right: torch.Tensor | np.ndarray, path: str | Path,
              labels: tuple[str, str] = ("dense", "toprovar"), title: str = "") -> Path:
    """Two images side by side with captions (dense vs toprovar)."""
    fig = Figure(figsize=(7.0, 3.9 + (0.3 if title else 0.0)))
    for i, (img, lab) in enumerate(zip((left, right), labels)):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.imshow(to_uint8(img), interpolation="nearest")
        ax.set_title(lab, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def save_entropy_maps(maps: Mapping[int, torch.Tensor | np.ndarray], path: str | Path, title: str = "",
                      labels: Mapping[int, str] | None = None) -> Path:
    """Per-layer ``[h, w]`` entropy heat maps (nats), one panel per layer, shared colour scale."""
    layers = sorted(maps)
    arrs = {i: np.asarray(maps[i].cpu() if isinstance(maps[i], torch.Tensor) else maps[i], dtype=np.float32)
            for i in layers}
    n = max(len(layers), 1)
    cols = min(n, 8 if n > 16 else 4)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(2.6 * cols + 1.0, 2.6 * rows + 0.6))
    vmin = min((float(a.min()) for a in arrs.values()), default=0.0)
    vmax = max((float(a.max()) for a in arrs.values()), default=1.0)
    im = None
    axes = []
    for i, layer in enumerate(layers):
        ax = fig.add_subplot(rows, cols, i + 1)
        im = ax.imshow(arrs[layer], cmap="magma", vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_title((labels or {}).get(layer, f"layer {layer}"), fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        axes.append(ax)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.9, 0.95 if title else 1))
    if im is not None:
        cax = fig.add_axes((0.92, 0.15, 0.02, 0.7))
        fig.colorbar(im, cax=cax, label="attention entropy (nats)")
    return _save(fig, path)


def _plot_rho(ax: Any, rho: Sequence[float | None], tau: float | None, direction: str,
              start: int | None, candidates: tuple[int, int] | None, items: Sequence[Sequence[float | None]] | None,
              std: Sequence[float | None] | None = None) -> None:
    xs = np.arange(1, len(rho) + 1)
    if candidates is not None:
        lo, hi = candidates
        ax.axvspan(lo + 0.5, hi + 1.5, color="#ffe9b3", alpha=0.6, label="candidate start scales")
    for item in items or ():
        ax.plot(xs, [np.nan if v is None else v for v in item], color="#9ecae1", lw=0.8, alpha=0.7)
    y = np.array([np.nan if v is None else v for v in rho], dtype=float)
    if std is not None:
        sd = np.array([np.nan if v is None else v for v in std], dtype=float)
        ax.fill_between(xs, y - sd, y + sd, color=KEEP_COLOUR, alpha=0.15, label="mean +- std")
    ax.plot(xs, y, "o-", color=KEEP_COLOUR, lw=1.8, label="rho_s" if items is None else "mean rho_s")
    if tau is not None:
        ax.axhline(tau, color=DETAIL_COLOUR, ls="--", lw=1.2,
                   label=f"tau = {tau:g} (prune when rho {'<=' if direction == 'le' else '>='} tau)")
    if start is not None:
        ax.axvline(start + 1, color="black", ls=":", lw=1.2, label=f"D = scale {start + 1}")
    ax.set_xlabel("scale (1-based)")
    ax.set_ylabel("rho_s: fraction of tokens below mean entropy")
    ax.set_xticks(xs)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")


def save_rho(rho: Sequence[float | None], path: str | Path, *, tau: float | None, direction: str = "le",
             start: int | None = None, candidates: tuple[int, int] | None = None, title: str = "") -> Path:
    """rho_s against the scale, with tau, the start scale D and the candidate start scales."""
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    _plot_rho(ax, rho, tau, direction, start, candidates, None)
    ax.set_title(title or "low-entropy ratio rho_s per scale", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _plot_r(ax: Any, scores: Sequence[float | None], classes: Sequence[str | None], threshold: float | None,
            band: Sequence[float] | None, dense_layers: int = 0) -> None:
    xs = np.arange(len(scores))
    vals = [0.0 if s is None else float(s) for s in scores]
    colours = [DETAIL_COLOUR if c == "detail" else GLOBAL_COLOUR for c in classes]
    if band is not None:
        ax.axhspan(band[0], band[1], color="#ffe9b3", alpha=0.8, zorder=0, label="ambiguity band (counts as Global)")
    bars = ax.bar(xs, vals, color=colours, zorder=2)
    for i, bar in enumerate(bars):
        if i < dense_layers:
            bar.set_hatch("///")
            bar.set_edgecolor("white")
    if len(xs) <= 16:
        for x, v, s in zip(xs, vals, scores):
            ax.text(x, v + 0.02, "n/a" if s is None else f"{v:.2f}", ha="center", fontsize=7, zorder=3)
    if threshold is not None:
        ax.axhline(threshold, color="black", ls="--", lw=1, zorder=3, label=f"detail threshold {threshold:g}")
    ax.set_xticks(xs)
    ax.set_xticklabels([str(i) for i in xs], fontsize=7 if len(xs) > 24 else 9)
    ax.set_xlabel("layer (0-based)")
    ax.set_ylabel("R = exp(-beta (sigma1/sigma2 - 1))")
    ax.set_ylim(0, 1.3)
    handles = [Patch(color=DETAIL_COLOUR, label=f"Detail ({sum(c == 'detail' for c in classes)})"),
               Patch(color=GLOBAL_COLOUR, label=f"Global ({sum(c != 'detail' for c in classes)})")]
    if dense_layers:
        handles.append(Patch(facecolor="#bbbbbb", hatch="///", edgecolor="white",
                             label=f"layers 0-{dense_layers - 1}: always dense (rho measured there)"))
    h2, _ = ax.get_legend_handles_labels()
    ax.legend(handles=handles + h2, fontsize=7, loc="upper right", ncol=2)


def save_r_scores(scores: Sequence[float | None], classes: Sequence[str | None], path: str | Path, *,
                  threshold: float | None = None, band: Sequence[float] | None = None, title: str = "",
                  dense_layers: int = 0) -> Path:
    """R score per layer, bars coloured by the Global/Detail split."""
    fig = Figure(figsize=(max(6.0, 0.25 * len(scores) + 2), 4.0))
    ax = fig.add_subplot(1, 1, 1)
    _plot_r(ax, scores, classes, threshold, band, dense_layers)
    ax.set_title(title or "layer scores R and classes", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def save_flops(dense: Sequence[float], executed: Sequence[float], labels: Sequence[str], path: str | Path,
               title: str = "") -> Path:
    """Executed vs dense GFLOPs per scale (grouped bars, log scale), executed/dense printed on top."""
    fig = Figure(figsize=(max(6.4, 0.6 * len(dense) + 2), 4.2))
    ax = fig.add_subplot(1, 1, 1)
    xs = np.arange(len(dense))
    d = np.array(dense, dtype=float) / 1e9
    e = np.array(executed, dtype=float) / 1e9
    floor = max(float(d[d > 0].min()) / 10 if (d > 0).any() else 1e-6, 1e-9)
    ax.bar(xs - 0.2, d, 0.4, color=GLOBAL_COLOUR, label=f"dense ({d.sum():.3g} GFLOPs)")
    ax.bar(xs + 0.2, np.maximum(e, floor), 0.4, color=KEEP_COLOUR, label=f"executed ({e.sum():.3g} GFLOPs)")
    ax.set_yscale("log")
    for x, dv, ev in zip(xs, d, e):
        ax.text(x, dv * 1.15, "skip" if ev == 0 and dv > 0 else f"{ev / dv:.2f}" if dv else "",
                ha="center", fontsize=7)
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_xlabel("scale (token map)")
    ax.set_ylabel("GFLOPs (log scale)")
    ratio = e.sum() / d.sum() if d.sum() else 1.0
    ax.set_title(title or f"executed vs dense FLOPs per scale (total ratio {ratio:.3f})", fontsize=10)
    ax.set_ylim(floor, d.max() * 2.5 if len(d) else 1)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return _save(fig, path)


def save_calibration(data: Mapping[str, Any], path: str | Path) -> Path:
    """The calibration at a glance: rho_s per scale (items, mean +- std, tau) and layer R scores."""
    fig = Figure(figsize=(12.0, 4.2))
    ax = fig.add_subplot(1, 2, 1)
    lo, hi = data["candidate_start_scales"]
    _plot_rho(ax, data["rho_mean"], data["tau"], data.get("direction", "le"), None, (lo, hi) if hi > lo else None, data["rho"],
              data["rho_std"])
    ax.set_title(f"rho_s over {len(data['rho'])} calibration items (layer {data['measure_layer']})", fontsize=10)
    ax2 = fig.add_subplot(1, 2, 2)
    _plot_r(ax2, data["r_score"], data["layer_class"], data["detail_threshold"], data["ambiguity_band"],
            int(data["measure_layer"]) + 1)
    rep = data["representative_scale"]
    h, w = data["hw"][rep]
    ax2.set_title(f"layer classes at scale {rep + 1} ({h}x{w}), median over items", fontsize=10)
    fig.suptitle(f"toprovar calibrate: {data['model']} -> {data['policy']}", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def write_index_html(path: str | Path, title: str, summary: Mapping[str, Any],
                     figures: Sequence[tuple[str, str]], tables: Sequence[tuple[str, Sequence[str], Sequence[Sequence[Any]]]]) -> Path:
    """A static page: the summary as a key/value table, the figures (file name, caption), then tables."""
    style = ("body{font-family:system-ui,sans-serif;margin:24px;max-width:1400px;color:#222}"
             "table{border-collapse:collapse;margin:8px 0 24px;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f2f2f2}"
             "td:first-child,th:first-child{text-align:left}"
             "figure{display:inline-block;margin:8px 16px 16px 0;vertical-align:top}"
             "figure img{max-width:100%;border:1px solid #ddd}figcaption{font-size:13px;color:#555}")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>",
             _table(["", "value"], [(k, v) for k, v in summary.items()])]
    for fname, caption in figures:
        parts.append(f"<figure><img src='{html.escape(fname)}' alt='{html.escape(caption)}'>"
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    for name, head, rows in tables:
        parts.append(f"<h2>{html.escape(name)}</h2>" + _table(head, rows))
    parts.append("</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
