"""Running activation statistics: exact min/max and two histograms per tensor.

edgeq quantizes once: an observer per activation tensor feeds every calibration batch to a
:class:`TensorStats`, and each backend's Q/DQ graph is derived from the same statistics
(:mod:`edgeq.export.calibrators` turns them into ranges). TensorRT wants symmetric int8 (zero
point 0, one ``amax``), ONNX Runtime on x86 wants asymmetric uint8 activations (``lo``/``hi``),
so a :class:`TensorStats` keeps both an absolute-value histogram and a signed one. Activations
are never stored: memory per tensor is two arrays of ``bins`` counts, plus the not yet folded
counts of the current lattice (at most ``4 * bins + 2``), whatever the number of images.

Both histograms live on the power-of-two lattice of :mod:`edgeq.export.lattice`, which makes
the counts a function of the data alone (sequential updates, :meth:`TensorStats.merge` and one
update with everything agree exactly) and lets one counting pass serve both histograms.

numpy only, no torch: the statistics are plain array arithmetic, and calibration on ONNX
Runtime should not have to import torch for them. torch tensors are still accepted.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.export.lattice import CHUNK, Histogram, LatticeKeys, floor_counts, rebin, window

__all__ = ["DEFAULT_BINS", "Histogram", "TensorStats", "no_statistics_error"]

DEFAULT_BINS = 2048

_STATE_VERSION = 1


def _as_float32(x: Any) -> np.ndarray:
    """A float32 numpy view or copy of ``x`` (numpy array, torch tensor on any device, sequence).

    torch tensors are recognised by duck typing, so this module never imports torch; the cast
    to float32 rounds to nearest like ``tensor.to(torch.float32)``.
    """
    if hasattr(x, "detach") and hasattr(x, "numpy"):
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float32)


# --------------------------------------------------------------------------- statistics


class TensorStats:
    """Running statistics of one activation tensor over calibration batches.

    Keeps the exact min, max and count, a histogram of |x| (symmetric methods) and one of x
    (asymmetric methods); :mod:`edgeq.export.lattice` describes the lattice that keeps them
    exact under range growth and merges. Not thread-safe: one thread updates a given object.
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
        # counts not yet folded into the histograms, on the lattice of self._keys
        self._keys: LatticeKeys | None = None
        self._pending: np.ndarray | None = None
        # per-channel (axis 1) min and max, kept for the head convolutions' outputs, whose
        # channels (box offsets, sizes, objectness, class logits) span very different ranges
        self.track_channels = bool(channels)
        self._channel_min: np.ndarray | None = None
        self._channel_max: np.ndarray | None = None

    # -- accumulate

    def update(self, x: Any) -> None:
        """Add every element of ``x`` (numpy array or torch tensor, any shape; counted in float32).

        Batches inside the range seen so far (most of them, once a few images are in) are
        counted chunk by chunk, each chunk checked and counted while it is in cache, into the
        pending key counts; a batch that widens the range is scanned first, the pending counts
        are folded into the histograms, and the histograms are widened before it is counted.
        """
        values = _as_float32(x)
        flat = values.reshape(-1)
        if flat.size == 0:
            return
        if self._keys is not None:
            counts = self._count_inside(flat)
            if counts is not None:
                if self.track_channels:
                    self._update_channels(values)
                self._pending += counts
                self._count += flat.size
                return
        self._update_widening(values, flat)

    def _count_inside(self, flat: np.ndarray) -> np.ndarray | None:
        """Key counts of ``flat`` if all of it lies inside ``[min, max]`` seen so far, else None
        (also for NaN, which fails both comparisons). Nothing is changed either way."""
        keys, lo, hi = self._keys, self._min, self._max
        total = None
        for start in range(0, flat.size, CHUNK):
            chunk = flat[start : start + CHUNK]
            if not (chunk.min() >= lo and chunk.max() <= hi):
                return None
            counts = keys.count(chunk)
            if total is None:
                total = counts
            else:
                total += counts
        return total

    def _update_widening(self, values: np.ndarray, flat: np.ndarray) -> None:
        lo, hi = float(flat.min()), float(flat.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise EdgeqError(
                "an observed activation contains NaN or infinite values; it cannot be calibrated",
                note="check the calibration images and the float model's output on them",
            )
        if self.track_channels:
            self._update_channels(values)
        self._fold()
        self._count += flat.size
        self._min, self._max = min(self._min, lo), max(self._max, hi)
        self._abs = self._widened(self._abs, 0.0, self.amax)
        self._signed = self._widened(self._signed, self._min, self._max)
        keys = LatticeKeys.covering(min(self._abs.exponent, self._signed.exponent), self._min, self._max)
        if self._signed.exponent >= 1 and self._min < 0:
            # the one place where the signed counts are not a fold of the key counts (see
            # floor_counts): count both histograms now, and keep no pending counts
            self._keys = None
            keys.fold(keys.count_all(flat), self._abs, None)
            self._signed.counts += floor_counts(flat, self._signed)
            return
        self._keys = keys
        self._pending = keys.count_all(flat)

    def _fold(self) -> None:
        """Move the pending key counts into the histograms (before any read or widening)."""
        if self._pending is not None:
            self._keys.fold(self._pending, self._abs, self._signed)
            self._pending = None
            self._keys = None

    def merge(self, other: TensorStats) -> TensorStats:
        """Fold ``other`` into this one (e.g. statistics from several workers); returns self.

        Gives the same counts as feeding ``other``'s batches to :meth:`update`.
        """
        if other.bins != self.bins:
            raise EdgeqError(f"cannot merge statistics with {other.bins} bins into {self.bins} bins")
        if other.n_values == 0:
            return self
        self._fold()
        other._fold()
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
        exponent, origin = window(lo, hi, self.bins)
        return rebin(hist, exponent, origin, self.bins)

    def _combined(self, mine: Histogram | None, theirs: Histogram, lo: float, hi: float) -> Histogram:
        merged = self._widened(mine, lo, hi)
        merged = Histogram(merged.counts.copy(), merged.exponent, merged.origin)
        merged.counts += rebin(theirs, merged.exponent, merged.origin, self.bins).counts
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
        self._fold()
        return self._require(self._abs)

    @property
    def signed_hist(self) -> Histogram:
        self._fold()
        return self._require(self._signed)

    def _require(self, hist: Histogram | None) -> Histogram:
        if hist is None:
            raise no_statistics_error()
        return hist

    # -- save / load

    def to_state(self) -> dict[str, Any]:
        """Plain, JSON-able dict; :meth:`from_state` restores an identical object."""
        self._fold()
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


def no_statistics_error() -> EdgeqError:
    """The error for reading a tensor no calibration image reached (shared with the calibrators)."""
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
