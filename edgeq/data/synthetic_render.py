"""Draw one synthetic detection sample: shapes and glyphs on clutter, degraded, with tight labels.

The bundled demo detector is trained on these images and the INT8 tests calibrate on them, so
drawing must be reproducible without downloads: a sample depends only on the Generator it is
given, and on :data:`GENERATOR_VERSION`. It is deliberately hard (small objects, clutter,
occlusion, blur, noise) so that quantization damage shows up in mAP, yet learnable by a small
detector trained on a CPU. Writing whole data sets is :mod:`edgeq.data.synthetic`'s job.
"""

from __future__ import annotations

import functools
import math

import cv2
import numpy as np

__all__ = ["CLASS_NAMES", "GENERATOR_VERSION", "MIN_BOX_PX", "render_sample"]

CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "hexagon", "digit_2", "letter_A")

# Bump whenever the images or labels of a given seed change (any change to drawing or to the
# order of random draws does): caches of generated data compare it to know they are stale.
GENERATOR_VERSION = 1
MIN_VISIBLE = 0.6  # fraction of an object's area that must stay visible after later objects
MIN_BOX_PX = 4

_CIRCLE, _SQUARE, _TRIANGLE, _STAR, _CROSS, _HEXAGON, _DIGIT_2, _LETTER_A = range(8)
_TEXT = {_DIGIT_2: "2", _LETTER_A: "A"}
_FONTS = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_COMPLEX, cv2.FONT_HERSHEY_TRIPLEX)
_NOISE_SLACK = 64  # room for random noise-window offsets
_SUBPIX = 4  # fillPoly/polylines fractional bits


# --------------------------------------------------------------------------- shapes
def _regular(n: int, r: float = 1.0, phase: float = -math.pi / 2) -> np.ndarray:
    t = phase + np.arange(n) * (2 * math.pi / n)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


_FIXED_POLYGONS = {
    _CIRCLE: _regular(48),
    _SQUARE: _regular(4, phase=math.pi / 4),
    _TRIANGLE: _regular(3),
    _HEXAGON: _regular(6, phase=0.0),
}


def _unit_polygon(cls: int, rng: np.random.Generator) -> np.ndarray:
    """Polygon with circumradius about 1, centred on the origin."""
    if cls in _FIXED_POLYGONS:
        return _FIXED_POLYGONS[cls]
    if cls == _STAR:
        inner = rng.uniform(0.38, 0.5)
        pts = _regular(10)
        pts[1::2] *= inner
        return pts
    if cls == _CROSS:
        a = rng.uniform(0.26, 0.36)
        return np.array(
            [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a),
             (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)],
            np.float64,
        ) / math.hypot(1, a)
    raise ValueError(cls)


def _polygon_masks(
    cls: int, cx: float, cy: float, size: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None, int, int]:
    """Antialiased fill mask (and optional outline mask) in a local canvas at (x0, y0)."""
    pts = _unit_polygon(cls, rng)
    aspect = math.exp(rng.uniform(-0.15, 0.15))
    pts = pts * (size / 2) * np.array([aspect, 1 / aspect])
    ang = rng.uniform(0, 2 * math.pi)
    c, s = math.cos(ang), math.sin(ang)
    pts = pts @ np.array([[c, s], [-s, c]]) + (cx, cy)
    thick = 0
    if rng.random() < 0.3 and size >= 14:
        thick = max(1, int(round(size * rng.uniform(0.04, 0.1))))
    margin = 2 + thick
    x0 = int(math.floor(pts[:, 0].min())) - margin
    y0 = int(math.floor(pts[:, 1].min())) - margin
    w = int(math.ceil(pts[:, 0].max())) - x0 + margin + 1
    h = int(math.ceil(pts[:, 1].max())) - y0 + margin + 1
    ipts = np.round((pts - (x0, y0)) * (1 << _SUBPIX)).astype(np.int32)[None]
    fill = np.zeros((h, w), np.uint8)
    cv2.fillPoly(fill, ipts, 255, cv2.LINE_AA, _SUBPIX)
    outline = None
    if thick:
        outline = np.zeros((h, w), np.uint8)
        cv2.polylines(outline, ipts, True, 255, thick, cv2.LINE_AA, _SUBPIX)
    return fill, outline, x0, y0


