"""Fine-tune recipes on the demo model: which steps, learning rate and loss make the all-integer
graph nearly lossless (docs/BENCHMARKS.md, "Fine-tuning the all-integer graph").

Starts from one post-training export at fallback 0 (its float ONNX, table and bias-corrected
Q/DQ graphs), fine-tunes one flavour's graph per recipe on the 256 calib_data images, quantizes
the trained float weights again for every flavour (the trained flavour with its learned scales,
if any) and scores them with ``edgeq verify`` on the 500-image validation split. int8-ov runs on
OpenVINO (IR); int8-trt's Q/DQ ONNX runs on ONNX Runtime as a proxy for TensorRT.

    python bench/finetune_recipes.py --base /tmp/fb0 --recipe "lr=3e-5" --recipe "lr=3e-5,learn_scales=1"
    python bench/finetune_recipes.py --base /tmp/fb0 --flavour int8-trt --recipe "steps=300,lr=3e-5"

``--base DIR`` is made with ``edgeq export --int8 --format onnx,openvino,engine --imgsz 320
--fallback 0 --out DIR`` when it does not exist yet.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STEM = "demo-yolov5s-mnv3s-shapes"


def parse_recipe(text: str):
    from edgeq.export.finetune import FinetuneOptions

    kinds = {f.name: f.type for f in fields(FinetuneOptions)}
    values = {}
    for item in filter(None, text.split(",")):
        key, _, raw = item.partition("=")
        if key not in kinds:
            raise SystemExit(f"unknown recipe field {key!r}; fields: {', '.join(kinds)}")
        kind = kinds[key]
        values[key] = (raw not in ("0", "false", "False")) if "bool" in str(kind) else \
            int(raw) if "int" in str(kind) and "." not in raw and "e" not in raw else float(raw)
    return FinetuneOptions(**values)


def base_export(base: Path, imgsz: int) -> None:
    if (base / f"{STEM}.calib.json").exists():
        return
    subprocess.run([sys.executable, "-m", "edgeq.cli", "export", "--int8", "--format", "onnx,openvino,engine",
                    "--imgsz", str(imgsz), "--fallback", "0", "--out", str(base), "--force"], check=True)


def run_recipe(base: Path, out: Path, flavour_name: str, opts, images: np.ndarray) -> dict:
    import onnx

    from edgeq import flavours
    from edgeq.export.calib_table import CalibrationTable
    from edgeq.export.finetune import finetune
    from edgeq.export.int8 import Int8Options, quantize_model, write_int8
    from edgeq.export.openvino_export import export_openvino

    float_model = onnx.load(str(base / f"{STEM}.onnx"))
    table = CalibrationTable.load(base / f"{STEM}.calib.json")
    q_model = onnx.load(str(base / f"{STEM}.{flavour_name}.onnx"))
    start = time.perf_counter()
    result = finetune(float_model, q_model, images, opts, progress=True, desc=f"fine-tune {flavour_name}")
    seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    artifacts = []
    for f in flavours.FLAVOURS.values():
        scales = result.scales if f.name == flavour_name else None
        q, _ = quantize_model(result.model, table, f, Int8Options(scales=scales))
        path = write_int8(q, f, {"finetune": result.record}, out / f"{STEM}.{f.name}.onnx")
        if flavours.OPENVINO_IR in f.steps:
            path = export_openvino(path, out / f"{STEM}.{f.name}.xml")
        artifacts.append(path)
    report = out / "verify.json"
    subprocess.run([sys.executable, "-m", "edgeq.cli", "verify", *map(str, artifacts), "--num-images", "0",
                    "--json", str(report)], check=True, stdout=subprocess.DEVNULL)
    scores = json.loads(report.read_text())
    return {"record": result.record, "seconds": round(seconds, 1), "verify": scores}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True, help="post-training fallback-0 export (made if missing)")
    ap.add_argument("--flavour", default="int8-ov", help="the flavour whose graph is trained")
    ap.add_argument("--recipe", action="append", required=True, help="FinetuneOptions fields, e.g. steps=200,lr=3e-5")
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--out", type=Path, default=Path("runs/finetune-recipes"))
    ap.add_argument("--json", type=Path, help="write every result here")
    args = ap.parse_args()

    from edgeq.data.images import load_sample_images
    from edgeq.runtime.preprocess import preprocess_batch

    base_export(args.base, args.imgsz)
    images = np.concatenate([preprocess_batch([im], args.imgsz)[0]
                             for im in load_sample_images(ROOT / "calib_data", 256)])
    results = []
    for i, text in enumerate(args.recipe):
        outcome = run_recipe(args.base, args.out / f"r{i}", args.flavour, parse_recipe(text), images)
        outcome["recipe"] = text
        results.append(outcome)
        drops = "  ".join(f"{a['flavour']} {a['drop50_95']:+.2f}" for a in outcome["verify"]["artifacts"])
        print(f"{text}: {outcome['seconds']:.0f} s, loss {outcome['record']['loss_first']:.4f} -> "
              f"{outcome['record']['loss_last']:.4f}; mAP50-95 drop (points): {drops}", flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
