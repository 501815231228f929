"""export_model end to end on a small real checkpoint: artifacts, metadata, parity, bad input."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from edgeq.errors import EdgeqError
from edgeq.export.onnx_export import export_onnx
from edgeq.graph import read_metadata, read_rt_info
from edgeq.export.pipeline import export_model
from edgeq.models.checkpoint import save_checkpoint
from edgeq.models.yolo import DetectionModel
from edgeq.runtime.backends import load_backend

IMGSZ = 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = DetectionModel("yolov5s-mobilenetv3-small", nc=3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    return save_checkpoint(model.eval(), path, names=["a", "b", "c"], imgsz=IMGSZ)


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    return export_model(checkpoint, formats="onnx,openvino", out_dir=out), out


def test_artifacts_and_metadata(exported, checkpoint):
    result, out = exported
    assert set(result.artifacts) == {"onnx", "openvino"}
    onnx_path, xml_path = result.artifacts["onnx"], result.artifacts["openvino"]
    assert onnx_path == out / "tiny.onnx" and xml_path == out / "tiny.xml" and (out / "tiny.bin").is_file()
    proto = onnx.load(str(onnx_path))
    ops = {n.op_type for n in proto.graph.node}
    assert not ops & {"HardSwish", "HardSigmoid", "BatchNormalization"}
    assert proto.opset_import[0].version == 17
    assert [i.name for i in proto.graph.input] == ["images"] and [o.name for o in proto.graph.output] == ["output0"]
    meta = read_metadata(onnx_path)
    assert json.loads(meta["edgeq.names"]) == ["a", "b", "c"]
    assert json.loads(meta["edgeq.imgsz"]) == [IMGSZ, IMGSZ] and meta["edgeq.flavour"] == "float"
    assert len(meta["edgeq.source_sha256"]) == 64
    assert not any(k.startswith("onnxsim") for k in meta)
    assert read_rt_info(xml_path)["edgeq.names"] == meta["edgeq.names"]
    assert sorted(p.name for p in out.iterdir()) == ["tiny.bin", "tiny.onnx", "tiny.xml"]  # no temp files left


def test_artifacts_compute_what_pytorch_computes(exported, checkpoint):
    result, _ = exported
    x = np.random.default_rng(0).random((1, 3, IMGSZ, IMGSZ), dtype=np.float32)
    ref = load_backend(checkpoint).infer(x)[0]
    for path in result.artifacts.values():
        opts = {"precision": "f32"} if path.suffix == ".xml" else {}
        got = load_backend(path, **opts).infer(x)[0]
        rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        assert rel < 1e-4, (path, rel)


def test_no_rewrite_keeps_hard_ops_and_dynamic_batch(checkpoint, tmp_path, exported):
    """The seed's h_swish is x * ReLU6(x + 3) / 6 as written: --no-rewrite keeps its Div nodes."""
    result = export_model(checkpoint, formats="onnx", out_dir=tmp_path, rewrite=False, dynamic=True)
    proto = onnx.load(str(result.artifacts["onnx"]))
    ops = [n.op_type for n in proto.graph.node]
    assert "BatchNormalization" not in ops and ops.count("Div") >= 20
    rewritten = [n.op_type for n in onnx.load(str(exported[0].artifacts["onnx"])).graph.node]
    assert "Div" not in rewritten
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    out = load_backend(result.artifacts["onnx"]).infer(np.zeros((3, 3, IMGSZ, IMGSZ), np.float32))[0]
    assert out.shape[0] == 3


def test_existing_artifact_is_kept_unless_force(checkpoint, tmp_path):
    export_model(checkpoint, formats="onnx", out_dir=tmp_path)
    target = tmp_path / "tiny.onnx"
    before = target.read_bytes()
    target.write_bytes(b"previous artifact")
    with pytest.raises(EdgeqError, match="already exists.*") as err:
        export_model(checkpoint, formats="onnx", out_dir=tmp_path)
    assert "--force" in str(err.value)
    assert target.read_bytes() == b"previous artifact"
    export_model(checkpoint, formats="onnx", out_dir=tmp_path, force=True)
    assert target.read_bytes() == before


def test_interrupted_export_leaves_previous_artifact(checkpoint, tmp_path, monkeypatch):
    """Ctrl-C in the middle of writing: the old file stays whole, no temp file is left."""
    export_model(checkpoint, formats="onnx", out_dir=tmp_path)
    target = tmp_path / "tiny.onnx"
    previous = target.read_bytes()

    def interrupted_save(proto, path, *args, **kwargs):
        Path(path).write_bytes(b"half a model")
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        export_model(checkpoint, formats="onnx", out_dir=tmp_path, force=True)
    assert target.read_bytes() == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx"]


def test_unwritable_output_folder(checkpoint, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(EdgeqError, match="a_file"):
        export_model(checkpoint, formats="onnx", out_dir=blocker / "out")


def test_non_detector_module(tmp_path):
    with pytest.raises(EdgeqError, match="Detect head"):
        export_onnx(nn.Sequential(nn.Conv2d(3, 8, 3)), tmp_path / "m.onnx", imgsz=64)
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize(
    "kwargs,match",
    [({"opset": 12}, "opset 12"), ({"imgsz": 100}, "multiple of the model's stride"), ({"formats": "tflite"}, "tflite")],
)
def test_bad_arguments(checkpoint, tmp_path, kwargs, match):
    with pytest.raises(EdgeqError, match=match):
        export_model(checkpoint, out_dir=tmp_path, **{"formats": "onnx", **kwargs})


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_engine_without_tensorrt_says_where_to_build(checkpoint, tmp_path):
    with pytest.raises(EdgeqError, match="TensorRT"):
        export_model(checkpoint, formats="onnx,engine", out_dir=tmp_path)
    assert (tmp_path / "tiny.onnx").is_file()  # the ONNX to carry to the device is there
    assert not (tmp_path / "tiny.engine").exists()


def test_cli_export_prints_parity_and_exits_0(checkpoint, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "edgeq.cli", "export", str(checkpoint), "--format", "onnx,openvino",
         "--out", str(tmp_path), "--num-images", "2", "--json", str(tmp_path / "parity.json")],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr
    assert "rel_l2" in out.stdout and "tiny.xml" in out.stdout
    report = json.loads((tmp_path / "parity.json").read_text())
    for entry in report["artifacts"].values():
        assert entry["outputs"][0]["rel_l2"] < 1e-4


def test_onnx_to_ir_path_needs_no_torch(exported, tmp_path):
    """How a device converts an edgeq ONNX: export_model('x.onnx') must not import torch."""
    onnx_path = exported[0].artifacts["onnx"]
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from edgeq.export.pipeline import export_model\n"
        f"r = export_model({str(onnx_path)!r}, formats='openvino', out_dir={str(tmp_path)!r})\n"
        "print(r.artifacts['openvino'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "tiny.xml").is_file() and (tmp_path / "tiny.bin").is_file()
