"""Copy a trained checkpoint into the package as the bundled demo model (float16 storage).

    python scripts/bundle_demo.py RUN/best.pt [IMGSZ] [--out PATH]

IMGSZ (default: the checkpoint's) is the size recorded for deployment: every command's default.
--out (default: the package's demo weights, edgeq/assets/demo-yolov5s-mnv3s-shapes.pt) writes
the float16 copy elsewhere instead, e.g. the second checkpoint of scripts/train_second.sh:

    python scripts/bundle_demo.py RUN/best.pt 256 --out bench/assets/yolov5n-shapes.pt
"""

import argparse
from pathlib import Path

from edgeq.data.demo import DEMO_WEIGHTS
from edgeq.models.checkpoint import load_checkpoint, save_checkpoint

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("src", type=Path)
parser.add_argument("imgsz", type=int, nargs="?", default=None)
parser.add_argument("--out", type=Path, default=DEMO_WEIGHTS)
args = parser.parse_args()

src, out = args.src, args.out
loaded = load_checkpoint(src)
extra = dict(loaded.extra)
extra["bundled_from"] = src.name
imgsz = args.imgsz if args.imgsz is not None else loaded.imgsz
out.parent.mkdir(parents=True, exist_ok=True)
save_checkpoint(loaded.model, out, names=loaded.names, imgsz=imgsz, extra=extra, half=True)
print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) from {src}")
