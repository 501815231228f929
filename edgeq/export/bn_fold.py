"""Fold eval-mode BatchNorm (and frozen affine norms) into the Conv/Linear that feeds them.

In eval mode ``bn(conv(x))`` is one affine map per output channel, so it folds into the
conv's weight and bias (plain, grouped and depthwise convs, with or without bias; Linear ->
BatchNorm1d too). The pass works on an arbitrary ``nn.Module``; the float blocks in
``edgeq.models`` are never edited for deployment.

Which norms fold
    ``BatchNorm1d/2d/3d`` after the matching Linear/Conv, and *frozen affine norms*: modules
    without children holding 1-D float ``weight``, ``bias``, ``running_mean``,
    ``running_var`` of one length and a number ``eps`` -- the shape of torchvision's
    ``FrozenBatchNorm2d``, which its detection builders put everywhere once pretrained
    weights load. Those are recognised by structure, never by importing torchvision (it
    need not be installed), and a probe checks that the module's forward really is
    ``x * scale + (bias - running_mean * scale)`` with ``scale = weight / sqrt(running_var
    + eps)`` before its buffers are folded; a norm that fails the probe is reported unfused
    with the reason. fx traces *through* such modules (they are not ``torch.nn`` layers),
    which is why they are kept as leaves of the trace: otherwise the graph shows only
    anonymous Mul/Add nodes and the norm is neither folded nor reported.

Which pairs may fold
    Decided on a torch.fx graph: a norm folds only when its input is a conv whose output has
    no other user and neither module is called twice or registered under two names. Where a
    module does not trace, the pass analyses that module's own forward with every child kept
    as one call (if even that fails: the patterns known without a trace, adjacent layers of
    an ``nn.Sequential`` and the ``act(bn(conv(x)))`` blocks YOLOv5 ``Conv`` and seed
    ``conv_bn_hswish``), then tries each child the same way. Every norm left is named in
    :attr:`FuseReport.unfused` with the reason.

Why the graph only decides
    The fold itself is done in the module tree (fold the weights, put an ``nn.Identity``
    where the norm was), which is what "replace the bn node by the conv" computes. We do not
    return the fx ``GraphModule``: it would drop the classes and plain attributes that
    exporters and the quantizer read (``DetectionModel.model[i].f``, ``.i``, ``.type``, the
    ``Detect`` head with ``stride``, ``anchors``, ``raw_output`` and ``decode``) and it would
    freeze the eval/raw branches of ``Detect``. Measured with torch 2.13: the whole
    ``DetectionModel`` traces (data-independent ``m.f`` loop, shape unpacking in ``Detect``),
    so it takes the graph path and still comes back a ``DetectionModel``.
"""

from __future__ import annotations

import copy
import logging
import math
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from edgeq.export.fx_trace import (
    call_counts,
    describe,
    has_forward,
    is_torch_builtin,
    join,
    registration_counts,
    set_submodule,
    short_error,
    trace,
)
from edgeq.models.common import Conv
from edgeq.models.mobilenet import conv_bn_hswish

log = logging.getLogger("edgeq")

# Exact layer types whose forward is the plain affine op, and the BN type each one folds with.
_FOLD_PARTNER: dict[type, type] = {
    nn.Linear: nn.BatchNorm1d,
    nn.Conv1d: nn.BatchNorm1d,
    nn.Conv2d: nn.BatchNorm2d,
    nn.Conv3d: nn.BatchNorm3d,
}
# Blocks known (by their forward) to compute act(bn(conv(x))): usable without a trace.
_CONV_BN_ACT_FORWARDS = (Conv.forward, conv_bn_hswish.forward)
_AFFINE_TENSORS = ("weight", "bias", "running_mean", "running_var")


@dataclass
class FuseReport:
    """What :func:`fuse_conv_bn` folded, what it left and where fx could not trace."""

    fused: list[tuple[str, str]] = field(default_factory=list)  # (conv/linear, norm)
    unfused: list[tuple[str, str]] = field(default_factory=list)  # (norm, reason)
    traced: list[str] = field(default_factory=list)  # scopes analysed on an fx graph
    untraced: list[tuple[str, str]] = field(default_factory=list)  # (scope, why fx failed)

    def summary(self) -> str:
        text = f"folded {len(self.fused)} BatchNorm/frozen norm(s) into conv/linear"
        if self.unfused:
            text += f"; {len(self.unfused)} left unfused: " + "; ".join(f"{n} ({r})" for n, r in self.unfused)
        if self.untraced:
            text += f"; fx could not trace {len(self.untraced)} scope(s)"
        return text


