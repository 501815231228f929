"""Deployment rewrites: BN folding, hard-activation spelling, +3 bias fold, deploy check, ONNX ops."""

from __future__ import annotations

import io
import warnings

import onnx
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from edgeq.errors import EdgeqError
from edgeq.export import bn_fold
from edgeq.export.bn_fold import fuse_conv_bn
from edgeq.export.deploy import deploy
from edgeq.export.hard_act import (
    HARD_FORMS,
    HardSigmoidDeploy,
    HardSigmoidDeployFolded,
    HardSwishDeploy,
    rewrite_hard_activations,
)
from edgeq.models.common import Conv, Detect
from edgeq.models.mobilenet import SELayer, SqueezeExcite, conv_bn_hswish, h_sigmoid, h_swish
from edgeq.models.yolo import DetectionModel

HARD_MODULES = (nn.Hardswish, nn.Hardsigmoid, h_swish, h_sigmoid)
HARD_ONNX_OPS = {"HardSwish", "HardSigmoid", "BatchNormalization"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics and affine parameters (fresh BNs are identities, which hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) * 2 + 0.1)
                m.weight.copy_(torch.randn(n, generator=gen))
                m.bias.copy_(torch.randn(n, generator=gen) * 0.5)
    return model.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / a.norm()).item()


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x.clone())


def onnx_ops(model: nn.Module, x: torch.Tensor) -> set[str]:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, x, buf, dynamo=False, opset_version=17, input_names=["images"], output_names=["output0"]
        )
    return {node.op_type for node in onnx.load_from_string(buf.getvalue()).graph.node}


def leftovers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (_BatchNorm, *HARD_MODULES))]


# --------------------------------------------------------------------------- BatchNorm folding
@pytest.mark.parametrize("groups", [1, 2, 8], ids=["plain", "grouped", "depthwise"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_conv_bn_folds_exactly(groups, bias):
    torch.manual_seed(groups)
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=groups, bias=bias)
    model = randomize(nn.Sequential(conv, nn.BatchNorm2d(8), nn.ReLU()))
    x = torch.randn(2, 8, 6, 6)
    fused, report = fuse_conv_bn(model)
    assert report.fused == [("0", "1")] and report.unfused == []
    assert isinstance(fused[1], nn.Identity) and fused[0].bias is not None
    assert rel_err(run(model, x), run(fused, x)) < 1e-5
    assert isinstance(model[1], nn.BatchNorm2d), "the input model must not be modified"


def test_linear_bn1d_folds_exactly():
    torch.manual_seed(0)
    model = randomize(nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU()))
    x = torch.randn(4, 6)
    fused, report = fuse_conv_bn(model)
    assert report.fused == [("0", "1")]
    assert rel_err(run(model, x), run(fused, x)) < 1e-5


class ConvTwoUsers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_unfusable_bns_are_reported_and_model_still_matches():
    torch.manual_seed(0)
    model = randomize(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(4), ConvTwoUsers()))
    fused, report = deploy(model, example_input=torch.randn(1, 4, 5, 5))
    unfused = dict(report["unfused"])
    assert set(unfused) == {"2", "3.bn"}
    assert "relu" in unfused["2"].lower() and "also used" in unfused["3.bn"]
    assert report["fused"] == [] and report["max_rel_error"] < 1e-5


