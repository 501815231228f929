"""How long an INT8 build takes: ``edgeq export --int8`` against the peers, one run, same images.

Each tool runs in a fresh interpreter, one after the other, on the same float ONNX and the same
256 calib_data/ images (preprocessed by edgeq's one preprocessing function):

* ``edgeq export --int8 --format onnx,openvino`` as a user types it (deploy graph, float ONNX
  and IR, calibration, sensitivity, bias correction, both INT8 flavours, IR, parity): the wall
  time of the whole command, and its own per-stage times (``--json``);
* ``nncf.quantize`` with its defaults (``subset_size=256``) on the float ONNX read by OpenVINO,
  then saved as IR: the time of the call (read + quantize + save), and of the whole process;
* ONNX Runtime's ``quantize_static`` (QDQ, uint8 activations, int8 per-channel weights).

    python bench/build_time.py                         # demo at 320 and the seed small model at 640
    python bench/build_time.py --only demo --json build_time.json

NNCF is a benchmark-only dependency: ``pip install -r bench/requirements-peers.txt``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

PEER = r"""
import json, sys, time
t_start = time.perf_counter()
tool, float_onnx, out, imgsz, count, bench = sys.argv[1:7]
sys.path.insert(0, bench)
from int8_latency import calibration_batches, nncf_quantize, ort_quantize_static
batches = calibration_batches(int(imgsz), int(count))
quantize = nncf_quantize if tool == "nncf" else ort_quantize_static
# the peer's package is imported before the clock starts, as its users have it loaded
if tool == "nncf":
    import nncf, openvino
else:
    import onnxruntime.quantization
t0 = time.perf_counter()
quantize(float_onnx, out, batches)
print("RESULT " + json.dumps({"call_s": time.perf_counter() - t0, "in_process_s": time.perf_counter() - t_start}))
"""


def _cpu_flags() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    keep = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return " ".join(f for f in keep if f in flags)


def _run(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


def measure(weights: Path, imgsz: int, folder: Path, images: int) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    edgeq_json = folder / "export.json"
    wall, _ = _run([sys.executable, "-m", "edgeq.cli", "export", str(weights), "--int8", "--format", "onnx,openvino",
                    "--imgsz", str(imgsz), "--calib-images", str(images), "--out", str(folder / "edgeq"), "--force",
                    "--json", str(edgeq_json)])
    stages = json.loads(edgeq_json.read_text())["stages_s"]
    float_onnx = folder / "edgeq" / f"{weights.stem}.onnx"
    row = {"edgeq export --int8 (command wall)": wall, "edgeq stages": stages}
    for tool, out in (("nncf", folder / "nncf.xml"), ("quantize_static", folder / "qs.onnx")):
        proc_wall, stdout = _run([sys.executable, "-c", PEER, tool, str(float_onnx), str(out), str(imgsz), str(images),
                                  str(HERE)])
        result = json.loads(next(ln for ln in stdout.splitlines() if ln.startswith("RESULT "))[7:])
        row[f"{tool} (call)"] = result["call_s"]
        row[f"{tool} (process wall)"] = proc_wall
    row["edgeq / nncf call"] = wall / row["nncf (call)"]
    row["edgeq / nncf process"] = wall / row["nncf (process wall)"]
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("demo", "small640"))
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--json")
    args = p.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from latency import random_checkpoint

    from edgeq.data.demo import demo_weights

    print(f"machine: {platform.processor() or platform.machine()}, CPU flags: {_cpu_flags()}; {args.images} images\n")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cases = [("demo at 320", lambda: demo_weights(), 320),
                 ("seed small (random weights) at 640",
                  lambda: random_checkpoint("yolov5s-mobilenetv3-small", 640, folder), 640)]
        for title, make, imgsz in cases:
            if args.only and (args.only == "demo") != title.startswith("demo"):
                continue
            row = measure(Path(make()), imgsz, folder / title.split()[0], args.images)
            results[title] = row
            print(f"**{title}**")
            for key, value in row.items():
                if key == "edgeq stages":
                    print("  edgeq stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in value.items()))
                elif "/" in key:
                    print(f"  {key}: {value:.2f}x")
                else:
                    print(f"  {key}: {value:.1f} s")
            print(flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
