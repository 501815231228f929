"""Deployment rewrites: fold BatchNorm into convolutions, spell hard activations as ReLU6.

The float blocks in ``edgeq.models`` are never edited for deployment; everything here is a
pass over an arbitrary ``nn.Module`` that works on a deep copy and returns it.

BatchNorm folding (:func:`fuse_conv_bn`)
    In eval mode ``bn(conv(x))`` is one affine map per output channel, so it folds into the
    conv's weight and bias (plain, grouped and depthwise convs, with or without bias; Linear ->
    BatchNorm1d too). Which pairs may fold is decided on a torch.fx graph: a BN folds only when
    its input is a conv whose output has no other user and neither module is called twice or
    registered under two names. Where a module does not trace, the pass analyses that
    module's own forward with every child kept as one call (if even that fails: the patterns
    known without a trace, adjacent layers of an ``nn.Sequential`` and the ``act(bn(conv(x)))``
    blocks YOLOv5 ``Conv`` and seed ``conv_bn_hswish``), then tries each child the same way.

    The graph is only used to *decide*; the fold itself is done in the module tree (fold the
    weights, put an ``nn.Identity`` where the BN was), which is what "replace the bn node by
    the conv" computes. We do not return the fx ``GraphModule``: it would drop the classes and
    plain attributes that exporters and the quantizer read (``DetectionModel.model[i].f``,
    ``.i``, ``.type``, the ``Detect`` head with ``stride``, ``anchors``, ``raw_output`` and
    ``decode``) and it would freeze the eval/raw branches of ``Detect``. Measured with torch
    2.13: the whole ``DetectionModel`` traces (data-independent ``m.f`` loop, shape unpacking
    in ``Detect``), so it takes the graph path and still comes back a ``DetectionModel``.

Hard activations (:func:`rewrite_hard_activations`)
    ``nn.Hardswish``/``nn.Hardsigmoid``, the seed ``h_swish``/``h_sigmoid`` and functional
    ``F.hardswish``/``F.hardsigmoid`` calls become ``x * ReLU6(x + 3) * (1/6)`` and
    ``ReLU6(x + 3) * (1/6)``, which export to Add -> Clip(0, 6) -> Mul -> Mul: no HardSwish /
    HardSigmoid ONNX node, only elementwise Add/Clip/Mul. Functional calls live in a module's
    own forward, so the module that makes them is traced (children kept as single calls)
    and replaced by a ``GraphModule`` that keeps its plain attributes (its class is lost,
    e.g. a torchvision-style SE); module activations are swapped in place.

    The ``+3`` folds into the bias of the producing Conv/Linear only for the hard-sigmoid of
    an SE gate (seed ``SELayer``: ``fc[2]`` Linear -> ``fc[3]`` h_sigmoid; paper
    ``SqueezeExcite``: ``fc2`` -> ``gate``), when that layer's output feeds nothing else: the
    gate becomes ``ReLU6(z) * (1/6)`` and the Add disappears. h-swish is not folded: its
    identity branch needs ``x`` itself, so a bias of ``+3`` would have to be undone by a
    ``z - 3`` for the ``x *`` factor -- the Add would only turn into a Sub, no op saved.

Hard-swish forms (``form``), measured with ``bench/activation_forms.py``
    * ``"mul"``: ``x * relu6(x + 3) * (1/6)``
    * ``"div"``: ``x * relu6(x + 3) / 6``
    * ``"mul_first"``: ``x * (relu6(x + 3) * (1/6))``

    Median ms, batch 1, 320x320, 60 interleaved runs, BN folded; ONNX Runtime 1.32 CPU
    (2 intra-op threads) and OpenVINO 2026.4 CPU with ``INFERENCE_PRECISION_HINT=f32``.
    Measured once on a shared, noisy 2-core machine (a training job ran alongside), so
    differences of a few percent are within noise:

    ============  ================  =================
    form          ONNX Runtime      OpenVINO f32
    ============  ================  =================
    original      130.0             130.1
    seed          145.6 (+12.0 %)   113.8 (-12.5 %)
    mul           136.8 (+5.2 %)    118.0 (-9.3 %)
    div           137.8 (+6.0 %)    122.6 (-5.8 %)
    mul_first     137.0 (+5.4 %)    117.3 (-9.9 %)
    ============  ================  =================

    ("original" = HardSwish/HardSigmoid ONNX ops; "seed" = the seed modules as written.)
    ``div`` is the slowest deploy form on both runtimes; ``mul`` and ``mul_first`` tie within
    noise, so ``mul`` is the default: it is the Add -> Clip -> Mul -> Mul form the exported
    graph is specified to have. In float on ONNX Runtime the native HardSwish op measured
    about 5 % faster than any spelled-out form; ``--no-rewrite`` keeps it.
"""

