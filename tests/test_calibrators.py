"""Activation statistics, calibration methods and int8/uint8 scales (edgeq.export.calibrators)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from edgeq.errors import EdgeqError
from edgeq.export.calibrators import (
    METHODS,
    MIN_SCALE,
    Range,
    TensorStats,
    asymmetric_uint8,
    compute_range,
    per_channel_symmetric,
    symmetric_int8,
)


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


# ----------------------------------------------------------------------------- histograms


def test_histogram_equals_one_shot_when_range_is_fixed():
    g = _gen(2)
    first = torch.cat([torch.tensor([-3.0, 3.0]), torch.randn(10_000, generator=g)]).clamp(-3, 3)
    later = [torch.randn(4, 8, 32, generator=g).clamp(-3, 3) for _ in range(5)]
    stats = _stats(first)
    window = (stats.signed_hist.exponent, stats.signed_hist.origin, stats.abs_hist.exponent)
    for batch in later:
        stats.update(batch)
    assert (stats.signed_hist.exponent, stats.signed_hist.origin, stats.abs_hist.exponent) == window

    data = torch.cat([first, *(b.reshape(-1) for b in later)])
    one_shot = _stats(data)
    np.testing.assert_array_equal(stats.signed_hist.counts, one_shot.signed_hist.counts)
    np.testing.assert_array_equal(stats.abs_hist.counts, one_shot.abs_hist.counts)
    expected, _ = np.histogram(data.numpy(), bins=stats.signed_hist.edges())
    np.testing.assert_array_equal(stats.signed_hist.counts, expected)
    expected_abs, _ = np.histogram(data.abs().numpy(), bins=stats.abs_hist.edges())
    np.testing.assert_array_equal(stats.abs_hist.counts, expected_abs)
    assert stats.n_values == data.numel() == stats.signed_hist.total == stats.abs_hist.total


def test_range_growth_keeps_count_and_distribution():
    g = _gen(3)
    spreads = [(0.01, 0), (1, 0), (30, 5), (1, -200)]
    batches = [torch.randn(20_000, generator=g) * s + o for s, o in spreads]
    stats = _stats(*batches)
    data = torch.cat(batches).numpy().astype(np.float64)
    hist = stats.signed_hist
    assert hist.total == stats.n_values == data.size
    assert hist.width <= 2 * (data.max() - data.min()) / stats.bins  # resolution within 2x of ideal
    # Bins nest exactly when the range grows: the CDF at every edge is the data's CDF.
    cdf = np.concatenate([[0.0], np.cumsum(hist.counts)]) / data.size
    empirical = np.searchsorted(np.sort(data), hist.edges(), side="left") / data.size
    np.testing.assert_allclose(cdf, empirical, atol=1e-12)
    np.testing.assert_array_equal(hist.counts, _stats(torch.from_numpy(data).float()).signed_hist.counts)


def test_merge_equals_sequential_update():
    g = _gen(4)
    part_a = [torch.randn(3, 1000, generator=g) * 0.5 for _ in range(3)]
    part_b = [torch.rand(2000, generator=g) * 40 - 7, torch.zeros(10)]
    sequential = _stats(*part_a, *part_b)
    merged = _stats(*part_a).merge(_stats(*part_b))
    assert merged.to_state() == sequential.to_state()
    reverse = _stats(*part_b).merge(_stats(*part_a))
    assert reverse.to_state() == sequential.to_state()
    assert _stats(*part_a).merge(TensorStats()).to_state() == _stats(*part_a).to_state()
    with pytest.raises(EdgeqError, match="bins"):
        TensorStats(1024).merge(sequential)


def test_state_round_trip_through_json():
    stats = _stats(torch.randn(5000, generator=_gen(5)) * 2 + 1)
    restored = TensorStats.from_state(json.loads(json.dumps(stats.to_state())))
    assert restored.to_state() == stats.to_state()
    for method in METHODS:
        for symmetric in (True, False):
            expected = compute_range(stats, method, symmetric=symmetric)
            assert compute_range(restored, method, symmetric=symmetric) == expected
    empty = TensorStats.from_state(json.loads(json.dumps(TensorStats().to_state())))
    assert empty.n_values == 0
    broken = stats.to_state()
    broken["signed"]["counts"] = broken["signed"]["counts"][:10]
    with pytest.raises(EdgeqError, match="malformed"):
        TensorStats.from_state(broken)


def test_update_rejects_non_finite_values():
    with pytest.raises(EdgeqError, match="NaN"):
        TensorStats().update(torch.tensor([0.0, float("nan")]))


def test_update_cost_is_a_few_milliseconds():
    x = torch.randn(1, 16, 160, 160, generator=_gen(6))
    stats = TensorStats()
    start = time.perf_counter()
    for _ in range(50):
        stats.update(x)
    assert time.perf_counter() - start < 10.0  # ~1.5 ms each measured; loose for a busy machine
    assert stats.n_values == 50 * x.numel()


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


# ----------------------------------------------------------------------------- scales


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


def test_range_is_a_plain_value():
    r = Range(-1.0, 1.0, 1.0, "minmax")
    assert not r.degenerate and r == Range(-1.0, 1.0, 1.0, "minmax", False)


def test_per_channel_min_max_is_exact_merges_and_round_trips():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 5, 4, 4)).astype(np.float32), rng.normal(3, 2, size=(1, 5, 4, 4)).astype(np.float32)
    whole = TensorStats(channels=True)
    whole.update(torch.from_numpy(a))
    whole.update(torch.from_numpy(b))
    both = np.concatenate([a, b])
    lo, hi = whole.channel_range
    np.testing.assert_array_equal(lo, both.min(axis=(0, 2, 3)))
    np.testing.assert_array_equal(hi, both.max(axis=(0, 2, 3)))
    first, second = TensorStats(channels=True), TensorStats(channels=True)
    first.update(torch.from_numpy(a))
    second.update(torch.from_numpy(b))
    np.testing.assert_array_equal(first.merge(second).channel_range[1], hi)
    restored = TensorStats.from_state(json.loads(json.dumps(whole.to_state())))
    np.testing.assert_array_equal(restored.channel_range[0], lo)
    plain = TensorStats()
    plain.update(torch.from_numpy(a))
    assert plain.channel_range is None and "channel_min" not in plain.to_state()
    with pytest.raises(EdgeqError, match="channels"):
        whole.update(torch.zeros(2, 6, 4, 4))
