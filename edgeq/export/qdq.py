"""Q/DQ placement on the float ONNX graph: one calibration, one graph per backend.

The backends fuse different Q/DQ patterns into integer kernels, so each INT8 flavour is a
:class:`Policy`: which op types are quantized, on which inputs, whether their outputs are, and
in which number format. The rules are data (:data:`POLICIES`); :func:`quantize_onnx` applies
one to a float ONNX with ranges from a calibration table.

Always, whatever the flavour:

* the detection decode (every node after the last convolution: sigmoid, grid and anchor
  arithmetic, the final concat) stays float (:func:`decode_nodes`); the head convolutions get
  quantized inputs and weights, and float outputs, or, where a flavour's integer kernels need a
  quantized output (ONNX Runtime), per-channel ranges folded into the convolution
  (:func:`normalize_heads`);
* weights are int8, symmetric, per output channel, range [-127, 127] (TensorRT's rule);
* a tensor gets at most one Q/DQ pair, shared by all its consumers, so a residual branch or a
  Concat input is quantized once with one scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgeq.errors import EdgeqError

WEIGHTED = {"Conv": 1, "Gemm": 1}  # op -> index of its weight input


@dataclass(frozen=True)
class OpRule:
    """What a flavour quantizes around one op type."""

    inputs: tuple[int, ...] | str = (0,)  # activation inputs to quantize, or "all"
    output: bool = False  # quantize the op's output too (whole DQ -> op -> Q units)
    constants: bool = False  # quantize constant (non-weight) inputs, e.g. Add's +3
    # "input": the input tensor takes the output's scale (a ReLU/Clip then disappears into the
    # saturating Q before it); "output": the output keeps the input's scale (MaxPool, Resize run
    # on int8 only when both sides agree).
    tie: str | None = None


@dataclass(frozen=True)
class Policy:
    flavour: str
    backend: str
    activations: str  # "int8" (symmetric, zero point 0), "uint8" (asymmetric) or "auto8" (uint8 zp 0 when >= 0, else int8)
    rules: dict[str, OpRule]
    quantize_bias: bool = False  # int32 bias with scale = input scale x weight scale (ONNX Runtime's QLinearConv)
    # the head convolutions' outputs (box and score logits, read by the float decode):
    # "float"; "per-tensor" (one scale: cost 2.4-3.0 mAP50-95 points on the demo); "per-channel"
    # (each channel's calibrated range folded into the convolution, :func:`normalize_heads`)
    head_outputs: str = "float"
    note: str = ""
    # activation tensors the sensitivity analysis leaves float by default (export --fallback):
    # chosen per backend by measuring accuracy and speed together (docs/BENCHMARKS.md)
    default_fallback: int = 0


_ELEMENTWISE_ALL = OpRule(inputs="all", output=True, constants=True)

POLICIES: dict[str, Policy] = {
    # TensorRT explicit quantization: Q/DQ on the inputs of the layers that run in int8; the
    # builder propagates and fuses the rest. Symmetric int8 only, zero point 0.
    "trt": Policy(
        "trt", "tensorrt", "int8",
        {"Conv": OpRule((0,)), "Gemm": OpRule((0,))},
        note="int8 symmetric, Q/DQ on Conv/Gemm inputs only (TensorRT explicit quantization)",
        default_fallback=8,  # same placement as int8-ov, whose accuracy needs it
    ),
    # ONNX Runtime's CPU provider turns DQ -> op -> Q units into QLinear* kernels; a unit that is
    # not closed by a Q on its output stays float, so every op on the path is quantized. The
    # head convolutions' outputs (box and score logits) stay float by default: the three head
    # convolutions then run in float (1-3 % of the INT8 latency at 320 and 640) and save
    # 0.2 mAP50-95 points on the final demo checkpoint against per-channel output ranges
    # (Int8Options.head_outputs="per-channel"); one per-tensor scale cost 2.4 points
    # (docs/BENCHMARKS.md).
    "ort": Policy(
        "ort", "onnxruntime", "uint8",
        {
            "Conv": OpRule((0,), output=True),
            "Gemm": OpRule((0,), output=True),
            "Add": _ELEMENTWISE_ALL,
            "Mul": _ELEMENTWISE_ALL,
            "Sigmoid": OpRule((0,), output=True),
            "Clip": OpRule((0,), output=True, tie="input"),
            "Relu": OpRule((0,), output=True, tie="input"),
            "Concat": OpRule("all", output=True),
            "GlobalAveragePool": OpRule((0,), output=True),
            "MaxPool": OpRule((0,), output=True, tie="output"),
            "Resize": OpRule((0,), output=True, tie="output"),
        },
        quantize_bias=True,
        head_outputs="float",
        note="uint8 asymmetric activations, whole DQ -> op -> Q units (ONNX Runtime QLinear kernels)",
        # phase 1's best demo checkpoint: drop 2.41 -> 1.60 mAP50-95 points for 1.10-1.14x the
        # latency (the stem and first blocks' convolutions run in float); interim: 0.58 -> 0.70
        default_fallback=8,
    ),
    # OpenVINO: measured on the demo model at 320 (docs/BENCHMARKS.md): Q/DQ on Conv/MatMul
    # inputs only ran as fast as adding Add/Concat inputs and faster than NNCF's graph, with
    # fewer rounding points. Asymmetric uint8 activations: h-swish outputs reach down to -0.375
    # only, so a symmetric int8 scale wastes most of its negative half; asymmetric ran as fast and
    # cut the drop without fallback from 2.05 to 0.49 mAP50-95 points (with fallback 8: 0.56 -> 0.02).
    "ov": Policy(
        "ov", "openvino", "uint8",
        {"Conv": OpRule((0,)), "Gemm": OpRule((0,))},
        note="uint8 asymmetric activations on Conv/MatMul inputs (OpenVINO low-precision transformations)",
        default_fallback=8,
    ),
}

FLAVOURS = tuple(POLICIES)


def policy_for(flavour: str) -> Policy:
    name = flavour.removeprefix("int8-")
    if name not in POLICIES:
        raise EdgeqError(f"unknown INT8 flavour {flavour!r}", note=f"choose from {', '.join(FLAVOURS)}")
    return POLICIES[name]


# --------------------------------------------------------------------------- graph facts


def constants(graph) -> dict[str, np.ndarray]:
    """Initializers and Constant-node outputs by name."""
    from onnx import numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def decode_nodes(graph) -> set[str]:
    """Names of the nodes after the last convolution: the detection decode, never quantized.

    A node is part of the decode when it is not a Conv and no Conv/Gemm is reachable from it.
    """
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    feeds_conv: dict[str, bool] = {}

    def reaches_conv(node) -> bool:
        if node.name in feeds_conv:
            return feeds_conv[node.name]
        feeds_conv[node.name] = False  # cycle guard (ONNX graphs are acyclic)
        result = any(
            nxt.op_type in WEIGHTED or reaches_conv(nxt) for out in node.output for nxt in consumers.get(out, [])
        )
        feeds_conv[node.name] = result
        return result

    import sys

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph.node) + 100))
    try:
        return {n.name for n in graph.node if n.op_type not in WEIGHTED and n.op_type != "Constant" and not reaches_conv(n)}
    finally:
        sys.setrecursionlimit(limit)


def head_tensors(graph) -> list[str]:
    """The head convolutions' outputs: what the decode turns into boxes and scores."""
    decode = decode_nodes(graph)
    feeds = {name for n in graph.node if n.name in decode for name in n.input}
    return [n.output[0] for n in graph.node if n.op_type == "Conv" and n.output[0] in feeds]


