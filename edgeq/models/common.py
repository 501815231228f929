"""YOLOv5 building blocks (v6+ layout).

Attribute names (``conv``/``bn``/``act``, ``cv1``/``cv2``/``cv3``/``m``, Detect's ``m`` and
``anchors`` buffer) follow upstream YOLOv5 so that its state dicts map onto ours key for key.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from edgeq.models.registry import register_block


def autopad(k: int, p: int | None = None, d: int = 1) -> int:
    """'same' padding for odd kernels."""
    if d > 1:
        k = d * (k - 1) + 1
    return k // 2 if p is None else p


@register_block("Conv")
class Conv(nn.Module):
    """Conv2d -> BatchNorm -> SiLU (YOLOv5's basic unit). yaml args: ``[out_ch, k, s, p, g]``."""

    default_act: nn.Module = nn.SiLU()

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None, g: int = 1, d: int = 1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        if act is True:
            self.act = nn.SiLU()
        elif isinstance(act, nn.Module):
            self.act = act
        else:
            self.act = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


@register_block("DWConv")
class DWConv(Conv):
    """Depthwise (grouped by gcd(in, out)) Conv. yaml args: ``[out_ch, k, s]``."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, d: int = 1, act=True):
        super().__init__(c1, c2, k, s, g=math.gcd(c1, c2), d=d, act=act)


@register_block("Focus")
class Focus(nn.Module):
    """Space-to-depth then Conv (YOLOv5 before v6; kept so old checkpoints load)."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None, g: int = 1, act=True):
        super().__init__()
        self.conv = Conv(c1 * 4, c2, k, s, p, g, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat((x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]), 1))


@register_block("Bottleneck")
class Bottleneck(nn.Module):
    """1x1 -> 3x3 with a residual when ``shortcut`` and in == out."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True, g: int = 1, e: float = 0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_, c2, 3, 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


@register_block("C3", kind="repeat")
class C3(nn.Module):
    """CSP bottleneck with 3 convs. yaml args: ``[out_ch, shortcut]``; yaml number -> ``n``."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.cv3 = Conv(2 * c_, c2, 1)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, g, e=1.0) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


@register_block("SPPF")
class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained max-pools, concatenated."""

    def __init__(self, c1: int, c2: int, k: int = 5):
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_ * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


@register_block("SPP")
class SPP(nn.Module):
    """Spatial pyramid pooling with parallel max-pools (YOLOv5 before v6)."""

    def __init__(self, c1: int, c2: int, k: tuple[int, ...] = (5, 9, 13)):
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_ * (len(k) + 1), c2, 1, 1)
        self.m = nn.ModuleList(nn.MaxPool2d(kernel_size=x, stride=1, padding=x // 2) for x in k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        return self.cv2(torch.cat([x] + [m(x) for m in self.m], 1))


@register_block("Concat", kind="concat")
class Concat(nn.Module):
    """Concatenate a list of tensors along ``dimension``."""

    def __init__(self, dimension: int = 1):
        super().__init__()
        self.d = dimension

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(x, self.d)


@register_block("Detect", kind="detect")
class Detect(nn.Module):
    """YOLOv5 head: one 1x1 conv per level, then the grid/anchor decode.

    Training mode returns the raw per-level maps ``(bs, na, ny, nx, 5 + nc)``; eval mode returns
    decoded detections ``(bs, anchors, 5 + nc)``: cx, cy, w, h in input pixels, objectness and
    class probabilities. ``raw_output = True`` makes eval return the raw maps too (for export
    without the decode). :meth:`decode` is kept apart so quantization can leave it in float.
    """

    stride: torch.Tensor

    def __init__(self, nc: int = 80, anchors=(), ch: tuple[int, ...] = (), inplace: bool = True):
        super().__init__()
        self.nc = nc
        self.no = nc + 5
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        self.register_buffer("anchors", torch.tensor(anchors).float().view(self.nl, -1, 2))  # in stride units once built
        self.m = nn.ModuleList(nn.Conv2d(x, self.no * self.na, 1) for x in ch)
        self.inplace = inplace
        self.raw_output = False
        self.stride = torch.ones(self.nl)

    def forward(self, x: list[torch.Tensor]):
        maps = []
        for i in range(self.nl):
            y = self.m[i](x[i])
            bs, _, ny, nx = y.shape
            maps.append(y.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous())
        if self.training or self.raw_output:
            return maps
        return self.decode(maps)

    def decode(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """Raw maps -> (bs, anchors, 5 + nc) with boxes in pixels and sigmoid scores."""
        out = []
        for i, y in enumerate(maps):
            bs, na, ny, nx, no = y.shape
            grid, anchor_grid = self._make_grid(nx, ny, i, y.dtype, y.device)
            y = y.sigmoid()
            xy, wh, conf = y.split((2, 2, no - 4), 4)
            xy = (xy * 2 + grid) * self.stride[i]
            wh = (wh * 2) ** 2 * anchor_grid
            out.append(torch.cat((xy, wh, conf), 4).view(bs, na * ny * nx, no))
        return torch.cat(out, 1)

    def _make_grid(self, nx: int, ny: int, i: int, dtype: torch.dtype, device: torch.device):
        yv, xv = torch.meshgrid(
            torch.arange(ny, device=device, dtype=dtype), torch.arange(nx, device=device, dtype=dtype), indexing="ij"
        )
        grid = torch.stack((xv, yv), 2).view(1, 1, ny, nx, 2) - 0.5
        anchor_grid = (self.anchors[i] * self.stride[i]).view(1, self.na, 1, 1, 2).to(dtype)
        return grid, anchor_grid