def _text_mask(
    cls: int, cx: float, cy: float, size: float, rng: np.random.Generator
) -> tuple[np.ndarray, int, int]:
    """Hershey glyph rotated about its own centre; the box comes from this mask."""
    font = _FONTS[rng.integers(len(_FONTS))]
    if rng.random() < 0.2:
        font |= cv2.FONT_ITALIC
    thick = max(1, int(round(size * rng.uniform(0.06, 0.12))))
    scale = size / 21.0  # Hershey cap height is ~21 px at scale 1
    ch = _TEXT[cls]
    # Generous canvas instead of cv2.getTextSize (slow); the glyph is measured from pixels.
    side = int(3 * size + 4 * thick + 8)
    canvas = np.zeros((side, side), np.uint8)
    org = (int(side / 2 - 0.45 * size), int(side / 2 + 0.5 * size))
    cv2.putText(canvas, ch, org, font, scale, 255, thick, cv2.LINE_AA)
    bx, by, bw, bh = cv2.boundingRect(canvas)
    gx, gy = bx + bw / 2.0, by + bh / 2.0
    ang = rng.uniform(-35, 35)
    rot = cv2.getRotationMatrix2D((gx, gy), ang, 1.0)
    half = 0.5 * math.hypot(bw, bh) + 2
    x0 = int(math.floor(cx - half))
    y0 = int(math.floor(cy - half))
    out = int(math.ceil(2 * half)) + 2
    rot[0, 2] += cx - x0 - gx
    rot[1, 2] += cy - y0 - gy
    mask = cv2.warpAffine(canvas, rot, (out, out), flags=cv2.INTER_LINEAR)
    return mask, x0, y0


# --------------------------------------------------------------------------- colour
def _contrasting_colour(rng: np.random.Generator, bg: np.ndarray) -> np.ndarray:
    """A random colour that usually stands out from ``bg``; sometimes only weakly (hard cases)."""
    hard = rng.random() < 0.08
    min_dist2, min_dy = (45.0**2, 0.0) if hard else (90.0**2, 35.0)
    b0, g0, r0 = (float(v) for v in bg)
    bg_y = 0.114 * b0 + 0.587 * g0 + 0.299 * r0
    for b, g, r in rng.integers(0, 256, (12, 3)).tolist():  # plain floats: tiny arrays are slow
        db, dg, dr = b - b0, g - g0, r - r0
        if db * db + dg * dg + dr * dr >= min_dist2 and abs(0.114 * db + 0.587 * dg + 0.299 * dr) >= min_dy:
            return np.array((b, g, r), np.float32)
    base = 20.0 if bg_y > 127 else 235.0
    return np.clip(base + rng.uniform(-20, 20, 3), 0, 255).astype(np.float32)


