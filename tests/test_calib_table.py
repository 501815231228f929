"""Calibration table: round trip, reuse without images, and the bad-input cases of issue 5."""

from __future__ import annotations

import shutil

import cv2
import numpy as np
import onnx
import pytest
import torch

from edgeq.errors import EdgeqError
from edgeq.export.calib_table import CalibrationTable, calibrate
from edgeq.export.int8 import quantize_model
from edgeq.export.pipeline import export_model
from edgeq.models.checkpoint import save_checkpoint
from edgeq.models.yolo import DetectionModel

S = 64


def _float_onnx(model, folder):
    checkpoint = save_checkpoint(model, folder / "m.pt", names=["a", "b", "c"], imgsz=S)
    return export_model(checkpoint, formats="onnx", out_dir=folder).artifacts["onnx"]


@pytest.fixture(scope="module")
def float_onnx(tmp_path_factory):
    torch.manual_seed(0)
    return _float_onnx(DetectionModel("yolov5s-mobilenetv3-small", nc=3).eval(), tmp_path_factory.mktemp("ck"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imgs")
    for p in sorted(__import__("pathlib").Path("calib_data").glob("*.jpg"))[:6]:
        shutil.copy(p, folder / p.name)
    return folder


@pytest.fixture(scope="module")
def table(float_onnx, images):
    return calibrate(float_onnx, images, num_images=6, progress=False)[0]


def test_table_round_trip_and_reuse(table, float_onnx, tmp_path):
    assert table.image_count == 6 and len(table.image_list_sha256) == 64 and table.imgsz == S
    loaded = CalibrationTable.load(table.save(tmp_path / "t.json"))
    assert set(loaded.tensors) == set(table.tensors)
    name = next(iter(table.tensors))
    assert loaded.tensors[name].to_state() == table.tensors[name].to_state()

    # Quantizing from the saved table gives exactly the graph the in-memory statistics give.
    model = onnx.load(str(float_onnx))
    for flavour in ("int8-trt", "int8-ort", "int8-ov"):
        a, _ = quantize_model(model, table, flavour)
        b, _ = quantize_model(model, loaded, flavour)
        assert a.SerializeToString() == b.SerializeToString()


def test_calibration_keeps_the_first_images_it_decoded(float_onnx, images):
    table, kept = calibrate(float_onnx, images, num_images=6, keep=2, progress=False)
    assert len(kept) == 2 and kept[0].shape == (1, 3, S, S) and kept[0].dtype == np.float32


def test_table_for_another_model_is_refused_naming_the_tensor(table, tmp_path):
    other = onnx.load(str(_float_onnx(DetectionModel("yolov5n", nc=3).eval(), tmp_path)))
    with pytest.raises(EdgeqError, match=r"does not match this model: no range for tensor /model\.0/\S+ \(and \d+ more\)"):
        quantize_model(other, table, "int8-ort")


def test_empty_folder(float_onnx, tmp_path):
    with pytest.raises(EdgeqError, match=str(tmp_path.name)):
        calibrate(float_onnx, tmp_path, progress=False)


def test_fewer_images_than_asked_warns_and_goes_on(float_onnx, images):
    with pytest.warns(UserWarning, match="fewer than the 50 asked for"):
        t, _ = calibrate(float_onnx, images, num_images=50, progress=False)
    assert t.image_count == 6


def test_all_black_images_warn_degenerate(float_onnx, tmp_path):
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.zeros((S, S, 3), np.uint8))
    with pytest.warns(UserWarning, match="degenerate range"):
        t, _ = calibrate(float_onnx, tmp_path, num_images=3, progress=False)
    assert t.degenerate()


@pytest.mark.parametrize("content,match", [(None, "does not exist"), ("{", "not a readable"), ('{"a": 1}', "not an edgeq")])
def test_bad_table_files(tmp_path, content, match):
    path = tmp_path / "t.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(EdgeqError, match=match):
        CalibrationTable.load(path)


def test_trt_cache_names_the_float_onnx_tensors(table, float_onnx, tmp_path):
    from edgeq.export.calib_table import write_trt_cache
    from edgeq.export.trt_calib_cache import read_calibration_cache

    onnx_path = float_onnx
    written = write_trt_cache(table, onnx_path, tmp_path / "calib.cache", method="minmax")
    scales = read_calibration_cache(tmp_path / "calib.cache")
    convs = [n for n in onnx.load(str(onnx_path)).graph.node if n.op_type == "Conv"]
    assert set(scales) == set(written) and "images" in scales
    assert all(n.input[0] in scales and n.output[0] in scales for n in convs)
    assert 0.5 < written["images"] <= 1.0  # letterboxed RGB in [0, 1]
    assert scales["images"] == pytest.approx(written["images"] / 127, rel=1e-6)