from __future__ import annotations

import copy
import logging
import math
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from edgeq.errors import EdgeqError
from edgeq.models.common import Conv
from edgeq.models.mobilenet import conv_bn_hswish, h_sigmoid, h_swish

log = logging.getLogger("edgeq")

HARD_FORMS = ("mul", "div", "mul_first")
DEFAULT_FORM = "mul"
_SIXTH = 1.0 / 6.0

# Exact layer types whose forward is the plain affine op, and the BN type each one folds with.
_FOLD_PARTNER: dict[type, type] = {
    nn.Linear: nn.BatchNorm1d,
    nn.Conv1d: nn.BatchNorm1d,
    nn.Conv2d: nn.BatchNorm2d,
    nn.Conv3d: nn.BatchNorm3d,
}
# Blocks known (by their forward) to compute act(bn(conv(x))): usable without a trace.
_CONV_BN_ACT_FORWARDS = (Conv.forward, conv_bn_hswish.forward)

_SWISH_MODULES = (nn.Hardswish, h_swish)
_SIGMOID_MODULES = (nn.Hardsigmoid, h_sigmoid)
_SWISH_FUNCTIONS = (F.hardswish, torch._C._nn.hardswish)
_SIGMOID_FUNCTIONS = (F.hardsigmoid, torch._C._nn.hardsigmoid)


# --------------------------------------------------------------------------- deploy activations
def _check_form(form: str) -> str:
    if form not in HARD_FORMS:
        raise EdgeqError(f"unknown hard-activation form {form!r}", note=f"choose one of {', '.join(HARD_FORMS)}")
    return form


def _scale_by_sixth(t: torch.Tensor, form: str) -> torch.Tensor:
    return t / 6.0 if form == "div" else t * _SIXTH


class _DeployActivation(nn.Module):
    """A hard activation spelled in plain ops; ``form`` says how the division by 6 is written."""

    def __init__(self, form: str = DEFAULT_FORM):
        super().__init__()
        self.form = _check_form(form)

    def extra_repr(self) -> str:
        return f"form={self.form!r}"


class HardSwishDeploy(_DeployActivation):
    """h-swish as ``x * ReLU6(x + 3) / 6`` in plain ops (Add, Clip, Mul), no HardSwish node."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = F.relu6(x + 3.0)
        if self.form == "mul_first":
            return x * (gate * _SIXTH)
        return _scale_by_sixth(x * gate, self.form)


class HardSigmoidDeploy(_DeployActivation):
    """h-sigmoid as ``ReLU6(x + 3) / 6`` in plain ops, no HardSigmoid node."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _scale_by_sixth(F.relu6(x + 3.0), self.form)


