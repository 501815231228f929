"""A float ONNX + a calibration table -> the INT8 ONNX of one flavour, with its metadata.

The artifacts say what they are twice: in the file name (``stem.int8-ort.onnx``) and in the
metadata (``edgeq.flavour``), so a runtime can refuse a flavour made for another backend. The
``edgeq.int8`` record also names the float ONNX it was made from (and its SHA-256): verify
finds its reference there instead of rebuilding one from the checkpoint.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.export.calib_table import CalibrationTable
from edgeq.export.qdq import QuantizeReport, quantize_onnx
from edgeq.export.qdq_plan import resolve
from edgeq.flavours import Flavour
from edgeq.graph import FLAVOUR_META, INT8_META, set_metadata

log = logging.getLogger("edgeq")


@dataclass
class Int8Options:
    method: str | None = None  # calibrator; the table's own by default
    percentile: float | None = None
    exclude: tuple[str, ...] = ()  # ONNX node names kept float (--float-nodes)
    float_tensors: tuple[str, ...] = ()  # activations left unquantized (sensitivity fallback)
    uint8_weights: bool = False  # int8-ort: weights as uint8, zero point 128 (no int16 saturation without VNNI)
    head_outputs: str | None = None  # the head convolutions' outputs: float, per-channel, per-tensor; None: the flavour's
    scales: dict[str, float] | None = None  # activation scales learned by the fine-tune, replacing the table's


def flavour_of(flavour: Flavour | str, opts: Int8Options | None = None) -> Flavour:
    """The flavour with the options' head-output choice applied."""
    return resolve(flavour, opts.head_outputs if opts else None)


def flavour_ranges(table: CalibrationTable, flavour: Flavour | str, opts: Int8Options | None = None
                   ) -> dict[str, tuple[float, float, float]]:
    """Ranges in the form the flavour's number format needs, from one table."""
    opts = opts or Int8Options()
    policy = flavour_of(flavour).policy
    ranges = table.ranges(opts.method, symmetric=policy.symmetric, percentile=opts.percentile)
    if policy.activations == "auto8":  # non-negative tensors: [0, amax] on uint8
        ranges = {
            name: ((0.0 if table.tensors[name].min >= 0 else -amax), amax, amax) for name, (_, _, amax) in ranges.items()
        }
    return ranges


def quantize_model(float_model, table: CalibrationTable, flavour: Flavour | str, opts: Int8Options | None = None):
    """The flavour's Q/DQ ModelProto of ``float_model`` (in memory) and its report."""
    opts = opts or Int8Options()
    flavour = flavour_of(flavour, opts)
    head_ranges = table.channel_ranges() if flavour.policy.head_outputs == "per-channel" else None
    if head_ranges == {}:  # the flavour wants them, the table has none
        log.warning("the calibration table has no per-channel ranges for the head outputs (it predates them): the "
                    "head convolutions of %s stay float, which is slower; calibrate again to quantize them", flavour.name)
    return quantize_onnx(float_model, flavour_ranges(table, flavour, opts), flavour, exclude=set(opts.exclude), float_tensors=set(opts.float_tensors),
                         head_ranges=head_ranges, uint8_weights=opts.uint8_weights, scales=opts.scales)


def int8_record(table: CalibrationTable, flavour: Flavour, opts: Int8Options, report: QuantizeReport,
                float_onnx: Path, float_sha256: str, bias_images: int) -> dict:
    """The ``edgeq.int8`` metadata: everything needed to tell how the artifact was made
    (``float_sha256``: :func:`edgeq.utils.files.file_sha256` of ``float_onnx``)."""
    return {
        "method": opts.method or table.method,
        "percentile": opts.percentile if opts.percentile is not None else table.extra.get("percentile", 99.99),
        "images": table.image_count,
        "image_list_sha256": table.image_list_sha256,
        "placement": flavour.policy.note,
        "head_outputs": report.head_outputs,
        "float_nodes": list(opts.exclude),
        "float_tensors": list(opts.float_tensors),
        "weights": "uint8" if opts.uint8_weights else "int8",
        "bias_correction": {"images": bias_images, "convolutions": report.bias_corrected},
        "float_onnx": float_onnx.name,
        "float_onnx_sha256": float_sha256,
        **({"finetune": report.finetune} if report.finetune else {}),
        **({"budget": report.budget} if report.budget else {}),
    }


def write_int8(q_model, flavour: Flavour, record: dict, out_path: str | Path, props: dict[str, str] | None = None
               ) -> Path:
    """Stamp the flavour, its record and ``props`` (more ``edgeq.*`` keys) on ``q_model`` and
    write it atomically."""
    import onnx

    from edgeq.utils.files import atomic_path

    set_metadata(q_model, {FLAVOUR_META: flavour.name, INT8_META: json.dumps(record), **(props or {})})
    out_path = Path(out_path)
    try:
        with atomic_path(out_path) as tmp:
            onnx.save(q_model, str(tmp))
    except OSError as exc:
        raise EdgeqError(f"cannot write {out_path}: {exc.strerror or exc}") from None
    return out_path


def quantize_file(
    float_onnx: str | Path,
    table: CalibrationTable,
    flavour: Flavour | str,
    out_path: str | Path,
    opts: Int8Options | None = None,
    *,
    correction_batches: Sequence[np.ndarray] = (),
    progress: bool = False,
) -> tuple[Path, QuantizeReport]:
    """Write ``out_path``: the float ONNX with the flavour's Q/DQ pairs and metadata.

    ``correction_batches`` (preprocessed calibration inputs): measure on them the mean shift the
    flavour's rounding adds to each convolution's output and take it out of the biases first
    (:mod:`edgeq.export.bias_correction`); none: no correction. One flavour at a time; the
    export pipeline corrects all flavours from one float pass.
    """
    import onnx

    from edgeq.utils.files import file_sha256

    opts = opts or Int8Options()
    flavour = flavour_of(flavour, opts)
    float_onnx = Path(float_onnx)
    model = onnx.load(str(float_onnx))
    q, report = quantize_model(model, table, flavour, opts)
    if len(correction_batches):
        from edgeq.export.bias_correction import apply_bias_shifts, bias_shifts

        shifts = bias_shifts(model, {flavour.name: q}, correction_batches, progress=progress)[flavour.name]
        q, report = quantize_model(apply_bias_shifts(model, shifts), table, flavour, opts)
        report.bias_corrected = len(shifts)
    record = int8_record(table, flavour, opts, report, float_onnx, file_sha256(float_onnx), len(correction_batches))
    return write_int8(q, flavour, record, out_path), report
