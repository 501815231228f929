"""int8 / uint8 quantization scales and zero points from calibrated ranges.

Scales (:func:`symmetric_int8`, :func:`asymmetric_uint8`, :func:`per_channel_symmetric`) are
computed in float32 the way PyTorch's observers compute them, so a fake-quant graph built in
PyTorch and the exported Q/DQ nodes use the same float32 scales. The arithmetic is numpy
float32 (IEEE division, round-half-to-even), which gives bit-identical results to the torch
formulas it replaced (the tests compare both on many values); torch is not needed.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# PyTorch observers' floor on a scale (``torch.finfo(torch.float32).eps``, 2**-23): a zero scale
# would divide by zero in QuantizeLinear, and ONNX and TensorRT both require scale > 0.
MIN_SCALE = float(np.finfo(np.float32).eps)

# int8 weights and symmetric activations use the restricted range [-127, 127]; uint8
# activations the full [0, 255].
INT8_QMAX = 127
UINT8_QMAX = 255

_MIN_SCALE32 = np.float32(MIN_SCALE)


def symmetric_int8(amax: float) -> tuple[float, int]:
    """(scale, 0) for int8 with the restricted range [-127, 127]: scale = amax / 127 in float32.

    Same arithmetic as PyTorch's symmetric observers (``amax / ((qmax - qmin) / 2)`` in float32,
    floored at ``MIN_SCALE``). Use quant_min=-127 (or -128 for activations, which TensorRT
    clamps the same way) with this scale.
    """
    if not math.isfinite(amax) or amax < 0:
        raise ValueError(f"amax must be finite and >= 0, got {amax}")
    with np.errstate(over="ignore"):  # amax beyond float32 becomes inf, as torch.tensor() makes it
        scale = np.maximum(np.float32(amax) / np.float32(INT8_QMAX), _MIN_SCALE32)
    return float(scale), 0


def asymmetric_uint8(lo: float, hi: float) -> tuple[float, int]:
    """(scale, zero_point) for uint8 [0, 255] over ``[lo, hi]`` extended to contain 0.

    0 must be exactly representable (it is ``zero_point``): ONNX pads with the zero point and
    ReLU outputs are mostly exact zeros. scale = (hi - lo) / 255 and
    zero_point = clamp(-round(lo / scale), 0, 255), in float32 as PyTorch's observers do.
    """
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi < lo:
        raise ValueError(f"need finite lo <= hi, got [{lo}, {hi}]")
    with np.errstate(over="ignore", invalid="ignore"):  # float32 overflow -> inf, as in torch
        low, high = np.float32(min(lo, 0.0)), np.float32(max(hi, 0.0))
        scale = np.maximum((high - low) / np.float32(UINT8_QMAX), _MIN_SCALE32)
        zero_point = int(np.clip(-np.round(low / scale), 0, UINT8_QMAX))
    return float(scale), zero_point


def per_channel_symmetric(weight: Any, axis: int = 0) -> tuple[Any, Any]:
    """Per-output-channel int8 weight scales: max|w| over the channel / 127, zero points 0.

    The restricted range [-127, 127] (not -128) is what TensorRT requires for weights: the
    grid is then symmetric, so q(-w) = -q(w), and -128 * scale would lie outside
    [-amax, amax] and break that symmetry. ``weight`` is a numpy array (or anything
    array-like): returns (float32 scales, int32 zeros) as numpy arrays. A torch tensor gets
    torch tensors back (scales on its device, zeros on the CPU), the dtypes
    ``torch.fake_quantize_per_channel_affine`` takes; only then is torch imported.
    """
    is_torch = hasattr(weight, "detach") and hasattr(weight, "numpy")
    w = weight.detach().cpu().float().numpy() if is_torch else np.asarray(weight, dtype=np.float32)
    if w.ndim == 0:
        raise ValueError("per-channel scales need a weight with at least one dimension")
    axis = axis % w.ndim
    channels = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    amax = np.abs(channels).max(axis=1)
    scales = np.maximum(amax / np.float32(INT8_QMAX), _MIN_SCALE32)
    zeros = np.zeros(w.shape[axis], dtype=np.int32)
    if not is_torch:
        return scales, zeros
    import torch

    return torch.from_numpy(scales).to(weight.device), torch.from_numpy(zeros)
