"""Copy a trained checkpoint into the package as the bundled demo model (float16 storage).

    python scripts/bundle_demo.py RUN/best.pt [IMGSZ]

IMGSZ (default: the checkpoint's) is the size recorded for deployment: every command's default.
"""

import sys
from pathlib import Path

from edgeq.data.demo import DEMO_WEIGHTS
from edgeq.models.checkpoint import load_checkpoint, save_checkpoint

src = Path(sys.argv[1])
loaded = load_checkpoint(src)
extra = dict(loaded.extra)
extra["bundled_from"] = src.name
imgsz = int(sys.argv[2]) if len(sys.argv) > 2 else loaded.imgsz
save_checkpoint(loaded.model, DEMO_WEIGHTS, names=loaded.names, imgsz=imgsz, extra=extra, half=True)
print(f"wrote {DEMO_WEIGHTS} ({DEMO_WEIGHTS.stat().st_size / 1e6:.1f} MB) from {src}")