# --------------------------------------------------------------------------- which modules are norms
def is_frozen_affine_norm(module: nn.Module) -> bool:
    """Shaped like torchvision's ``FrozenBatchNorm2d``: judged on structure, not on the class.

    No children, 1-D floating ``weight``/``bias``/``running_mean``/``running_var`` of one
    length (buffers or parameters) and a numeric ``eps``. Whether its forward is the affine
    map those buffers describe is checked separately, by :func:`_probe_problem`.
    """
    if isinstance(module, _BatchNorm) or next(module.children(), None) is not None:
        return False
    tensors = [getattr(module, name, None) for name in _AFFINE_TENSORS]
    if not all(isinstance(t, torch.Tensor) and t.dim() == 1 and t.is_floating_point() for t in tensors):
        return False
    eps = getattr(module, "eps", None)
    return len({t.numel() for t in tensors}) == 1 and isinstance(eps, (int, float)) and not isinstance(eps, bool)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _BatchNorm) or is_frozen_affine_norm(module)


def _scale_shift(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The eval-mode per-channel map ``y = x * scale + shift`` of a norm, in float64."""
    var, mean = norm.running_var.double(), norm.running_mean.double()
    scale = torch.rsqrt(var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.double()
    shift = -mean * scale + (norm.bias.double() if norm.bias is not None else 0.0)
    return scale, shift


@torch.no_grad()
def _probe_problem(norm: nn.Module, rank: int) -> str | None:
    """Why a frozen norm's forward is not its buffers' affine map on a rank-``rank`` input; None if it is.

    Folding replaces the module by arithmetic on its buffers, so it is only exact when the
    forward computes exactly that. The probe runs a deep copy (a foreign forward could
    update state) on a seeded random input and compares in float64, within the square root
    of the buffers' dtype epsilon (3e-4 in float32: far below any wrong formula's error).
    """
    ref = norm.running_mean
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, ref.numel(), *([3] * (rank - 2)), generator=gen).to(ref.device, ref.dtype)
    try:
        got = copy.deepcopy(norm).eval()(x)
    except Exception as exc:  # noqa: BLE001 (a foreign forward may raise anything)
        return f"its forward fails on a {rank}-D input ({short_error(exc)})"
    if not isinstance(got, torch.Tensor) or got.shape != x.shape:
        return f"its forward does not return a tensor shaped like its {rank}-D input"
    scale, shift = _scale_shift(norm)
    view = (1, -1) + (1,) * (rank - 2)
    want = x.double() * scale.view(view) + shift.view(view)
    err = (torch.linalg.vector_norm(got.double() - want) / torch.linalg.vector_norm(want).clamp_min(1e-30)).item()
    if not err <= math.sqrt(torch.finfo(ref.dtype).eps):
        return (f"its forward is not x * weight / sqrt(running_var + eps) + (bias - running_mean * scale) "
                f"(relative error {err:.1e} on a probe input)")
    return None


# --------------------------------------------------------------------------- planning
@dataclass
class _FusePlan:
    pairs: list[tuple[str, str]] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    traced: list[str] = field(default_factory=list)
    untraced: list[tuple[str, str]] = field(default_factory=list)

    def decided(self, norm_name: str) -> bool:
        """A norm is judged once, by the widest graph that saw it."""
        return norm_name in self.reasons or any(bn == norm_name for _, bn in self.pairs)


def _pair_problem(layer: nn.Module, norm: nn.Module, shared: bool) -> str | None:
    """Why this (layer, norm) pair cannot fold, judged on the modules alone; None if it can."""
    partner = _FOLD_PARTNER.get(type(layer))
    if partner is None:
        return f"its input comes from a {type(layer).__name__}, not a Conv/Linear"
    frozen = is_frozen_affine_norm(norm)
    if not frozen and type(norm) is not partner:
        return f"{type(norm).__name__} cannot fold into a {type(layer).__name__}"
    if not frozen and (not norm.track_running_stats or norm.running_mean is None or norm.running_var is None):
        return "it has no running statistics (normalizes with batch statistics even in eval)"
    features = norm.running_mean.numel() if frozen else norm.num_features
    out_features = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if out_features != features:
        return f"channel mismatch ({out_features} outputs, {features} norm features)"
    if shared:
        return "the conv/linear or the norm is registered under several names (shared weights)"
    return _probe_problem(norm, layer.weight.dim()) if frozen else None


def _graph_pair(node: fx.Node, scope: nn.Module, calls: Counter, counts: Counter) -> tuple[str | None, str | None]:
    """For a norm call node: (conv target, None) if it folds, else (None, reason)."""
    norm = scope.get_submodule(node.target)
    if calls[node.target] > 1:
        return None, f"it is called {calls[node.target]} times in forward"
    src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
    if not isinstance(src, fx.Node) or src.op != "call_module":
        return None, f"its input comes from {describe(src)}, not a Conv/Linear"
    layer = scope.get_submodule(src.target)
    if len(src.users) > 1:
        others = ", ".join(describe(u) for u in src.users if u is not node)
        return None, f"the output of {src.target!r} is also used by {others}"
    if calls[src.target] > 1:
        return None, f"{src.target!r} is called {calls[src.target]} times in forward"
    shared = counts[id(layer)] > 1 or counts[id(norm)] > 1
    problem = _pair_problem(layer, norm, shared)
    return (None, problem) if problem else (src.target, None)


def _plan_from_graph(graph: fx.Graph, scope: nn.Module, prefix: str, counts: Counter, plan: _FusePlan) -> None:
    calls = call_counts(graph)
    for node in graph.nodes:
        if node.op != "call_module" or not _is_norm(scope.get_submodule(node.target)):
            continue
        norm_name = join(prefix, node.target)
        if plan.decided(norm_name):
            continue
        layer_target, reason = _graph_pair(node, scope, calls, counts)
        if layer_target is None:
            plan.reasons[norm_name] = reason
        else:
            plan.pairs.append((join(prefix, layer_target), norm_name))


def _plan_from_patterns(module: nn.Module, prefix: str, counts: Counter, plan: _FusePlan) -> None:
    """Patterns valid without a trace: Sequential neighbours and known act(bn(conv(x))) blocks."""
    candidates: list[tuple[str, str]] = []
    if type(module).forward is nn.Sequential.forward:
        names = [name for name, _ in module.named_children()]
        candidates = list(zip(names, names[1:]))
    elif type(module).forward in _CONV_BN_ACT_FORWARDS:
        candidates = [("conv", "bn")]
    for layer_name, norm_name in candidates:
        layer, norm = module.get_submodule(layer_name), module.get_submodule(norm_name)
        if not _is_norm(norm) or plan.decided(join(prefix, norm_name)):
            continue
        problem = _pair_problem(layer, norm, counts[id(layer)] > 1 or counts[id(norm)] > 1)
        if problem:
            plan.reasons[join(prefix, norm_name)] = problem
        else:
            plan.pairs.append((join(prefix, layer_name), join(prefix, norm_name)))
    for name, child in module.named_children():
        if _is_norm(child) and not plan.decided(join(prefix, name)):
            why = f"fx cannot trace {prefix or '<root>'} and no known conv->bn pattern holds"
            plan.reasons[join(prefix, name)] = why


def _plan_fusion(module: nn.Module, prefix: str, counts: Counter, plan: _FusePlan) -> None:
    """Whole-graph analysis where ``module`` traces; otherwise its own forward, patterns, children."""
    if has_forward(module):
        try:
            graph = trace(module, leaf=is_frozen_affine_norm)
        except Exception as exc:  # noqa: BLE001 (fx raises many types on untraceable code)
            plan.untraced.append((prefix or "<root>", short_error(exc)))
        else:
            plan.traced.append(prefix or "<root>")
            _plan_from_graph(graph, module, prefix, counts, plan)
            return
        try:
            own = trace(module, own_forward_only=True)
        except Exception:  # noqa: BLE001
            _plan_from_patterns(module, prefix, counts, plan)
        else:
            _plan_from_graph(own, module, prefix, counts, plan)
    for name, child in module.named_children():
        if _is_norm(child):
            continue  # judged by the scope that calls it
        if not is_torch_builtin(child) or next(child.children(), None) is not None:
            _plan_fusion(child, join(prefix, name), counts, plan)


# --------------------------------------------------------------------------- folding
@torch.no_grad()
def _fold_norm(layer: nn.Module, norm: nn.Module) -> None:
    """Fold eval-mode ``norm`` into ``layer``'s weight and bias, computed in float64."""
    scale, shift = _scale_shift(norm)
    weight = layer.weight
    old_bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(scale)
    weight.copy_(weight.double() * scale.view(-1, *([1] * (weight.dim() - 1))))
    new_bias = (old_bias * scale + shift).to(weight.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias, requires_grad=weight.requires_grad)
    else:
        layer.bias.copy_(new_bias)