class HardSigmoidDeployFolded(_DeployActivation):
    """h-sigmoid whose ``+3`` already sits in the producing layer's bias: ``ReLU6(z) / 6``."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return _scale_by_sixth(F.relu6(z), self.form)


_DEPLOY_MODULES = (HardSwishDeploy, HardSigmoidDeploy, HardSigmoidDeployFolded)


# --------------------------------------------------------------------------- reports
@dataclass
class FuseReport:
    """What :func:`fuse_conv_bn` folded, what it left and where fx could not trace."""

    fused: list[tuple[str, str]] = field(default_factory=list)  # (conv/linear, bn)
    unfused: list[tuple[str, str]] = field(default_factory=list)  # (bn, reason)
    traced: list[str] = field(default_factory=list)  # scopes analysed on an fx graph
    untraced: list[tuple[str, str]] = field(default_factory=list)  # (scope, why fx failed)

    def summary(self) -> str:
        text = f"folded {len(self.fused)} BatchNorm(s) into conv/linear"
        if self.unfused:
            text += f"; {len(self.unfused)} left unfused: " + "; ".join(f"{n} ({r})" for n, r in self.unfused)
        if self.untraced:
            text += f"; fx could not trace {len(self.untraced)} scope(s)"
        return text


@dataclass
class RewriteReport:
    """What :func:`rewrite_hard_activations` replaced, folded and skipped."""

    form: str = DEFAULT_FORM
    replaced: list[tuple[str, str, str]] = field(default_factory=list)  # (name, original, deploy class)
    folded: list[tuple[str, str]] = field(default_factory=list)  # (gate, layer whose bias took the +3)
    graph_modules: list[str] = field(default_factory=list)  # modules turned into fx GraphModules
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)

    def summary(self) -> str:
        text = f"rewrote {len(self.replaced)} hard activation(s) (form {self.form!r})"
        text += f", +3 folded into {len(self.folded)} bias(es)"
        if self.skipped:
            text += "; skipped: " + "; ".join(f"{n} ({r})" for n, r in self.skipped)
        return text


# --------------------------------------------------------------------------- module-tree helpers
def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, new)


def _registration_counts(root: nn.Module) -> Counter:
    """How many names each module object is registered under (shared modules count > 1)."""
    return Counter(id(m) for _, m in root.named_modules(remove_duplicate=False))


def _has_forward(module: nn.Module) -> bool:
    return type(module).forward is not nn.Module.forward  # ModuleList/ModuleDict have none


def _is_torch_builtin(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.") and not isinstance(module, nn.Sequential)


def _short(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:160]}"


class _OwnForwardTracer(fx.Tracer):
    """Traces only a module's own forward: every submodule call stays one ``call_module`` node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _trace(module: nn.Module, own_forward_only: bool = False) -> fx.Graph:
    """fx graph of ``module``; the tensor constants fx stores on the module go to ``graph.constants``.

    fx keeps non-parameter tensors it meets (``Detect.stride[i]``) as ``_tensor_constantN``
    attributes of the traced root; we take them back off so that analysing a model leaves no
    trace on it.
    """
    tracer = _OwnForwardTracer() if own_forward_only else fx.Tracer()
    before = set(vars(module))
    try:
        graph = tracer.trace(module)
    finally:
        added = {key: vars(module).pop(key) for key in set(vars(module)) - before}
    graph.constants = added
    return graph


def _call_counts(graph: fx.Graph) -> Counter:
    return Counter(n.target for n in graph.nodes if n.op == "call_module")


def _describe(node: Any) -> str:
    if not isinstance(node, fx.Node):
        return f"a constant ({type(node).__name__})"
    if node.op == "call_module":
        return f"module {node.target!r}"
    if node.op in ("call_function", "call_method"):
        return f"{getattr(node.target, '__name__', node.target)}()"
    return f"{node.op} {node.target!r}"


# --------------------------------------------------------------------------- BatchNorm folding
@dataclass
class _FusePlan:
    pairs: list[tuple[str, str]] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    traced: list[str] = field(default_factory=list)
    untraced: list[tuple[str, str]] = field(default_factory=list)

    def decided(self, bn_name: str) -> bool:
        """A BN is judged once, by the widest graph that saw it."""
        return bn_name in self.reasons or any(bn == bn_name for _, bn in self.pairs)


def _pair_problem(layer: nn.Module, bn: nn.Module, shared: bool) -> str | None:
    """Why this (layer, bn) pair cannot fold, judged on the modules alone; None if it can."""
    partner = _FOLD_PARTNER.get(type(layer))
    if partner is None:
        return f"its input comes from a {type(layer).__name__}, not a Conv/Linear"
    if type(bn) is not partner:
        return f"{type(bn).__name__} cannot fold into a {type(layer).__name__}"
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return "it has no running statistics (normalizes with batch statistics even in eval)"
    out_features = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if out_features != bn.num_features:
        return f"channel mismatch ({out_features} outputs, {bn.num_features} BN features)"
    if shared:
        return "the conv/linear or the BN is registered under several names (shared weights)"
    return None


