"""edgeq's INT8 against the tools users quantize with today, on one machine, in one run.

Every method starts from the same float ONNX (edgeq's export) and the same calibration images
(calib_data/, letterboxed by edgeq's one preprocessing function), and each INT8 model is run
on the backends it can run on:

* edgeq default (``edgeq export --int8``) and edgeq with its best accuracy settings;
* NNCF ``nncf.quantize`` with its defaults, and the way Ultralytics calls it (preset MIXED,
  the detection decode and every Sigmoid ignored) -> OpenVINO;
* ONNX Runtime ``quantize_static``: its defaults (QDQ, int8 activations, per-tensor weights,
  minmax), and its best settings found here (uint8 activations, int8 per-channel weights, the
  decode excluded, minmax / percentile / entropy) -> ONNX Runtime and OpenVINO;
* NVIDIA ModelOpt ONNX PTQ (INT8, its default entropy calibrator, ONNX Runtime's CPU provider
  for calibration), run in its own venv (``--modelopt-python``, see bench/modelopt_quantize.py)
  -> ONNX Runtime and OpenVINO;
* Qualcomm AIMET (aimet-onnx) QuantSim defaults and AdaRound, QDQ export, in its own venv
  (``--aimet-python``, see bench/peers_aimet.py and bench/aimet_quantize.py) -> both.

Per row: mAP50-95 of the demo model on its validation split and the drop against float (in
points), median latency on each backend (batch 1, interleaved runs after warm-up, ONNX
Runtime threads not spinning; OpenVINO compiled twice, with an explicit f32 hint and with no
hint, as a user's ``compile_model`` gets it: bf16 on CPUs with AVX-512 BF16 or AMX, each
compared with the float IR compiled the same way), and the calibration wall time. The seed's small model at 640 (random weights, randomized BN statistics) gets latency and
calibration time only, calibrated on 64 images. Peers are benchmark-only dependencies:
``pip install -r bench/requirements-peers.txt``.

    python bench/peers.py --quick                    # demo model only, fewer images: a few minutes
    python bench/peers.py --json peers.json          # the table in docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int8_latency import calibration_batches, calibration_reader  # noqa: E402
from latency import measure, random_checkpoint  # noqa: E402
from peers_aimet import aimet_methods  # noqa: E402


@dataclass
class Method:
    """One way of producing an INT8 model: a row of the table."""

    name: str
    build: Callable[[Path], dict[str, Path]]  # folder -> {"onnxruntime": path, "openvino": path}
    calib_s: float = 0.0
    artifacts: dict[str, Path] = field(default_factory=dict)
    note: str = ""


# ---------------------------------------------------------------- peers


def quantize_static(float_onnx: Path, out: Path, batches, *, best: bool, method: str = "MinMax") -> Path:
    """``best=False``: quantize_static's defaults; ``best=True``: u8/s8 per-channel, decode excluded."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    from edgeq.graph import decode_nodes

    if not best:
        ort_quantize_static(str(float_onnx), str(out), calibration_reader(batches), quant_format=QuantFormat.QDQ)
        return out
    decode = sorted(decode_nodes(onnx.load(str(float_onnx)).graph))
    ort_quantize_static(str(float_onnx), str(out), calibration_reader(batches), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        nodes_to_exclude=decode, calibrate_method=getattr(CalibrationMethod, method))
    return out


def nncf_quantize(float_onnx: Path, out: Path, batches, *, ultralytics: bool) -> Path:
    """NNCF on the OpenVINO model read from the float ONNX; ``ultralytics``: as Ultralytics' export calls it."""
    import nncf
    import onnx
    import openvino as ov

    from edgeq.graph import decode_nodes

    model = ov.Core().read_model(str(float_onnx))
    kwargs = {}
    if ultralytics:
        # Ultralytics ignores the head's decode arithmetic (Add/Sub/Mul/Div) and every Sigmoid, preset MIXED
        names = {op.get_friendly_name() for op in model.get_ops()}
        decode = sorted(decode_nodes(onnx.load(str(float_onnx)).graph) & names)
        kwargs = {"preset": nncf.QuantizationPreset.MIXED,
                  "ignored_scope": nncf.IgnoredScope(names=decode, types=["Sigmoid"], validate=False)}
    quantized = nncf.quantize(model, nncf.Dataset(batches), subset_size=len(batches), **kwargs)
    ov.save_model(quantized, str(out), compress_to_fp16=False)
    return out


