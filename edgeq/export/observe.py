"""Observe activation statistics on the float ONNX graph with ONNX Runtime.

Calibration runs the exported float model itself, not a re-implementation of it: the tensors
observed are the graph's own tensors, by the names the Q/DQ flavours and TensorRT's cache use.
Memory stays bounded: every tensor is folded into a histogram and dropped.

The statistics of one batch are folded in on a worker thread while ONNX Runtime computes the
next batch: ``session.run`` releases the GIL, and so do most of the numpy loops inside
:meth:`TensorStats.update`, so the two can run on different cores. How much that buys depends
on what ONNX Runtime leaves free: its intra-op threads spin between operators, and on a
2-core machine the overlap measured no faster than taking turns (with spinning switched off in
the session options, about 15 % faster). At most one batch is in flight, so no more activations are alive than in a
plain loop (which also holds the previous outputs while the next run computes). Results do not
depend on the overlap: every tensor's statistics are updated in batch order by one thread, and
the counts are a function of the data alone anyway. Statistics are not split over several
threads: numpy's short GIL-free sections made two counting threads slower than one.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Collection, Iterable, Sequence

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.export.tensor_stats import TensorStats
from edgeq.graph import session_with_outputs


def observe_onnx(
    onnx_path: str | Path,
    tensors: list[str],
    batches: Iterable[np.ndarray],
    *,
    total: int | None = None,
    progress: bool = True,
    threads: int | None = None,
    channel_tensors: Collection[str] = (),
    overlap: bool = True,
) -> tuple[dict[str, TensorStats], int]:
    """Histograms of ``tensors`` over ``batches`` (N, 3, H, W float32); returns (stats, images seen).

    ``channel_tensors`` (a subset of ``tensors``) also get per-channel min/max. ``overlap``:
    update the statistics of a batch on a worker thread during the next ONNX Runtime run
    (``False``: one thread, strictly in turn; same results, for debugging).
    """
    import onnx

    from edgeq.utils.progress import progress as progress_of

    model = onnx.load(str(onnx_path))
    graph = model.graph
    input_name = graph.input[0].name
    produced = {out for node in graph.node for out in node.output}
    unknown = [t for t in tensors if t not in produced and t != input_name]
    if unknown:
        raise EdgeqError(f"{onnx_path} has no tensor named {unknown[0]}")
    fetch = [t for t in tensors if t != input_name]
    # ONNX Runtime leaves one core to the statistics worker and sleeps between runs: on 2 cores
    # that cut the demo's calibration from 20 s to 12 s (the statistics of a batch take longer
    # than its forward pass, and ORT's busy-waiting threads would hold the worker's core)
    threads = threads or max(1, (os.cpu_count() or 2) - 1) if overlap else threads
    session = session_with_outputs(model, fetch, basic=True, threads=threads, spin=not overlap)
    stats = {name: TensorStats(channels=name in channel_tensors) for name in tensors}
    seen = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgeq-stats") as pool:
        pending: Future | None = None
        for batch in progress_of(batches, total=total, desc="calibrating", unit="image", enabled=progress):
            batch = np.ascontiguousarray(batch, dtype=np.float32)
            values = session.run(fetch, {input_name: batch})
            observed = list(zip(fetch, values))
            if input_name in stats:
                observed.append((input_name, batch))
            if pending is not None:
                pending.result()  # one batch in flight; a NaN error surfaces here
                pending = None
            if overlap:
                pending = pool.submit(_update, stats, observed)
            else:
                _update(stats, observed)
            seen += batch.shape[0]
        if pending is not None:
            pending.result()
    if seen == 0:
        raise EdgeqError("calibration saw no images")
    return stats, seen


def _update(stats: dict[str, TensorStats], observed: Sequence[tuple[str, np.ndarray]]) -> None:
    for name, value in observed:
        stats[name].update(value)
