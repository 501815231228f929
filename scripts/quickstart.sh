#!/usr/bin/env bash
# The README's main job on the bundled demo model and calibration data: what a new user runs
# first. tests/test_guides.py runs this script, so every line here keeps working.
set -euo pipefail
OUT=${OUT:-runs/quickstart}
mkdir -p "$OUT"
edgeq info                                            # the demo checkpoint: layers, params, GFLOPs
edgeq val --json "$OUT/val.json"                      # mAP on the demo validation split (generated on first use)
# float ONNX + IR (parity-checked) and, from one calibration on calib_data/, INT8 for each backend:
# by default the fastest graph per backend whose drop, estimated without labels, is at most 0.8 points
edgeq export --int8 --format onnx,openvino --imgsz 320 --out "$OUT/export" --force --json "$OUT/parity.json"
# what INT8 cost, measured on the labelled validation split: exit 1 over a 1-point budget
edgeq verify "$OUT/export/demo-yolov5s-mnv3s-shapes.int8-ort.onnx" "$OUT/export/demo-yolov5s-mnv3s-shapes.int8-ov.xml" \
  --max-map-drop 1.0 --layers --json "$OUT/verify.json"
edgeq run "$OUT/export/demo-yolov5s-mnv3s-shapes.int8-ov.xml" --source calib_data/000000.jpg --save "$OUT/detections"
echo "quickstart done: see $OUT/"
