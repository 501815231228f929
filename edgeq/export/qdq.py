"""The Q/DQ rewrite: a float ONNX and calibrated ranges -> one flavour's INT8 graph.

:mod:`edgeq.export.qdq_plan` decides which tensors a flavour quantizes; this module inserts the
QuantizeLinear / DequantizeLinear pairs, the int8 per-channel weights (symmetric, range
[-127, 127]: TensorRT's rule), the int32 biases of whole-unit flavours and, where ONNX Runtime's
integer kernels need a quantized head output, folds the head's per-channel ranges into its
convolutions (:func:`normalize_heads`). Names follow :mod:`edgeq.graph` (``t_quantized``,
``t_dequantized``, ``t_normalized``), which is how verify finds its way back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgeq import flavours
from edgeq.errors import EdgeqError
from edgeq.flavours import Flavour
from edgeq.graph import (DEQUANTIZED, LOGIT_LIMIT, NORMALIZED_SUFFIX, QUANTIZED, constants, consumers, head_tensors,
                         insert_nodes)
from edgeq.export.qdq_plan import activation_params, plan, resolve, resolve_ties


def normalize_heads(model, channel_ranges: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, tuple[float, float, float]]:
    """Fold each head convolution's per-channel output range into its weights (in place).

    The convolution then writes ``(y - mid) / half`` (every channel in [-1, 1], so one per-tensor
    scale fits them all: what QLinearConv's scalar output scale needs), and a float Mul + Add in
    the decode restores ``y`` under its old name. Returns the ranges of the new tensors.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    users = {name: len(readers) for name, readers in consumers(graph).items()}
    ordered, ranges = [], {}
    for node in graph.node:
        ordered.append(node)
        out = node.output[0] if node.output else ""
        if node.op_type != "Conv" or out not in channel_ranges:
            continue
        lo, hi = (np.asarray(v, dtype=np.float64) for v in channel_ranges[out])
        lo, hi = np.clip(lo, -LOGIT_LIMIT, LOGIT_LIMIT), np.clip(hi, -LOGIT_LIMIT, LOGIT_LIMIT)
        hi = np.maximum(hi, lo + 1e-3)  # a constant channel (blank calibration images) still gets a scale
        mid, half = (hi + lo) / 2, (hi - lo) / 2
        weight_name = node.input[1]
        if weight_name not in inits or users.get(weight_name, 0) != 1:
            raise EdgeqError(f"{node.name}: its weight {weight_name} is not a constant of its own; cannot fold the "
                             "head's per-channel ranges into it")
        weight = numpy_helper.to_array(inits[weight_name]).astype(np.float64)
        if weight.shape[0] != lo.shape[0]:
            raise EdgeqError(f"{node.name}: {weight.shape[0]} output channels, the calibration table has ranges for "
                             f"{lo.shape[0]}", note="the table was made for another model; calibrate again")
        inits[weight_name].CopyFrom(numpy_helper.from_array(
            (weight / half.reshape(-1, *[1] * (weight.ndim - 1))).astype(np.float32), weight_name))
        if len(node.input) > 2 and node.input[2]:
            if users.get(node.input[2], 0) != 1 or node.input[2] not in inits:
                raise EdgeqError(f"{node.name}: its bias {node.input[2]} is not a constant of its own")
            bias = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
            inits[node.input[2]].CopyFrom(numpy_helper.from_array(((bias - mid) / half).astype(np.float32), node.input[2]))
        else:  # no bias (or an empty name for it): the shift needs one
            graph.initializer.append(numpy_helper.from_array((-mid / half).astype(np.float32), f"{out}_bias"))
            del node.input[2:]
            node.input.append(f"{out}_bias")
        normalized = out + NORMALIZED_SUFFIX
        node.output[0] = normalized
        shape = (1, -1) + (1,) * (weight.ndim - 2)
        graph.initializer.extend([
            numpy_helper.from_array(half.reshape(shape).astype(np.float32), f"{out}_half_range"),
            numpy_helper.from_array(mid.reshape(shape).astype(np.float32), f"{out}_mid_range"),
        ])
        ordered.append(helper.make_node("Mul", [normalized, f"{out}_half_range"], [f"{out}_rescaled"],
                                        name=f"{node.name}_rescale"))
        ordered.append(helper.make_node("Add", [f"{out}_rescaled", f"{out}_mid_range"], [out], name=f"{node.name}_recenter"))
        ranges[normalized] = (-1.0, 1.0, 1.0)
    del graph.node[:]
    graph.node.extend(ordered)
    return ranges


def per_channel_int8(weight: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """int8 weights and their float32 scales, with :func:`per_channel_symmetric`'s scale rule."""
    from edgeq.export.scales import per_channel_symmetric

    scale = per_channel_symmetric(np.array(weight, dtype=np.float32), axis)[0]
    shape = [1] * weight.ndim
    shape[axis] = -1
    q = np.clip(np.round(weight / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


# --------------------------------------------------------------------------- rewriting


@dataclass
class QuantizeReport:
    flavour: str
    activations: int = 0
    weights: int = 0
    constants: int = 0
    excluded: list[str] = field(default_factory=list)
    float_tensors: list[str] = field(default_factory=list)
    head_outputs: str = "float"  # how the head convolutions' outputs were left: float, per-tensor, per-channel
    bias_corrected: int = 0  # convolutions whose bias was corrected (edgeq.export.bias_correction)
    finetune: dict | None = None  # the fine-tune's record (edgeq.export.finetune), when the weights were trained
    budget: dict | None = None  # the budget search's record (edgeq.export.budget), when a budget chose the graph


def quantize_onnx(
    model,
    ranges: dict[str, tuple[float, float, float]],
    flavour: Flavour | str,
    *,
    exclude: set[str] | frozenset[str] = frozenset(),
    float_tensors: set[str] | frozenset[str] = frozenset(),
    only_tensors: set[str] | None = None,
    weights: bool = True,
    head_ranges: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    uint8_weights: bool = False,
    scales: dict[str, float] | None = None,
):
    """Return a copy of float ``model`` with Q/DQ pairs placed by ``flavour``'s policy.

    ``exclude``: nodes kept float (see :func:`plan`); ``float_tensors`` are activations left
    without Q/DQ (the sensitivity fallback), ``only_tensors`` restricts activations to these, and
    ``weights=False`` leaves every weight float (both to measure one tensor in isolation).

    ``ranges``: tensor name -> (lo, hi, amax) chosen by a calibrator. A tensor the plan needs
    and ``ranges`` lacks is an error naming it (the table belongs to another model).
    ``head_ranges``: head output -> per-channel (min, max), for a "per-channel" policy; without
    them the head outputs stay float.
    ``scales``: activation tensor -> scale learned by the fine-tune (edgeq.export.finetune),
    replacing the calibrated one (zero point and number format kept).
    ``uint8_weights``: store the int8 weights as uint8 with zero point 128 (the same values).
    ONNX Runtime then runs its u8u8 kernels. On x86 CPUs without VNNI, its u8s8 kernels add
    pairs of products in saturating int16, which doubled the noise of a trained demo model
    (docs/BENCHMARKS.md).
    """
    import onnx
    from onnx import helper, numpy_helper

    if model.opset_import[0].version < 13:
        raise EdgeqError(f"per-channel Q/DQ needs opset >= 13, the float ONNX has {model.opset_import[0].version}")
    flavour = resolve(flavour)
    policy = flavour.policy
    if uint8_weights and not flavour.uint8_weights:
        allowed = ", ".join(f.name for f in flavours.FLAVOURS.values() if f.uint8_weights)
        raise EdgeqError(f"uint8 weights are for {allowed} only (ONNX Runtime's u8u8 kernels), not {flavour.name}",
                         note="TensorRT needs symmetric int8 weights; OpenVINO's int8 path expects them too")
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    the_plan = plan(model, flavour, exclude)
    the_plan.activations = [
        t for t in the_plan.activations if t not in float_tensors and (only_tensors is None or t in only_tensors)
    ]
    if not weights:
        the_plan.weighted = []
    report_float = sorted(set(float_tensors))
    def mismatch(what: str, missing: list[str]) -> EdgeqError:
        return EdgeqError(
            f"the calibration table does not match this model: no {what} {missing[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
            note="calibrate this model again (edgeq calibrate), or pass the table made for it",
        )

    missing = [t for t in the_plan.activations if t not in ranges]
    if missing:
        raise mismatch("range for tensor", missing)
    normalized: dict[str, tuple[float, float, float]] = {}
    if policy.head_outputs == "per-channel" and head_ranges and only_tensors is None:
        heads = set(head_tensors(graph))
        outputs = [n.output[0] for n in graph.node if n.output and n.output[0] in heads and n.name not in exclude]
        absent = [t for t in outputs if t not in head_ranges]
        if absent:
            raise mismatch("per-channel range for head output", absent)
        normalized = normalize_heads(model, {t: head_ranges[t] for t in outputs})  # the plan's nodes, renamed
        ranges = {**ranges, **normalized}
        the_plan.activations.extend(normalized)
    consts = constants(graph)
    dtypes = {"int8": np.int8, "uint8": np.uint8}
    report = QuantizeReport(flavour.name, excluded=list(the_plan.excluded), float_tensors=report_float,
                            head_outputs="per-channel" if normalized else "per-tensor" if policy.head_outputs == "per-tensor" else "float")
    new_inits: list = []
    new_nodes: dict[int, list] = {}  # insert before node index
    params: dict[str, tuple[float, int, str]] = {}

    def scalar_params(name: str, scale: float, zp: int, dtype: str) -> tuple[str, str]:
        s_name, z_name = f"{name}_scale", f"{name}_zero_point"
        new_inits.append(numpy_helper.from_array(np.array(scale, dtype=np.float32), s_name))
        new_inits.append(numpy_helper.from_array(np.array(zp, dtype=dtypes[dtype]), z_name))
        return s_name, z_name

    def dequantized_constant(base: str, values: np.ndarray, scale_name: str, zp_name: str, before: int, **attrs) -> str:
        """A quantized initializer and the DequantizeLinear that reads it, placed before node ``before``."""
        new_inits.append(numpy_helper.from_array(values, f"{base}{QUANTIZED}"))
        new_nodes.setdefault(before, []).append(helper.make_node(
            "DequantizeLinear", [f"{base}{QUANTIZED}", scale_name, zp_name], [f"{base}{DEQUANTIZED}"],
            name=f"{base}_DequantizeLinear", **attrs))
        return f"{base}{DEQUANTIZED}"

    def channel_params(base: str, scale: np.ndarray, zp_dtype, zp: int = 0) -> tuple[str, str]:
        new_inits.append(numpy_helper.from_array(scale, f"{base}_scale"))
        new_inits.append(numpy_helper.from_array(np.full(scale.shape, zp, zp_dtype), f"{base}_zero_point"))
        return f"{base}_scale", f"{base}_zero_point"

    # 1. activations: one Q -> DQ pair per tensor, all consumers (but excluded nodes) rewired
    producer_index = {out: i for i, node in enumerate(graph.node) for out in node.output}
    rewire: dict[str, str] = {}
    for tensor in the_plan.activations:
        lo, hi, amax = ranges[tensor]
        params[tensor] = activation_params(lo, hi, amax, policy.activations)
    for tensor, source in resolve_ties(the_plan.ties):
        if tensor in params and source in params:
            params[tensor] = params[source]
    for tensor, scale in (scales or {}).items():
        if tensor in params:
            params[tensor] = (float(np.float32(scale)), *params[tensor][1:])
    for tensor in the_plan.activations:
        scale, zp, dtype = params[tensor]
        s_name, z_name = scalar_params(tensor, scale, zp, dtype)
        q = helper.make_node("QuantizeLinear", [tensor, s_name, z_name], [f"{tensor}{QUANTIZED}"], name=f"{tensor}_QuantizeLinear")
        dq = helper.make_node("DequantizeLinear", [f"{tensor}{QUANTIZED}", s_name, z_name], [f"{tensor}{DEQUANTIZED}"],
                              name=f"{tensor}_DequantizeLinear")
        at = producer_index.get(tensor, -1) + 1  # right after the producer (graph inputs: first)
        new_nodes.setdefault(at, []).extend([q, dq])
        rewire[tensor] = f"{tensor}{DEQUANTIZED}"
        report.activations += 1
    excluded = set(the_plan.excluded)
    for node in graph.node:
        if node.name in excluded:
            continue
        for i, name in enumerate(node.input):
            if name in rewire:
                node.input[i] = rewire[name]

    # 2. weights (int8 per channel) and, for whole-unit flavours, int32 biases
    source_of = {dq: tensor for tensor, dq in rewire.items()}
    by_name = {node.name: (i, node) for i, node in enumerate(graph.node)}
    for node_name in the_plan.weighted:
        index, node = by_name[node_name]
        w_name = node.input[1]
        weight = consts[w_name]
        axis = 0
        if node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            axis = 0 if trans_b else 1
        q, scale = per_channel_int8(weight, axis)
        base = f"{node_name}_weight"
        if uint8_weights:
            params_w = channel_params(base, scale, np.uint8, 128)
            q = (q.astype(np.int16) + 128).astype(np.uint8)
        else:
            params_w = channel_params(base, scale, np.int8)
        node.input[1] = dequantized_constant(base, q, *params_w, index, axis=axis)
        report.weights += 1
        source = source_of.get(node.input[0], node.input[0])
        if policy.quantize_bias and len(node.input) > 2 and node.input[2] in consts and source in params:
            bias = consts[node.input[2]].astype(np.float64)
            b_scale = (params[source][0] * scale.astype(np.float64)).astype(np.float32)
            b_q = np.clip(np.round(bias / b_scale), -(2**31), 2**31 - 1).astype(np.int32)
            base = f"{node_name}_bias"
            node.input[2] = dequantized_constant(base, b_q, *channel_params(base, b_scale, np.int32), index, axis=0)

    # 3. constant operands of elementwise ops (Add's +3, Mul's 1/6 ...)
    for node_name, names in the_plan.constants.items():
        index, node = by_name[node_name]
        for name in names:
            value = consts[name].astype(np.float32)
            lo, hi = float(min(value.min(), 0.0)), float(max(value.max(), 0.0))
            scale, zp, dtype = activation_params(lo, hi, max(abs(lo), abs(hi)), policy.activations)
            qmin, qmax = (0, 255) if dtype == "uint8" else (-128, 127)
            q = np.clip(np.round(value / scale) + zp, qmin, qmax).astype(dtypes[dtype])
            base = f"{node_name}_{name}".replace("/", "_")
            node.input[list(node.input).index(name)] = dequantized_constant(
                base, q, *scalar_params(base, scale, zp, dtype), index)
            report.constants += 1

    insert_nodes(graph, new_nodes)
    graph.initializer.extend(new_inits)
    _drop_unused_initializers(graph)
    return model, report


def _drop_unused_initializers(graph) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
