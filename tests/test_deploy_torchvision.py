"""The deploy passes on what torchvision's detection builders produce, without torchvision.

Two gaps found on torchvision's MobileNetV3 detectors: ``FrozenBatchNorm2d`` (used whenever
pretrained weights load) was neither folded nor reported, and ``deploy`` refused the list of
images those models take. torchvision does not import beside this torch, so the norm is
written out here: same class name, buffers and forward as ``torchvision.ops.misc``.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch import nn

from edgeq.errors import EdgeqError
from edgeq.export import bn_fold
from edgeq.export.bn_fold import fuse_conv_bn, is_frozen_affine_norm
from edgeq.export.deploy import deploy


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.misc.FrozenBatchNorm2d: BatchNorm2d with fixed statistics and affine parameters."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        num_batches_tracked_key = prefix + "num_batches_tracked"
        if num_batches_tracked_key in state_dict:
            del state_dict[num_batches_tracked_key]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return x * scale + bias

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.weight.shape[0]}, eps={self.eps})"


class NotANorm(FrozenBatchNorm2d):
    """The same buffers, but a forward that ignores the statistics: folding it would be wrong."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.reshape(1, -1, 1, 1) + self.bias.reshape(1, -1, 1, 1)


class Conv2dNormActivation(nn.Sequential):
    """torchvision's Conv -> norm -> activation block (a Sequential subclass)."""

    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 1, act: type | None = nn.Hardswish):
        layers = [nn.Conv2d(c1, c2, k, s, k // 2, bias=False), FrozenBatchNorm2d(c2)]
        super().__init__(*layers, *([act()] if act else []))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def randomize_frozen(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial frozen statistics (fresh ones are identities, which hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                n = m.weight.numel()
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) * 2 + 0.1)
                m.weight.copy_(torch.randn(n, generator=gen))
                m.bias.copy_(torch.randn(n, generator=gen) * 0.5)
    return model.eval()


def frozen_left(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m).__name__ == "FrozenBatchNorm2d"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / a.double().norm()).item()


def test_frozen_norm_is_recognised_by_structure():
    assert is_frozen_affine_norm(FrozenBatchNorm2d(4))
    assert not is_frozen_affine_norm(nn.BatchNorm2d(4))  # folded as a BatchNorm, not as a frozen norm
    assert not is_frozen_affine_norm(nn.LayerNorm(4)) and not is_frozen_affine_norm(Conv2dNormActivation(3, 4))


@pytest.mark.parametrize("block", [nn.Sequential, Conv2dNormActivation], ids=["sequential", "conv2d_norm_act"])
def test_frozen_bn_block_folds_exactly(block):
    torch.manual_seed(0)
    if block is nn.Sequential:
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), FrozenBatchNorm2d(8), nn.Hardswish())
    else:
        model = block(3, 8)
    model = randomize_frozen(model)
    x = torch.randn(2, 3, 7, 7)
    fused, report = fuse_conv_bn(model)
    assert report.fused == [("0", "1")] and report.unfused == []
    assert frozen_left(fused) == [] and isinstance(fused[1], nn.Identity) and fused[0].bias is not None
    with torch.no_grad():
        assert rel_err(model(x), fused(x)) < 2e-6
    deployed, rep = deploy(model, example_input=x)
    assert rep["fused"] == [["0", "1"]] and frozen_left(deployed) == [] and rep["max_rel_error"] < 2e-6
    assert frozen_left(model) == ["1"], "the input model must not be modified"


def test_frozen_bn_folds_by_pattern_when_nothing_traces(monkeypatch):
    def no_fx(module, own_forward_only=False, leaf=None):
        raise fx.proxy.TraceError("fx disabled for this test")

    monkeypatch.setattr(bn_fold, "trace", no_fx)
    model = randomize_frozen(nn.Sequential(Conv2dNormActivation(3, 4), Conv2dNormActivation(4, 4, 1, act=None)))
    fused, report = fuse_conv_bn(model)
    assert sorted(report.fused) == [("0.0", "0.1"), ("1.0", "1.1")] and frozen_left(fused) == []
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        assert rel_err(model(x), fused(x)) < 2e-6


