"""The calibration table: statistics of every quantization point, saved once, reused by exports.

It stores the histograms, not just the chosen ranges, so an export can switch calibrator
(minmax / percentile / entropy / mse) without seeing the images again. It records what it was
computed from (model hash, image count, a hash of the image list, image size, edgeq version),
and a model whose quantization points it does not cover is refused, naming the first missing one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.export.calibrators import METHODS
from edgeq.export.tensor_stats import TensorStats

log = logging.getLogger("edgeq")

TABLE_FORMAT = "edgeq-calibration-table"
TABLE_VERSION = 1


def image_list_hash(paths: list[Path]) -> str:
    """SHA-256 over the images' names, sizes and bytes: the table's proof of what it saw."""
    digest = hashlib.sha256()
    for p in paths:
        digest.update(p.name.encode())
        digest.update(p.read_bytes())
    return digest.hexdigest()


@dataclass
class CalibrationTable:
    tensors: dict[str, TensorStats]
    method: str = "percentile"
    imgsz: int = 640
    image_count: int = 0
    image_list_sha256: str = ""
    model_sha256: str = ""
    edgeq_version: str = ""
    extra: dict = field(default_factory=dict)

    def degenerate(self) -> list[str]:
        return [name for name, stats in self.tensors.items() if stats.is_degenerate]

    def to_dict(self) -> dict:
        return {
            "format": TABLE_FORMAT,
            "format_version": TABLE_VERSION,
            "edgeq_version": self.edgeq_version,
            "method": self.method,
            "imgsz": self.imgsz,
            "image_count": self.image_count,
            "image_list_sha256": self.image_list_sha256,
            "model_sha256": self.model_sha256,
            "extra": self.extra,
            "tensors": {
                name: {"min": s.min, "max": s.max, "amax": s.amax, "stats": s.to_state()}
                for name, s in self.tensors.items()
            },
        }

    def save(self, path: str | Path) -> Path:
        from edgeq.utils.files import atomic_write_text

        return atomic_write_text(Path(path), json.dumps(self.to_dict()) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CalibrationTable:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise EdgeqError(f"calibration table {path} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise EdgeqError(f"{path} is not a readable calibration table ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
            raise EdgeqError(f"{path} is not an edgeq calibration table (no format: {TABLE_FORMAT})")
        if data.get("format_version") != TABLE_VERSION:
            raise EdgeqError(f"{path}: calibration table version {data.get('format_version')} is not supported")
        try:
            tensors = {name: TensorStats.from_state(entry["stats"]) for name, entry in data["tensors"].items()}
        except (KeyError, TypeError, AttributeError) as exc:
            raise EdgeqError(f"{path}: malformed tensor entry ({exc})") from None
        return cls(
            tensors=tensors,
            method=data.get("method", "percentile"),
            imgsz=int(data.get("imgsz", 640)),
            image_count=int(data.get("image_count", 0)),
            image_list_sha256=data.get("image_list_sha256", ""),
            model_sha256=data.get("model_sha256", ""),
            edgeq_version=data.get("edgeq_version", ""),
            extra=data.get("extra", {}),
        )

    def channel_ranges(self) -> dict:
        """tensor -> per-channel (min, max) arrays, for the tensors observed per channel (head outputs)."""
        return {name: stats.channel_range for name, stats in self.tensors.items() if stats.channel_range is not None}

    def ranges(self, method: str | None = None, *, symmetric: bool, percentile: float | None = None) -> dict:
        """tensor -> (lo, hi, amax) chosen by a calibrator (the table's own method by default)."""
        from edgeq.export.calibrators import compute_range

        method = method or self.method
        pct = percentile if percentile is not None else float(self.extra.get("percentile", 99.99))
        out = {}
        for name, stats in self.tensors.items():
            r = compute_range(stats, method, symmetric=symmetric, percentile=pct)
            out[name] = (r.lo, r.hi, r.amax)
        return out


def calibrate(
    float_onnx: str | Path,
    data: str | Path,
    *,
    num_images: int = 256,
    method: str = "percentile",
    progress: bool = True,
    keep: int = 0,
) -> tuple[CalibrationTable, list[np.ndarray]]:
    """Calibrate the float ONNX on the first ``num_images`` images of ``data`` (sorted by name).

    Runs the float ONNX in ONNX Runtime and observes every tensor any INT8 flavour quantizes:
    one calibration serves them all. Each image is decoded once; the first ``keep`` preprocessed
    inputs come back with the table, for the later stages that need images (sensitivity, bias
    correction), so nothing reads them again.
    """
    import onnx

    from edgeq import __version__
    from edgeq.data.images import iter_images, list_images
    from edgeq.export.observe import observe_onnx
    from edgeq.export.qdq_plan import candidate_tensors
    from edgeq.graph import head_tensors, imgsz_of, metadata_of
    from edgeq.runtime.preprocess import preprocess_batch

    if method not in METHODS:
        raise EdgeqError(f"--method {method!r} is not a calibrator", note=f"choose from {', '.join(METHODS)}")
    if num_images < 1:
        raise EdgeqError(f"--num-images must be >= 1, got {num_images}")
    paths = list_images(data)
    if len(paths) < num_images:
        warnings.warn(f"{data} holds {len(paths)} images, fewer than the {num_images} asked for: using all of them",
                      stacklevel=2)
    paths = paths[:num_images]
    graph = onnx.load(str(float_onnx))
    meta = metadata_of(graph)
    size = imgsz_of(meta)
    used: list[Path] = []
    kept: list[np.ndarray] = []

    def batches():
        for path, image in iter_images(paths):
            used.append(path)
            batch = preprocess_batch([image], size)[0]
            if len(kept) < keep:
                kept.append(batch)
            yield batch

    heads = head_tensors(graph.graph)  # per-channel ranges too: int8-ort can quantize them per channel
    tensors = list(dict.fromkeys([*candidate_tensors(graph), *heads]))
    del graph
    stats, seen = observe_onnx(float_onnx, tensors, batches(), total=len(paths), progress=progress,
                               channel_tensors=heads)
    table = CalibrationTable(
        tensors=stats,
        method=method,
        imgsz=size,
        image_count=seen,
        image_list_sha256=image_list_hash(used),
        model_sha256=meta.get("edgeq.source_sha256", ""),
        edgeq_version=__version__,
        extra={"data": str(data), "weights": meta.get("edgeq.source", Path(str(float_onnx)).name)},
    )
    bad = table.degenerate()
    if bad:
        warnings.warn(
            f"{len(bad)} tensor(s) saw a single value during calibration (degenerate range), e.g. {bad[0]}: "
            f"are the images in {data} blank or all alike?",
            stacklevel=2,
        )
    return table, kept


def write_trt_cache(
    table: CalibrationTable, onnx_path: str | Path, cache_path: str | Path, *, method: str | None = None
) -> dict[str, float]:
    """A TensorRT calibration cache for the *float* ONNX, from the same statistics as the Q/DQ flavours.

    TensorRT 10's implicit INT8 (older JetPack) reads per-tensor scales keyed by ONNX tensor
    names, which are the table's keys. Returns the amax written per tensor.
    """
    import onnx

    from edgeq.export.trt_calib_cache import write_calibration_cache

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    names = {graph.input[0].name} | {out for node in graph.node for out in node.output}
    ranges = table.ranges(method, symmetric=True)
    amax = {name: r[2] for name, r in ranges.items() if name in names}
    if not amax:
        raise EdgeqError(f"{onnx_path}: none of its tensors are in the calibration table",
                         note="export the ONNX from the same checkpoint the table was calibrated on")
    convs = [n for n in graph.node if n.op_type == "Conv" and n.input[0] not in amax]
    if convs:
        log.warning("%d Conv input(s) of %s have no statistics (e.g. %s)", len(convs), onnx_path, convs[0].name)
    write_calibration_cache(amax, cache_path)
    return amax
