"""Qualcomm AIMET (aimet-onnx) post-training quantization, run by bench/peers.py in AIMET's own venv.

aimet-onnx depends on torch (AdaRound's optimizer, onnx2torch) and an unpinned torchvision whose
newest release wants a newer torch with CUDA wheels, so it lives in its own venv with the CPU
torch pinned first (docs/BENCHMARKS.md, "AIMET (aimet-onnx) as a peer"):

    python3.11 -m venv /work/venv-aimet
    /work/venv-aimet/bin/pip install torch==2.13.0          # the CPU build
    /work/venv-aimet/bin/pip install -r bench/requirements-aimet.txt

    /work/venv-aimet/bin/python bench/aimet_quantize.py float.onnx calib.npy out.onnx [ptq|adaround] [ITERS] [IMAGES] [FLOAT_TENSORS.txt]

``ptq``: a ``QuantizationSimModel`` with AIMET's defaults (its "default" config: int8 symmetric
weights, per-channel for Conv/Gemm/MatMul, bias not quantized, asymmetric 8-bit activations at
every op output and the model input; min-max calibration), ``compute_encodings`` over the
calibration images. ``adaround``: the same sim, ``apply_adaround`` (learned weight rounding from
the same unlabelled images, weight encodings frozen), then ``compute_encodings`` for the
activations. FLOAT_TENSORS.txt (one tensor name a line): quantizers of these tensors disabled
after the sim is built (bench/peers.py passes the detection decode's outputs for its
"decode float" rows, as quantize_static's best row and Ultralytics' NNCF call exclude it).
Either way the sim is written out with ``to_onnx_qdq`` (QuantizeLinear/
DequantizeLinear, activations as uint8) so ONNX Runtime and OpenVINO run it as any QDQ model.
"""

from __future__ import annotations

import sys
import time

import numpy as np

THREADS = 2  # the benchmark's machine: keep AIMET's ONNX Runtime session and torch on 2 threads


def quantize(float_onnx: str, calib: str, out: str, mode: str = "ptq", iterations: int = 100,
             images_for_adaround: int = 16, float_tensors: tuple[str, ...] = ()) -> float:
    import onnx
    import torch

    import aimet_onnx
    from aimet_onnx import QuantizationSimModel, apply_adaround

    torch.set_num_threads(THREADS)
    model = onnx.load(float_onnx)
    name = model.graph.input[0].name
    images = np.ascontiguousarray(np.load(calib), dtype=np.float32)
    inputs = [{name: images[i: i + 1]} for i in range(len(images))]  # one image per forward, as calibrated elsewhere

    t0 = time.perf_counter()
    # every argument left at its default (param int8, activation int8 asymmetric, min_max, config "default")
    # except the ORT session's thread count
    sim = QuantizationSimModel(model, session_options_kwargs={"intra_op_num_threads": THREADS,
                                                              "inter_op_num_threads": 1})
    for tensor in float_tensors:
        if tensor in sim.qc_quantize_op_dict:
            sim.qc_quantize_op_dict[tensor].enabled = False
    if mode == "adaround":
        # AIMET recommends 10k iterations per layer for 8-bit weights. On 2 shared cores its per-layer
        # work (two ORT sessions built per layer, every AdaRound image through both models, then the
        # iterations) took 10 s to 3 min a layer at 20 iterations and 16 images for this model's 94
        # Conv/Gemm layers, so the benchmark uses a modest count and the first IMAGES images (the row
        # says which); the activation ranges below still come from every calibration image
        apply_adaround(sim, inputs[:images_for_adaround], num_iterations=iterations)
    elif mode != "ptq":
        raise SystemExit(f"unknown mode {mode!r}: ptq or adaround")
    sim.compute_encodings(inputs)
    qdq = sim.to_onnx_qdq()
    elapsed = time.perf_counter() - t0
    onnx.save(qdq, out)
    detail = f" ({iterations} iterations, {len(inputs[:images_for_adaround])} images)" if mode == "adaround" else ""
    print(f"aimet-onnx {aimet_onnx.__version__} {mode}{detail}: {elapsed:.1f} s")
    return elapsed


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__)
        return 2
    mode = argv[3] if len(argv) > 3 else "ptq"
    iterations = int(argv[4]) if len(argv) > 4 else 100
    images = int(argv[5]) if len(argv) > 5 else 16
    float_tensors = tuple(open(argv[6]).read().split()) if len(argv) > 6 else ()
    quantize(argv[0], argv[1], argv[2], mode, iterations, images, float_tensors)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
