"""The ``edgeq`` command: parses arguments, calls the Python API, prints. No logic of its own.

Every handler imports what it needs inside the function, so ``edgeq --help`` and
``edgeq <cmd> --help`` stay fast and never load torch, OpenVINO or TensorRT.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from edgeq import __version__
from edgeq.errors import EdgeqError

EXAMPLES = {
    "info": """examples:
  edgeq info                                   # the bundled demo checkpoint
  edgeq info yolov5s-mobilenetv3-small --imgsz 640
  edgeq info path/to/best.pt --json info.json""",
    "data synth": """examples:
  edgeq data synth datasets/shapes --train 4000 --val 500 --imgsz 320 --seed 0""",
    "train": """examples:
  edgeq train --cfg yolov5s-mobilenetv3-small --data datasets/shapes/data.yaml --imgsz 320 --epochs 30
  edgeq train --out runs/demo --resume          # continue an interrupted run""",
    "export": """examples:
  edgeq export                                 # demo checkpoint -> ONNX + OpenVINO IR, with parity
  edgeq export best.pt --format onnx,openvino,engine --imgsz 320 --out exported/
  edgeq export best.pt --dynamic --half --force
  edgeq export model.onnx --format engine      # on a Jetson: build its own engine from the ONNX
  edgeq export best.pt --int8 --data images/ --format onnx,openvino,engine
  edgeq export best.pt --table best.calib.json --method entropy   # re-export INT8 without images""",
    "verify": """examples:
  edgeq verify best.pt out/best.int8-ort.onnx out/best.int8-ov.xml --data data.yaml --max-map-drop 1.0
  edgeq verify best.pt out/best.int8-ort.onnx --layers --json verify.json
  edgeq verify best.int8-trt.engine --reference best.onnx --data data.yaml   # on a Jetson, no PyTorch""",
    "parity": """examples:
  edgeq parity best.pt exported/best.onnx exported/best.xml
  edgeq parity best.pt exported/best.onnx --data images/ --num-images 32 --json parity.json""",
    "run": """examples:
  edgeq run exported/best.onnx --source street.jpg --save out/
  edgeq run exported/best.xml --source images/ --conf 0.4 --save out/
  edgeq run best.pt --source clip.mp4 --save out/""",
    "calibrate": """examples:
  edgeq calibrate                               # demo checkpoint on the bundled calib_data/
  edgeq calibrate best.pt --data images/ --num-images 300 -o best.calib.json""",
    "val": """examples:
  edgeq val                                    # demo checkpoint on the demo validation split
  edgeq val best.pt --data data.yaml --json metrics.json""",
}


def _write_json(path: str | None, payload: dict) -> None:
    if not path:
        return
    from edgeq.utils.files import atomic_write_text

    atomic_write_text(Path(path), json.dumps(payload, indent=2, sort_keys=True, default=float) + "\n")
    print(f"wrote {path}")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {text}")
    return value


def _model_source(arg: str | None) -> str:
    if arg:
        return arg
    from edgeq.data.demo import demo_weights

    return str(demo_weights())


# ----------------------------------------------------------------------------- handlers
def cmd_info(args: argparse.Namespace) -> int:
    from edgeq.models.checkpoint import load_model
    from edgeq.models.info import format_summary, summarize

    loaded = load_model(_model_source(args.model), nc=args.nc, trust=args.trust_checkpoint)
    imgsz = args.imgsz or loaded.imgsz or 640
    summary = summarize(loaded.model, imgsz)
    print(format_summary(summary, title=Path(str(args.model or loaded.path)).name))
    if loaded.source != "config":
        print(f"classes: {', '.join(loaded.names)}")
    payload = summary.to_dict() | {"source": loaded.source, "names": loaded.names}
    _write_json(args.json, payload)
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from edgeq.data.synthetic import generate_dataset

    path = generate_dataset(args.out_dir, n_train=args.train, n_val=args.val, imgsz=args.imgsz, seed=args.seed)
    print(f"wrote {path}")
    return 0


