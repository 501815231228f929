"""Bring an upstream YOLOv5 checkpoint's model into edgeq's DetectionModel, with strict checks.

The restricted unpickler (:mod:`edgeq.models.safe_pickle`) hands over upstream layers as inert
placeholders. Nothing of them runs: their weights are read straight from each object's
``__dict__`` and copied into edgeq's own :class:`DetectionModel`, built from the checkpoint's
yaml, after checks on keys, shapes, layer types, strides and class count. The build, weight and
stride checks are public because edgeq's own checkpoint format (a yaml plus a state dict of the
same YOLOv5 layouts) goes through them too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeq.errors import EdgeqError
from edgeq.models.yolo import DetectionModel

# State dict entries of old YOLOv5 versions that edgeq recomputes instead of loading.
_IGNORED_SUFFIXES = ("anchor_grid", "grid")
_MAX_DEPTH = 64
_UPSTREAM_EXTRA_KEYS = ("epoch", "best_fitness", "updates", "date", "git", "opt", "wandb_id")


@dataclass
class ImportedYolov5:
    """The rebuilt float32 eval-mode model and what the upstream checkpoint says about it.

    ``extra`` holds the training-run entries (epoch, opt, git...) as unpickled; the caller turns
    them into plain values, since which values count as plain is the edgeq format's rule.
    """

    model: DetectionModel
    names: list[str]
    imgsz: int | None
    extra: dict[str, Any] = field(default_factory=dict)


def import_yolov5(path: Path, obj: Any) -> ImportedYolov5:
    """Rebuild an upstream training checkpoint (or bare pickled model) ``obj`` read from ``path``."""
    ckpt = obj if isinstance(obj, dict) else {"model": obj}
    src = _pick_model(path, ckpt)
    attrs = vars(src)
    yaml_dict = attrs.get("yaml")
    if not isinstance(yaml_dict, dict):
        raise EdgeqError(f"{path}: the pickled model has no 'yaml' dict; edgeq needs it to rebuild the model")
    names = _upstream_names(path, attrs.get("names"), yaml_dict.get("nc"))
    model = build_model(path, yaml_dict, names)
    theirs = _walk_modules(path, src)
    _check_layer_types(path, model, theirs)
    _copy_bn_eps(model, theirs)
    load_weights(path, model, _collect_state(theirs))
    check_stride(path, model, _upstream_stride(attrs, theirs))
    return ImportedYolov5(
        model=model.eval(),
        names=names,
        imgsz=_upstream_imgsz(ckpt.get("opt")),
        extra={k: ckpt[k] for k in _UPSTREAM_EXTRA_KEYS if k in ckpt},
    )


def _pick_model(path: Path, ckpt: dict) -> nn.Module:
    """YOLOv5 keeps the EMA weights when present (strip_optimizer moves them to 'model')."""
    src = ckpt.get("ema")
    if src is None:
        src = ckpt.get("model")
    if src is None and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise EdgeqError(
            f"{path} is a bare state_dict without the model yaml; edgeq needs an edgeq or YOLOv5 checkpoint"
        )
    if src is None:
        keys = ", ".join(map(str, list(ckpt)[:8])) or "none"
        raise EdgeqError(
            f"{path} has no 'model' or 'ema' entry (keys: {keys}); expected an edgeq or YOLOv5 training checkpoint"
        )
    if not isinstance(src, nn.Module):
        raise EdgeqError(
            f"{path}: its model entry is a {type(src).__name__}, not a pickled YOLOv5 model "
            "(a bare state_dict has no model yaml to rebuild from)"
        )
    return src


def _upstream_names(path: Path, names: Any, nc: Any) -> list[str]:
    """YOLOv5 stores names as a list (old) or a {index: name} dict (v7)."""
    if names is None:
        return [str(i) for i in range(nc)] if isinstance(nc, int) and nc > 0 else []
    if isinstance(names, dict):
        if sorted(names) != list(range(len(names))):
            raise EdgeqError(f"{path}: class names dict keys must be 0..{len(names) - 1}")
        return [str(names[i]) for i in range(len(names))]
    if isinstance(names, (list, tuple)):
        return [str(n) for n in names]
    raise EdgeqError(f"{path}: class names are a {type(names).__name__}, expected a list or dict")


def _upstream_stride(attrs: dict, theirs: dict[str, nn.Module]) -> Any:
    """Model.stride, else the Detect layer's (very old pickles)."""
    if attrs.get("stride") is not None:
        return attrs["stride"]
    heads = [m for m in theirs.values() if _type_name(m) == "Detect"]
    return vars(heads[-1]).get("stride") if heads else None


def _upstream_imgsz(opt: Any) -> int | None:
    """train.py's ``vars(opt)``: ``imgsz`` (v6+) or ``img_size`` (a [train, test] list before)."""
    if not isinstance(opt, dict):
        opt = getattr(opt, "__dict__", {})
    size = opt.get("imgsz", opt.get("img_size"))
    if isinstance(size, (list, tuple)) and size:
        size = size[0]
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


