"""mAP50-95 drop of INT8 variants of one flavour, all from one calibration table.

Why: the defaults of ``edgeq export --int8`` (fallback count, bias correction, head outputs,
percentile, uint8 weights) were chosen by measuring combinations of them on the demo model;
this reruns such a sweep on any checkpoint. A variant is a comma list of settings:

* ``fb=N``: leave float the N most sensitive tensors (ranked once on 4 calibration images);
* ``bc=N``: bias correction measured on N calibration images (0: off);
* ``head=float|per-channel|per-tensor``: the head convolutions' outputs;
* ``pct=P`` / ``m=METHOD``: the calibrator; ``u8``: int8-ort weights stored as uint8.

    python bench/int8_variants.py --flavour ort fb=8 fb=8,bc=32 fb=8,bc=32,head=per-channel fb=16
    python bench/int8_variants.py --flavour ov fb=8 fb=8,bc=32 --json ov_variants.json

Each variant is evaluated on its own backend (OpenVINO with an f32 hint) on the demo validation
split; the reference is the float ONNX on ONNX Runtime.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgeq.data.demo import DEMO_WEIGHTS, calib_dir, demo_data_yaml
from edgeq.data.images import load_sample_images
from edgeq.data.yolo import YoloDataset
from edgeq.export.int8 import Int8Options, quantize_file
from edgeq.export.sensitivity import fallback_tensors, rank_tensors
from edgeq.runtime.preprocess import preprocess_batch
from edgeq.export.openvino_export import export_openvino
from edgeq.verify import evaluate_artifact

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int8_accuracy import float_onnx_and_table  # noqa: E402


def parse_variant(spec: str) -> dict:
    settings = {"fb": 8, "bc": 0, "head": None, "pct": None, "m": None, "u8": False}
    for part in spec.split(","):
        key, _, value = part.partition("=")
        if key not in settings:
            raise SystemExit(f"unknown setting {key!r} in variant {spec!r}; known: {', '.join(settings)}")
        settings[key] = True if key == "u8" else int(value) if key in ("fb", "bc") else \
            float(value) if key == "pct" else value
    return settings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+", help="e.g. fb=8,bc=32")
    ap.add_argument("--weights", default=str(DEMO_WEIGHTS))
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--flavour", default="ort", choices=("ort", "ov"))
    ap.add_argument("--out", default="runs/bench-int8-variants")
    ap.add_argument("--json")
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    float_onnx, table = float_onnx_and_table(args.weights, args.imgsz, out)
    dataset = YoloDataset(demo_data_yaml(), split="val")
    ref = evaluate_artifact(str(float_onnx), dataset, progress=False)["map50_95"]
    print(f"float (ONNX Runtime): mAP50-95 {ref:.4f} ({len(dataset)} images)", flush=True)

    ranked: dict[tuple, list[dict]] = {}
    rows = []
    for i, spec in enumerate(args.variants):
        v = parse_variant(spec)
        opts = Int8Options(method=v["m"], percentile=v["pct"], uint8_weights=v["u8"], head_outputs=v["head"])
        key = (v["m"], v["pct"], v["head"])
        if v["fb"] and key not in ranked:
            batches = [preprocess_batch([im], args.imgsz)[0] for im in load_sample_images(calib_dir(), 4)]
            ranked[key] = rank_tensors(float_onnx, table, args.flavour, batches, opts, progress=False)
        opts.float_tensors = fallback_tensors(ranked[key], v["fb"]) if v["fb"] else ()
        correction = [preprocess_batch([im], args.imgsz)[0] for im in load_sample_images(calib_dir(), v["bc"])] \
            if v["bc"] else ()
        path, report = quantize_file(float_onnx, table, args.flavour, out / f"v{i}.int8-{args.flavour}.onnx", opts,
                                     correction_batches=correction)
        artifact = str(path) if args.flavour == "ort" else str(export_openvino(path, path.with_suffix(".xml")))
        res = evaluate_artifact(artifact, dataset, progress=False)
        row = {"variant": spec, "float_tensors": len(opts.float_tensors), "head_outputs": report.head_outputs,
               "map50": res["map50"], "map50_95": res["map50_95"], "drop50_95": 100 * (ref - res["map50_95"])}
        rows.append(row)
        print(f"int8-{args.flavour} {spec:32s} mAP50-95 {row['map50_95']:.4f} drop {row['drop50_95']:+.2f}", flush=True)
    print(f"\n| int8-{args.flavour} variant | float tensors | head outputs | mAP50 | mAP50-95 | drop (points) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['float_tensors']} | {r['head_outputs']} | {r['map50']:.4f} | {r['map50_95']:.4f} | "
              f"{r['drop50_95']:+.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"float_map50_95": ref, "flavour": args.flavour, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
