"""Write the seeded synthetic YOLO-format data set (or a plain image folder), with worker processes.

Image ``i`` of a split is drawn by :func:`edgeq.data.synthetic_render.render_sample` from
``default_rng([seed, i])`` and nothing else, so any subset can be regenerated and any number of
workers writes byte-identical files: the demo's cached validation split relies on it.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import cv2
import numpy as np
import yaml

from edgeq.data.synthetic_render import CLASS_NAMES, GENERATOR_VERSION, render_sample
from edgeq.utils.files import atomic_write_text

__all__ = ["generate_split", "generate_dataset", "generate_images"]

VAL_SEED_OFFSET = 1000003  # val must never share a generator stream with train
JPEG_QUALITY = 90
_CHUNK = 32  # images per task when generating with several worker processes


def _encode_jpeg(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:  # pragma: no cover - cv2 always encodes a uint8 BGR image
        raise RuntimeError("cv2 failed to encode a JPEG")
    return buf.tobytes()


def _format_labels(labels: np.ndarray) -> str:
    return "".join(f"{int(c)} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in labels)


def _remove_stale(folder: Path, suffix: str, n: int) -> None:
    """Drop files a previous, larger generation left behind (only our NNNNNN names)."""
    for p in folder.glob(f"*{suffix}"):
        if len(p.stem) == 6 and p.stem.isdigit() and int(p.stem) >= n:
            p.unlink()


def _write_images(img_dir: Path, lbl_dir: Path | None, imgsz: int, seed: int, indices: range) -> int:
    """Render and write images ``indices`` (a worker's unit of work); return how many."""
    for i in indices:
        img, labels = render_sample(np.random.default_rng([seed, i]), imgsz)
        (img_dir / f"{i:06d}.jpg").write_bytes(_encode_jpeg(img))
        if lbl_dir is not None:
            (lbl_dir / f"{i:06d}.txt").write_text(_format_labels(labels))
    return len(indices)


def _write_all(
    img_dir: Path, lbl_dir: Path | None, n: int, imgsz: int, seed: int, desc: str, workers: int
) -> None:
    from edgeq.utils.progress import progress_bar

    bar = progress_bar(total=n, desc=desc, unit="img")
    with bar:
        if workers <= 1 or n < 2 * _CHUNK:
            for i in range(n):
                bar.update(_write_images(img_dir, lbl_dir, imgsz, seed, range(i, i + 1)))
            return
        # Images depend only on (seed, i), so chunks can go to any process in any order.
        # "spawn" keeps workers clean whatever threads (torch, cv2) the caller has started;
        # like a torch DataLoader with workers, the calling script needs a __main__ guard.
        chunks = [range(a, min(a + _CHUNK, n)) for a in range(0, n, _CHUNK)]
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, ctx, initializer=cv2.setNumThreads, initargs=(1,)) as pool:
            futures = [pool.submit(_write_images, img_dir, lbl_dir, imgsz, seed, c) for c in chunks]
            for f in as_completed(futures):
                bar.update(f.result())


def generate_split(
    out_dir: str | os.PathLike,
    n: int,
    imgsz: int,
    seed: int,
    split_name: str,
    with_labels: bool = True,
    workers: int = 1,
) -> Path:
    """Write ``images/<split>/NNNNNN.jpg`` (+ ``labels/<split>/NNNNNN.txt``); return the image folder.

    Image ``i`` comes from ``default_rng([seed, i])`` so any subset can be regenerated, and
    ``workers`` > 1 processes produce byte-identical files (call from a ``__main__``-guarded
    script: workers are spawned).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    out = Path(out_dir)
    img_dir = out / "images" / split_name
    lbl_dir = out / "labels" / split_name
    img_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale(img_dir, ".jpg", n)
    if with_labels:
        lbl_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale(lbl_dir, ".txt", n)
    _write_all(img_dir, lbl_dir if with_labels else None, n, imgsz, seed, f"synthetic {split_name}", workers)
    return img_dir


def generate_dataset(
    out_dir: str | os.PathLike,
    n_train: int,
    n_val: int,
    imgsz: int = 320,
    seed: int = 0,
    workers: int = 1,
) -> Path:
    """Write train and val splits plus ``data.yaml``; return the data.yaml path."""
    out = Path(out_dir).resolve()
    generate_split(out, n_train, imgsz, seed, "train", workers=workers)
    generate_split(out, n_val, imgsz, seed + VAL_SEED_OFFSET, "val", workers=workers)
    data = {
        "path": str(out),
        "train": "images/train",
        "val": "images/val",
        "nc": len(CLASS_NAMES),
        "names": list(CLASS_NAMES),
        "generator": f"edgeq.data.synthetic v{GENERATOR_VERSION} seed={seed} imgsz={imgsz}",
    }
    yaml_path = out / "data.yaml"
    atomic_write_text(yaml_path, yaml.safe_dump(data, sort_keys=False))
    return yaml_path


def generate_images(out_dir: str | os.PathLike, n: int, imgsz: int, seed: int, workers: int = 1) -> list[Path]:
    """Write ``n`` unlabeled images straight into ``out_dir`` (a calibration folder)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale(out, ".jpg", n)
    _write_all(out, None, n, imgsz, seed, "synthetic images", workers)
    return [out / f"{i:06d}.jpg" for i in range(n)]
