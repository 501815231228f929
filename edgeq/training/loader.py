"""Torch Dataset + collate for YOLOv5-style training on a YoloDataset.

It lives in ``edgeq.training``, not ``edgeq.data``, because it feeds the model through the
runtime's preprocessing: training may import the runtime, the data readers must not.
Validation-mode samples go through the very ``letterbox`` that inference uses, so mAP
measured during training matches what the exported model sees. Augmented samples draw all
randomness from ``default_rng([seed, epoch, index])``: reproducible with any number of
DataLoader workers, different every epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from edgeq.data.augment import (
    mosaic4,
    random_affine,
    random_flip_lr,
    random_hsv,
    xywhn_to_xyxy,
    xyxy_to_xywhn,
)
from edgeq.runtime.preprocess import letterbox, to_input

__all__ = ["DEFAULT_HYP", "TrainDataset", "collate"]

logger = logging.getLogger("edgeq")

DEFAULT_HYP: dict[str, float] = {
    "hsv_h": 0.015,
    "hsv_s": 0.7,
    "hsv_v": 0.4,
    "degrees": 0.0,
    "translate": 0.1,
    "scale": 0.5,
    "shear": 0.0,
    "fliplr": 0.5,
}


class _Source(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, object]: ...
    def labels(self, i: int) -> np.ndarray: ...


class TrainDataset(Dataset):
    """``(image CHW RGB float [0, 1], targets (K, 6) [0, cls, cx, cy, w, h])`` samples.

    ``dataset`` is a YoloDataset (or a CocoDataset). Column 0 of the targets is filled with
    the image's index in the batch by :func:`collate`. ``hyp`` overrides ``DEFAULT_HYP``.
    Call ``set_epoch`` before each epoch so augmentations change between epochs (with
    ``persistent_workers=True`` the workers keep their own copy and never see the new epoch).
    """

    def __init__(
        self,
        dataset: _Source,
        imgsz: int,
        augment: bool,
        mosaic_p: float = 1.0,
        seed: int = 0,
        cache_images: bool = True,
        hyp: Mapping[str, float] | None = None,
    ):
        if len(dataset) == 0:
            raise ValueError("TrainDataset needs a non-empty dataset")
        unknown = set(hyp or {}) - set(DEFAULT_HYP)
        if unknown:
            raise ValueError(f"unknown augmentation keys: {sorted(unknown)}")
        self.dataset = dataset
        self.imgsz = int(imgsz)
        self.augment = augment
        self.mosaic_p = float(mosaic_p)
        self.seed = int(seed)
        self.epoch = 0
        self.hyp = {**DEFAULT_HYP, **(hyp or {})}
        self._labels = [np.asarray(dataset.labels(i), np.float32).reshape(-1, 5) for i in range(len(dataset))]
        self._cache: list[np.ndarray] | None = None
        if cache_images:
            # Originals, not resized copies: validation must letterbox exactly like inference.
            self._cache = [dataset[i][0] for i in range(len(dataset))]
            mb = sum(im.nbytes for im in self._cache) / 2**20
            logger.info("cached %d training images (%.0f MiB)", len(self._cache), mb)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream for ``epoch`` (call before iterating the loader)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self._labels)

    def _image(self, i: int) -> np.ndarray:
        return self._cache[i] if self._cache is not None else self.dataset[i][0]

    def _pixel_labels(self, i: int, img: np.ndarray) -> np.ndarray:
        h, w = img.shape[:2]
        return xywhn_to_xyxy(self._labels[i], w, h)

    def _letterboxed(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        img0 = self._image(i)
        labels = self._pixel_labels(i, img0)
        img, info = letterbox(img0, self.imgsz)
        labels[:, 1:] *= info.ratio
        labels[:, [1, 3]] += info.pad[0]
        labels[:, [2, 4]] += info.pad[1]
        return img, labels

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        hyp = self.hyp
        if not self.augment:
            img, labels = self._letterboxed(i)
        else:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            if rng.random() < self.mosaic_p:
                picks = [i, *(int(j) for j in rng.integers(0, len(self), 3))]
                samples = [(self._image(j), self._pixel_labels(j, self._image(j))) for j in picks]
                img, labels = mosaic4(samples, self.imgsz, rng, degrees=hyp["degrees"],
                                      translate=hyp["translate"], scale=hyp["scale"], shear=hyp["shear"])
            else:
                img, labels = self._letterboxed(i)
                img, labels = random_affine(img, labels, rng, degrees=hyp["degrees"], translate=hyp["translate"],
                                            scale=hyp["scale"], shear=hyp["shear"])
            img = random_hsv(img, rng, hyp["hsv_h"], hyp["hsv_s"], hyp["hsv_v"])
            img, labels = random_flip_lr(img, labels, rng, hyp["fliplr"])

        h, w = img.shape[:2]
        boxes = xyxy_to_xywhn(labels, w, h)
        boxes = boxes[(boxes[:, 3] > 0) & (boxes[:, 4] > 0)]
        targets = torch.zeros((len(boxes), 6), dtype=torch.float32)
        targets[:, 1:] = torch.from_numpy(boxes)
        return torch.from_numpy(to_input(img)), targets  # same layout/scaling as inference


def collate(batch: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack images; concatenate targets with column 0 set to the image's index in the batch."""
    images = torch.stack([b[0] for b in batch], 0)
    targets = []
    for k, (_, t) in enumerate(batch):
        t = t.clone()
        t[:, 0] = k
        targets.append(t)
    return images, torch.cat(targets, 0) if targets else torch.zeros((0, 6))
