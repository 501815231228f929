"""DetectionModel and the parser for YOLOv5-format model yamls.

The yaml is read with ``yaml.safe_load`` and module names are looked up in the block registry,
which importing the block modules below fills; nothing is ever ``eval``-ed. Argument strings
``nc`` and ``anchors`` refer to the yaml's own keys, ``None`` means None, other strings
(``'nearest'``) are passed as they are.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from edgeq.errors import EdgeqError
from edgeq.models import common, mobilenet  # noqa: F401  (importing them registers their blocks)
from edgeq.models.common import Detect
from edgeq.models.mobilenet import make_divisible
from edgeq.models.registry import lookup_block

CFG_DIR = Path(__file__).with_name("cfg")
_REQUIRED_KEYS = ("anchors", "backbone", "head")


def resolve_cfg(cfg: str | Path) -> Path:
    """A yaml path, or the name of a bundled config (``yolov5s-mobilenetv3-small``)."""
    path = Path(cfg)
    if path.is_file():
        return path
    for candidate in (CFG_DIR / path.name, CFG_DIR / f"{path.name}.yaml"):
        if candidate.is_file():
            return candidate
    known = ", ".join(sorted(p.stem for p in CFG_DIR.glob("*.yaml")))
    raise EdgeqError(f"model config {str(cfg)!r} not found", note=f"bundled configs: {known}")


def load_cfg(cfg: str | Path | dict) -> dict:
    """Read and check a model yaml (or pass a dict through as a deep copy)."""
    if isinstance(cfg, dict):
        data, source = copy.deepcopy(cfg), "model yaml"
    else:
        path = resolve_cfg(cfg)
        source = str(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise EdgeqError(f"{path}: not valid yaml ({exc})") from None
        if isinstance(data, dict):
            data["yaml_file"] = path.name
    if not isinstance(data, dict):
        raise EdgeqError(f"{source}: a model yaml must be a mapping with keys {', '.join(_REQUIRED_KEYS)}")
    missing = [k for k in _REQUIRED_KEYS if k not in data]
    if missing:
        raise EdgeqError(f"{source}: missing key(s) {', '.join(missing)}")
    return data


def _resolve_arg(a: Any, names: dict[str, Any]) -> Any:
    if isinstance(a, str):
        if a == "None":
            return None
        if a in names:
            return names[a]
    return a


def parse_model(d: dict, ch: list[int]) -> tuple[nn.Sequential, list[int]]:
    """Build the layers of a YOLOv5-format yaml. Returns the Sequential and the saved indices."""
    source = d.get("yaml_file", "model yaml")
    anchors, nc = d["anchors"], d["nc"]
    gd, gw = d.get("depth_multiple", 1.0), d.get("width_multiple", 1.0)
    na = (len(anchors[0]) // 2) if isinstance(anchors, list) else anchors
    no = na * (nc + 5)
    names = {"nc": nc, "anchors": anchors}

    layers, save, c2 = [], [], ch[-1]
    rows = list(d["backbone"]) + list(d["head"])
    for i, row in enumerate(rows):
        if not (isinstance(row, (list, tuple)) and len(row) == 4):
            raise EdgeqError(f"{source}: layer {i} must be [from, number, module, args], got {row!r}")
        f, n, m_name, args = row
        where = f"{source}: layer {i} ({m_name})"
        m, kind = lookup_block(str(m_name), source=f"{source}: layer {i}")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise EdgeqError(f"{where}: 'number' must be a positive integer, got {n!r}")
        if args is not None and not isinstance(args, list):
            raise EdgeqError(f"{where}: 'args' must be a list, got {args!r}")
        args = [_resolve_arg(a, names) for a in (args or [])]
        if kind in ("channels", "repeat") and not (args and isinstance(args[0], (int, float))):
            raise EdgeqError(f"{where}: the first argument must be the output channels, got {args!r}")
        froms = [f] if isinstance(f, int) else list(f)
        for x in froms:
            valid = x == -1 if i == 0 else (isinstance(x, int) and -i <= x < i)
            if not valid:
                allowed = "-1 (the previous layer)" if i == 0 else f"0..{i - 1} or -1..-{i}"
                raise EdgeqError(f"{where}: 'from' index {x!r} does not point to an earlier layer ({allowed})")
        n = n_ = max(round(n * gd), 1) if n > 1 else n
        c_in = [ch[x] for x in froms]

        if kind in ("channels", "repeat"):
            c1, c2 = c_in[0], args[0]
            if c2 != no:
                c2 = make_divisible(c2 * gw, 8)
            args = [c1, c2, *args[1:]]
            if kind == "repeat":
                args.insert(2, n)
                n = 1
        elif kind == "concat":
            c2 = sum(c_in)
        elif kind == "detect":
            args.append(c_in)
            if isinstance(args[1], int):  # number of anchors -> placeholder anchors
                args[1] = [list(range(args[1] * 2))] * len(froms)
        else:
            c2 = c_in[0]

        try:
            m_ = nn.Sequential(*(m(*args) for _ in range(n))) if n > 1 else m(*args)
        except (TypeError, ValueError) as exc:
            raise EdgeqError(f"{where}: bad arguments {args!r} ({exc})") from None
        m_.i, m_.f, m_.type = i, f, str(m_name)
        m_.np = sum(p.numel() for p in m_.parameters())
        m_.n_repeat = n_
        save.extend(x % i for x in froms if x != -1)
        layers.append(m_)
        if i == 0:
            ch = []
        ch.append(c2)
    return nn.Sequential(*layers), sorted(set(save))


class DetectionModel(nn.Module):
    """A YOLOv5-style detector built from a yaml.

    Example::

        model = DetectionModel("yolov5s-mobilenetv3-small", nc=8)
        model.eval()(torch.zeros(1, 3, 320, 320)).shape   # (1, 6300, 13)
    """

    def __init__(self, cfg: str | Path | dict = "yolov5s-mobilenetv3-small", ch: int = 3, nc: int | None = None):
        super().__init__()
        self.yaml = load_cfg(cfg)
        if nc is not None and nc != self.yaml.get("nc"):
            self.yaml["nc"] = nc
        if not isinstance(self.yaml.get("nc"), int) or self.yaml["nc"] < 1:
            raise EdgeqError(f"{self.yaml.get('yaml_file', 'model yaml')}: 'nc' must be a positive integer")
        self.model, self.save = parse_model(self.yaml, ch=[ch])
        self.names = [str(i) for i in range(self.yaml["nc"])]
        head = self.model[-1]
        if not isinstance(head, Detect):
            raise EdgeqError(f"{self.yaml.get('yaml_file', 'model yaml')}: the last layer must be Detect")
        self._init_head(head, ch)
        self._init_weights()

    @property
    def nc(self) -> int:
        return self.detect.nc

    @property
    def detect(self) -> Detect:
        return self.model[-1]

    @property
    def stride(self) -> torch.Tensor:
        return self.detect.stride

    def _init_head(self, head: Detect, ch: int) -> None:
        s = 256
        head.raw_output = True
        try:
            with torch.no_grad():
                maps = self._forward_once(torch.zeros(1, ch, s, s))
        except (RuntimeError, TypeError, ValueError) as exc:
            source = self.yaml.get("yaml_file", "model yaml")
            raise EdgeqError(f"{source}: the model does not run on a {s}x{s} input ({exc})") from None
        finally:
            head.raw_output = False
        head.stride = torch.tensor([s / x.shape[-3] for x in maps])
        head.anchors /= head.stride.view(-1, 1, 1)
        # Anchor order must follow stride order (small anchors on the fine level).
        a = head.anchors.prod(-1).mean(-1).view(-1)
        if a[-1] - a[0] and (a[-1] - a[0]).sign() != (head.stride[-1] - head.stride[0]).sign():
            head.anchors[:] = head.anchors.flip(0)
        # Prior for objectness (8 objects per 640 image) and classes (YOLOv5's bias init).
        for conv, st in zip(head.m, head.stride):
            b = conv.bias.view(head.na, -1)
            b.data[:, 4] += math.log(8 / (640 / float(st)) ** 2)
            b.data[:, 5 : 5 + head.nc] += math.log(0.6 / (head.nc - 0.99))
            conv.bias = nn.Parameter(b.view(-1), requires_grad=True)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps = 1e-3
                m.momentum = 0.03
            elif isinstance(m, (nn.Hardswish, nn.LeakyReLU, nn.ReLU, nn.ReLU6, nn.SiLU)):
                m.inplace = True

    def _forward_once(self, x: torch.Tensor):
        outputs: list[torch.Tensor | None] = []
        for m in self.model:
            if m.f != -1:
                x = outputs[m.f] if isinstance(m.f, int) else [x if j == -1 else outputs[j] for j in m.f]
            x = m(x)
            outputs.append(x if m.i in self.save else None)
        return x

    def forward(self, x: torch.Tensor):
        return self._forward_once(x)
