"""Layer table, parameter count and FLOPs of a detector (what ``edgeq info`` prints)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ModelSummary:
    layers: list[dict]
    parameters: int
    gflops: float
    imgsz: int
    stride: list[float]
    nc: int

    def to_dict(self) -> dict:
        return {
            "parameters": self.parameters,
            "gflops": round(self.gflops, 3),
            "imgsz": self.imgsz,
            "stride": self.stride,
            "nc": self.nc,
            "layers": self.layers,
        }


def count_gflops(model: nn.Module, imgsz: int, ch: int = 3) -> float:
    """GFLOPs of one forward pass at ``imgsz`` (2 x multiply-accumulates, as YOLOv5 reports)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, ch, imgsz, imgsz))
    model.train(was_training)
    return counter.get_total_flops() / 1e9


def summarize(model: nn.Module, imgsz: int = 640) -> ModelSummary:
    """Summarize a DetectionModel: one row per yaml layer."""
    rows = []
    for m in model.model:
        rows.append(
            {
                "index": m.i,
                "from": m.f,
                "n": getattr(m, "n_repeat", 1),
                "params": sum(p.numel() for p in m.parameters()),
                "module": m.type,
                "class": type(m).__name__,
            }
        )
    return ModelSummary(
        layers=rows,
        parameters=sum(p.numel() for p in model.parameters()),
        gflops=count_gflops(model, imgsz),
        imgsz=imgsz,
        stride=[float(s) for s in model.stride],
        nc=model.nc,
    )


def format_summary(summary: ModelSummary, title: str = "") -> str:
    lines = [f"{'':>3}  {'from':>12}  {'n':>2}  {'params':>10}  module"]
    for r in summary.layers:
        lines.append(f"{r['index']:>3}  {str(r['from']):>12}  {r['n']:>2}  {r['params']:>10,}  {r['module']}")
    lines.append(
        f"{title + ': ' if title else ''}{len(summary.layers)} layers, {summary.parameters:,} parameters, "
        f"{summary.gflops:.2f} GFLOPs at {summary.imgsz}x{summary.imgsz}, {summary.nc} classes, "
        f"strides {', '.join(f'{s:g}' for s in summary.stride)}"
    )
    return "\n".join(lines)
