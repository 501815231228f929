#!/usr/bin/env bash
# Train the second, briefly trained checkpoint: a YOLOv5n (edgeq/models/cfg/yolov5n.yaml; nc 8
# is taken from the data set's names) on the synthetic shapes data, one phase at 256 px. It
# exists to show that the INT8 tooling is not tuned to the demo checkpoint (a different
# architecture: plain Conv/C3/SPPF with SiLU, no h-swish or SE). Recipe and figures in
# docs/DEMO_MODEL.md, "A second checkpoint". Resumable: run it again after an interruption and
# it continues from the last finished epoch.
#   WORK=/path/to/scratch bash scripts/train_second.sh
# then bundle the best weights (float16):
#   python scripts/bundle_demo.py $WORK/runs/yolov5n-256/best.pt 256 --out bench/assets/yolov5n-shapes.pt
set -euo pipefail
WORK=${WORK:-$HOME/edgeq-work}
EPOCHS=${EPOCHS:-10}
DATA=$WORK/shapes-s0-256-2k
RUN=$WORK/runs/yolov5n-256
if [ ! -f "$DATA/data.yaml" ]; then
  edgeq data synth "$DATA" --train 2000 --val 500 --imgsz 256 --seed 0
fi
if [ ! -f "$RUN/done" ]; then
  if [ -f "$RUN/last.pt" ]; then
    edgeq train --out "$RUN" --resume --epochs "$EPOCHS"
  else
    edgeq train --cfg yolov5n --data "$DATA/data.yaml" --imgsz 256 \
      --epochs "$EPOCHS" --batch 32 --optimizer AdamW --lr0 0.001 --seed 0 --workers 1 \
      --close-mosaic 3 --out "$RUN"
  fi
  touch "$RUN/done"
fi
echo "second model: $RUN/best.pt"