def _graph_pair(node: fx.Node, scope: nn.Module, calls: Counter, counts: Counter) -> tuple[str | None, str | None]:
    """For a BN call node: (conv target, None) if it folds, else (None, reason)."""
    bn = scope.get_submodule(node.target)
    if calls[node.target] > 1:
        return None, f"it is called {calls[node.target]} times in forward"
    src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
    if not isinstance(src, fx.Node) or src.op != "call_module":
        return None, f"its input comes from {_describe(src)}, not a Conv/Linear"
    layer = scope.get_submodule(src.target)
    if len(src.users) > 1:
        others = ", ".join(_describe(u) for u in src.users if u is not node)
        return None, f"the output of {src.target!r} is also used by {others}"
    if calls[src.target] > 1:
        return None, f"{src.target!r} is called {calls[src.target]} times in forward"
    shared = counts[id(layer)] > 1 or counts[id(bn)] > 1
    problem = _pair_problem(layer, bn, shared)
    return (None, problem) if problem else (src.target, None)


def _plan_from_graph(graph: fx.Graph, scope: nn.Module, prefix: str, counts: Counter, plan: _FusePlan) -> None:
    calls = _call_counts(graph)
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(scope.get_submodule(node.target), _BatchNorm):
            continue
        bn_name = _join(prefix, node.target)
        if plan.decided(bn_name):
            continue
        layer_target, reason = _graph_pair(node, scope, calls, counts)
        if layer_target is None:
            plan.reasons[bn_name] = reason
        else:
            plan.pairs.append((_join(prefix, layer_target), bn_name))


def _plan_from_patterns(module: nn.Module, prefix: str, counts: Counter, plan: _FusePlan) -> None:
    """Patterns valid without a trace: Sequential neighbours and known act(bn(conv(x))) blocks."""
    candidates: list[tuple[str, str]] = []
    if type(module).forward is nn.Sequential.forward:
        names = [name for name, _ in module.named_children()]
        candidates = list(zip(names, names[1:]))
    elif type(module).forward in _CONV_BN_ACT_FORWARDS:
        candidates = [("conv", "bn")]
    for layer_name, bn_name in candidates:
        layer, bn = module.get_submodule(layer_name), module.get_submodule(bn_name)
        if not isinstance(bn, _BatchNorm) or plan.decided(_join(prefix, bn_name)):
            continue
        problem = _pair_problem(layer, bn, counts[id(layer)] > 1 or counts[id(bn)] > 1)
        if problem:
            plan.reasons[_join(prefix, bn_name)] = problem
        else:
            plan.pairs.append((_join(prefix, layer_name), _join(prefix, bn_name)))
    for name, child in module.named_children():
        if isinstance(child, _BatchNorm) and not plan.decided(_join(prefix, name)):
            plan.reasons[_join(prefix, name)] = f"fx cannot trace {prefix or '<root>'} and no known conv->bn pattern holds"


def _plan_fusion(module: nn.Module, prefix: str, counts: Counter, plan: _FusePlan) -> None:
    """Whole-graph analysis where ``module`` traces; otherwise its own forward, patterns, children."""
    if _has_forward(module):
        try:
            graph = _trace(module)
        except Exception as exc:  # noqa: BLE001 (fx raises many types on untraceable code)
            plan.untraced.append((prefix or "<root>", _short(exc)))
        else:
            plan.traced.append(prefix or "<root>")
            _plan_from_graph(graph, module, prefix, counts, plan)
            return
        try:
            own = _trace(module, own_forward_only=True)
        except Exception:  # noqa: BLE001
            _plan_from_patterns(module, prefix, counts, plan)
        else:
            _plan_from_graph(own, module, prefix, counts, plan)
    for name, child in module.named_children():
        if not _is_torch_builtin(child) or next(child.children(), None) is not None:
            _plan_fusion(child, _join(prefix, name), counts, plan)