# Every head output goes through a sigmoid. Beyond +-LOGIT_LIMIT it is flat (sigmoid(-8) = 3e-4,
# under the usual 0.001 confidence threshold even before objectness x class): clipping the
# calibrated range there spends the 256 levels where a logit still moves a box or a score.
LOGIT_LIMIT = 8.0
NORMALIZED_SUFFIX = "_normalized"


def normalize_heads(model, channel_ranges: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, tuple[float, float, float]]:
    """Fold each head convolution's per-channel output range into its weights (in place).

    The convolution then writes ``(y - mid) / half`` (every channel in [-1, 1], so one per-tensor
    scale fits them all: what QLinearConv's scalar output scale needs), and a float Mul + Add in
    the decode restores ``y`` under its old name. Returns the ranges of the new tensors.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
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


@dataclass
class Plan:
    """The tensors one flavour quantizes in one graph."""

    policy: Policy
    activations: list[str] = field(default_factory=list)  # tensors getting a shared Q/DQ pair
    constants: dict[str, list[str]] = field(default_factory=dict)  # node -> constant inputs to quantize
    weighted: list[str] = field(default_factory=list)  # nodes whose weights go int8
    excluded: list[str] = field(default_factory=list)  # nodes kept float on request
    ties: list[tuple[str, str]] = field(default_factory=list)  # (tensor, tensor whose scale it takes)


def plan(model, policy: Policy | str, exclude: set[str] | frozenset[str] = frozenset()) -> Plan:
    """Apply a policy's rules to ``model``'s graph: what gets quantized (nothing is changed yet).

    ``exclude``: node names kept float. Per-channel head outputs are added by :func:`quantize_onnx`.
    """
    policy = policy_for(policy) if isinstance(policy, str) else policy
    graph = model.graph
    consts = constants(graph)
    decode = decode_nodes(graph)
    graph_outputs = {o.name for o in graph.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    result = Plan(policy)
    chosen: dict[str, None] = {}
    for node in graph.node:
        rule = policy.rules.get(node.op_type)
        if rule is None or node.name in decode:
            continue
        if node.name in exclude:
            result.excluded.append(node.name)
            continue
        indices = range(len(node.input)) if rule.inputs == "all" else rule.inputs
        weight_index = WEIGHTED.get(node.op_type)
        for i in indices:
            if i >= len(node.input) or not node.input[i] or i == weight_index:
                continue
            name = node.input[i]
            if name in consts:
                if rule.constants and node.op_type not in ("Clip",):
                    result.constants.setdefault(node.name, []).append(name)
                continue
            chosen[name] = None
        if weight_index is not None:
            if node.input[weight_index] not in consts:
                raise EdgeqError(f"{node.name}: its weight {node.input[weight_index]} is not a constant; cannot quantize it")
            result.weighted.append(node.name)
        out = node.output[0]
        head_quantized = node.op_type in WEIGHTED and policy.head_outputs == "per-tensor"
        if rule.output or head_quantized:
            users = consumers.get(out, [])
            into_decode = any(u.name in decode for u in users)
            if out not in graph_outputs and users and (head_quantized or not into_decode):
                chosen[out] = None
                if rule.tie == "output":
                    result.ties.append((out, node.input[0]))
                elif rule.tie == "input" and len(consumers.get(node.input[0], [])) == 1:
                    result.ties.append((node.input[0], out))
    result.activations = list(chosen)
    return result


def candidate_tensors(model) -> list[str]:
    """Every activation any flavour may quantize: what one calibration must observe."""
    names: dict[str, None] = {}
    for policy in POLICIES.values():
        for name in plan(model, policy).activations:
            names[name] = None
    return list(names)


# --------------------------------------------------------------------------- numbers


def activation_params(lo: float, hi: float, amax: float, mode: str) -> tuple[float, int, str]:
    """(scale, zero point, dtype) of an activation tensor for a policy's number format."""
    from edgeq.export.calibrators import asymmetric_uint8, symmetric_int8

    if mode == "int8":
        scale, zp = symmetric_int8(amax)
        return scale, zp, "int8"
    if mode == "uint8":
        scale, zp = asymmetric_uint8(lo, hi)
        return scale, zp, "uint8"
    if mode == "auto8":  # non-negative tensors (after ReLU, clip, sigmoid) get all 256 levels
        if lo >= 0:
            scale, _ = asymmetric_uint8(0.0, hi)
            return scale, 0, "uint8"
        scale, zp = symmetric_int8(amax)
        return scale, zp, "int8"
    raise ValueError(f"unknown activation format {mode!r}")


