"""Design rule: ``edgeq.runtime`` runs exported artifacts without torch or the rest of edgeq.

The artifacts are exported by the session fixture in this (torch-enabled) process; a child
interpreter with a ``sys.meta_path`` finder that refuses every ``torch`` import then loads
them with ONNX Runtime and OpenVINO, runs the backends and the Detector, and reports what it
computed and which modules ended up imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from conftest import RuntimeArtifacts, make_images

from edgeq.runtime.detector import Detector

REPO = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import json, sys

    class NoTorch:
        \"\"\"Import hook: torch is not installed as far as this interpreter can tell.\"\"\"
        attempts = []

        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                self.attempts.append(name)
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the standalone test)")
            return None

    sys.meta_path.insert(0, NoTorch())
    work = sys.argv[1]
    paths = json.loads(open(work + "/paths.json").read())

    import numpy as np
    import edgeq.runtime
    heavy_after_import = sorted(m for m in ("torch", "onnxruntime", "openvino", "cv2") if m in sys.modules)

    from edgeq.errors import EdgeqError
    from edgeq.runtime import Detector, load_backend, tensor_metrics

    data = np.load(work + "/inputs.npz")
    sample, reference = data["sample"], data["reference"]
    images = [data[f"image{i}"] for i in range(int(data["count"]))]
    report = {"heavy_after_import": heavy_after_import, "rel_l2": {}, "detections": {}}

    for label, path in (("onnxruntime", paths["onnx_dynamic"]), ("openvino", paths["xml_dynamic"]),
                        ("openvino_onnx", paths["onnx"])):
        backend = "openvino" if label == "openvino_onnx" else None
        with load_backend(path, backend=backend, threads=1) as runner:
            x = sample if runner.max_batch is None else sample[:1]
            out = runner.infer(x)[0]
            report["rel_l2"][label] = tensor_metrics(reference[: len(x)], out)["rel_l2"]
            names = runner.meta.names
        with Detector(path, backend=backend, threads=1) as detector:
            report["detections"][label] = [d.tolist() for d in detector(images)]
    report["names"] = names
    report["torch_attempts"] = list(NoTorch.attempts)  # before the deliberate attempt below

    try:
        load_backend(paths["checkpoint"])
    except EdgeqError as exc:
        report["torch_backend_error"] = str(exc)

    report["modules"] = {m: m in sys.modules for m in ("torch", "edgeq.export", "edgeq.models", "tensorrt")}
    print("REPORT " + json.dumps(report))
    """
)


def test_runtime_runs_without_torch(runtime_artifacts: RuntimeArtifacts, tmp_path: Path):
    art = runtime_artifacts
    images = make_images(3, seed=5)
    paths = {"onnx": art.onnx, "onnx_dynamic": art.onnx_dynamic, "xml_dynamic": art.xml_dynamic,
             "checkpoint": art.checkpoint}
    (tmp_path / "paths.json").write_text(json.dumps({k: str(v) for k, v in paths.items()}))
    np.savez(tmp_path / "inputs.npz", sample=art.sample, reference=art.reference, count=len(images),
             **{f"image{i}": img for i, img in enumerate(images)})

    pythonpath = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("REPORT "))
    report = json.loads(line[len("REPORT "):])

    # importing edgeq.runtime pulls in no backend (OpenCV comes with the pre/postprocessing)
    assert report["heavy_after_import"] == ["cv2"]
    assert report["modules"] == {"torch": False, "edgeq.export": False, "edgeq.models": False, "tensorrt": False}
    assert report["torch_attempts"] == []  # not even a guarded attempt while running the artifacts
    assert "the torch backend needs the Python package 'torch'" in report["torch_backend_error"]
    assert "pip install torch" in report["torch_backend_error"]

    assert report["rel_l2"]["onnxruntime"] < 1e-5
    assert report["rel_l2"]["openvino"] < 1e-4 and report["rel_l2"]["openvino_onnx"] < 1e-4
    assert report["names"] == art.names

    # the same boxes as the PyTorch checkpoint run through the Detector in this process
    with Detector(art.checkpoint, threads=1) as torch_detector:
        expected = torch_detector(images)
    assert sum(len(d) for d in expected) > 0
    for label, per_image in report["detections"].items():
        for got, want in zip(per_image, expected):
            got = np.asarray(got, np.float32).reshape(-1, 6)
            assert got.shape == want.shape, label
            np.testing.assert_allclose(got, want, atol=2e-3, rtol=0, err_msg=label)


def test_tensorrt_backend_and_engine_sidecar_import_no_export_code():
    """The sidecar module is shared with the builder, yet the runtime side never pulls in edgeq.export."""
    code = (
        "import sys, edgeq.runtime.engine_sidecar, edgeq.runtime.backends.tensorrt\n"
        "heavy = ('edgeq.export', 'edgeq.models', 'torch', 'tensorrt', 'pycuda', 'onnx')\n"
        "print([m for m in heavy if m in sys.modules])"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, check=True)
    assert out.stdout.strip() == "[]"


DEMO_CHILD = textwrap.dedent(
    """
    import json, sys

    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)")
            return None

    sys.meta_path.insert(0, NoTorch())
    work = sys.argv[1]
    paths = json.loads(open(work + "/paths.json").read())
    import numpy as np
    from edgeq.runtime import Detector
    from edgeq.data.images import load_sample_images

    images = load_sample_images(paths["images"], 4)
    report = {}
    for label, path, opts in (("onnxruntime", paths["onnx"], {}), ("openvino", paths["xml"], {"precision": "f32"})):
        with Detector(path, **opts) as det:
            raw = det.predict_raw(det.preprocess(images)[0])
            report[label] = {"raw": raw.tolist(), "boxes": [d.tolist() for d in det(images)]}
    report["modules"] = sorted(m for m in ("torch", "edgeq.export", "edgeq.models") if m in sys.modules)
    print(json.dumps(report))
    """
)


def test_exported_demo_artifacts_run_without_torch(tmp_path):
    """The bundled demo model, exported by edgeq, runs on ORT and OpenVINO with torch unimportable."""
    from edgeq.data.demo import CALIB_DIR, demo_weights
    from edgeq.data.images import load_sample_images
    from edgeq.export.pipeline import export_model

    arts = export_model(demo_weights(), formats="onnx,openvino", out_dir=tmp_path, imgsz=320).artifacts
    (tmp_path / "paths.json").write_text(
        json.dumps({"onnx": str(arts["onnx"]), "xml": str(arts["openvino"]), "images": str(CALIB_DIR)})
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-c", DEMO_CHILD, str(tmp_path)], capture_output=True, text=True, timeout=600, env=env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["modules"] == []

    images = load_sample_images(CALIB_DIR, 4)
    with Detector(demo_weights(), imgsz=320) as ref:
        expected = ref.predict_raw(ref.preprocess(images)[0])
    for label in ("onnxruntime", "openvino"):
        got = np.asarray(report[label]["raw"], dtype=np.float32)
        assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-4, label
        assert len(report[label]["boxes"]) == 4
