"""YOLOv5-style training augmentations in numpy/cv2 (no torchvision).

Every function takes an explicit ``np.random.Generator`` so a sample's augmentation is a
pure function of its seed, whichever DataLoader worker draws it. Labels inside this module
are pixel ``cls x1 y1 x2 y2`` rows (K, 5); ``xywhn_to_xyxy``/``xyxy_to_xywhn`` convert at the
edges from/to the normalized ``cls cx cy w h`` rows datasets and trainers use.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

__all__ = [
    "FILL",
    "xywhn_to_xyxy",
    "xyxy_to_xywhn",
    "resize_long_side",
    "random_hsv",
    "random_flip_lr",
    "random_affine",
    "mosaic4",
]

FILL = 114  # grey used for padding, as in YOLOv5 and the inference letterbox


def xywhn_to_xyxy(labels: np.ndarray, w: float, h: float, padw: float = 0.0, padh: float = 0.0) -> np.ndarray:
    """Normalized ``cls cx cy w h`` -> pixel ``cls x1 y1 x2 y2`` (scaled by w, h, then shifted)."""
    out = np.array(labels, np.float32).reshape(-1, 5)
    cx, cy, bw, bh = out[:, 1].copy(), out[:, 2].copy(), out[:, 3].copy(), out[:, 4].copy()
    out[:, 1] = (cx - bw / 2) * w + padw
    out[:, 2] = (cy - bh / 2) * h + padh
    out[:, 3] = (cx + bw / 2) * w + padw
    out[:, 4] = (cy + bh / 2) * h + padh
    return out


def xyxy_to_xywhn(labels: np.ndarray, w: float, h: float) -> np.ndarray:
    """Pixel ``cls x1 y1 x2 y2`` -> normalized ``cls cx cy w h`` (boxes clipped to the image first)."""
    out = np.array(labels, np.float32).reshape(-1, 5)
    x1, x2 = np.clip(out[:, 1], 0, w), np.clip(out[:, 3], 0, w)
    y1, y2 = np.clip(out[:, 2], 0, h), np.clip(out[:, 4], 0, h)
    out[:, 1] = (x1 + x2) / 2 / w
    out[:, 2] = (y1 + y2) / 2 / h
    out[:, 3] = (x2 - x1) / w
    out[:, 4] = (y2 - y1) / h
    return out


def resize_long_side(img: np.ndarray, labels: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Scale so the longer side is ``size`` (labels are pixel xyxy and follow)."""
    h, w = img.shape[:2]
    r = size / max(h, w)
    if r == 1:
        return img, labels
    nw, nh = max(1, round(w * r)), max(1, round(h * r))
    img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)  # edgeq's one resize rule
    labels = labels.copy()
    labels[:, [1, 3]] *= nw / w
    labels[:, [2, 4]] *= nh / h
    return img, labels


def random_hsv(
    img: np.ndarray, rng: np.random.Generator, h: float = 0.015, s: float = 0.7, v: float = 0.4
) -> np.ndarray:
    """Random hue/saturation/value gains (a new image; the input is left untouched)."""
    if not (h or s or v):
        return img
    gains = rng.uniform(-1, 1, 3) * np.array([h, s, v]) + 1
    hue, sat, val = cv2.split(cv2.cvtColor(img, cv2.COLOR_BGR2HSV))
    x = np.arange(256, dtype=np.float32)
    lut_hue = ((x * gains[0]) % 180).astype(np.uint8)
    lut_sat = np.clip(x * gains[1], 0, 255).astype(np.uint8)
    lut_val = np.clip(x * gains[2], 0, 255).astype(np.uint8)
    hsv = cv2.merge((cv2.LUT(hue, lut_hue), cv2.LUT(sat, lut_sat), cv2.LUT(val, lut_val)))
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)


