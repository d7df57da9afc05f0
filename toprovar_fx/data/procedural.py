"""Seeded procedural images for training the reference model (no downloads, Pillow + numpy only).

Sixteen classes, from a single large glyph ("W", as in the ToProVAR paper's simple prompt) to
dense, fine content (a page of small text, a crowd of small shapes, fine stripes), so that the
last scales of a next-scale generator carry real detail for some classes and almost none for
others. Every image is a pure function of ``(seed, index, size)``: the class is
``index % NUM_CLASSES`` and every random choice comes from a numpy ``Generator`` seeded with
``SeedSequence([seed, index])``.

Glyphs use the DejaVu / STIX TrueType fonts that matplotlib ships (found without importing
matplotlib); without them, Pillow's built-in scalable font (Pillow >= 10.1), else its bitmap
font scaled up. Shapes are drawn at ``supersample`` times the size and box-filtered down, so
edges are anti-aliased. Pixel values may differ slightly between Pillow / FreeType versions;
within one installation they are bit-exact.

This module imports only numpy and Pillow (multiprocessing workers stay light).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import signal
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_Rng = np.random.Generator
_Color = tuple[int, int, int]

_FONT_FILES = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
)
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_TEXT_CHARS = "abcdefghijklmnopqrstuvwxyz      ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:-"


@functools.lru_cache(maxsize=1)
def font_paths() -> tuple[str, ...]:
    """TrueType files shipped by matplotlib that exist here (empty tuple when none)."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or spec.origin is None:
        return ()
    folder = os.path.join(os.path.dirname(spec.origin), "mpl-data", "fonts", "ttf")
    return tuple(p for p in (os.path.join(folder, f) for f in _FONT_FILES) if os.path.isfile(p))


@functools.lru_cache(maxsize=256)
def _font(which: int, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    paths = font_paths()
    if paths:
        return ImageFont.truetype(paths[which % len(paths)], size)
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType
    except TypeError:
        return ImageFont.load_default()


# --------------------------------------------------------------------------- colours
def _hsv(h: float, s: float, v: float) -> _Color:
    i = int(h * 6) % 6
    f = h * 6 - math.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return (round(255 * r), round(255 * g), round(255 * b))


def _color(rng: _Rng, vmin: float = 0.2, vmax: float = 1.0, smin: float = 0.3) -> _Color:
    return _hsv(float(rng.random()), float(rng.uniform(smin, 1.0)), float(rng.uniform(vmin, vmax)))


def _contrasting(rng: _Rng) -> tuple[_Color, _Color]:
    """Background and foreground colours with clearly different brightness."""
    dark_bg = bool(rng.random() < 0.5)
    bg = _hsv(float(rng.random()), float(rng.uniform(0.0, 0.6)), float(rng.uniform(0.05, 0.3) if dark_bg else rng.uniform(0.75, 1.0)))
    fg = _hsv(float(rng.random()), float(rng.uniform(0.4, 1.0)), float(rng.uniform(0.75, 1.0) if dark_bg else rng.uniform(0.1, 0.45)))
    return bg, fg


# --------------------------------------------------------------------------- helpers
def _canvas(size: int, color: _Color) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", (size, size), color)
    return img, ImageDraw.Draw(img)


def _draw_centered_text(
    draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, center: tuple[float, float], fill: _Color
) -> None:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = center[0] - (left + right) / 2
    y = center[1] - (top + bottom) / 2
    draw.text((x, y), text, font=font, fill=fill)


def _regular_polygon(cx: float, cy: float, r: float, n: int, rot: float, inner: float | None = None) -> list[tuple[float, float]]:
    pts = []
    steps = 2 * n if inner is not None else n
    for k in range(steps):
        rad = r if inner is None or k % 2 == 0 else r * inner
        a = rot + 2 * math.pi * k / steps
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, rot: float, fill: _Color) -> None:
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif kind == "square":
        draw.polygon(_regular_polygon(cx, cy, r * 1.2, 4, rot), fill=fill)
    elif kind == "triangle":
        draw.polygon(_regular_polygon(cx, cy, r * 1.25, 3, rot), fill=fill)
    elif kind == "star":
        draw.polygon(_regular_polygon(cx, cy, r * 1.3, 5, rot, inner=0.45), fill=fill)
    else:  # pragma: no cover - internal
        raise ValueError(kind)


