"""Read folders of images (calibration sets, prediction inputs) robustly.

One corrupt file in a folder of thousands should cost a warning, not the whole run; an
empty or missing folder, on the other hand, is always a user mistake and fails loudly.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import cv2
import numpy as np

from edgeq.errors import EdgeqError

__all__ = ["IMAGE_SUFFIXES", "list_images", "read_image", "iter_images"]

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_SHOW_NAMES = 5


def list_images(folder: str | os.PathLike) -> list[Path]:
    """All images under ``folder`` (recursive), sorted so runs see them in a stable order."""
    root = Path(folder)
    if not root.exists():
        raise EdgeqError(f"Image folder {root} does not exist.")
    if not root.is_dir():
        raise EdgeqError(f"Image folder {root} is not a directory.")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise EdgeqError(
            f"Image folder {root} contains no images (looked for {', '.join(IMAGE_SUFFIXES)}, recursively)."
        )
    return paths


def read_image(path: str | os.PathLike) -> np.ndarray | None:
    """Decode ``path`` to BGR uint8, or return None when it cannot be read or decoded.

    Goes through ``np.fromfile`` + ``cv2.imdecode`` so non-ASCII paths work on every OS.
    """
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError:
        return None
    if data.size == 0:
        return None
    try:
        img = cv2.imdecode(data, cv2.IMREAD_COLOR)
    except cv2.error:
        return None
    if img is None or img.ndim != 3 or img.shape[2] != 3 or img.size == 0:
        return None
    return img


def iter_images(paths: Iterable[str | os.PathLike]) -> Iterator[tuple[Path, np.ndarray]]:
    """Yield ``(path, image)`` for every decodable path; warn once, at the end, about the rest."""
    bad: list[Path] = []
    for p in paths:
        path = Path(p)
        img = read_image(path)
        if img is None:
            bad.append(path)
            continue
        yield path, img
    if bad:
        names = ", ".join(b.name for b in bad[:_SHOW_NAMES])
        more = f" and {len(bad) - _SHOW_NAMES} more" if len(bad) > _SHOW_NAMES else ""
        warnings.warn(
            f"Skipped {len(bad)} unreadable image file(s): {names}{more}.",
            stacklevel=2,
        )


def load_sample_images(folder: str | Path, n: int) -> list[np.ndarray]:
    """The first ``n`` readable images of a folder (sorted by name): a fixed, repeatable sample."""
    if n < 1:
        raise EdgeqError(f"the number of images must be >= 1, got {n}")
    images = [img for _, img in iter_images(list_images(folder)[:n])]
    if not images:
        raise EdgeqError(f"no readable images in {folder}")
    return images