class Untraceable(nn.Module):
    """Data-dependent control flow: fx cannot trace it, its children still fold."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.Hardswish())

    def forward(self, x):
        y = self.body(x)
        return y if y.sum() > 0 else -y


def test_untraceable_model_falls_back_to_children():
    torch.manual_seed(0)
    model = randomize(Untraceable())
    fused, report = deploy(model, example_input=torch.randn(1, 3, 6, 6))
    assert report["fx_untraced"] and report["fx_untraced"][0][0] == "<root>"
    assert report["fused"] == [["body.0", "body.1"]] and "body" in report["fx_traced"]
    assert leftovers(fused) == []


def test_known_patterns_fold_when_nothing_traces(monkeypatch):
    """Without fx: Sequential neighbours and the known act(bn(conv(x))) blocks still fold."""

    def no_fx(module, own_forward_only=False, leaf=None):
        raise fx.proxy.TraceError("fx disabled for this test")

    monkeypatch.setattr(bn_fold, "trace", no_fx)
    torch.manual_seed(0)
    model = randomize(nn.Sequential(conv_bn_hswish(3, 8, 2), Conv(8, 8, 3), conv_bn_act(8, 4, 1), ConvTwoUsers()))
    fused, report = fuse_conv_bn(model)
    assert sorted(report.fused) == [("0.conv", "0.bn"), ("1.conv", "1.bn"), ("2.0", "2.1")]
    assert [name for name, _ in report.unfused] == ["3.bn"] and "no known conv->bn pattern" in report.unfused[0][1]
    x = torch.randn(1, 3, 8, 8)
    assert rel_err(run(model, x), run(fused, x)) < 1e-5


# --------------------------------------------------------------------------- hard activations
class FunctionalSwish(nn.Module):
    def forward(self, x):
        return F.hardswish(x)


class FunctionalSigmoid(nn.Module):
    def forward(self, x):
        return F.hardsigmoid(x)


ACTIVATIONS = {
    "nn.Hardswish": (nn.Hardswish, F.hardswish),
    "nn.Hardsigmoid": (nn.Hardsigmoid, F.hardsigmoid),
    "F.hardswish": (FunctionalSwish, F.hardswish),
    "F.hardsigmoid": (FunctionalSigmoid, F.hardsigmoid),
    "h_swish": (h_swish, F.hardswish),
    "h_sigmoid": (h_sigmoid, F.hardsigmoid),
}


@pytest.mark.parametrize("form", HARD_FORMS)
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_every_activation_form_is_rewritten_exactly(name, form):
    cls, reference = ACTIVATIONS[name]
    model = nn.Sequential(cls())
    x = torch.linspace(-5, 5, 101).view(1, 1, 101)  # covers both clip knees
    out, report = rewrite_hard_activations(model, form=form)
    assert leftovers(out) == [] and len(report.replaced) == 1
    deployed = [m for m in out.modules() if isinstance(m, (HardSwishDeploy, HardSigmoidDeploy))]
    assert len(deployed) == 1 and deployed[0].form == form
    assert torch.allclose(run(out, x), reference(x), atol=1e-6)


def test_bad_form_is_a_user_error():
    with pytest.raises(EdgeqError, match="form"):
        rewrite_hard_activations(nn.Hardswish(), form="fast")


@pytest.mark.parametrize("form,tail", [("mul", ["Add", "Clip", "Mul", "Mul"]), ("div", ["Add", "Clip", "Mul", "Div"])])
def test_deploy_hswish_exports_as_add_clip_mul(form, tail):
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(HardSwishDeploy(form), torch.randn(1, 2, 3, 3), buf, dynamo=False, opset_version=17)
    ops = [n.op_type for n in onnx.load_from_string(buf.getvalue()).graph.node if n.op_type != "Constant"]
    assert ops == tail


# --------------------------------------------------------------------------- +3 bias fold
@pytest.mark.parametrize("se_cls,gate,producer", [(SELayer, "fc.3", "fc.2"), (SqueezeExcite, "gate", "fc2")])
def test_bias_fold_of_se_gate_matches(se_cls, gate, producer):
    torch.manual_seed(0)
    se = se_cls(16).eval()
    x = torch.randn(2, 16, 4, 4)
    folded, report = rewrite_hard_activations(se, fold_bias=True)
    plain, plain_report = rewrite_hard_activations(se, fold_bias=False)
    assert report.folded == [(gate, producer)] and plain_report.folded == []
    assert isinstance(folded.get_submodule(gate), HardSigmoidDeployFolded)
    assert isinstance(plain.get_submodule(gate), HardSigmoidDeploy)
    bias_shift = folded.get_submodule(producer).bias - se.get_submodule(producer).bias
    assert torch.allclose(bias_shift, torch.full_like(bias_shift, 3.0))
    ref = run(se, x)
    assert rel_err(ref, run(folded, x)) < 1e-6 and rel_err(ref, run(plain, x)) < 1e-6


# --------------------------------------------------------------------------- torchvision-style net
class SqueezeExcitation(nn.Module):
    """torchvision's SE: the gate is a functional call in forward, not a module."""

    def __init__(self, c: int, squeeze: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, c, 1)
        self.relu = nn.ReLU()

    def _scale(self, x):
        return F.hardsigmoid(self.fc2(self.relu(self.fc1(self.avgpool(x)))))

    def forward(self, x):
        return self._scale(x) * x


