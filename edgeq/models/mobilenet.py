"""MobileNet building blocks (V1 to V4) as YOLO-yaml blocks.

Two families live here:

* paper-style blocks written like torchvision's (norm and activation passed as factories,
  ``out_channels`` exposed): :class:`DepthwiseSeparable` (V1), :class:`InvertedResidual` (V2),
  :class:`Bneck` (V3, SE squeeze rounded to a multiple of 8), :class:`UniversalInvertedBottleneck`
  (V4, with the ExtraDW variant);
* the seed article's yaml-facing forms (:class:`h_sigmoid`, :class:`h_swish`, :class:`SELayer`,
  :class:`conv_bn_hswish`, :class:`MobileNetV3`), whose attribute layout is kept exactly so that
  checkpoints trained with the seed's code load into them.

Float blocks are never edited for deployment: ``edgeq.export.bn_fold`` and ``edgeq.export.hard_act`` rewrite them as passes.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from edgeq.models.registry import register_block

NormFactory = Callable[[int], nn.Module]
ActFactory = Callable[[], nn.Module]


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round channels to a multiple of ``divisor`` without dropping more than 10 %."""
    min_value = min_value or divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class ConvNormAct(nn.Sequential):
    """Conv2d -> norm -> activation, the unit every MobileNet block is made of."""

    def __init__(
        self,
        c1: int,
        c2: int,
        k: int = 3,
        s: int = 1,
        g: int = 1,
        norm_layer: NormFactory | None = nn.BatchNorm2d,
        activation_layer: ActFactory | None = nn.ReLU,
    ):
        layers: list[nn.Module] = [nn.Conv2d(c1, c2, k, s, (k - 1) // 2, groups=g, bias=norm_layer is None)]
        if norm_layer is not None:
            layers.append(norm_layer(c2))
        if activation_layer is not None:
            layers.append(activation_layer())
        super().__init__(*layers)
        self.out_channels = c2


# --------------------------------------------------------------------------- V1
@register_block("DepthwiseSeparable", "MobileNetV1")
class DepthwiseSeparable(nn.Module):
    """MobileNet V1: 3x3 depthwise conv then 1x1 pointwise conv, each BN + ReLU.

    yaml args: ``[out_ch, stride]``.
    """

    def __init__(self, c1: int, c2: int, s: int = 1, activation_layer: ActFactory = nn.ReLU):
        super().__init__()
        self.dw = ConvNormAct(c1, c1, 3, s, g=c1, activation_layer=activation_layer)
        self.pw = ConvNormAct(c1, c2, 1, activation_layer=activation_layer)
        self.out_channels = c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x))


