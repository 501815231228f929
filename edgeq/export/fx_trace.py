"""torch.fx tracing and qualified-name bookkeeping shared by the deploy passes.

Both passes (:mod:`edgeq.export.bn_fold`, :mod:`edgeq.export.hard_act`) *decide* on an fx
graph and then *edit* the module tree, addressing submodules by the dotted names fx uses as
``call_module`` targets. The helpers here are the common ground: tracing a module without
leaving fx's ``_tensor_constantN`` attributes on it, counting calls and registrations (a
module called twice or registered under two names must not be rewritten as if it were one
layer), and describing a node in a report line.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

import torch.fx as fx
from torch import nn


def join(prefix: str, name: str) -> str:
    """``prefix.name``, or ``name`` at the root (``prefix == ""``)."""
    return f"{prefix}.{name}" if prefix else name


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule registered as dotted ``name`` under ``root`` by ``new``."""
    parent_name, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, new)


def registration_counts(root: nn.Module) -> Counter:
    """How many names each module object is registered under (shared modules count > 1)."""
    return Counter(id(m) for _, m in root.named_modules(remove_duplicate=False))


def has_forward(module: nn.Module) -> bool:
    """False for containers without a forward of their own (``ModuleList``, ``ModuleDict``)."""
    return type(module).forward is not nn.Module.forward


def is_torch_builtin(module: nn.Module) -> bool:
    """A layer defined by torch itself (its forward holds no user code); ``Sequential`` excluded."""
    return type(module).__module__.startswith("torch.") and not isinstance(module, nn.Sequential)


def short_error(exc: BaseException) -> str:
    """``TypeName: first line`` of an exception, short enough for a report entry."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:160]}"


class _Tracer(fx.Tracer):
    """fx's tracer with two extra ways to keep a submodule as a single ``call_module`` node.

    ``own_forward_only`` keeps every submodule whole (only the module's own forward is
    traced); ``leaf`` keeps whole the modules it accepts, e.g. norms defined outside torch
    that fx would otherwise trace through into anonymous arithmetic.
    """

    def __init__(self, own_forward_only: bool, leaf: Callable[[nn.Module], bool] | None):
        super().__init__()
        self.own_forward_only = own_forward_only
        self.leaf = leaf

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.own_forward_only or (self.leaf is not None and self.leaf(m)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(
    module: nn.Module, own_forward_only: bool = False, leaf: Callable[[nn.Module], bool] | None = None
) -> fx.Graph:
    """fx graph of ``module``; the tensor constants fx stores on the module go to ``graph.constants``.

    fx keeps non-parameter tensors it meets (``Detect.stride[i]``) as ``_tensor_constantN``
    attributes of the traced root; we take them back off so that analysing a model leaves no
    trace on it. Raises whatever fx raises on untraceable code.
    """
    tracer = _Tracer(own_forward_only, leaf)
    before = set(vars(module))
    try:
        graph = tracer.trace(module)
    finally:
        added = {key: vars(module).pop(key) for key in set(vars(module)) - before}
    graph.constants = added
    return graph


def call_counts(graph: fx.Graph) -> Counter:
    """How many times each submodule target is called in ``graph``."""
    return Counter(n.target for n in graph.nodes if n.op == "call_module")


def describe(node: Any) -> str:
    """A node (or constant argument) in words, for report reasons."""
    if not isinstance(node, fx.Node):
        return f"a constant ({type(node).__name__})"
    if node.op == "call_module":
        return f"module {node.target!r}"
    if node.op in ("call_function", "call_method"):
        return f"{getattr(node.target, '__name__', node.target)}()"
    return f"{node.op} {node.target!r}"
