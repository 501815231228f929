"""COCO-definition mAP for any backend: a ``predict`` callable in, a metrics dict out.

AP is computed by COCOeval (faster-coco-eval's C++ port, or pycocotools if that is all there
is), never by a hand-written integral, so numbers are comparable with published ones.

Conventions, fixed here once:

* category id = class index + 1, image id = image index + 1, annotation id >= 1
  (COCOeval treats a matched id of 0 as "unmatched", so ids must start at 1);
* GT ``area`` = box w*h, ``iscrowd`` = 0;
* ``maxDets = [1, 10, 300]``: like YOLOv5's val (``max_det=300``), up to 300 detections
  per image count. COCOeval reports AP at the last ``maxDets`` entry; the values here are
  read from ``eval["precision"]`` at area range "all" and that last entry;
* a class without GT instances gets NaN and is left out of the mean, as COCOeval does.

Needs numpy, OpenCV and faster-coco-eval (or pycocotools); tqdm only on a terminal.
"""

from __future__ import annotations

import contextlib
import io
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.runtime.postprocess import non_max_suppression, scale_boxes
from edgeq.runtime.preprocess import preprocess_batch

MAX_DETS = [1, 10, 300]


def _coco_api() -> tuple[type, Callable[..., Any]]:
    """Return (COCO class, factory(gt, dt) -> evaluator), preferring faster-coco-eval."""
    try:
        from faster_coco_eval import COCO, COCOeval_faster

        def make(gt: Any, dt: Any) -> Any:
            return COCOeval_faster(gt, dt, "bbox", print_function=lambda *a, **k: None)

        return COCO, make
    except ImportError:
        pass
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise EdgeqError(
            "mAP evaluation needs faster-coco-eval (or pycocotools)",
            note="pip install faster-coco-eval",
        ) from None

    def make(gt: Any, dt: Any) -> Any:
        return COCOeval(gt, dt, "bbox")

    return COCO, make


def _coco_from_dict(coco_cls: type, dataset: dict) -> Any:
    """Build a COCO object from an in-memory dict (both libraries accept this route)."""
    coco = coco_cls()
    coco.dataset = dataset
    coco.createIndex()
    return coco


def _xyxy_to_xywh(b: np.ndarray) -> np.ndarray:
    out = np.asarray(b, dtype=np.float64).copy()
    out[:, 2:4] -= out[:, 0:2]
    return out


def _check_lists(
    predictions: Sequence[np.ndarray], ground_truths: Sequence[np.ndarray], image_shapes: Sequence[tuple[int, int]]
) -> None:
    if not len(predictions) == len(ground_truths) == len(image_shapes):
        raise EdgeqError(
            f"predictions, ground truths and image shapes differ in length: "
            f"{len(predictions)}, {len(ground_truths)}, {len(image_shapes)}"
        )


def _build_coco_dicts(
    predictions: Sequence[np.ndarray],
    ground_truths: Sequence[np.ndarray],
    image_shapes: Sequence[tuple[int, int]],
    nc: int,
) -> tuple[dict, list[dict], np.ndarray]:
    """GT dataset dict, detection result list and per-class instance counts."""
    images, annotations, results = [], [], []
    instances = np.zeros(nc, dtype=np.int64)
    for i, (pred, gt, (h, w)) in enumerate(zip(predictions, ground_truths, image_shapes)):
        image_id = i + 1
        images.append({"id": image_id, "height": int(h), "width": int(w), "file_name": str(image_id)})

        gt = np.asarray(gt, dtype=np.float64).reshape(-1, 5) if np.size(gt) else np.zeros((0, 5))
        pred = np.asarray(pred, dtype=np.float64).reshape(-1, 6) if np.size(pred) else np.zeros((0, 6))
        for arr, what, col in ((gt, "ground truth", 0), (pred, "prediction", 5)):
            cls = arr[:, col]
            if len(cls) and (cls.min() < 0 or cls.max() >= nc or np.any(cls != np.round(cls))):
                raise EdgeqError(f"{what} class ids of image {i} are outside 0..{nc - 1}: {np.unique(cls)}")

        gt_xywh = _xyxy_to_xywh(gt[:, 1:5])
        for c, box in zip(gt[:, 0].astype(int), gt_xywh.tolist()):
            instances[c] += 1
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": c + 1,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
        pred_xywh = _xyxy_to_xywh(pred[:, 0:4])
        for c, score, box in zip(pred[:, 5].astype(int), pred[:, 4].tolist(), pred_xywh.tolist()):
            results.append({"image_id": image_id, "category_id": c + 1, "bbox": box, "score": score})

    categories = [{"id": c + 1, "name": str(c)} for c in range(nc)]
    gt_dict = {"images": images, "annotations": annotations, "categories": categories}
    return gt_dict, results, instances


