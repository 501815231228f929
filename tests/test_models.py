"""Blocks of the seeds: shapes, strides, residual rules, SE widths; yaml parsing and its errors."""

from __future__ import annotations

import pytest
import torch
import yaml
from torch import nn

from edgeq.errors import EdgeqError
from edgeq.models import common, mobilenet
from edgeq.models.info import count_gflops
from edgeq.models.yolo import CFG_DIR, DetectionModel, load_cfg

torch.manual_seed(0)

# (block, constructor args after (c1, c2), c1, c2, stride)
BLOCK_CASES = [
    (mobilenet.DepthwiseSeparable, (1,), 16, 32, 1),
    (mobilenet.DepthwiseSeparable, (2,), 16, 32, 2),
    (mobilenet.InvertedResidual, (1, 6), 16, 16, 1),
    (mobilenet.InvertedResidual, (2, 6), 16, 24, 2),
    (mobilenet.InvertedResidual, (1, 1), 16, 16, 1),
    (mobilenet.Bneck, (64, 5, 2, True, True), 24, 40, 2),
    (mobilenet.Bneck, (16, 3, 1, True, False), 16, 16, 1),
    (mobilenet.MobileNetV3, (16, 3, 2, 1, 0), 16, 16, 2),
    (mobilenet.MobileNetV3, (88, 3, 1, 0, 0), 24, 24, 1),
    (mobilenet.MobileNetV3, (96, 5, 2, 1, 1), 24, 40, 2),
    (mobilenet.conv_bn_hswish, (2,), 3, 16, 2),
    (mobilenet.UniversalInvertedBottleneck, (0, 3, 1, 4), 16, 16, 1),  # IB
    (mobilenet.UniversalInvertedBottleneck, (3, 0, 2, 4), 16, 32, 2),  # ConvNext-like
    (mobilenet.UniversalInvertedBottleneck, (0, 0, 1, 2), 16, 16, 1),  # FFN
    (mobilenet.ExtraDW, (3, 5, 2, 4), 16, 32, 2),
    (common.Conv, (3, 2), 8, 16, 2),
    (common.DWConv, (3, 1), 16, 16, 1),
    (common.Bottleneck, (True,), 16, 16, 1),
    (common.C3, (2, False), 16, 32, 1),
    (common.SPPF, (5,), 32, 32, 1),
    (common.Focus, (3,), 3, 16, 2),
]


@pytest.mark.parametrize("block,args,c1,c2,stride", BLOCK_CASES, ids=lambda v: getattr(v, "__name__", None))
def test_block_shape_and_stride(block, args, c1, c2, stride):
    m = block(c1, c2, *args).eval()
    y = m(torch.randn(2, c1, 32, 32))
    assert y.shape == (2, c2, 32 // stride, 32 // stride)


@pytest.mark.parametrize(
    "make,expect_residual",
    [
        (lambda: mobilenet.InvertedResidual(16, 16, 1, 6), True),
        (lambda: mobilenet.InvertedResidual(16, 16, 2, 6), False),
        (lambda: mobilenet.InvertedResidual(16, 24, 1, 6), False),
        (lambda: mobilenet.Bneck(16, 16, 64, 3, 1), True),
        (lambda: mobilenet.Bneck(16, 16, 64, 3, 2), False),
        (lambda: mobilenet.MobileNetV3(24, 24, 88, 3, 1, 0, 0), True),
        (lambda: mobilenet.MobileNetV3(16, 16, 16, 3, 2, 1, 0), False),
        (lambda: mobilenet.MobileNetV3(24, 40, 96, 5, 1, 1, 1), False),
        (lambda: mobilenet.UniversalInvertedBottleneck(16, 16, 3, 3, 1), True),
        (lambda: mobilenet.UniversalInvertedBottleneck(16, 16, 3, 3, 2), False),
        (lambda: common.Bottleneck(16, 16, True), True),
        (lambda: common.Bottleneck(16, 16, False), False),
    ],
)
def test_residual_only_when_stride1_and_same_channels(make, expect_residual):
    """Residual blocks must equal x + body(x); zeroing the body's last BN isolates the skip path."""
    m = make().eval()
    last_bn = [mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)][-1]
    nn.init.zeros_(last_bn.weight)
    nn.init.zeros_(last_bn.bias)
    x = torch.randn(1, next(mod for mod in m.modules() if isinstance(mod, nn.Conv2d)).in_channels, 16, 16)
    y = m(x)
    # Every body here ends in BN (or SiLU(BN), and SiLU(0) = 0), so with that BN zeroed the body
    # outputs 0 and a residual block returns exactly its input.
    flag = next(getattr(m, a) for a in ("use_res_connect", "identity", "add") if hasattr(m, a))
    assert flag == expect_residual
    if expect_residual:
        assert torch.equal(y, x)
    else:
        assert y.shape != x.shape or not torch.allclose(y, x)


