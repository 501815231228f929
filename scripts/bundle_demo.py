"""Copy a trained checkpoint into the package as the bundled demo model (float16 storage).

    python scripts/bundle_demo.py RUN/best.pt
"""

import sys
from pathlib import Path

from edgeq.data.demo import DEMO_WEIGHTS
from edgeq.models.checkpoint import load_checkpoint, save_checkpoint

src = Path(sys.argv[1])
loaded = load_checkpoint(src)
extra = dict(loaded.extra)
extra["bundled_from"] = src.name
save_checkpoint(loaded.model, DEMO_WEIGHTS, names=loaded.names, imgsz=loaded.imgsz, extra=extra, half=True)
print(f"wrote {DEMO_WEIGHTS} ({DEMO_WEIGHTS.stat().st_size / 1e6:.1f} MB) from {src}")
