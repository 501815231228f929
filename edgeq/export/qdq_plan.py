"""Which tensors one INT8 flavour quantizes in a float ONNX graph, and in which number format.

A flavour's :class:`~edgeq.flavours.Policy` is data (edgeq/flavours.py); this module applies
its rules to one graph without changing it (:func:`plan`), so the calibration can observe every
tensor any flavour will need (:func:`candidate_tensors`), the sensitivity analysis can rank
them, and :mod:`edgeq.export.qdq` can rewrite the graph.

Always, whatever the flavour: the detection decode (every node after the last convolution:
sigmoid, grid and anchor arithmetic, the final concat) stays float; a tensor gets at most one
Q/DQ pair, shared by all its consumers, so a residual branch or a Concat input is quantized
once with one scale.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from edgeq import flavours
from edgeq.errors import EdgeqError
from edgeq.flavours import HEAD_NORMALIZATION, HEAD_OUTPUTS, Flavour
from edgeq.graph import WEIGHTED, constants, consumers, decode_nodes


def resolve(flavour: Flavour | str, head_outputs: str | None = None) -> Flavour:
    """The flavour (by object, name or key), with a head-output mode other than its default."""
    flavour = flavours.get(flavour) if isinstance(flavour, str) else flavour
    if head_outputs is None or head_outputs == flavour.policy.head_outputs:
        return flavour
    if head_outputs not in HEAD_OUTPUTS:
        raise EdgeqError(f"unknown head output mode {head_outputs!r}", note=f"choose from {', '.join(HEAD_OUTPUTS)}")
    if head_outputs == "per-channel" and HEAD_NORMALIZATION not in flavour.steps:
        capable = [f.name for f in flavours.FLAVOURS.values() if HEAD_NORMALIZATION in f.steps]
        raise EdgeqError(f"{flavour.name} keeps its head convolutions' outputs float; per-channel head outputs are "
                         f"for {', '.join(capable)}")
    return dataclasses.replace(flavour, policy=dataclasses.replace(flavour.policy, head_outputs=head_outputs))


@dataclass
class Plan:
    """The tensors one flavour quantizes in one graph."""

    flavour: Flavour
    activations: list[str] = field(default_factory=list)  # tensors getting a shared Q/DQ pair
    constants: dict[str, list[str]] = field(default_factory=dict)  # node -> constant inputs to quantize
    weighted: list[str] = field(default_factory=list)  # nodes whose weights go int8
    excluded: list[str] = field(default_factory=list)  # nodes kept float on request
    ties: list[tuple[str, str]] = field(default_factory=list)  # (tensor, tensor whose scale it takes)


def plan(model, flavour: Flavour | str, exclude: set[str] | frozenset[str] = frozenset(), *,
         decode: set[str] | None = None) -> Plan:
    """Apply a flavour's rules to ``model``'s graph: what gets quantized (nothing is changed yet).

    ``exclude``: node names kept float. Per-channel head outputs are added by the rewrite.
    ``decode``: :func:`~edgeq.graph.decode_nodes` of the graph, when the caller has it already.
    """
    flavour = resolve(flavour)
    policy = flavour.policy
    graph = model.graph
    consts = constants(graph)
    decode = decode_nodes(graph) if decode is None else decode
    graph_outputs = {o.name for o in graph.output}
    users = consumers(graph)
    result = Plan(flavour)
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
            readers = users.get(out, [])
            into_decode = any(u.name in decode for u in readers)
            if out not in graph_outputs and readers and (head_quantized or not into_decode):
                chosen[out] = None
                if rule.tie == "output":
                    result.ties.append((out, node.input[0]))
                elif rule.tie == "input" and len(users.get(node.input[0], [])) == 1:
                    result.ties.append((node.input[0], out))
    result.activations = list(chosen)
    return result


def candidate_tensors(model) -> list[str]:
    """Every activation any flavour may quantize: what one calibration must observe."""
    decode = decode_nodes(model.graph)
    names: dict[str, None] = {}
    for flavour in flavours.FLAVOURS.values():
        for name in plan(model, flavour, decode=decode).activations:
            names[name] = None
    return list(names)


def activation_params(lo: float, hi: float, amax: float, mode: str) -> tuple[float, int, str]:
    """(scale, zero point, dtype) of an activation tensor for a policy's number format."""
    from edgeq.export.scales import asymmetric_uint8, symmetric_int8

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


def resolve_ties(ties: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Follow chains (a takes b's scale, b takes c's) to their end; sources first."""
    target = dict(ties)

    def root(name: str) -> str:
        seen = set()
        while name in target and name not in seen:
            seen.add(name)
            name = target[name]
        return name

    return [(tensor, root(tensor)) for tensor in target]
