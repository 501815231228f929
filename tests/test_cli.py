"""The CLI: fast help without heavy imports, every subcommand's help, clean user errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgeq.cli_args import build_parser

HEAVY = ("torch", "openvino", "tensorrt", "pycuda", "onnxruntime", "onnx", "cv2")


def _run(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgeq.cli", *args], capture_output=True, text=True, timeout=300, check=check
    )


def _subcommands(parser=None, prefix=()):
    parser = parser or build_parser()
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield prefix + (name,)
                yield from _subcommands(sub, prefix + (name,))


def _help_argvs():
    return [["--help"]] + [[*cmd, "--help"] for cmd in _subcommands()]


@pytest.mark.parametrize("argv", _help_argvs(), ids=lambda a: " ".join(a[:-1]) or "edgeq")
def test_help_is_fast_and_imports_no_backend(argv):
    """Each --help answers in under 2 s (interpreter start included) with none of torch, onnx,
    ONNX Runtime, OpenVINO, TensorRT, pycuda or OpenCV imported."""
    import time

    code = (
        "import sys\n"
        "from edgeq.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    elapsed = time.perf_counter() - start
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert "usage: edgeq" in out.stdout and elapsed < 2.0, elapsed


def test_every_subcommand_has_help_with_usage():
    commands = list(_subcommands())
    assert ("info",) in commands and ("train",) in commands and ("data", "synth") in commands
    for cmd in commands:
        out = _run(*cmd, "--help")
        assert out.returncode == 0, (cmd, out.stderr)
        assert "usage: edgeq" in out.stdout


def test_info_on_config_prints_figures_and_json(tmp_path):
    out = _run("info", "yolov5s-mobilenetv3-small", "--imgsz", "320", "--nc", "8", "--json", str(tmp_path / "i.json"))
    assert out.returncode == 0, out.stderr
    assert "MobileNetV3" in out.stdout and "GFLOPs at 320x320" in out.stdout
    data = json.loads((tmp_path / "i.json").read_text())
    assert data["nc"] == 8 and data["imgsz"] == 320 and len(data["layers"]) == 27
    assert 5.0e6 < data["parameters"] < 5.3e6


@pytest.mark.parametrize(
    "make,expect",
    [
        (lambda p: str(p / "missing.pt"), "missing.pt"),
        (lambda p: (p / "junk.pt").write_bytes(b"not a checkpoint at all") and str(p / "junk.pt"), "junk.pt"),
        (lambda p: (p / "bad.yaml").write_text("nc: 2\nbackbone: []\n") and str(p / "bad.yaml"), "bad.yaml"),
    ],
)
def test_bad_input_is_one_line_exit_1(tmp_path, make, expect):
    out = _run("info", make(tmp_path))
    assert out.returncode == 1
    assert expect in out.stderr
    assert "Traceback" not in out.stderr


def test_verbose_shows_traceback(tmp_path):
    out = _run("info", str(tmp_path / "missing.pt"), "--verbose")
    assert out.returncode != 0 and "Traceback" in out.stderr
