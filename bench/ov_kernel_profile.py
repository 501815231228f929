"""Where OpenVINO spends an INT8 IR's time, per kernel, beside the float IR and NNCF's INT8.

Why int8-ov can be slower than the float IR on a CPU with AMX: OpenVINO's per-node profiling
(``PERF_COUNT``) says which kernel each node ran (``brgconv_avx512_amx_1x1_I8``, ``..._bf16``)
and how long it took. This script compiles, with OpenVINO's default hint, the float IR, edgeq's
int8-ov IR, ``nncf.quantize`` defaults on the same float ONNX, and edgeq's int8-ov graph made
again from the same table with symmetric activations (``auto8``: uint8 with zero point 0 where
the tensor is non-negative, int8 elsewhere; ``int8``: int8 everywhere), each with bias
correction on 32 calibration images as export does. It times them interleaved and prints the
kernels that took the most time per model.

    edgeq export --int8 --format onnx,openvino --imgsz 320 --fallback 0 --out /tmp/fb0
    python bench/ov_kernel_profile.py /tmp/fb0 --runs 40

The variants' IRs are written into ``--work`` (default: a temporary folder); score them with
``edgeq verify <work>/*.xml``.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int8_latency import calibration_batches, nncf_quantize  # noqa: E402


def symmetric_variants(float_onnx: Path, table_path: Path, work: Path, batches) -> dict[str, Path]:
    """int8-ov's graph from the export's table with symmetric activation formats (bias correction
    on ``batches``, as export does)."""
    from edgeq import flavours
    from edgeq.export.calib_table import CalibrationTable
    from edgeq.export.int8 import quantize_file
    from edgeq.export.openvino_export import export_openvino

    table = CalibrationTable.load(table_path)
    ov = flavours.get("int8-ov")
    out = {}
    for act in ("auto8", "int8"):
        flavour = dataclasses.replace(ov, policy=dataclasses.replace(ov.policy, activations=act))
        onnx_path, _ = quantize_file(float_onnx, table, flavour, work / f"{act}.int8-ov.onnx", correction_batches=batches)
        out[f"edgeq int8-ov, {act} activations"] = export_openvino(onnx_path, onnx_path.with_suffix(".xml"))
    return out


def _float_onnx(folder: Path) -> Path:
    found = sorted(p for p in folder.glob("*.onnx") if ".int8-" not in p.name)
    if len(found) != 1:
        raise SystemExit(f"expected one float .onnx in {folder}, found {[p.name for p in found]}")
    return found[0]


def profile(models: dict[str, Path], x: np.ndarray, runs: int, threads: int, top: int) -> None:
    import openvino as ov

    core = ov.Core()
    requests = {}
    for name, path in models.items():
        compiled = core.compile_model(core.read_model(str(path)), "CPU", {
            "PERF_COUNT": True, "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})
        requests[name] = compiled.create_infer_request()
        for _ in range(10):
            requests[name].infer({0: x})
    times = collections.defaultdict(list)
    for _ in range(runs):  # interleaved: machine noise hits every model alike
        for name, request in requests.items():
            t0 = time.perf_counter()
            request.infer({0: x})
            times[name].append(time.perf_counter() - t0)
    for name, request in requests.items():
        spent, count = collections.Counter(), collections.Counter()
        for info in request.get_profiling_info():  # the last run's per-node times
            key = f"{info.node_type}: {info.exec_type}"
            spent[key] += info.real_time.total_seconds() * 1e3
            count[key] += 1
        print(f"\n{name}: median {np.median(times[name]) * 1e3:.2f} ms (profiled sum {sum(spent.values()):.2f} ms)")
        for key, ms in spent.most_common(top):
            print(f"  {key:55s} {count[key]:4d} nodes {ms:7.3f} ms")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("export_dir", type=Path, help="an `edgeq export --int8 --format onnx,openvino` folder")
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--runs", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top", type=int, default=8, help="kernels listed per model")
    p.add_argument("--work", type=Path, help="folder for the NNCF and symmetric IRs (default: temporary)")
    args = p.parse_args(argv)
    from edgeq import flavours

    float_onnx = _float_onnx(args.export_dir)
    stem = float_onnx.stem
    int8_ov = args.export_dir / flavours.get("int8-ov").artifact_names(stem)["int8-ov-ir"]
    batches = calibration_batches(args.imgsz, 64)  # NNCF's 64; bias correction the first 32; timing the first
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        models = {"float IR": float_onnx.with_suffix(".xml"), "edgeq int8-ov (export's)": int8_ov,
                  "nncf.quantize defaults": nncf_quantize(float_onnx, work / "nncf.xml", batches)}
        models.update(symmetric_variants(float_onnx, args.export_dir / f"{stem}.calib.json", work, batches[:32]))
        profile(models, batches[0], args.runs, args.threads, args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