@pytest.mark.parametrize(
    "layers,reason",
    [
        (lambda: [nn.Conv2d(3, 4, 3), nn.ReLU(), FrozenBatchNorm2d(4)], "not a Conv/Linear"),
        (lambda: [nn.Conv2d(3, 4, 3), NotANorm(4)], "forward is not"),
        (lambda: [nn.Flatten(), nn.Linear(3 * 25, 4), FrozenBatchNorm2d(4)], "does not return a tensor shaped like"),
    ],
    ids=["after_relu", "wrong_forward", "after_linear"],
)
def test_frozen_norm_that_cannot_fold_is_reported(layers, reason):
    torch.manual_seed(0)
    model = randomize_frozen(nn.Sequential(*layers()))  # NotANorm too: it subclasses FrozenBatchNorm2d
    norm = str(len(model) - 1)
    _, report = deploy(model, example_input=torch.randn(1, 3, 5, 5))
    assert report["fused"] == [] and [n for n, _ in report["unfused"]] == [norm]
    assert reason in report["unfused"][0][1] and report["max_rel_error"] == 0.0


# --------------------------------------------------------------------------- structured inputs/outputs
class ListToDict(nn.Module):
    """Shaped like a torchvision detector: a list of CHW images in, a dict of named outputs out.

    Iterating the input list is untraceable for fx, so the norms are found by the fallbacks.
    """

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(Conv2dNormActivation(3, 8, s=2), Conv2dNormActivation(8, 8, 1, act=None))
        self.head = nn.Conv2d(8, 5, 1)

    def forward(self, images: list[torch.Tensor]) -> dict:
        maps = [self.head(self.backbone(img.unsqueeze(0))) for img in images]
        return {
            "boxes": [m[:, :4].flatten(2) for m in maps],
            "scores": torch.stack([m[:, 4].sigmoid().amax() for m in maps]),
            "sizes": [img.shape[-1] for img in images],  # not a tensor: not compared
        }


def test_deploy_takes_a_list_and_compares_a_dict():
    torch.manual_seed(0)
    model = randomize_frozen(ListToDict())
    images = [torch.randn(3, 16, 16), torch.randn(3, 12, 20)]
    deployed, report = deploy(model, example_input=images)
    assert frozen_left(deployed) == [] and len(report["fused"]) == 2 and report["unfused"] == []
    assert "<root>" in [scope for scope, _ in report["fx_untraced"]]
    assert set(report["output_errors"]) == {"output['boxes'][0]", "output['boxes'][1]", "output['scores']"}
    assert report["max_rel_error"] < 1e-5
    assert report["example_inputs"] == {"input[0]": [3, 16, 16], "input[1]": [3, 12, 20]}
    assert report["example_shape"] is None
    with pytest.raises(EdgeqError, match=r"output\['(boxes|scores)'\]"):
        deploy(model, example_input=images, rtol=1e-12)


class DictToTuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = Conv2dNormActivation(3, 4)

    def forward(self, batch: dict) -> tuple:
        y = self.body(batch["image"]) * batch["gain"]
        return y, (y.mean(), {"max": y.amax()})


def test_deploy_takes_a_dict_and_names_nested_outputs():
    torch.manual_seed(0)
    model = randomize_frozen(DictToTuple())
    batch = {"image": torch.randn(1, 3, 6, 6), "gain": torch.tensor(2.0)}
    _, report = deploy(model, example_input=batch)
    assert list(report["output_errors"]) == ["output[0]", "output[1][0]", "output[1][1]['max']"]
    assert report["example_inputs"] == {"input['image']": [1, 3, 6, 6], "input['gain']": []}
    assert report["fused"] == [["body.0", "body.1"]] and report["max_rel_error"] < 1e-5


def test_deploy_refuses_a_non_tensor_example_naming_it():
    with pytest.raises(EdgeqError, match=r"input\[1\] is a str"):
        deploy(ListToDict(), example_input=[torch.randn(3, 8, 8), "image.jpg"])