def random_flip_lr(
    img: np.ndarray, labels: np.ndarray, rng: np.random.Generator, p: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Mirror left-right with probability ``p``; box edges swap around the image width."""
    if rng.random() >= p:
        return img, labels
    w = img.shape[1]
    img = cv2.flip(img, 1)
    labels = labels.copy()
    labels[:, 1], labels[:, 3] = w - labels[:, 3], w - labels[:, 1]
    return img, labels


def _box_candidates(before: np.ndarray, after: np.ndarray, min_px: float = 2.0, min_area: float = 0.2,
                    max_aspect: float = 20.0) -> np.ndarray:
    """Keep boxes still at least ``min_px`` wide/high, with >= ``min_area`` of their area left
    after clipping, and not degenerate slivers."""
    w0, h0 = before[:, 2] - before[:, 0], before[:, 3] - before[:, 1]
    w1, h1 = after[:, 2] - after[:, 0], after[:, 3] - after[:, 1]
    aspect = np.maximum(w1 / (h1 + 1e-9), h1 / (w1 + 1e-9))
    return (w1 >= min_px) & (h1 >= min_px) & (w1 * h1 >= min_area * w0 * h0 + 1e-9) & (aspect < max_aspect)


def random_affine(
    img: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    degrees: float = 0.0,
    translate: float = 0.1,
    scale: float = 0.5,
    border: int = 0,
    shear: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Random rotation/scale/shear/translation; output is the input size plus ``2 * border``.

    A negative ``border`` crops (mosaic uses ``-imgsz // 2`` to get back to ``imgsz``). Boxes
    are the min/max of their transformed corners, clipped; boxes that lose more than 80% of
    their area to the image edge or end up under 2 px are dropped.
    """
    out_h, out_w = img.shape[0] + 2 * border, img.shape[1] + 2 * border
    centre = np.eye(3)
    centre[0, 2], centre[1, 2] = -img.shape[1] / 2, -img.shape[0] / 2
    rot = np.eye(3)
    rot[:2] = cv2.getRotationMatrix2D((0, 0), rng.uniform(-degrees, degrees), rng.uniform(1 - scale, 1 + scale))
    sh = np.eye(3)
    sh[0, 1] = np.tan(np.deg2rad(rng.uniform(-shear, shear)))
    sh[1, 0] = np.tan(np.deg2rad(rng.uniform(-shear, shear)))
    tr = np.eye(3)
    tr[0, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * out_w
    tr[1, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * out_h
    m = tr @ sh @ rot @ centre
    if border != 0 or not np.allclose(m, np.eye(3)):
        img = cv2.warpAffine(img, m[:2], dsize=(out_w, out_h), borderValue=(FILL, FILL, FILL))

    labels = np.asarray(labels, np.float32).reshape(-1, 5)
    if len(labels) == 0:
        return img, labels
    x1, y1, x2, y2 = labels[:, 1], labels[:, 2], labels[:, 3], labels[:, 4]
    corners = np.stack([np.stack(c, 1) for c in ((x1, y1), (x2, y2), (x1, y2), (x2, y1))], 1)  # (K, 4, 2)
    pts = corners @ m[:2, :2].T + m[:2, 2]
    moved = np.concatenate([pts.min(1), pts.max(1)], 1)
    clipped = moved.copy()
    clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(0, out_w)
    clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(0, out_h)
    keep = _box_candidates(moved, clipped)
    out = np.concatenate([labels[keep, :1], clipped[keep]], 1).astype(np.float32)
    return img, out


def mosaic4(
    images_and_labels: Sequence[tuple[np.ndarray, np.ndarray]],
    imgsz: int,
    rng: np.random.Generator,
    degrees: float = 0.0,
    translate: float = 0.1,
    scale: float = 0.5,
    shear: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Tile 4 samples around a random centre of a ~2*imgsz canvas, then random_affine back to imgsz.

    Each sample is ``(BGR image, pixel xyxy labels)``; images are first scaled so their
    long side is ``imgsz``.
    """
    if len(images_and_labels) != 4:
        raise ValueError(f"mosaic4 needs 4 samples, got {len(images_and_labels)}")
    half = imgsz // 2
    side = imgsz + 2 * half  # 2*imgsz for even sizes; keeps the output exactly imgsz otherwise
    canvas = np.full((side, side, 3), FILL, np.uint8)
    xc, yc = (int(v) for v in rng.uniform(half, half + imgsz, 2))
    all_labels = []
    for k, (img, labels) in enumerate(images_and_labels):
        img, labels = resize_long_side(img, np.asarray(labels, np.float32).reshape(-1, 5), imgsz)
        h, w = img.shape[:2]
        if k == 0:  # top left
            x1a, y1a, x2a, y2a = max(xc - w, 0), max(yc - h, 0), xc, yc
            x1b, y1b, x2b, y2b = w - (x2a - x1a), h - (y2a - y1a), w, h
        elif k == 1:  # top right
            x1a, y1a, x2a, y2a = xc, max(yc - h, 0), min(xc + w, side), yc
            x1b, y1b, x2b, y2b = 0, h - (y2a - y1a), min(w, x2a - x1a), h
        elif k == 2:  # bottom left
            x1a, y1a, x2a, y2a = max(xc - w, 0), yc, xc, min(side, yc + h)
            x1b, y1b, x2b, y2b = w - (x2a - x1a), 0, w, min(y2a - y1a, h)
        else:  # bottom right
            x1a, y1a, x2a, y2a = xc, yc, min(xc + w, side), min(side, yc + h)
            x1b, y1b, x2b, y2b = 0, 0, min(w, x2a - x1a), min(y2a - y1a, h)
        canvas[y1a:y2a, x1a:x2a] = img[y1b:y2b, x1b:x2b]
        moved = labels.copy()
        moved[:, [1, 3]] += x1a - x1b
        moved[:, [2, 4]] += y1a - y1b
        all_labels.append(moved)
    labels = np.concatenate(all_labels, 0)
    # Clip to each tile's visible part via the canvas; tiles never overlap, so this is exact
    # for boxes lying inside their own image.
    before = labels[:, 1:].copy()
    np.clip(labels[:, 1:], 0, side, out=labels[:, 1:])
    labels = labels[_box_candidates(before, labels[:, 1:])]
    return random_affine(canvas, labels, rng, degrees=degrees, translate=translate, scale=scale,
                         border=-half, shear=shear)
