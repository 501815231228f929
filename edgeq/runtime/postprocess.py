"""Turn raw YOLOv5-style model output into per-image detections in original-image pixels.

Model output convention (YOLOv5 export): ``pred`` is float32 [N, A, 5 + nc] with columns
cx, cy, w, h (input-image pixels), objectness and class probabilities (both already
sigmoid). Detections are plain (K, 6) float32 arrays: x1, y1, x2, y2, score, class.

The suppression itself is OpenCV's (``cv2.dnn.NMSBoxesBatched`` / ``cv2.dnn.NMSBoxes``), so
this works with numpy + OpenCV only, the same on every backend. OpenCV's semantics match
torchvision's NMS used by YOLOv5: a box is dropped when its IoU with a kept, higher-scoring
box is strictly greater than ``iou_thres``.
"""

from __future__ import annotations

import cv2
import numpy as np

from edgeq.errors import EdgeqError
from edgeq.runtime.preprocess import LetterboxInfo

DET_COLUMNS = 6  # x1, y1, x2, y2, score, class


def _empty() -> np.ndarray:
    return np.zeros((0, DET_COLUMNS), dtype=np.float32)


def _check_pred(pred: np.ndarray) -> np.ndarray:
    pred = np.asarray(pred)
    if pred.ndim != 3 or pred.shape[2] < 6:
        raise EdgeqError(
            f"expected model output of shape [N, A, 5 + nc] (nc >= 1), got shape {pred.shape}",
            note="YOLOv5 exports emit cx, cy, w, h, objectness, class probabilities per anchor.",
        )
    return pred.astype(np.float32, copy=False)


def _candidates(x: np.ndarray, conf_thres: float, multi_label: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Score one image's rows and keep (box_cxcywh, score, class) above ``conf_thres``."""
    x = x[x[:, 4] > conf_thres]  # cheap objectness pre-filter: score = obj * cls <= obj
    scores = x[:, 5:] * x[:, 4:5]
    if multi_label:
        rows, cls = np.nonzero(scores > conf_thres)
        return x[rows, :4], scores[rows, cls], cls
    cls = scores.argmax(axis=1) if len(x) else np.zeros(0, dtype=np.int64)
    best = scores[np.arange(len(x)), cls]
    keep = best > conf_thres
    return x[keep, :4], best[keep], cls[keep]


def non_max_suppression(
    pred: np.ndarray,
    conf_thres: float = 0.25,
    iou_thres: float = 0.45,
    max_det: int = 300,
    multi_label: bool = False,
    agnostic: bool = False,
    max_nms: int = 30000,
) -> list[np.ndarray]:
    """Score, threshold and suppress raw predictions; one (K, 6) float32 array per image.

    score = objectness * class probability. ``multi_label=True`` keeps every class whose
    score exceeds ``conf_thres`` (what mAP evaluation at conf 0.001 needs); otherwise only
    the best class per box. Only the ``max_nms`` highest-scoring candidates enter NMS (bounds
    the cost on untrained or badly quantized models); at most ``max_det`` survive, sorted by
    descending score. ``agnostic=True`` suppresses across classes.
    """
    if not 0.0 <= conf_thres < 1.0:
        raise EdgeqError(f"conf_thres must be in [0, 1), got {conf_thres}")
    if not 0.0 <= iou_thres <= 1.0:
        raise EdgeqError(f"iou_thres must be in [0, 1], got {iou_thres}")
    if max_det < 1 or max_nms < 1:
        raise EdgeqError(f"max_det and max_nms must be >= 1, got {max_det} and {max_nms}")
    pred = _check_pred(pred)

    out: list[np.ndarray] = []
    for x in pred:
        boxes, scores, cls = _candidates(x, conf_thres, multi_label)
        if len(scores) == 0:
            out.append(_empty())
            continue
        if len(scores) > max_nms:
            top = np.argpartition(-scores, max_nms - 1)[:max_nms]
            boxes, scores, cls = boxes[top], scores[top], cls[top]

        # OpenCV wants top-left x, y, w, h; float64 selects its Rect2d (sub-pixel) overload.
        xywh = boxes.astype(np.float64)
        xywh[:, :2] -= xywh[:, 2:4] / 2
        score_list = scores.astype(np.float64)
        if agnostic:
            keep = cv2.dnn.NMSBoxes(xywh, score_list, conf_thres, iou_thres, top_k=max_det)
        else:
            keep = cv2.dnn.NMSBoxesBatched(
                xywh, score_list, cls.astype(np.int32), conf_thres, iou_thres, top_k=max_det
            )
        keep = np.asarray(keep, dtype=np.int64).reshape(-1)
        keep = keep[np.argsort(-scores[keep], kind="stable")][:max_det]

        det = np.empty((len(keep), DET_COLUMNS), dtype=np.float32)
        det[:, 0:2] = xywh[keep, 0:2]
        det[:, 2:4] = xywh[keep, 0:2] + xywh[keep, 2:4]
        det[:, 4] = scores[keep]
        det[:, 5] = cls[keep]
        out.append(det)
    return out


def scale_boxes(boxes_xyxy: np.ndarray, info: LetterboxInfo) -> np.ndarray:
    """Map boxes from letterboxed input pixels back to the original image, clipped to it.

    Columns 0..3 are x1, y1, x2, y2; any further columns (score, class) are copied as is, so
    a (K, 6) detection array can be passed directly. Returns a new float32 array.
    """
    boxes = np.array(boxes_xyxy, dtype=np.float32, copy=True)
    if boxes.ndim != 2 or boxes.shape[1] < 4:
        raise EdgeqError(f"expected boxes of shape (K, 4) or (K, >4), got shape {boxes.shape}")
    left, top = info.pad
    h, w = info.orig_shape
    boxes[:, [0, 2]] = np.clip((boxes[:, [0, 2]] - left) / info.ratio, 0, w)
    boxes[:, [1, 3]] = np.clip((boxes[:, [1, 3]] - top) / info.ratio, 0, h)
    return boxes
