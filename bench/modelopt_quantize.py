"""NVIDIA ModelOpt ONNX PTQ (INT8, CPU calibration), run by bench/peers.py in ModelOpt's own venv.

ModelOpt's ``[onnx]`` extra pulls CUDA wheels (cupy-cuda12x, onnxruntime-gpu) and pins an older
onnx, so it lives in a separate virtual environment that reuses the system packages; the
quantization itself needs none of the CUDA parts. Set it up once (docs/BENCHMARKS.md):

    python -m venv --system-site-packages ~/modelopt-venv
    ~/modelopt-venv/bin/pip install -r bench/requirements-modelopt.txt
    ~/modelopt-venv/bin/pip install --no-deps nvidia-modelopt==0.47.0

    ~/modelopt-venv/bin/python bench/modelopt_quantize.py float.onnx calib.npy out.onnx [entropy|max]
"""

from __future__ import annotations

import sys
import time

import numpy as np


def main(argv: list[str]) -> int:
    float_onnx, calib, out = argv[:3]
    method = argv[3] if len(argv) > 3 else "entropy"  # ModelOpt's default calibrator
    from modelopt.onnx.quantization import quantize

    t0 = time.perf_counter()
    quantize(
        onnx_path=float_onnx,
        quantize_mode="int8",
        calibration_data={"images": np.ascontiguousarray(np.load(calib), dtype=np.float32)},
        calibration_method=method,
        calibration_eps=["cpu"],  # the default list starts with CUDA and TensorRT providers
        high_precision_dtype="fp32",  # the default fp16 would also cast the unquantized rest of the graph
        output_path=out,
    )
    print(f"modelopt {method}: {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
