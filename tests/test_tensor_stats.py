"""Activation statistics (edgeq.export.tensor_stats): lattice histograms, merges, state, and the
one-pass counting against a straightforward reference implementation kept here."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch

from edgeq.errors import EdgeqError
from edgeq.export import lattice
from edgeq.export.calibrators import METHODS, compute_range
from edgeq.export.tensor_stats import TensorStats


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _stats(*batches, bins: int = 2048) -> TensorStats:
    stats = TensorStats(bins)
    for batch in batches:
        stats.update(batch)
    return stats


# ----------------------------------------------------------------------------- reference
#
# The statistics as first written: every batch binned twice, straight from the lattice's
# definition, ``floor(x * 2**-e) - origin`` in float32 for x and for |x|, after widening both
# windows to the range seen so far. The fast path must give the same state on any data.

_MIN_EXP, _MAX_EXP = -126, 126


def _ref_fit_exponent(lo: float, hi: float, bins: int) -> int:
    magnitude = max(abs(lo), abs(hi))
    exponent = math.frexp(magnitude)[1] - 24 if magnitude > 0 else _MIN_EXP
    span = hi - lo
    if span > 0:
        exponent = max(exponent, math.frexp(span / bins)[1] - 1)
    exponent = min(max(exponent, _MIN_EXP), _MAX_EXP)

    def fits(e: int) -> bool:
        width = math.ldexp(1.0, e)
        return math.floor(hi / width) - math.floor(lo / width) + 1 <= bins

    while exponent < _MAX_EXP and not fits(exponent):
        exponent += 1
    return exponent


class _Reference:
    def __init__(self, bins: int = 2048):
        self.bins, self.count, self.min, self.max = bins, 0, math.inf, -math.inf
        self.hists: dict[str, list] = {}  # name -> [counts, exponent, origin]

    def _widen(self, name: str, lo: float, hi: float) -> list:
        exponent = _ref_fit_exponent(lo, hi, self.bins)
        origin = math.floor(lo / math.ldexp(1.0, exponent))
        old = self.hists.get(name)
        counts = np.zeros(self.bins, dtype=np.int64)
        if old is not None:
            used = np.flatnonzero(old[0])
            coarse = np.floor((old[2] + used) / 2.0 ** (exponent - old[1])).astype(np.int64)  # exact in float64
            np.add.at(counts, coarse - origin, old[0][used])
        self.hists[name] = [counts, exponent, origin]
        return self.hists[name]

    def _bin(self, flat: np.ndarray, hist: list, absolute: bool) -> None:
        counts, exponent, origin = hist
        index = np.multiply(flat, np.float32(math.ldexp(1.0, -exponent)))
        if absolute:
            index = np.abs(index)
        index = np.floor(index)
        if origin:
            index = index - np.float32(origin)
        found = np.bincount(index.astype(np.intp), minlength=self.bins)
        found[self.bins - 1] += found[self.bins:].sum()  # float32 products flushed to -0
        counts += found[: self.bins]

    def update(self, x) -> None:
        flat = np.asarray(x, dtype=np.float32).reshape(-1)
        if flat.size == 0:
            return
        lo, hi = float(flat.min()), float(flat.max())
        self.count += flat.size
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        amax = max(abs(self.min), abs(self.max))
        self._bin(flat, self._widen("abs", 0.0, amax), True)
        self._bin(flat, self._widen("signed", self.min, self.max), False)

    def state(self) -> dict:
        def sparse(name):
            counts, exponent, origin = self.hists[name]
            index = np.flatnonzero(counts)
            return {"exponent": exponent, "origin": origin, "index": index.tolist(), "counts": counts[index].tolist()}

        return {"version": 1, "bins": self.bins, "count": self.count, "min": self.min, "max": self.max,
                "abs": sparse("abs"), "signed": sparse("signed")}


def _assert_matches_reference(batches, bins: int = 2048, *, check_every: bool = False) -> TensorStats:
    stats, ref = TensorStats(bins), _Reference(bins)
    for batch in batches:
        stats.update(batch)
        ref.update(batch)
        if check_every:  # reading the state folds the pending counts mid-stream
            assert stats.to_state() == ref.state()
    state = stats.to_state()
    assert state == ref.state()
    assert json.loads(json.dumps(state)) == state
    return stats


def _tiny(rng, n: int) -> np.ndarray:
    """float32 subnormals and the smallest normals, both signs, log-uniform down to 2**-149."""
    bits = np.floor(2.0 ** rng.uniform(0.0, 24.0, n)).astype(np.uint32)  # exponent field 0 or 1
    values = bits.view(np.float32).copy()
    return np.where(rng.random(n) < 0.5, -values, values).astype(np.float32)


def _on_lattice(rng, n: int, exponent: int, span: int) -> np.ndarray:
    """Exact multiples of 2**exponent in [-span, span] * 2**exponent: every value on a bin edge."""
    return (rng.integers(-span, span + 1, n) * 2.0**exponent).astype(np.float32)


SHAPES = [(7,), (3, 5), (2, 4, 9, 9), (1, 3, 300, 300), (70_000,), (5, 1)]


def _batch(rng, kind: str, scale: float, shape) -> np.ndarray:
    n = int(np.prod(shape))
    if kind == "gauss":
        x = rng.normal(0.0, scale, n)
    elif kind == "positive":
        x = np.abs(rng.normal(0.0, scale, n))
    elif kind == "negative":
        x = -rng.exponential(scale, n)
    elif kind == "relu":
        x = np.maximum(rng.normal(0.0, scale, n), 0.0)
    elif kind == "offset":
        x = 1000.0 * scale + rng.normal(0.0, scale, n)
    elif kind == "lattice":
        x = _on_lattice(rng, n, int(np.floor(np.log2(scale))) - 8, 600)
    elif kind == "constant":
        x = np.full(n, scale * rng.choice([-1.0, 0.0, 1.0]))
    elif kind == "tiny":
        x = _tiny(rng, n)
    elif kind == "signed_zero":
        x = rng.choice([0.0, -0.0, scale, -scale], n)
    else:
        raise AssertionError(kind)
    return x.astype(np.float32).reshape(shape)


KINDS = ["gauss", "positive", "negative", "relu", "offset", "lattice", "constant", "tiny", "signed_zero"]


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


# ----------------------------------------------------------------------------- against the reference


@pytest.mark.parametrize("seed", range(12))
def test_update_matches_reference_on_random_sequences(seed):
    """Random mixes of distributions, scales and shapes: ranges grow, shrink back inside, flip sign."""
    rng = np.random.default_rng(seed)
    kinds = rng.choice(KINDS, size=3)
    batches = []
    for i in range(10):
        scale = float(10.0 ** rng.uniform(-3, 3)) * (1.5 ** i if rng.random() < 0.5 else 1.0)
        shape = SHAPES[rng.integers(len(SHAPES) - 1)] if rng.random() < 0.9 else SHAPES[-1]
        batches.append(_batch(rng, str(kinds[i % 3]), scale, shape))
    _assert_matches_reference(batches, bins=int(rng.choice([256, 2048])), check_every=seed % 3 == 0)


@pytest.mark.parametrize("kind", KINDS)
def test_update_matches_reference_for_each_kind_of_data(kind):
    rng = np.random.default_rng(100 + KINDS.index(kind))
    growing = [_batch(rng, kind, 0.01 * 4.0**i, SHAPES[i % 4]) for i in range(6)]
    inside = [_batch(rng, kind, 0.005, (2, 4, 9, 9)) for _ in range(3)]  # the pending fast path
    _assert_matches_reference(growing + inside)


def test_update_matches_reference_on_bin_edges_of_every_lattice():
    """Values exactly on lattice points (the edge case of the |x| fold), negatives included,
    counted on the finer lattice and folded to coarser windows as the range grows."""
    rng = np.random.default_rng(7)
    batches = [_on_lattice(rng, 5000, e, 3000) for e in (-20, -14, -14, -9, -3, -3, 0)]
    batches += [np.float32([-(2.0**-9), 2.0**-9, -0.0, 0.0]), -np.abs(_on_lattice(rng, 999, -5, 100))]
    _assert_matches_reference(batches, check_every=True)
    _assert_matches_reference(batches, bins=256)


def test_update_matches_reference_where_float32_products_underflow():
    """Bins wider than 1 (|x| in the thousands) make tiny negatives' x * 2**-e round to -0: the
    reference puts them in lattice bin 0, and so must the fast path."""
    rng = np.random.default_rng(8)
    wide = rng.normal(0.0, 3000.0, 20_000).astype(np.float32)
    smallest = -np.arange(1, 40, dtype=np.uint32).view(np.float32)  # -k * 2**-149
    batches = [np.concatenate([wide, _tiny(rng, 500), smallest]), _tiny(rng, 300), np.float32([-1e-45, -0.0, 1e-45]),
               np.concatenate([-np.abs(wide), _tiny(rng, 50)]), rng.normal(0, 3e30, 1000).astype(np.float32),
               _tiny(rng, 64)]
    _assert_matches_reference(batches, check_every=True)
    negative_only = [np.float32([-5000.0, -4000.0, -1e-44, -3e-45]), np.float32([-6e3, -1e-45])]
    _assert_matches_reference(negative_only)


def test_update_matches_reference_for_extreme_magnitudes():
    rng = np.random.default_rng(9)
    batches = [np.float32([3.4e38, -3.4e38, 0.0]), rng.normal(0, 1e-30, 100).astype(np.float32),
               np.float32([np.finfo(np.float32).max, -np.finfo(np.float32).tiny])]
    _assert_matches_reference(batches)
    _assert_matches_reference([rng.normal(0, 1e-38, 1000).astype(np.float32), _tiny(rng, 1000)])
    _assert_matches_reference([np.float32([1e-45]), np.float32([-1e-45]), np.float32([2e-45, 0.0])])


def test_chunks_that_leave_the_range_late_and_every_input_type():
    """A batch whose last chunk widens the range, non-contiguous and float64/torch inputs."""
    rng = np.random.default_rng(10)
    big = rng.normal(0, 1.0, 3 * lattice.CHUNK + 5).astype(np.float32)
    later = big.copy()
    later[-1] = 50.0
    transposed = rng.normal(0, 2.0, (64, 3, 17)).astype(np.float32).transpose(2, 0, 1)
    batches = [big, big[::-1].copy(), later, transposed, rng.normal(0, 1, 999), torch.randn(4, 5, generator=_gen(1))]
    stats, ref = TensorStats(), _Reference()
    for batch in batches:
        stats.update(batch)
        ref.update(batch.numpy() if isinstance(batch, torch.Tensor) else batch)
    assert stats.to_state() == ref.state()


def test_non_finite_value_in_a_late_chunk_changes_nothing():
    rng = np.random.default_rng(11)
    stats = _stats(rng.normal(0, 3.0, 1000).astype(np.float32))
    before = stats.to_state()
    for bad in (np.nan, np.inf, -np.inf):
        batch = rng.normal(0, 1.0, 2 * lattice.CHUNK).astype(np.float32)
        batch[-3] = bad
        with pytest.raises(EdgeqError, match="NaN"):
            stats.update(batch)
        assert stats.to_state() == before


def test_merge_of_pending_statistics_matches_reference():
    rng = np.random.default_rng(12)
    part_a = [rng.normal(0, 1.0, 4000).astype(np.float32) for _ in range(3)]
    part_b = [rng.normal(2, 0.5, 4000).astype(np.float32) for _ in range(3)]
    ref = _Reference()
    for batch in part_a + part_b:
        ref.update(batch)
    assert _stats(*part_a).merge(_stats(*part_b)).to_state() == ref.state()


def test_statistics_import_no_torch():
    import subprocess
    import sys

    code = ("import sys, edgeq.export.tensor_stats, edgeq.export.calibrators, edgeq.export.scales, "
            "edgeq.export.observe; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
