"""Name -> block registry that the yaml parser reads (yaml is never ``eval``-ed).

A block registers itself with ``@register_block`` and says how the parser should treat its
arguments (``kind``):

* ``"channels"``: yaml args start with the output channels; the parser prepends the input
  channels and scales the output channels by ``width_multiple`` (YOLOv5's rule).
* ``"repeat"``: like ``channels`` and the yaml ``number`` becomes the block's own ``n``
  argument (C3-style blocks) instead of stacking copies.
* ``"concat"``, ``"detect"``, ``"passthrough"``: output channels = sum of inputs / head /
  the input's.

This module holds only the registry. Block modules (``common``, ``mobilenet``) import it to
register themselves; whoever looks blocks up imports those modules first, so imports go one way.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from edgeq.errors import EdgeqError

BLOCKS: dict[str, tuple[type[nn.Module], str]] = {}

_KINDS = ("channels", "repeat", "concat", "detect", "passthrough")


def register_block(*names: str, kind: str = "channels") -> Callable[[type], type]:
    """Register a block under one or more yaml names."""
    if kind not in _KINDS:
        raise ValueError(f"unknown block kind {kind!r}; expected one of {_KINDS}")

    def wrap(cls: type) -> type:
        for name in names or (cls.__name__,):
            BLOCKS[name] = (cls, kind)
        return cls

    return wrap


# torch.nn layers that yaml files name directly.
for _name, _cls in {
    "nn.Upsample": nn.Upsample,
    "nn.Identity": nn.Identity,
    "nn.MaxPool2d": nn.MaxPool2d,
    "nn.ZeroPad2d": nn.ZeroPad2d,
}.items():
    BLOCKS[_name] = (_cls, "passthrough")
    BLOCKS["torch." + _name] = (_cls, "passthrough")


def lookup_block(name: str, source: str = "model yaml") -> tuple[type[nn.Module], str]:
    """Return (class, kind) for a yaml module name, or a clear error listing the known ones.

    Only what has been registered so far is known: the caller imports the block modules first
    (``edgeq.models.yolo`` does), so that this module never imports the modules that import it.
    """
    if name not in BLOCKS:
        known = ", ".join(sorted(k for k in BLOCKS if not k.startswith("torch.")))
        raise EdgeqError(f"{source}: unknown module {name!r}", note=f"known modules: {known}")
    return BLOCKS[name]