def modelopt_python(requested: str | None) -> tuple[str | None, str]:
    """The interpreter that has ModelOpt (``--modelopt-python``, else this one), or None and why not."""
    import subprocess

    python = requested or sys.executable
    probe = subprocess.run([python, "-c", "import modelopt.onnx.quantization, modelopt; print(modelopt.__version__)"],
                           capture_output=True, text=True)
    if probe.returncode:
        lines = (probe.stderr or probe.stdout).strip().splitlines()
        return None, lines[-1] if lines else f"exit {probe.returncode}"
    return python, probe.stdout.strip().splitlines()[-1]


def modelopt_quantize(python: str, float_onnx: Path, out: Path, batches, method: str = "entropy") -> Path:
    """ModelOpt's ONNX PTQ with its default calibrator, in its own interpreter (bench/modelopt_quantize.py)."""
    import subprocess

    import numpy as np

    calib = out.with_suffix(".calib.npy")
    np.save(calib, np.concatenate(batches))
    script = Path(__file__).resolve().parent / "modelopt_quantize.py"
    proc = subprocess.run([python, str(script), str(float_onnx), str(calib), str(out), method],
                          capture_output=True, text=True)
    if proc.returncode or not out.exists():
        raise RuntimeError((proc.stderr or proc.stdout).strip().splitlines()[-1])
    return out


# ---------------------------------------------------------------- plumbing


def label(artifact: Path, float_onnx: Path, flavour: str) -> Path:
    """Give a peer's model the float model's names/stride/size metadata so edgeq can evaluate it."""
    import onnx

    from edgeq.graph import RT_INFO_ROOT, read_metadata, set_metadata

    meta = {**read_metadata(float_onnx), "edgeq.flavour": flavour}
    if artifact.suffix == ".onnx":
        proto = onnx.load(str(artifact))
        set_metadata(proto, meta)
        onnx.save(proto, str(artifact))
    else:
        import openvino as ov

        model = ov.Core().read_model(str(artifact))
        for key, value in meta.items():
            model.set_rt_info(value, [RT_INFO_ROOT, key])
        tmp = artifact.with_name(artifact.stem + ".labelled.xml")
        ov.save_model(model, str(tmp), compress_to_fp16=False)
        tmp.with_suffix(".bin").replace(artifact.with_suffix(".bin"))
        tmp.replace(artifact)
    return artifact


def to_ir(onnx_path: Path) -> Path:
    from edgeq.export.openvino_export import export_openvino

    return export_openvino(onnx_path, onnx_path.with_suffix(".xml"))


