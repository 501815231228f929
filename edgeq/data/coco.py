"""COCO-format datasets (instances json + image folder) behind the YoloDataset interface.

Evaluation and calibration code only needs ``(image, labels, path)``, so COCO annotations are
converted once, at load time, to the same normalized ``cls cx cy w h`` rows with contiguous
class indices; ``category_ids`` maps them back for writing COCO results.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.data.base import LabelledImages
from edgeq.data.images import read_image
from edgeq.errors import EdgeqError

__all__ = ["CocoDataset"]

_SHOW_NAMES = 5


def _require(obj: Any, key: str, where: str, source: Path) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise EdgeqError(f"{source}: {where} has no '{key}' key.")
    return obj[key]


def _as_int(value: Any, where: str, source: Path) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value != int(value)
    ):
        raise EdgeqError(f"{source}: {where} must be an integer id, got {value!r}.")
    return int(value)


def _require_list(obj: Any, key: str, source: Path) -> list:
    value = _require(obj, key, "the top level", source)
    if not isinstance(value, list):
        raise EdgeqError(f"{source}: '{key}' must be a list, got {type(value).__name__}.")
    return value


class CocoDataset(LabelledImages):
    """Images of a COCO instances json, with boxes as ``(K, 5)`` ``cls cx cy w h`` (normalized).

    Crowd annotations (``iscrowd: 1``) are left out: they are regions to ignore, not objects.
    Images missing on disk are skipped with one warning.
    """

    def __init__(self, annotation_json: str | os.PathLike, image_dir: str | os.PathLike):
        self.annotation_json = Path(annotation_json)
        self.image_dir = Path(image_dir)
        data = self._read_json(self.annotation_json)
        src = self.annotation_json
        if not self.image_dir.is_dir():
            raise EdgeqError(f"COCO image folder {self.image_dir} does not exist.")

        categories = _require_list(data, "categories", src)
        images = _require_list(data, "images", src)
        annotations = _require_list(data, "annotations", src)

        cats = []
        for k, c in enumerate(categories):
            cid = _as_int(_require(c, "id", f"categories[{k}]", src), f"categories[{k}].id", src)
            cats.append((cid, str(_require(c, "name", f"categories[{k}]", src))))
        cats.sort()
        if not cats:
            raise EdgeqError(f"{src}: 'categories' is empty.")
        self.category_ids: list[int] = [cid for cid, _ in cats]
        self.names: list[str] = [name for _, name in cats]
        index_of = {cid: k for k, cid in enumerate(self.category_ids)}
        if len(index_of) != len(cats):
            raise EdgeqError(f"{src}: 'categories' has duplicate ids.")

        info: dict[int, dict[str, Any]] = {}
        for k, im in enumerate(images):
            iid = _as_int(_require(im, "id", f"images[{k}]", src), f"images[{k}].id", src)
            info[iid] = {
                "file_name": str(_require(im, "file_name", f"images[{k}]", src)),
                "width": im.get("width"),
                "height": im.get("height"),
                "boxes": [],
            }

        for k, ann in enumerate(annotations):
            where = f"annotations[{k}]"
            iid = _as_int(_require(ann, "image_id", where, src), f"{where}.image_id", src)
            cid = _as_int(_require(ann, "category_id", where, src), f"{where}.category_id", src)
            bbox = _require(ann, "bbox", where, src)
            if iid not in info:
                raise EdgeqError(f"{src}: {where} refers to image_id {iid}, which is not in 'images'.")
            if cid not in index_of:
                raise EdgeqError(f"{src}: {where} refers to category_id {cid}, which is not in 'categories'.")
            if (
                not isinstance(bbox, list)
                or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
            ):
                raise EdgeqError(f"{src}: {where} 'bbox' must be [x, y, width, height].")
            if ann.get("iscrowd", 0):
                continue
            info[iid]["boxes"].append((index_of[cid], *map(float, bbox)))

        self.image_paths: list[Path] = []
        self.image_ids: list[int] = []
        self._labels: list[np.ndarray] = []
        missing: list[str] = []
        for iid, rec in info.items():
            path = self.image_dir / rec["file_name"]
            if not path.is_file():
                missing.append(rec["file_name"])
                continue
            w, h = rec["width"], rec["height"]
            if not w or not h:  # rare: size not recorded, so read it from the image
                img = read_image(path)
                if img is None:
                    raise EdgeqError(f"Image {path} cannot be decoded (and {src} does not give its size).")
                h, w = img.shape[:2]
            self.image_paths.append(path)
            self.image_ids.append(iid)
            self._labels.append(self._to_yolo(rec["boxes"], float(w), float(h)))
        if missing:
            names = ", ".join(missing[:_SHOW_NAMES])
            more = f" and {len(missing) - _SHOW_NAMES} more" if len(missing) > _SHOW_NAMES else ""
            warnings.warn(
                f"Skipped {len(missing)} image(s) listed in {src.name} but missing from {self.image_dir}: "
                f"{names}{more}.",
                stacklevel=2,
            )
        if not self.image_paths:
            raise EdgeqError(f"None of the images listed in {src} exist in {self.image_dir}.")

    @staticmethod
    def _read_json(path: Path) -> Any:
        if not path.is_file():
            raise EdgeqError(f"COCO annotation file {path} does not exist.")
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except json.JSONDecodeError as e:
            msg = f"COCO annotation file {path} is not valid JSON (line {e.lineno}: {e.msg})."
            raise EdgeqError(msg) from None
        except UnicodeDecodeError:
            raise EdgeqError(f"COCO annotation file {path} is not UTF-8 text.") from None

    @staticmethod
    def _to_yolo(boxes: list[tuple[int, float, float, float, float]], w: float, h: float) -> np.ndarray:
        if not boxes:
            return np.zeros((0, 5), np.float32)
        b = np.asarray(boxes, np.float64)
        x1 = np.clip(b[:, 1], 0, w)
        y1 = np.clip(b[:, 2], 0, h)
        x2 = np.clip(b[:, 1] + b[:, 3], 0, w)
        y2 = np.clip(b[:, 2] + b[:, 4], 0, h)
        keep = (x2 > x1) & (y2 > y1)
        out = np.stack([b[:, 0], (x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h], 1)
        return out[keep].astype(np.float32)
