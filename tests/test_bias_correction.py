"""Bias correction: the measured shift is the real one, and taking it out helps on the real backends."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from edgeq.export.bias_correction import apply_bias_shifts, bias_shifts, conv_quantization
from edgeq.export.int8 import Int8Options, quantize_file
from edgeq.export.qdq import per_channel_int8
from edgeq.graph import read_metadata

SCALE, ZERO = 0.04, 3  # a coarse step against inputs mostly in [0, 0.06]: rounding is biased there


def _conv_models(weight: np.ndarray, bias: np.ndarray, *, group: int, stride: int):
    """The same grouped, strided, padded convolution, float and with Q/DQ on input and weights."""
    attrs = dict(group=group, strides=[stride, stride], pads=[1, 1, 1, 1], kernel_shape=list(weight.shape[2:]))
    cin = weight.shape[1] * group
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", cin, 11, 11])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    w = numpy_helper.from_array(weight, "w")
    b = numpy_helper.from_array(bias, "b")
    float_model = helper.make_model(helper.make_graph([helper.make_node("Conv", ["x", "w", "b"], ["y"], "conv", **attrs)],
                                                      "f", [x], [y], [w, b]), opset_imports=[helper.make_opsetid("", 17)])
    ints, scales = per_channel_int8(weight, 0)
    inits = [numpy_helper.from_array(ints, "wq"), numpy_helper.from_array(scales.astype(np.float32), "ws"),
             numpy_helper.from_array(np.zeros(len(scales), np.int8), "wz"),
             numpy_helper.from_array(np.array(SCALE, np.float32), "s"), numpy_helper.from_array(np.array(ZERO, np.uint8), "z"),
             numpy_helper.from_array(bias, "b")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd", "b"], ["y"], "conv", **attrs)]
    q_model = helper.make_model(helper.make_graph(nodes, "q", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)])
    return float_model, q_model


def _run(model, batch):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, {"x": batch})[0]


@pytest.mark.parametrize("group,stride", [(1, 1), (2, 2), (4, 2)])
def test_measured_shift_is_the_exact_mean_of_the_rounding_error(group, stride):
    rng = np.random.default_rng(0)
    weight = rng.normal(0, 0.5, (8, 4 // group, 3, 3)).astype(np.float32)
    bias = rng.normal(0, 0.1, 8).astype(np.float32)
    float_model, q_model = _conv_models(weight, bias, group=group, stride=stride)
    view = conv_quantization(q_model)["conv"]
    assert (view.input, view.scale, view.zero_point, view.low, view.high, view.weights) == ("x", pytest.approx(SCALE), ZERO, 0, 255, True)

    batches = [rng.gamma(1.0, 0.02, (1, 4, 11, 11)).astype(np.float32) for _ in range(24)]
    shifts = bias_shifts(float_model, {"q": q_model}, batches)["q"]["conv"]

    x = torch.from_numpy(np.concatenate(batches))
    xq = (torch.clamp(torch.round(x / SCALE) + ZERO, 0, 255) - ZERO) * SCALE
    ints, scales = per_channel_int8(weight, 0)
    wq = torch.from_numpy(ints.astype(np.float32) * scales.reshape(-1, 1, 1, 1))
    conv = dict(stride=stride, padding=1, groups=group)
    exact = (torch.conv2d(xq, wq, **conv) - torch.conv2d(x, torch.from_numpy(weight), **conv)).mean(dim=(0, 2, 3))
    np.testing.assert_allclose(shifts, exact.numpy(), rtol=1e-4, atol=1e-6)
    assert np.abs(shifts).max() > 1e-3  # the case is biased: a zero shift would pass nothing above

    # on ONNX Runtime's own kernels, the corrected bias takes the mean error of the output away
    corrected_bias = numpy_helper.to_array(next(i for i in apply_bias_shifts(float_model, {"conv": shifts}).graph.initializer
                                                if i.name == "b"))
    fixed = onnx.ModelProto()
    fixed.CopyFrom(q_model)
    next(i for i in fixed.graph.initializer if i.name == "b").CopyFrom(numpy_helper.from_array(corrected_bias, "b"))
    test = rng.gamma(1.0, 0.02, (48, 4, 11, 11)).astype(np.float32)  # other images than the measured ones
    ref = _run(float_model, test)
    before = np.abs((_run(q_model, test) - ref).mean(axis=(0, 2, 3)))
    after = np.abs((_run(fixed, test) - ref).mean(axis=(0, 2, 3)))
    assert after.mean() < 0.3 * before.mean()


def test_a_conv_without_bias_or_with_a_shared_one_gets_its_own(tmp_path):
    w = numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w")
    b = numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "b")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, 4, 4]) for n in ("y1", "y2", "y3")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y1"], "c1"), helper.make_node("Conv", ["x", "w", "b"], ["y2"], "c2"),
             helper.make_node("Conv", ["x", "w"], ["y3"], "c3")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], outs, [w, b]), opset_imports=[helper.make_opsetid("", 17)])
    fixed = apply_bias_shifts(model, {"c1": np.array([0.5, 0.5], np.float32), "c3": np.array([1.0, -1.0], np.float32)})
    onnx.checker.check_model(fixed)
    values = {i.name: numpy_helper.to_array(i) for i in fixed.graph.initializer}
    by_name = {n.name: n for n in fixed.graph.node}
    np.testing.assert_array_equal(values[by_name["c1"].input[2]], [0.5, 1.5])
    np.testing.assert_array_equal(values[by_name["c2"].input[2]], [1.0, 2.0])  # the shared bias is untouched
    np.testing.assert_array_equal(values[by_name["c3"].input[2]], [-1.0, 1.0])
    out = _run(fixed, np.zeros((1, 2, 4, 4), np.float32))
    assert (out[0, 0] == 0.5).all() and (out[0, 1] == 1.5).all()


@pytest.fixture(scope="module")
def random_model(int8_export):
    """The session's shared INT8 export (tests/conftest.py): bias correction on by default."""
    return int8_export.result, int8_export.images