def _rotate_coords(s: int, angle: float) -> tuple[np.ndarray, np.ndarray]:
    t = np.arange(s, dtype=np.float32) + 0.5
    x, y = t[None, :], t[:, None]
    c, si = np.float32(math.cos(angle)), np.float32(math.sin(angle))
    return x * c + y * si, -x * si + y * c


def _two_tone(mask: np.ndarray, a: _Color, b: _Color) -> Image.Image:
    out = np.where(mask[..., None], np.array(a, np.uint8), np.array(b, np.uint8))
    return Image.fromarray(out.astype(np.uint8), "RGB")


# --------------------------------------------------------------------------- classes
def _single_glyph(letter: str) -> Callable[[_Rng, int], Image.Image]:
    def render(rng: _Rng, s: int) -> Image.Image:
        bg, fg = _contrasting(rng)
        img, draw = _canvas(s, bg)
        font = _font(int(rng.integers(0, 8)), int(s * rng.uniform(0.5, 0.8)))
        c = (s * rng.uniform(0.42, 0.58), s * rng.uniform(0.42, 0.58))
        _draw_centered_text(draw, letter, font, c, fg)
        return img.rotate(float(rng.uniform(-12, 12)), resample=Image.BICUBIC, fillcolor=bg)

    return render


def _word(rng: _Rng, s: int) -> Image.Image:
    bg, fg = _contrasting(rng)
    img, draw = _canvas(s, bg)
    n = int(rng.integers(3, 5))
    text = "".join(_LETTERS[int(i)] for i in rng.integers(0, 26, n))
    font = _font(int(rng.integers(0, 8)), int(s * rng.uniform(0.18, 0.26)))
    _draw_centered_text(draw, text, font, (s * rng.uniform(0.45, 0.55), s * rng.uniform(0.3, 0.7)), fg)
    return img


def _text_page(rng: _Rng, s: int) -> Image.Image:
    bg, fg = _contrasting(rng)
    img, draw = _canvas(s, bg)
    size = int(s * rng.uniform(0.045, 0.07))
    font = _font(int(rng.integers(0, 8)), size)
    y = s * rng.uniform(0.01, 0.05)
    margin = s * rng.uniform(0.02, 0.06)
    while y < s - size:
        n = int(rng.integers(20, 40))
        line = "".join(_TEXT_CHARS[int(i)] for i in rng.integers(0, len(_TEXT_CHARS), n))
        draw.text((margin, y), line, font=font, fill=fg)
        y += size * rng.uniform(1.1, 1.4)
    return img


def _few_shapes(kind: str) -> Callable[[_Rng, int], Image.Image]:
    def render(rng: _Rng, s: int) -> Image.Image:
        bg = _color(rng, 0.05, 1.0, 0.0)
        img, draw = _canvas(s, bg)
        for _ in range(int(rng.integers(1, 4))):
            r = s * rng.uniform(0.1, 0.25)
            cx, cy = rng.uniform(r, s - r, 2)
            _shape(draw, kind, cx, cy, r, float(rng.uniform(0, 2 * math.pi)), _color(rng, 0.3, 1.0, 0.5))
        return img

    return render


def _stripes(period_frac: tuple[float, float]) -> Callable[[_Rng, int], Image.Image]:
    def render(rng: _Rng, s: int) -> Image.Image:
        period = s * rng.uniform(*period_frac)
        angle = float(rng.choice([0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4])) + rng.uniform(-0.1, 0.1)
        u, _ = _rotate_coords(s, angle)
        a, b = _contrasting(rng)
        return _two_tone(np.mod(u + rng.uniform(0, period), period) < period * rng.uniform(0.35, 0.65), a, b)

    return render


def _checker(cell_frac: tuple[float, float]) -> Callable[[_Rng, int], Image.Image]:
    def render(rng: _Rng, s: int) -> Image.Image:
        cell = s * rng.uniform(*cell_frac)
        u, v = _rotate_coords(s, float(rng.choice([0.0, math.pi / 4])) + rng.uniform(-0.05, 0.05))
        off = rng.uniform(0, cell, 2)
        parity = (np.floor((u + off[0]) / cell) + np.floor((v + off[1]) / cell)) % 2 == 0
        a, b = _contrasting(rng)
        return _two_tone(parity, a, b)

    return render