def per_channel_int8(weight: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """int8 weights and their float32 scales, with :func:`per_channel_symmetric`'s scale rule."""
    import torch

    from edgeq.export.calibrators import per_channel_symmetric

    scale = per_channel_symmetric(torch.from_numpy(np.array(weight, dtype=np.float32)), axis)[0].numpy()  # a copy: writable
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


def quantize_onnx(
    model,
    ranges: dict[str, tuple[float, float, float]],
    policy: Policy | str,
    *,
    exclude: set[str] | frozenset[str] = frozenset(),
    float_tensors: set[str] | frozenset[str] = frozenset(),
    only_tensors: set[str] | None = None,
    weights: bool = True,
    head_ranges: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    uint8_weights: bool = False,
):
    """Return a copy of float ``model`` with Q/DQ pairs placed by ``policy``.

    ``exclude``: nodes kept float (see :func:`plan`); ``float_tensors`` are activations left
    without Q/DQ (the sensitivity fallback), ``only_tensors`` restricts activations to these, and
    ``weights=False`` leaves every weight float (both to measure one tensor in isolation).

    ``ranges``: tensor name -> (lo, hi, amax) chosen by a calibrator. A tensor the plan needs
    and ``ranges`` lacks is an error naming it (the table belongs to another model).
    ``head_ranges``: head output -> per-channel (min, max), for a "per-channel" policy; without
    them the head outputs stay float.
    ``uint8_weights``: store the int8 weights as uint8 with zero point 128 (the same values).
    ONNX Runtime then runs its u8u8 kernels. On x86 CPUs without VNNI, its u8s8 kernels add
    pairs of products in saturating int16, which doubled the noise of a trained demo model
    (docs/BENCHMARKS.md).
    """
    import onnx
    from onnx import helper, numpy_helper

    if model.opset_import[0].version < 13:
        raise EdgeqError(f"per-channel Q/DQ needs opset >= 13, the float ONNX has {model.opset_import[0].version}")
    policy = policy_for(policy) if isinstance(policy, str) else policy
    if uint8_weights and policy.flavour != "ort":
        raise EdgeqError(f"uint8 weights are for int8-ort only (ONNX Runtime's u8u8 kernels), not int8-{policy.flavour}",
                         note="TensorRT needs symmetric int8 weights; OpenVINO's int8 path expects them too")
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    the_plan = plan(model, policy, exclude)
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
    report = QuantizeReport(policy.flavour, excluded=list(the_plan.excluded), float_tensors=report_float,
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
        new_inits.append(numpy_helper.from_array(values, f"{base}_quantized"))
        new_nodes.setdefault(before, []).append(helper.make_node(
            "DequantizeLinear", [f"{base}_quantized", scale_name, zp_name], [f"{base}_dequantized"],
            name=f"{base}_DequantizeLinear", **attrs))
        return f"{base}_dequantized"

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
    for tensor, source in _resolve_ties(the_plan.ties):
        if tensor in params and source in params:
            params[tensor] = params[source]
    for tensor in the_plan.activations:
        scale, zp, dtype = params[tensor]
        s_name, z_name = scalar_params(tensor, scale, zp, dtype)
        q = helper.make_node("QuantizeLinear", [tensor, s_name, z_name], [f"{tensor}_quantized"], name=f"{tensor}_QuantizeLinear")
        dq = helper.make_node("DequantizeLinear", [f"{tensor}_quantized", s_name, z_name], [f"{tensor}_dequantized"],
                              name=f"{tensor}_DequantizeLinear")
        at = producer_index.get(tensor, -1) + 1  # right after the producer (graph inputs: first)
        new_nodes.setdefault(at, []).extend([q, dq])
        rewire[tensor] = f"{tensor}_dequantized"
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

    ordered = []
    for i, node in enumerate(graph.node):
        ordered.extend(new_nodes.get(i, []))
        ordered.append(node)
    ordered.extend(new_nodes.get(len(graph.node), []))
    del graph.node[:]
    graph.node.extend(ordered)
    graph.initializer.extend(new_inits)
    _drop_unused_initializers(graph)
    return model, report


def _resolve_ties(ties: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Follow chains (a takes b's scale, b takes c's) to their end; sources first."""
    target = dict(ties)

    def root(name: str) -> str:
        seen = set()
        while name in target and name not in seen:
            seen.add(name)
            name = target[name]
        return name

    return [(tensor, root(tensor)) for tensor in target]


def _drop_unused_initializers(graph) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