def conv_bn_act(c1: int, c2: int, k: int = 1, s: int = 1, g: int = 1, act: type | None = nn.Hardswish) -> nn.Sequential:
    layers = [nn.Conv2d(c1, c2, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(c2)]
    return nn.Sequential(*layers, *([act()] if act else []))


class InvertedResidual(nn.Module):
    def __init__(self, c1: int, exp: int, c2: int, s: int, use_se: bool):
        super().__init__()
        self.use_res_connect = s == 1 and c1 == c2
        layers = [conv_bn_act(c1, exp), conv_bn_act(exp, exp, 3, s, g=exp)]
        if use_se:
            layers.append(SqueezeExcitation(exp, 8))
        layers.append(conv_bn_act(exp, c2, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        y = self.block(x)
        return x + y if self.use_res_connect else y


class TinyMobileNetV3(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_act(3, 8, 3, 2), InvertedResidual(8, 16, 8, 1, True), InvertedResidual(8, 24, 12, 2, True)
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(12, 16), nn.Hardswish(), nn.Linear(16, 5))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def test_torchvision_style_mobilenetv3_deploys():
    torch.manual_seed(0)
    model = randomize(TinyMobileNetV3())
    x = torch.randn(2, 3, 16, 16)
    deployed, report = deploy(model, example_input=x)
    assert leftovers(deployed) == []
    for gm in (m for m in deployed.modules() if isinstance(m, fx.GraphModule)):
        assert not any(n.target is F.hardsigmoid for n in gm.graph.nodes)
    assert sorted(report["graph_modules"]) == ["features.1.block.2", "features.2.block.2"]
    assert ["features.1.block.2.hardsigmoid_deploy_0", "features.1.block.2.fc2"] in report["folded_bias"]
    assert len(report["fused"]) == 7 and report["unfused"] == []
    assert rel_err(run(model, x), run(deployed, x)) < 1e-5
    assert report["max_rel_error"] < 1e-5


def test_deploy_leaves_the_input_model_alone():
    torch.manual_seed(0)
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Hardswish())).train()
    model[1].eval()  # a frozen BN inside a training model keeps its own mode
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deployed, _ = deploy(model, example_input=torch.randn(1, 3, 8, 8))
    assert model.training and not model[1].training and not deployed.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model[2], nn.Hardswish) and isinstance(deployed[2], HardSwishDeploy)


def test_no_rewrite_only_fuses():
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Hardswish()))
    deployed, report = deploy(model, rewrite=False, example_input=torch.randn(1, 3, 8, 8))
    assert isinstance(deployed[1], nn.Identity) and isinstance(deployed[2], nn.Hardswish)
    assert report["rewritten"] == [] and report["form"] == "none"


def test_deploy_raises_when_outputs_differ():
    torch.manual_seed(0)
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    with pytest.raises(EdgeqError, match=r"output relative error"):
        deploy(model, example_input=torch.randn(1, 3, 8, 8), rtol=0.0)


# --------------------------------------------------------------------------- seed detector
@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    model = randomize(DetectionModel("yolov5s-mobilenetv3-small", nc=3))
    deployed, report = deploy(model)
    return model, deployed, report


def test_detection_model_deploys_and_keeps_its_interface(detector):
    model, deployed, report = detector
    assert type(deployed) is DetectionModel and isinstance(deployed.detect, Detect)
    assert leftovers(deployed) == [] and report["unfused"] == []
    assert report["example_shape"] == [1, 3, 64, 64] and report["max_rel_error"] < 1e-5
    assert report["fx_traced"] == ["<root>"]  # the whole DetectionModel traces, yet stays a DetectionModel
    assert not [k for m in (deployed, deployed.detect) for k in vars(m) if k.startswith("_tensor_constant")]
    assert torch.equal(deployed.detect.stride, model.detect.stride)
    assert torch.equal(deployed.detect.anchors, model.detect.anchors)
    assert [(m.i, m.f, m.type) for m in deployed.model] == [(m.i, m.f, m.type) for m in model.model]
    assert ["model.0.conv", "model.0.bn"] in report["fused"] and ["model.12.conv", "model.12.bn"] in report["fused"]
    assert len(report["folded_bias"]) == 9  # one per SELayer gate
    x = torch.randn(1, 3, 32, 32)
    ref = run(model, x)
    assert rel_err(ref, run(deployed, x)) < 1e-5
    deployed.detect.raw_output = True
    try:
        maps = run(deployed, x)
    finally:
        deployed.detect.raw_output = False
    assert len(maps) == 3 and rel_err(ref, deployed.detect.decode(maps)) < 1e-5


def test_deployed_detector_onnx_has_no_hard_or_bn_ops(detector):
    _, deployed, _ = detector
    ops = onnx_ops(deployed, torch.zeros(1, 3, 64, 64))
    assert not ops & HARD_ONNX_OPS and {"Clip", "Conv"} <= ops
