"""Images in, boxes out: the whole inference pipeline around any backend.

``Detector`` is what an application deploys: the same letterbox preprocessing that
calibration and evaluation use, the backend, then NMS and the mapping back to original-image
pixels. The batching policy follows the artifact: a dynamic batch runs in one call (in chunks
up to a TensorRT profile's maximum), a static batch of B runs in chunks of B with the last
chunk zero-padded, so a batch-1 export simply runs image by image.

Needs numpy, OpenCV and the chosen backend's package only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edgeq.errors import EdgeqError
from edgeq.runtime.backends import load_backend
from edgeq.runtime.backends.base import Backend
from edgeq.runtime.postprocess import non_max_suppression, scale_boxes
from edgeq.runtime.preprocess import LetterboxInfo, preprocess_batch


class Detector:
    """``Detector("model.onnx")(images) -> [(K, 6) x1, y1, x2, y2, score, class]`` in original pixels.

    ``imgsz`` defaults to the artifact's metadata (or its static input shape); extra keyword
    arguments (``backend=``, ``threads=``, ``precision=``, ``providers=``) go to
    :func:`load_backend` when a path is given.
    """

    def __init__(
        self,
        backend_or_path: Backend | str | Path,
        conf_thres: float = 0.25,
        iou_thres: float = 0.45,
        max_det: int = 300,
        imgsz: int | tuple[int, int] | None = None,
        *,
        agnostic: bool = False,
        multi_label: bool = False,
        **load_options: Any,
    ):
        if isinstance(backend_or_path, Backend):
            if load_options:
                raise EdgeqError(f"load options {sorted(load_options)} only apply when Detector is given a path")
            self.backend = backend_or_path.load()
        else:
            self.backend = load_backend(backend_or_path, **load_options)
        if not 0.0 <= conf_thres < 1.0:
            raise EdgeqError(f"conf_thres must be in [0, 1), got {conf_thres}")
        if not 0.0 <= iou_thres <= 1.0:
            raise EdgeqError(f"iou_thres must be in [0, 1], got {iou_thres}")
        if max_det < 1:
            raise EdgeqError(f"max_det must be >= 1, got {max_det}")
        self.conf_thres, self.iou_thres, self.max_det = conf_thres, iou_thres, max_det
        self.agnostic, self.multi_label = agnostic, multi_label

        meta = self.backend.meta
        if meta.outputs != "decoded":
            raise EdgeqError(
                f"{self.backend.path.name} outputs {meta.outputs!r} head maps, not decoded boxes; "
                "re-export it with decoded outputs to run it in a Detector"
            )
        self.imgsz = self._resolve_imgsz(imgsz)
        last = self.backend.outputs[0].shape[-1] if self.backend.outputs[0].shape else None
        nc = last - 5 if isinstance(last, int) else len(meta.names)
        if meta.names and isinstance(last, int) and len(meta.names) != nc:
            raise EdgeqError(f"{self.backend.path.name} lists {len(meta.names)} class names but outputs {nc} classes")
        self._names = list(meta.names) or [str(i) for i in range(nc)]

    def _resolve_imgsz(self, imgsz: int | tuple[int, int] | None) -> tuple[int, int]:
        """Explicit size (checked against a static input), else metadata, else the static input shape."""
        spec = self.backend.inputs[0]
        static_hw = None
        if spec.rank == 4 and spec.is_static(2) and spec.is_static(3):
            static_hw = (int(spec.shape[2]), int(spec.shape[3]))
        if imgsz is None:
            hw = self.backend.meta.imgsz or static_hw
            if hw is None:
                raise EdgeqError(
                    f"{self.backend.path.name} records no image size and has a dynamic input shape; pass imgsz="
                )
            return (int(hw[0]), int(hw[1]))
        if isinstance(imgsz, (int, np.integer)) and not isinstance(imgsz, bool):
            hw = (int(imgsz), int(imgsz))
        elif isinstance(imgsz, (tuple, list)) and len(imgsz) == 2:
            hw = (int(imgsz[0]), int(imgsz[1]))
        else:
            raise EdgeqError(f"imgsz must be an int or (height, width), got {imgsz!r}")
        if static_hw is not None and hw != static_hw:
            raise EdgeqError(
                f"{self.backend.path.name} has a fixed input size {static_hw[0]}x{static_hw[1]}, "
                f"but imgsz={imgsz!r} was given"
            )
        return hw

    @property
    def names(self) -> list[str]:
        return list(self._names)

    def predict_raw(self, batch: np.ndarray) -> np.ndarray:
        """Run an (N, 3, H, W) batch through the backend under its batch constraints; (N, A, 5 + nc)."""
        n = len(batch)
        if n == 0:
            raise EdgeqError("cannot run an empty batch")
        limit = self.backend.max_batch
        step = n if limit is None else limit
        pad = self.backend.inputs[0].is_static(0)
        outs = []
        for start in range(0, n, step):
            chunk = batch[start : start + step]
            real = len(chunk)
            if pad and real < step:
                chunk = np.concatenate([chunk, np.zeros((step - real, *chunk.shape[1:]), dtype=chunk.dtype)])
            outs.append(self.backend.infer(chunk)[0][:real])
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def preprocess(self, images: np.ndarray | Sequence[np.ndarray]) -> tuple[np.ndarray, list[LetterboxInfo]]:
        """Letterbox ``images`` (one HxWx3 BGR uint8 image, an NxHxWx3 stack or a list) to the input batch."""
        if isinstance(images, np.ndarray) and images.ndim in (2, 3):
            images = [images]
        return preprocess_batch(list(images), self.imgsz)

    def postprocess(self, raw: np.ndarray, infos: Sequence[LetterboxInfo]) -> list[np.ndarray]:
        """NMS on raw output, then boxes back to each original image."""
        dets = non_max_suppression(
            raw, conf_thres=self.conf_thres, iou_thres=self.iou_thres, max_det=self.max_det,
            multi_label=self.multi_label, agnostic=self.agnostic,
        )
        return [scale_boxes(d, info) for d, info in zip(dets, infos)]

    def __call__(self, images: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
        """Detections per image: (K, 6) float32 x1, y1, x2, y2, score, class in original-image pixels."""
        batch, infos = self.preprocess(images)
        return self.postprocess(self.predict_raw(batch), infos)

    def draw(self, image: np.ndarray, detections: np.ndarray) -> np.ndarray:
        """:func:`draw` with this model's class names."""
        return draw(image, detections, self._names)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Detector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _color(cls: int) -> tuple[int, int, int]:
    """A stable, well-spread BGR colour per class (golden-ratio hue steps)."""
    hue = int((cls * 0.618033988749895 % 1.0) * 180)
    hsv = np.uint8([[[hue, 200, 255]]])
    return tuple(int(v) for v in cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0])


