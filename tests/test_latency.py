"""edgeq verify's latency verdict: INT8 against the float model at the backend's default precision.

The real demo model, exported twice: the default INT8 export, and one whose convolutions all stay
float (``--float-nodes``) while its other Q/DQ units remain, which is no faster than float. On
ONNX Runtime the speed-up budget (1.2x) passes the first and fails the second; the ratio margins
are wide (about 2x and under 1x on these CPUs), so machine noise does not decide the outcome.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import onnx
import pytest

from edgeq.cli import main
from edgeq.data.demo import DEMO_WEIGHTS
from edgeq.data.synthetic import generate_dataset
from edgeq.errors import EdgeqError
from edgeq.runtime.latency import latency_entry, latency_rows, plan_for

STEM = DEMO_WEIGHTS.stem


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("latency")
    data = generate_dataset(root / "val", 0, 24, imgsz=320, seed=0)
    # the default export (its budget search runs OpenVINO) in a child interpreter: OpenVINO run in
    # the pytest process after tests/test_augment.py was followed by segfaults in later tests
    run = subprocess.run([sys.executable, "-m", "edgeq.cli", "export", "--int8", "--format", "onnx,openvino", "--imgsz",
                          "320", "--out", str(root / "good"), "--num-images", "0", "--calib-images", "32"],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        float_onnx = onnx.load(str(root / "good" / f"{STEM}.onnx"))
        convs = ",".join(n.name for n in float_onnx.graph.node if n.op_type == "Conv")
        assert main(["export", "--int8", "--format", "onnx", "--imgsz", "320", "--out", str(root / "slow"),
                     "--num-images", "0", "--calib-images", "32", "--fallback", "0", "--float-nodes", convs]) == 0
    return root, data


def _verify(root, data, name, *artifacts, extra=(), child=False):
    """``edgeq verify`` with the speed-up budget; ``child``: in a fresh interpreter (see below)."""
    out = root / f"{name}.json"
    argv = ["verify", str(DEMO_WEIGHTS), *map(str, artifacts), "--data", str(data), "--num-images", "0",
            "--min-speedup", "1.2", "--latency-runs", "30", "--json", str(out), *extra]
    if child:
        rc = subprocess.run([sys.executable, "-m", "edgeq.cli", *argv], capture_output=True, text=True,
                            timeout=900).returncode
    else:
        rc = main(argv)
    return rc, json.loads(out.read_text())


def test_min_speedup_fails_an_int8_graph_no_faster_than_float(exports, capsys):
    root, data = exports
    slow = root / "slow" / f"{STEM}.int8-ort.onnx"
    assert len(json.loads(dict((p.key, p.value) for p in onnx.load(str(slow)).metadata_props)["edgeq.int8"])
               ["float_nodes"]) > 50
    rc, report = _verify(root, data, "slow", slow)
    entry = report["artifacts"][0]["latency"]
    assert rc == 1 and not report["passed"] and not entry["passed"] and report["min_speedup"] == 1.2
    assert entry["speedup"] < 1.2 and entry["baselines"][0]["label"] == "float ONNX, fp32"
    out = capsys.readouterr().out
    assert f"FAILED: {slow.name} not at least 1.2x faster than the float model" in out and "lost more" not in out


def test_min_speedup_passes_the_default_export_and_reports_every_baseline(exports, tmp_path):
    root, data = exports
    good = root / "good"
    # In a child interpreter: run in the pytest process, this verify (OpenVINO models compiled and
    # timed next to ONNX Runtime and PyTorch) was followed by a segfault in a later test
    # (tests/test_runtime_standalone.py, in plain Python code: memory corrupted earlier) when
    # tests/test_augment.py had run before it; not explained yet (session 10 note on issue 17)
    rc, report = _verify(root, data, "good", good / f"{STEM}.int8-ort.onnx", good / f"{STEM}.int8-ov.xml",
                         extra=["--report", str(tmp_path / "page.md")], child=True)
    ort, ov = (a["latency"] for a in report["artifacts"])
    # int8-ort: about 2x the float ONNX on these CPUs. int8-ov can be no faster than the float IR in
    # OpenVINO's default bf16 on a CPU with AVX-512 BF16 or AMX (issue 17):
    # the verdict says so, and the exit code follows every artifact's verdict
    assert ort["passed"] and ort["speedup"] >= 1.2 and ort["runs"] == 30, ort
    assert ov["passed"] == (ov["speedup"] >= 1.2)
    assert rc == (0 if ort["passed"] and ov["passed"] else 1) and report["passed"] == (rc == 0)
    # OpenVINO: the float IR at OpenVINO's default precision (what the user gets) and at f32
    labels = [(b["label"], b["default"]) for b in ov["baselines"]]
    assert labels == [("float IR, OpenVINO default", True), ("float IR, f32", False)]
    assert ov["baselines"][0]["precision"].startswith("default (") and ov["baselines"][1]["precision"] == "f32"
    # what the export recorded (the default budget search chose it), read back by the runtime
    recorded = json.loads(dict((p.key, p.value) for p in onnx.load(str(good / f"{STEM}.int8-ov.onnx")).metadata_props)
                          ["edgeq.int8"])["ov_precision"]
    assert ov["precision"] == "f32" if recorded == "f32" else ov["precision"].startswith(f"{recorded} (")
    page = (tmp_path / "page.md").read_text()
    assert "## Latency against float" in page and "float IR, OpenVINO default" in page and "1.2x faster" in page


def test_latency_plan_without_a_float_model_says_why(tmp_path):
    plan = plan_for(str(tmp_path / "m.int8-trt.engine"), "tensorrt", tmp_path / "m.onnx", True)
    assert plan.baselines == [] and "no float engine m.engine beside it" in plan.note
    entry = latency_entry(plan, {plan.artifact.key: {"ms": 3.0, "runs": 5, "precision": "as built"}}, 1.2)
    assert entry["passed"] and entry["speedup"] is None  # nothing to compare with is not a failure
    rows = latency_rows({"artifacts": [{"artifact": "m.int8-trt.engine", "latency": entry}]})
    assert rows[1][3].startswith("no float engine")
    assert plan_for("m.onnx", "onnxruntime", Path("m.onnx"), False).baselines == []  # a float artifact: no baseline


def test_min_speedup_needs_the_latency_runs(exports):
    from edgeq.verify import verify

    root, data = exports
    with pytest.raises(EdgeqError, match="--min-speedup needs the latency measurement"):
        verify(DEMO_WEIGHTS, [root / "good" / f"{STEM}.int8-ort.onnx"], data, latency_runs=0, min_speedup=1.2)
