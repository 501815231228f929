"""PyTorch backend: runs an edgeq or YOLOv5 checkpoint (``.pt``) through edgeq's own model.

It is the float reference that exported artifacts are compared against, run through the same
runner contract as the deployment backends. This is the only file under ``edgeq/runtime``
allowed to import torch (and ``edgeq.models``), and only inside ``_load_impl``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.runtime.backends.base import Backend, ModelMeta, TensorSpec, import_backend_package


class TorchBackend(Backend):
    """Float32 eval-mode model on the CPU; any batch and any image size divisible by the max stride."""

    name = "torch"

    def __init__(self, path: str | Path, *, threads: int | None = None, trust: bool = False, loaded: Any = None):
        super().__init__(path, threads=threads)
        self.trust = trust  # forwarded to load_checkpoint: full pickle only when asked for
        self._preloaded = loaded  # a LoadedCheckpoint already in memory (export's own): not read again
        self._torch: Any = None
        self._model: Any = None
        self._max_stride = 32

    def _load_impl(self) -> None:
        torch = self._torch = import_backend_package("torch", self.name, "pip install torch (the CPU build is enough)")
        from edgeq.models.checkpoint import load_checkpoint

        if self.threads is not None:
            torch.set_num_threads(self.threads)  # process-wide: torch has no per-model thread pool
        loaded = self._preloaded if self._preloaded is not None else load_checkpoint(self.path, trust=self.trust)
        self._preloaded = None
        self._model = loaded.model.float().eval()
        self._max_stride = int(max(loaded.stride)) if loaded.stride else 32
        no = len(loaded.names) + 5
        self._inputs = [TensorSpec("images", ("batch", 3, "height", "width"), "float32")]
        self._outputs = [TensorSpec("output0", ("batch", "anchors", no), "float32")]
        self._meta = ModelMeta(
            names=list(loaded.names),
            stride=list(loaded.stride),
            imgsz=(loaded.imgsz, loaded.imgsz) if loaded.imgsz else None,
            flavour="float",
            outputs="decoded",
            extra={"source": loaded.source, "source_sha256": loaded.sha256, **loaded.extra},
        )

    def _infer_impl(self, x: np.ndarray) -> list[np.ndarray]:
        h, w = x.shape[2:]
        if h % self._max_stride or w % self._max_stride:
            raise EdgeqError(
                f"{self.path.name} needs an input height and width divisible by its stride {self._max_stride}, "
                f"got {h}x{w}"
            )
        torch = self._torch
        with torch.inference_mode():
            y = self._model(torch.from_numpy(x))
        if isinstance(y, (tuple, list)):
            y = y[0]
        return [y.detach().cpu().numpy().astype(np.float32, copy=False)]

    def _close_impl(self) -> None:
        self._model = None
