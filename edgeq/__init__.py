"""edgeq: make trained PyTorch detectors deployable on the edge.

The top-level package imports nothing heavy: ``import edgeq`` must stay fast so that
``edgeq --help`` answers without torch, OpenVINO or TensorRT being loaded.
"""

__version__ = "0.1.0"

from edgeq.errors import EdgeqError  # noqa: E402  (tiny, no dependencies)

__all__ = ["EdgeqError", "__version__"]
