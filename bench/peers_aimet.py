"""bench/peers.py's Qualcomm AIMET rows: aimet-onnx in its own venv, driven through bench/aimet_quantize.py.

Two rows, both from the float ONNX and the calibration images every other row gets:

* AIMET's default PTQ: ``QuantizationSimModel`` with its default config and min-max
  ``compute_encodings``, exported with ``to_onnx_qdq``;
* AIMET AdaRound: the same sim with ``apply_adaround`` (learned weight rounding, unlabelled
  images) before ``compute_encodings``, same export.

Each QDQ ONNX runs on ONNX Runtime as it is and on OpenVINO after edgeq's ONNX -> IR conversion.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

DEFAULT_PYTHON = "/work/venv-aimet/bin/python"
SCRIPT = Path(__file__).resolve().parent / "aimet_quantize.py"
NAMES = "aimet quantsim defaults adaround decode float"  # what --only matches in these rows' names


def aimet_python(requested: str | None) -> tuple[str | None, str]:
    """The interpreter that has aimet-onnx and its version, or None and why not."""
    python = requested or DEFAULT_PYTHON
    if not Path(python).exists():
        return None, f"{python} not found" + ("" if requested else " (the default; see --aimet-python)")
    probe = subprocess.run([python, "-c", "import aimet_onnx; print(aimet_onnx.__version__)"],
                           capture_output=True, text=True)
    if probe.returncode:
        lines = (probe.stderr or probe.stdout).strip().splitlines()
        return None, lines[-1] if lines else f"exit {probe.returncode}"
    return python, probe.stdout.strip().splitlines()[-1]


def decode_outputs(float_onnx: Path) -> list[str]:
    """The output tensors of the float model's detection decode (edgeq.graph.decode_nodes)."""
    import onnx

    from edgeq.graph import decode_nodes

    graph = onnx.load(str(float_onnx)).graph
    decode = decode_nodes(graph)
    return [out for node in graph.node if node.name in decode for out in node.output]


def aimet_quantize(python: str, float_onnx: Path, out: Path, batches, mode: str, iterations: int,
                   images: int, decode_float: bool = False) -> Path:
    """Run bench/aimet_quantize.py in AIMET's interpreter on these calibration batches."""
    import numpy as np

    calib, floats = out.with_suffix(".calib.npy"), out.with_suffix(".float.txt")
    np.save(calib, np.concatenate(batches))
    extra = []
    if decode_float:
        floats.write_text("\n".join(decode_outputs(float_onnx)) + "\n")
        extra = [str(floats)]
    proc = subprocess.run([python, str(SCRIPT), str(float_onnx), str(calib), str(out), mode, str(iterations),
                           str(images), *extra], capture_output=True, text=True)
    calib.unlink(missing_ok=True)
    floats.unlink(missing_ok=True)
    if proc.returncode or not out.exists():
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise RuntimeError(f"aimet_quantize.py exit {proc.returncode}: {lines[-1] if lines else ''}")
    print("  " + proc.stdout.strip().splitlines()[-1], flush=True)
    return out


def aimet_methods(Method, float_onnx: Path, batches, requested: str | None, iterations: int, images: int,
                  label, to_ir, only: list[str]) -> list:
    """The AIMET rows (``Method`` is peers.Method), or none with the reason printed."""
    if only and not any(w.lower() in NAMES for w in only):
        return []  # not asked for: no probe of the interpreter
    python, version = aimet_python(requested)
    if not python:
        print(f"AIMET: not run ({version})", flush=True)
        return []

    def build(mode: str, name: str, decode_float: bool = False):
        def run(folder: Path) -> dict[str, Path]:
            path = aimet_quantize(python, float_onnx, folder / f"{name}.onnx", batches, mode, iterations, images,
                                  decode_float)
            path = label(path, float_onnx, "peer:aimet")
            return {"onnxruntime": path, "openvino": to_ir(path)}
        return run

    # AIMET's "default" config: int8 symmetric weights per-channel (Conv/Gemm/MatMul), bias float,
    # 8-bit asymmetric activations at every op output and the model input, min-max ranges. Left as
    # it is, it also quantizes the decoded output (pixel boxes and [0, 1] scores on one scale: every
    # score rounds to 0), so the AdaRound row and a PTQ twin keep the decode float
    images = min(images, len(batches))
    rows = [
        Method(f"AIMET {version} QuantSim defaults (w8 per-channel sym, a8 asym, min-max)",
               build("ptq", "aimet-ptq")),
        Method(f"AIMET {version} QuantSim defaults, decode float", build("ptq", "aimet-ptq-decode-float", True)),
        Method(f"AIMET {version} AdaRound ({iterations} iterations/layer, {images} images) + QuantSim defaults, "
               "decode float", build("adaround", "aimet-adaround", True),
               note=f"AdaRound: {iterations} iterations per layer on the first {images} calibration images "
                    "(AIMET recommends 10000 iterations for 8-bit weights: hours on 2 cores), activation "
                    "ranges from all; its calibration s is the whole AdaRound + encodings + export run"),
    ]
    return [m for m in rows if not only or any(w.lower() in m.name.lower() for w in only)]