def _blend(t: np.ndarray, a: _Color, b: _Color) -> Image.Image:
    t = np.clip(t, 0.0, 1.0)[..., None].astype(np.float32)
    out = np.array(a, np.float32) + t * (np.array(b, np.float32) - np.array(a, np.float32))
    return Image.fromarray(np.round(out).astype(np.uint8), "RGB")


def _gradient_linear(rng: _Rng, s: int) -> Image.Image:
    u, _ = _rotate_coords(s, float(rng.uniform(0, 2 * math.pi)))
    u = np.broadcast_to(u, (s, s))
    u = u - u.min()
    return _blend(u / max(float(u.max()), 1e-6), _color(rng), _color(rng))


def _gradient_radial(rng: _Rng, s: int) -> Image.Image:
    t = np.arange(s, dtype=np.float32) + 0.5
    x, y = t[None, :], t[:, None]
    cx, cy = rng.uniform(0.2, 0.8, 2) * s
    d = np.sqrt((x - cx) ** 2 + (y - cy) ** 2) / (s * rng.uniform(0.5, 0.9))
    return _blend(d, _color(rng, 0.6, 1.0), _color(rng, 0.05, 0.6))


def _busy(rng: _Rng, s: int) -> Image.Image:
    img, draw = _canvas(s, _color(rng, 0.05, 1.0, 0.0))
    kinds = ("circle", "square", "triangle", "star")
    for _ in range(int(rng.integers(120, 260))):
        r = s * rng.uniform(0.008, 0.035)
        cx, cy = rng.uniform(0, s, 2)
        _shape(draw, kinds[int(rng.integers(0, 4))], cx, cy, r, float(rng.uniform(0, 2 * math.pi)), _color(rng))
    return img


def _landscape(rng: _Rng, s: int) -> Image.Image:
    y = np.broadcast_to((np.arange(s, dtype=np.float32)[:, None] + 0.5) / s, (s, s))
    img = _blend(y * 1.6, _hsv(float(rng.uniform(0.5, 0.7)), 0.6, float(rng.uniform(0.6, 1.0))), _hsv(float(rng.uniform(0.0, 0.15)), 0.4, 1.0))
    draw = ImageDraw.Draw(img)
    r = s * rng.uniform(0.06, 0.12)
    cx, cy = s * rng.uniform(0.15, 0.85), s * rng.uniform(0.12, 0.4)
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=_hsv(float(rng.uniform(0.08, 0.16)), 0.8, 1.0))
    layers = int(rng.integers(2, 4))
    hue = float(rng.uniform(0.2, 0.45))
    for k in range(layers):
        base = s * (0.45 + 0.18 * k + rng.uniform(-0.05, 0.05))
        xs = np.linspace(0, s, 33)
        h = np.zeros_like(xs)
        for freq in (1, 2, 4):
            h += s * 0.08 / freq * np.sin(2 * math.pi * freq * xs / s + rng.uniform(0, 2 * math.pi))
        pts = [(float(x), float(base + dy)) for x, dy in zip(xs, h)] + [(s, s), (0, s)]
        draw.polygon(pts, fill=_hsv(hue + 0.03 * k, 0.6, 0.55 - 0.13 * k))
    return img


_CLASSES: tuple[tuple[str, Callable[[_Rng, int], Image.Image]], ...] = (
    ("glyph_W", _single_glyph("W")),
    ("glyph_A", _single_glyph("A")),
    ("word", _word),
    ("text_page", _text_page),
    ("circles", _few_shapes("circle")),
    ("squares", _few_shapes("square")),
    ("triangles", _few_shapes("triangle")),
    ("stars", _few_shapes("star")),
    ("stripes_coarse", _stripes((0.12, 0.25))),
    ("stripes_fine", _stripes((0.03, 0.06))),
    ("checker_coarse", _checker((0.12, 0.25))),
    ("checker_fine", _checker((0.03, 0.06))),
    ("gradient_linear", _gradient_linear),
    ("gradient_radial", _gradient_radial),
    ("busy_shapes", _busy),
    ("landscape", _landscape),
)
NUM_CLASSES = len(_CLASSES)
#: classes with little content at the last scales / dense, fine content (see docs/reference-model.md)
SIMPLE_CLASSES = ("glyph_W", "glyph_A", "circles", "gradient_linear", "gradient_radial")
DENSE_CLASSES = ("text_page", "stripes_fine", "checker_fine", "busy_shapes")


