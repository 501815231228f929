"""Spell hard-swish / hard-sigmoid as ``x * ReLU6(x + 3) / 6`` and fold SE gates' ``+3`` into a bias.

``nn.Hardswish``/``nn.Hardsigmoid``, the seed ``h_swish``/``h_sigmoid`` and functional
``F.hardswish``/``F.hardsigmoid`` calls become ``x * ReLU6(x + 3) * (1/6)`` and
``ReLU6(x + 3) * (1/6)``, which export to Add -> Clip(0, 6) -> Mul -> Mul: no HardSwish /
HardSigmoid ONNX node, only elementwise Add/Clip/Mul that every runtime and INT8 toolchain
handles. Functional calls live in a module's own forward, so the module that makes them is
traced (children kept as single calls) and replaced by a ``GraphModule`` that keeps its plain
attributes (its class is lost, e.g. a torchvision-style SE); module activations are swapped
in place. Like :mod:`edgeq.export.bn_fold`, this is a pass over an arbitrary ``nn.Module``.

The ``+3`` folds into the bias of the producing Conv/Linear only for the hard-sigmoid of an SE
gate (seed ``SELayer``: ``fc[2]`` Linear -> ``fc[3]`` h_sigmoid; paper ``SqueezeExcite``:
``fc2`` -> ``gate``), when that layer's output feeds nothing else: the gate becomes
``ReLU6(z) * (1/6)`` and the Add disappears. h-swish is not folded: its identity branch needs
``x`` itself, so a bias of ``+3`` would have to be undone by a ``z - 3`` for the ``x *`` factor
-- the Add would only turn into a Sub, no op saved.

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
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from edgeq.errors import EdgeqError
from edgeq.export.fx_trace import (
    call_counts,
    has_forward,
    is_torch_builtin,
    join,
    registration_counts,
    short_error,
    trace,
)
from edgeq.models.mobilenet import h_sigmoid, h_swish

log = logging.getLogger("edgeq")

HARD_FORMS = ("mul", "div", "mul_first")
DEFAULT_FORM = "mul"
_SIXTH = 1.0 / 6.0

_SWISH_MODULES = (nn.Hardswish, h_swish)
_SIGMOID_MODULES = (nn.Hardsigmoid, h_sigmoid)
_SWISH_FUNCTIONS = (F.hardswish, torch._C._nn.hardswish)
_SIGMOID_FUNCTIONS = (F.hardsigmoid, torch._C._nn.hardsigmoid)
# Layers whose bias may take the +3 of the gate they feed.
_BIAS_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


# --------------------------------------------------------------------------- deploy activations
def check_form(form: str) -> str:
    """``form`` if it is one of :data:`HARD_FORMS`, else an :class:`EdgeqError` listing them."""
    if form not in HARD_FORMS:
        raise EdgeqError(f"unknown hard-activation form {form!r}", note=f"choose one of {', '.join(HARD_FORMS)}")
    return form


def _scale_by_sixth(t: torch.Tensor, form: str) -> torch.Tensor:
    return t / 6.0 if form == "div" else t * _SIXTH


class _DeployActivation(nn.Module):
    """A hard activation spelled in plain ops; ``form`` says how the division by 6 is written."""

    def __init__(self, form: str = DEFAULT_FORM):
        super().__init__()
        self.form = check_form(form)

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


# --------------------------------------------------------------------------- the rewrite
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
        return src.target if solo and type(layer) in _BIAS_LAYERS else None
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
    calls = call_counts(graph) if graph is not None else Counter()
    by_child = _gate_nodes_by_child(graph)
    for name, child in list(module.named_children()):
        kind = _hard_kind_of_module(child)
        if kind is None:
            continue
        nodes = by_child.get(name, [])
        if any(_inplace_alias(n, _module_inplace(child)) for n in nodes):
            ctx.report.skipped.append((join(prefix, name), "in-place activation whose input is also read elsewhere"))
            continue
        producer = _fold_target(kind, nodes, module, calls, ctx) if ctx.counts[id(child)] == 1 else None
        if producer is not None:
            _add_three_to_bias(module.get_submodule(producer))
            ctx.report.folded.append((join(prefix, name), join(prefix, producer)))
        new = _deploy_module(kind, producer is not None, ctx.form)
        setattr(module, name, new)
        ctx.report.replaced.append((join(prefix, name), type(child).__name__, type(new).__name__))


def _free_name(module: nn.Module, base: str) -> str:
    i = 0
    while hasattr(module, f"{base}_{i}"):
        i += 1
    return f"{base}_{i}"


def _rewrite_functional_calls(module: nn.Module, prefix: str, graph: fx.Graph, ctx: _RewriteCtx) -> nn.Module:
    """Replace F.hardswish/F.hardsigmoid nodes by deploy modules; returns a GraphModule if any."""
    calls = call_counts(graph)
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
        ctx.report.replaced.append((join(prefix, attr), f"F.hard{kind}", type(new).__name__))
        if producer is not None:
            ctx.report.folded.append((join(prefix, attr), join(prefix, producer)))
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
    if is_torch_builtin(module) or not has_forward(module):
        return None
    try:
        return trace(module, own_forward_only=True)
    except Exception as exc:  # noqa: BLE001
        if _names_hard_functions(module):
            why = f"forward calls hard activations but fx failed: {short_error(exc)}"
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
        new = _rewrite_tree(child, join(prefix, name), ctx)
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
    check_form(form)
    return rewrite_in_place(copy.deepcopy(model), fold_bias, form)


def rewrite_in_place(model: nn.Module, fold_bias: bool, form: str) -> tuple[nn.Module, RewriteReport]:
    """:func:`rewrite_hard_activations` on ``model`` itself; returns it, or the GraphModule that replaced its root."""
    ctx = _RewriteCtx(form, fold_bias, registration_counts(model), RewriteReport(form=form))
    model = _rewrite_tree(model, "", ctx)
    log.info("rewrite: %s", ctx.report.summary())
    return model, ctx.report
