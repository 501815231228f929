"""Bias correction: give back to each convolution the mean its quantization takes away.

Rounding a tensor is unbiased only for a smooth distribution wide against the step; the
activations of a trained MobileNetV3-YOLO are not (SiLU outputs pile up in [-0.28, 0.2] on a
0.08 step, percentile ranges clip the top), so each quantized convolution shifts the mean of
its output channels a little, and the shifts add up along the network. For every convolution
this module measures, on float activations, the mean of ``conv(Q(x), Q(W)) - conv(x, W)`` per
output channel and subtracts it from the float bias before the graph is quantized again: the
correction NNCF applies by default (FastBiasCorrection), computed from the flavour's own Q/DQ
graph so that each backend corrects what it rounds.

Each convolution is corrected for its own rounding, given float inputs; error that builds up
upstream is not modelled. (Correcting every convolution at once by the mean shift measured on
the quantized graph's own activations counts that upstream error twice and diverged on the
demo: 1.11 -> 3.21 mAP50-95 points after one pass.) The benefit is measured in mAP, not in
the head's mean error, which it does not reduce on the demo model (0.024 -> 0.027): on the
phase-2 epoch-1 checkpoint it cut the int8-ov drop from 1.37 to 1.10 points and int8-ort's from
0.43 to 0.23; on the bundled final one 0.51 -> 0.45 and 1.12 -> 0.92 (docs/BENCHMARKS.md).
``edgeq export --int8`` applies it by default (32 images).

The mean of a convolution's output over positions only needs, per input channel and kernel
tap, the mean of the input under that tap (the strided window of the zero-padded input), so no
convolution is run: the cost is one float inference per image plus a few slices per tensor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from edgeq.errors import EdgeqError

log = logging.getLogger("edgeq")


@dataclass(frozen=True)
class ConvQuantization:
    """How one convolution of a Q/DQ graph sees its data input and weights."""

    input: str  # the float tensor its input is quantized from
    scale: float | None  # None: the input stays float
    zero_point: int = 0
    low: int = -128  # the integer range of the input's number format
    high: int = 127
    weights: bool = False  # its weights go through a DequantizeLinear


def conv_quantization(q_model) -> dict[str, ConvQuantization]:
    """Conv node name -> how ``q_model`` (a Q/DQ ModelProto) quantizes that convolution."""
    from edgeq.graph import constants

    graph = q_model.graph
    producer = {out: node for node in graph.node for out in node.output}
    values = constants(graph)
    found: dict[str, ConvQuantization] = {}
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        weights = getattr(producer.get(node.input[1]), "op_type", None) == "DequantizeLinear"
        dq = producer.get(node.input[0])
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear":
            found[node.name] = ConvQuantization(node.input[0], None, weights=weights)
            continue
        zero = values[dq.input[2]] if len(dq.input) > 2 and dq.input[2] else np.zeros((), np.uint8)
        info = np.iinfo(zero.dtype)
        found[node.name] = ConvQuantization(q.input[0], float(values[dq.input[1]]), int(zero), int(info.min),
                                            int(info.max), weights)
    return found


def _fake_quant(x: np.ndarray, c: ConvQuantization) -> np.ndarray:
    if c.scale is None:
        return x
    return ((np.clip(np.round(x / c.scale) + c.zero_point, c.low, c.high) - c.zero_point) * c.scale).astype(np.float32)


@dataclass
class _Conv:
    name: str
    weight: np.ndarray  # (O, C/g, kh, kw), float
    weight_q: np.ndarray  # the same, dequantized as the flavour stores it
    quant: ConvQuantization
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    strides: tuple[int, int]
    dilations: tuple[int, int]
    groups: int
    bias: str | None


def _tap_means(x: np.ndarray, conv: _Conv) -> np.ndarray:
    """(C, kh, kw): the mean of each input channel under each kernel tap, over output positions."""
    top, left, bottom, right = conv.pads
    if any(conv.pads):
        x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    kh, kw = conv.weight.shape[2:]
    (sh, sw), (dh, dw) = conv.strides, conv.dilations
    ho = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
    out = np.empty((x.shape[1], kh, kw), np.float64)
    for i in range(kh):
        for j in range(kw):
            window = x[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]
            out[:, i, j] = window.mean(axis=(0, 2, 3), dtype=np.float64)
    return out


def _output_mean(weight: np.ndarray, taps: np.ndarray, groups: int) -> np.ndarray:
    o, cg, kh, kw = weight.shape
    w = weight.reshape(groups, o // groups, cg, kh, kw).astype(np.float64)
    return np.einsum("gocij,gcij->go", w, taps.reshape(groups, cg, kh, kw)).reshape(o)


def _convs(float_model, q_model) -> list[_Conv]:
    from onnx import helper

    from edgeq.export.qdq import per_channel_int8
    from edgeq.graph import constants

    values = constants(float_model.graph)
    quant = conv_quantization(q_model)
    convs = []
    for node in float_model.graph.node:
        if node.op_type != "Conv" or node.name not in quant:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            log.debug("bias correction skips %s: auto_pad", node.name)
            continue
        if node.input[1] not in values:
            raise EdgeqError(f"bias correction: the weights of {node.name} are not a constant")
        weight = np.asarray(values[node.input[1]], dtype=np.float32)
        if weight.ndim != 4:
            continue
        c = quant[node.name]
        weight_q = weight
        if c.weights:
            ints, scale = per_channel_int8(weight, 0)
            weight_q = ints.astype(np.float32) * scale.reshape(-1, 1, 1, 1)
        if c.scale is None and not c.weights:
            continue  # nothing of it is rounded
        convs.append(_Conv(node.name, weight, weight_q, c, tuple(attrs.get("pads", (0, 0, 0, 0))),
                           tuple(attrs.get("strides", (1, 1))), tuple(attrs.get("dilations", (1, 1))),
                           int(attrs.get("group", 1)), node.input[2] if len(node.input) > 2 and node.input[2] else None))
    return convs


def bias_shifts(float_model, q_models: dict[str, object], batches: Sequence[np.ndarray], *,
                progress: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """For each Q/DQ graph of ``q_models`` (flavour name -> ModelProto): conv node name -> the
    per-channel mean its quantization adds to the conv's output, measured on ``batches``
    (preprocessed NCHW float32) run once through ``float_model`` for every flavour."""
    from edgeq.graph import session_with_outputs
    from edgeq.utils.progress import progress_bar

    if not batches:
        raise EdgeqError("bias correction needs at least one image")
    convs = {name: _convs(float_model, q) for name, q in q_models.items()}
    input_name = float_model.graph.input[0].name
    fetch = list(dict.fromkeys(c.quant.input for cs in convs.values() for c in cs if c.quant.input != input_name))
    model = type(float_model)()
    model.CopyFrom(float_model)
    session = session_with_outputs(model, fetch, basic=True)
    sums = {name: {c.name: np.zeros(c.weight.shape[0], np.float64) for c in cs} for name, cs in convs.items()}
    with progress_bar(total=len(batches), desc="bias correction", unit="image", enabled=progress) as bar:
        for batch in batches:
            batch = np.ascontiguousarray(batch, dtype=np.float32)
            acts = dict(zip(fetch, session.run(fetch, {input_name: batch})))
            acts[input_name] = batch
            float_means: dict[tuple, np.ndarray] = {}  # (conv, input) -> float output mean, shared by the flavours
            for name, cs in convs.items():
                rounded: dict[tuple, np.ndarray] = {}
                for c in cs:
                    x = acts[c.quant.input]
                    key = (c.quant.input, c.quant.scale, c.quant.zero_point)
                    if key not in rounded:
                        rounded[key] = _fake_quant(x, c.quant)
                    exact = (c.name, c.quant.input)
                    if exact not in float_means:
                        float_means[exact] = _output_mean(c.weight, _tap_means(x, c), c.groups)
                    taps_q = _tap_means(rounded[key], c)
                    sums[name][c.name] += _output_mean(c.weight_q, taps_q, c.groups) - float_means[exact]
            bar.update(1)
    return {name: {conv: (total / len(batches)).astype(np.float32) for conv, total in per.items()}
            for name, per in sums.items()}


def apply_bias_shifts(float_model, shifts: dict[str, np.ndarray]):
    """A copy of ``float_model`` whose convolutions' biases have ``shifts`` subtracted (a bias is
    added where a convolution has none)."""
    from onnx import numpy_helper

    from edgeq.graph import constants, consumers

    model = type(float_model)()
    model.CopyFrom(float_model)
    graph = model.graph
    values = constants(graph)
    inits = {init.name: init for init in graph.initializer}
    const_nodes = {node.output[0]: node for node in graph.node if node.op_type == "Constant"}
    users = {name: len(readers) for name, readers in consumers(graph).items()}
    for node in graph.node:
        if node.name not in shifts:
            continue
        shift = shifts[node.name]
        bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if bias_name is None or users.get(bias_name, 0) > 1:  # a shared bias gets a copy of its own
            old = values[bias_name] if bias_name else np.zeros(shift.shape, np.float32)
            new_name = f"{node.name}.corrected_bias"
            graph.initializer.append(numpy_helper.from_array((old - shift).astype(np.float32), new_name))
            if bias_name:
                node.input[2] = new_name
            else:
                node.input.append(new_name)
            continue
        corrected = (values[bias_name] - shift).astype(np.float32)
        if bias_name in inits:
            inits[bias_name].CopyFrom(numpy_helper.from_array(corrected, bias_name))
        else:
            const_nodes[bias_name].attribute[0].t.CopyFrom(numpy_helper.from_array(corrected))
    return model