@torch.no_grad()
def _fold_bn(layer: nn.Module, bn: _BatchNorm) -> None:
    """Fold eval-mode ``bn`` into ``layer``'s weight and bias, computed in float64."""
    var, mean = bn.running_var.double(), bn.running_mean.double()
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -mean * scale + (bn.bias.double() if bn.bias is not None else 0.0)
    weight = layer.weight
    old_bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(scale)
    weight.copy_(weight.double() * scale.view(-1, *([1] * (weight.dim() - 1))))
    new_bias = (old_bias * scale + shift).to(weight.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias, requires_grad=weight.requires_grad)
    else:
        layer.bias.copy_(new_bias)


def _leftover_reasons(model: nn.Module, plan: _FusePlan, fused_bns: set[str]) -> list[tuple[str, str]]:
    default = "it is not called in the traced forward"
    return [
        (name, plan.reasons.get(name, default))
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and name not in fused_bns
    ]


def fuse_conv_bn(model: nn.Module) -> tuple[nn.Module, FuseReport]:
    """Fold every foldable BatchNorm into its conv/linear, on an eval-mode deep copy.

    Folding is only exact in eval mode (running statistics), so the copy is returned in eval
    mode. Classes and attributes of the model are kept: folded BNs become ``nn.Identity``.
    """
    model = copy.deepcopy(model).eval()
    return model, _fuse_in_place(model)


def _fuse_in_place(model: nn.Module) -> FuseReport:
    plan = _FusePlan()
    _plan_fusion(model, "", _registration_counts(model), plan)
    for layer_name, bn_name in plan.pairs:
        _fold_bn(model.get_submodule(layer_name), model.get_submodule(bn_name))
        _set_submodule(model, bn_name, nn.Identity())
    fused_bns = {bn for _, bn in plan.pairs}
    report = FuseReport(
        fused=list(plan.pairs),
        unfused=_leftover_reasons(model, plan, fused_bns),
        traced=plan.traced,
        untraced=plan.untraced,
    )
    log.info("fuse: %s", report.summary())
    for scope, why in report.untraced:
        log.debug("fuse: fx could not trace %s (%s)", scope, why)
    return report


# --------------------------------------------------------------------------- hard activations
def _hard_kind_of_module(module: nn.Module) -> str | None:
    if type(module) in _SWISH_MODULES:
        return "swish"
    if type(module) in _SIGMOID_MODULES:
        return "sigmoid"
    return None


def _hard_kind_of_node(node: fx.Node) -> str | None:
    if node.op != "call_function":
        return None
    if node.target in _SWISH_FUNCTIONS:
        return "swish"
    if node.target in _SIGMOID_FUNCTIONS:
        return "sigmoid"
    return None


def _node_input(node: fx.Node) -> Any:
    return node.args[0] if node.args else node.kwargs.get("input")


def _bias_producer(node: fx.Node, scope: nn.Module, calls: Counter, counts: Counter) -> str | None:
    """The Conv/Linear target whose output feeds only this gate node (through Identities), if any."""
    src = _node_input(node)
    while isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1:
        layer = scope.get_submodule(src.target)
        if type(layer) is nn.Identity:
            src = _node_input(src)
            continue
        solo = calls[src.target] == 1 and counts[id(layer)] == 1
        return src.target if solo and type(layer) in _FOLD_PARTNER else None
    return None


@torch.no_grad()
def _add_three_to_bias(layer: nn.Module) -> None:
    if layer.bias is None:
        out = layer.weight.shape[0]
        layer.bias = nn.Parameter(torch.zeros(out, dtype=layer.weight.dtype, device=layer.weight.device))
    layer.bias.add_(3.0)


def _inplace_alias(node: fx.Node, inplace: bool) -> bool:
    """An in-place activation whose input is read elsewhere: replacing it would change those reads."""
    src = _node_input(node)
    return bool(inplace) and isinstance(src, fx.Node) and len(src.users) > 1


def _node_inplace(node: fx.Node) -> bool:
    return bool(node.kwargs.get("inplace", node.args[1] if len(node.args) > 1 else False))