def methods(float_onnx: Path, float_ir: Path, weights: Path, imgsz: int, batches, quick: bool,
            modelopt: str | None, only: list[str], aimet: tuple = (None, 100, 16)) -> list[Method]:
    from edgeq import flavours
    from edgeq.data.demo import calib_dir
    from edgeq.export.calib_table import calibrate
    from edgeq.export.int8 import Int8Options, quantize_file
    from edgeq.export.sensitivity import fallback_tensors, rank_tensors

    state: dict = {}

    def edgeq_default(folder: Path) -> dict[str, Path]:
        table, _ = calibrate(float_onnx, calib_dir(), num_images=len(batches), progress=False)
        state["table"], state["sens"] = table, batches[:4]
        sens = state["sens"]
        fallback = {flavour: flavours.get(flavour).policy.default_fallback for flavour in ("ort", "ov")}
        paths = {}
        for flavour in ("ort", "ov"):
            opts = Int8Options()
            if fallback[flavour]:
                ranked = rank_tensors(float_onnx, table, flavour, sens, progress=False)
                opts.float_tensors = fallback_tensors(ranked, fallback[flavour])
            paths[flavour], _ = quantize_file(float_onnx, table, flavour, folder / f"edgeq.int8-{flavour}.onnx", opts)
        ort, ov_onnx = paths["ort"], paths["ov"]
        return {"onnxruntime": ort, "openvino": to_ir(ov_onnx)}

    def edgeq_best(folder: Path) -> dict[str, Path]:
        """The most accurate settings of the session-2 accuracy table (ORT mse, OV minmax, 16 tensors float),
        from the default's calibration table (no re-calibration)."""
        table, sens = state["table"], state["sens"]
        out = {}
        for flavour, method, backend in (("ort", "mse", "onnxruntime"), ("ov", "minmax", "openvino")):
            opts = Int8Options(method=method)
            ranked = rank_tensors(float_onnx, table, flavour, sens, opts, progress=False)
            opts.float_tensors = tuple(r["tensor"] for r in ranked[:16])
            path, _ = quantize_file(float_onnx, table, flavour, folder / f"edgeq-best.int8-{flavour}.onnx", opts)
            out[backend] = path if backend == "onnxruntime" else to_ir(path)
        return out

    def edgeq_finetuned(folder: Path) -> dict[str, Path]:
        """``edgeq export --int8 --fallback 0 --finetune``: every tensor int8, each flavour's graph fine-tuned."""
        from edgeq.export.finetune import FinetuneOptions
        from edgeq.export.pipeline import Int8Request, export_model

        res = export_model(weights, formats="onnx,openvino", out_dir=folder / "ft", imgsz=imgsz, force=True,
                           int8=Int8Request(data=calib_dir(), num_images=len(batches), fallback=0, progress=False,
                                            finetune=FinetuneOptions()))
        return {"onnxruntime": res.artifacts["int8-ort"], "openvino": res.artifacts["int8-ov-ir"]}

    def edgeq_budget(folder: Path) -> dict[str, Path]:
        """``edgeq export --int8 --max-map-drop 0.8``: per flavour the fastest graph whose drop, estimated
        by agreement with the float model on held-out calibration images, holds 0.8 points."""
        from edgeq.export.pipeline import Int8Request, export_model

        res = export_model(weights, formats="onnx,openvino", out_dir=folder / "budget", imgsz=imgsz, force=True,
                           int8=Int8Request(data=calib_dir(), num_images=len(batches), max_map_drop=0.8,
                                            progress=False))
        return {"onnxruntime": res.artifacts["int8-ort"], "openvino": res.artifacts["int8-ov-ir"]}

    # ONNX Runtime's histogram calibrators (and ModelOpt, which uses them) keep every activation of
    # every image in memory: 256 images at 320 took more than 18 GB and were killed. They get the
    # first 64 images at 320 (16 at 640).
    few = batches[: max(1, int(64 * (320 / imgsz) ** 2))]

    def qs(best: bool, method: str = "MinMax"):
        def build(folder: Path) -> dict[str, Path]:
            name = f"qs-{'best' if best else 'default'}-{method.lower()}"
            images = batches if method == "MinMax" else few
            path = label(quantize_static(float_onnx, folder / f"{name}.onnx", images, best=best, method=method),
                         float_onnx, "peer:quantize_static")
            return {"onnxruntime": path, "openvino": to_ir(path)}  # the QDQ ONNX converted as it is
        return build

    def nncf_(ultralytics: bool):
        def build(folder: Path) -> dict[str, Path]:
            name = "nncf-ultralytics" if ultralytics else "nncf-default"
            return {"openvino": label(nncf_quantize(float_onnx, folder / f"{name}.xml", batches, ultralytics=ultralytics),
                                      float_onnx, "peer:nncf")}
        return build

    rows = [
        Method("edgeq default (percentile; int8-ov: 8 tensors float)", edgeq_default),  # the policies' defaults
        Method("edgeq best (ORT: mse, OV: minmax; 16 tensors float)", edgeq_best,
               note="from the default's calibration table: its time is the sensitivity analysis and quantization"),
        Method("edgeq fine-tuned (all-integer: fallback 0, 200 steps)", edgeq_finetuned,
               note="calibration, bias correction and the fine-tune of both flavours"),
        Method("edgeq budget 0.8 points (no labels: agreement estimate)", edgeq_budget,
               note="calibration on the first 192 images, the last 64 held out; sensitivity, search, timing"),
        Method("nncf.quantize defaults", nncf_(False)),
        Method("nncf.quantize as Ultralytics (MIXED, decode + Sigmoid ignored)", nncf_(True)),
        Method("quantize_static defaults (QDQ s8/s8, per-tensor, minmax)", qs(False)),
        Method("quantize_static u8/s8 per-channel, decode excluded, minmax", qs(True)),
        Method(f"quantize_static u8/s8 per-channel, decode excluded, percentile ({len(few)} images)",
               qs(True, "Percentile")),
    ]
    if not quick:
        rows.append(Method(f"quantize_static u8/s8 per-channel, decode excluded, entropy ({len(few)} images)",
                           qs(True, "Entropy")))
    if only:
        rows = [m for m in rows if any(word.lower() in m.name.lower() for word in only)]
    python, version = modelopt_python(modelopt) if not only or any("modelopt" in w.lower() for w in only) else (None, "")
    if python:
        def mo(folder: Path) -> dict[str, Path]:
            path = label(modelopt_quantize(python, float_onnx, folder / "modelopt.onnx", few), float_onnx,
                         "peer:modelopt")
            return {"onnxruntime": path, "openvino": to_ir(path)}
        rows.append(Method(f"NVIDIA ModelOpt {version} ONNX PTQ (int8, entropy, CPU; {len(few)} images)", mo))
    elif version:
        print(f"ModelOpt: not run ({version}); see --modelopt-python")
    return rows + aimet_methods(Method, float_onnx, batches, *aimet, label, to_ir, only)


