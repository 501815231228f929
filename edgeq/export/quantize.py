"""Static INT8 in PyTorch: the fake-quant model (accuracy before export, and the base for
quantization-aware fine-tuning with the trainer).

The exported INT8 artifacts are made on the float ONNX by :mod:`edgeq.export.qdq`; this model
takes its statistics from the same calibration table (``CalibrationTable.attach`` maps each
point to the ONNX tensor it observes) and its TorchScript export carries the same Q/DQ pairs
on the convolutions.

How it works:

1. :func:`insert_quant_points` wraps every quantizable layer of a deploy-graph model (BN folded,
   h-swish rewritten) in a :class:`QuantConv` holding :class:`QuantPoint` s for its input, its
   output and its weight. The places come from a :class:`Placement` (data, not scattered ifs).
2. :func:`calibrate` runs calibration images through the model with every point observing:
   histograms (bounded memory), never stored activations. Points observe both the input and the
   output side so that one calibration serves every flavour.
3. :func:`apply_ranges` turns statistics into fixed scales for a flavour and a calibrator, and
   switches the points to fake-quantization. The result is an evaluable INT8 model in PyTorch
   whose ONNX export (TorchScript exporter) carries QuantizeLinear/DequantizeLinear pairs.

Flavours (same statistics, different graphs):

* ``trt``: symmetric int8, zero point 0, Q/DQ on layer inputs only (TensorRT's explicit
  quantization places and fuses around them itself);
* ``ort``: asymmetric uint8 activations and int8 per-channel weights, with Q/DQ on layer inputs
  *and* outputs so ONNX Runtime sees whole DQ -> Conv -> Q units it can run as integer kernels;
* ``ov``: OpenVINO's choice, measured (see docs/BENCHMARKS.md): the ``trt`` placement with
  asymmetric uint8 activations.

The detection decode (sigmoid, grid and anchor arithmetic) is never quantized: the head's
convolutions get quantized inputs and float outputs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from edgeq.errors import EdgeqError
from edgeq.export.calibrators import (
    METHODS,
    TensorStats,
    asymmetric_uint8,
    compute_range,
    per_channel_symmetric,
    symmetric_int8,
)

log = logging.getLogger("edgeq")

FLAVOURS = ("trt", "ort", "ov")


@dataclass(frozen=True)
class Placement:
    """Where a flavour puts Q/DQ pairs and in which number format."""

    flavour: str
    quantize_inputs: bool = True
    quantize_outputs: bool = False
    symmetric_activations: bool = True
    skip_types: tuple[str, ...] = ("Linear",)  # SE fully-connected layers stay float (tiny, range-sensitive)
    skip_head_outputs: bool = True  # the decode follows the head's convolutions


PLACEMENTS = {
    "trt": Placement("trt"),
    "ort": Placement("ort", quantize_outputs=True, symmetric_activations=False),
    "ov": Placement("ov", symmetric_activations=False),  # as edgeq.export.qdq's "ov" policy
}


class QuantPoint(nn.Module):
    """A tensor's observer during calibration, its fixed fake-quantizer afterwards.

    ``mode``: "observe" (collect statistics, pass through), "quant" (fake-quantize with fixed
    scale/zero point: exported as QuantizeLinear + DequantizeLinear), "off" (pass through).
    """

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.mode = "off"
        self.stats: TensorStats | None = None
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))
        self.quant_min, self.quant_max = -128, 127

    def set_range(self, scale: float, zero_point: int, unsigned: bool) -> None:
        self.scale.fill_(scale)
        self.zero_point.fill_(zero_point)
        self.quant_min, self.quant_max = (0, 255) if unsigned else (-128, 127)
        self.mode = "quant"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "observe":
            if self.stats is None:
                self.stats = TensorStats()
            self.stats.update(x.detach())
            return x
        if self.mode == "quant":
            return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, self.quant_min, self.quant_max)
        return x

    def extra_repr(self) -> str:
        return f"{self.name}, mode={self.mode}"


class QuantConv(nn.Module):
    """A conv/linear layer with input, weight and output quantization points."""

    def __init__(self, layer: nn.Module, name: str):
        super().__init__()
        self.layer = layer
        self.name = name
        self.input_q = QuantPoint(f"{name}.input")
        self.output_q = QuantPoint(f"{name}.output")
        self.quantize_weight = False
        self.register_buffer("weight_scale", torch.ones(layer.weight.shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_q(x)
        if self.quantize_weight:
            zeros = torch.zeros_like(self.weight_scale, dtype=torch.int32)
            w = torch.fake_quantize_per_channel_affine(self.layer.weight, self.weight_scale, zeros, 0, -128, 127)
            y = self.layer._conv_forward(x, w, self.layer.bias) if isinstance(self.layer, nn.Conv2d) else nn.functional.linear(x, w, self.layer.bias)
        else:
            y = self.layer(x)
        return self.output_q(y)


def _head_convs(model: nn.Module) -> set[int]:
    head = getattr(model, "detect", None)
    return {id(m) for m in head.m} if head is not None else set()


def insert_quant_points(model: nn.Module) -> list[QuantConv]:
    """Wrap every Conv2d and Linear of ``model`` (in place); returns the wrappers in order."""
    head_ids = _head_convs(model)
    wrapped: list[QuantConv] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for child_name, child in list(module.named_children()):
            name = f"{prefix}.{child_name}" if prefix else child_name
            if isinstance(child, (nn.Conv2d, nn.Linear)) and not isinstance(module, QuantConv):
                q = QuantConv(child, name)
                q.is_head = id(child) in head_ids
                setattr(module, child_name, q)
                wrapped.append(q)
            elif not isinstance(child, QuantConv):
                visit(child, name)

    visit(model, "")
    if not wrapped:
        raise EdgeqError(f"{type(model).__name__} has no Conv2d or Linear layer to quantize")
    return wrapped


def quant_points(model: nn.Module) -> list[QuantPoint]:
    return [m for m in model.modules() if isinstance(m, QuantPoint)]


def set_mode(model: nn.Module, mode: str) -> None:
    for point in quant_points(model):
        point.mode = mode
    for q in model.modules():
        if isinstance(q, QuantConv):
            q.quantize_weight = False


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[torch.Tensor], progress: bool = True, total: int | None = None) -> int:
    """Observe every point over ``batches`` (N, 3, H, W float in [0, 1]); returns images seen."""
    from tqdm import tqdm

    model.eval()
    set_mode(model, "observe")
    seen = 0
    try:
        for batch in tqdm(batches, total=total, desc="calibrating", unit="batch", disable=not progress):
            model(batch)
            seen += batch.shape[0]
    finally:
        for point in quant_points(model):
            point.mode = "off"
    if seen == 0:
        raise EdgeqError("calibration saw no images")
    return seen


@dataclass
class QuantReport:
    flavour: str
    method: str
    quantized_layers: int = 0
    skipped: list[str] = field(default_factory=list)
    degenerate: list[str] = field(default_factory=list)


def apply_ranges(
    model: nn.Module, flavour: str = "trt", method: str = "entropy", percentile: float = 99.99
) -> QuantReport:
    """Fix scales from the collected statistics and switch the model to fake-quantization."""
    if flavour not in PLACEMENTS:
        raise EdgeqError(f"unknown INT8 flavour {flavour!r}", note=f"choose from {', '.join(FLAVOURS)}")
    if method not in METHODS:
        raise EdgeqError(f"--method {method!r} is not a calibrator", note=f"choose from {', '.join(METHODS)}")
    policy = PLACEMENTS[flavour]
    report = QuantReport(flavour, method)
    set_mode(model, "off")
    for q in (m for m in model.modules() if isinstance(m, QuantConv)):
        if type(q.layer).__name__ in policy.skip_types:
            report.skipped.append(q.name)
            continue
        points = []
        if policy.quantize_inputs:
            points.append(q.input_q)
        if policy.quantize_outputs and not (policy.skip_head_outputs and getattr(q, "is_head", False)):
            points.append(q.output_q)
        for point in points:
            if point.stats is None:
                raise EdgeqError(f"no calibration statistics for {point.name}: run calibrate() first")
            rng = compute_range(point.stats, method, symmetric=policy.symmetric_activations, percentile=percentile)
            if rng.degenerate:
                report.degenerate.append(point.name)
            if policy.symmetric_activations:
                scale, zp = symmetric_int8(rng.amax)
                point.set_range(scale, zp, unsigned=False)
            else:
                scale, zp = asymmetric_uint8(rng.lo, rng.hi)
                point.set_range(scale, zp, unsigned=True)
        scales, _ = per_channel_symmetric(q.layer.weight.detach(), axis=0)
        q.weight_scale.copy_(scales)
        q.quantize_weight = True
        report.quantized_layers += 1
    return report
