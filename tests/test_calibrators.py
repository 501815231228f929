"""Calibration methods (edgeq.export.calibrators): ranges from activation statistics.

The statistics themselves are tested in test_tensor_stats.py, the scales in test_scales.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeq.errors import EdgeqError
from edgeq.export.calibrators import METHODS, Range, compute_range
from edgeq.export.scales import MIN_SCALE, asymmetric_uint8, symmetric_int8
from edgeq.export.tensor_stats import TensorStats


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _stats(*batches: torch.Tensor, bins: int = 2048) -> TensorStats:
    stats = TensorStats(bins)
    for batch in batches:
        stats.update(batch)
    return stats


@pytest.fixture(scope="module")
def gaussian() -> torch.Tensor:
    return torch.randn(1_000_000, generator=_gen(1))


@pytest.fixture(scope="module")
def gaussian_outliers(gaussian) -> torch.Tensor:
    return torch.cat([gaussian, torch.full((10,), 100.0)])


def _symmetric_qdq_mse(x: torch.Tensor, amax: float) -> float:
    scale, zero_point = symmetric_int8(amax)
    y = torch.fake_quantize_per_tensor_affine(x, scale, zero_point, -127, 127)
    return float(((y - x) ** 2).mean())


def _uint8_qdq_mse(x: torch.Tensor, lo: float, hi: float) -> float:
    scale, zero_point = asymmetric_uint8(lo, hi)
    y = torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 255)
    return float(((y - x) ** 2).mean())


# ----------------------------------------------------------------------------- methods


def test_minmax_is_exact():
    x = torch.randn(7, 33, generator=_gen(7)) * 3 - 1
    stats = _stats(x)
    asym = compute_range(stats, "minmax", symmetric=False)
    sym = compute_range(stats, "minmax", symmetric=True)
    assert (asym.lo, asym.hi) == (float(x.min()), float(x.max()))
    assert sym.amax == float(x.abs().max()) and (sym.lo, sym.hi) == (-sym.amax, sym.amax)


@pytest.mark.parametrize("p", [99.0, 99.9, 99.99])
def test_percentile_matches_numpy(gaussian, p):
    stats = _stats(gaussian)
    data = gaussian.numpy().astype(np.float64)
    sym = compute_range(stats, "percentile", symmetric=True, percentile=p)
    assert abs(sym.amax - np.percentile(np.abs(data), p)) <= stats.abs_hist.width
    asym = compute_range(stats, "percentile", symmetric=False, percentile=p)
    width = stats.signed_hist.width
    assert abs(asym.lo - np.percentile(data, 100 - p)) <= width
    assert abs(asym.hi - np.percentile(data, p)) <= width


def test_entropy_clips_gaussian_tails_and_keeps_uniform_range(gaussian):
    amax = compute_range(_stats(gaussian), "entropy", symmetric=True).amax
    assert 2.5 <= amax <= 5.0
    uniform = torch.rand(1_000_000, generator=_gen(8)) * 2 - 1
    assert compute_range(_stats(uniform), "entropy", symmetric=True).amax >= 0.9


def test_entropy_and_mse_clip_outliers(gaussian_outliers):
    stats = _stats(gaussian_outliers)
    minmax = compute_range(stats, "minmax", symmetric=True).amax
    entropy = compute_range(stats, "entropy", symmetric=True).amax
    mse = compute_range(stats, "mse", symmetric=True).amax
    assert entropy < minmax and mse < minmax
    assert _symmetric_qdq_mse(gaussian_outliers, mse) < _symmetric_qdq_mse(gaussian_outliers, minmax)


def test_asymmetric_mse_beats_minmax_on_skewed_data(gaussian_outliers):
    stats = _stats(gaussian_outliers)
    mse = compute_range(stats, "mse", symmetric=False)
    minmax = compute_range(stats, "minmax", symmetric=False)
    assert stats.min <= mse.lo <= 0 <= mse.hi <= stats.max
    measured = _uint8_qdq_mse(gaussian_outliers, mse.lo, mse.hi)
    assert measured < _uint8_qdq_mse(gaussian_outliers, minmax.lo, minmax.hi)


def test_mse_keeps_gaussian_near_four_sigma(gaussian):
    amax = compute_range(_stats(gaussian), "mse", symmetric=True).amax
    assert 3.0 <= amax <= 4.8
    assert _symmetric_qdq_mse(gaussian, amax) <= _symmetric_qdq_mse(gaussian, float(gaussian.abs().max()))


def test_compute_range_rejects_unknown_method_and_empty_stats():
    stats = _stats(torch.randn(100, generator=_gen(9)))
    with pytest.raises(EdgeqError) as err:
        compute_range(stats, "kl", symmetric=True)
    assert all(name in str(err.value) for name in METHODS)
    with pytest.raises(EdgeqError, match="percentile"):
        compute_range(stats, "percentile", symmetric=True, percentile=0)
    with pytest.raises(EdgeqError, match="no activation statistics"):
        compute_range(TensorStats(), "minmax", symmetric=True)


@pytest.mark.parametrize("method", METHODS)
def test_constant_tensor_is_degenerate(method):
    zeros = _stats(torch.zeros(1, 16, 20, 20))
    assert zeros.is_degenerate
    sym = compute_range(zeros, method, symmetric=True)
    asym = compute_range(zeros, method, symmetric=False)
    assert sym.degenerate and asym.degenerate
    assert symmetric_int8(sym.amax)[0] >= MIN_SCALE and sym.amax > 0
    assert asymmetric_uint8(asym.lo, asym.hi)[0] >= MIN_SCALE and asym.hi > asym.lo
    half = compute_range(_stats(torch.full((50,), 0.5)), method, symmetric=False)
    assert half.degenerate and (half.lo, half.hi) == (0.0, 0.5)
    assert not compute_range(_stats(torch.tensor([0.0, 1.0])), method, symmetric=True).degenerate


def test_range_is_a_plain_value():
    r = Range(-1.0, 1.0, 1.0, "minmax")
    assert not r.degenerate and r == Range(-1.0, 1.0, 1.0, "minmax", False)
