"""The README's main job (scripts/quickstart.sh) runs from a clean output folder and cache.

Marked slow: ``.ci/run`` runs it once after the test command (``pytest -m slow tests/test_guides.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # .ci/run runs it once, after the test command: the README's main job
def test_quickstart_script(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), EDGEQ_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(
        ["bash", "scripts/quickstart.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    val = json.loads((out / "val.json").read_text())
    assert val["images"] == 500 and 0.0 <= val["map50_95"] <= val["map50"] <= 1.0
    # the bundled demo model is the finished training run (docs/DEMO_MODEL.md): its accuracy target
    assert val["map50"] >= 0.85 and val["map50_95"] >= 0.60, val
    parity = json.loads((out / "parity.json").read_text())
    assert len(parity["artifacts"]) == 2
    for entry in parity["artifacts"].values():
        assert entry["outputs"][0]["rel_l2"] < 1e-4
        assert entry["agreement"]["map50_95"] >= 0.99
    assert (out / "export" / "demo-yolov5s-mnv3s-shapes.onnx").is_file()
    verify = json.loads((out / "verify.json").read_text())
    assert verify["passed"] and [a["flavour"] for a in verify["artifacts"]] == ["int8-ort", "int8-ov"]
    assert all(a["drop50_95"] <= 1.0 and len(a["worst_layers"]) == 5 for a in verify["artifacts"])
    detections = json.loads((out / "detections" / "detections.json").read_text())
    assert isinstance(detections, list)
    assert (out / "detections" / "000000.jpg").is_file()
