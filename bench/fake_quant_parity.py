"""The fine-tune's PyTorch graph against the backends running the exported artifacts (issue 16).

For each INT8 flavour in an export folder: the flavour's Q/DQ ONNX run as a PyTorch module
(:class:`edgeq.export.qdq_torch.QdqModule`, weights taken from the artifact itself) against
the backend the flavour is made for (int8-ov: OpenVINO on the IR; int8-ort and, as a proxy for
TensorRT, int8-trt: ONNX Runtime), on the first N calibration images. Prints the relative L2
of their difference next to the INT8-vs-float relative L2, for the decoded output and the head
logits, the same PyTorch graph in float64 against the backend, and ONNX Runtime running the same
Q/DQ file with its graph optimizations off (Q/DQ as written, no fused integer kernels) against
the backend: the floor that rounding-boundary flips put under any comparison of two correct
implementations of one quantized network.

    python bench/fake_quant_parity.py runs/export-ft/ --images 16
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def backend_outputs(path: Path, x: np.ndarray) -> np.ndarray:
    from edgeq.runtime.backends import load_backend

    backend = load_backend(path)
    return np.concatenate([backend.infer(x[i:i + 1])[0] for i in range(len(x))])


def unfused_outputs(path: Path, x: np.ndarray) -> np.ndarray:
    """ONNX Runtime on ``path`` with every graph optimization off: the Q/DQ nodes run as written."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import onnx
    import torch

    from edgeq import flavours
    from edgeq.data.images import load_sample_images
    from edgeq.export.qdq_torch import QdqModule
    from edgeq.graph import FLAVOUR_META, metadata_of, read_imgsz

    float_onnx = next(p for p in sorted(args.folder.glob("*.onnx"))
                      if metadata_of(onnx.load(str(p), load_external_data=False)).get(FLAVOUR_META) == flavours.FLOAT)
    size = read_imgsz(float_onnx)
    from edgeq.runtime.preprocess import preprocess_batch

    x = np.concatenate([preprocess_batch([im], size)[0] for im in load_sample_images(ROOT / "calib_data", args.images)])
    reference = backend_outputs(float_onnx, x)
    rows = []
    for flavour in flavours.FLAVOURS.values():
        q_path = args.folder / flavour.onnx_name(float_onnx.stem)
        if not q_path.exists():
            continue
        deployed = q_path.with_suffix(".xml") if flavours.OPENVINO_IR in flavour.steps else q_path
        q_model = onnx.load(str(q_path))
        module = QdqModule(q_model, ["output0"])  # weights: the artifact's own integers, dequantized
        with torch.no_grad():
            ours = torch.cat([module(torch.from_numpy(x[i:i + 1]))[0] for i in range(len(x))]).numpy()
            module.double()
            ours64 = torch.cat([module(torch.from_numpy(x[i:i + 1]).double())[0] for i in range(len(x))]).float().numpy()
        theirs = backend_outputs(deployed, x)
        unfused = unfused_outputs(q_path, x)
        row = {"flavour": flavour.name, "backend": deployed.name, "int8_vs_float": rel(theirs, reference),
               "torch_vs_backend": rel(ours, theirs), "torch64_vs_torch32": rel(ours64, ours),
               "torch64_vs_backend": rel(ours64, theirs), "ort_unfused_vs_backend": rel(unfused, theirs)}
        row["ratio"] = row["torch_vs_backend"] / row["int8_vs_float"]
        rows.append(row)
        print(f"{flavour.name:9s} on {deployed.name}: INT8 vs float {row['int8_vs_float']:.4f}, PyTorch graph vs "
              f"backend {row['torch_vs_backend']:.4f} (ratio {row['ratio']:.2f}); PyTorch float64 vs float32 "
              f"{row['torch64_vs_torch32']:.4f}; float64 vs backend {row['torch64_vs_backend']:.4f}; ONNX Runtime "
              f"unfused vs backend {row['ort_unfused_vs_backend']:.4f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.exit(main())
