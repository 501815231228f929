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
        """Give every quantization point of ``model`` its statistics; refuse a table that misses one."""
        from edgeq.export.quantize import quant_points

        for point in quant_points(model):
            stats = self.tensors.get(point.name)
            if stats is None:
                raise EdgeqError(
                    f"{source} does not match this model: no statistics for {point.name}",
                    note="the table was computed for another model or edgeq version; run edgeq calibrate again",
                )
            point.stats = stats


def collect(
    weights: str | Path,
    data: str | Path,
    *,
    num_images: int = 256,
    imgsz: int | None = None,
    method: str = "percentile",
    batch_size: int = 8,
    progress: bool = True,
    trust: bool = False,
) -> CalibrationTable:
    """Calibrate ``weights`` on the first ``num_images`` images of ``data`` (sorted by name)."""
    import torch

    from edgeq import __version__
    from edgeq.data.images import iter_images, list_images
    from edgeq.export.fuse import deploy
    from edgeq.export.quantize import calibrate, insert_quant_points, quant_points
    from edgeq.models.checkpoint import load_model
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
    loaded = load_model(weights, trust=trust)
    size = imgsz or loaded.imgsz or 640
    model, _ = deploy(loaded.model, example_shape=(1, 3, size, size))
    insert_quant_points(model)

    used: list[Path] = []

    def batches():
        chunk: list = []
        for path, image in iter_images(paths):
            used.append(path)
            chunk.append(image)
            if len(chunk) == batch_size:
                yield torch.from_numpy(preprocess_batch(chunk, size)[0])
                chunk = []
        if chunk:
            yield torch.from_numpy(preprocess_batch(chunk, size)[0])

    seen = calibrate(model, batches(), progress=progress, total=-(-len(paths) // batch_size))
    table = CalibrationTable(
        tensors={p.name: p.stats for p in quant_points(model) if p.stats is not None},
        method=method,
        imgsz=size,
        image_count=seen,
        image_list_sha256=image_list_hash(used),
        model_sha256=loaded.sha256,
        edgeq_version=__version__,
        extra={"data": str(data), "weights": Path(str(weights)).name},
    )
    bad = table.degenerate()
    if bad:
        warnings.warn(
            f"{len(bad)} tensor(s) saw a single value during calibration (degenerate range), e.g. {bad[0]}: "
            f"are the images in {data} blank or all alike?",
            stacklevel=2,
        )
    return table
