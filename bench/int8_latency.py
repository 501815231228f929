"""INT8 speed-ups against float and against the peers' INT8, all runners interleaved in one run.

Per model: ONNX Runtime fp32 / edgeq int8-ort / ``quantize_static`` (QDQ, uint8 activations,
int8 per-channel weights: its fastest configuration here), and OpenVINO float / edgeq int8-ov /
``nncf.quantize`` defaults, each compiled twice (``--ov-hint both``): with
``INFERENCE_PRECISION_HINT=f32``, and with no hint, as a user's ``compile_model`` gets it (bf16 on
CPUs with AVX-512 BF16 or AMX, where that float IR is the baseline INT8 must beat). Every INT8 model
is calibrated from the same float ONNX and the same calib_data/ images. ONNX Runtime's threads
do not spin between runs (they would steal the cores from the runner timed next). NNCF is a
benchmark-only dependency: ``pip install -r bench/requirements-peers.txt``.

    python bench/int8_latency.py                      # demo model at 320 + seed small at 640
    python bench/int8_latency.py --runs 100 --json int8_latency.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import measure, random_checkpoint  # noqa: E402


def calibration_batches(imgsz: int, count: int):
    from edgeq.data.demo import calib_dir
    from edgeq.data.images import load_sample_images
    from edgeq.runtime.preprocess import preprocess_batch

    return [preprocess_batch([im], imgsz)[0] for im in load_sample_images(calib_dir(), count)]


def calibration_reader(batches):
    """ONNX Runtime's calibration reader over preprocessed batches (input ``images``)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"images": x}

    return Reader()


def ort_quantize_static(float_onnx: Path, out: Path, batches) -> Path:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    quantize_static(str(float_onnx), str(out), calibration_reader(batches), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    return out


def nncf_quantize(float_onnx: Path, out: Path, batches) -> Path:
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(float_onnx))
    quantized = nncf.quantize(model, nncf.Dataset(batches), subset_size=len(batches))
    ov.save_model(quantized, str(out))
    return out