# --------------------------------------------------------------------------- background
def _background(rng: np.random.Generator, imgsz: int) -> np.ndarray:
    """Smooth colour field + low-contrast texture + clutter that resembles none of the classes."""
    k = int(rng.integers(2, 5))
    grid = rng.uniform(0, 255, (k, k, 3))
    grey = grid.mean(2, keepdims=True)
    grid = (grey + (grid - grey) * rng.uniform(0.2, 1.0)).astype(np.uint8)  # tame saturation
    field = cv2.resize(grid, (imgsz, imgsz), interpolation=cv2.INTER_LINEAR)

    cell = int(rng.integers(3, 40))
    m = max(2, imgsz // cell)
    amp = rng.uniform(3, 18)
    colour_tex = rng.random() < 0.3
    tex = rng.normal(0, amp, (m, m, 3 if colour_tex else 1)).astype(np.float32)
    tex = cv2.resize(tex, (imgsz, imgsz), interpolation=cv2.INTER_LINEAR)

    if rng.random() < 0.25:  # fabric/wood-like stripes
        period = rng.uniform(4, 30)
        th = rng.uniform(0, math.pi)
        axis = np.arange(imgsz, dtype=np.float32) * np.float32(2 * math.pi / period)
        stripes = np.sin(np.float32(math.cos(th)) * axis[None, :] + np.float32(math.sin(th)) * axis[:, None])
        stripes *= np.float32(rng.uniform(4, 14))
        tex += stripes[..., None] if colour_tex else stripes

    if not colour_tex:
        tex = cv2.cvtColor(tex, cv2.COLOR_GRAY2BGR)
    img = cv2.add(field, tex, dtype=cv2.CV_8U)  # saturating, so no clip pass
    _draw_clutter(img, rng, imgsz)
    return img


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    c = rng.integers(0, 256, 3)
    return int(c[0]), int(c[1]), int(c[2])


def _draw_clutter(img: np.ndarray, rng: np.random.Generator, imgsz: int) -> None:
    # Random draws are batched per kind: many tiny Generator calls cost more than the drawing.
    # Long straight lines: thin and much longer than any cross arm.
    n = int(rng.integers(0, 9))
    if n:
        u = rng.random((n, 5)).tolist()
        cols = rng.integers(0, 256, (n, 3)).tolist()
        for (ux, uy, ua, ul, ut), col in zip(u, cols):
            x, y = ux * imgsz, uy * imgsz
            ang, length = ua * 2 * math.pi, imgsz * (1 / 3 + ul * (1.2 - 1 / 3))
            q = (round(x + length * math.cos(ang)), round(y + length * math.sin(ang)))
            cv2.line(img, (round(x), round(y)), q, col, 1 + int(ut * 2), cv2.LINE_AA)
    # Wandering curves.
    n = int(rng.integers(0, 4))
    if n:
        turn = np.cumsum(rng.normal(0, 0.25, (n, 24)), 1)
        u = rng.random((n, 5))
        cols = rng.integers(0, 256, (n, 3)).tolist()
        for k in range(n):
            step, ang0 = 4 + 8 * u[k, 0], 2 * math.pi * u[k, 1]
            steps = step * np.stack([np.cos(ang0 + turn[k]), np.sin(ang0 + turn[k])], 1)
            pts = np.round(u[k, 2:4] * imgsz + np.cumsum(steps, 0)).astype(np.int32)
            cv2.polylines(img, [pts], False, cols[k], 1 + int(u[k, 4] * 2), cv2.LINE_AA)
    # Soft irregular blobs (blurred edges, so they never look like crisp shapes).
    n = int(rng.integers(0, 6))
    if n:
        grids = rng.random((n, 5, 5), dtype=np.float32)
        u = rng.random((n, 5)).tolist()
        cols = rng.integers(0, 256, (n, 3)).astype(np.float32)
        for k, (ud, us, ux, uy, ua) in enumerate(u):
            d = int((0.1 + 0.25 * ud) * imgsz) + 8  # never small: small soft blobs would mimic shapes
            field = cv2.resize(grids[k], (d, d), interpolation=cv2.INTER_CUBIC)
            r = np.linspace(-1, 1, d, dtype=np.float32) ** 2
            field *= np.clip(1 - r[None, :] - r[:, None], 0, 1)  # fade out before the canvas edge
            sigma = 2 + 4 * us
            pad = int(3 * sigma) + 1
            blob = np.zeros((d + 2 * pad, d + 2 * pad), np.float32)
            blob[pad:-pad, pad:-pad] = field > 0.3
            blob = cv2.GaussianBlur(blob, (0, 0), sigma)
            blob *= 0.25 + 0.45 * ua
            x0 = int(ux * imgsz) - d // 2 - pad
            y0 = int(uy * imgsz) - d // 2 - pad
            _blend(img, blob, cols[k], x0, y0)


def _pt(p: np.ndarray) -> tuple[int, int]:
    return int(round(p[0])), int(round(p[1]))


def _blend(img: np.ndarray, alpha: np.ndarray, colour: np.ndarray, x0: int, y0: int) -> None:
    """Alpha-blend a colour (3,) or a uint8 colour layer (h, w, 3) into ``img`` at (x0, y0), clipped."""
    h, w = alpha.shape
    H, W = img.shape[:2]
    ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x0 + w, W), min(y0 + h, H)
    if ix0 >= ix1 or iy0 >= iy1:
        return
    a = np.ascontiguousarray(alpha[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0], dtype=np.float32)
    region = img[iy0:iy1, ix0:ix1]
    if colour.ndim == 3:
        src = np.ascontiguousarray(colour[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0], dtype=np.uint8)
    else:
        src = np.empty_like(region)
        src[...] = np.round(colour).astype(np.uint8)
    # blendLinear works on uint8 directly: ~3x faster than float numpy on large objects.
    img[iy0:iy1, ix0:ix1] = cv2.blendLinear(src, np.ascontiguousarray(region), a, 1 - a)


