"""The deploy graph: fold norms, rewrite hard activations, and prove the result still matches.

:func:`deploy` runs :func:`edgeq.export.bn_fold.fuse_in_place` and
:func:`edgeq.export.hard_act.rewrite_in_place` on one eval-mode deep copy and then runs the
original and the deployed model on the same example input, comparing every tensor output.
Both passes are meant to be exact (up to float rounding), so any real difference is a bug in
a pass; it is caught here, naming the output, before an exported model is trusted.

Example inputs and outputs may be structured: a tensor, a tuple/list of tensors or a dict of
tensors, nested. The example is passed to the model as its one argument (torchvision's
detectors take ``model(images)`` with a *list* of image tensors), and outputs are flattened
into named tensors (``output``, ``output[0]``, ``output[0]['boxes']``) so that the report
says which one differs.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Union

import torch
from torch import nn

from edgeq.errors import EdgeqError
from edgeq.export.bn_fold import FuseReport, fuse_in_place
from edgeq.export.hard_act import DEFAULT_FORM, RewriteReport, check_form, rewrite_in_place

log = logging.getLogger("edgeq")

# A tensor, or tuples/lists/dicts of them, nested: what a model takes as its one argument.
ExampleInput = Union[torch.Tensor, Sequence["ExampleInput"], Mapping[Any, "ExampleInput"]]


def _flatten(obj: Any, name: str) -> Iterator[tuple[str, Any]]:
    """(name, leaf) for every leaf of nested tuples/lists/dicts, in order."""
    if isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            yield from _flatten(item, f"{name}[{i}]")
    elif isinstance(obj, Mapping):
        for key, item in obj.items():
            yield from _flatten(item, f"{name}[{key!r}]")
    else:
        yield name, obj


def _flatten_outputs(out: Any) -> list[tuple[str, torch.Tensor]]:
    # Non-tensor leaves (None, Python numbers) carry no numerics to compare.
    return [(n, t) for n, t in _flatten(out, "output") if isinstance(t, torch.Tensor)]


def _relative_l2(ref: torch.Tensor, got: torch.Tensor) -> float:
    ref, got = ref.detach().double(), got.detach().double()
    diff = torch.linalg.vector_norm(ref - got).item()
    norm = torch.linalg.vector_norm(ref).item()
    if not math.isfinite(diff):
        return math.inf
    return diff / norm if norm > 0 else diff


def compare_outputs(ref_out: Any, got_out: Any) -> dict[str, float]:
    """Relative L2 error of every tensor output, by name (``output``, ``output[0]``, ``output['boxes']``...).

    Outputs may be tensors or nested tuples/lists/dicts of them; both models must return the
    same structure and shapes, else :class:`EdgeqError` says which output differs.
    """
    ref, got = _flatten_outputs(ref_out), _flatten_outputs(got_out)
    if [n for n, _ in ref] != [n for n, _ in got]:
        raise EdgeqError("the deployed model returns different outputs than the original",
                         note=f"original: {[n for n, _ in ref]}, deployed: {[n for n, _ in got]}")
    errors = {}
    for (name, a), (_, b) in zip(ref, got):
        if a.shape != b.shape:
            raise EdgeqError(f"deployed {name} has shape {tuple(b.shape)}, the original {tuple(a.shape)}")
        errors[name] = _relative_l2(a, b)
    return errors


def _clone_input(obj: Any, name: str = "input") -> Any:
    """A copy of the example (each model gets its own: a forward may write into its input)."""
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
        return type(obj)(*(_clone_input(v, f"{name}[{i}]") for i, v in enumerate(obj)))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone_input(v, f"{name}[{i}]") for i, v in enumerate(obj))
    if isinstance(obj, Mapping):
        return {k: _clone_input(v, f"{name}[{k!r}]") for k, v in obj.items()}
    raise EdgeqError(f"example_input: {name} is a {type(obj).__name__}, not a tensor",
                     note="give a tensor, a tuple/list of tensors or a dict of tensors (nesting allowed)")


def _input_shapes(example: Any) -> dict[str, list[int]]:
    return {n: list(t.shape) for n, t in _flatten(example, "input")}


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
    example_input: ExampleInput | None = None,
    example_shape: Sequence[int] | None = None,
    form: str = DEFAULT_FORM,
    fold_bias: bool = True,
    rtol: float = 1e-5,
) -> tuple[nn.Module, dict]:
    """eval -> fold norms -> rewrite hard activations, then a numerical check; returns (model, report).

    The deployed model must reproduce the original's outputs on ``example_input`` (a tensor,
    a tuple/list or dict of tensors, nested, passed as the model's one argument; default a
    seeded random ``example_shape`` tensor, itself defaulting to 1x3x64x64 or a multiple of
    the model's stride) within ``rtol`` relative L2 error per tensor output in float32: a
    rewrite that is not exact is a bug we want to see before an exported model is trusted.
    Raises :class:`EdgeqError` naming the worst output otherwise. The input model is not
    modified. The report dict is described in :func:`_report_dict`.
    """
    check_form(form)
    x = example_input if example_input is not None else _default_example(model, example_shape)
    _clone_input(x)  # refuse a malformed example before the passes run
    deployed = copy.deepcopy(model).eval()
    fuse_report = fuse_in_place(deployed)
    rewrite_report = None
    if rewrite:
        deployed, rewrite_report = rewrite_in_place(deployed, fold_bias, form)
    with torch.no_grad(), _eval_mode(model) as reference:
        errors = compare_outputs(reference(_clone_input(x)), deployed(_clone_input(x)))
    worst = max(errors, key=errors.get) if errors else None
    max_err = errors[worst] if worst else 0.0
    report = _report_dict(fuse_report, rewrite_report, errors, max_err, x, rtol)
    if worst and not max_err <= rtol:
        raise EdgeqError(
            f"the deployed model does not match the original: {worst} relative error {max_err:.3g} > {rtol:g}",
            note=fuse_report.summary() + (f"; {rewrite_report.summary()}" if rewrite_report else ""),
        )
    shapes = ", ".join(f"{n} {'x'.join(map(str, s))}" for n, s in report["example_inputs"].items())
    log.info("deploy: max relative error %.3g (%s) on %s", max_err, worst, shapes)
    return deployed, report


def _report_dict(
    fuse_report: FuseReport,
    rewrite_report: RewriteReport | None,
    errors: dict[str, float],
    max_err: float,
    example: ExampleInput,
    rtol: float,
) -> dict:
    """JSON-ready summary of both passes and the check.

    ``fused``/``unfused`` (norm folding), ``rewritten``/``folded_bias``/``rewrite_skipped``/
    ``graph_modules``/``form`` (hard activations; ``form`` is ``"none"`` without the rewrite),
    ``fx_traced``/``fx_untraced``, ``output_errors`` (relative L2 error by output name),
    ``max_rel_error``, ``example_inputs`` (shape by input name), ``example_shape`` (the shape
    when the example is one tensor, else None) and ``rtol``.
    """
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
        "example_inputs": _input_shapes(example),
        "example_shape": list(example.shape) if isinstance(example, torch.Tensor) else None,
        "rtol": rtol,
    }
