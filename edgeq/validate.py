"""mAP of a PyTorch checkpoint through the same preprocessing and NMS as every backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeq.errors import EdgeqError


def evaluate_model(
    source: str | Path,
    dataset,
    *,
    imgsz: int | None = None,
    batch_size: int = 16,
    trust: bool = False,
    progress: bool = True,
) -> dict:
    """Load a checkpoint and compute mAP50 / mAP50-95 on a labelled dataset."""
    from edgeq.models.checkpoint import load_model
    from edgeq.runtime.evaluate import evaluate

    import torch

    loaded = load_model(source, trust=trust)
    size = loaded.input_size(imgsz)
    if len(dataset.names) != loaded.model.nc:
        raise EdgeqError(
            f"{source} predicts {loaded.model.nc} classes but the data set has {len(dataset.names)}",
        )
    model = loaded.model.eval()

    @torch.no_grad()
    def predict(x: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(x)).numpy()

    result = evaluate(predict, dataset, size, list(dataset.names), batch_size=batch_size, progress=progress)
    result["imgsz"] = size
    result["weights"] = str(source)
    return result
