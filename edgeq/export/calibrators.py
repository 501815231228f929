"""Calibration methods: from a tensor's statistics to the int8 / uint8 range it is quantized to.

Each method reads the statistics a :class:`~edgeq.export.tensor_stats.TensorStats` kept (exact
min/max and two histograms on the power-of-two lattice of :mod:`edgeq.export.lattice`) and
returns a range; :mod:`edgeq.export.scales` turns a range into a scale and zero point. Because
the histograms are stored, an export can switch method without seeing the images again.

Methods (:data:`METHODS`, dispatched by :func:`compute_range`)
    ``minmax``      the exact running min/max;
    ``percentile``  the p-th percentile of |x| (symmetric) or the (100-p, p) percentiles of x;
    ``entropy``     TensorRT's KL-divergence threshold search (IInt8EntropyCalibrator2);
    ``mse``         the range minimizing the expected squared quantization error.

Inside a histogram bin the methods assume values are spread uniformly. numpy only, no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.export.scales import INT8_QMAX, MIN_SCALE, UINT8_QMAX
from edgeq.export.tensor_stats import Histogram, TensorStats, no_statistics_error

METHODS = ("minmax", "percentile", "entropy", "mse")


# --------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Range:
    """A calibrated range. Symmetric ranges have ``lo = -amax``, ``hi = amax``.

    ``degenerate``: the tensor was constant (all values equal) or the method found no extent;
    the caller should warn. An empty range is bumped to the smallest usable one, whose scale
    is ``MIN_SCALE``; a constant non-zero tensor keeps its range (0 is added for uint8).
    """

    lo: float
    hi: float
    amax: float
    method: str
    degenerate: bool = False


def minmax_range(stats: TensorStats, *, symmetric: bool) -> tuple[float, float]:
    """Exact running (min, max); symmetric: (-amax, amax) with amax = max(|min|, |max|)."""
    if symmetric:
        return -stats.amax, stats.amax
    return stats.min, stats.max


def histogram_quantile(hist: Histogram, q: float) -> float:
    """Value below which a fraction ``q`` of the counts lie.

    Inverts the histogram's CDF, linear inside a bin (values assumed uniform in their bin), so
    it is within one bin width of the sample quantile.
    """
    cumulative = np.cumsum(hist.counts)
    target = q * float(cumulative[-1])
    k = min(int(np.searchsorted(cumulative, target, side="left")), hist.counts.size - 1)
    below = float(cumulative[k - 1]) if k else 0.0
    inside = float(hist.counts[k])
    fraction = min(max((target - below) / inside, 0.0), 1.0) if inside else 0.0
    return (hist.origin + k + fraction) * hist.width


def percentile_range(
    stats: TensorStats, percentile: float = 99.99, *, symmetric: bool
) -> tuple[float, float]:
    """Clip the ``100 - percentile`` percent most extreme values.

    Symmetric: amax is the p-th percentile of |x|. Asymmetric: (lo, hi) are the (100-p)-th and
    p-th percentiles of x, i.e. each tail loses ``100 - p`` percent.
    """
    q = percentile / 100.0
    if symmetric:
        amax = min(histogram_quantile(stats.abs_hist, q), stats.amax)
        return -amax, amax
    lo = _clamp(histogram_quantile(stats.signed_hist, 1.0 - q), stats.min, stats.max)
    hi = _clamp(histogram_quantile(stats.signed_hist, q), lo, stats.max)
    return lo, hi


def _clamp(value: float, lo: float, hi: float) -> float:
    return min(max(value, lo), hi)


def _kl_divergence(counts: np.ndarray, tail: float, levels: int, eps: float) -> float:
    """KL(P || Q) for one threshold: P keeps ``counts`` with the clipped ``tail`` in its last bin,
    Q is ``counts`` merged into ``levels`` levels and expanded back.

    Source bin j belongs to level ``floor(j * levels / i)`` (levels differ by at most one bin).
    Expansion spreads a level's count evenly over the bins where P is non-zero, so Q keeps
    P's support and only loses resolution. KL = sum over P > 0 of p * ln(p / q); bins where
    Q is empty but P is not (all of a level's mass was clipped) get probability ``eps``
    before renormalizing, a finite but heavy penalty.
    """
    i = counts.size
    p = counts.copy()
    p[-1] += tail
    support = p > 0
    level = (np.arange(i) * levels) // i
    merged = np.bincount(level, weights=counts, minlength=levels)
    share = np.bincount(level, weights=support, minlength=levels)
    q = np.where(support, merged[level] / np.maximum(share[level], 1.0), 0.0)
    if q.sum() <= 0:
        return math.inf
    p, q = p[support] / p.sum(), q[support] / q.sum()
    q = np.where(q > 0, q, eps)
    q /= q.sum()
    return float(np.sum(p * np.log(p / q)))


def entropy_amax(hist: Histogram, *, levels: int = 128, stride: int = 1, eps: float = 1e-4) -> float:
    """amax minimizing the KL divergence between |x| and its int8 version (TensorRT entropy).

    For each candidate i in ``levels, levels + stride, ...`` up to the last non-empty bin
    (included), the reference P is the first i bins of the |x| histogram with everything
    beyond added to bin i-1, and Q the same bins quantized to ``levels`` levels
    (:func:`_kl_divergence`). The threshold of the best i is ``(i + 0.5) * width``, as TensorRT
    puts it; callers cap it at max|x|. With no more bins than levels nothing is gained by
    clipping and the end of the histogram is returned.
    """
    used = hist.used
    if used <= levels:
        return used * hist.width
    counts = hist.counts[:used].astype(np.float64)
    suffix = np.concatenate([np.cumsum(counts[::-1])[::-1], [0.0]])  # suffix[i] = sum(counts[i:])
    candidates = list(range(levels, used, max(int(stride), 1))) + [used]
    divergence = [_kl_divergence(counts[:i], suffix[i], levels, eps) for i in candidates]
    best = candidates[int(np.argmin(divergence))]
    return (best + 0.5) * hist.width


def entropy_range(
    stats: TensorStats, *, symmetric: bool, levels: int = 128, stride: int = 1
) -> tuple[float, float]:
    """TensorRT-style entropy threshold. It is defined on |x| only; the asymmetric variant clips
    the data range to ``[-amax, amax]`` (one-sided tensors keep their empty side at 0)."""
    amax = min(entropy_amax(stats.abs_hist, levels=levels, stride=stride), stats.amax)
    if symmetric:
        return -amax, amax
    return max(stats.min, -amax), min(stats.max, amax)


class _Moments:
    """Prefix sums over a histogram's bins, to sum error terms over any bin range in O(1).

    ``m2`` is E[x^2] of a bin with values uniform in it: ``center^2 + width^2 / 12``.
    """

    def __init__(self, hist: Histogram, used: int):
        counts = hist.counts[:used].astype(np.float64)
        self.centers = hist.centers()[:used]
        m2 = self.centers**2 + hist.width**2 / 12.0
        zero = np.zeros(1)
        self.n = np.concatenate([zero, np.cumsum(counts)])
        self.s1 = np.concatenate([zero, np.cumsum(counts * self.centers)])
        self.s2 = np.concatenate([zero, np.cumsum(counts * m2)])

    def between(self, prefix: np.ndarray, start: np.ndarray, stop: np.ndarray) -> np.ndarray:
        return prefix[stop] - prefix[start]

    def expected_error(self, lo: np.ndarray, hi: np.ndarray, step: np.ndarray) -> np.ndarray:
        """Sum over bins of count * expected squared error of quantizing to ``[lo, hi]`` (lo <= 0 <= hi).

        Clipped bins (center beyond lo/hi) cost ``E[(x - clip)^2]``. Bins that round to zero
        (|center| < step / 2) cost ``E[x^2]`` exactly: zero is on the grid, and post-ReLU
        tensors are half exact zeros that the noise model would overcount. Other bins cost
        the uniform rounding noise ``step^2 / 12``.
        """
        c, last = self.centers, self.n.size - 1
        below = np.searchsorted(c, lo, side="left")  # bins [0, below) clip to lo
        above = np.searchsorted(c, hi, side="right")  # bins [above, last) clip to hi
        z0 = np.maximum(np.searchsorted(c, -step / 2, side="right"), below)
        z1 = np.maximum(np.minimum(np.searchsorted(c, step / 2, side="left"), above), z0)
        first = np.zeros_like(below)
        ends = np.full_like(above, last)
        low = (
            self.between(self.s2, first, below)
            - 2 * lo * self.between(self.s1, first, below)
            + lo**2 * self.between(self.n, first, below)
        )
        high = (
            self.between(self.s2, above, ends)
            - 2 * hi * self.between(self.s1, above, ends)
            + hi**2 * self.between(self.n, above, ends)
        )
        rounded_to_zero = self.between(self.s2, z0, z1)
        noisy = self.between(self.n, below, above) - self.between(self.n, z0, z1)
        return low + high + rounded_to_zero + noisy * step**2 / 12.0


def mse_amax(hist: Histogram, limit: float, *, qmax: int = INT8_QMAX) -> float:
    """amax of a symmetric int8 quantizer (step ``amax / qmax``) minimizing the expected error.

    Candidates are every bin edge of the |x| histogram below ``limit`` (max|x|) plus ``limit``
    itself: one-bin resolution, evaluated in O(bins log bins) with prefix sums
    (:meth:`_Moments.expected_error`).
    """
    used = hist.used
    if used == 0 or limit <= 0:
        return 0.0
    edges = hist.edges()[1 : used + 1]
    candidates = np.append(edges[edges < limit], limit)
    error = _Moments(hist, used).expected_error(-candidates, candidates, candidates / qmax)
    return float(candidates[int(np.argmin(error))])


def mse_lo_hi(
    hist: Histogram, lo: float, hi: float, *, qmax: int = UINT8_QMAX, candidates: int = 128
) -> tuple[float, float]:
    """(lo, hi) of an asymmetric uint8 quantizer (step ``(hi - lo) / qmax``) minimizing the
    expected error.

    The quantizer's range always contains 0, so both ends shrink toward 0 independently:
    ``lo * f`` and ``hi * g`` for f, g on a grid of ``candidates`` fractions in (0, 1]; all
    ``candidates**2`` pairs are scored.
    """
    used = hist.used
    low, high = min(lo, 0.0), max(hi, 0.0)
    if used == 0 or high - low <= 0:
        return lo, hi
    fractions = np.arange(1, candidates + 1, dtype=np.float64) / candidates
    los, his = np.meshgrid(low * fractions, high * fractions, indexing="ij")
    los, his = los.ravel(), his.ravel()
    error = _Moments(hist, used).expected_error(los, his, (his - los) / qmax)
    best = int(np.argmin(error))
    return max(float(los[best]), lo), min(float(his[best]), hi)


def mse_range(stats: TensorStats, *, symmetric: bool) -> tuple[float, float]:
    """Range minimizing the expected squared quantization error (clipping + rounding)."""
    if symmetric:
        amax = mse_amax(stats.abs_hist, stats.amax)
        return -amax, amax
    return mse_lo_hi(stats.signed_hist, stats.min, stats.max)


_METHOD_FUNCTIONS: dict[str, Callable[..., tuple[float, float]]] = {
    "minmax": minmax_range,
    "percentile": percentile_range,
    "entropy": entropy_range,
    "mse": mse_range,
}


def compute_range(stats: TensorStats, method: str, *, symmetric: bool, percentile: float = 99.99) -> Range:
    """The range one calibration method gives a tensor (symmetric: int8 amax; else uint8 lo/hi)."""
    if method not in METHODS:
        raise EdgeqError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    if not 0.0 < percentile <= 100.0:
        raise EdgeqError(f"percentile must be in (0, 100], got {percentile}")
    if stats.n_values == 0:
        raise no_statistics_error()
    if method == "percentile":
        lo, hi = percentile_range(stats, percentile, symmetric=symmetric)
    else:
        lo, hi = _METHOD_FUNCTIONS[method](stats, symmetric=symmetric)
    return _usable_range(lo, hi, method, symmetric=symmetric, constant=stats.is_degenerate)


def _usable_range(lo: float, hi: float, method: str, *, symmetric: bool, constant: bool) -> Range:
    """Bump an empty range to the smallest one whose scale is ``MIN_SCALE`` and flag it."""
    degenerate = constant
    if symmetric:
        amax = max(abs(lo), abs(hi))
        if amax < INT8_QMAX * MIN_SCALE:
            amax, degenerate = INT8_QMAX * MIN_SCALE, True
        return Range(-amax, amax, amax, method, degenerate)
    if hi - lo < UINT8_QMAX * MIN_SCALE:
        lo, hi = min(lo, 0.0), max(hi, 0.0)  # the quantizer includes 0 anyway
        if hi - lo < UINT8_QMAX * MIN_SCALE:
            hi = lo + UINT8_QMAX * MIN_SCALE
        degenerate = True
    return Range(lo, hi, max(abs(lo), abs(hi)), method, degenerate)
