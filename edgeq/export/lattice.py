"""The power-of-two histogram lattice, and exact counting of float32 values on it.

:class:`~edgeq.export.tensor_stats.TensorStats` keeps its two histograms on this lattice;
this module holds the arithmetic: which window of bins holds a range, how counts move to a
wider window, and how one pass over a batch counts it for both histograms.

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

One pass for both histograms
    The same nesting lets one counting pass serve both histograms (:class:`LatticeKeys`): a
    batch is counted once on the finer of the two lattices (exponent ``f = min(e_abs,
    e_signed)``), and the counts are folded into each histogram by an arithmetic right shift of
    the lattice index, which is floor division by a power of two. Only negative values need
    care: the signed lattice puts ``-k * 2**f`` at the *left* edge of bin ``-k`` (half-open
    ``[a, b)``), while ``|x|`` puts it in abs bin ``k``, one further than every other value of
    that signed bin. The key ``floor(t) + ceil(t)`` (``t = x * 2**-f``), which is ``2 t`` on
    lattice points and ``2 floor(t) + 1`` between them, keeps that one bit, so both histograms
    come out exactly as two separate ``floor(x * 2**-e)`` binnings would give them (the tests
    compare against such a reference on adversarial data). Tensors without negatives need no
    such bit. The single exception is float32 underflow: with bins wider than 1 a tiny negative
    ``x * 2**-e`` can round to -0 and land in bin 0; that case is counted by the reference
    arithmetic itself (:func:`floor_counts`).

    Counting is ``np.bincount`` over one int32 key per element, after a multiply, floor (and,
    with negatives, ceil and add) in reused, cache-sized buffers: half the counting of two
    histograms and no per-batch allocation of large temporaries, which used to cost more than
    the arithmetic. ``np.bincount`` itself (about 1.2-1.5 ns per element) is now most of the
    time; numpy offers nothing faster, and it holds the GIL in its min/max scan, so two threads
    counting at once were slower than one (edgeq.export.observe overlaps counting with ONNX
    Runtime instead).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np

# Exponents kept inside float32's normal range, so 2**-e is an exact float32 multiplier.
MIN_EXP = -126
MAX_EXP = 126
# Elements counted per pass (cache-sized; also bounds temporaries for very large batches).
CHUNK = 1 << 16


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


def fit_exponent(lo: float, hi: float, bins: int) -> int:
    """Smallest exponent whose window of ``bins`` lattice bins holds ``[lo, hi]``.

    Bins narrower than a float32 ulp of the data cannot separate values, so the search starts
    no lower than ``ulp(max(|lo|, |hi|))``; that also gives constant data a definite width.
    Because fitting is monotone in the exponent and the floor only grows with the range, the
    result depends on ``[lo, hi]`` alone, which is what makes merges exact.
    """
    magnitude = max(abs(lo), abs(hi))
    exponent = math.frexp(magnitude)[1] - 24 if magnitude > 0 else MIN_EXP
    span = hi - lo
    if span > 0:
        exponent = max(exponent, math.frexp(span / bins)[1] - 1)  # floor(log2(span / bins))
    exponent = min(max(exponent, MIN_EXP), MAX_EXP)
    while exponent < MAX_EXP and not _fits(lo, hi, exponent, bins):
        exponent += 1
    return exponent


def window(lo: float, hi: float, bins: int) -> tuple[int, int]:
    """(exponent, origin) of the window of ``bins`` lattice bins that holds ``[lo, hi]``."""
    exponent = fit_exponent(lo, hi, bins)
    return exponent, math.floor(lo / math.ldexp(1.0, exponent))


def coarser(lattice: np.ndarray, shift: int) -> np.ndarray:
    """Lattice indices ``shift`` exponents up: an arithmetic right shift is floor division by
    ``2**shift``, negatives included."""
    return lattice >> shift if shift < 63 else np.where(lattice < 0, -1, 0)


def rebin(hist: Histogram | None, exponent: int, origin: int, bins: int) -> Histogram:
    """Move counts to a wider (or shifted) window; exact, since old bins nest in new ones."""
    if hist is None:
        return Histogram(np.zeros(bins, dtype=np.int64), exponent, origin)
    if (hist.exponent, hist.origin) == (exponent, origin):
        return hist
    shift = exponent - hist.exponent
    if shift < 0:
        raise ValueError(f"histograms only widen (exponent {hist.exponent} -> {exponent})")
    nonzero = np.flatnonzero(hist.counts)
    coarse = coarser(hist.origin + nonzero.astype(np.int64), shift)
    counts = np.zeros(bins, dtype=np.int64)
    np.add.at(counts, coarse - origin, hist.counts[nonzero])
    return Histogram(counts, exponent, origin)


# --------------------------------------------------------------------------- counting


class _Scratch(threading.local):
    """Per-thread buffers of ``CHUNK`` elements, reused by every update on that thread."""

    def __init__(self) -> None:
        self.scaled = np.empty(CHUNK, dtype=np.float32)
        self.floor = np.empty(CHUNK, dtype=np.float32)
        self.key = np.empty(CHUNK, dtype=np.int32)


_SCRATCH = _Scratch()


@dataclass(frozen=True)
class LatticeKeys:
    """The counting lattice of one tensor: exponent ``f`` = the finer of its two windows', the
    lattice bins ``first .. first + bins - 1`` at ``f`` that hold ``[min, max]`` seen so far, and
    whether negatives were seen (``edges``: then key ``2 (k - first)`` counts values exactly on
    ``k * 2**f`` and ``2 (k - first) + 1`` those inside bin k; else key ``k - first`` counts bin k).

    Any value inside ``[min, max]`` has a key in ``[0, size)``, so batches that stay inside the
    range are counted without first scanning them for their own min and max.
    """

    exponent: int
    scale: np.float32  # 2**-exponent, exact
    first: int
    size: int
    edges: bool

    @classmethod
    def covering(cls, exponent: int, lo: float, hi: float) -> LatticeKeys:
        """The keys of lattice ``exponent`` for values in ``[lo, hi]`` (float32 values)."""
        scale = np.float32(math.ldexp(1.0, -exponent))
        # floor(x * 2**-f) of the extreme values, in the float32 arithmetic the elements get
        first = math.floor(float(np.float32(lo) * scale))
        bins = math.floor(float(np.float32(hi) * scale)) - first + 1
        edges = lo < 0
        return cls(exponent, scale, first, 2 * bins if edges else bins, edges)

    def count(self, chunk: np.ndarray) -> np.ndarray:
        """Key counts of ``chunk`` (at most ``CHUNK`` values inside the lattice's range).

        Every step is exact: ``t = x * 2**-f`` is, outside the subnormal range; floor and ceil
        are integers below 2**24 in magnitude (``f`` is never finer than the data's ulp), their
        sum is either even or below 2**24, and the origin is subtracted from that integer, never
        from ``t``, so no rounding can move a value across a bin edge. ``floor(t) + ceil(t)`` is
        ``2 t`` on a lattice point and ``2 floor(t) + 1`` between two.
        """
        n = chunk.size
        scratch = _SCRATCH
        key = scratch.key[:n]
        scaled = np.multiply(chunk, self.scale, out=scratch.scaled[:n])
        if self.edges:
            index = np.floor(scaled, out=scratch.floor[:n])
            np.ceil(scaled, out=scaled)
            np.add(index, scaled, out=index)
            if self.first:
                np.subtract(index, np.float32(2 * self.first), out=index)
            np.copyto(key, index, casting="unsafe")
        else:
            # no negatives: the cast's truncation toward zero is the floor (-0.0 included)
            np.copyto(key, scaled, casting="unsafe")
            if self.first:
                np.subtract(key, np.int32(self.first), out=key)
        return np.bincount(key, minlength=self.size)

    def count_all(self, flat: np.ndarray) -> np.ndarray:
        """Key counts of ``flat`` (any size), chunk by chunk."""
        total = self.count(flat[:CHUNK])
        for start in range(CHUNK, flat.size, CHUNK):
            total += self.count(flat[start : start + CHUNK])
        return total

    def lattice(self, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(lattice index, count, on a lattice point) of every non-zero key of ``counts``."""
        keys = np.flatnonzero(counts)
        if not self.edges:
            return self.first + keys, counts[keys], None
        return self.first + (keys >> 1), counts[keys], (keys & 1) == 0

    def fold(self, counts: np.ndarray, absolute: Histogram, signed: Histogram | None) -> None:
        """Add key ``counts`` to the |x| histogram and (unless None) the signed one, by a right
        shift of the lattice index (both windows are this lattice's or coarser)."""
        lattice, counts, on_edge = self.lattice(counts)
        # |x| of a value in negative bin k is in bin -k - 1, or -k when it is the bin's left edge
        magnitude = lattice if on_edge is None else np.where(lattice >= 0, lattice, ~lattice + on_edge)
        np.add.at(absolute.counts, coarser(magnitude, absolute.exponent - self.exponent), counts)
        if signed is not None:
            np.add.at(signed.counts, coarser(lattice, signed.exponent - self.exponent) - signed.origin, counts)


def floor_counts(flat: np.ndarray, hist: Histogram) -> np.ndarray:
    """Signed counts of ``flat`` in ``hist``'s window by ``floor(x * 2**-e) - origin`` in float32,
    the reference arithmetic, including where it is not exact: a negative value whose product
    underflows to -0 lands in lattice bin 0 (or the window's last bin). Only windows with bins
    wider than 1 (``e >= 1``) can see that, so only their batches with negatives come here.
    """
    bins = hist.counts.size
    scale = np.float32(math.ldexp(1.0, -hist.exponent))
    origin = np.float32(hist.origin)
    total = np.zeros(bins, dtype=np.int64)
    for start in range(0, flat.size, CHUNK):
        index = np.floor(np.multiply(flat[start : start + CHUNK], scale))
        if hist.origin:
            np.subtract(index, origin, out=index)
        counts = np.bincount(index.astype(np.intp), minlength=bins)
        if counts.size > bins:  # only float32 subnormals flushed to -0 can land here
            counts[bins - 1] += counts[bins:].sum()
        total += counts[:bins]
    return total
