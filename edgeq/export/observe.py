"""Observe activation statistics on the float ONNX graph with ONNX Runtime.

Calibration runs the exported float model itself, not a re-implementation of it: the tensors
observed are the graph's own tensors, by the names the Q/DQ flavours and TensorRT's cache use.
Memory stays bounded: every tensor is folded into a histogram and dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Collection, Iterable

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.export.calibrators import TensorStats


def session_with_outputs(model, names: list[str], *, basic: bool = False, threads: int | None = None):
    """An ONNX Runtime session on ``model`` (a ModelProto, changed in place) that can also return
    the intermediate tensors ``names``. ``basic``: only basic graph optimizations, so fusions do
    not change what the observed tensors hold."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    present = {o.name for o in model.graph.output}
    model.graph.output.extend(
        helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in dict.fromkeys(names) if name not in present
    )
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if basic:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def observe_onnx(
    onnx_path: str | Path,
    tensors: list[str],
    batches: Iterable[np.ndarray],
    *,
    total: int | None = None,
    progress: bool = True,
    threads: int | None = None,
    channel_tensors: Collection[str] = (),
) -> tuple[dict[str, TensorStats], int]:
    """Histograms of ``tensors`` over ``batches`` (N, 3, H, W float32); returns (stats, images seen).

    ``channel_tensors`` (a subset of ``tensors``) also get per-channel min/max.
    """
    import onnx
    from tqdm import tqdm

    model = onnx.load(str(onnx_path))
    graph = model.graph
    input_name = graph.input[0].name
    produced = {out for node in graph.node for out in node.output}
    unknown = [t for t in tensors if t not in produced and t != input_name]
    if unknown:
        raise EdgeqError(f"{onnx_path} has no tensor named {unknown[0]}")
    fetch = [t for t in tensors if t != input_name]
    session = session_with_outputs(model, fetch, basic=True, threads=threads)
    stats = {name: TensorStats(channels=name in channel_tensors) for name in tensors}
    seen = 0
    for batch in tqdm(batches, total=total, desc="calibrating", unit="batch", disable=not progress):
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        values = session.run(fetch, {input_name: batch})
        if input_name in stats:
            stats[input_name].update(batch)
        for name, value in zip(fetch, values):
            stats[name].update(value)
        seen += batch.shape[0]
    if seen == 0:
        raise EdgeqError("calibration saw no images")
    return stats, seen


_SESSIONS: dict[tuple[str, tuple[str, ...]], object] = {}


def run_with_outputs(onnx_path: str | Path, names: list[str], batch: np.ndarray) -> list[np.ndarray]:
    """The values of ``names`` (intermediate tensors) for one batch; sessions are cached per file."""
    import onnx

    key = (str(Path(onnx_path).resolve()), tuple(names))
    session = _SESSIONS.get(key)
    if session is None:
        session = session_with_outputs(onnx.load(str(onnx_path)), names)
        while len(_SESSIONS) >= 4:  # keep a few large sessions alive, not every one ever made
            _SESSIONS.pop(next(iter(_SESSIONS)))
        _SESSIONS[key] = session
    return session.run(names, {session.get_inputs()[0].name: np.ascontiguousarray(batch, dtype=np.float32)})