# --------------------------------------------------------------------------- checks shared with edgeq's format
def build_model(path: Path, yaml_dict: dict, names: list[str]) -> DetectionModel:
    """edgeq's float32 DetectionModel from the checkpoint's yaml, class count checked against names.

    The yaml, not pickled code, defines the layers, so a checkpoint can only fill in weights.
    """
    nc = yaml_dict.get("nc")
    if isinstance(nc, int) and len(names) != nc:
        raise EdgeqError(f"{path}: the checkpoint lists {len(names)} class names but its model yaml has nc={nc}")
    ch = yaml_dict.get("ch", 3)
    try:
        model = DetectionModel(yaml_dict, ch=ch if isinstance(ch, int) else 3)
    except EdgeqError as exc:
        raise EdgeqError(f"{path}: cannot rebuild the model from its yaml: {exc}") from None
    model.names = list(names)
    return model.float()


def _walk_modules(path: Path, root: nn.Module) -> dict[str, nn.Module]:
    """name -> module from the pickled objects' own dicts (no hooks, no pickled code runs)."""
    found: dict[str, nn.Module] = {}

    def visit(module: nn.Module, prefix: str, depth: int) -> None:
        if depth > _MAX_DEPTH:
            raise EdgeqError(f"{path}: the pickled model nests more than {_MAX_DEPTH} levels deep")
        found[prefix] = module
        children = vars(module).get("_modules") or {}
        for name, child in children.items():
            if child is None:
                continue
            if not isinstance(child, nn.Module):
                raise EdgeqError(f"{path}: pickled layer {prefix + name} is a {type(child).__name__}, not a module")
            visit(child, f"{prefix}{name}.", depth + 1)

    visit(root, "", 0)
    return {k.rstrip("."): v for k, v in found.items()}


def _collect_state(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers, like state_dict() but straight from each __dict__."""
    state: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        attrs = vars(module)
        prefix = f"{name}." if name else ""
        skip = attrs.get("_non_persistent_buffers_set") or set()
        tensors = list((attrs.get("_parameters") or {}).items())
        tensors += [(k, v) for k, v in (attrs.get("_buffers") or {}).items() if k not in skip]
        for key, value in tensors:
            if value is not None:
                state[prefix + key] = value
    return state


def _type_name(module: nn.Module) -> str:
    return type(module).__name__


def _check_layer_types(path: Path, model: DetectionModel, theirs: dict[str, nn.Module]) -> None:
    """Same layer classes at the same places: catches e.g. Hardswish vs SiLU, which keys cannot."""
    ours = {k: m for k, m in model.named_modules(remove_duplicate=False) if k}
    theirs = {k: m for k, m in theirs.items() if k}
    for name in [*ours, *theirs]:
        if name not in ours or name not in theirs:
            where = "edgeq's build of its yaml" if name in ours else "the checkpoint"
            raise _layout_error(path, f"layer {name} exists only in {where}")
        if _type_name(ours[name]) != _type_name(theirs[name]):
            kinds = f"{_type_name(theirs[name])} in the checkpoint but {_type_name(ours[name])} in edgeq"
            raise _layout_error(path, f"layer {name} is {kinds}")


def _layout_error(path: Path, detail: str) -> EdgeqError:
    return EdgeqError(f"{path}: {detail}; the checkpoint was not built from a supported YOLOv5 layout")


def _copy_bn_eps(model: DetectionModel, theirs: dict[str, nn.Module]) -> None:
    """BatchNorm eps is not in the state dict but changes outputs: take the checkpoint's."""
    for name, module in model.named_modules():
        eps = vars(theirs[name]).get("eps") if name in theirs else None
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and isinstance(eps, float):
            module.eps = eps


def _ignored(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in _IGNORED_SUFFIXES


def load_weights(path: Path, model: DetectionModel, state: dict[str, Any]) -> None:
    """Strict key and shape match (old grid/anchor_grid entries ignored), floats to float32.

    Strict because a silently skipped weight gives a model that runs and detects nothing.
    """
    ours = model.state_dict()
    state = {k: v for k, v in state.items() if not _ignored(k)}
    missing = [k for k in ours if k not in state]
    unexpected = [k for k in state if k not in ours]
    if missing:
        raise _layout_error(path, f"weight {missing[0]} is missing ({len(missing)} missing in all)")
    if unexpected:
        raise _layout_error(path, f"weight {unexpected[0]} is unexpected ({len(unexpected)} unexpected in all)")
    converted = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise _layout_error(path, f"weight {key} is a {type(value).__name__}, not a tensor")
        if value.shape != ours[key].shape:
            shapes = f"{tuple(value.shape)} in the checkpoint, {tuple(ours[key].shape)} in edgeq"
            raise _layout_error(path, f"weight {key} has shape {shapes}")
        value = value.detach().to("cpu")
        converted[key] = value.float() if value.is_floating_point() else value.to(ours[key].dtype)
    model.load_state_dict(converted, strict=True)


def check_stride(path: Path, model: DetectionModel, stride: Any) -> None:
    """The strides edgeq computes from the yaml must be the checkpoint's (anchors depend on them)."""
    ours = [float(s) for s in model.stride.tolist()]
    try:
        theirs = [float(s) for s in (stride.tolist() if isinstance(stride, torch.Tensor) else stride)]
    except (TypeError, ValueError):
        raise EdgeqError(f"{path}: the checkpoint's stride {stride!r} is not a list of numbers") from None
    if len(theirs) != len(ours) or not all(math.isclose(a, b) for a, b in zip(ours, theirs)):
        raise EdgeqError(f"{path}: the checkpoint's strides {theirs} differ from the strides {ours} its yaml builds")


__all__ = ["ImportedYolov5", "build_model", "check_stride", "import_yolov5", "load_weights"]