def _leftover_reasons(model: nn.Module, plan: _FusePlan, fused: set[str]) -> list[tuple[str, str]]:
    default = "it is not called in the traced forward"
    return [
        (name, plan.reasons.get(name, default))
        for name, m in model.named_modules()
        if _is_norm(m) and name not in fused
    ]


def fuse_conv_bn(model: nn.Module) -> tuple[nn.Module, FuseReport]:
    """Fold every foldable BatchNorm / frozen affine norm into its conv/linear, on an eval-mode deep copy.

    Folding is only exact in eval mode (running statistics), so the copy is returned in eval
    mode. Classes and attributes of the model are kept: folded norms become ``nn.Identity``.
    """
    model = copy.deepcopy(model).eval()
    return model, fuse_in_place(model)


def fuse_in_place(model: nn.Module) -> FuseReport:
    """:func:`fuse_conv_bn` on ``model`` itself (already in eval mode), for callers that copied it."""
    plan = _FusePlan()
    _plan_fusion(model, "", registration_counts(model), plan)
    for layer_name, norm_name in plan.pairs:
        _fold_norm(model.get_submodule(layer_name), model.get_submodule(norm_name))
        set_submodule(model, norm_name, nn.Identity())
    fused = {norm for _, norm in plan.pairs}
    report = FuseReport(
        fused=list(plan.pairs),
        unfused=_leftover_reasons(model, plan, fused),
        traced=plan.traced,
        untraced=plan.untraced,
    )
    log.info("fuse: %s", report.summary())
    for scope, why in report.untraced:
        log.debug("fuse: fx could not trace %s (%s)", scope, why)
    return report
