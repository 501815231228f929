"""Fake-quant foundation: observe once, derive per-flavour Q/DQ graphs from the same statistics."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from edgeq.data.images import load_sample_images
from edgeq.errors import EdgeqError
from edgeq.export.deploy import deploy
from edgeq.export.onnx_export import export_onnx
from edgeq.export.quantize import apply_ranges, calibrate, insert_quant_points, quant_points
from edgeq.models.yolo import DetectionModel
from edgeq.runtime.preprocess import preprocess_batch

S = 64


@pytest.fixture(scope="module")
def calibrated():
    torch.manual_seed(0)
    model, _ = deploy(DetectionModel("yolov5s-mobilenetv3-small", nc=3).eval(), example_shape=(1, 3, S, S))
    reference = copy.deepcopy(model)
    insert_quant_points(model)
    images = load_sample_images("calib_data", 8)
    batch = torch.from_numpy(preprocess_batch(images, S)[0])
    assert calibrate(model, [batch[:4], batch[4:]], progress=False) == 8
    return model, reference, batch


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_fake_quant_stays_close_to_float(calibrated, method):
    model, reference, batch = calibrated
    apply_ranges(model, "trt", method)
    with torch.no_grad():
        ref, got = reference(batch), model(batch)
    cos = torch.nn.functional.cosine_similarity(ref.flatten(), got.flatten(), dim=0).item()
    assert cos > 0.99 and not torch.equal(ref, got)


def _qdq_zero_points(path):
    proto = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in proto.graph.node if n.op_type == "Constant"}
    values = {**inits, **consts}
    zps = [values[n.input[2]] for n in proto.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]
    return proto, zps


def test_trt_flavour_graph_is_symmetric_int8_on_inputs_only(calibrated, tmp_path):
    model, _, _ = calibrated
    apply_ranges(model, "trt", "percentile")
    path = export_onnx(model, tmp_path / "m.onnx", imgsz=S)
    proto, zps = _qdq_zero_points(path)
    assert zps and all(z.dtype == np.int8 and not z.any() for z in zps)
    head_conv_outputs = {n.output[0] for n in proto.graph.node if n.op_type == "Conv" and "model.26" in n.name}
    consumers = [n.op_type for n in proto.graph.node if set(n.input) & head_conv_outputs]
    assert head_conv_outputs and "QuantizeLinear" not in consumers  # the decode stays float


def test_ort_flavour_uses_uint8_activations_and_output_qdq(calibrated, tmp_path):
    model, _, _ = calibrated
    report = apply_ranges(model, "ort", "minmax")
    path = export_onnx(model, tmp_path / "m.onnx", imgsz=S)
    _, zps = _qdq_zero_points(path)
    assert any(z.dtype == np.uint8 for z in zps) and any(z.dtype == np.int8 for z in zps)  # acts u8, weights s8
    n_points = sum(p.mode == "quant" for p in quant_points(model))
    assert n_points > report.quantized_layers  # inputs and outputs


def test_unknown_method_and_flavour(calibrated):
    model, _, _ = calibrated
    with pytest.raises(EdgeqError, match="not a calibrator"):
        apply_ranges(model, "trt", "kl")
    with pytest.raises(EdgeqError, match="unknown INT8 flavour"):
        apply_ranges(model, "tflite", "minmax")
