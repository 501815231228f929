#!/usr/bin/env bash
# The README's main job on the bundled demo model: what a new user runs first. Each line is a
# command from the guides; tests/test_guides.py keeps them working.
set -euo pipefail
OUT=${OUT:-runs/quickstart}
mkdir -p "$OUT"
edgeq info                                   # the bundled demo checkpoint: layers, params, GFLOPs
edgeq val --json "$OUT/val.json"             # its mAP on the demo validation split (generated on first use)