def test_paper_se_squeezes_to_quarter_rounded_to_8():
    for channels, squeeze in [(16, 8), (72, 24), (96, 24), (120, 32), (240, 64), (576, 144), (88, 24)]:
        se = mobilenet.SqueezeExcite(channels)
        assert se.fc1.out_channels == squeeze, channels
        assert se.fc2.out_channels == channels


def test_seed_se_layer_keeps_seed_width_and_gate():
    se = mobilenet.SELayer(96)
    assert se.fc[0].out_features == 24 and se.fc[2].out_features == 96
    assert isinstance(se.fc[3], mobilenet.h_sigmoid)
    x = torch.randn(2, 96, 8, 8)
    gate = se.fc(x.mean((2, 3))).view(2, 96, 1, 1)
    assert torch.allclose(se(x), x * gate)
    assert gate.min() >= 0 and gate.max() <= 1


def test_hard_activations_match_torch():
    x = torch.linspace(-6, 6, 101)
    assert torch.allclose(mobilenet.h_sigmoid()(x.clone()), nn.functional.hardsigmoid(x), atol=1e-6)
    assert torch.allclose(mobilenet.h_swish()(x.clone()), nn.functional.hardswish(x), atol=1e-6)


def test_seed_mobilenetv3_layer_order():
    """SE before the activation with expansion, after it without (the seed's order)."""
    expand = mobilenet.MobileNetV3(24, 40, 96, 5, 2, 1, 1).conv
    assert [type(m).__name__ for m in expand] == [
        "Conv2d", "BatchNorm2d", "h_swish", "Conv2d", "BatchNorm2d", "SELayer", "h_swish", "Conv2d", "BatchNorm2d"
    ]
    plain = mobilenet.MobileNetV3(16, 16, 16, 3, 2, 1, 0).conv
    assert [type(m).__name__ for m in plain] == ["Conv2d", "BatchNorm2d", "ReLU", "SELayer", "Conv2d", "BatchNorm2d"]
    assert plain[0].groups == 16


@pytest.mark.parametrize(
    "cfg,params,gflops",
    [
        ("yolov5s-mobilenetv3-small", 5.2e6, 11.6),
        ("yolov5s", 7.2e6, 16.5),
    ],
)
def test_seed_figures_within_3_percent(cfg, params, gflops):
    model = DetectionModel(cfg, nc=80)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - params) / params < 0.03
    assert abs(count_gflops(model, 640) - gflops) / gflops < 0.03