def class_names() -> list[str]:
    """Names of the classes, indexed by label."""
    return [name for name, _ in _CLASSES]


def render(label: int, rng: _Rng, size: int = 256, supersample: int = 2) -> np.ndarray:
    """One image of class ``label`` as ``uint8 [size, size, 3]``, random choices from ``rng``."""
    if not 0 <= label < NUM_CLASSES:
        raise ValueError(f"label {label} outside [0, {NUM_CLASSES})")
    big = size * max(int(supersample), 1)
    img = _CLASSES[label][1](rng, big)
    if big != size:
        img = img.resize((size, size), Image.BOX)
    return np.asarray(img, dtype=np.uint8).copy()


def sample_rng(seed: int, index: int) -> _Rng:
    """The generator of sample ``index`` of dataset ``seed``."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(index)])))


def label_of(index: int) -> int:
    """Class of sample ``index`` (balanced: ``index % NUM_CLASSES``)."""
    return int(index) % NUM_CLASSES


def make_sample(seed: int, index: int, size: int = 256, supersample: int = 2) -> tuple[np.ndarray, int]:
    """Sample ``index`` of dataset ``seed``: ``(uint8 [size, size, 3], label)``; deterministic."""
    label = label_of(index)
    return render(label, sample_rng(seed, index), size, supersample), label


def _make_chunk(args: tuple[int, int, int, int, int]) -> np.ndarray:
    seed, start, count, size, supersample = args
    out = np.empty((count, size, size, 3), np.uint8)
    for i in range(count):
        out[i] = make_sample(seed, start + i, size, supersample)[0]
    return out


def _jobs(seed: int, start: int, count: int, size: int, supersample: int, chunk: int) -> list[tuple[int, int, int, int, int]]:
    return [(seed, start + o, min(chunk, count - o), size, supersample) for o in range(0, count, chunk)]


def _worker_init() -> None:
    # a forked worker inherits the parent's signal handlers; Pool.terminate() needs SIGTERM to kill
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _pool(workers: int, jobs: int):  # noqa: ANN202 - multiprocessing.pool.Pool
    import multiprocessing as mp

    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    return ctx.Pool(min(workers, jobs), initializer=_worker_init)


def iter_chunks(
    seed: int,
    start: int,
    count: int,
    size: int = 256,
    *,
    workers: int = 0,
    supersample: int = 2,
    chunk: int = 64,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(first_index, uint8 [n, size, size, 3])`` chunks of samples in index order.

    With ``workers > 1`` the chunks are rendered by a multiprocessing pool (``fork`` where
    available, else ``spawn``); stopping the iteration early terminates the pool. The
    images do not depend on ``workers`` or ``chunk``.
    """
    jobs = _jobs(seed, start, count, size, supersample, chunk)
    if workers > 1 and len(jobs) > 1:
        with _pool(workers, len(jobs)) as pool:
            for job, images in zip(jobs, pool.imap(_make_chunk, jobs)):
                yield job[1], images
    else:
        for job in jobs:
            yield job[1], _make_chunk(job)


def make_batch(
    seed: int,
    start: int,
    count: int,
    size: int = 256,
    *,
    workers: int = 0,
    supersample: int = 2,
    chunk: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """Samples ``start .. start+count-1``: ``(uint8 [count, size, size, 3], int64 labels [count])``.

    ``workers > 1`` renders in a multiprocessing pool; the result does not depend on ``workers``.
    """
    labels = np.array([label_of(start + i) for i in range(count)], dtype=np.int64)
    images = np.empty((count, size, size, 3), np.uint8)
    for first, part in iter_chunks(seed, start, count, size, workers=workers, supersample=supersample, chunk=chunk):
        images[first - start : first - start + len(part)] = part
    return images, labels


def grid(images: Sequence[np.ndarray] | np.ndarray, cols: int, pad: int = 2) -> np.ndarray:
    """Tile ``uint8 [N, H, W, 3]`` images into one ``uint8`` grid image (white padding)."""
    images = np.asarray(images)
    n, h, w, _ = images.shape
    rows = -(-n // cols)
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        out[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = images[i]
    return out