def evaluate(path: Path, dataset) -> dict:
    from edgeq.verify import evaluate_artifact

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return evaluate_artifact(str(path), dataset, threads=2, progress=False)


def run_model(weights: Path, imgsz: int, folder: Path, args, *, accuracy: bool) -> dict:
    from edgeq.data.demo import demo_data_yaml
    from edgeq.data.yolo import YoloDataset
    from edgeq.export.pipeline import export_model
    from edgeq.runtime.backends import load_backend

    arts = export_model(weights, formats="onnx,openvino", out_dir=folder, imgsz=imgsz, force=True).artifacts
    float_onnx, float_ir = arts["onnx"], arts["openvino"]
    # the latency-only model needs no accurate ranges: 64 images keep its 640 px calibrations short
    batches = calibration_batches(imgsz, args.calib_images if accuracy else min(args.calib_images, 64))
    rows = methods(float_onnx, float_ir, weights, imgsz, batches, args.quick, args.modelopt_python,
                   [w for w in (args.only or "").split(",") if w],
                   (args.aimet_python, args.adaround_iterations, args.adaround_images))
    if not accuracy:  # its graphs are fallback 0's: the latency-only model would spend minutes training for nothing,
        # and a budget needs a model that detects something
        rows = [m for m in rows if "fine-tuned" not in m.name and "budget" not in m.name]
    dataset = None
    if accuracy:
        dataset = YoloDataset(demo_data_yaml(), split="val")
        if args.val_images:
            dataset.image_paths, dataset._labels = dataset.image_paths[: args.val_images], dataset._labels[: args.val_images]
    result = {"imgsz": imgsz, "rows": []}
    if accuracy:
        ref = evaluate(float_onnx, dataset)
        result["float"] = {"map50": ref["map50"], "map50_95": ref["map50_95"], "images": len(dataset)}
        print(f"float: mAP50-95 {ref['map50_95']:.4f} ({len(dataset)} images)", flush=True)
    runners = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runners["float|onnxruntime"] = load_backend(float_onnx, threads=args.threads, spin=False)
        runners["float|openvino"] = load_backend(float_ir, threads=args.threads, precision="f32")
        runners["float|openvino-default"] = load_backend(float_ir, threads=args.threads, precision="default")
    for m in rows:
        t0 = time.perf_counter()
        try:
            m.artifacts = m.build(folder)
        except Exception as exc:  # a peer that fails on this model is a result, not a crash
            m.note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            print(f"{m.name}: {m.note}", flush=True)
            result["rows"].append({"method": m.name, "note": m.note})
            continue
        m.calib_s = time.perf_counter() - t0
        row = {"method": m.name, "calib_s": m.calib_s, "note": m.note, "backends": {}}
        for backend, path in m.artifacts.items():
            entry = {"artifact": path.name}
            if accuracy:
                res = evaluate(path, dataset)
                entry.update(map50=res["map50"], map50_95=res["map50_95"],
                             drop50_95=100 * (result["float"]["map50_95"] - res["map50_95"]))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                runners[f"{m.name}|{backend}"] = (load_backend(path, threads=args.threads, spin=False)
                                                  if backend == "onnxruntime" else
                                                  load_backend(path, threads=args.threads, precision="f32"))
                if backend == "openvino":  # also as a user's compile_model gets it: no hint (bf16 where the CPU has it)
                    runners[f"{m.name}|openvino-default"] = load_backend(path, threads=args.threads, precision="default")
            row["backends"][backend] = entry
        result["rows"].append(row)
        summary = ", ".join(f"{b}: drop {e['drop50_95']:+.2f}" for b, e in row["backends"].items() if "drop50_95" in e)
        print(f"{m.name}: calibration {m.calib_s:.0f} s{'; ' + summary if summary else ''}", flush=True)
    medians = measure(runners, imgsz, args.runs, args.warmup)
    result["float_ms"] = {b: medians[f"float|{b}"] for b in ("onnxruntime", "openvino", "openvino-default")}
    for row in result["rows"]:
        for backend, entry in row.get("backends", {}).items():
            entry["ms"] = medians[f"{row['method']}|{backend}"]
            if backend == "openvino":
                entry["ms_default_hint"] = medians[f"{row['method']}|openvino-default"]
    return result