def cmd_data_calib(args: argparse.Namespace) -> int:
    from edgeq.data.synthetic import generate_images

    paths = generate_images(args.out_dir, n=args.num, imgsz=args.imgsz, seed=args.seed)
    print(f"wrote {len(paths)} images to {args.out_dir}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from edgeq.training.trainer import TrainConfig, Trainer

    if not args.resume and not args.data:
        raise EdgeqError("edgeq train needs --data DATA_YAML (or --resume with --out of an earlier run)")
    cfg = TrainConfig(
        cfg=args.cfg,
        data=str(args.data or ""),
        imgsz=args.imgsz,
        epochs=args.epochs or 30,
        batch=args.batch,
        optimizer=args.optimizer,
        lr0=args.lr0,
        workers=args.workers,
        seed=args.seed,
        out=args.out,
        val_images=args.val_images,
        max_iters=args.max_iters,
        weights=args.weights or "",
        close_mosaic=args.close_mosaic,
        warmup_epochs=args.warmup_epochs,
    )
    trainer = Trainer(cfg, resume=args.resume, epochs=args.epochs)
    metrics = trainer.fit()
    print(f"done: {metrics}")
    print(f"weights: {trainer.best_path} (best), {trainer.last_path} (resumable)")
    _write_json(args.json, metrics)
    return 0


def cmd_val(args: argparse.Namespace) -> int:
    from edgeq.data.demo import demo_data_yaml
    from edgeq.data.yolo import YoloDataset
    from edgeq.runtime.evaluate import format_map_table
    from edgeq.validate import evaluate_model

    data = args.data or demo_data_yaml()
    dataset = YoloDataset(data, split=args.split)
    result = evaluate_model(
        _model_source(args.weights), dataset, imgsz=args.imgsz, batch_size=args.batch, trust=args.trust_checkpoint
    )
    print(format_map_table(result))
    print(f"mAP50 {result['map50']:.4f}  mAP50-95 {result['map50_95']:.4f}  ({result['images']} images, {data})")
    _write_json(args.json, result)
    return 0


def _print_parity(reference: str, artifacts: list[str], args: argparse.Namespace) -> dict:
    from edgeq.data.demo import calib_dir
    from edgeq.data.images import load_sample_images
    from edgeq.runtime.parity import check_artifacts, format_parity_table

    images = load_sample_images(args.data or calib_dir(), args.num_images)
    results = check_artifacts(reference, artifacts, images, threads=args.threads)
    print(f"parity against {reference} on {len(images)} images:")
    print(format_parity_table(results))
    _write_json(args.json, {"reference": str(reference), "images": len(images),
                            "artifacts": {k: v.to_dict() for k, v in results.items()}})
    failed = [k for k, r in results.items() if not r.passed(args.max_rel_l2, args.min_agreement)]
    if failed:
        print(f"FAILED: {', '.join(failed)} (budget: rel L2 <= {args.max_rel_l2:g}, "
              f"detection agreement mAP50-95 >= {args.min_agreement:g})")
    return {"results": results, "failed": failed}


def cmd_calibrate(args: argparse.Namespace) -> int:
    from edgeq.data.demo import calib_dir
    from edgeq.export.calib_table import collect

    weights = _model_source(args.weights)
    table = collect(weights, args.data or calib_dir(), num_images=args.num_images, imgsz=args.imgsz,
                    method=args.method, trust=args.trust_checkpoint)
    out = Path(args.output or Path(weights).with_suffix(".calib.json").name)
    table.save(out)
    print(f"calibrated {len(table.tensors)} tensors on {table.image_count} images at {table.imgsz}x{table.imgsz}; "
          f"wrote {out} (default method {table.method})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from edgeq.export.pipeline import Int8Request, export_model

    weights = _model_source(args.weights)
    int8 = None
    if args.int8 or args.table:
        from edgeq.data.demo import calib_dir

        int8 = Int8Request(
            data=Path(args.data) if args.data else (None if args.table else calib_dir()),
            table=Path(args.table) if args.table else None,
            method=args.method,
            num_images=args.calib_images,
            percentile=args.percentile,
            exclude=tuple(x for x in (args.float_nodes or "").split(",") if x),
            fallback=args.fallback,
            fallback_min_nsr=args.fallback_min_nsr,
            uint8_weights=args.uint8_weights,
            bias_images=args.bias_correction,
            head_outputs=args.head_outputs,
        )
    result = export_model(
        weights,
        formats=args.format,
        out_dir=args.out,
        imgsz=args.imgsz,
        batch=args.batch,
        dynamic=args.dynamic,
        half=args.half,
        opset=args.opset,
        rewrite=not args.no_rewrite,
        raw=args.raw,
        force=args.force,
        trust=args.trust_checkpoint,
        int8=int8,
    )
    for fmt, path in result.artifacts.items():
        print(f"wrote {fmt:<15} {path}")
    for key, rep in result.int8_reports.items():
        print(f"{key}: {rep.activations} activation and {rep.weights} weight tensors quantized"
              + (f", {len(rep.excluded)} node(s) kept float" if rep.excluded else "")
              + (f", {len(rep.float_tensors)} sensitive tensor(s) left float" if rep.float_tensors else ""))
    rep = result.deploy_report
    if rep:
        print(f"deploy graph: {len(rep['fused'])} BatchNorm folded, {len(rep['rewritten'])} hard activations "
              f"rewritten ({rep['form']} form), max relative error vs the original {rep['max_rel_error']:.1e}")
    checkable = [str(p) for f, p in result.artifacts.items() if f in ("onnx", "openvino")]
    if args.raw or Path(weights).suffix == ".onnx" or not checkable:
        return 0
    failed = _print_parity(weights, checkable, args)["failed"]
    if int8 is not None:
        print("INT8 accuracy is judged by mAP, not by float parity budgets: run edgeq verify "
              f"{weights} {' '.join(str(p) for k, p in result.artifacts.items() if k in ('int8-ort', 'int8-ov-ir'))}")
    return 1 if failed else 0


def cmd_verify(args: argparse.Namespace) -> int:
    from edgeq.data.demo import calib_dir, demo_data_yaml
    from edgeq.data.images import load_sample_images
    from edgeq.verify import format_verify_table, verify

    artifacts = list(args.artifacts)
    if args.reference or (args.weights and Path(args.weights).suffix in (".onnx", ".xml", ".engine")):
        if args.weights:
            artifacts.insert(0, args.weights)  # every positional is an artifact
        args.weights = args.reference  # None: the demo checkpoint
    weights = _model_source(args.weights)
    if args.report:  # fail before the long evaluation, not after it
        from edgeq.report import report_format
        from edgeq.utils.files import check_writable_dir

        report_format(args.report)
        check_writable_dir(Path(args.report).parent if str(Path(args.report).parent) else Path("."))
    images = load_sample_images(args.images or calib_dir(), args.num_images) if args.num_images else []
    report = verify(weights, artifacts, args.data or demo_data_yaml(), max_map_drop=args.max_map_drop,
                    parity_images=images, layers=5 if args.layers else 0, threads=args.threads,
                    trust=args.trust_checkpoint)
    print(f"{report['images']} labelled images ({report['data']}); drops in mAP points (0-100), "
          "parity against the PyTorch float model:")
    print(format_verify_table(report))
    _write_json(args.json, report)
    if args.report:
        from edgeq.report import write_report

        print(f"wrote {write_report(report, args.report)}")
    if not report["passed"]:
        bad = [Path(a["artifact"]).name for a in report["artifacts"] if not a["passed"]]
        print(f"FAILED: {', '.join(bad)} lost more than {args.max_map_drop:g} mAP50-95 points")
        return 1
    return 0


def cmd_parity(args: argparse.Namespace) -> int:
    return 1 if _print_parity(args.weights, args.artifacts, args)["failed"] else 0


def cmd_run(args: argparse.Namespace) -> int:
    from edgeq.runtime.run import run_source

    summary = run_source(
        _model_source(args.model), args.source, save_dir=args.save, conf_thres=args.conf, iou_thres=args.iou,
        threads=args.threads,
    )
    print(f"{summary['images']} images, {summary['detections']} detections"
          + (f"; wrote {summary['saved']} images and {summary['json']}" if args.save else ""))
    return 0


# ----------------------------------------------------------------------------- parser
def _common(p: argparse.ArgumentParser, top: bool = False) -> None:
    # Sub-parsers must not reset a -v given before the command (argparse copies their defaults).
    default = False if top else argparse.SUPPRESS
    p.add_argument("-v", "--verbose", action="store_true", default=default, help="show tracebacks and debug logs")


def _sub(subs, name: str, help_text: str, examples_key: str | None = None) -> argparse.ArgumentParser:
    p = subs.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog=EXAMPLES.get(examples_key or name),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(p)
    return p


def _parity_budget(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-rel-l2", type=float, default=1e-4, help="budget: relative L2 error of the output (default 1e-4)")
    p.add_argument("--min-agreement", type=float, default=0.99,
                   help="budget: detection agreement, mAP50-95 of the artifact's boxes vs PyTorch's (default 0.99)")


def build_parser() -> argparse.ArgumentParser:
    from edgeq.data import demo  # the demo recipe's numbers are the generators' defaults (stdlib-only module)

    parser = argparse.ArgumentParser(
        prog="edgeq",
        description="Fuse, INT8-quantize and export YOLO/MobileNetV3 detectors for ONNX Runtime, "
        "OpenVINO and TensorRT, and prove what it cost.",
        epilog="Run 'edgeq COMMAND --help' for a command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=f"edgeq {__version__}")
    _common(parser, top=True)
    subs = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = _sub(subs, "info", "print a model's layer table, parameter count and GFLOPs")
    p.add_argument("model", nargs="?", help="checkpoint (.pt) or model yaml / bundled config name (default: the demo checkpoint)")
    p.add_argument("--imgsz", type=_positive_int, help="input size for GFLOPs (default: the checkpoint's, else 640)")
    p.add_argument("--nc", type=int, help="override the number of classes of a yaml")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow full pickle loading (runs arbitrary code)")
    p.set_defaults(func=cmd_info)

    p = _sub(subs, "data", "generate datasets")
    data_subs = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    q = _sub(data_subs, "synth", "write the seeded synthetic shapes data set in YOLO format", "data synth")
    q.add_argument("out_dir")
    q.add_argument("--train", type=int, default=demo.DEMO_TRAIN, help=f"training images (default {demo.DEMO_TRAIN})")
    q.add_argument("--val", type=int, default=demo.DEMO_VAL, help=f"validation images (default {demo.DEMO_VAL})")
    q.add_argument("--imgsz", type=_positive_int, default=demo.DEMO_IMGSZ)
    q.add_argument("--seed", type=int, default=demo.DEMO_SEED)
    q.set_defaults(func=cmd_data_synth)
    q = _sub(data_subs, "calib", "write unlabeled synthetic calibration images", "data calib")
    q.add_argument("out_dir")
    q.add_argument("--num", type=int, default=demo.CALIB_IMAGES)
    q.add_argument("--imgsz", type=_positive_int, default=demo.DEMO_IMGSZ)
    q.add_argument("--seed", type=int, default=demo.CALIB_SEED)
    q.set_defaults(func=cmd_data_calib)

    p = _sub(subs, "train", "train a detector from a model yaml on a YOLO-format data set")
    p.add_argument("--cfg", default="yolov5s-mobilenetv3-small", help="model yaml or bundled config name")
    p.add_argument("--data", help="data.yaml of a YOLO-format data set")
    p.add_argument("--imgsz", type=_positive_int, default=320)
    p.add_argument("--epochs", type=int, help="total epochs (default 30; with --resume, extends the run)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--optimizer", default="auto", choices=["auto", "SGD", "AdamW"])
    p.add_argument("--lr0", type=float, help="initial learning rate (default 0.01 SGD, 0.001 AdamW)")
    p.add_argument("--workers", type=int, default=1, help="data loader worker processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/train", help="run folder (last.pt, best.pt, results.csv)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--weights", help="initialize from this checkpoint (fine-tuning)")
    p.add_argument("--close-mosaic", type=int, default=3, help="last N epochs without mosaic (default 3)")
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--val-images", type=int, default=0, help="validate on the first N images only (0: all)")
    p.add_argument("--max-iters", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--json", help="write the final metrics to this JSON file")
    p.set_defaults(func=cmd_train)

    p = _sub(subs, "export", "export a checkpoint to ONNX / OpenVINO IR / TensorRT engine, with parity")
    p.add_argument("weights", nargs="?", help="checkpoint, or an edgeq ONNX to build an engine from (default: demo)")
    p.add_argument("--format", default="onnx,openvino", help="comma list of onnx, openvino, engine (default onnx,openvino)")
    p.add_argument("--imgsz", type=_positive_int, help="input size (default: the checkpoint's)")
    p.add_argument("--batch", type=int, default=1, help="static batch size (default 1)")
    p.add_argument("--dynamic", action="store_true", help="dynamic batch dimension")
    p.add_argument("--half", action="store_true", help="FP16 weights in the IR, FP16 engine")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, 13-20 (default 17)")
    p.add_argument("--no-rewrite", action="store_true", help="keep HardSwish/HardSigmoid instead of the ReLU6 form")
    p.add_argument("--raw", action="store_true", help="export the head's raw maps instead of decoded boxes")
    p.add_argument("--out", help="output folder (default runs/export/<weights name>)")
    p.add_argument("--force", action="store_true", help="overwrite existing artifacts")
    p.add_argument("--data", help="images for calibration (--int8) and the parity check (default: the bundled calib_data/)")
    p.add_argument("--num-images", type=int, default=16, help="images for the parity check (default 16)")
    q = p.add_argument_group("INT8 (one calibration, a Q/DQ flavour per backend: onnx -> int8-ort, openvino -> int8-ov, "
                             "engine -> int8-trt)")
    q.add_argument("--int8", action="store_true", help="also write INT8 artifacts, calibrated on --data")
    q.add_argument("--table", help="reuse this calibration table (edgeq calibrate) instead of calibrating; implies --int8")
    q.add_argument("--method", choices=["minmax", "percentile", "entropy", "mse"],
                   help="calibrator (default: the table's, percentile for a new calibration)")
    q.add_argument("--percentile", type=float, help="percentile for --method percentile (default 99.99)")
    q.add_argument("--calib-images", type=_positive_int, default=256, help="calibration images (default 256)")
    q.add_argument("--fallback", type=int,
                   help="leave float the N activation tensors whose quantization alone disturbs the head the most "
                        "(sensitivity analysis on 4 calibration images; default 8 for every flavour; 0 turns it off)")
    q.add_argument("--fallback-min-nsr", type=float,
                   help="of those N, leave float only tensors whose quantization alone gives the head outputs at least "
                        "this noise-to-signal ratio (default 1e-5, i.e. below 50 dB SNR; 0 takes all N)")
    q.add_argument("--bias-correction", type=_non_negative_int, default=32, metavar="N",
                   help="measure on N calibration images the mean shift rounding adds to each convolution's output "
                        "and take it out of its bias (default 32, about 10 s per flavour at 320; 0 turns it off)")
    q.add_argument("--head-outputs", choices=("float", "per-channel", "per-tensor"),
                   help="the head convolutions' outputs (box and score logits): float (default: the head convolutions "
                        "run in float), per-channel (quantized with one range per channel: all-integer on ONNX Runtime, "
                        "a little faster, a little less accurate), per-tensor (one scale: loses points)")
    q.add_argument("--float-nodes", help="comma list of ONNX node names to keep float (see edgeq verify --layers)")
    q.add_argument("--uint8-weights", action="store_true",
                   help="int8-ort only: store the weights as uint8 (zero point 128, same values) so that ONNX Runtime "
                        "uses kernels that do not saturate on x86 CPUs without VNNI (AVX2 only): less error there, "
                        "1.13-1.22x the latency here; no use on VNNI CPUs")
    p.add_argument("--threads", type=int, help="CPU threads for the backends")
    p.add_argument("--json", help="write the parity figures to this JSON file")
    _parity_budget(p)
    p.add_argument("--trust-checkpoint", action="store_true", help="allow full pickle loading (runs arbitrary code)")
    p.set_defaults(func=cmd_export)

    p = _sub(subs, "verify", "mAP, drop against float, parity and worst layers of exported (INT8) artifacts")
    p.add_argument("weights", nargs="?", help="the float checkpoint (.pt) the artifacts came from (default: demo)")
    p.add_argument("artifacts", nargs="+", help=".onnx / .xml / .engine files to score")
    p.add_argument("--data", help="labelled data: data.yaml or dataset folder (default: the demo validation split)")
    p.add_argument("--reference", help="the float model to compare with when there is no checkpoint argument: "
                                        "a .pt, or a float .onnx/.xml on a device without PyTorch")
    p.add_argument("--max-map-drop", type=float,
                   help="budget in mAP50-95 points (0-100 scale): exit 1 when an artifact loses more")
    p.add_argument("--layers", action="store_true", help="list the 5 layers with the lowest SNR per INT8 ONNX artifact")
    p.add_argument("--report", help="also write a self-contained report page: report.html or report.md")
    p.add_argument("--images", help="images for parity and --layers (default: the bundled calib_data/)")
    p.add_argument("--num-images", type=int, default=16, help="parity images (default 16; 0 skips parity)")
    p.add_argument("--threads", type=int, help="CPU threads for the backends")
    p.add_argument("--json", help="write every figure to this JSON file")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow full pickle loading (runs arbitrary code)")
    p.set_defaults(func=cmd_verify)

    p = _sub(subs, "parity", "compare exported artifacts with the PyTorch model: tensors and detections")
    p.add_argument("weights", help="the reference: a checkpoint (.pt), or a float artifact on a device without torch")
    p.add_argument("artifacts", nargs="+", help=".onnx / .xml / .engine files to check")
    p.add_argument("--data", help="folder of images (default: the bundled calib_data/)")
    p.add_argument("--num-images", type=int, default=16)
    p.add_argument("--threads", type=int, help="CPU threads for the backends")
    p.add_argument("--json", help="write the figures to this JSON file")
    _parity_budget(p)
    p.set_defaults(func=cmd_parity)

    p = _sub(subs, "run", "detect objects in images, a folder or a video with any artifact")
    p.add_argument("model", nargs="?", help=".onnx / .xml / .engine / .pt (default: the demo checkpoint)")
    p.add_argument("--source", required=True, help="image, folder of images, or video file")
    p.add_argument("--save", help="folder for images with boxes drawn and detections.json")
    p.add_argument("--conf", type=float, default=0.25, help="score threshold (default 0.25)")
    p.add_argument("--iou", type=float, default=0.45, help="NMS IoU threshold (default 0.45)")
    p.add_argument("--threads", type=int, help="CPU threads for the backend")
    p.set_defaults(func=cmd_run)

    p = _sub(subs, "calibrate", "collect INT8 calibration statistics into a reusable table (JSON)")
    p.add_argument("weights", nargs="?", help="checkpoint (default: the demo checkpoint)")
    p.add_argument("--data", help="folder of calibration images (default: the bundled calib_data/)")
    p.add_argument("--num-images", type=_positive_int, default=256, help="images to use (default 256)")
    p.add_argument("--method", default="percentile", choices=["minmax", "percentile", "entropy", "mse"],
                   help="default calibrator recorded in the table (exports may choose another)")
    p.add_argument("--imgsz", type=_positive_int, help="input size (default: the checkpoint's)")
    p.add_argument("-o", "--output", help="table path (default: <weights>.calib.json in the current folder)")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow full pickle loading (runs arbitrary code)")
    p.set_defaults(func=cmd_calibrate)

    p = _sub(subs, "val", "mAP50 and mAP50-95 of a checkpoint on a labelled data set")
    p.add_argument("weights", nargs="?", help="checkpoint (default: the demo checkpoint)")
    p.add_argument("--data", help="data.yaml or dataset folder (default: the demo validation split)")
    p.add_argument("--split", default="val")
    p.add_argument("--imgsz", type=_positive_int, help="input size (default: the checkpoint's)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--json", help="write mAP50, mAP50-95 and per-class figures to this JSON file")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow full pickle loading (runs arbitrary code)")
    p.set_defaults(func=cmd_val)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = bool(getattr(args, "verbose", False))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except EdgeqError as exc:
        if verbose:
            raise
        print(f"edgeq {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
