"""Calibration table: round trip, reuse without images, and the bad-input cases of issue 5."""

from __future__ import annotations

import copy
import shutil
import warnings

import cv2
import numpy as np
import pytest
import torch

from edgeq.errors import EdgeqError
from edgeq.export.calib_table import CalibrationTable, collect
from edgeq.export.deploy import deploy
from edgeq.export.quantize import apply_ranges, insert_quant_points, quant_points
from edgeq.models.checkpoint import save_checkpoint
from edgeq.models.yolo import DetectionModel

S = 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = DetectionModel("yolov5s-mobilenetv3-small", nc=3).eval()
    return save_checkpoint(model, tmp_path_factory.mktemp("ck") / "m.pt", names=["a", "b", "c"], imgsz=S)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imgs")
    for p in sorted(__import__("pathlib").Path("calib_data").glob("*.jpg"))[:6]:
        shutil.copy(p, folder / p.name)
    return folder


@pytest.fixture(scope="module")
def table(checkpoint, images):
    return collect(checkpoint, images, num_images=6, progress=False)


def test_table_round_trip_and_reuse(table, checkpoint, tmp_path):
    assert table.image_count == 6 and len(table.image_list_sha256) == 64 and table.imgsz == S
    loaded = CalibrationTable.load(table.save(tmp_path / "t.json"))
    assert set(loaded.tensors) == set(table.tensors)
    name = next(iter(table.tensors))
    assert loaded.tensors[name].to_state() == table.tensors[name].to_state()

    # Quantizing from the saved table gives exactly what the in-memory statistics give.
    from edgeq.models.checkpoint import load_checkpoint

    base, _ = deploy(load_checkpoint(checkpoint).model, example_shape=(1, 3, S, S))
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    insert_quant_points(a)
    insert_quant_points(b)
    table.attach(a)
    loaded.attach(b)
    apply_ranges(a, "trt", "entropy")
    apply_ranges(b, "trt", "entropy")
    x = torch.rand(1, 3, S, S)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_table_for_another_model_is_refused_naming_the_tensor(table):
    other, _ = deploy(DetectionModel("yolov5n", nc=3).eval(), example_shape=(1, 3, S, S))
    insert_quant_points(other)
    with pytest.raises(EdgeqError, match=r"no statistics for model\.1\.conv\.input"):
        table.attach(other, source="t.json")


def test_empty_folder(checkpoint, tmp_path):
    with pytest.raises(EdgeqError, match=str(tmp_path.name)):
        collect(checkpoint, tmp_path, progress=False)


def test_fewer_images_than_asked_warns_and_goes_on(checkpoint, images):
    with pytest.warns(UserWarning, match="fewer than the 50 asked for"):
        t = collect(checkpoint, images, num_images=50, progress=False)
    assert t.image_count == 6


def test_all_black_images_warn_degenerate(checkpoint, tmp_path):
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.zeros((S, S, 3), np.uint8))
    with pytest.warns(UserWarning, match="degenerate range"):
        t = collect(checkpoint, tmp_path, num_images=3, progress=False)
    assert t.degenerate()


@pytest.mark.parametrize("content,match", [(None, "does not exist"), ("{", "not a readable"), ('{"a": 1}', "not an edgeq")])
def test_bad_table_files(tmp_path, content, match):
    path = tmp_path / "t.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(EdgeqError, match=match):
        CalibrationTable.load(path)


def test_trt_cache_names_the_float_onnx_tensors(table, checkpoint, tmp_path):
    import onnx

    from edgeq.export.calib_table import write_trt_cache
    from edgeq.export.pipeline import export_model
    from edgeq.export.trt_calib_cache import read_calibration_cache

    onnx_path = export_model(checkpoint, formats="onnx", out_dir=tmp_path).artifacts["onnx"]
    written = write_trt_cache(table, onnx_path, tmp_path / "calib.cache", method="minmax")
    scales = read_calibration_cache(tmp_path / "calib.cache")
    convs = [n for n in onnx.load(str(onnx_path)).graph.node if n.op_type == "Conv"]
    assert set(scales) == set(written) and "images" in scales
    assert all(n.input[0] in scales and n.output[0] in scales for n in convs)
    assert 0.5 < written["images"] <= 1.0  # letterboxed RGB in [0, 1]
    assert scales["images"] == pytest.approx(written["images"] / 127, rel=1e-6)


@pytest.mark.parametrize(
    "node,path",
    [
        ("/model.0/conv/Conv", "model.0.conv"),
        ("/model.1/conv/conv.0/Conv", "model.1.conv.0"),
        ("/model.15/m/m.0/cv1/conv/Conv", "model.15.m.0.cv1.conv"),
        ("/model.26/m.2/Conv", "model.26.m.2"),
        ("/model.3/act/Mul", None),
    ],
)
def test_conv_module_path(node, path):
    from edgeq.export.calib_table import conv_module_path

    assert conv_module_path(node) == path
