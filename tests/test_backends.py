"""Backends: one contract every runner must meet, plus backend selection and TensorRT checks.

``BackendContract`` is a template (not collected by itself); each ``Test*`` subclass says how
to build its runner for the static-batch and dynamic-batch artifacts and how close it must
stay to the PyTorch model. The TensorRT subclass only runs where TensorRT and a GPU exist.
"""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from edgeq.errors import EdgeqError
from edgeq.runtime.backends import FlavourWarning, load_backend
from edgeq.runtime.backends.base import Backend, TensorSpec, parse_meta
from edgeq.runtime.engine_sidecar import check_engine_compatibility, read_sidecar, sidecar_props, write_sidecar
from edgeq.runtime.parity import tensor_metrics
from conftest import RuntimeArtifacts, add_onnx_metadata

ANCHORS = 3 * ((96 // 8) ** 2 + (96 // 16) ** 2 + (96 // 32) ** 2)  # 567 at 96 px


class BackendContract:
    """What every backend guarantees; subclasses fill in the four class attributes and make()."""

    backend_name: str
    rel_l2_max: float
    static_batch: bool = True  # has a batch-1 artifact to test the fixed-batch error on
    input_shape: tuple  # inputs[0].shape of the static artifact

    def make(self, art: RuntimeArtifacts, *, dynamic: bool = False) -> Backend:
        raise NotImplementedError

    @pytest.fixture(scope="class")
    def runner(self, runtime_artifacts: RuntimeArtifacts):
        backend = self.make(runtime_artifacts).load()
        yield backend
        backend.close()

    @pytest.fixture(scope="class")
    def dynamic_runner(self, runtime_artifacts: RuntimeArtifacts):
        backend = self.make(runtime_artifacts, dynamic=True).load()
        yield backend
        backend.close()

    def test_reads_metadata(self, runner: Backend, runtime_artifacts: RuntimeArtifacts):
        meta = runner.meta
        assert runner.name == self.backend_name
        assert meta.names == runtime_artifacts.names
        assert meta.stride == runtime_artifacts.stride
        assert meta.imgsz == (runtime_artifacts.imgsz, runtime_artifacts.imgsz)
        assert meta.flavour == "float" and meta.outputs == "decoded"
        assert meta.extra["source_sha256"] == runtime_artifacts.props["edgeq.source_sha256"]

    def test_input_and_output_specs(self, runner: Backend):
        (spec,) = runner.inputs
        assert spec == TensorSpec("images", self.input_shape, "float32")
        assert runner.outputs[0].name == "output0" and runner.outputs[0].dtype == "float32"
        assert runner.outputs[0].shape[-1] == 5 + 3

    def test_infer_shape_and_dtype(self, runner: Backend, runtime_artifacts: RuntimeArtifacts):
        outputs = runner.infer(runtime_artifacts.sample[:1])
        assert isinstance(outputs, list) and len(outputs) == 1
        assert outputs[0].shape == (1, ANCHORS, 8) and outputs[0].dtype == np.float32

    def test_matches_pytorch(self, runner: Backend, dynamic_runner: Backend, runtime_artifacts: RuntimeArtifacts):
        single = runner.infer(runtime_artifacts.sample[:1])[0]
        assert tensor_metrics(runtime_artifacts.reference[:1], single)["rel_l2"] < self.rel_l2_max
        batch = dynamic_runner.infer(runtime_artifacts.sample)[0]
        assert tensor_metrics(runtime_artifacts.reference, batch)["rel_l2"] < self.rel_l2_max

    def test_dynamic_batch_accepts_three(self, dynamic_runner: Backend, runtime_artifacts: RuntimeArtifacts):
        assert dynamic_runner.infer(runtime_artifacts.sample)[0].shape == (3, ANCHORS, 8)

    def test_fixed_batch_refuses_three(self, runner: Backend, runtime_artifacts: RuntimeArtifacts):
        if not self.static_batch:
            pytest.skip(f"{self.backend_name} has no fixed-batch artifact")
        with pytest.raises(EdgeqError, match=r"--dynamic or --batch N"):
            runner.infer(runtime_artifacts.sample)

    def test_infer_before_load_raises(self, runtime_artifacts: RuntimeArtifacts):
        backend = self.make(runtime_artifacts)
        with pytest.raises(EdgeqError, match=r"call load\(\) before infer"):
            backend.infer(runtime_artifacts.sample[:1])
        with pytest.raises(EdgeqError, match=r"call load\(\) before inputs"):
            backend.inputs

    def test_wrong_shape_names_input_and_both_shapes(self, runner: Backend):
        expected = runner.inputs[0].shape_str()
        with pytest.raises(EdgeqError) as info:
            runner.infer(np.zeros((1, 4, 96, 96), np.float32))
        assert f"{runner.path.name} expects images of shape {expected}, got (1, 4, 96, 96)" in str(info.value)
        with pytest.raises(EdgeqError, match=r"expects images of shape .*, got \(3, 96, 96\)"):
            runner.infer(np.zeros((3, 96, 96), np.float32))

    @pytest.mark.parametrize("dtype", [np.float64, np.uint8])
    def test_non_float32_raises(self, runner: Backend, dtype: type):
        with pytest.raises(EdgeqError, match=rf"expects images as float32, got {np.dtype(dtype).name}"):
            runner.infer(np.zeros((1, 3, 96, 96), dtype))

    def test_context_manager_loads_and_closes(self, runtime_artifacts: RuntimeArtifacts):
        with self.make(runtime_artifacts) as backend:
            assert backend.loaded
        assert not backend.loaded


class TestOnnxRuntime(BackendContract):
    backend_name = "onnxruntime"
    rel_l2_max = 1e-5
    input_shape = (1, 3, 96, 96)

    def make(self, art: RuntimeArtifacts, *, dynamic: bool = False) -> Backend:
        from edgeq.runtime.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(art.onnx_dynamic if dynamic else art.onnx, threads=1)

    def test_exact_shape_message(self, runner: Backend):
        with pytest.raises(EdgeqError) as info:
            runner.infer(np.zeros((1, 3, 64, 64), np.float32))
        assert str(info.value) == "model.onnx expects images of shape (1, 3, 96, 96), got (1, 3, 64, 64)"

    def test_uses_cpu_provider_by_default(self, runner: Backend):
        assert runner.active_providers == ["CPUExecutionProvider"]


class TestOpenVINO(BackendContract):
    backend_name = "openvino"
    rel_l2_max = 1e-4
    input_shape = (1, 3, 96, 96)

    def make(self, art: RuntimeArtifacts, *, dynamic: bool = False) -> Backend:
        from edgeq.runtime.backends.openvino import OpenVINOBackend

        return OpenVINOBackend(art.xml_dynamic if dynamic else art.xml, threads=1, precision="f32")

    def test_runs_f32(self, runner: Backend):
        assert runner.inference_precision == "f32"

    def test_reduced_precision_reports_what_runs(self, runtime_artifacts: RuntimeArtifacts):
        from edgeq.runtime.backends.openvino import OpenVINOBackend

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runner = OpenVINOBackend(runtime_artifacts.xml_dynamic, threads=1, precision="bf16").load()
        assert runner.inference_precision in ("bf16", "f32")
        if runner.inference_precision == "f32":  # CPUs without bf16 support fall back, and we say so
            assert any("runs model_dynamic.xml in f32, not the requested bf16" in str(w.message) for w in caught)
        out = runner.infer(runtime_artifacts.sample)[0]
        assert tensor_metrics(runtime_artifacts.reference, out)["rel_l2"] < 5e-2
        runner.close()


def _ir_recording(src: Path, out: Path, precision: str) -> Path:
    """A copy of the IR ``src`` whose rt_info records ``edgeq.ov_precision`` (as edgeq export writes it)."""
    import openvino as ov

    model = ov.Core().read_model(str(src))
    model.set_rt_info(precision, ["edgeq", "edgeq.ov_precision"])
    ov.save_model(model, str(out), compress_to_fp16=False)
    return out


def test_openvino_runs_at_the_recorded_precision(runtime_artifacts: RuntimeArtifacts, tmp_path):
    """precision=None takes edgeq.ov_precision from the artifact (what export chose, so what verify
    measured is what the runtime runs); an explicit precision wins; a float IR with no record runs f32."""
    from edgeq.runtime.backends.openvino import OpenVINOBackend

    with OpenVINOBackend(runtime_artifacts.xml, threads=1) as plain:
        assert plain.precision == "f32" and plain.inference_precision == "f32"
    recorded = _ir_recording(runtime_artifacts.xml, tmp_path / "default.xml", "default")
    with OpenVINOBackend(recorded, threads=1) as runner:
        assert runner.precision == "default"
        assert runner.inference_precision in ("bf16", "f16", "f32")  # the plugin's own choice for this CPU
        assert runner.meta.names == runtime_artifacts.names
    with OpenVINOBackend(recorded, threads=1, precision="f32") as runner:
        assert runner.precision == "f32" and runner.inference_precision == "f32"
    broken = _ir_recording(runtime_artifacts.xml, tmp_path / "broken.xml", "int3")
    with pytest.raises(EdgeqError, match=r"broken\.xml: metadata edgeq\.ov_precision OpenVINO precision must be one of"):
        OpenVINOBackend(broken, threads=1).load()


class TestTorch(BackendContract):
    backend_name = "torch"
    rel_l2_max = 1e-6
    static_batch = False
    input_shape = ("batch", 3, "height", "width")

    def make(self, art: RuntimeArtifacts, *, dynamic: bool = False) -> Backend:
        from edgeq.runtime.backends.torch import TorchBackend

        return TorchBackend(art.checkpoint, threads=1)

    def test_size_not_divisible_by_stride(self, runner: Backend):
        with pytest.raises(EdgeqError, match=r"divisible by its stride 32, got 80x96"):
            runner.infer(np.zeros((1, 3, 80, 96), np.float32))


def _build_engine(onnx_path: Path, engine_path: Path, max_batch: int = 4) -> None:
    """ONNX -> TensorRT engine (FP32, profile batch 1..max_batch) plus the sidecar edgeq writes."""
    import pycuda.driver as cuda
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(onnx_path.read_bytes()), [parser.get_error(i) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("images", (1, 3, 96, 96), (1, 3, 96, 96), (max_batch, 3, 96, 96))
    config.add_optimization_profile(profile)
    engine_path.write_bytes(bytes(builder.build_serialized_network(network, config)))

    import onnx

    props = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    cuda.init()
    gpu = cuda.Device(0)
    sidecar = {**props, "tensorrt_version": trt.__version__,
               "device": {"name": gpu.name(), "compute_capability": list(gpu.compute_capability())}}
    write_sidecar(engine_path, sidecar)


@pytest.mark.tensorrt
class TestTensorRT(BackendContract):
    backend_name = "tensorrt"
    rel_l2_max = 1e-3  # TF32 kernels are allowed by default on Ampere+
    static_batch = False
    input_shape = (None, 3, 96, 96)

    @pytest.fixture(scope="class", autouse=True)
    def _engine(self, runtime_artifacts: RuntimeArtifacts):
        pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install tensorrt, needs an NVIDIA GPU)")
        pytest.importorskip("pycuda.driver", reason="pycuda is not installed (pip install pycuda)")
        engine = runtime_artifacts.root / "model.engine"
        if not engine.exists():
            _build_engine(runtime_artifacts.onnx_dynamic, engine)

    def make(self, art: RuntimeArtifacts, *, dynamic: bool = False) -> Backend:
        from edgeq.runtime.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(art.root / "model.engine")

    def test_batch_above_profile_refused(self, runner: Backend):
        with pytest.raises(EdgeqError, match=r"batches of 1 to 4"):
            runner.infer(np.zeros((5, 3, 96, 96), np.float32))


# --------------------------------------------------------------------------- TensorRT without a GPU
SIDECAR = {"tensorrt_version": "10.3.0", "device": {"name": "NVIDIA T4", "compute_capability": [7, 5]}}


def test_engine_compatibility_accepts_same_version_and_device():
    check_engine_compatibility(SIDECAR, trt_version="10.3.0.26", device_name="NVIDIA T4",
                               compute_capability=(7, 5), engine="m.engine")


def test_engine_compatibility_refuses_other_tensorrt_version():
    with pytest.raises(EdgeqError) as info:
        check_engine_compatibility(SIDECAR, trt_version="10.7.0", device_name="NVIDIA T4",
                                   compute_capability=(7, 5), engine="m.engine")
    message = str(info.value)
    assert "m.engine was built for TensorRT 10.3.0 but this machine has TensorRT 10.7.0" in message
    assert "not portable across TensorRT versions" in message and "rebuild the engine on this device" in message


def test_engine_compatibility_refuses_other_gpu():
    with pytest.raises(EdgeqError, match=r"built for NVIDIA T4 \(compute capability 7\.5\) but this machine has "
                                         r"NVIDIA A100 \(compute capability 8\.0\).*rebuild the engine on this device"):
        check_engine_compatibility(SIDECAR, trt_version="10.3.0", device_name="NVIDIA A100",
                                   compute_capability=(8, 0), engine="m.engine")
    sidecar = {"tensorrt_version": "10.3.0", "device": {"name": "NVIDIA T4", "compute_capability": "7.5"}}
    with pytest.raises(EdgeqError, match=r"compute capability 7\.5"):  # same name string, other architecture
        check_engine_compatibility(sidecar, trt_version="10.3.0", device_name="NVIDIA T4",
                                   compute_capability=(8, 9), engine="m.engine")


def test_engine_compatibility_without_sidecar_checks_nothing():
    check_engine_compatibility({}, trt_version="10.3.0", device_name="any", compute_capability=(9, 0),
                               engine="m.engine")
    unknown = {"tensorrt_version": "10.3.0", "device": {"name": "unknown", "compute_capability": None}}
    check_engine_compatibility(unknown, trt_version="10.3.0", device_name="NVIDIA L4", compute_capability=(8, 9),
                               engine="m.engine")  # the exporter could not query its GPU: nothing to compare


def test_sidecar_is_read_and_converted(tmp_path: Path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"\0")
    sidecar = {"edgeq.names": '["a", "b"]', "stride": [8, 16, 32], "imgsz": [64, 96], "flavour": "int8-trt", **SIDECAR}
    (tmp_path / "model.engine.json").write_text(json.dumps(sidecar))
    data = read_sidecar(engine)
    meta = parse_meta(sidecar_props(data), str(engine))
    assert (meta.names, meta.stride, meta.imgsz, meta.flavour) == (["a", "b"], [8.0, 16.0, 32.0], (64, 96), "int8-trt")
    (tmp_path / "model.engine.json").write_text("{not json")
    with pytest.raises(EdgeqError, match="cannot read the engine sidecar"):
        read_sidecar(engine)
    (tmp_path / "model.engine.json").unlink()
    assert read_sidecar(engine) == {}  # an engine from another tool: loads unchecked
    (tmp_path / "model.json").write_text(json.dumps(SIDECAR))  # the other name a sidecar may have
    assert read_sidecar(engine) == SIDECAR


def test_tensorrt_missing_package_says_how_to_install(tmp_path: Path):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("TensorRT is installed here")
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"\0")
    expected = r"tensorrt backend needs the Python package 'tensorrt'.*install it with `pip install tensorrt"
    with pytest.raises(EdgeqError, match=expected):
        load_backend(engine)


def test_unknown_suffix_lists_supported(tmp_path: Path):
    path = tmp_path / "model.tflite"
    path.write_bytes(b"x")
    expected = r"unknown suffix \.tflite; supported: \.onnx, \.xml, \.engine, \.plan, \.pt, \.pth"
    with pytest.raises(EdgeqError, match=expected):
        load_backend(path)


def test_missing_file_is_named(tmp_path: Path):
    with pytest.raises(EdgeqError, match=r"model file .*nope\.onnx not found"):
        load_backend(tmp_path / "nope.onnx")


def test_backend_override_and_mismatch(runtime_artifacts: RuntimeArtifacts):
    with load_backend(runtime_artifacts.onnx, backend="openvino", threads=1) as runner:
        assert runner.name == "openvino"
        assert runner.meta.names == runtime_artifacts.names  # ONNX metadata via rt_info["framework"]
    with pytest.raises(EdgeqError, match=r"the tensorrt backend reads \.engine, \.plan files, not model\.onnx"):
        load_backend(runtime_artifacts.onnx, backend="tensorrt")
    with pytest.raises(EdgeqError, match=r"unknown backend 'tflite'; choose one of onnxruntime, openvino, tensorrt, "):
        load_backend(runtime_artifacts.onnx, backend="tflite")
    with pytest.raises(EdgeqError, match=r"precision= is an OpenVINO option"):
        load_backend(runtime_artifacts.onnx, precision="bf16")
    with pytest.raises(EdgeqError, match=r"precision= OpenVINO precision must be one of f32, bf16, f16, default, got 'int4'"):
        load_backend(runtime_artifacts.xml, precision="int4")


def test_default_backends_by_suffix(runtime_artifacts: RuntimeArtifacts):
    art = runtime_artifacts
    with load_backend(art.onnx, threads=1) as onnx_runner, load_backend(art.xml) as ir_runner:
        assert (onnx_runner.name, ir_runner.name) == ("onnxruntime", "openvino")


def test_ir_without_bin_and_corrupt_onnx(runtime_artifacts: RuntimeArtifacts, tmp_path: Path):
    lonely = tmp_path / "lonely.xml"
    shutil.copy(runtime_artifacts.xml, lonely)
    with pytest.raises(EdgeqError, match=r"lonely\.xml needs its weights file lonely\.bin beside it"):
        load_backend(lonely)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"definitely not protobuf")
    with pytest.raises(EdgeqError, match=r"onnxruntime cannot load .*broken\.onnx"):
        load_backend(broken)


