"""What every labelled dataset offers the evaluator and the trainer, written once."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeq.data.images import read_image
from edgeq.errors import EdgeqError


class LabelledImages:
    """Subclasses set ``names``, ``image_paths`` and ``_labels`` (per image ``(K, 5)`` float32
    rows ``cls cx cy w h``, normalized); images are decoded on access, not at load."""

    names: list[str]
    image_paths: list[Path]
    _labels: list[np.ndarray]

    @property
    def nc(self) -> int:
        return len(self.names)

    def __len__(self) -> int:
        return len(self.image_paths)

    def labels(self, i: int) -> np.ndarray:
        """Labels of image ``i`` (a copy)."""
        return self._labels[i].copy()

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, Path]:
        path = self.image_paths[i]
        img = read_image(path)
        if img is None:
            raise EdgeqError(f"Image {path} cannot be decoded (corrupt or not an image).")
        return img, self._labels[i].copy(), path

    def check_images(self) -> list[Path]:
        """Decode every image; return the ones that fail (slow: meant for a one-off check)."""
        return [p for p in self.image_paths if read_image(p) is None]