def _label(names: Sequence[str], cls: int) -> str:
    return str(names[cls]) if 0 <= cls < len(names) else str(cls)


def draw(image: np.ndarray, detections: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """A copy of ``image`` (BGR uint8) with each detection's box and a "name score" label."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim not in (2, 3):
        got = getattr(image, "dtype", type(image).__name__)
        raise EdgeqError(f"draw expects a uint8 HxW or HxWx3 image, got {got}")
    canvas = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image[..., :3].copy()
    dets = np.asarray(detections, dtype=np.float32).reshape(-1, 6)
    h, w = canvas.shape[:2]
    scale = max(0.35, min(h, w) / 900)
    thickness = max(1, round(min(h, w) / 400))
    for x1, y1, x2, y2, score, cls in dets:
        color = _color(int(cls))
        p1, p2 = (int(round(x1)), int(round(y1))), (int(round(x2)), int(round(y2)))
        cv2.rectangle(canvas, p1, p2, color, thickness, cv2.LINE_AA)
        text = f"{_label(names, int(cls))} {score:.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
        top = p1[1] - th - base if p1[1] - th - base >= 0 else p1[1]  # inside the box at the top edge
        cv2.rectangle(canvas, (p1[0], top), (p1[0] + tw, top + th + base), color, cv2.FILLED)
        cv2.putText(
            canvas, text, (p1[0], top + th), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness, cv2.LINE_AA
        )
    return canvas


def detections_to_json(detections: np.ndarray, names: Sequence[str], path_or_id: str | int | Path) -> list[dict]:
    """One image's detections as JSON-ready dicts: image, class, name, score, box [x1, y1, x2, y2]."""
    image = str(path_or_id) if isinstance(path_or_id, Path) else path_or_id
    out = []
    for x1, y1, x2, y2, score, cls in np.asarray(detections, dtype=np.float64).reshape(-1, 6):
        out.append({
            "image": image,
            "class": int(cls),
            "name": _label(names, int(cls)),
            "score": round(float(score), 5),
            "box": [round(float(v), 2) for v in (x1, y1, x2, y2)],
        })
    return out
