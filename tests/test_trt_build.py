"""TensorRT engine building: the parts that need no GPU (profiles, trtexec line, the Q/DQ graph
TensorRT will consume, sidecar, calibration cache) everywhere; real builds where TensorRT and a
GPU exist (marked ``tensorrt``, skipped with a reason elsewhere). No stand-in TensorRT."""

from __future__ import annotations

import functools
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeq.errors import EdgeqError
from edgeq.export import trt_build as tb
from edgeq.export import trt_calib_cache as cc
from edgeq.export import trt_plan as tp
from edgeq.export.trt_plan import BuildOptions
from edgeq.runtime import engine_sidecar
from edgeq.runtime.engine_sidecar import check_engine_compatibility, read_sidecar

# ---------------------------------------------------------------------------- tiny ONNX models


def make_onnx(
    path: Path,
    *,
    batch: int | str = 1,
    size: int = 32,
    qdq: bool = False,
    zp_dtype: str = "int8",
    zp_value: int = 0,
    flavour: str | None = None,
    imgsz_meta: bool = True,
) -> Path:
    """images (N,3,size,size) -> [Q/DQ] -> Conv 3->4 -> output0, with edgeq metadata."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")]
    nodes, conv_in = [], "images"
    if qdq:
        zp = np.array(zp_value, dtype=np.int8 if zp_dtype == "int8" else np.uint8)
        inits += [numpy_helper.from_array(np.array(1 / 127, dtype=np.float32), "s"), numpy_helper.from_array(zp, "zp")]
        nodes += [
            helper.make_node("QuantizeLinear", ["images", "s", "zp"], ["images_q"], name="q_in"),
            helper.make_node("DequantizeLinear", ["images_q", "s", "zp"], ["images_dq"], name="dq_in"),
        ]
        conv_in = "images_dq"
    nodes.append(helper.make_node("Conv", [conv_in, "w"], ["output0"], name="Conv_0", pads=[1, 1, 1, 1]))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [batch, 4, size, size])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    props = {"edgeq.names": json.dumps(["a", "b"])}
    if imgsz_meta:
        props["edgeq.imgsz"] = json.dumps([size, size])
    if flavour:
        props["edgeq.flavour"] = flavour
    onnx.helper.set_model_props(model, props)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


# ---------------------------------------------------------------------------- profile shapes


def test_profile_dynamic_batch():
    opts = BuildOptions(min_batch=1, opt_batch=4, max_batch=8)
    shapes = tp.profile_shapes((-1, 3, 320, 320), (320, 320), opts)
    assert shapes == {"images": ((1, 3, 320, 320), (4, 3, 320, 320), (8, 3, 320, 320))}


def test_profile_dynamic_hw_takes_imgsz():
    shapes = tp.profile_shapes((-1, 3, -1, -1), (256, 320), BuildOptions(max_batch=2), "x")
    assert shapes["x"] == ((1, 3, 256, 320), (1, 3, 256, 320), (2, 3, 256, 320))


def test_profile_static_shape_thrice():
    shapes = tp.profile_shapes((2, 3, 64, 64), (64, 64), BuildOptions(min_batch=1, opt_batch=2, max_batch=2))
    assert shapes["images"] == ((2, 3, 64, 64),) * 3


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"min_batch": 0}, "min_batch"),
        ({"min_batch": 4, "opt_batch": 2, "max_batch": 8}, "min_batch <= opt_batch <= max_batch"),
        ({"opt_batch": 9, "max_batch": 8}, "opt_batch=9"),
    ],
)
def test_profile_bad_ranges(kwargs, word):
    with pytest.raises(EdgeqError, match=word):
        tp.profile_shapes((-1, 3, 32, 32), (32, 32), BuildOptions(**kwargs))


def test_profile_static_batch_conflicts_name_the_argument():
    with pytest.raises(EdgeqError, match="max_batch=8 conflicts with the static batch 1"):
        tp.profile_shapes((1, 3, 32, 32), (32, 32), BuildOptions(max_batch=8))
    with pytest.raises(EdgeqError, match="opt_batch=1 conflicts with the static batch 4") as info:
        tp.profile_shapes((4, 3, 32, 32), (32, 32), BuildOptions())
    assert "dynamic batch" in str(info.value)


def test_profile_imgsz_conflicts_with_static_size():
    with pytest.raises(EdgeqError, match="imgsz 640x640 conflicts with the static size 320x320"):
        tp.profile_shapes((1, 3, 320, 320), (640, 640), BuildOptions())


# ---------------------------------------------------------------------------- trtexec


def test_trtexec_static_has_no_shape_flags():
    cmd = tp.trtexec_command("m.onnx", "m.engine", BuildOptions(), imgsz=(320, 320), input_shape=(1, 3, 320, 320))
    assert cmd == "trtexec --onnx=m.onnx --saveEngine=m.engine --memPoolSize=workspace:2048M --skipInference"


def test_trtexec_dynamic_fp16_timing_cache(tmp_path):
    opts = BuildOptions(fp16=True, opt_batch=4, max_batch=8, workspace_gb=1.5, timing_cache=Path("t.cache"))
    cmd = tp.trtexec_command("m.onnx", "m.engine", opts, imgsz=(320, 320), input_shape=(-1, 3, 320, 320))
    assert "--minShapes=images:1x3x320x320 --optShapes=images:4x3x320x320 --maxShapes=images:8x3x320x320" in cmd
    assert "--fp16" in cmd and "--int8" not in cmd
    assert "--memPoolSize=workspace:1536M" in cmd and "--timingCacheFile=t.cache" in cmd


def test_trtexec_int8_explicit_and_implicit():
    explicit = tp.trtexec_command("m.int8-trt.onnx", "m.engine", BuildOptions(int8=True), input_shape=(1, 3, 640, 640))
    assert "--int8" in explicit and "--calib" not in explicit and "--stronglyTyped" not in explicit
    opts = BuildOptions(calibration_cache=Path("calib.cache"))
    implicit = tp.trtexec_command("m.onnx", "m.engine", opts, input_shape=(1, 3, 640, 640))
    assert "--int8 --calib=calib.cache" in implicit


def test_trtexec_quotes_paths_and_defaults_to_dynamic_when_range_given():
    cmd = tp.trtexec_command("my model.onnx", "out/m.engine", BuildOptions(max_batch=2), imgsz=(64, 64))
    assert "--onnx='my model.onnx'" in cmd and "--maxShapes=images:2x3x64x64" in cmd


# ---------------------------------------------------------------------------- reading the ONNX


def test_read_onnx_io_float(tmp_path):
    path = make_onnx(tmp_path / "m.onnx", batch="batch", flavour="float")
    name, shape, meta = tp.read_onnx_io(path)
    assert name == "images" and shape == (-1, 3, 32, 32)
    assert meta["edgeq.flavour"] == "float" and json.loads(meta["edgeq.imgsz"]) == [32, 32]
    assert tp.inspect_onnx(path).qdq_nodes == 0


def test_read_onnx_io_int8_trt_qdq(tmp_path):
    path = make_onnx(tmp_path / "m.int8-trt.onnx", qdq=True, flavour="int8-trt")
    name, shape, meta = tp.read_onnx_io(path)
    info = tp.inspect_onnx(path)
    assert shape == (1, 3, 32, 32) and info.qdq_nodes == 2
    assert tp.int8_mode(path, info, BuildOptions()) == "explicit"


def test_int8_ort_flavour_is_refused_with_the_fix(tmp_path):
    path = make_onnx(tmp_path / "m.int8-ort.onnx", qdq=True, zp_dtype="uint8", zp_value=128, flavour="int8-ort")
    with pytest.raises(EdgeqError) as info:
        tp.read_onnx_io(path)
    text = str(info.value)
    assert "m.int8-ort.onnx" in text and "ONNX Runtime" in text and "int8-trt" in text


def test_uint8_zero_points_refused_without_flavour(tmp_path):
    path = make_onnx(tmp_path / "foreign.onnx", qdq=True, zp_dtype="uint8", zp_value=128)
    with pytest.raises(EdgeqError, match="zero point 0.*QuantizeLinear q_in has a uint8 zero point"):
        tp.read_onnx_io(path)


def test_int8_trt_without_qdq_and_unknown_flavour_refused(tmp_path):
    with pytest.raises(EdgeqError, match="no QuantizeLinear"):
        tp.read_onnx_io(make_onnx(tmp_path / "a.onnx", flavour="int8-trt"))
    with pytest.raises(EdgeqError, match="unknown edgeq.flavour"):
        tp.read_onnx_io(make_onnx(tmp_path / "b.onnx", flavour="int4"))


def test_missing_or_broken_onnx(tmp_path):
    with pytest.raises(EdgeqError, match="does not exist"):
        tp.read_onnx_io(tmp_path / "nope.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(EdgeqError, match="not a readable ONNX"):
        tp.read_onnx_io(tmp_path / "bad.onnx")


def test_int8_request_on_float_onnx_needs_qdq_or_cache(tmp_path):
    path = make_onnx(tmp_path / "m.onnx")
    info = tp.inspect_onnx(path)
    assert tp.int8_mode(path, info, BuildOptions()) is None
    assert tp.int8_mode(path, info, BuildOptions(calibration_cache=Path("c.cache"))) == "implicit"
    with pytest.raises(EdgeqError, match="float ONNX"):
        tp.int8_mode(path, info, BuildOptions(int8=True))


def test_engine_imgsz_sources(tmp_path):
    path = make_onnx(tmp_path / "m.onnx", imgsz_meta=False, size=48)
    assert tp.engine_imgsz(path, tp.inspect_onnx(path), BuildOptions()) == (48, 48)
    assert tp.engine_imgsz(path, tp.inspect_onnx(path), BuildOptions(imgsz=(96, 64))) == (96, 64)


# ---------------------------------------------------------------------------- sidecar


def _sidecar(**kw):
    opts = BuildOptions(fp16=True, max_batch=4)
    shapes = tp.profile_shapes((-1, 3, 32, 32), (32, 32), opts)
    return engine_sidecar.sidecar_dict(
        {"edgeq.flavour": "float"}, "10.3.0.30", {"name": "Orin", "compute_capability": "8.7"}, "ab" * 32,
        fp16=opts.fp16, workspace_gb=opts.workspace_gb, profile=shapes, onnx_name="m.onnx",
        trtexec="trtexec --onnx=m.onnx", build_seconds=12.345, **kw,
    )


def test_sidecar_contents_and_atomic_write(tmp_path):
    data = _sidecar()
    assert data["tensorrt_version"] == "10.3.0.30" and data["device"] == {"name": "Orin", "compute_capability": "8.7"}
    assert data["precision"] == {"fp16": True, "int8": None}
    assert data["profile"]["images"] == {"min": [1, 3, 32, 32], "opt": [1, 3, 32, 32], "max": [4, 3, 32, 32]}
    assert data["onnx"] == {"file": "m.onnx", "sha256": "ab" * 32} and data["build_seconds"] == 12.35
    assert data["edgeq.flavour"] == "float" and data["built_at"]  # metadata at the top, as the runtime reads it
    engine = tmp_path / "m.engine"
    path = engine_sidecar.write_sidecar(engine, data)
    assert path == tmp_path / "m.engine.json"
    assert json.loads(path.read_text()) == data and read_sidecar(engine) == data
    assert [p.name for p in tmp_path.iterdir()] == ["m.engine.json"]  # no temp file left behind
    assert _sidecar(int8="implicit", calibration_cache=Path("c.cache"))["calibration_cache"] == "c.cache"
    assert _sidecar(int8="explicit", calibration_cache=Path("c.cache"))["calibration_cache"] is None


def test_sidecar_is_what_the_runtime_checks():
    """The exporter's sidecar drives the runtime's version/GPU check and its rebuild advice."""
    data = _sidecar()
    check = functools.partial(check_engine_compatibility, data, compute_capability=(8, 7), engine="m.engine")
    check(trt_version="10.3.0.30", device_name="Orin")
    check(trt_version="10.3.0.26", device_name="Orin")  # another build of the same release
    with pytest.raises(EdgeqError) as version:
        check(trt_version="10.7.0.23", device_name="Orin")
    assert "built for TensorRT 10.3.0.30 but this machine has TensorRT 10.7.0.23" in str(version.value)
    assert "not portable across TensorRT versions" in str(version.value)
    assert "with `edgeq export m.onnx --format engine`" in str(version.value)
    with pytest.raises(EdgeqError) as device:
        check(trt_version="10.3.0.30", device_name="NVIDIA GeForce RTX 4090")
    assert "built for Orin (compute capability 8.7) but this machine has NVIDIA GeForce RTX 4090" in str(device.value)
    assert str(device.value).endswith("or `trtexec --onnx=m.onnx`")


def test_builder_sidecar_is_read_back_by_the_runtime(tmp_path, monkeypatch):
    """What build_engine records after a build, the TensorRT backend reads: one module for both."""
    import hashlib

    from edgeq.runtime.backends import tensorrt as trt_backend

    assert tb.engine_sidecar is trt_backend.engine_sidecar is engine_sidecar
    assert [n for n in vars(trt_backend) if "sidecar" in n] == ["engine_sidecar"]  # no copy of its own

    onnx_path = make_onnx(tmp_path / "m.int8-trt.onnx", batch="batch", qdq=True, flavour="int8-trt")
    info = tp.inspect_onnx(onnx_path)
    opts = BuildOptions(int8=True, max_batch=4)
    shapes = tp.profile_shapes(info.shape, (32, 32), opts, info.name)
    engine = tmp_path / "m.int8-trt.engine"
    command = tp.trtexec_command(onnx_path, engine, opts, info.name, (32, 32), info.shape)
    monkeypatch.setattr(tb, "detect_device", lambda: {"name": "Orin", "compute_capability": "8.7"})
    written = tb.record_build(engine, onnx_path, info, opts, "10.3.0.30", profile=shapes, int8="explicit",
                              trtexec=command, build_seconds=3.0)
    assert written == engine_sidecar.sidecar_path(engine) == engine_sidecar.find_sidecar(engine)

    data = read_sidecar(engine)  # what TensorRTBackend._load_impl does, minus the GPU
    meta = engine_sidecar.model_meta(data, str(engine))
    assert (meta.names, meta.imgsz, meta.flavour, meta.made_for) == (["a", "b"], (32, 32), "int8-trt", "tensorrt")
    assert meta.extra["tensorrt_version"] == "10.3.0.30" and meta.extra["device"]["name"] == "Orin"
    assert data["precision"] == {"fp16": False, "int8": "explicit"} and data["profile"]["images"]["max"][0] == 4
    assert data["onnx"]["sha256"] == hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    check_engine_compatibility(data, trt_version="10.3.0.30", device_name="Orin", compute_capability=(8, 7),
                               engine=engine)
    with pytest.raises(EdgeqError) as other:
        check_engine_compatibility(data, trt_version="10.3.0.30", device_name="NVIDIA L4",
                                   compute_capability=(8, 9), engine=engine)
    assert f"with `edgeq export m.int8-trt.onnx --format engine` or `{command}`" in str(other.value)


# ---------------------------------------------------------------------------- calibration cache


def test_cache_hex_format_by_hand(tmp_path):
    # 12.7 / 127 = 0.1 -> float32 0x3DCCCCCD; 1/127 (input in [0, 1]) -> 0x3C010204, as TensorRT writes.
    assert cc.encode_scale(cc.scale_from_amax(12.7)) == "3dcccccd"
    assert cc.encode_scale(cc.scale_from_amax(1.0)) == "3c010204"
    path = cc.write_calibration_cache({"images": 1.0, "/m/Conv_output_0": 12.7}, tmp_path / "calib.cache")
    assert path.read_text() == "TRT-100300-EntropyCalibration2\nimages: 3c010204\n/m/Conv_output_0: 3dcccccd\n"


def test_cache_round_trip_is_bit_exact(tmp_path):
    rng = np.random.default_rng(1)
    amax = {f"t{i}": float(v) for i, v in enumerate(rng.uniform(1e-4, 700, 50))} | {"images": 1.0, "zero": 0.0}
    path = cc.write_calibration_cache(amax, tmp_path / "c.cache", trt_version_tag="TRT-8601-EntropyCalibration2")
    scales = cc.read_calibration_cache(path)
    assert list(scales) == list(amax)
    for name, a in amax.items():
        expected = np.float32(np.float32(a) / np.float32(127))
        assert struct.pack(">f", scales[name]) == struct.pack(">f", expected), name
    assert path.read_text().splitlines()[0] == "TRT-8601-EntropyCalibration2"


def test_cache_reads_tensorrt_written_forms():
    text = "TRT-8401-EntropyCalibration2\ninput:0: 3caa54fc\n(Unnamed Layer* 64) [Shuffle]_output: 0\n"
    header, scales = cc.parse_calibration_cache(text)
    assert header == "TRT-8401-EntropyCalibration2"
    assert scales["input:0"] == struct.unpack(">f", bytes.fromhex("3caa54fc"))[0]
    assert scales["(Unnamed Layer* 64) [Shuffle]_output"] == 0.0


@pytest.mark.parametrize("text", ["", "hello\nimages: 3c010204\n", "TRT-100300-EntropyCalibration2\nimages 3c010204\n"])
def test_cache_malformed(text):
    with pytest.raises(EdgeqError):
        cc.parse_calibration_cache(text)


def test_cache_refuses_bad_amax(tmp_path):
    with pytest.raises(EdgeqError, match="amax"):
        cc.write_calibration_cache({"images": float("nan")}, tmp_path / "c.cache")
    with pytest.raises(EdgeqError, match="empty"):
        cc.write_calibration_cache({}, tmp_path / "c.cache")


def test_version_tags_and_retag():
    assert cc.tensorrt_version_tag("10.3.0.30") == "TRT-100300-EntropyCalibration2"
    assert cc.tensorrt_version_tag("10.14.1") == "TRT-101401-EntropyCalibration2"
    assert cc.tensorrt_version_tag("8.6.1.6") == "TRT-8601-EntropyCalibration2"
    text = "TRT-100300-EntropyCalibration2\nimages: 3c010204\n"
    assert cc.retag_calibration_cache(text, "10.3.0.30") == (text, False)
    assert cc.retag_calibration_cache(text, "10.7.0") == ("TRT-100700-EntropyCalibration2\nimages: 3c010204\n", True)


def test_stale_cache_detected():
    tensors = {"images", "/m/Conv_output_0"}
    trt_named = {"images": 0.1, "/m/Conv_output_0": 0.2, "(Unnamed Layer* 3) [Shuffle]_output": 0.1}
    assert cc.cache_mismatch(trt_named, tensors, "images") is None
    assert "no scale for the input" in cc.cache_mismatch({"/m/Conv_output_0": 0.2}, tensors, "images")
    assert "1 of its 2 tensors are not in the ONNX (/old/Conv_output_0)" in cc.cache_mismatch(
        {"images": 0.1, "/old/Conv_output_0": 0.2}, tensors, "images"
    )


def test_missing_tensorrt_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails like an uninstalled package
    with pytest.raises(EdgeqError, match=r"JetPack.*pip install edgeq\[tensorrt\]"):
        tb.build_engine(make_onnx(tmp_path / "m.onnx"), tmp_path / "m.engine", BuildOptions())


def test_importing_trt_build_imports_no_backend():
    import subprocess

    code = (
        "import sys, edgeq.export.trt_build, edgeq.export.trt_plan, edgeq.export.trt_calib_cache\n"
        "print([m for m in ('tensorrt', 'pycuda', 'onnx', 'torch') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------- the real thing


@pytest.mark.tensorrt
class TestRealTensorRT:
    """Builds and deserializes engines; runs where TensorRT and an NVIDIA GPU exist."""

    @pytest.fixture(autouse=True)
    def _trt(self):
        self.trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (needs an NVIDIA GPU)")

    def _deserialize(self, engine: Path):
        runtime = self.trt.Runtime(self.trt.Logger(self.trt.Logger.WARNING))
        return runtime.deserialize_cuda_engine(engine.read_bytes())

    def test_float_dynamic_batch(self, tmp_path):
        onnx_path = make_onnx(tmp_path / "m.onnx", batch="batch", flavour="float")
        opts = BuildOptions(fp16=True, max_batch=2, timing_cache=tmp_path / "timing.cache")
        engine = tb.build_engine(onnx_path, tmp_path / "m.engine", opts)
        assert self._deserialize(engine) is not None and (tmp_path / "timing.cache").stat().st_size > 0
        side = read_sidecar(engine)
        assert side["tensorrt_version"] == self.trt.__version__
        check_engine_compatibility(side, trt_version=self.trt.__version__, device_name=side["device"]["name"],
                                   compute_capability=None, engine=engine)

    def test_explicit_int8(self, tmp_path):
        onnx_path = make_onnx(tmp_path / "m.int8-trt.onnx", qdq=True, flavour="int8-trt")
        engine = tb.build_engine(onnx_path, tmp_path / "m.engine", BuildOptions())
        assert self._deserialize(engine) is not None
        assert read_sidecar(engine)["precision"]["int8"] == "explicit"
