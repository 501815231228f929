"""INT8 accuracy of the demo model per calibrator and backend, with the layer fallback on and off.

One calibration (the bundled 256 calib_data/ images), every calibrator derived from the same
table, each flavour evaluated on its own backend on the demo validation split.

    python bench/int8_accuracy.py --out runs/bench-int8 --fallback 16 --json int8_accuracy.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from edgeq.data.demo import DEMO_WEIGHTS, calib_dir, demo_data_yaml
from edgeq.data.images import load_sample_images
from edgeq.data.yolo import YoloDataset
from edgeq.export.calib_table import CalibrationTable, calibrate
from edgeq.export.int8 import Int8Options, quantize_file
from edgeq.export.sensitivity import rank_tensors
from edgeq.runtime.preprocess import preprocess_batch
from edgeq.export.openvino_export import export_openvino
from edgeq.export.pipeline import export_model
from edgeq.verify import evaluate_artifact


def float_onnx_and_table(weights: str, imgsz: int, out: Path) -> tuple[Path, CalibrationTable]:
    """The float ONNX in ``out`` and its calibration table on the 256 calib_data/ images, reused
    from ``out/table.json`` when a previous run left one."""
    float_onnx = export_model(weights, formats="onnx", out_dir=out, imgsz=imgsz, force=True).artifacts["onnx"]
    table_path = out / "table.json"
    if table_path.exists():
        return float_onnx, CalibrationTable.load(table_path)
    table, _ = calibrate(float_onnx, calib_dir(), num_images=256, progress=False)
    table.save(table_path)
    return float_onnx, table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=str(DEMO_WEIGHTS))
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--out", default="runs/bench-int8")
    ap.add_argument("--methods", default="minmax,percentile,entropy,mse")
    ap.add_argument("--flavours", default="ort,ov")
    ap.add_argument("--fallback", type=int, default=16, help="tensors left float in the 'fallback on' rows")
    ap.add_argument("--val-images", type=int, default=0, help="first N validation images (0: all)")
    ap.add_argument("--json")
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    float_onnx, table = float_onnx_and_table(args.weights, args.imgsz, out)
    calib_s = time.perf_counter() - t0
    dataset = YoloDataset(demo_data_yaml(), split="val")
    if args.val_images:
        dataset.image_paths, dataset._labels = dataset.image_paths[: args.val_images], dataset._labels[: args.val_images]
    images = [preprocess_batch([im], args.imgsz)[0] for im in load_sample_images(calib_dir(), 4)]

    rows = []
    ref = evaluate_artifact(str(float_onnx), dataset, progress=False)
    rows.append({"backend": "onnxruntime", "flavour": "float", "method": "-", "fallback": 0,
                 "map50": ref["map50"], "map50_95": ref["map50_95"]})
    print(f"float: mAP50 {ref['map50']:.4f} mAP50-95 {ref['map50_95']:.4f} ({len(dataset)} images)", flush=True)
    for flavour in args.flavours.split(","):
        for method in args.methods.split(","):
            for fallback in (0, args.fallback) if args.fallback else (0,):
                opts = Int8Options(method=method)
                if fallback:
                    ranked = rank_tensors(float_onnx, table, flavour, images, opts, keep=max(16, fallback), progress=False)
                    opts.float_tensors = tuple(r["tensor"] for r in ranked[:fallback])
                path, _ = quantize_file(float_onnx, table, flavour, out / f"m.{method}.fb{fallback}.int8-{flavour}.onnx", opts)
                artifact = str(path) if flavour != "ov" else str(export_openvino(path, path.with_suffix(".xml")))
                res = evaluate_artifact(artifact, dataset, progress=False)
                row = {"backend": res["backend"], "flavour": f"int8-{flavour}", "method": method, "fallback": fallback,
                       "map50": res["map50"], "map50_95": res["map50_95"],
                       "drop50_95": 100 * (ref["map50_95"] - res["map50_95"]), "float_tensors": list(opts.float_tensors)}
                rows.append(row)
                print(f"{row['flavour']:9s} {method:10s} fallback {fallback}: mAP50 {row['map50']:.4f} "
                      f"mAP50-95 {row['map50_95']:.4f} drop {row['drop50_95']:+.2f} points", flush=True)
    print("\n| backend | flavour | calibrator | fallback | mAP50 | mAP50-95 | drop (points) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        drop = f"{r['drop50_95']:+.2f}" if "drop50_95" in r else "-"
        print(f"| {r['backend']} | {r['flavour']} | {r['method']} | {r['fallback']} | {r['map50']:.4f} | "
              f"{r['map50_95']:.4f} | {drop} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"calibration_s": calib_s, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
