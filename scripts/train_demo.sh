#!/usr/bin/env bash
# Retrain the bundled demo model (recipe in docs/DEMO_MODEL.md). Resumable: run it again after
# an interruption and it continues from the last finished epoch of the phase it was in.
# Phase 1 trains at 256 px (about twice as fast per image on a 2-core CPU), phase 2 fine-tunes
# at the deployment size, 320 px, from phase 1's best weights.
#   WORK=/path/to/scratch bash scripts/train_demo.sh
# If the scratch folder was lost, INIT=edgeq/assets/demo-yolov5s-mnv3s-shapes.pt starts phase 1
# from the bundled weights instead of from scratch (a fine-tune, not the recipe).
set -euo pipefail
WORK=${WORK:-$HOME/edgeq-work}
EPOCHS1=${EPOCHS1:-24}
EPOCHS2=${EPOCHS2:-8}
DATA=$WORK/shapes-s0-320
RUN1=$WORK/runs/demo-p1-256
RUN2=$WORK/runs/demo-p2-320
if [ ! -f "$DATA/data.yaml" ]; then
  edgeq data synth "$DATA" --train 4000 --val 500 --imgsz 320 --seed 0
fi
phase() {  # phase RUN EPOCHS ARGS...: resume if started, skip if finished
  local run=$1 epochs=$2; shift 2
  if [ -f "$run/done" ]; then return 0; fi
  if [ -f "$run/last.pt" ]; then
    edgeq train --out "$run" --resume --epochs "$epochs"
  else
    edgeq train --cfg yolov5s-mobilenetv3-small --data "$DATA/data.yaml" --epochs "$epochs" \
      --batch 32 --optimizer AdamW --seed 0 --workers 1 --out "$run" "$@"
  fi
  touch "$run/done"
}
phase "$RUN1" "$EPOCHS1" --imgsz 256 --lr0 0.001 --close-mosaic 0 ${INIT:+--weights "$INIT"}
phase "$RUN2" "$EPOCHS2" --imgsz 320 --lr0 0.0003 --close-mosaic 3 --warmup-epochs 0 --weights "$RUN1/best.pt"
echo "demo model: $RUN2/best.pt"