def _per_class_ap(
    predictions: Sequence[np.ndarray],
    ground_truths: Sequence[np.ndarray],
    image_shapes: Sequence[tuple[int, int]],
    nc: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class (AP50, AP50-95, instances); NaN AP where a class has no GT."""
    gt_dict, results, instances = _build_coco_dicts(predictions, ground_truths, image_shapes, nc)
    ap50 = np.full(nc, np.nan)
    ap = np.full(nc, np.nan)
    has_gt = instances > 0
    if not has_gt.any():
        return ap50, ap, instances
    if not results:  # pycocotools cannot load an empty result list; COCOeval would give 0
        ap50[has_gt] = 0.0
        ap[has_gt] = 0.0
        return ap50, ap, instances

    coco_cls, make_eval = _coco_api()
    with contextlib.redirect_stdout(io.StringIO()):
        gt = _coco_from_dict(coco_cls, gt_dict)
        dt = gt.loadRes(results)
        ev = make_eval(gt, dt)
        ev.params.imgIds = sorted(gt.getImgIds())
        ev.params.catIds = list(range(1, nc + 1))
        ev.params.maxDets = list(MAX_DETS)
        ev.evaluate()
        ev.accumulate()

    # precision: [T iou thresholds, R recall points, K classes, A area ranges, M maxDets]
    precision = np.asarray(ev.eval["precision"], dtype=np.float64)
    area_all = list(ev.params.areaRngLbl).index("all")
    cat_ids = [int(c) for c in ev.params.catIds]
    iou_thrs = np.asarray(ev.params.iouThrs, dtype=np.float64)
    t50 = int(np.argmin(np.abs(iou_thrs - 0.5)))
    for k, cat_id in enumerate(cat_ids):
        c = cat_id - 1
        if not has_gt[c]:
            continue
        p = precision[:, :, k, area_all, -1]
        ap50[c] = float(np.mean(p[t50]))
        ap[c] = float(np.mean(p))
    return ap50, ap, instances


def coco_map(
    predictions: Sequence[np.ndarray],
    ground_truths: Sequence[np.ndarray],
    image_shapes: Sequence[tuple[int, int]],
    names: Sequence[str],
) -> dict:
    """COCO mAP@0.5 and mAP@0.5:0.95, overall and per class.

    ``predictions[i]``: (K, 6) x1, y1, x2, y2, score, class in original-image pixels;
    ``ground_truths[i]``: (M, 5) class, x1, y1, x2, y2 in pixels; ``image_shapes[i]``: (h, w).
    Means are over classes with at least one GT instance (NaN if there are none).
    """
    _check_lists(predictions, ground_truths, image_shapes)
    nc = len(names)
    if nc == 0:
        raise EdgeqError("class names are empty; mAP needs at least one class")
    ap50, ap, instances = _per_class_ap(predictions, ground_truths, image_shapes, nc)
    valid = instances > 0
    per_class = [
        {
            "class": c,
            "name": str(names[c]),
            "instances": int(instances[c]),
            "map50": float(ap50[c]),
            "map50_95": float(ap[c]),
        }
        for c in range(nc)
    ]
    return {
        "map50": float(np.mean(ap50[valid])) if valid.any() else math.nan,
        "map50_95": float(np.mean(ap[valid])) if valid.any() else math.nan,
        "per_class": per_class,
        "images": len(image_shapes),
        "instances": int(instances.sum()),
    }


def _labels_to_xyxy_pixels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(K, 5) cls, cx, cy, w, h normalised -> (K, 5) cls, x1, y1, x2, y2 in pixels."""
    labels = np.asarray(labels, dtype=np.float64).reshape(-1, 5)
    h, w = shape
    out = np.empty_like(labels)
    out[:, 0] = labels[:, 0]
    out[:, 1] = (labels[:, 1] - labels[:, 3] / 2) * w
    out[:, 2] = (labels[:, 2] - labels[:, 4] / 2) * h
    out[:, 3] = (labels[:, 1] + labels[:, 3] / 2) * w
    out[:, 4] = (labels[:, 2] + labels[:, 4] / 2) * h
    return out


def _progress(iterable, total: int, enabled: bool):
    from edgeq.utils.progress import progress

    return progress(iterable, total=total, desc="evaluating", unit="batch", enabled=enabled)


def evaluate(
    predict: Callable[[np.ndarray], np.ndarray],
    dataset: Sequence,
    imgsz: int,
    names: Sequence[str],
    batch_size: int = 8,
    conf_thres: float = 0.001,
    iou_thres: float = 0.6,
    max_det: int = 300,
    progress: bool = True,
) -> dict:
    """Run ``predict`` over ``dataset`` with the shared pre/postprocessing and return COCO mAP.

    ``dataset[i]`` -> (image_bgr uint8 HxWx3, labels (K, 5) cls cx cy w h normalised, path).
    ``predict`` maps an (N, 3, H, W) float32 batch to [N, A, 5 + nc] raw output. The returned
    dict is :func:`coco_map`'s plus ``speed_ms_per_image`` (time inside ``predict`` only).
    """
    n = len(dataset)
    if n == 0:
        raise EdgeqError("the evaluation dataset is empty")
    if batch_size < 1:
        raise EdgeqError(f"batch_size must be >= 1, got {batch_size}")

    predictions: list[np.ndarray] = []
    ground_truths: list[np.ndarray] = []
    shapes: list[tuple[int, int]] = []
    predict_s = 0.0
    starts = range(0, n, batch_size)
    for start in _progress(starts, len(starts), progress):
        items = [dataset[i] for i in range(start, min(start + batch_size, n))]
        images = [item[0] for item in items]
        batch, infos = preprocess_batch(images, imgsz)

        t0 = time.perf_counter()
        raw = predict(batch)
        predict_s += time.perf_counter() - t0

        raw = np.asarray(raw)
        if raw.ndim != 3 or raw.shape[0] != len(items):
            raise EdgeqError(
                f"predict returned shape {raw.shape} for a batch of {len(items)}; expected [N, A, 5 + nc]"
            )
        dets = non_max_suppression(
            raw, conf_thres=conf_thres, iou_thres=iou_thres, max_det=max_det, multi_label=True
        )
        for (_, labels, _), det, info in zip(items, dets, infos):
            predictions.append(scale_boxes(det, info))
            ground_truths.append(_labels_to_xyxy_pixels(labels, info.orig_shape))
            shapes.append(info.orig_shape)

    result = coco_map(predictions, ground_truths, shapes, names)
    result["speed_ms_per_image"] = 1000.0 * predict_s / n
    return result


def _fmt(v: float) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def format_map_table(result: dict) -> str:
    """A per-class mAP table with an "all" row first, for logs and the CLI."""
    rows = [("all", str(result["instances"]), _fmt(result["map50"]), _fmt(result["map50_95"]))]
    for pc in result["per_class"]:
        rows.append((str(pc["name"]), str(pc["instances"]), _fmt(pc["map50"]), _fmt(pc["map50_95"])))
    header = ("Class", "Instances", "mAP50", "mAP50-95")
    width0 = max(len(header[0]), *(len(r[0]) for r in rows))
    widths = [width0] + [max(len(header[j]), *(len(r[j]) for r in rows)) for j in range(1, 4)]

    def line(cells: tuple[str, ...]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "  ".join([first, *rest])

    out = [line(header), line(tuple("-" * w for w in widths))]
    out.extend(line(r) for r in rows)
    return "\n".join(out)
