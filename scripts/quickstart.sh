#!/usr/bin/env bash
# The README's main job on the bundled demo model and calibration data: what a new user runs
# first. tests/test_guides.py runs this script, so every line here keeps working.
set -euo pipefail
OUT=${OUT:-runs/quickstart}
mkdir -p "$OUT"
edgeq info                                            # the demo checkpoint: layers, params, GFLOPs
edgeq val --json "$OUT/val.json"                      # mAP on the demo validation split (generated on first use)
edgeq export --format onnx,openvino --imgsz 320 --out "$OUT/export" --force --json "$OUT/parity.json"
edgeq run "$OUT/export/demo-yolov5s-mnv3s-shapes.xml" --source calib_data/000000.jpg --save "$OUT/detections"
echo "quickstart done: see $OUT/"