def test_export_corrects_every_quantized_convolution_and_records_it(random_model, tmp_path):
    result, folder = random_model
    for key in ("int8-ort", "int8-ov"):
        recorded = json.loads(read_metadata(result.artifacts[key])["edgeq.int8"])
        convs = sum(n.op_type == "Conv" for n in onnx.load(str(result.artifacts["onnx"])).graph.node)
        assert recorded["bias_correction"] == {"images": 8, "convolutions": convs}
        assert result.int8_reports[key].bias_corrected == convs
    plain, report = quantize_file(result.artifacts["onnx"], result.table, "ov", tmp_path / "p.int8-ov.onnx", Int8Options())
    assert report.bias_corrected == 0
    assert json.loads(read_metadata(plain)["edgeq.int8"])["bias_correction"] == {"images": 0, "convolutions": 0}


def test_one_float_pass_corrects_each_flavour_as_alone(random_model, tmp_path):
    """The export measures every flavour's shifts from one float pass; one flavour corrected on
    its own (quantize_file) gets exactly the same biases."""
    from edgeq.runtime.preprocess import preprocess_batch
    from edgeq.data.images import load_sample_images

    result, folder = random_model
    batches = [preprocess_batch([im], 64)[0] for im in load_sample_images(folder, 8)]
    report = result.int8_reports["int8-ov"]
    alone, _ = quantize_file(result.artifacts["onnx"], result.table, "ov", tmp_path / "a.int8-ov.onnx",
                             Int8Options(float_tensors=tuple(report.float_tensors)), correction_batches=batches)
    exported = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(result.artifacts["int8-ov"])).graph.initializer}
    mine = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(alone)).graph.initializer}
    assert exported.keys() == mine.keys() and all(np.array_equal(exported[k], mine[k]) for k in mine)