# --------------------------------------------------------------------------- V2
@register_block("InvertedResidual", "MobileNetV2")
class InvertedResidual(nn.Module):
    """MobileNet V2: expand 1x1 (ReLU6) -> depthwise (ReLU6) -> linear 1x1 bottleneck.

    yaml args: ``[out_ch, stride, expand_ratio]``. Residual only when stride 1 and in == out.
    """

    def __init__(self, c1: int, c2: int, s: int = 1, expand_ratio: float = 6, norm_layer: NormFactory = nn.BatchNorm2d):
        super().__init__()
        if s not in (1, 2):
            raise ValueError(f"InvertedResidual stride must be 1 or 2, got {s}")
        hidden = int(round(c1 * expand_ratio))
        self.use_res_connect = s == 1 and c1 == c2
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvNormAct(c1, hidden, 1, norm_layer=norm_layer, activation_layer=nn.ReLU6))
        layers += [
            ConvNormAct(hidden, hidden, 3, s, g=hidden, norm_layer=norm_layer, activation_layer=nn.ReLU6),
            ConvNormAct(hidden, c2, 1, norm_layer=norm_layer, activation_layer=None),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return x + y if self.use_res_connect else y


# --------------------------------------------------------------------------- V3
class SqueezeExcite(nn.Module):
    """Paper-style SE: global pool -> 1x1 conv (ReLU) -> 1x1 conv -> hard-sigmoid gate."""

    def __init__(self, channels: int, squeeze_channels: int | None = None, gate_layer: ActFactory = nn.Hardsigmoid):
        super().__init__()
        squeeze_channels = squeeze_channels or make_divisible(channels // 4, 8)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.gate = gate_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(self.relu(self.fc1(self.avgpool(x)))))


@register_block("Bneck", "MobileNetV3Bneck")
class Bneck(nn.Module):
    """MobileNet V3 bneck as in the paper's tables (torchvision layout).

    yaml args: ``[out_ch, expand_ch, kernel, stride, use_se, use_hs]``. SE sits after the
    depthwise activation and squeezes to ``make_divisible(expand_ch / 4, 8)``.
    """

    def __init__(self, c1: int, c2: int, exp: int, k: int = 3, s: int = 1, use_se: bool = False, use_hs: bool = False):
        super().__init__()
        act: ActFactory = nn.Hardswish if use_hs else nn.ReLU
        self.use_res_connect = s == 1 and c1 == c2
        layers: list[nn.Module] = []
        if exp != c1:
            layers.append(ConvNormAct(c1, exp, 1, activation_layer=act))
        layers.append(ConvNormAct(exp, exp, k, s, g=exp, activation_layer=act))
        if use_se:
            layers.append(SqueezeExcite(exp))
        layers.append(ConvNormAct(exp, c2, 1, activation_layer=None))
        self.block = nn.Sequential(*layers)
        self.out_channels = c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.use_res_connect else y


# The seed article's forms. Attribute names and Sequential indices match the seed code so its
# checkpoints load; do not reorder.
@register_block("h_sigmoid", kind="passthrough")
class h_sigmoid(nn.Module):  # noqa: N801 (seed name)
    """ReLU6(x + 3) / 6."""

    def __init__(self, inplace: bool = True):
        super().__init__()
        self.relu = nn.ReLU6(inplace=inplace)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + 3) / 6


@register_block("h_swish", kind="passthrough")
class h_swish(nn.Module):  # noqa: N801 (seed name)
    """x * h_sigmoid(x)."""

    def __init__(self, inplace: bool = True):
        super().__init__()
        self.sigmoid = h_sigmoid(inplace=inplace)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.sigmoid(x)


@register_block("SELayer")
class SELayer(nn.Module):
    """The seed's squeeze-excite: pool -> Linear -> ReLU -> Linear -> h_sigmoid.

    The seed squeezes to ``channel // reduction`` (no rounding); kept so its weights load.
    """

    def __init__(self, channel: int, c2: int | None = None, reduction: int = 4):
        super().__init__()
        if c2 is not None and c2 != channel:
            raise ValueError(f"SELayer keeps the channel count: in {channel}, out {c2}")
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(channel, channel // reduction),
            nn.ReLU(inplace=True),
            nn.Linear(channel // reduction, channel),
            h_sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        y = self.fc(self.avg_pool(x).view(b, c)).view(b, c, 1, 1)
        return x * y


@register_block("conv_bn_hswish")
class conv_bn_hswish(nn.Module):  # noqa: N801 (seed name)
    """3x3 conv -> BN -> h_swish stem. yaml args: ``[out_ch, stride]``."""

    def __init__(self, c1: int, c2: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = h_swish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


@register_block("MobileNetV3")
class MobileNetV3(nn.Module):
    """The seed's bneck. yaml args: ``[out_ch, hidden_ch, kernel, stride, use_se, use_hs]``.

    Without expansion (in == hidden): dw -> BN -> act -> SE -> pw-linear.
    With expansion: pw -> BN -> act -> dw -> BN -> SE -> act -> pw-linear (SE before the
    activation, as the seed writes it).
    """

    def __init__(self, inp: int, oup: int, hidden_dim: int, kernel_size: int, stride: int, use_se: int, use_hs: int):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"MobileNetV3 stride must be 1 or 2, got {stride}")
        self.identity = stride == 1 and inp == oup

        def act() -> nn.Module:
            return h_swish() if use_hs else nn.ReLU(inplace=True)

        def dw() -> nn.Module:
            return nn.Conv2d(
                hidden_dim, hidden_dim, kernel_size, stride, (kernel_size - 1) // 2, groups=hidden_dim, bias=False
            )

        se = SELayer(hidden_dim) if use_se else nn.Sequential()
        if inp == hidden_dim:
            layers = [dw(), nn.BatchNorm2d(hidden_dim), act(), se]
        else:
            layers = [
                nn.Conv2d(inp, hidden_dim, 1, 1, 0, bias=False),
                nn.BatchNorm2d(hidden_dim),
                act(),
                dw(),
                nn.BatchNorm2d(hidden_dim),
                se,
                act(),
            ]
        layers += [nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return x + y if self.identity else y


# --------------------------------------------------------------------------- V4
@register_block("UIB", "UniversalInvertedBottleneck")
class UniversalInvertedBottleneck(nn.Module):
    """MobileNet V4 universal inverted bottleneck.

    yaml args: ``[out_ch, start_dw_kernel, middle_dw_kernel, stride, expand_ratio]``; a kernel of
    0 drops that depthwise conv. (0, k) is the V2 inverted bottleneck, (k, 0) ConvNext-like,
    (0, 0) an FFN and (k1, k2) the ExtraDW variant. The stride goes to the middle depthwise conv
    when there is one, otherwise to the start one.
    """

    def __init__(
        self,
        c1: int,
        c2: int,
        start_k: int = 0,
        mid_k: int = 3,
        s: int = 1,
        expand_ratio: float = 4.0,
        activation_layer: ActFactory = nn.ReLU,
    ):
        super().__init__()
        if s != 1 and not (start_k or mid_k):
            raise ValueError("UIB with stride > 1 needs a start or middle depthwise conv")
        hidden = make_divisible(c1 * expand_ratio, 8)
        self.use_res_connect = s == 1 and c1 == c2
        self.start_dw = (
            ConvNormAct(c1, c1, start_k, 1 if mid_k else s, g=c1, activation_layer=None) if start_k else nn.Identity()
        )
        self.expand = ConvNormAct(c1, hidden, 1, activation_layer=activation_layer)
        self.middle_dw = (
            ConvNormAct(hidden, hidden, mid_k, s, g=hidden, activation_layer=activation_layer) if mid_k else nn.Identity()
        )
        self.project = ConvNormAct(hidden, c2, 1, activation_layer=None)
        self.out_channels = c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.middle_dw(self.expand(self.start_dw(x))))
        return x + y if self.use_res_connect else y


@register_block("ExtraDW")
class ExtraDW(UniversalInvertedBottleneck):
    """MobileNet V4 ExtraDW: UIB with both depthwise convs. yaml args: ``[out_ch, k1, k2, stride, expand]``."""

    def __init__(self, c1: int, c2: int, start_k: int = 3, mid_k: int = 3, s: int = 1, expand_ratio: float = 4.0):
        if not (start_k and mid_k):
            raise ValueError("ExtraDW needs both depthwise kernels (start and middle) > 0")
        super().__init__(c1, c2, start_k, mid_k, s, expand_ratio)
