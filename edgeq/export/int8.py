"""A float ONNX + a calibration table -> the INT8 ONNX of one backend's flavour.

The artifacts say what they are twice: in the file name (``stem.int8-ort.onnx``) and in the
metadata (``edgeq.flavour``), so a runtime can refuse a flavour made for another backend.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.export.calib_table import CalibrationTable
from edgeq.export.qdq import LOGIT_LIMIT, Policy, QuantizeReport, head_tensors, policy_for, quantize_onnx

log = logging.getLogger("edgeq")


@dataclass
class Int8Options:
    method: str | None = None  # calibrator; the table's own by default
    percentile: float | None = None
    exclude: tuple[str, ...] = ()  # ONNX node names kept float (--float-nodes)
    float_tensors: tuple[str, ...] = ()  # activations left unquantized (sensitivity fallback)
    uint8_weights: bool = False  # int8-ort: weights as uint8, zero point 128 (no int16 saturation without VNNI)
    head_outputs: str | None = None  # the head convolutions' outputs: float, per-channel, per-tensor; None: the flavour's


HEAD_OUTPUTS = ("float", "per-channel", "per-tensor")


def flavour_policy(flavour: str, opts: Int8Options | None = None) -> Policy:
    """The flavour's placement policy, with the options' head-output choice applied."""
    policy = policy_for(flavour)
    head = opts.head_outputs if opts else None
    if head is None or head == policy.head_outputs:
        return policy
    if head not in HEAD_OUTPUTS:
        raise EdgeqError(f"unknown head output mode {head!r}", note=f"choose from {', '.join(HEAD_OUTPUTS)}")
    return dataclasses.replace(policy, head_outputs=head)


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
    float_onnx: str | Path,
    table: CalibrationTable,
    flavour: str,
    out_path: str | Path,
    opts: Int8Options | None = None,
    *,
    correction_images: Sequence[np.ndarray] = (),
    progress: bool = False,
) -> tuple[Path, QuantizeReport]:
    """Write ``out_path``: the float ONNX with the flavour's Q/DQ pairs and metadata.

    ``correction_images`` (calibration images, BGR): measure on them the mean shift the
    flavour's rounding adds to each convolution's output and take it out of the biases first
    (:mod:`edgeq.export.bias_correction`); none: no correction.
    """
    import onnx

    from edgeq.export.onnx_export import set_metadata
    from edgeq.utils.files import atomic_path

    opts = opts or Int8Options()
    policy = flavour_policy(flavour, opts)
    model = onnx.load(str(float_onnx))
    head_ranges = table.channel_ranges() if policy.head_outputs == "per-channel" else None
    if head_ranges == {}:  # the flavour wants them, the table has none
        log.warning("the calibration table has no per-channel ranges for the head outputs (it predates them): "
                    "the head convolutions of int8-%s stay float, which is slower; calibrate again to quantize them",
                    policy.flavour)
    ranges = flavour_ranges(table, flavour, opts)

    def quantize(float_model):
        return quantize_onnx(float_model, ranges, policy, exclude=set(opts.exclude),
                             float_tensors=set(opts.float_tensors), head_ranges=head_ranges,
                             uint8_weights=opts.uint8_weights)

    q, report = quantize(model)
    if len(correction_images):
        from edgeq.export.bias_correction import apply_bias_shifts, bias_shifts
        from edgeq.export.onnx_export import read_imgsz
        from edgeq.runtime.preprocess import preprocess_batch

        size = read_imgsz(float_onnx)
        batches = [preprocess_batch([im], size)[0] for im in correction_images]
        shifts = bias_shifts(model, q, batches, progress=progress)
        q, report = quantize(apply_bias_shifts(model, shifts))
        report.bias_corrected = len(shifts)
    set_metadata(q, {
        "edgeq.flavour": f"int8-{policy.flavour}",
        "edgeq.int8": json.dumps({
            "method": opts.method or table.method,
            "percentile": opts.percentile if opts.percentile is not None else table.extra.get("percentile", 99.99),
            "images": table.image_count,
            "image_list_sha256": table.image_list_sha256,
            "placement": policy.note,
            "head_outputs": report.head_outputs,
            "float_nodes": list(opts.exclude),
            "float_tensors": list(opts.float_tensors),
            "weights": "uint8" if opts.uint8_weights else "int8",
            "bias_correction": {"images": len(correction_images), "convolutions": report.bias_corrected},
        }),
    })
    out_path = Path(out_path)
    try:
        with atomic_path(out_path) as tmp:
            onnx.save(q, str(tmp))
    except OSError as exc:
        raise EdgeqError(f"cannot write {out_path}: {exc.strerror or exc}") from None
    return out_path, report


# A tensor whose quantization alone leaves the head outputs above 50 dB SNR is not worth a
# float layer: on the demo model the 80 tensors below the 8 worst add up to NSR 2e-4 and cost at
# most about 0.1 mAP50-95 point together, while each float tensor costs OpenVINO real time. On a
# random-weight model every tensor is far below (1e-9 and less), so nothing is left float there.
FALLBACK_MIN_NSR = 1e-5


def fallback_tensors(ranked: list[dict], count: int, min_nsr: float = FALLBACK_MIN_NSR) -> tuple[str, ...]:
    """The tensors to leave float: the ``count`` worst of ``ranked`` (:func:`tensor_sensitivity`)
    whose noise-to-signal ratio is at least ``min_nsr``."""
    return tuple(r["tensor"] for r in ranked[:count] if r["nsr"] >= min_nsr)


def tensor_sensitivity(
    float_onnx: str | Path,
    table: CalibrationTable,
    flavour: str,
    images,
    opts: Int8Options | None = None,
    *,
    progress: bool = True,
) -> list[dict]:
    """How much quantizing each activation tensor alone disturbs the head's outputs, worst first.

    For every tensor the flavour quantizes, a graph with only that tensor quantized runs on
    ``images``; the score is the noise-to-signal ratio it causes at the head convolutions'
    outputs (summed over the three scales), with the logits clipped to +-LOGIT_LIMIT where the
    sigmoid stops moving. Per-tensor scales fail where one tensor mixes channels of very
    different ranges; this finds those tensors, whatever the calibrator. Every tensor counts,
    not only convolution inputs: on the trained demo model the stem convolution's output is
    the worst tensor of int8-ort (docs/BENCHMARKS.md).
    """
    import onnx
    from tqdm import tqdm

    from edgeq.export.observe import run_with_outputs, session_with_outputs
    from edgeq.export.onnx_export import read_imgsz
    from edgeq.export.qdq import plan
    from edgeq.runtime.preprocess import preprocess_batch

    opts = opts or Int8Options()
    policy = flavour_policy(flavour, opts)
    model = onnx.load(str(float_onnx))
    heads = head_tensors(model.graph)
    size = read_imgsz(float_onnx)
    batches = [preprocess_batch([im], size)[0] for im in images]
    refs = [[np.clip(r, -LOGIT_LIMIT, LOGIT_LIMIT) for r in run_with_outputs(float_onnx, heads, b)] for b in batches]
    ranges = flavour_ranges(table, flavour, opts)
    tensors = plan(model, policy, set(opts.exclude)).activations
    rows = []
    for tensor in tqdm(tensors, desc=f"sensitivity int8-{policy.flavour}", unit="tensor", disable=not progress):
        q, _ = quantize_onnx(model, ranges, policy, only_tensors={tensor}, weights=False)
        session = session_with_outputs(q, heads)
        signal = noise = 0.0
        for batch, ref in zip(batches, refs):
            got = session.run(heads, {session.get_inputs()[0].name: batch})
            for r, g in zip(ref, got):
                signal += float(np.square(r, dtype=np.float64).sum())
                noise += float(np.square(r.astype(np.float64) - np.clip(g, -LOGIT_LIMIT, LOGIT_LIMIT)).sum())
        rows.append({"tensor": tensor, "nsr": noise / max(signal, 1e-30)})
    return sorted(rows, key=lambda r: -r["nsr"])