def test_unavailable_provider_is_refused(runtime_artifacts: RuntimeArtifacts):
    with pytest.raises(EdgeqError, match=r"provider\(s\) NoSuchExecutionProvider are not available"):
        load_backend(runtime_artifacts.onnx, providers=["NoSuchExecutionProvider"])


@pytest.fixture()
def flavoured(runtime_artifacts: RuntimeArtifacts, tmp_path: Path):
    def make(flavour: str) -> Path:
        path = tmp_path / f"{flavour}.onnx"
        shutil.copy(runtime_artifacts.onnx, path)
        add_onnx_metadata(path, {"edgeq.flavour": flavour})
        return path

    return make


def test_int8_flavour_for_another_backend_warns(flavoured):
    expected = r"quantized for tensorrt \(flavour int8-trt\) but is running on onnxruntime.*re-export it for onnxrun"
    with pytest.warns(FlavourWarning, match=expected):
        runner = load_backend(flavoured("int8-trt"), threads=1)
    assert runner.meta.flavour == "int8-trt"  # warned, not refused
    runner.close()


def test_int8_flavour_for_this_backend_is_silent(flavoured):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FlavourWarning)
        load_backend(flavoured("int8-ort"), threads=1).close()


def test_bad_metadata_names_the_key():
    with pytest.raises(EdgeqError, match=r"m\.onnx: metadata edgeq\.names is not valid JSON"):
        parse_meta({"edgeq.names": "[oops"}, "m.onnx")
    meta = parse_meta({}, "plain.onnx")  # artifacts from other tools still load
    assert (meta.names, meta.imgsz, meta.flavour, meta.outputs) == ([], None, "unknown", "decoded")