# --------------------------------------------------------------------------- objects
def _sample_size(rng: np.random.Generator, imgsz: int, cls: int) -> float:
    lo = max(8.0, 0.025 * imgsz)
    if cls in _TEXT:
        lo = max(lo, 10.0)
    hi = 0.5 * imgsz
    # Log-scale, slightly thinned at the tiny end: median ~0.14*imgsz, ~16% under 0.05*imgsz.
    u = rng.random() ** 0.8
    return float(lo * (hi / lo) ** u)


def _place_objects(img: np.ndarray, rng: np.random.Generator, imgsz: int) -> np.ndarray:
    """Draw 2-10 objects in place and return their labels (cls cx cy w h, normalized).

    A placement is rejected when it would leave any earlier object less than MIN_VISIBLE of
    its area visible, so every label still points at a recognisable object.
    """
    owner = np.zeros((imgsz, imgsz), np.int16)  # 0 = background, j = object j
    classes: list[int] = []
    areas: list[int] = []
    visible: list[int] = [0]
    regions: list[tuple[int, int, int, int]] = []
    target = int(rng.integers(2, 11))
    for _ in range(target * 8):
        if len(classes) >= target:
            break
        cls = int(rng.integers(len(CLASS_NAMES)))
        size = _sample_size(rng, imgsz, cls)
        cx, cy = rng.uniform(0, imgsz, 2)
        outline = None
        if cls in _TEXT:
            fill, x0, y0 = _text_mask(cls, cx, cy, size, rng)
        else:
            fill, outline, x0, y0 = _polygon_masks(cls, cx, cy, size, rng)
        alpha = fill if outline is None else np.maximum(fill, outline)
        h, w = alpha.shape
        ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x0 + w, imgsz), min(y0 + h, imgsz)
        if ix1 - ix0 < MIN_BOX_PX or iy1 - iy0 < MIN_BOX_PX:
            continue
        solid = alpha >= 128
        total = int(np.count_nonzero(solid))
        cover = solid[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0]
        inside = int(np.count_nonzero(cover))
        if total == 0 or inside < MIN_VISIBLE * total:
            continue
        own = owner[iy0:iy1, ix0:ix1]
        lost = np.bincount(own[cover], minlength=len(visible))
        keep = np.asarray(visible) - lost
        if len(areas) and np.any(keep[1:] < MIN_VISIBLE * np.asarray(areas)):
            continue

        bg = np.array(cv2.mean(img[iy0:iy1, ix0:ix1], mask=cover.view(np.uint8))[:3], np.float32)
        colour = _contrasting_colour(rng, bg)
        layer: np.ndarray = colour
        if outline is not None or rng.random() < 0.35:
            layer = np.broadcast_to(colour, (h, w, 3)).copy()
            if rng.random() < 0.5:  # gentle shading across the object
                g = rng.uniform(-1, 1, 2) * (rng.uniform(20, 60) / max(w, h))
                xs, ys = np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32)
                ramp = xs[None, :] * g[0] + ys[:, None] * g[1]
                layer += (ramp - ramp.mean())[..., None]
            if outline is not None:
                edge = _contrasting_colour(rng, colour)
                o = (outline.astype(np.float32) / 255.0)[..., None]
                layer += (edge - layer) * o
            np.clip(layer + 0.5, 0, 255, out=layer)
            layer = layer.astype(np.uint8)
        _blend(img, alpha * np.float32(1 / 255), layer, x0, y0)

        visible = list(keep)
        oid = len(classes) + 1
        own[cover] = oid
        visible.append(inside)
        classes.append(cls)
        areas.append(total)
        regions.append((ix0, iy0, ix1, iy1))

    labels = []
    for j, (cls, (ix0, iy0, ix1, iy1)) in enumerate(zip(classes, regions), start=1):
        sub = owner[iy0:iy1, ix0:ix1] == j
        cols = np.flatnonzero(sub.any(0))
        rows = np.flatnonzero(sub.any(1))
        if cols.size == 0:
            continue
        x1, x2 = ix0 + cols[0], ix0 + cols[-1] + 1
        y1, y2 = iy0 + rows[0], iy0 + rows[-1] + 1
        if x2 - x1 < MIN_BOX_PX or y2 - y1 < MIN_BOX_PX:
            continue
        labels.append((cls, (x1 + x2) / 2 / imgsz, (y1 + y2) / 2 / imgsz, (x2 - x1) / imgsz, (y2 - y1) / imgsz))
    return np.asarray(labels, np.float32).reshape(-1, 5)