@pytest.mark.parametrize("cfg", sorted(p.stem for p in CFG_DIR.glob("*.yaml")))
def test_bundled_configs_build_and_decode(cfg):
    model = DetectionModel(cfg, nc=5).eval()
    assert model.stride.tolist() == [8.0, 16.0, 32.0]
    y = model(torch.zeros(1, 3, 128, 96))
    n_anchors = 3 * sum((128 // s) * (96 // s) for s in (8, 16, 32))
    assert y.shape == (1, n_anchors, 10)
    model.train()
    maps = model(torch.zeros(1, 3, 128, 96))
    assert [tuple(m.shape) for m in maps] == [(1, 3, 128 // s, 96 // s, 10) for s in (8, 16, 32)]


def test_seed_yamls_load_as_written():
    """The two seed yamls are kept verbatim (only comments added): nc 80 and 20."""
    assert load_cfg("yolov5s-mobilenetv3-small")["nc"] == 80
    large = load_cfg("yolov5s-mobilenetv3-large")
    assert large["nc"] == 20
    model = DetectionModel("yolov5s-mobilenetv3-large")
    assert model.nc == 20
    assert [m.f for m in model.model][-1] == [23, 26, 29]


def test_decode_matches_yolov5_formula():
    model = DetectionModel("yolov5n", nc=2).eval()
    head = model.detect
    head.raw_output = True
    x = torch.rand(1, 3, 64, 64)
    maps = model(x)
    head.raw_output = False
    decoded = model(x)
    p = maps[0][0, 1, 2, 3].sigmoid()  # anchor 1, row 2, col 3 of stride 8
    cx = (p[0] * 2 - 0.5 + 3) * 8
    w = (p[2] * 2) ** 2 * head.anchors[0, 1, 0] * 8
    idx = 1 * 8 * 8 + 2 * 8 + 3
    assert torch.allclose(decoded[0, idx, 0], cx) and torch.allclose(decoded[0, idx, 2], w)
    assert torch.allclose(decoded[0, idx, 4:], p[4:])


def _write_yaml(tmp_path, data) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _base_cfg():
    return load_cfg("yolov5n")


def test_unknown_module_names_file_and_lists_known(tmp_path):
    cfg = _base_cfg()
    cfg["backbone"][1][2] = "FancyBlock"
    path = _write_yaml(tmp_path, cfg)
    with pytest.raises(EdgeqError) as err:
        DetectionModel(path)
    msg = str(err.value)
    assert "bad.yaml" in msg and "FancyBlock" in msg and "layer 1" in msg and "MobileNetV3" in msg


def test_wrong_from_index(tmp_path):
    cfg = _base_cfg()
    cfg["head"][2][0] = [-1, 40]
    path = _write_yaml(tmp_path, cfg)
    with pytest.raises(EdgeqError, match=r"bad.yaml: layer 12 .*'from' index 40"):
        DetectionModel(path)


def test_missing_keys_and_not_yaml(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("nc: 3\n")
    with pytest.raises(EdgeqError, match="empty.yaml: missing key"):
        DetectionModel(str(path))
    bad = tmp_path / "broken.yaml"
    bad.write_text("backbone: [[-1, 1, Conv\n")
    with pytest.raises(EdgeqError, match="broken.yaml: not valid yaml"):
        DetectionModel(str(bad))
    with pytest.raises(EdgeqError, match="not found"):
        DetectionModel(str(tmp_path / "nope.yaml"))


def test_yaml_strings_are_never_evaluated(tmp_path):
    cfg = _base_cfg()
    cfg["head"][1][3] = ["__import__('os').system('true')", 2, "nearest"]
    path = _write_yaml(tmp_path, cfg)
    with pytest.raises(EdgeqError, match="bad.yaml"):
        DetectionModel(path)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda c: c["backbone"][1].__setitem__(1, "three"), "'number' must be a positive integer"),
        (lambda c: c["backbone"][1].__setitem__(3, []), "first argument must be the output channels"),
        (lambda c: c["backbone"][1].__setitem__(3, 64), "'args' must be a list"),
        (lambda c: c["backbone"][0].__setitem__(0, 5), r"'from' index 5 .*-1 \(the previous layer\)"),
    ],
)
def test_malformed_rows_name_the_layer(tmp_path, edit, match):
    cfg = _base_cfg()
    edit(cfg)
    with pytest.raises(EdgeqError, match=match):
        DetectionModel(_write_yaml(tmp_path, cfg))
