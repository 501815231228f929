"""Shared fixtures: one tiny detector exported once per session to every runtime format.

``runtime_artifacts`` builds yolov5n (nc=3) at 96 px with randomized BatchNorm statistics and
a head whose scores spread over (0, 1), so outputs and detections are not trivially constant,
then writes: an edgeq checkpoint, ONNX (static batch 1 and dynamic batch) with ``edgeq.*``
metadata_props, and OpenVINO IR (static and dynamic) with the same keys in rt_info. It does
not use ``edgeq.export`` on purpose: the runtime is tested against the artifact format, not
against one exporter's implementation of it.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pytest

IMGSZ = 96
NAMES = ["person", "car", "dog"]


@dataclass
class RuntimeArtifacts:
    root: Path
    checkpoint: Path
    onnx: Path  # batch fixed at 1
    onnx_dynamic: Path
    xml: Path  # batch fixed at 1
    xml_dynamic: Path
    names: list[str]
    imgsz: int
    stride: list[float]
    sample: np.ndarray  # (3, 3, IMGSZ, IMGSZ) float32 input
    reference: np.ndarray  # the PyTorch model's output on ``sample``
    props: dict[str, str] = field(default_factory=dict)  # the edgeq.* metadata written


def make_images(count: int = 3, seed: int = 0) -> list[np.ndarray]:
    """Deterministic BGR test images of different, non-square sizes with a few solid shapes."""
    rng = np.random.default_rng(seed)
    sizes = [(120, 160), (200, 100), (96, 96), (75, 130)]
    images = []
    for i in range(count):
        h, w = sizes[i % len(sizes)]
        img = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (0, 0), 2)
        cv2.rectangle(img, (w // 8, h // 5), (w // 2, h - h // 6), (255, 40, 40), -1)
        cv2.circle(img, (3 * w // 4, h // 2), min(h, w) // 5, (30, 220, 250), -1)
        images.append(img)
    return images


def add_onnx_metadata(path: Path, props: dict[str, str]) -> None:
    import onnx

    model = onnx.load(str(path))
    existing = {p.key: p for p in model.metadata_props}
    for key, value in props.items():
        entry = existing.get(key) or model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))


def _build_model():
    import torch

    from edgeq.models.yolo import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel("yolov5n", nc=len(NAMES))
    model.names = list(NAMES)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2, generator=g)
                m.running_var.uniform_(0.08, 0.25, generator=g)  # keeps features image-dependent
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.2, 0.2, generator=g)
    model.eval()
    _calibrate_head(model)
    return model


def _calibrate_head(model) -> None:
    """Rescale the head so objectness/class logits over the test images have a chosen spread.

    Random backbone features barely vary, so an untouched head scores every anchor about the
    same (near-ties everywhere make NMS results fragile). After this, objectness logits have
    mean -4 and std 2.5 and class logits mean 0 and std 2.5: a few dozen well-separated
    candidates per image above conf 0.25.
    """
    import torch

    from edgeq.runtime.preprocess import preprocess_batch

    head = model.detect
    captured = []
    hook = head.register_forward_hook(lambda mod, args, out: captured.append([t.detach() for t in args[0]]))
    batch, _ = preprocess_batch(make_images(4) + make_images(4, seed=3), IMGSZ)
    with torch.no_grad():
        model(torch.from_numpy(batch))
    hook.remove()
    with torch.no_grad():
        for conv, feats in zip(head.m, captured[0]):
            w = conv.weight.view(head.na, head.no, -1)
            b = conv.bias.view(head.na, head.no)
            x = feats.permute(1, 0, 2, 3).reshape(feats.shape[1], -1)  # (C, images * positions)
            for a in range(head.na):
                for k in range(4, head.no):
                    z = w[a, k] @ x
                    target_mean = -4.0 if k == 4 else 0.0
                    scale = 2.5 / float(z.std().clamp_min(1e-12))
                    w[a, k] *= scale
                    b[a, k] = target_mean - scale * float(z.mean())


def _export_onnx(model, path: Path, dynamic: bool) -> None:
    import torch

    kwargs = {}
    if dynamic:
        kwargs["dynamic_axes"] = {"images": {0: "batch"}, "output0": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model, torch.zeros(1, 3, IMGSZ, IMGSZ), str(path), dynamo=False, opset_version=17,
            input_names=["images"], output_names=["output0"], **kwargs,
        )


def _to_ir(onnx_path: Path, xml_path: Path, props: dict[str, str]) -> None:
    import openvino as ov

    model = ov.convert_model(str(onnx_path))
    for key, value in props.items():
        model.set_rt_info(value, ["edgeq", key])
    ov.save_model(model, str(xml_path), compress_to_fp16=False)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny shapes: one intra-op thread is several times faster than two fighting a busy CPU."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def runtime_artifacts(tmp_path_factory: pytest.TempPathFactory) -> RuntimeArtifacts:
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    pytest.importorskip("openvino")
    from edgeq import __version__
    from edgeq.models.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("runtime_artifacts")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a training job shares this machine
    try:
        model = _build_model()
        checkpoint = save_checkpoint(model, root / "model.pt", names=NAMES, imgsz=IMGSZ)
        stride = [float(s) for s in model.stride.tolist()]
        props = {
            "edgeq.names": json.dumps(NAMES),
            "edgeq.stride": json.dumps(stride),
            "edgeq.imgsz": json.dumps([IMGSZ, IMGSZ]),
            "edgeq.version": __version__,
            "edgeq.source_sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest(),
            "edgeq.flavour": "float",
            "edgeq.outputs": "decoded",
        }
        paths = {}
        for name, dynamic in (("model", False), ("model_dynamic", True)):
            onnx_path = root / f"{name}.onnx"
            _export_onnx(model, onnx_path, dynamic)
            add_onnx_metadata(onnx_path, props)
            _to_ir(onnx_path, root / f"{name}.xml", props)
            paths[name] = onnx_path
        sample = torch.rand(3, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            reference = model(sample).numpy()
    finally:
        torch.set_num_threads(threads)
    return RuntimeArtifacts(
        root=root,
        checkpoint=checkpoint,
        onnx=paths["model"],
        onnx_dynamic=paths["model_dynamic"],
        xml=root / "model.xml",
        xml_dynamic=root / "model_dynamic.xml",
        names=list(NAMES),
        imgsz=IMGSZ,
        stride=stride,
        sample=sample.numpy(),
        reference=reference,
        props=props,
    )


@dataclass
class Int8Export:
    checkpoint: Path
    result: object  # edgeq.export.pipeline.ExportResult
    images: Path  # the 8 calibration images it was calibrated on


@pytest.fixture(scope="session")
def calib_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 8 bundled calibration images, in a folder of their own."""
    import shutil

    folder = tmp_path_factory.mktemp("calib8")
    for p in sorted((Path(__file__).resolve().parents[1] / "calib_data").glob("*.jpg"))[:8]:
        shutil.copy(p, folder / p.name)
    return folder


@pytest.fixture(scope="session")
def int8_export(tmp_path_factory: pytest.TempPathFactory, calib_images: Path) -> Int8Export:
    """One INT8 export shared by every test that needs one: a random-weight MobileNetV3-YOLO
    (non-trivial BN statistics, so every layer has a real range) at 64 px, float + int8-ort +
    int8-ov (IR) with the default settings (fallback, bias correction), calibrated on 8 images."""
    import torch

    from edgeq.export.pipeline import Int8Request, export_model
    from edgeq.models.checkpoint import save_checkpoint
    from edgeq.models.yolo import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel("yolov5s-mobilenetv3-small", nc=3).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
    root = tmp_path_factory.mktemp("int8")
    ckpt = save_checkpoint(model, root / "m.pt", names=["a", "b", "c"], imgsz=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = export_model(ckpt, formats="onnx,openvino", out_dir=root / "out",
                              int8=Int8Request(data=calib_images, num_images=8, progress=False))
    return Int8Export(ckpt, result, calib_images)
