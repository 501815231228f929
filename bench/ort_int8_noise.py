"""Where int8-ort's error comes from on one checkpoint: the graph's own rounding, ONNX Runtime's
integer kernels, and what the fallback and the calibrator buy back.

One calibration (the bundled 256 calib_data/ images). For each variant: mAP50-95 drop on the
demo validation split, and the noise-to-signal ratio at the head (logits clipped to +-8) on 4
calibration images, with ONNX Runtime's graph optimizations on (integer kernels) and off (the
Q/DQ arithmetic run in float, as on a CPU whose kernels add no error of their own).

    python bench/ort_int8_noise.py --weights ~/edgeq-work/runs/demo-p1-256/best.pt --out runs/ort-noise
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def uint8_weights(src: Path, dst: Path) -> Path:
    """The same weights stored as uint8 with zero point 128: ONNX Runtime then takes its u8u8
    kernels, which do not saturate (its u8s8 path on AVX2 sums pairs of products in int16)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[0]])
        if w.dtype != np.int8 or w.ndim < 2:
            continue
        inits[node.input[0]].CopyFrom(numpy_helper.from_array((w.astype(np.int16) + 128).astype(np.uint8), node.input[0]))
        zp = numpy_helper.to_array(inits[node.input[2]])
        name = node.input[2] + "_u8"
        model.graph.initializer.append(numpy_helper.from_array(np.full(zp.shape, 128, np.uint8), name))
        node.input[2] = name
    onnx.save(model, str(dst))
    return dst


def head_nsr(float_onnx: Path, quant_onnx: Path, batches, optimize: bool) -> float:
    import onnx
    import onnxruntime as ort

    from edgeq.graph import LOGIT_LIMIT, head_tensors

    heads = head_tensors(onnx.load(str(float_onnx)).graph)

    def session(path: Path, level):
        model = onnx.load(str(path))
        model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(h) for h in heads)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = level
        opts.log_severity_level = 3
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    levels = ort.GraphOptimizationLevel
    ref = session(float_onnx, levels.ORT_ENABLE_ALL)
    got = session(quant_onnx, levels.ORT_ENABLE_ALL if optimize else levels.ORT_DISABLE_ALL)
    signal = noise = 0.0
    for batch in batches:
        for r, g in zip(ref.run(heads, {"images": batch}), got.run(heads, {"images": batch})):
            r, g = np.clip(r, -LOGIT_LIMIT, LOGIT_LIMIT).astype(np.float64), np.clip(g, -LOGIT_LIMIT, LOGIT_LIMIT)
            signal += float(np.square(r).sum())
            noise += float(np.square(r - g).sum())
    return noise / signal


def main() -> None:
    from edgeq.data.demo import DEMO_WEIGHTS, calib_dir, demo_data_yaml
    from edgeq.data.images import load_sample_images
    from edgeq.data.yolo import YoloDataset
    from edgeq.export.calib_table import calibrate
    from edgeq.export.int8 import Int8Options, quantize_file
    from edgeq.export.sensitivity import fallback_tensors, rank_tensors
    from edgeq.export.pipeline import export_model
    from edgeq.runtime.preprocess import preprocess_batch
    from edgeq.verify import evaluate_artifact

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=str(DEMO_WEIGHTS))
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--out", default="runs/ort-noise")
    ap.add_argument("--json")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    float_onnx = export_model(args.weights, formats="onnx", out_dir=out, imgsz=args.imgsz, force=True).artifacts["onnx"]
    table, _ = calibrate(float_onnx, calib_dir(), num_images=256)
    images = load_sample_images(calib_dir(), 4)
    batches = [preprocess_batch([im], args.imgsz)[0] for im in images]
    dataset = YoloDataset(demo_data_yaml(), split="val")
    ref = evaluate_artifact(str(float_onnx), dataset, progress=False)["map50_95"]
    print(f"float mAP50-95 {ref:.4f} ({len(dataset)} images)", flush=True)

    def fallback(method: str | None) -> Int8Options:
        ranked = rank_tensors(float_onnx, table, "ort", batches, Int8Options(method=method), progress=False)
        return Int8Options(method=method, float_tensors=fallback_tensors(ranked, 8))

    variants = {
        "percentile, fallback 0": Int8Options(),
        "percentile, fallback 8 (default)": fallback(None),
        "mse, fallback 0": Int8Options(method="mse"),
        "mse, fallback 8": fallback("mse"),
    }
    rows = []
    for name, opts in variants.items():
        path, _ = quantize_file(float_onnx, table, "ort", out / f"{len(rows)}.int8-ort.onnx", opts)
        for weights in ("int8", "uint8"):
            if weights == "uint8":
                path = uint8_weights(path, path.with_name(path.stem + ".u8.onnx"))
            drop = 100 * (ref - evaluate_artifact(str(path), dataset, progress=False)["map50_95"])
            row = {"variant": name, "weights": weights, "drop50_95": round(drop, 2),
                   "nsr_kernels": head_nsr(float_onnx, path, batches, True),
                   "nsr_qdq_in_float": head_nsr(float_onnx, path, batches, False)}
            rows.append(row)
            print(f"{name:34s} {weights:5s} weights: drop {drop:+.2f}  head NSR {row['nsr_kernels']:.2e} "
                  f"(Q/DQ in float: {row['nsr_qdq_in_float']:.2e})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"float_map50_95": ref, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
