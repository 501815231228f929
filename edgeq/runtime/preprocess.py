"""The one image preprocessing used everywhere: calibration, evaluation, validation, inference.

INT8 calibration statistics are only valid for inputs prepared exactly like the ones the
deployed model sees. A different resize interpolation, padding colour or channel order
between calibration and inference silently costs accuracy, so every path in edgeq goes
through :func:`preprocess` / :func:`preprocess_batch` and nothing else.

Resize rule: always ``cv2.INTER_LINEAR`` (shrinking and enlarging alike). One rule on every
path matters more than the small anti-aliasing gain of ``INTER_AREA`` when shrinking, and it
is what YOLOv5's own inference/export path uses. (YOLOv5's ``val.py`` shrinks with
``INTER_AREA``, so its mAP can differ from edgeq's in the third decimal.)

Needs only numpy and OpenCV.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from edgeq.errors import EdgeqError

PAD_COLOR = (114, 114, 114)
INTERPOLATION = cv2.INTER_LINEAR


@dataclass(frozen=True)
class LetterboxInfo:
    """How an image was letterboxed, so boxes can be mapped back to it.

    ``ratio`` is the single scale applied to both axes (input px per original px); ``pad`` is
    the (left, top) border in input pixels; ``orig_shape`` is the original (h, w).
    """

    ratio: float
    pad: tuple[float, float]
    orig_shape: tuple[int, int]


def _as_hw(new_shape: int | tuple[int, int]) -> tuple[int, int]:
    """Normalise ``imgsz`` (an int or (h, w)) and reject nonsense early."""
    if isinstance(new_shape, (int, np.integer)) and not isinstance(new_shape, bool):
        hw = (int(new_shape), int(new_shape))
    elif (
        isinstance(new_shape, (tuple, list))
        and len(new_shape) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in new_shape)
    ):
        hw = (int(new_shape[0]), int(new_shape[1]))
    else:
        raise EdgeqError(f"image size must be an int or (height, width), got {new_shape!r}")
    if hw[0] <= 0 or hw[1] <= 0:
        raise EdgeqError(f"image size must be positive, got {hw}")
    return hw


def _to_bgr(img: np.ndarray) -> np.ndarray:
    """Return a 3-channel uint8 BGR view/copy of ``img``; grayscale and BGRA are converted."""
    if not isinstance(img, np.ndarray):
        raise EdgeqError(f"expected an image as a numpy array, got {type(img).__name__}")
    if img.dtype != np.uint8:
        raise EdgeqError(
            f"expected a uint8 image (as cv2.imread returns), got dtype {img.dtype} with shape {img.shape}"
        )
    if img.ndim not in (2, 3) or img.shape[0] == 0 or img.shape[1] == 0:
        raise EdgeqError(f"expected an image of shape HxW, HxWx1, HxWx3 or HxWx4, got shape {img.shape}")
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    channels = img.shape[2]
    if channels == 3:
        return img
    if channels == 1:
        return cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2BGR)
    if channels == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    raise EdgeqError(f"expected an image of shape HxW, HxWx1, HxWx3 or HxWx4, got shape {img.shape}")


def letterbox(
    img_bgr: np.ndarray,
    new_shape: int | tuple[int, int],
    color: tuple[int, int, int] = PAD_COLOR,
    scaleup: bool = True,
) -> tuple[np.ndarray, LetterboxInfo]:
    """Resize keeping aspect ratio and pad centred to exactly ``new_shape`` (h, w).

    The output is always exactly ``new_shape`` because exported models have static input
    shapes. With ``scaleup=False`` small images are only padded, never enlarged.
    """
    img = _to_bgr(img_bgr)
    out_h, out_w = _as_hw(new_shape)
    h, w = img.shape[:2]

    ratio = min(out_h / h, out_w / w)
    if not scaleup:
        ratio = min(ratio, 1.0)
    new_w = min(out_w, max(1, int(round(w * ratio))))
    new_h = min(out_h, max(1, int(round(h * ratio))))

    if (new_w, new_h) != (w, h):
        img = cv2.resize(img, (new_w, new_h), interpolation=INTERPOLATION)

    pad_w, pad_h = out_w - new_w, out_h - new_h
    left, top = pad_w // 2, pad_h // 2
    right, bottom = pad_w - left, pad_h - top
    if pad_w or pad_h:
        img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=tuple(color))
    elif img is img_bgr:
        img = img.copy()  # never hand back the caller's buffer

    info = LetterboxInfo(ratio=float(ratio), pad=(float(left), float(top)), orig_shape=(int(h), int(w)))
    return img, info


def to_input(img_letterboxed_bgr: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 BGR -> contiguous float32 3xHxW RGB in [0, 1], the layout the models expect."""
    img = img_letterboxed_bgr
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        shape = getattr(img, "shape", None)
        dtype = getattr(img, "dtype", type(img).__name__)
        raise EdgeqError(f"to_input expects an HxWx3 uint8 BGR image, got dtype {dtype} with shape {shape}")
    chw_rgb = img.transpose(2, 0, 1)[::-1]
    out = np.ascontiguousarray(chw_rgb, dtype=np.float32)
    out *= np.float32(1.0 / 255.0)
    return out


def preprocess(img_bgr: np.ndarray, imgsz: int | tuple[int, int]) -> tuple[np.ndarray, LetterboxInfo]:
    """Letterbox one image and convert it to the model's (3, H, W) float32 input."""
    boxed, info = letterbox(img_bgr, imgsz)
    return to_input(boxed), info


def preprocess_batch(
    images: Sequence[np.ndarray], imgsz: int | tuple[int, int]
) -> tuple[np.ndarray, list[LetterboxInfo]]:
    """Preprocess several images into one (N, 3, H, W) float32 batch plus their letterbox infos."""
    if len(images) == 0:
        raise EdgeqError("cannot preprocess an empty batch of images")
    out_h, out_w = _as_hw(imgsz)
    batch = np.empty((len(images), 3, out_h, out_w), dtype=np.float32)
    infos: list[LetterboxInfo] = []
    for i, img in enumerate(images):
        batch[i], info = preprocess(img, (out_h, out_w))
        infos.append(info)
    return batch, infos
