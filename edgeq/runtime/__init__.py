"""edgeq's standalone runtime: run an exported detector with numpy, OpenCV and one backend.

Nothing here needs torch or the rest of edgeq: a deployment machine installs edgeq (or copies
``edgeq/runtime``) plus onnxruntime, openvino or tensorrt, and runs::

    from edgeq.runtime import Detector
    boxes = Detector("model.onnx")(images)

The pre/postprocessing functions (numpy + OpenCV) are imported here; everything else is
resolved on first use (PEP 562), so ``import edgeq.runtime`` imports no backend package.
Note that ``edgeq.runtime.preprocess`` is the *function*; the module of the same name is
reached with ``from edgeq.runtime.preprocess import ...`` as usual.
"""

from __future__ import annotations

import importlib
from typing import Any

from edgeq.runtime.postprocess import non_max_suppression, scale_boxes
from edgeq.runtime.preprocess import LetterboxInfo, letterbox, preprocess, preprocess_batch

_LAZY = {
    "load_backend": "edgeq.runtime.backends",
    "Backend": "edgeq.runtime.backends.base",
    "ModelMeta": "edgeq.runtime.backends.base",
    "TensorSpec": "edgeq.runtime.backends.base",
    "Detector": "edgeq.runtime.detector",
    "draw": "edgeq.runtime.detector",
    "detections_to_json": "edgeq.runtime.detector",
    "coco_map": "edgeq.runtime.evaluate",
    "tensor_metrics": "edgeq.runtime.parity",
    "compare_outputs": "edgeq.runtime.parity",
    "detection_agreement": "edgeq.runtime.parity",
    "parity_check": "edgeq.runtime.parity",
    "ParityResult": "edgeq.runtime.parity",
    "format_parity_table": "edgeq.runtime.parity",
}

__all__ = sorted(
    [*_LAZY, "LetterboxInfo", "letterbox", "non_max_suppression", "preprocess", "preprocess_batch", "scale_boxes"]
)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'edgeq.runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