def _module_inplace(module: nn.Module) -> bool:
    # Only nn.Hardswish/nn.Hardsigmoid can write into their input; the seed forms' in-place
    # ReLU6 works on the temporary ``x + 3``.
    return bool(getattr(module, "inplace", False))


@dataclass
class _RewriteCtx:
    form: str
    fold_bias: bool
    counts: Counter
    report: RewriteReport


def _deploy_module(kind: str, folded: bool, form: str) -> nn.Module:
    if kind == "swish":
        return HardSwishDeploy(form)
    return HardSigmoidDeployFolded(form) if folded else HardSigmoidDeploy(form)


def _gate_nodes_by_child(graph: fx.Graph | None) -> dict[str, list[fx.Node]]:
    """Direct-child call nodes of a traced own forward, by child name."""
    nodes: dict[str, list[fx.Node]] = {}
    for node in graph.nodes if graph is not None else ():
        if node.op == "call_module" and "." not in node.target:
            nodes.setdefault(node.target, []).append(node)
    return nodes


def _fold_target(kind: str, nodes: list[fx.Node], scope: nn.Module, calls: Counter, ctx: _RewriteCtx) -> str | None:
    if kind != "sigmoid" or not ctx.fold_bias or len(nodes) != 1:
        return None
    return _bias_producer(nodes[0], scope, calls, ctx.counts)


def _swap_child_activations(module: nn.Module, prefix: str, graph: fx.Graph | None, ctx: _RewriteCtx) -> None:
    calls = _call_counts(graph) if graph is not None else Counter()
    by_child = _gate_nodes_by_child(graph)
    for name, child in list(module.named_children()):
        kind = _hard_kind_of_module(child)
        if kind is None:
            continue
        nodes = by_child.get(name, [])
        if any(_inplace_alias(n, _module_inplace(child)) for n in nodes):
            ctx.report.skipped.append((_join(prefix, name), "in-place activation whose input is also read elsewhere"))
            continue
        producer = _fold_target(kind, nodes, module, calls, ctx) if ctx.counts[id(child)] == 1 else None
        if producer is not None:
            _add_three_to_bias(module.get_submodule(producer))
            ctx.report.folded.append((_join(prefix, name), _join(prefix, producer)))
        new = _deploy_module(kind, producer is not None, ctx.form)
        setattr(module, name, new)
        ctx.report.replaced.append((_join(prefix, name), type(child).__name__, type(new).__name__))


def _free_name(module: nn.Module, base: str) -> str:
    i = 0
    while hasattr(module, f"{base}_{i}"):
        i += 1
    return f"{base}_{i}"


def _rewrite_functional_calls(module: nn.Module, prefix: str, graph: fx.Graph, ctx: _RewriteCtx) -> nn.Module:
    """Replace F.hardswish/F.hardsigmoid nodes by deploy modules; returns a GraphModule if any."""
    calls = _call_counts(graph)
    changed = False
    for node in list(graph.nodes):
        kind = _hard_kind_of_node(node)
        if kind is None:
            continue
        label = f"{prefix or '<root>'}: F.hard{kind}"
        if _inplace_alias(node, _node_inplace(node)):
            ctx.report.skipped.append((label, "in-place activation whose input is also read elsewhere"))
            continue
        producer = _fold_target(kind, [node], module, calls, ctx)
        if producer is not None:
            _add_three_to_bias(module.get_submodule(producer))
        attr = _free_name(module, f"hard{kind}_deploy")
        new = _deploy_module(kind, producer is not None, ctx.form)
        module.add_module(attr, new)
        with graph.inserting_before(node):
            replacement = graph.call_module(attr, (_node_input(node),))
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
        ctx.report.replaced.append((_join(prefix, attr), f"F.hard{kind}", type(new).__name__))
        if producer is not None:
            ctx.report.folded.append((_join(prefix, attr), _join(prefix, producer)))
        changed = True
    return _to_graph_module(module, graph, prefix, ctx) if changed else module


