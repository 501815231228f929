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

from edgeq.errors import EdgeqError
from edgeq.export.calibrators import METHODS, TensorStats

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

    def attach(self, model, source: str = "calibration table") -> None:
        """Give every quantization point of a PyTorch fake-quant ``model`` its statistics.

        The table is keyed by the float ONNX's tensor names; ``extra["torch_points"]`` maps each
        PyTorch point (``model.1.conv.0.input``) to its tensor. A point the table misses is refused.
        """
        from edgeq.export.quantize import quant_points

        mapping = self.extra.get("torch_points", {})
        for point in quant_points(model):
            stats = self.tensors.get(mapping.get(point.name, point.name))
            if stats is None:
                raise EdgeqError(
                    f"{source} does not match this model: no statistics for {point.name}",
                    note="the table was computed for another model or edgeq version; run edgeq calibrate again",
                )
            point.stats = stats

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


def torch_points(onnx_model) -> dict[str, str]:
    """PyTorch quantization-point name -> ONNX tensor, from the exporter's node names."""
    points = {}
    for node in onnx_model.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        path = conv_module_path(node.name)
        if path:
            points[f"{path}.input"] = node.input[0]
            points[f"{path}.output"] = node.output[0]
    return points


def collect(
    weights: str | Path,
    data: str | Path,
    *,
    num_images: int = 256,
    imgsz: int | None = None,
    method: str = "percentile",
    progress: bool = True,
    trust: bool = False,
    float_onnx: str | Path | None = None,
) -> CalibrationTable:
    """Calibrate ``weights`` on the first ``num_images`` images of ``data`` (sorted by name).

    Runs the float ONNX (``float_onnx``, or one exported here from the deploy graph) in ONNX
    Runtime and observes every tensor any INT8 flavour quantizes: one calibration serves them all.
    """
    import tempfile

    import onnx

    from edgeq import __version__
    from edgeq.data.images import iter_images, list_images
    from edgeq.export.observe import observe_onnx
    from edgeq.export.qdq import candidate_tensors, head_tensors
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
    with tempfile.TemporaryDirectory(prefix="edgeq-calib-") as tmp:
        if float_onnx is None:
            float_onnx, size, sha = _export_float(weights, imgsz, trust, Path(tmp) / "float.onnx")
        else:
            from edgeq.export.onnx_export import read_imgsz, read_metadata

            size, sha = read_imgsz(float_onnx), read_metadata(float_onnx).get("edgeq.source_sha256", "")
        graph = onnx.load(str(float_onnx))
        used: list[Path] = []

        def batches():
            for path, image in iter_images(paths):
                used.append(path)
                yield preprocess_batch([image], size)[0]

        points = torch_points(graph)  # the PyTorch fake-quant model's points too (head outputs included)
        heads = head_tensors(graph.graph)  # per-channel ranges too: int8-ort quantizes them per channel
        tensors = list(dict.fromkeys([*candidate_tensors(graph), *points.values(), *heads]))
        stats, seen = observe_onnx(float_onnx, tensors, batches(), total=len(paths), progress=progress,
                                   channel_tensors=heads)
    table = CalibrationTable(
        tensors=stats,
        method=method,
        imgsz=size,
        image_count=seen,
        image_list_sha256=image_list_hash(used),
        model_sha256=sha,
        edgeq_version=__version__,
        extra={"data": str(data), "weights": Path(str(weights)).name, "torch_points": points},
    )
    bad = table.degenerate()
    if bad:
        warnings.warn(
            f"{len(bad)} tensor(s) saw a single value during calibration (degenerate range), e.g. {bad[0]}: "
            f"are the images in {data} blank or all alike?",
            stacklevel=2,
        )
    return table


def _export_float(weights, imgsz, trust, out: Path) -> tuple[Path, int, str]:
    from edgeq.export.fuse import deploy
    from edgeq.export.onnx_export import export_onnx
    from edgeq.models.checkpoint import load_model

    loaded = load_model(weights, trust=trust)
    size = imgsz or loaded.imgsz or 640
    model, _ = deploy(loaded.model, example_shape=(1, 3, size, size))
    export_onnx(model, out, imgsz=size, metadata={"edgeq.source_sha256": loaded.sha256})
    return out, size, loaded.sha256


def conv_module_path(node_name: str) -> str | None:
    """'/model.1/conv/conv.0/Conv' -> 'model.1.conv.0': the module behind a Conv node.

    The TorchScript exporter names scopes after *called* modules: a called container appears as
    its own component ('conv') and its children as 'conv.0', which then replaces it.
    """
    if not node_name.startswith("/") or not node_name.endswith(("/Conv", "/Gemm")):
        return None
    parts: list[str] = []
    for component in node_name[1 : node_name.rindex("/")].split("/"):
        if parts and component.startswith(parts[-1] + "."):
            parts[-1] = component
        else:
            parts.append(component)
    return ".".join(parts)


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