# --------------------------------------------------------------------------- degradations
def _foreground_wires(img: np.ndarray, rng: np.random.Generator, imgsz: int) -> None:
    """Occasional thin lines over everything, like wires in front of the scene."""
    if rng.random() < 0.2:
        for _ in range(int(rng.integers(1, 3))):
            p, q = rng.uniform(0, imgsz, 2), rng.uniform(0, imgsz, 2)
            cv2.line(img, _pt(p), _pt(q), _random_colour(rng), 1, cv2.LINE_AA)


@functools.lru_cache(maxsize=4)
def _noise_bank(side: int) -> np.ndarray:
    """Fixed unit-normal field; per-image noise is a random window of it.

    Drawing fresh normals for every pixel costs more than the rest of the image; sliding a
    window over a fixed field is indistinguishable to a detector and stays deterministic.
    """
    bank = np.random.default_rng(0x5EED).standard_normal((side, side), dtype=np.float32)
    bank.setflags(write=False)
    return bank


def _noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A (h, w) window of the noise bank at a random offset, with a random sign."""
    bank = _noise_bank(1 << (max(h, w) + _NOISE_SLACK - 1).bit_length())
    oy, ox = (int(v) for v in rng.integers(0, bank.shape[0] - max(h, w) + 1, 2))
    win = bank[oy:oy + h, ox:ox + w]
    return -win if rng.random() < 0.5 else win


def _degrade(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    r = rng.random()
    if r < 0.15:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 1.3))
    elif r < 0.25:
        k = int(rng.integers(3, 8))
        kernel = np.zeros((k, k), np.float32)
        kernel[k // 2, :] = 1.0 / k
        rot = cv2.getRotationMatrix2D(((k - 1) / 2, (k - 1) / 2), rng.uniform(0, 180), 1.0)
        kernel = cv2.warpAffine(kernel, rot, (k, k))
        img = cv2.filter2D(img, -1, kernel / max(kernel.sum(), 1e-6))
    sigma = rng.uniform(0, 7) if rng.random() < 0.85 else 0.0
    if sigma > 0.5:
        h, w = img.shape[:2]
        luma = _noise(rng, h, w) * np.float32(sigma)
        if rng.random() < 0.3:  # some chroma noise too
            noise = cv2.merge([luma + _noise(rng, h, w) * np.float32(sigma / 2) for _ in range(3)])
        else:
            noise = cv2.cvtColor(luma, cv2.COLOR_GRAY2BGR)
        img = cv2.add(img, noise, dtype=cv2.CV_8U)
    return img


# --------------------------------------------------------------------------- one sample
def render_sample(rng: np.random.Generator, imgsz: int) -> tuple[np.ndarray, np.ndarray]:
    """Render one BGR uint8 ``imgsz`` x ``imgsz`` image and its labels ``(K, 5)`` ``cls cx cy w h``."""
    img = _background(rng, imgsz)
    labels = _place_objects(img, rng, imgsz)
    _foreground_wires(img, rng, imgsz)
    return _degrade(img, rng), labels