def _to_graph_module(module: nn.Module, graph: fx.Graph, prefix: str, ctx: _RewriteCtx) -> fx.GraphModule:
    """A GraphModule for ``module`` that keeps its plain attributes (``f``, ``i``, ``type``...)."""
    graph.lint()
    targets = {n.target for n in graph.nodes if n.op in ("call_module", "get_attr")}
    owned = {t: graph.constants[t] if t in graph.constants else _fetch(module, t) for t in targets}
    gm = fx.GraphModule(owned, graph, class_name=type(module).__name__)
    for key, value in vars(module).items():
        if not key.startswith("_") and key not in vars(gm):
            setattr(gm, key, value)
    gm.training = module.training
    ctx.report.graph_modules.append(prefix or "<root>")
    return gm


def _fetch(module: nn.Module, target: str) -> Any:
    for part in target.split("."):
        module = getattr(module, part)
    return module


def _names_hard_functions(module: nn.Module) -> bool:
    code = getattr(type(module).forward, "__code__", None)
    return code is not None and any(n in ("hardswish", "hardsigmoid") for n in code.co_names)


def _own_graph(module: nn.Module, prefix: str, ctx: _RewriteCtx) -> fx.Graph | None:
    if _is_torch_builtin(module) or not _has_forward(module):
        return None
    try:
        return _trace(module, own_forward_only=True)
    except Exception as exc:  # noqa: BLE001
        if _names_hard_functions(module):
            why = f"forward calls hard activations but fx failed: {_short(exc)}"
            ctx.report.skipped.append((prefix or "<root>", why))
        return None


def _rewrite_tree(module: nn.Module, prefix: str, ctx: _RewriteCtx) -> nn.Module:
    """Pre-order: rewrite this module's own forward and activation children, then recurse."""
    graph = _own_graph(module, prefix, ctx)
    _swap_child_activations(module, prefix, graph, ctx)
    if graph is not None and any(_hard_kind_of_node(n) for n in graph.nodes):
        module = _rewrite_functional_calls(module, prefix, graph, ctx)
    for name, child in list(module.named_children()):
        if isinstance(child, _DEPLOY_MODULES):
            continue
        new = _rewrite_tree(child, _join(prefix, name), ctx)
        if new is not child:
            setattr(module, name, new)
    return module


def rewrite_hard_activations(
    model: nn.Module, fold_bias: bool = True, form: str = DEFAULT_FORM
) -> tuple[nn.Module, RewriteReport]:
    """Spell hard-swish/hard-sigmoid as ReLU6 arithmetic (see the module docstring), on a deep copy.

    ``fold_bias`` moves the ``+3`` of SE hard-sigmoid gates into the producing layer's bias.
    ``form`` picks how the ``1/6`` is applied (:data:`HARD_FORMS`).
    """
    _check_form(form)
    return _rewrite_in_place(copy.deepcopy(model), fold_bias, form)


def _rewrite_in_place(model: nn.Module, fold_bias: bool, form: str) -> tuple[nn.Module, RewriteReport]:
    """Rewrites ``model`` itself; returns it, or the GraphModule that replaced its root."""
    ctx = _RewriteCtx(form, fold_bias, _registration_counts(model), RewriteReport(form=form))
    model = _rewrite_tree(model, "", ctx)
    log.info("rewrite: %s", ctx.report.summary())
    return model, ctx.report


# --------------------------------------------------------------------------- deploy + check
def _flatten_outputs(out: Any, name: str = "output") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(out, torch.Tensor):
        yield name, out
    elif isinstance(out, (list, tuple)):
        for i, item in enumerate(out):
            yield from _flatten_outputs(item, f"{name}[{i}]")
    elif isinstance(out, dict):
        for key, item in out.items():
            yield from _flatten_outputs(item, f"{name}[{key!r}]")


def _relative_l2(ref: torch.Tensor, got: torch.Tensor) -> float:
    ref, got = ref.detach().double(), got.detach().double()
    diff = torch.linalg.vector_norm(ref - got).item()
    norm = torch.linalg.vector_norm(ref).item()
    if not math.isfinite(diff):
        return math.inf
    return diff / norm if norm > 0 else diff


