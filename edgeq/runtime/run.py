"""Run a Detector over an image, a folder of images or a video; draw and save the results.

Needs only numpy, OpenCV and the artifact's backend, like the rest of ``edgeq.runtime``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np

from edgeq.errors import EdgeqError

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")


def iter_source(source: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, BGR image) for an image file, a folder of images, or each frame of a video."""
    import cv2

    from edgeq.data.images import IMAGE_SUFFIXES, iter_images, list_images

    path = Path(source)
    if not path.exists():
        raise EdgeqError(f"--source {path} does not exist")
    if path.is_dir():
        for p, img in iter_images(list_images(path)):
            yield p.name, img
        return
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            raise EdgeqError(f"--source {path} is not a readable image")
        yield path.name, img
        return
    if suffix in VIDEO_SUFFIXES:
        cap = cv2.VideoCapture(str(path))
        if not cap.isOpened():
            raise EdgeqError(f"--source {path}: OpenCV cannot open this video")
        try:
            index = 0
            while True:
                ok, frame = cap.read()
                if not ok:
                    break
                yield f"{path.stem}_{index:06d}.jpg", frame
                index += 1
        finally:
            cap.release()
        return
    raise EdgeqError(
        f"--source {path}: unsupported file type {suffix!r}",
        note=f"images {', '.join(IMAGE_SUFFIXES)}; videos {', '.join(VIDEO_SUFFIXES)}; or a folder",
    )


def run_source(
    model: str | Path,
    source: str | Path,
    *,
    save_dir: str | Path | None = None,
    conf_thres: float = 0.25,
    iou_thres: float = 0.45,
    threads: int | None = None,
) -> dict:
    """Detect on every image of ``source``; with ``save_dir``, write drawn images + detections.json."""
    import cv2

    from edgeq.runtime.detector import Detector, detections_to_json
    from edgeq.utils.files import atomic_write_bytes, atomic_write_text, check_writable_dir

    out = check_writable_dir(Path(save_dir)) if save_dir else None
    records: list[dict] = []
    n_images = n_saved = 0
    with Detector(model, conf_thres=conf_thres, iou_thres=iou_thres, threads=threads) as det:
        for name, image in iter_source(source):
            boxes = det([image])[0]
            n_images += 1
            records.extend(detections_to_json(boxes, det.names, name))
            if out is not None:
                ok, encoded = cv2.imencode(Path(name).suffix or ".jpg", det.draw(image, boxes))
                if ok:
                    atomic_write_bytes(out / name, encoded.tobytes())
                    n_saved += 1
    if n_images == 0:
        raise EdgeqError(f"--source {source} held no readable image or frame")
    summary = {"images": n_images, "detections": len(records), "saved": n_saved, "json": None}
    if out is not None:
        summary["json"] = str(atomic_write_text(out / "detections.json", json.dumps(records, indent=1) + "\n"))
    return summary
