"""int8 / uint8 scales (edgeq.export.scales): numpy float32 arithmetic, bit-identical to the torch
formulas it replaced (kept here as the reference) on many values."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from edgeq.export.calibrators import compute_range
from edgeq.export.scales import (
    INT8_QMAX,
    MIN_SCALE,
    UINT8_QMAX,
    asymmetric_uint8,
    per_channel_symmetric,
    symmetric_int8,
)
from edgeq.export.tensor_stats import TensorStats


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _stats(*batches) -> TensorStats:
    stats = TensorStats()
    for batch in batches:
        stats.update(batch)
    return stats


# ----------------------------------------------------------------------------- the torch formulas

_TORCH_EPS = float(torch.finfo(torch.float32).eps)


def _torch_symmetric_int8(amax: float) -> tuple[float, int]:
    scale = torch.clamp_min(torch.tensor(amax, dtype=torch.float32) / INT8_QMAX, _TORCH_EPS)
    return float(scale), 0


def _torch_asymmetric_uint8(lo: float, hi: float) -> tuple[float, int]:
    low = torch.tensor(min(lo, 0.0), dtype=torch.float32)
    high = torch.tensor(max(hi, 0.0), dtype=torch.float32)
    scale = torch.clamp_min((high - low) / UINT8_QMAX, _TORCH_EPS)
    return float(scale), int(torch.clamp(-torch.round(low / scale), 0, UINT8_QMAX))


def _torch_per_channel(weight: torch.Tensor, axis: int) -> torch.Tensor:
    axis = axis % weight.dim()
    channels = weight.detach().to(torch.float32).transpose(0, axis).reshape(weight.shape[axis], -1)
    return torch.clamp_min(channels.abs().amax(dim=1) / INT8_QMAX, _TORCH_EPS)


def _magnitudes(rng, n: int) -> np.ndarray:
    """Positive float64 values log-uniform over float32's whole range (subnormals included),
    plus values that round to float32 ties and the boundaries of the MIN_SCALE floor."""
    logs = rng.uniform(-46.0, 38.5, n)
    values = list(10.0**logs * rng.uniform(1.0, 1.0001, n))
    floor = INT8_QMAX * MIN_SCALE
    values += [0.0, floor, np.nextafter(floor, 0), np.nextafter(floor, 1), 1.0, 3.3, 127.0, 2.0**-149, 2.0**-126,
               float(np.finfo(np.float32).max), 3.4028235e38, 1.0 + 2.0**-24, 1.0 + 3 * 2.0**-25]
    return np.asarray(values)


# ----------------------------------------------------------------------------- against torch


def test_min_scale_is_torch_float32_eps():
    assert MIN_SCALE == _TORCH_EPS == 2.0**-23


def test_symmetric_int8_is_bit_identical_to_torch():
    rng = np.random.default_rng(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # overflow to inf must stay silent, as in torch
        for amax in _magnitudes(rng, 4000):
            assert symmetric_int8(float(amax)) == _torch_symmetric_int8(float(amax)), amax


def test_asymmetric_uint8_is_bit_identical_to_torch():
    rng = np.random.default_rng(1)
    magnitudes = _magnitudes(rng, 6000)
    lows = -rng.permutation(magnitudes) * rng.choice([1.0, 1.0, -1.0], magnitudes.size)  # some lo > 0
    highs = rng.permutation(magnitudes) * rng.choice([1.0, 1.0, -1.0], magnitudes.size)
    pairs = [(min(a, b), max(a, b)) for a, b in zip(lows, highs)]
    # zero points on exact .5 ties: scale 2**-m, lo = -(k + 0.5) * scale
    pairs += [(-(k + 0.5) * 2.0**-m, (254.5 - k) * 2.0**-m) for k in range(0, 255, 7) for m in (-3, 0, 5, 20)]
    pairs += [(0.0, 0.0), (-0.0, 0.0), (2.0, 2.0), (-3.0, -1.0), (-1.0, 3.0), (-3.4e38, 3.4e38)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for lo, hi in pairs:
            assert asymmetric_uint8(float(lo), float(hi)) == _torch_asymmetric_uint8(float(lo), float(hi)), (lo, hi)


@pytest.mark.parametrize("shape,axis", [((64, 32, 3, 3), 0), ((32, 64, 1, 1), 1), ((1000, 257), 0), ((7,), 0),
                                        ((3, 5, 2), -1)])
def test_per_channel_scales_are_bit_identical_to_torch(shape, axis):
    rng = np.random.default_rng(sum(shape))
    w = (rng.standard_normal(shape) * 10.0 ** rng.uniform(-40, 30, shape)).astype(np.float32)
    if w.ndim > 1:
        np.moveaxis(w, axis, 0)[0] = 0.0  # an all-zero channel gets MIN_SCALE
    expected = _torch_per_channel(torch.from_numpy(w), axis)
    scales, zeros = per_channel_symmetric(w, axis)
    assert scales.dtype == np.float32 and zeros.dtype == np.int32 and not zeros.any()
    np.testing.assert_array_equal(scales, expected.numpy())
    from_torch, zeros_torch = per_channel_symmetric(torch.from_numpy(w), axis)
    assert torch.equal(from_torch, expected) and zeros_torch.dtype == torch.int32
    assert torch.equal(per_channel_symmetric(torch.from_numpy(w).double(), axis)[0], expected)


# ----------------------------------------------------------------------------- behaviour


def test_uint8_scale_and_zero_point():
    relu6 = torch.cat([torch.tensor([0.0, 6.0]), (torch.randn(10_000, generator=_gen(10)) * 3).clamp(0, 6)])
    r = compute_range(_stats(relu6), "minmax", symmetric=False)
    scale, zero_point = asymmetric_uint8(r.lo, r.hi)
    assert zero_point == 0 and scale == float(torch.tensor(6.0) / 255)
    scale, zero_point = asymmetric_uint8(-1.0, 3.0)
    assert zero_point == 64 and scale == pytest.approx(4 / 255, rel=1e-6)
    assert asymmetric_uint8(0.5, 2.0) == asymmetric_uint8(0.0, 2.0)  # range extended to include 0
    assert asymmetric_uint8(-3.0, -1.0)[1] == 255


def test_symmetric_int8_scale_is_float32_amax_over_127():
    scale, zero_point = symmetric_int8(3.3)
    assert zero_point == 0 and scale == float(torch.tensor(3.3, dtype=torch.float32) / 127)
    assert symmetric_int8(0.0) == (MIN_SCALE, 0)


def test_per_channel_weight_scales():
    w = torch.randn(8, 4, 3, 3, generator=_gen(11)) * torch.arange(1, 9).view(8, 1, 1, 1)
    scales, zero_points = per_channel_symmetric(w)
    assert torch.equal(scales, w.abs().amax(dim=(1, 2, 3)) / 127)
    assert zero_points.tolist() == [0] * 8
    q = torch.fake_quantize_per_channel_affine(w, scales, zero_points, 0, -127, 127)
    assert bool(((q - w).abs() <= scales.view(8, 1, 1, 1) / 2 + 1e-7).all())
    scales_in, _ = per_channel_symmetric(w, axis=1)
    assert torch.equal(scales_in, w.abs().amax(dim=(0, 2, 3)) / 127)


def test_scales_reject_bad_ranges():
    with pytest.raises(ValueError):
        symmetric_int8(float("nan"))
    with pytest.raises(ValueError):
        symmetric_int8(-1.0)
    with pytest.raises(ValueError):
        asymmetric_uint8(1.0, 0.0)
    with pytest.raises(ValueError):
        per_channel_symmetric(np.float32(1.0))
