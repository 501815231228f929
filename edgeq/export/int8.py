"""A float ONNX + a calibration table -> the INT8 ONNX of one backend's flavour.

The artifacts say what they are twice: in the file name (``stem.int8-ort.onnx``) and in the
metadata (``edgeq.flavour``), so a runtime can refuse a flavour made for another backend.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgeq.errors import EdgeqError
from edgeq.export.calib_table import CalibrationTable
from edgeq.export.qdq import QuantizeReport, policy_for, quantize_onnx

DEFAULT_METHOD = "percentile"


@dataclass
class Int8Options:
    method: str | None = None  # calibrator; the table's own by default
    percentile: float | None = None
    exclude: tuple[str, ...] = ()  # ONNX node names kept float (sensitivity fallback)


def flavour_ranges(table: CalibrationTable, flavour: str, opts: Int8Options) -> dict[str, tuple[float, float, float]]:
    """Ranges in the form the flavour's number format needs, from one table."""
    policy = policy_for(flavour)
    ranges = table.ranges(opts.method, symmetric=policy.activations != "uint8", percentile=opts.percentile)
    if policy.activations == "auto8":  # non-negative tensors: [0, amax] on uint8
        ranges = {
            name: ((0.0 if table.tensors[name].min >= 0 else -amax), amax, amax) for name, (_, _, amax) in ranges.items()
        }
    return ranges


def quantize_file(
    float_onnx: str | Path, table: CalibrationTable, flavour: str, out_path: str | Path, opts: Int8Options | None = None
) -> tuple[Path, QuantizeReport]:
    """Write ``out_path``: the float ONNX with the flavour's Q/DQ pairs and metadata."""
    import onnx

    from edgeq.utils.files import atomic_path

    opts = opts or Int8Options()
    policy = policy_for(flavour)
    model = onnx.load(str(float_onnx))
    q, report = quantize_onnx(model, flavour_ranges(table, flavour, opts), policy, exclude=set(opts.exclude))
    props = {p.key: p.value for p in q.metadata_props}
    props.update({
        "edgeq.flavour": f"int8-{policy.flavour}",
        "edgeq.int8": json.dumps({
            "method": opts.method or table.method,
            "percentile": opts.percentile if opts.percentile is not None else table.extra.get("percentile", 99.99),
            "images": table.image_count,
            "image_list_sha256": table.image_list_sha256,
            "placement": policy.note,
            "float_nodes": list(opts.exclude),
        }),
    })
    del q.metadata_props[:]
    for key, value in props.items():
        entry = q.metadata_props.add()
        entry.key, entry.value = key, value
    out_path = Path(out_path)
    try:
        with atomic_path(out_path) as tmp:
            onnx.save(q, str(tmp))
    except OSError as exc:
        raise EdgeqError(f"cannot write {out_path}: {exc.strerror or exc}") from None
    return out_path, report


def sensitive_nodes(
    float_onnx: str | Path,
    table: CalibrationTable,
    flavour: str,
    images,
    count: int,
    opts: Int8Options | None = None,
) -> list[dict]:
    """The ``count`` Conv layers whose quantization adds the most noise on ``images``.

    Added noise = noise-to-signal ratio of the layer's output minus that of its input, both
    against the float graph: what the layer itself adds, not the error it inherits. These are
    the layers to keep float first.
    """
    import tempfile

    from edgeq.export.onnx_export import read_metadata
    from edgeq.verify import layer_snr

    size = int(json.loads(read_metadata(float_onnx).get("edgeq.imgsz", "[640]"))[0])
    with tempfile.TemporaryDirectory(prefix="edgeq-sens-") as tmp:
        quant, _ = quantize_file(float_onnx, table, flavour, Path(tmp) / "q.onnx", opts)
        rows = layer_snr(float_onnx, quant, images, size)
    return sorted(rows, key=lambda r: -r["added_nsr"])[:count]