def compare_outputs(ref_out: Any, got_out: Any) -> dict[str, float]:
    """Relative L2 error of every tensor output, by name (``output[0]``...)."""
    ref, got = list(_flatten_outputs(ref_out)), list(_flatten_outputs(got_out))
    if [n for n, _ in ref] != [n for n, _ in got]:
        raise EdgeqError("the deployed model returns different outputs than the original",
                         note=f"original: {[n for n, _ in ref]}, deployed: {[n for n, _ in got]}")
    errors = {}
    for (name, a), (_, b) in zip(ref, got):
        if a.shape != b.shape:
            raise EdgeqError(f"deployed {name} has shape {tuple(b.shape)}, the original {tuple(a.shape)}")
        errors[name] = _relative_l2(a, b)
    return errors


def _default_example(model: nn.Module, shape: Sequence[int] | None) -> torch.Tensor:
    """(1, 3, 64, 64), or a side that is a multiple of the model's max stride when it has one."""
    if shape is None:
        side = 64
        stride = getattr(model, "stride", None)
        if isinstance(stride, torch.Tensor) and stride.numel():
            s = int(stride.max().item())
            side = max(s, math.ceil(side / s) * s)
        shape = (1, 3, side, side)
    gen = torch.Generator().manual_seed(0)
    return torch.randn(*shape, generator=gen)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run the caller's model in eval mode without copying it, then restore every module's mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


def deploy(
    model: nn.Module,
    rewrite: bool = True,
    *,
    example_input: torch.Tensor | None = None,
    example_shape: Sequence[int] | None = None,
    form: str = DEFAULT_FORM,
    fold_bias: bool = True,
    rtol: float = 1e-5,
) -> tuple[nn.Module, dict]:
    """eval -> :func:`fuse_conv_bn` -> :func:`rewrite_hard_activations`, then a numerical check.

    The deployed model must reproduce the original's outputs on ``example_input`` (default a
    seeded random ``example_shape``, itself defaulting to 1x3x64x64 or a multiple of the
    model's stride) within ``rtol`` relative L2 error per output in float32: a rewrite that is
    not exact is a bug we want to see before an exported model is trusted. Raises
    :class:`EdgeqError` naming the worst output otherwise. The input model is not modified.
    """
    _check_form(form)
    deployed = copy.deepcopy(model).eval()
    fuse_report = _fuse_in_place(deployed)
    rewrite_report = None
    if rewrite:
        deployed, rewrite_report = _rewrite_in_place(deployed, fold_bias, form)
    x = example_input if example_input is not None else _default_example(model, example_shape)
    with torch.no_grad(), _eval_mode(model) as reference:
        errors = compare_outputs(reference(x.clone()), deployed(x.clone()))
    worst = max(errors, key=errors.get) if errors else None
    max_err = errors[worst] if worst else 0.0
    report = _report_dict(fuse_report, rewrite_report, errors, max_err, tuple(x.shape), rtol)
    if worst and not max_err <= rtol:
        raise EdgeqError(
            f"the deployed model does not match the original: {worst} relative error {max_err:.3g} > {rtol:g}",
            note=fuse_report.summary() + (f"; {rewrite_report.summary()}" if rewrite_report else ""),
        )
    log.info("deploy: max relative error %.3g (%s) on a %s input", max_err, worst, "x".join(map(str, x.shape)))
    return deployed, report


def _report_dict(
    fuse_report: FuseReport,
    rewrite_report: RewriteReport | None,
    errors: dict[str, float],
    max_err: float,
    shape: tuple[int, ...],
    rtol: float,
) -> dict:
    rr = rewrite_report or RewriteReport(form="none")
    return {
        "fused": [list(p) for p in fuse_report.fused],
        "unfused": [list(p) for p in fuse_report.unfused],
        "rewritten": [list(r) for r in rr.replaced],
        "folded_bias": [list(f) for f in rr.folded],
        "rewrite_skipped": [list(s) for s in rr.skipped],
        "graph_modules": list(rr.graph_modules),
        "form": rr.form,
        "fx_traced": list(fuse_report.traced),
        "fx_untraced": [list(u) for u in fuse_report.untraced],
        "output_errors": errors,
        "max_rel_error": max_err,
        "example_shape": list(shape),
        "rtol": rtol,
    }
