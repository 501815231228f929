"""How much mAP an INT8 candidate loses against the float model: the measure the budget search uses.

Two measures, one interface (:class:`Judge`):

- **labelled**: COCO mAP50-95 on held-out labelled images (``export --budget-data data.yaml``),
  the float ONNX's minus the candidate's, in points: the figure ``edgeq verify`` reports.
- **agreement** (no labels, the usual case: users rarely label their calibration folder): the
  float model's own detections on held-out calibration images (score >= AGREEMENT_CONF) stand in
  for ground truth, and each model is scored against them. The float model then scores near 100
  and a candidate lower; the gap is larger than the labelled drop, because every moved box
  counts, not only those that cross an IoU threshold of a real label. It is converted into
  labelled points with AGREEMENT_SCALE, measured on the demo model (docs/BENCHMARKS.md), so the
  budget keeps its unit; the report says the figure is an estimate.

Torch-free: it runs the candidates on the runtime's backends, as ``edgeq verify`` does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from edgeq.errors import EdgeqError

log = logging.getLogger("edgeq")

AGREEMENT_CONF = 0.25  # the float detections kept as pseudo labels: the usual deploy threshold
# labelled mAP50-95 points lost per point of agreement lost: on the demo model at 320, four
# artifacts (int8-ort and int8-ov, fallback 0 and 8; 500 validation images) read 0.12-0.19
AGREEMENT_SCALE = 0.15


@dataclass
class Scored:
    """One candidate's measured loss: ``drop`` in labelled mAP50-95 points (estimated for the
    agreement measure), ``raw`` the measure's own gap in points."""

    drop: float
    raw: float


def _as_labels(det: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(K, 6) x1 y1 x2 y2 score class in pixels -> (K, 5) class cx cy w h normalised."""
    if not len(det):
        return np.zeros((0, 5), dtype=np.float64)
    h, w = shape
    return np.stack([det[:, 5], (det[:, 0] + det[:, 2]) / 2 / w, (det[:, 1] + det[:, 3]) / 2 / h,
                     (det[:, 2] - det[:, 0]) / w, (det[:, 3] - det[:, 1]) / h], axis=1)


class _Items:
    """The evaluation data set :func:`edgeq.runtime.evaluate.evaluate` reads: images with labels."""

    def __init__(self, images: Sequence[np.ndarray], labels: Sequence[np.ndarray], names: Sequence[str]):
        self.images, self.labels, self.names = list(images), list(labels), list(names)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i], Path(f"image{i}")


class Judge:
    """Scores candidates against the float ONNX on one fixed set of held-out images.

    ``labels``: one (K, 5) array per image (class cx cy w h, normalised) for the labelled
    measure; None: the agreement measure, with the float model's detections as labels.
    """

    def __init__(self, float_onnx: str | Path, images: Sequence[np.ndarray], labels: Sequence[np.ndarray] | None,
                 names: Sequence[str] | None = None, *, threads: int | None = None):
        from edgeq.runtime.detector import Detector

        if not images:
            raise EdgeqError("the budget search needs held-out images, and none were read")
        self.threads = threads
        self.labelled = labels is not None
        with Detector(str(float_onnx), conf_thres=AGREEMENT_CONF, threads=threads) as det:
            self.names = list(names or det.names)
            if len(det.names) != len(self.names):
                raise EdgeqError(f"{Path(float_onnx).name} predicts {len(det.names)} classes but the budget data has "
                                 f"{len(self.names)}")
            if labels is None:
                labels = [_as_labels(det([img])[0], img.shape[:2]) for img in images]
            self.items = _Items(images, labels, self.names)
            self.float_map = self._map(det)
        if not np.isfinite(self.float_map):
            what = ("its val split has no labelled objects" if self.labelled else
                    f"the float model detects nothing (score >= {AGREEMENT_CONF:g}) on them")
            raise EdgeqError(f"the budget cannot be measured on the {len(images)} held-out images: {what}",
                             note="give images of the model's own domain (--data), labelled --budget-data, or a "
                                  "fixed --fallback N")

    @property
    def measure(self) -> str:
        """How the drop was measured, for the report."""
        if self.labelled:
            return f"labelled mAP50-95 on {len(self.items)} held-out images"
        return (f"agreement with the float model's detections (score >= {AGREEMENT_CONF:g}) on {len(self.items)} "
                f"held-out calibration images, x{AGREEMENT_SCALE:g} as an estimate of labelled points")

    def _map(self, det) -> float:
        from edgeq.runtime.evaluate import evaluate

        batch = det.backend.inputs[0].shape[0] if det.backend.inputs[0].is_static(0) else 8
        return float(evaluate(det.predict_raw, self.items, det.imgsz[0], self.names, batch_size=batch,
                              progress=False)["map50_95"])

    def score(self, path: str | Path, backend: str, precision: str | None = None) -> Scored:
        """The drop of the model at ``path`` run by ``backend`` (OpenVINO at ``precision``)."""
        from edgeq.runtime.detector import Detector

        options = {"precision": precision} if backend == "openvino" and precision else {}
        with Detector(str(path), backend=backend, threads=self.threads, **options) as det:
            got = self._map(det)
        raw = 100.0 * (self.float_map - got)
        return Scored(drop=raw if self.labelled else raw * AGREEMENT_SCALE, raw=raw)


BUDGET_IMAGES = 200  # labelled held-out images the search scores on (--budget-images)
AGREEMENT_IMAGES = 64  # calibration images held out for the agreement measure: the last of the folder


@dataclass
class HeldOut:
    """The images the search scores on, and how many calibration images remain for calibration."""

    images: list
    labels: list | None  # None: the agreement measure
    names: list[str] | None
    calib_limit: int  # calibrate on at most this many of the folder's first images


def held_out(image_dir: str | Path, num_images: int, budget_data: str | Path | None = None,
             count: int | None = None) -> HeldOut:
    """Labelled images from ``budget_data`` (data.yaml or data set folder, its val split), or
    else the last images of the calibration folder, which calibration then leaves out."""
    from edgeq.data.images import iter_images, list_images

    if budget_data is not None:
        from edgeq.data.yolo import YoloDataset

        dataset = YoloDataset(budget_data, split="val")
        n = min(count or BUDGET_IMAGES, len(dataset))
        if n < 1:
            raise EdgeqError(f"--budget-data {budget_data}: its val split has no images")
        items = [dataset[i] for i in range(n)]
        return HeldOut([it[0] for it in items], [it[1] for it in items], list(dataset.names), num_images)
    paths = list_images(image_dir)
    k = count or min(AGREEMENT_IMAGES, len(paths) // 4)
    if k < 8 or len(paths) - k < 1:
        raise EdgeqError(f"{image_dir} has {len(paths)} images: too few to hold some out for the budget",
                         note="the agreement measure holds out a quarter (at most 64); give more images, labelled "
                              "--budget-data, or a fixed --fallback N")
    images = [img for _, img in iter_images(paths[-k:])]
    if len(images) < 8:
        raise EdgeqError(f"only {len(images)} of the last {k} images of {image_dir} are readable")
    limit = len(paths) - k
    if num_images > limit:
        log.info("budget: the last %d of %d images of %s are held out for the agreement measure; calibrating on %d",
                 k, len(paths), image_dir, limit)
    return HeldOut(images, None, None, limit)
