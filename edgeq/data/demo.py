"""The bundled demo: where its checkpoint, calibration images and validation split live.

The validation split is not committed: it is regenerated from its seed (byte-identical) into a
cache folder the first time a command needs it.
"""

from __future__ import annotations

import os
from pathlib import Path

from edgeq.errors import EdgeqError

PACKAGE_DIR = Path(__file__).resolve().parents[1]
DEMO_WEIGHTS = PACKAGE_DIR / "assets" / "demo-yolov5s-mnv3s-shapes.pt"
CALIB_DIR = PACKAGE_DIR.parent / "calib_data"

# The recipe of the demo data set (docs/DEMO_MODEL.md). Changing any of these changes the data.
DEMO_SEED = 0
DEMO_IMGSZ = 320
DEMO_TRAIN = 4000
DEMO_VAL = 500
CALIB_SEED = 777
CALIB_IMAGES = 256


def cache_dir() -> Path:
    root = os.environ.get("EDGEQ_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "edgeq")
    return Path(root)


def demo_weights() -> Path:
    if not DEMO_WEIGHTS.is_file():
        raise EdgeqError(
            f"the bundled demo checkpoint {DEMO_WEIGHTS} is missing",
            note="pass a checkpoint explicitly, or retrain it with the recipe in docs/DEMO_MODEL.md",
        )
    return DEMO_WEIGHTS


def demo_data_yaml() -> Path:
    """data.yaml of the demo validation split, generating it on first use."""
    from edgeq.data.synthetic import generate_dataset
    from edgeq.data.synthetic_render import GENERATOR_VERSION

    out = cache_dir() / f"demo-shapes-g{GENERATOR_VERSION}-s{DEMO_SEED}-{DEMO_IMGSZ}-n{DEMO_VAL}"
    data_yaml = out / "data.yaml"
    if not data_yaml.is_file():
        generate_dataset(out, n_train=0, n_val=DEMO_VAL, imgsz=DEMO_IMGSZ, seed=DEMO_SEED)
    return data_yaml


def calib_dir() -> Path:
    if not CALIB_DIR.is_dir():
        raise EdgeqError(
            f"the bundled calibration folder {CALIB_DIR} is missing",
            note="point edgeq at a folder of in-domain images (export/calibrate: --data, verify: --images)",
        )
    return CALIB_DIR
