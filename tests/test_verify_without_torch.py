"""``edgeq verify ARTIFACT --reference float.onnx`` on a device without PyTorch.

A Jetson or an Intel box has the artifacts and the float ONNX, not torch. A child interpreter
that cannot import torch runs the CLI on the session's shared INT8 export (tests/conftest.py)
with the float ONNX and the IR as references, and reports which modules it imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import json, sys

    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
            return None

    sys.meta_path.insert(0, NoTorch())
    from edgeq.cli import main

    rc = main(sys.argv[1:])
    print("MODULES " + json.dumps(sorted(m for m in ("torch", "edgeq.models", "edgeq.export") if m in sys.modules)))
    sys.exit(rc)
    """
)


def _labelled(folder: Path, images: Path) -> Path:
    """A 4-image YOLO data set with the model's 3 classes (labels: one box per image)."""
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    for i, src in enumerate(sorted(images.glob("*.jpg"))[:4]):
        (folder / "images" / src.name).write_bytes(src.read_bytes())
        (folder / "labels" / f"{src.stem}.txt").write_text(f"{i % 3} 0.5 0.5 0.4 0.3\n")
    data = folder / "data.yaml"
    data.write_text(yaml.safe_dump({"path": str(folder), "val": "images", "names": ["a", "b", "c"]}))
    return data


def _child(*argv: str, cwd: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("MODULES ")), "MODULES null")
    return proc, json.loads(line[len("MODULES "):])


def test_verify_runs_with_torch_unimportable(int8_export, tmp_path):
    arts = int8_export.result.artifacts
    data = _labelled(tmp_path / "data", int8_export.images)
    report = tmp_path / "verify.json"
    proc, modules = _child("verify", str(arts["int8-ort"]), str(arts["int8-ov-ir"]), "--reference", str(arts["onnx"]),
                           "--data", str(data), "--images", str(int8_export.images), "--num-images", "2",
                           "--layers", "--max-map-drop", "100", "--json", str(report), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert modules == []  # neither torch nor the model or export code was needed
    result = json.loads(report.read_text())
    assert result["images"] == 4 and result["passed"]
    assert [a["flavour"] for a in result["artifacts"]] == ["int8-ort", "int8-ov"]
    # --layers found the float ONNX (the reference) and the IR's own Q/DQ ONNX next to it
    assert all(len(a["worst_layers"]) == 5 for a in result["artifacts"])
    assert all(a["parity"]["outputs"] for a in result["artifacts"])

    # the float IR as the reference works the same way; --layers then finds the float ONNX
    # the INT8 record names, next to the artifact
    proc, modules = _child("verify", str(arts["int8-ort"]), "--reference", str(arts["openvino"]), "--data", str(data),
                           "--images", str(int8_export.images), "--num-images", "2", "--layers",
                           "--json", str(report), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert modules == [] and len(json.loads(report.read_text())["artifacts"][0]["worst_layers"]) == 5