def build(weights: Path, imgsz: int, threads: int, folder: Path, calib_images: int, finetune_steps: int = 0
          ) -> tuple[dict, dict]:
    from edgeq.export.pipeline import Int8Request, export_model
    from edgeq.runtime.backends import load_backend

    timings = {}
    t0 = time.perf_counter()
    res = export_model(weights, formats="onnx,openvino", out_dir=folder, imgsz=imgsz, force=True,
                       int8=Int8Request(num_images=calib_images, progress=False, data=_calib()))
    timings["edgeq export (calibration, sensitivity, both flavours)"] = time.perf_counter() - t0
    arts = res.artifacts
    from edgeq.export.int8 import Int8Options, quantize_file

    from edgeq.export.openvino_export import export_openvino

    # the defaults are in arts; the other fallback settings from the same table
    no_fb = {"ov": quantize_file(arts["onnx"], res.table, "ov", folder / "fb0.int8-ov.onnx")[0]}
    no_fb["ov"] = export_openvino(no_fb["ov"], no_fb["ov"].with_suffix(".xml"))
    no_fb["ort"] = quantize_file(arts["onnx"], res.table, "ort", folder / "fb0.int8-ort.onnx")[0]
    # the default's float tensors, the head convolutions' logits quantized per channel (all-integer convolutions)
    per_channel = quantize_file(arts["onnx"], res.table, "ort", folder / "pc.int8-ort.onnx", Int8Options(
        head_outputs="per-channel", float_tensors=tuple(res.int8_reports["int8-ort"].float_tensors)))[0]
    batches = calibration_batches(imgsz, calib_images)
    t0 = time.perf_counter()
    qs = ort_quantize_static(arts["onnx"], folder / "quantize_static.onnx", batches)
    timings["quantize_static"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    nn = nncf_quantize(arts["onnx"], folder / "nncf.xml", batches)
    timings["nncf.quantize"] = time.perf_counter() - t0
    float_count = {k: len(res.int8_reports[k].float_tensors) for k in ("int8-ort", "int8-ov")}  # the NSR floor decides
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runners = {
            "ONNX Runtime fp32": load_backend(arts["onnx"], threads=threads, spin=False),
            f"ONNX Runtime, edgeq int8-ort (default: {float_count['int8-ort']} tensors float)": load_backend(arts["int8-ort"], threads=threads, spin=False),
            "ONNX Runtime, edgeq int8-ort, fallback 0": load_backend(no_fb["ort"], threads=threads, spin=False),
            "ONNX Runtime, edgeq int8-ort, per-channel head outputs": load_backend(per_channel, threads=threads, spin=False),
            "ONNX Runtime, quantize_static (QDQ u8/s8 per-channel)": load_backend(qs, threads=threads, spin=False),
            "OpenVINO f32": load_backend(arts["openvino"], threads=threads, precision="f32"),
            f"OpenVINO, edgeq int8-ov (default: {float_count['int8-ov']} tensors float)": load_backend(arts["int8-ov-ir"], threads=threads,
                                                                           precision="f32"),
            "OpenVINO, edgeq int8-ov, fallback 0": load_backend(no_fb["ov"], threads=threads, precision="f32"),
            "OpenVINO, nncf.quantize defaults": load_backend(nn, threads=threads, precision="f32"),
        }
        if finetune_steps:  # the same all-integer graphs with fine-tuned weights and learned scales
            from edgeq.export.finetune import FinetuneOptions

            t0 = time.perf_counter()
            ft = export_model(weights, formats="onnx,openvino", out_dir=folder / "ft", imgsz=imgsz, force=True,
                              int8=Int8Request(num_images=calib_images, progress=False, data=_calib(), fallback=0,
                                               finetune=FinetuneOptions(steps=finetune_steps)))
            timings[f"edgeq export --fallback 0 --finetune {finetune_steps}"] = time.perf_counter() - t0
            runners["ONNX Runtime, edgeq int8-ort, fine-tuned, fallback 0"] = load_backend(
                ft.artifacts["int8-ort"], threads=threads, spin=False)
            runners["OpenVINO, edgeq int8-ov, fine-tuned, fallback 0"] = load_backend(
                ft.artifacts["int8-ov-ir"], threads=threads, precision="f32")
    return runners, timings


DEFAULT_HINT = ", OpenVINO default hint"


def with_hints(runners: dict, threads: int, hints: str) -> dict:
    """Every OpenVINO runner (compiled with the f32 hint) also with no hint at all, as a user's
    ``compile_model`` gets it (bf16 on CPUs with AVX-512 BF16 or AMX), or only so (``hints``:
    f32, default, both). Each comparison row then compares models compiled the same way."""
    from edgeq.runtime.backends import load_backend

    if hints == "f32":
        return runners
    out = {}
    for name, runner in runners.items():
        if hints == "both" or not name.startswith("OpenVINO"):
            out[name] = runner
        if name.startswith("OpenVINO"):
            out[name + DEFAULT_HINT] = load_backend(runner.path, threads=threads, precision="default")
            if hints == "default":
                runner.close()
    return out


def _calib() -> Path:
    from edgeq.data.demo import calib_dir

    return calib_dir()


def table(title: str, medians: dict[str, float]) -> str:
    """Each row against the float model and the peer INT8 on the same backend, compiled the same way
    (OpenVINO: the same hint; the float IR with no hint is the bf16 model a user gets by default)."""
    base = {"ONNX Runtime": "ONNX Runtime fp32", "OpenVINO": "OpenVINO f32"}
    peer = {"ONNX Runtime": "ONNX Runtime, quantize_static (QDQ u8/s8 per-channel)",
            "OpenVINO": "OpenVINO, nncf.quantize defaults"}
    lines = [f"**{title}**", "", "| runner | median ms | vs float, same backend and hint | vs peer INT8, same "
             "backend and hint |", "|---|---|---|---|"]
    for name, ms in medians.items():
        backend = "OpenVINO" if name.startswith("OpenVINO") else "ONNX Runtime"
        hint = DEFAULT_HINT if name.endswith(DEFAULT_HINT) else ""
        b, q = medians.get(base[backend] + hint), medians.get(peer[backend] + hint)
        ratio = lambda ref: f"{ms / ref:.2f}x" if ref else "-"  # noqa: E731
        lines.append(f"| {name} | {ms:.1f} | {ratio(b)} | {ratio(q)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calib-images", type=int, default=64)
    p.add_argument("--finetune-steps", type=int, default=0,
                   help="also time the fine-tuned all-integer graphs (export --fallback 0 --finetune N); their "
                        "latency does not depend on N (same graph, other weights and scales)")
    p.add_argument("--ov-hint", choices=("f32", "default", "both"), default="both",
                   help="OpenVINO models compiled with the f32 hint, with none (OpenVINO's default: bf16 on CPUs "
                        "that have it), or both (default)")
    p.add_argument("--json")
    args = p.parse_args(argv)

    import nncf
    import onnxruntime
    import openvino

    from edgeq.data.demo import demo_weights

    print(f"machine: {platform.processor() or platform.machine()}, {args.threads} threads; onnxruntime "
          f"{onnxruntime.__version__}, openvino {openvino.__version__}, nncf {nncf.__version__}; median of {args.runs} "
          f"interleaved runs after {args.warmup} warm-up, batch 1; {args.calib_images} calibration images\n")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for model, imgsz in ((str(demo_weights()), 320), ("yolov5s-mobilenetv3-small", 640)):
            weights = Path(model) if model.endswith(".pt") else random_checkpoint(model, imgsz, folder)
            runners, timings = build(weights, imgsz, args.threads, folder / weights.stem, args.calib_images,
                                     args.finetune_steps)
            runners = with_hints(runners, args.threads, args.ov_hint)
            medians = measure(runners, imgsz, args.runs, args.warmup)
            title = f"{Path(model).name} at {imgsz}x{imgsz}"
            results[title] = {"medians_ms": medians, "build_s": timings}
            print(table(title, medians))
            print("build wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + "\n", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