def table(title: str, result: dict) -> str:
    acc = "float" in result
    lines = [f"**{title}**", "",
             "| method | calibration s | " + ("ORT mAP50-95 (drop) | OV mAP50-95 (drop) | " if acc else "")
             + "ORT ms (vs fp32) | OV f32 hint ms (vs float f32) | OV default hint ms (vs float default) |",
             "|---|---|" + ("---|---|" if acc else "") + "---|---|---|"]
    fl = result["float_ms"]
    if acc:
        f = result["float"]["map50_95"]
        lines.append(f"| float | - | {f:.4f} | {f:.4f} | {fl['onnxruntime']:.1f} | {fl['openvino']:.1f} | "
                     f"{fl['openvino-default']:.1f} |")
    else:
        lines.append(f"| float | - | {fl['onnxruntime']:.1f} | {fl['openvino']:.1f} | {fl['openvino-default']:.1f} |")
    for row in result["rows"]:
        if "backends" not in row:
            lines.append(f"| {row['method']} | {row['note']} |" + (" | |" if acc else "") + " | | |")
            continue
        cells = [row["method"], f"{row['calib_s']:.0f}"]
        b = row["backends"]
        if acc:
            for backend in ("onnxruntime", "openvino"):
                e = b.get(backend)
                cells.append(f"{e['map50_95']:.4f} ({e['drop50_95']:+.2f})" if e else "-")
        for backend in ("onnxruntime", "openvino"):
            e = b.get(backend)
            cells.append(f"{e['ms']:.1f} ({e['ms'] / fl[backend]:.2f}x)" if e else "-")
        e = b.get("openvino")
        cells.append(f"{e['ms_default_hint']:.1f} ({e['ms_default_hint'] / fl['openvino-default']:.2f}x)" if e else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="demo model only, 64 calibration / 100 validation images, "
                                                        "20 timed runs")
    p.add_argument("--runs", type=int, help="timed runs per model (default 50, quick 20)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calib-images", type=int, help="default 256 (quick 64)")
    p.add_argument("--val-images", type=int, help="first N validation images (default all 500, quick 100)")
    p.add_argument("--modelopt-python", help="an interpreter with NVIDIA ModelOpt (its own venv: see "
                                              "bench/modelopt_quantize.py); default: this one if it has it")
    p.add_argument("--aimet-python", help="an interpreter with aimet-onnx (its own venv: see bench/aimet_quantize.py); "
                                          "default /work/venv-aimet/bin/python, AIMET rows skipped if missing")
    p.add_argument("--adaround-iterations", type=int, default=100, help="AIMET AdaRound steps a layer (its advice: 10k)")
    p.add_argument("--adaround-images", type=int, default=16, help="AdaRound on the first N calibration images")
    p.add_argument("--only", help="comma-separated words: run only the methods whose name contains one "
                                  "('edgeq best' needs 'edgeq default' too)")
    p.add_argument("--out", help="keep the models here (default: a temporary folder)")
    p.add_argument("--json", help="write every figure to this file")
    args = p.parse_args(argv)
    args.runs = args.runs or (20 if args.quick else 50)
    args.calib_images = args.calib_images or (64 if args.quick else 256)
    args.val_images = args.val_images if args.val_images is not None else (100 if args.quick else 0)

    import nncf
    import onnxruntime
    import openvino

    from edgeq.data.demo import demo_weights

    header = (f"machine: {platform.processor() or platform.machine()}, {args.threads} threads; onnxruntime "
              f"{onnxruntime.__version__}, openvino {openvino.__version__}, nncf {nncf.__version__}; "
              f"{args.calib_images} calibration images; latency: median of {args.runs} interleaved runs after "
              f"{args.warmup} warm-up, batch 1")
    print(header + "\n", flush=True)
    results = {"header": header, "args": vars(args), "models": {}}
    models = [(str(demo_weights()), 320, True)] + ([] if args.quick else [("yolov5s-mobilenetv3-small", 640, False)])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out) if args.out else Path(tmp)
        for model, imgsz, accuracy in models:
            folder = root / f"{Path(model).stem}-{imgsz}"
            folder.mkdir(parents=True, exist_ok=True)
            weights = Path(model) if model.endswith(".pt") else random_checkpoint(model, imgsz, folder)
            title = f"{Path(model).name} at {imgsz}x{imgsz}" + ("" if accuracy else
                                                                 " (random weights: latency only; 64 calibration images)")
            result = run_model(weights, imgsz, folder, args, accuracy=accuracy)
            results["models"][title] = result
            print("\n" + table(title, result) + "\n", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
