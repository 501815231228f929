"""PyTorch detector -> ONNX, the format every other backend is built from.

Conventions every edgeq artifact follows (the runtime relies on them):

* input ``images``: float32 (N, 3, H, W), RGB in [0, 1] (``edgeq.runtime.preprocess``);
* output ``output0``: decoded detections (N, anchors, 5 + nc) as YOLOv5 exports them, or with
  ``raw=True`` the head's maps ``output0..`` (N, na, ny, nx, 5 + nc) without the decode;
* metadata props ``edgeq.*`` (class names, stride, image size, flavour, source hash, version).

The TorchScript-based exporter is used on purpose: it turns PyTorch fake-quant ops into
QuantizeLinear/DequantizeLinear pairs, which the INT8 path relies on.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from edgeq.errors import EdgeqError
from edgeq.graph import set_metadata
from edgeq.utils.files import atomic_path

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger("edgeq")

OPSET_RANGE = (13, 20)
DEFAULT_OPSET = 17


def _detect_head(model: "nn.Module"):
    from edgeq.models.common import Detect

    head = getattr(model, "detect", None)
    if isinstance(head, Detect):
        return head
    heads = [m for m in model.modules() if isinstance(m, Detect)]
    if len(heads) != 1:
        raise EdgeqError(
            f"export needs a detector with one YOLO Detect head; {type(model).__name__} has {len(heads)}",
            note="edgeq exports DetectionModel-style detectors (checkpoints or model yamls)",
        )
    return heads[0]


def _as_hw(imgsz: int | tuple[int, int] | list[int], stride: int) -> tuple[int, int]:
    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else tuple(imgsz)
    if h <= 0 or w <= 0 or h % stride or w % stride:
        raise EdgeqError(f"--imgsz {h}x{w} must be positive multiples of the model's stride {stride}")
    return int(h), int(w)


def export_onnx(
    model: "nn.Module",
    path: str | Path,
    *,
    imgsz: int | tuple[int, int] = 640,
    batch: int = 1,
    dynamic: bool = False,
    opset: int = DEFAULT_OPSET,
    raw: bool = False,
    simplify: bool = True,
    metadata: dict | None = None,
) -> Path:
    """Export a detector; the file appears only once it is complete and checked."""
    import onnx
    import torch

    if not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        raise EdgeqError(f"--opset {opset} is not supported; use {OPSET_RANGE[0]}..{OPSET_RANGE[1]} (default {DEFAULT_OPSET})")
    if batch < 1:
        raise EdgeqError(f"--batch must be >= 1, got {batch}")
    head = _detect_head(model)
    h, w = _as_hw(imgsz, int(max(head.stride)))
    model = model.eval()
    example = torch.zeros(batch, 3, h, w)
    n_out = head.nl if raw else 1
    output_names = [f"output{i}" for i in range(n_out)]
    dynamic_axes = {name: {0: "batch"} for name in ["images", *output_names]} if dynamic else None

    path = Path(path)
    previous_raw = head.raw_output
    head.raw_output = raw
    try:
        with atomic_path(path) as tmp:
            with warnings.catch_warnings():  # the TorchScript exporter's deprecation and tracer notes
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    model,
                    example,
                    str(tmp),
                    dynamo=False,
                    opset_version=opset,
                    input_names=["images"],
                    output_names=output_names,
                    dynamic_axes=dynamic_axes,
                    do_constant_folding=True,
                )
            proto = onnx.load(str(tmp))
            if simplify:
                proto = simplify_onnx(proto)
            onnx.checker.check_model(proto)
            props = {"edgeq.outputs": "raw" if raw else "decoded", "edgeq.imgsz": json.dumps([h, w])}
            props.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
            set_metadata(proto, props)
            onnx.save(proto, str(tmp))
    finally:
        head.raw_output = previous_raw
    log.debug("wrote %s", path)
    return path


def simplify_onnx(proto):
    """onnxsim's constant folding and shape inference; skipped with a warning when it fails."""
    try:
        import onnxsim

        simplified, ok = onnxsim.simplify(proto)
    except Exception as exc:  # onnxsim raises many types; its failure must not fail the export
        warnings.warn(f"ONNX simplification skipped: {exc}", stacklevel=2)
        return proto
    if not ok:
        warnings.warn("ONNX simplification skipped: onnxsim could not validate the simplified model", stacklevel=2)
        return proto
    # onnxsim >= 0.5 records its own log in metadata_props; keep ours clean.
    kept = [p for p in simplified.metadata_props if not p.key.startswith("onnxsim.")]
    del simplified.metadata_props[:]
    simplified.metadata_props.extend(kept)
    return simplified
