"""A flavour's Q/DQ ONNX, run in PyTorch with trainable float weights: the graph the fine-tune trains.

:class:`QdqModule` interprets the exported INT8 graph node by node. Every QuantizeLinear /
DequantizeLinear pair becomes a fake-quant with the graph's own scale, zero point and integer
range (round half to even, then clamp: what ONNX Runtime, OpenVINO and TensorRT compute), with a
straight-through gradient. Each Conv/Gemm's weight is a float parameter, quantized per channel on
the fly with :func:`edgeq.export.qdq.per_channel_int8`'s rule (max |w| / 127, [-127, 127]), and an
int32 bias is re-rounded on the scale its input and weights give it, so the parameters can be
written back into the float ONNX (:func:`trained_float_model`) and quantized by the normal export
path into exactly the graph that was trained. The same class runs the float ONNX (no Q/DQ nodes)
as the teacher.

Only the ops edgeq's float exports contain are implemented (YOLOv5 heads, MobileNetV3 and CSP
backbones); any other op is an error naming the node.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeq.errors import EdgeqError
from edgeq.graph import NORMALIZED_SUFFIX, consumers, constants

_INTEGER_RANGES = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127),
                   np.dtype(np.int32): (-(2**31), 2**31 - 1)}


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """``(clamp(round(x / scale) + zero, low, high) - zero) * scale`` with a straight-through round."""
    q = x / scale + zero
    q = q + (torch.round(q) - q).detach()
    return (torch.clamp(q, low, high) - zero) * scale


def weight_fake_quant(weight: torch.Tensor, axis: int) -> torch.Tensor:
    """Per-channel symmetric int8 fake-quant of ``weight`` (the export's rule; scales not trained)."""
    dims = [d for d in range(weight.ndim) if d != axis]
    amax = weight.detach().abs().amax(dim=dims, keepdim=True)
    scale = torch.clamp(amax / 127.0, min=float(np.finfo(np.float32).eps))
    return fake_quant(weight, scale, torch.zeros((), dtype=weight.dtype), -127, 127)


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class QdqModule(nn.Module):
    """``q_model`` (an ONNX ModelProto, float or Q/DQ) as a module returning ``outputs``.

    ``float_model``: the float ONNX ``q_model`` was quantized from; each Conv/Gemm weight starts
    from its float value there (the Q/DQ graph only has the rounded one). Biases start from the
    values ``q_model`` uses (bias correction included). ``outputs``: tensor names to return, in
    order (any tensor of the graph; the float tensor names survive the Q/DQ rewrite).
    """

    def __init__(self, q_model, outputs: Iterable[str], float_model=None, *, learn_scales: bool = False):
        super().__init__()
        graph = q_model.graph
        self.outputs = list(outputs)
        self._values = constants(graph)
        producer = {out: node for node in graph.node for out in node.output}
        float_weights = _float_weights(float_model) if float_model is not None else {}
        self.weights = nn.ParameterDict()
        self.biases = nn.ParameterDict()
        self._layers: dict[str, dict] = {}  # Conv/Gemm node name -> how its weight and bias are made
        self._skip: set[str] = set()  # DequantizeLinear nodes a layer's parameters replace
        for node in graph.node:
            if node.op_type in ("Conv", "Gemm"):
                self._bind_layer(node, producer, float_weights)
            if node.output and node.output[0].endswith(NORMALIZED_SUFFIX):
                raise EdgeqError(f"{node.name}: the head outputs are normalized (--head-outputs per-channel), which "
                                 "the fine-tune does not model", note="fine-tune with the flavour's default head outputs")
        self._pairs = self._fuse_pairs(graph, producer)
        self.log_scales = nn.ParameterDict()  # learned activation scales: scale = calibrated * exp(p)
        self._group: dict[str, str] = {}  # fused pair -> its scale's key (tied tensors share one)
        if learn_scales:
            for dq, (_, scale, zero, low, high) in self._pairs.items():
                key = f"g{len(self.log_scales)}"
                key = next((k for d, k in self._group.items() if self._pairs[d][1:] == (scale, zero, low, high)), key)
                self._group[dq] = key
                if key not in self.log_scales:
                    self.log_scales[key] = nn.Parameter(torch.zeros(()))
        self._nodes = _needed(graph, self.outputs)
        self._const = {k: torch.from_numpy(np.array(v)) for k, v in self._values.items()}
        self.input_name = next(i.name for i in graph.input if i.name not in self._values)

    # ------------------------------------------------------------------ binding
    def _bind_layer(self, node, producer, float_weights) -> None:
        key = node.name.replace(".", "_")
        layer: dict = {"key": key, "weight_axis": None, "bias_scale_in": None}
        w_in = node.input[1]
        dq = producer.get(w_in)
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in self._values:
            layer["weight_axis"] = _attrs(dq).get("axis", 1)
            self._skip.add(dq.name)
            start = float_weights.get(node.name)
            if start is None:  # no float model: start from the rounded weights
                start = _dequantize(self._values, dq)
        elif w_in in self._values:
            start = self._values[w_in]
        else:
            raise EdgeqError(f"{node.name}: its weight {w_in} is computed, not a constant; cannot train it")
        self.weights[key] = nn.Parameter(torch.from_numpy(np.array(start, dtype=np.float32)))
        if len(node.input) > 2 and node.input[2]:
            b_in = node.input[2]
            dq = producer.get(b_in)
            if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in self._values:
                start = _dequantize(self._values, dq)
                self._skip.add(dq.name)
                layer["bias_scale_in"] = self._input_scale(node, producer)
                layer["input_dq"] = producer[node.input[0]].name
            elif b_in in self._values:
                start = self._values[b_in]
            else:
                raise EdgeqError(f"{node.name}: its bias {b_in} is computed, not a constant; cannot train it")
            self.biases[key] = nn.Parameter(torch.from_numpy(np.array(start, dtype=np.float32)))
        self._layers[node.name] = layer

    def _fuse_pairs(self, graph, producer) -> dict[str, tuple]:
        """DequantizeLinear name -> (float input, scale, zero point, low, high) for each Q -> DQ pair
        on one per-tensor scale: run as one fake-quant (the integer tensor between them is never read)."""
        readers = consumers(graph)
        pairs = {}
        for node in graph.node:
            q = producer.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
            if q is None or q.op_type != "QuantizeLinear" or list(q.input[1:]) != list(node.input[1:]):
                continue
            scale, zero = self._values[q.input[1]], self._values[q.input[2]]
            if scale.ndim or any(r.op_type != "DequantizeLinear" for r in readers.get(q.output[0], [])):
                continue
            low, high = _INTEGER_RANGES[zero.dtype]
            pairs[node.name] = (q.input[0], float(scale), int(zero), low, high)
            self._skip.add(q.name)
        return pairs

    def _input_scale(self, node, producer) -> float:
        """The scale of the activation a whole-unit layer reads (its int32 bias scale is this x weight scale)."""
        dq = producer.get(node.input[0])
        if dq is None or dq.op_type != "DequantizeLinear":
            raise EdgeqError(f"{node.name}: an int32 bias but a float input; not a graph edgeq writes")
        return float(self._values[dq.input[1]])

    def layer_weight(self, name: str) -> torch.Tensor:
        """What Conv/Gemm ``name`` multiplies with: its parameter, fake-quantized when the graph quantizes it."""
        layer = self._layers[name]
        w = self.weights[layer["key"]]
        return w if layer["weight_axis"] is None else weight_fake_quant(w, layer["weight_axis"])

    def layer_bias(self, name: str) -> torch.Tensor | None:
        layer = self._layers[name]
        if layer["key"] not in self.biases:
            return None
        b = self.biases[layer["key"]]
        if layer["bias_scale_in"] is None:
            return b
        w = self.weights[layer["key"]].detach()
        dims = [d for d in range(w.ndim) if d != layer["weight_axis"]]
        w_scale = torch.clamp(w.abs().amax(dim=dims) / 127.0, min=float(np.finfo(np.float32).eps))
        scale_in = layer["bias_scale_in"]
        if layer.get("input_dq") in self._group:  # its input's scale is being learned
            scale_in = float(self.pair_scale(layer["input_dq"]).detach())
        scale = (scale_in * w_scale.double()).float()
        return fake_quant(b, scale, torch.zeros(()), -(2**31), 2**31 - 1)

    def pair_scale(self, dq: str) -> torch.Tensor:
        """The (float32) scale fused pair ``dq`` quantizes with now."""
        scale = self._pairs[dq][1]
        if dq not in self._group:
            return torch.tensor(scale, dtype=torch.float32)
        return (scale * torch.exp(self.log_scales[self._group[dq]])).float()

    def learned_scales(self) -> dict[str, float]:
        """Float tensor name -> learned scale, for the export (``Int8Options.scales``)."""
        return {self._pairs[dq][0]: float(self.pair_scale(dq).detach()) for dq in self._group}

    # ------------------------------------------------------------------ running
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        env: dict[str, torch.Tensor] = {self.input_name: images}
        for node in self._nodes:
            if node.name in self._skip:
                continue
            outs = self._run(node, env)
            for name, value in zip(node.output, outs):
                env[name] = value
        return [env[name] for name in self.outputs]

    def _get(self, env, name: str) -> torch.Tensor:
        if name in env:
            return env[name]
        if name in self._const:
            return self._const[name]
        raise EdgeqError(f"tensor {name} is neither computed nor a constant")

    def _run(self, node, env) -> list[torch.Tensor]:
        op, a = node.op_type, _attrs(node)
        if op == "Constant":
            return [self._const[node.output[0]]]
        if op in ("Conv", "Gemm"):  # weight and bias come from the layer's parameters
            ins = [self._get(env, node.input[0])]
        elif node.name in self._pairs:  # its Q was skipped
            ins = []
        else:
            ins = [self._get(env, n) if n else None for n in node.input]
        if op == "Conv":
            return [self._conv(node, ins[0], a)]
        if op == "Gemm":
            w = self.layer_weight(node.name)
            w = w.t() if not a.get("transB", 0) else w
            x = ins[0].t() if a.get("transA", 0) else ins[0]
            y = a.get("alpha", 1.0) * (x @ w.t())
            b = self.layer_bias(node.name)
            return [y if b is None else y + a.get("beta", 1.0) * b]
        if op == "QuantizeLinear":
            return [self._quantize(node, ins)]
        if op == "DequantizeLinear":
            if node.name in self._pairs:
                source, scale, zero, low, high = self._pairs[node.name]
                x = self._get(env, source)
                if node.name in self._group:  # LSQ: the gradient reaches the scale too
                    grad = 1.0 / float(np.sqrt(max(1, x[0].numel()) * high))
                    return [torch._fake_quantize_learnable_per_tensor_affine(
                        x, self.pair_scale(node.name).reshape(1), torch.tensor([float(zero)]), low, high, grad)]
                return [torch.fake_quantize_per_tensor_affine(x, scale, zero, low, high)]
            return [self._dequantize(node, ins)]
        return [_elementwise(op, a, ins, node)]

    def _conv(self, node, x, a) -> torch.Tensor:
        w = self.layer_weight(node.name)
        b = self.layer_bias(node.name)
        pads = a.get("pads", [0] * (2 * (w.ndim - 2)))
        half = len(pads) // 2
        if pads[:half] != pads[half:]:
            x = F.pad(x, [p for i in reversed(range(half)) for p in (pads[i], pads[i + half])])
            pads = [0] * len(pads)
        return F.conv2d(x, w, b, stride=a.get("strides", 1), padding=pads[:half], dilation=a.get("dilations", 1),
                        groups=a.get("group", 1))

    def _quantize(self, node, ins) -> torch.Tensor:
        zero = self._values[node.input[2]]
        low, high = _INTEGER_RANGES[zero.dtype]
        scale, zp = _broadcast(ins[1], ins[0], _attrs(node).get("axis", 1)), _broadcast(ins[2].float(), ins[0], _attrs(node).get("axis", 1))
        q = ins[0] / scale + zp
        q = q + (torch.round(q) - q).detach()
        return torch.clamp(q, low, high)

    def _dequantize(self, node, ins) -> torch.Tensor:
        axis = _attrs(node).get("axis", 1)
        q = ins[0] if ins[0].is_floating_point() else ins[0].float()
        return (q - _broadcast(ins[2].float(), q, axis)) * _broadcast(ins[1], q, axis)


def trained_float_model(float_model, module: QdqModule):
    """A copy of ``float_model`` with the module's trained weights and biases in place of its own."""
    import onnx
    from onnx import numpy_helper

    out = onnx.ModelProto.FromString(float_model.SerializeToString())
    tensors = {init.name: init for init in out.graph.initializer}  # where each constant's value lives
    tensors.update({n.output[0]: n.attribute[0].t for n in out.graph.node
                    if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    readers = {name: len(nodes) for name, nodes in consumers(out.graph).items()}
    for node in out.graph.node:
        if node.name not in module._layers:
            continue
        key = module._layers[node.name]["key"]
        names = [(node.input[1], module.weights[key])]
        if key in module.biases:
            if len(node.input) < 3 or not node.input[2]:
                out.graph.initializer.append(numpy_helper.from_array(np.zeros(0, np.float32), f"{node.name}_bias"))
                del node.input[2:]
                node.input.append(f"{node.name}_bias")
                tensors[f"{node.name}_bias"] = out.graph.initializer[-1]
                readers[f"{node.name}_bias"] = 1
            names.append((node.input[2], module.biases[key]))
        for name, param in names:
            if name not in tensors or readers.get(name, 0) != 1:
                raise EdgeqError(f"{node.name}: {name} is not a constant of its own in the float ONNX; cannot write "
                                 "its trained value back")
            tensors[name].CopyFrom(numpy_helper.from_array(param.detach().cpu().numpy().astype(np.float32), name))
    return out


# ---------------------------------------------------------------------- helpers


def _float_weights(float_model) -> dict[str, np.ndarray]:
    values = constants(float_model.graph)
    return {n.name: values[n.input[1]] for n in float_model.graph.node
            if n.op_type in ("Conv", "Gemm") and n.input[1] in values}


def _dequantize(values, dq) -> np.ndarray:
    q = values[dq.input[0]].astype(np.float64)
    scale = values[dq.input[1]].astype(np.float64)
    zero = values[dq.input[2]].astype(np.float64) if len(dq.input) > 2 and dq.input[2] else np.zeros(())
    axis = _attrs(dq).get("axis", 1)
    if scale.ndim:
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return ((q - zero) * scale).astype(np.float32)


def _broadcast(param: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    if param.ndim == 0:
        return param
    shape = [1] * x.ndim
    shape[axis] = -1
    return param.reshape(shape)


def _needed(graph, outputs: list[str]) -> list:
    """The nodes ``outputs`` depend on, in graph order (the decode after the head is skipped)."""
    producer = {out: node for node in graph.node for out in node.output}
    wanted, stack = set(), list(outputs)
    while stack:
        name = stack.pop()
        node = producer.get(name)
        if node is None:  # a constant or the graph input: fine, unless it was asked for
            if name in outputs:
                raise EdgeqError(f"no node of the graph computes {name}")
            continue
        if node.name in wanted:
            continue
        wanted.add(node.name)
        stack.extend(n for n in node.input if n)
    return [n for n in graph.node if n.name in wanted]


def _elementwise(op: str, a: dict, ins: list, node) -> torch.Tensor:
    x = ins[0]
    if op == "Add":
        return x + ins[1]
    if op == "Sub":
        return x - ins[1]
    if op == "Mul":
        return x * ins[1]
    if op == "Div":
        return x / ins[1]
    if op == "Pow":
        return torch.pow(x, ins[1])
    if op == "Sigmoid":
        return torch.sigmoid(x)
    if op == "Relu":
        return F.relu(x)
    if op == "Clip":
        lo = ins[1] if len(ins) > 1 and ins[1] is not None else None
        hi = ins[2] if len(ins) > 2 and ins[2] is not None else None
        return torch.clamp(x, None if lo is None else float(lo), None if hi is None else float(hi))
    if op == "HardSigmoid":
        return torch.clamp(a.get("alpha", 0.2) * x + a.get("beta", 0.5), 0.0, 1.0)
    if op == "GlobalAveragePool":
        return x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)
    if op == "MaxPool":
        pads = a.get("pads", [0, 0, 0, 0])
        return F.max_pool2d(x, a["kernel_shape"], stride=a.get("strides", 1), padding=pads[:2])
    if op == "Concat":
        return torch.cat(ins, dim=a["axis"])
    if op == "Flatten":
        return torch.flatten(x, a.get("axis", 1))
    if op == "Reshape":
        shape = [int(v) for v in ins[1].tolist()]
        if shape and shape[0] == 1 and x.shape[0] != 1:  # a batch of 1 traced into the graph
            shape[0] = x.shape[0]
        return torch.reshape(x, [x.shape[i] if v == 0 else v for i, v in enumerate(shape)])
    if op == "Transpose":
        return x.permute(*a["perm"])
    if op == "Resize":
        if a.get("mode", b"nearest") != b"nearest" or a.get("coordinate_transformation_mode") != b"asymmetric":
            raise EdgeqError(f"{node.name}: Resize other than nearest/asymmetric is not supported by the fine-tune")
        scales = ins[2] if len(ins) > 2 and ins[2] is not None and ins[2].numel() else None
        if scales is not None:
            return F.interpolate(x, scale_factor=[float(s) for s in scales.tolist()[2:]], mode="nearest")
        return F.interpolate(x, size=[int(s) for s in ins[3].tolist()[2:]], mode="nearest")
    if op == "Slice":
        starts, ends = ins[1].tolist(), ins[2].tolist()
        axes = ins[3].tolist() if len(ins) > 3 and ins[3] is not None else list(range(len(starts)))
        steps = ins[4].tolist() if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
        index = [slice(None)] * x.ndim
        for s, e, ax, st in zip(starts, ends, axes, steps):
            index[ax] = slice(int(s), min(int(e), x.shape[ax]), int(st))
        return x[tuple(index)]
    raise EdgeqError(f"{node.name}: op {op} is not supported by the fine-tune's PyTorch graph",
                     note="fine-tune a model built from the supported layers, or export without --finetune")
