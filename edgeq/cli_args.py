"""The ``edgeq`` command line: every subcommand's arguments, defaults shown, and examples.

Only argparse here, so ``edgeq --help`` and ``edgeq <cmd> --help`` answer without importing
torch, ONNX, OpenVINO or TensorRT. Each subcommand names its handler in :mod:`edgeq.cli`.
"""

from __future__ import annotations

import argparse

from edgeq import __version__

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
  edgeq export best.pt --int8 --data images/ --fallback 0 --finetune   # all-integer, fine-tuned (minutes)
  edgeq export best.pt --int8 --data images/ --max-map-drop 0.5        # fastest graph per backend within 0.5 points
  edgeq export best.pt --int8 --data images/ --max-map-drop 0.5 --budget-data val.yaml  # measured on labels
  edgeq export best.pt --int8 --data images/ --ov-precision default    # int8-ov's float ops in bf16 where the CPU has it
  edgeq export best.pt --table best.calib.json --method entropy   # re-export INT8 without images""",
    "verify": """examples:
  edgeq verify best.pt out/best.int8-ort.onnx out/best.int8-ov.xml --data data.yaml --max-map-drop 1.0
  edgeq verify best.pt out/best.int8-ort.onnx --layers --json verify.json
  edgeq verify best.pt out/best.int8-ov.xml --min-speedup 1.2   # fail unless 1.2x faster than float (bf16/f32)
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


FINETUNE_STEPS = 200  # edgeq.export.finetune.FinetuneOptions.steps (not imported: --help stays fast)


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
    p.set_defaults(handler="info")

    p = _sub(subs, "data", "generate datasets")
    data_subs = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    q = _sub(data_subs, "synth", "write the seeded synthetic shapes data set in YOLO format", "data synth")
    q.add_argument("out_dir")
    q.add_argument("--train", type=int, default=demo.DEMO_TRAIN, help=f"training images (default {demo.DEMO_TRAIN})")
    q.add_argument("--val", type=int, default=demo.DEMO_VAL, help=f"validation images (default {demo.DEMO_VAL})")
    q.add_argument("--imgsz", type=_positive_int, default=demo.DEMO_IMGSZ)
    q.add_argument("--seed", type=int, default=demo.DEMO_SEED)
    q.set_defaults(handler="data_synth")
    q = _sub(data_subs, "calib", "write unlabeled synthetic calibration images", "data calib")
    q.add_argument("out_dir")
    q.add_argument("--num", type=int, default=demo.CALIB_IMAGES)
    q.add_argument("--imgsz", type=_positive_int, default=demo.DEMO_IMGSZ)
    q.add_argument("--seed", type=int, default=demo.CALIB_SEED)
    q.set_defaults(handler="data_calib")

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
    p.set_defaults(handler="train")

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
                        "(sensitivity analysis on 4 calibration images), instead of the budget search "
                        "(--max-map-drop); without either, 8 where the folder is too small for the search")
    q.add_argument("--max-map-drop", type=float, metavar="POINTS",
                   help="the accuracy budget: per flavour, the fastest graph whose mAP50-95 drop against float is at "
                        "most POINTS, searched from the all-integer graph by leaving tensors float in sensitivity order "
                        "and trying each speed-for-accuracy choice (head outputs, bias correction, OpenVINO precision); "
                        "measured on --budget-data, else estimated by agreement with the float model on the last "
                        "images of the calibration folder (default 0.8, estimated, where the folder has at least 40 "
                        "images). A fixed --fallback N turns it off")
    q.add_argument("--budget-data", metavar="DATA",
                   help="labelled images for --max-map-drop (data.yaml or data set folder; its val split), held out "
                        "from calibration and, for an honest check, from the set you verify on")
    q.add_argument("--budget-images", type=_positive_int, metavar="N",
                   help="held-out images the budget search scores each candidate on (default 200 labelled, else 64 "
                        "calibration images)")
    q.add_argument("--fallback-min-nsr", type=float,
                   help="of those N, leave float only tensors whose quantization alone gives the head outputs at least "
                        "this noise-to-signal ratio (default 1e-5, i.e. below 50 dB SNR; 0 takes all N)")
    q.add_argument("--bias-correction", type=_non_negative_int, default=32, metavar="N",
                   help="measure on N calibration images the mean shift rounding adds to each convolution's output "
                        "and take it out of its bias (default 32, about 10 s per flavour at 320; 0 turns it off)")
    q.add_argument("--finetune", type=_non_negative_int, nargs="?", const=FINETUNE_STEPS, metavar="STEPS",
                   help=f"train each flavour's own INT8 graph to reproduce the float model on the calibration images "
                        f"(distillation, no labels; weights and activation scales): STEPS steps of 8 images per "
                        f"trained graph (default {FINETUNE_STEPS}); about 10 minutes for the demo on 2 cores; 0: off, also when a "
                        "--table recorded a fine-tune")
    q.add_argument("--head-outputs", choices=("float", "per-channel", "per-tensor"),
                   help="the head convolutions' outputs (box and score logits): float (default: the head convolutions "
                        "run in float), per-channel (quantized with one range per channel: all-integer on ONNX Runtime, "
                        "a little faster, a little less accurate), per-tensor (one scale: loses points)")
    q.add_argument("--ov-precision", choices=("f32", "default", "bf16", "f16"),
                   help="int8-ov: the OpenVINO precision of the ops left float, recorded in the IR so that edgeq "
                        "verify, run and the Detector all run it so: f32 (the default without a budget: the most "
                        "accurate), default (OpenVINO's own choice: bf16 on CPUs that have it, faster, ~0.1 point less "
                        "on the demo); with --max-map-drop both are candidates unless this pins one")
    q.add_argument("--float-nodes", help="comma list of ONNX node names to keep float (see edgeq verify --layers)")
    q.add_argument("--uint8-weights", action="store_true",
                   help="int8-ort only: store the weights as uint8 (zero point 128, same values) so that ONNX Runtime "
                        "uses kernels that do not saturate on x86 CPUs without VNNI (AVX2 only): less error there, "
                        "1.13-1.22x the latency here; no use on VNNI CPUs")
    p.add_argument("--threads", type=int, help="CPU threads for the backends")
    p.add_argument("--json", help="write the parity figures to this JSON file")
    _parity_budget(p)
    p.add_argument("--trust-checkpoint", action="store_true", help="allow full pickle loading (runs arbitrary code)")
    p.set_defaults(handler="export")

    p = _sub(subs, "verify", "mAP, drop against float, parity and worst layers of exported (INT8) artifacts")
    p.add_argument("weights", nargs="?", help="the float checkpoint (.pt) the artifacts came from (default: demo)")
    p.add_argument("artifacts", nargs="+", help=".onnx / .xml / .engine files to score")
    p.add_argument("--data", help="labelled data: data.yaml or dataset folder (default: the demo validation split)")
    p.add_argument("--reference", help="the float model to compare with when there is no checkpoint argument: "
                                        "a .pt, or a float .onnx/.xml on a device without PyTorch")
    p.add_argument("--max-map-drop", type=float,
                   help="budget in mAP50-95 points (0-100 scale): exit 1 when an artifact loses more")
    p.add_argument("--layers", action="store_true", help="list the 5 layers with the lowest SNR per INT8 ONNX artifact")
    p.add_argument("--min-speedup", type=float, metavar="S",
                   help="fail (exit 1) when an INT8 artifact is not at least S times faster than the float model on the "
                        "same backend at its default precision (OpenVINO: bf16 on CPUs that have it), e.g. 1.2")
    p.add_argument("--latency-runs", type=_non_negative_int, default=50, metavar="N",
                   help="timed runs per model for the latency table, interleaved after 10 warm-up runs (default 50; "
                        "0 skips the latency)")
    p.add_argument("--report", help="also write a self-contained report page: report.html or report.md")
    p.add_argument("--images", help="images for parity and --layers (default: the bundled calib_data/)")
    p.add_argument("--num-images", type=int, default=16, help="parity images (default 16; 0 skips parity)")
    p.add_argument("--threads", type=int, help="CPU threads for the backends")
    p.add_argument("--json", help="write every figure to this JSON file")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow full pickle loading (runs arbitrary code)")
    p.set_defaults(handler="verify")

    p = _sub(subs, "parity", "compare exported artifacts with the PyTorch model: tensors and detections")
    p.add_argument("weights", help="the reference: a checkpoint (.pt), or a float artifact on a device without torch")
    p.add_argument("artifacts", nargs="+", help=".onnx / .xml / .engine files to check")
    p.add_argument("--data", help="folder of images (default: the bundled calib_data/)")
    p.add_argument("--num-images", type=int, default=16)
    p.add_argument("--threads", type=int, help="CPU threads for the backends")
    p.add_argument("--json", help="write the figures to this JSON file")
    _parity_budget(p)
    p.set_defaults(handler="parity")

    p = _sub(subs, "run", "detect objects in images, a folder or a video with any artifact")
    p.add_argument("model", nargs="?", help=".onnx / .xml / .engine / .pt (default: the demo checkpoint)")
    p.add_argument("--source", required=True, help="image, folder of images, or video file")
    p.add_argument("--save", help="folder for images with boxes drawn and detections.json")
    p.add_argument("--conf", type=float, default=0.25, help="score threshold (default 0.25)")
    p.add_argument("--iou", type=float, default=0.45, help="NMS IoU threshold (default 0.45)")
    p.add_argument("--threads", type=int, help="CPU threads for the backend")
    p.set_defaults(handler="run")

    p = _sub(subs, "calibrate", "collect INT8 calibration statistics into a reusable table (JSON)")
    p.add_argument("weights", nargs="?", help="checkpoint (default: the demo checkpoint)")
    p.add_argument("--data", help="folder of calibration images (default: the bundled calib_data/)")
    p.add_argument("--num-images", type=_positive_int, default=256, help="images to use (default 256)")
    p.add_argument("--method", default="percentile", choices=["minmax", "percentile", "entropy", "mse"],
                   help="default calibrator recorded in the table (exports may choose another)")
    p.add_argument("--imgsz", type=_positive_int, help="input size (default: the checkpoint's)")
    p.add_argument("-o", "--output", help="table path (default: <weights>.calib.json in the current folder)")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow full pickle loading (runs arbitrary code)")
    p.set_defaults(handler="calibrate")

    p = _sub(subs, "val", "mAP50 and mAP50-95 of a checkpoint on a labelled data set")
    p.add_argument("weights", nargs="?", help="checkpoint (default: the demo checkpoint)")
    p.add_argument("--data", help="data.yaml or dataset folder (default: the demo validation split)")
    p.add_argument("--split", default="val")
    p.add_argument("--imgsz", type=_positive_int, help="input size (default: the checkpoint's)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--json", help="write mAP50, mAP50-95 and per-class figures to this JSON file")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow full pickle loading (runs arbitrary code)")
    p.set_defaults(handler="val")
    return parser
