"""Activation statistics and the calibration methods that turn them into int8 ranges.

edgeq quantizes once in PyTorch: an observer per activation tensor feeds every calibration
batch to a :class:`TensorStats`, and each backend's Q/DQ graph is derived from the same
statistics. TensorRT wants symmetric int8 (zero point 0, one ``amax``), ONNX Runtime on x86
wants asymmetric uint8 activations (``lo``/``hi``), so a :class:`TensorStats` keeps both an
absolute-value histogram and a signed one. Activations are never stored: memory per tensor is
two arrays of ``bins`` counts, whatever the number of images.

Histogram lattice
    Bin ``k`` of a histogram with exponent ``e`` is ``[k * 2**e, (k + 1) * 2**e)`` on one global
    lattice; a histogram is the window of ``bins`` consecutive lattice bins starting at
    ``origin``. ``e`` is the smallest exponent whose window holds ``[min, max]`` of everything
    seen (for the absolute histogram ``[0, max|x|]``, so its origin is always 0). When a later
    batch widens the range, ``e`` grows by ``j`` and each ``2**j`` old bins fall exactly into
    one new bin: re-binning only adds integer counts, it never splits a bin. Binning itself is
    exact too, since ``x * 2**-e`` is exact in float32 (subnormals aside). So the counts are a
    function of the data alone: sequential updates, :meth:`TensorStats.merge` and one update
    with everything give identical histograms.

    The approximation is resolution, as for any fixed-size histogram: the data fills between
    ``bins / 2`` and ``bins`` bins (the width is a power of two, not exactly ``span / bins``),
    and values seen before the range grew are only known to the coarser final bin width.
    Inside a bin the methods assume values are spread uniformly.

Methods (:data:`METHODS`, dispatched by :func:`compute_range`)
    ``minmax``      the exact running min/max;
    ``percentile``  the p-th percentile of |x| (symmetric) or the (100-p, p) percentiles of x;
    ``entropy``     TensorRT's KL-divergence threshold search (IInt8EntropyCalibrator2);
    ``mse``         the range minimizing the expected squared quantization error.

Scales (:func:`symmetric_int8`, :func:`asymmetric_uint8`, :func:`per_channel_symmetric`) are
computed in float32 the way PyTorch's observers compute them, so the fake-quant graph built
in PyTorch and the exported Q/DQ nodes use the same float32 scales.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from edgeq.errors import EdgeqError

METHODS = ("minmax", "percentile", "entropy", "mse")

DEFAULT_BINS = 2048

# PyTorch observers' floor on a scale (``torch.finfo(torch.float32).eps``): a zero scale would
# divide by zero in QuantizeLinear, and ONNX and TensorRT both require scale > 0.
MIN_SCALE = float(torch.finfo(torch.float32).eps)

# int8 weights and symmetric activations use the restricted range [-127, 127]; uint8
# activations the full [0, 255].
INT8_QMAX = 127
UINT8_QMAX = 255

_STATE_VERSION = 1
# Exponents kept inside float32's normal range, so 2**-e is an exact float32 multiplier.
_MIN_EXP = -126
_MAX_EXP = 126
# Elements binned per pass (cache-sized; also bounds temporaries for very large batches).
_CHUNK = 1 << 16


# --------------------------------------------------------------------------- histograms


@dataclass
class Histogram:
    """``bins`` counts on the power-of-two lattice: bin i is ``[(origin+i)*w, (origin+i+1)*w)``."""

    counts: np.ndarray  # int64, shape (bins,)
    exponent: int  # bin width w = 2**exponent
    origin: int  # lattice index of counts[0]

    @property
    def width(self) -> float:
        return math.ldexp(1.0, self.exponent)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    @property
    def used(self) -> int:
        """Bins up to and including the last non-empty one (trailing empty bins carry nothing)."""
        nonzero = np.flatnonzero(self.counts)
        return int(nonzero[-1]) + 1 if nonzero.size else 0

    def edges(self) -> np.ndarray:
        """The ``bins + 1`` bin edges (exact in float64: integers times a power of two)."""
        return (self.origin + np.arange(self.counts.size + 1, dtype=np.float64)) * self.width

    def centers(self) -> np.ndarray:
        return (self.origin + 0.5 + np.arange(self.counts.size, dtype=np.float64)) * self.width


def _fits(lo: float, hi: float, exponent: int, bins: int) -> bool:
    width = math.ldexp(1.0, exponent)
    return math.floor(hi / width) - math.floor(lo / width) + 1 <= bins


def _fit_exponent(lo: float, hi: float, bins: int) -> int:
    """Smallest exponent whose window of ``bins`` lattice bins holds ``[lo, hi]``.

    Bins narrower than a float32 ulp of the data cannot separate values, so the search starts
    no lower than ``ulp(max(|lo|, |hi|))``; that also gives constant data a definite width.
    Because fitting is monotone in the exponent and the floor only grows with the range, the
    result depends on ``[lo, hi]`` alone, which is what makes merges exact.
    """
    magnitude = max(abs(lo), abs(hi))
    exponent = math.frexp(magnitude)[1] - 24 if magnitude > 0 else _MIN_EXP
    span = hi - lo
    if span > 0:
        exponent = max(exponent, math.frexp(span / bins)[1] - 1)  # floor(log2(span / bins))
    exponent = min(max(exponent, _MIN_EXP), _MAX_EXP)
    while exponent < _MAX_EXP and not _fits(lo, hi, exponent, bins):
        exponent += 1
    return exponent


def _window(lo: float, hi: float, bins: int) -> tuple[int, int]:
    exponent = _fit_exponent(lo, hi, bins)
    return exponent, math.floor(lo / math.ldexp(1.0, exponent))


def _rebin(hist: Histogram | None, exponent: int, origin: int, bins: int) -> Histogram:
    """Move counts to a wider (or shifted) window; exact, since old bins nest in new ones."""
    if hist is None:
        return Histogram(np.zeros(bins, dtype=np.int64), exponent, origin)
    if (hist.exponent, hist.origin) == (exponent, origin):
        return hist
    shift = exponent - hist.exponent
    if shift < 0:
        raise ValueError(f"histograms only widen (exponent {hist.exponent} -> {exponent})")
    nonzero = np.flatnonzero(hist.counts)
    lattice = hist.origin + nonzero.astype(np.int64)
    # An arithmetic right shift is floor division by 2**shift, negatives included.
    coarse = lattice >> shift if shift < 63 else np.where(lattice < 0, -1, 0)
    counts = np.zeros(bins, dtype=np.int64)
    np.add.at(counts, coarse - origin, hist.counts[nonzero])
    return Histogram(counts, exponent, origin)


def _bin_counts(flat: np.ndarray, hist: Histogram, *, absolute: bool) -> np.ndarray:
    """Counts of ``flat`` (or ``|flat|``) per bin of ``hist``'s window, by bincount.

    ``floor(x * 2**-e)`` is the exact lattice index; the origin is subtracted after the floor
    so that no rounding can move a value across a bin edge. numpy, not torch: these ops are
    memory-bound and single-threaded is fastest for activation-sized arrays; torch's intra-op
    threads made the same update 10-80x slower on a busy 2-core machine (OpenMP threads
    waiting on each other), while numpy costs ~1.5 ms per histogram of 16x160x160 values.
    Chunks of ``_CHUNK`` keep temporaries in cache and bounded for huge batches.
    """
    bins = hist.counts.size
    scale = np.float32(math.ldexp(1.0, -hist.exponent))
    origin = np.float32(hist.origin)
    total = np.zeros(bins, dtype=np.int64)
    for start in range(0, flat.size, _CHUNK):
        index = np.multiply(flat[start : start + _CHUNK], scale)
        if absolute:
            np.abs(index, out=index)
        np.floor(index, out=index)
        if hist.origin:
            np.subtract(index, origin, out=index)
        counts = np.bincount(index.astype(np.intp), minlength=bins)
        if counts.size > bins:  # only float32 subnormals flushed to -0 can land here
            counts[bins - 1] += counts[bins:].sum()
        total += counts[:bins]
    return total


# --------------------------------------------------------------------------- statistics


class TensorStats:
    """Running statistics of one activation tensor over calibration batches.

    Keeps the exact min, max and count, a histogram of |x| (symmetric methods) and one of x
    (asymmetric methods); see the module docstring for the lattice that keeps them exact
    under range growth and merges.
    """

    def __init__(self, bins: int = DEFAULT_BINS, *, channels: bool = False):
        if bins < 256:
            raise ValueError(f"TensorStats needs at least 256 bins (entropy uses 128 levels), got {bins}")
        self.bins = int(bins)
        self._count = 0
        self._min = math.inf
        self._max = -math.inf
        self._abs: Histogram | None = None
        self._signed: Histogram | None = None
        # per-channel (axis 1) min and max, kept for the head convolutions' outputs, whose
        # channels (box offsets, sizes, objectness, class logits) span very different ranges
        self.track_channels = bool(channels)
        self._channel_min: np.ndarray | None = None
        self._channel_max: np.ndarray | None = None

    # -- accumulate

    def update(self, x: torch.Tensor) -> None:
        """Add every element of ``x`` (any shape; computed on CPU in float32)."""
        values = torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float32).numpy()
        flat = values.reshape(-1)
        if flat.size == 0:
            return
        lo, hi = float(flat.min()), float(flat.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise EdgeqError(
                "an observed activation contains NaN or infinite values; it cannot be calibrated",
                note="check the calibration images and the float model's output on them",
            )
        if self.track_channels:
            self._update_channels(values)
        self._count += flat.size
        self._min, self._max = min(self._min, lo), max(self._max, hi)
        self._abs = self._widened(self._abs, 0.0, self.amax)
        self._abs.counts += _bin_counts(flat, self._abs, absolute=True)
        self._signed = self._widened(self._signed, self._min, self._max)
        self._signed.counts += _bin_counts(flat, self._signed, absolute=False)

    def merge(self, other: TensorStats) -> TensorStats:
        """Fold ``other`` into this one (e.g. statistics from several workers); returns self.

        Gives the same counts as feeding ``other``'s batches to :meth:`update`.
        """
        if other.bins != self.bins:
            raise EdgeqError(f"cannot merge statistics with {other.bins} bins into {self.bins} bins")
        if other.n_values == 0:
            return self
        if self.track_channels and other._channel_min is not None:
            self._merge_channels(other._channel_min, other._channel_max)
        self._count += other._count
        self._min, self._max = min(self._min, other._min), max(self._max, other._max)
        self._abs = self._combined(self._abs, other._abs, 0.0, self.amax)
        self._signed = self._combined(self._signed, other._signed, self._min, self._max)
        return self

    def _update_channels(self, x: np.ndarray) -> None:
        if x.ndim < 2:
            raise EdgeqError(f"per-channel statistics need a tensor with a channel axis, got shape {x.shape}")
        axes = tuple(i for i in range(x.ndim) if i != 1)
        self._merge_channels(x.min(axis=axes), x.max(axis=axes))

    def _merge_channels(self, lo: np.ndarray, hi: np.ndarray) -> None:
        if self._channel_min is None:
            self._channel_min, self._channel_max = lo.astype(np.float64), hi.astype(np.float64)
            return
        if lo.shape != self._channel_min.shape:
            raise EdgeqError(f"per-channel statistics: {lo.shape[0]} channels, {self._channel_min.shape[0]} before")
        self._channel_min = np.minimum(self._channel_min, lo)
        self._channel_max = np.maximum(self._channel_max, hi)

    def _widened(self, hist: Histogram | None, lo: float, hi: float) -> Histogram:
        exponent, origin = _window(lo, hi, self.bins)
        return _rebin(hist, exponent, origin, self.bins)

    def _combined(self, mine: Histogram | None, theirs: Histogram, lo: float, hi: float) -> Histogram:
        merged = self._widened(mine, lo, hi)
        merged = Histogram(merged.counts.copy(), merged.exponent, merged.origin)
        merged.counts += _rebin(theirs, merged.exponent, merged.origin, self.bins).counts
        return merged

    # -- read

    @property
    def n_values(self) -> int:
        return self._count

    @property
    def min(self) -> float:
        return self._min

    @property
    def max(self) -> float:
        return self._max

    @property
    def amax(self) -> float:
        """max |x| seen (0 before any update)."""
        return max(abs(self._min), abs(self._max)) if self._count else 0.0

    @property
    def is_degenerate(self) -> bool:
        """All values seen are equal (e.g. a constant map from all-black images): no range."""
        return self._count > 0 and self._min == self._max

    @property
    def channel_range(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Per-channel (min, max) along axis 1, when tracked and observed; else None."""
        if self._channel_min is None:
            return None
        return self._channel_min.copy(), self._channel_max.copy()

    @property
    def abs_hist(self) -> Histogram:
        return self._require(self._abs)

    @property
    def signed_hist(self) -> Histogram:
        return self._require(self._signed)

    def _require(self, hist: Histogram | None) -> Histogram:
        if hist is None:
            raise _no_statistics()
        return hist

    # -- save / load

    def to_state(self) -> dict[str, Any]:
        """Plain, JSON-able dict; :meth:`from_state` restores an identical object."""
        empty = self._count == 0
        return {
            "version": _STATE_VERSION,
            "bins": self.bins,
            "count": self._count,
            "min": None if empty else self._min,
            "max": None if empty else self._max,
            "abs": _hist_state(self._abs),
            "signed": _hist_state(self._signed),
            **({} if self._channel_min is None else {
                "channel_min": self._channel_min.tolist(), "channel_max": self._channel_max.tolist()}),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> TensorStats:
        try:
            if state["version"] != _STATE_VERSION:
                raise EdgeqError(f"activation statistics version {state['version']} is not {_STATE_VERSION}")
            stats = cls(int(state["bins"]))
            stats._count = int(state["count"])
            if stats._count:
                stats._min, stats._max = float(state["min"]), float(state["max"])
            stats._abs = _hist_from_state(state["abs"], stats.bins)
            stats._signed = _hist_from_state(state["signed"], stats.bins)
            if "channel_min" in state:
                stats.track_channels = True
                stats._channel_min = np.asarray(state["channel_min"], dtype=np.float64)
                stats._channel_max = np.asarray(state["channel_max"], dtype=np.float64)
                if stats._channel_min.shape != stats._channel_max.shape or stats._channel_min.ndim != 1:
                    raise ValueError("channel_min and channel_max differ in shape")
        except (KeyError, TypeError, ValueError) as err:
            raise EdgeqError(
                f"malformed activation statistics: {err!r}",
                note="statistics files are written by TensorStats.to_state(); re-run calibration",
            ) from err
        if (stats._abs is None) != (stats._count == 0) or (stats._signed is None) != (stats._count == 0):
            raise EdgeqError("malformed activation statistics: histograms do not match the count")
        return stats


def _no_statistics() -> EdgeqError:
    return EdgeqError(
        "no activation statistics were collected for this tensor",
        note="calibration needs at least one image that reaches every observed tensor",
    )


def _hist_state(hist: Histogram | None) -> dict[str, Any] | None:
    if hist is None:
        return None
    index = np.flatnonzero(hist.counts)  # sparse: most of the 2048 bins of a tensor stay empty
    return {"exponent": hist.exponent, "origin": hist.origin, "index": index.tolist(), "counts": hist.counts[index].tolist()}


def _hist_from_state(state: dict[str, Any] | None, bins: int) -> Histogram | None:
    if state is None:
        return None
    counts = np.asarray(state["counts"], dtype=np.int64)
    if "index" in state:
        index = np.asarray(state["index"], dtype=np.int64)
        if index.shape != counts.shape or (index.size and (index.min() < 0 or index.max() >= bins)):
            raise ValueError(f"histogram index outside its {bins} bins")
        dense = np.zeros(bins, dtype=np.int64)
        dense[index] = counts
        counts = dense
    if counts.shape != (bins,) or (counts < 0).any():
        raise ValueError(f"histogram needs {bins} non-negative counts")
    return Histogram(counts, int(state["exponent"]), int(state["origin"]))


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
        raise _no_statistics()
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


# --------------------------------------------------------------------------- scales


def _float32(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


def symmetric_int8(amax: float) -> tuple[float, int]:
    """(scale, 0) for int8 with the restricted range [-127, 127]: scale = amax / 127 in float32.

    Same arithmetic as PyTorch's symmetric observers (``amax / ((qmax - qmin) / 2)`` in float32,
    floored at ``MIN_SCALE``). Use quant_min=-127 (or -128 for activations, which TensorRT
    clamps the same way) with this scale.
    """
    if not math.isfinite(amax) or amax < 0:
        raise ValueError(f"amax must be finite and >= 0, got {amax}")
    scale = torch.clamp_min(_float32(amax) / INT8_QMAX, MIN_SCALE)
    return float(scale), 0


def asymmetric_uint8(lo: float, hi: float) -> tuple[float, int]:
    """(scale, zero_point) for uint8 [0, 255] over ``[lo, hi]`` extended to contain 0.

    0 must be exactly representable (it is ``zero_point``): ONNX pads with the zero point and
    ReLU outputs are mostly exact zeros. scale = (hi - lo) / 255 and
    zero_point = clamp(-round(lo / scale), 0, 255), in float32 as PyTorch's observers do.
    """
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi < lo:
        raise ValueError(f"need finite lo <= hi, got [{lo}, {hi}]")
    low, high = _float32(min(lo, 0.0)), _float32(max(hi, 0.0))
    scale = torch.clamp_min((high - low) / UINT8_QMAX, MIN_SCALE)
    zero_point = int(torch.clamp(-torch.round(low / scale), 0, UINT8_QMAX))
    return float(scale), zero_point


def per_channel_symmetric(weight: torch.Tensor, axis: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel int8 weight scales: max|w| over the channel / 127, zero points 0.

    The restricted range [-127, 127] (not -128) is what TensorRT requires for weights: the
    grid is then symmetric, so q(-w) = -q(w), and -128 * scale would lie outside
    [-amax, amax] and break that symmetry. Returns (float32 scales, int32 zeros), the dtypes
    ``torch.fake_quantize_per_channel_affine`` takes.
    """
    if weight.dim() == 0:
        raise ValueError("per-channel scales need a weight with at least one dimension")
    axis = axis % weight.dim()
    channels = weight.detach().to(torch.float32).transpose(0, axis).reshape(weight.shape[axis], -1)
    amax = channels.abs().amax(dim=1)
    scales = torch.clamp_min(amax / INT8_QMAX, MIN_SCALE)
    return scales, torch.zeros(weight.shape[axis], dtype=torch.int32)
