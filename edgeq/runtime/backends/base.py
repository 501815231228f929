"""The runner contract every backend follows (Polygraphy-style).

:class:`Backend` owns the public ``load()`` / ``infer()`` and every check on them, so a wrong
input fails the same way, with the same one-line message, whether it is about to reach ONNX
Runtime, OpenVINO, TensorRT or PyTorch. Backends only implement ``_load_impl`` (fill
``_inputs``, ``_outputs``, ``_meta``) and ``_infer_impl`` (run a checked, contiguous float32
array). Their packages are imported inside ``_load_impl`` so that importing this module, or
any backend module, needs numpy only.

Artifact metadata (names, strides, image size, quantization flavour) travels as string
key/values -- ONNX ``metadata_props``, OpenVINO ``rt_info``, a TensorRT JSON sidecar -- and is
parsed once here by :func:`parse_meta`, so all backends report it identically.
"""

from __future__ import annotations

import importlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

import numpy as np

from edgeq import flavours
from edgeq.errors import EdgeqError

META_PREFIX = "edgeq."
META_KEYS = ("names", "stride", "imgsz", "version", "source_sha256", "flavour", "outputs")
Dim = int | str | None


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: ``shape`` holds ints for static dims, a name or None for dynamic ones."""

    name: str
    shape: tuple[Dim, ...]
    dtype: str

    @property
    def rank(self) -> int:
        return len(self.shape)

    def is_static(self, axis: int) -> bool:
        return isinstance(self.shape[axis], int) and self.shape[axis] >= 0

    def shape_str(self) -> str:
        """``(batch, 3, 320, 320)``: dynamic dims by their name, or ``?`` when unnamed."""
        dims = [str(d) if isinstance(d, int) and d >= 0 else (d if isinstance(d, str) and d else "?")
                for d in self.shape]
        return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


@dataclass
class ModelMeta:
    """What the artifact says about the model it holds; ``extra`` keeps every other key."""

    names: list[str] = field(default_factory=list)
    stride: list[float] = field(default_factory=list)
    imgsz: tuple[int, int] | None = None
    flavour: str = "unknown"
    outputs: str = "decoded"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def made_for(self) -> str | None:
        """The backend an INT8 flavour was quantized for, or None for float/unknown models."""
        return flavours.made_for(self.flavour)


def _json_value(source: str, key: str, text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        raise EdgeqError(f"{source}: metadata {META_PREFIX}{key} is not valid JSON: {text!r}") from None


def parse_meta(props: dict[str, str], source: str) -> ModelMeta:
    """Build :class:`ModelMeta` from ``edgeq.*`` string properties (missing keys get defaults).

    Artifacts from other tools carry no edgeq keys; they still load, and the Detector falls
    back to the input shape and numbered class names.
    """
    values = {k[len(META_PREFIX):]: v for k, v in props.items() if k.startswith(META_PREFIX)}
    parsed = ("names", "stride", "imgsz", "flavour", "outputs")
    meta = ModelMeta(extra={k: v for k, v in values.items() if k not in parsed})
    if "names" in values:
        names = _json_value(source, "names", values["names"])
        if isinstance(names, dict):  # {"0": "person", ...}
            names = [names[k] for k in sorted(names, key=int)]
        if not isinstance(names, list):
            raise EdgeqError(f"{source}: metadata edgeq.names must be a JSON list, got {values['names']!r}")
        meta.names = [str(n) for n in names]
    if "stride" in values:
        stride = _json_value(source, "stride", values["stride"])
        if not isinstance(stride, list) or not all(isinstance(s, (int, float)) for s in stride):
            raise EdgeqError(
                f"{source}: metadata edgeq.stride must be a JSON list of numbers, got {values['stride']!r}"
            )
        meta.stride = [float(s) for s in stride]
    if "imgsz" in values:
        size = _json_value(source, "imgsz", values["imgsz"])
        size = [size, size] if isinstance(size, int) else size
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
            raise EdgeqError(f"{source}: metadata edgeq.imgsz must be a JSON [height, width], got {values['imgsz']!r}")
        meta.imgsz = (size[0], size[1])
    meta.flavour = str(values.get("flavour", meta.flavour))
    meta.outputs = str(values.get("outputs", meta.outputs))
    return meta


def import_backend_package(module: str, backend: str, install: str) -> ModuleType:
    """Import a backend's package, or raise one sentence saying how to install it."""
    try:
        return importlib.import_module(module)
    except (ImportError, OSError) as exc:  # OSError: a wheel present but its shared libraries not
        reason = str(exc).splitlines()[0] if str(exc) else "not found"
        raise EdgeqError(
            f"the {backend} backend needs the Python package {module!r}, which cannot be imported "
            f"({type(exc).__name__}: {reason}); install it with `{install}`"
        ) from None


class Backend(ABC):
    """Base runner: ``Backend(path).load().infer(x) -> [outputs]``, also a context manager.

    ``threads`` caps the CPU threads the backend uses (None: the backend's default), which
    matters when several backends run side by side in a parity check.
    """

    name = "base"

    def __init__(self, path: str | Path, *, threads: int | None = None):
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            raise EdgeqError(f"threads must be a positive integer or None, got {threads!r}")
        self.path = Path(path)
        self.threads = threads
        self._loaded = False
        self._inputs: list[TensorSpec] = []
        self._outputs: list[TensorSpec] = []
        self._meta = ModelMeta()

    # ------------------------------------------------------------------ to override
    @abstractmethod
    def _load_impl(self) -> None:
        """Open the artifact; fill ``_inputs``, ``_outputs`` and ``_meta``."""

    @abstractmethod
    def _infer_impl(self, x: np.ndarray) -> list[np.ndarray]:
        """Run one checked batch."""

    def _close_impl(self) -> None:
        """Release the session/engine; the default drops nothing."""

    def _max_batch(self) -> int | None:
        """Largest batch a dynamic batch dim accepts (TensorRT profiles have one); None: no limit."""
        return None

    # ------------------------------------------------------------------ public API
    def load(self) -> Backend:
        """Load the artifact once (later calls are no-ops); returns self for chaining."""
        if self._loaded:
            return self
        if not self.path.is_file():
            raise EdgeqError(f"model file {self.path} not found")
        self._load_impl()
        if len(self._inputs) != 1:
            names = ", ".join(s.name for s in self._inputs) or "none"
            raise EdgeqError(
                f"{self.path.name} has {len(self._inputs)} inputs ({names}); edgeq runs single-input detectors"
            )
        self._loaded = True
        return self

    @property
    def loaded(self) -> bool:
        return self._loaded

    @property
    def inputs(self) -> list[TensorSpec]:
        self._require_loaded("inputs")
        return list(self._inputs)

    @property
    def outputs(self) -> list[TensorSpec]:
        self._require_loaded("outputs")
        return list(self._outputs)

    @property
    def meta(self) -> ModelMeta:
        self._require_loaded("meta")
        return self._meta

    @property
    def max_batch(self) -> int | None:
        """The batch sizes infer accepts: the static batch, a profile maximum, or None (any)."""
        spec = self.inputs[0]
        return int(spec.shape[0]) if spec.rank and spec.is_static(0) else self._max_batch()

    def infer(self, x: np.ndarray) -> list[np.ndarray]:
        """Run one (N, C, H, W) float32 batch; returns the outputs in :attr:`outputs` order."""
        self._require_loaded("infer")
        self.check_input(x)
        return self._infer_impl(np.ascontiguousarray(x))

    def check_input(self, x: Any) -> None:
        """Dtype, rank and static dims against the model's input, with messages a user can act on."""
        self._require_loaded("check_input")
        spec = self._inputs[0]
        where = f"{self.path.name} expects {spec.name}"
        if not isinstance(x, np.ndarray):
            raise EdgeqError(f"{where} as a numpy array, got {type(x).__name__}")
        if x.dtype != np.dtype(spec.dtype):
            raise EdgeqError(f"{where} as {spec.dtype}, got {x.dtype} (convert with x.astype(np.{spec.dtype}))")
        got = "(" + ", ".join(map(str, x.shape)) + ("," if x.ndim == 1 else "") + ")"
        mismatch = f"{where} of shape {spec.shape_str()}, got {got}"
        if x.ndim != spec.rank:
            raise EdgeqError(mismatch)
        for axis in range(1, spec.rank):
            if spec.is_static(axis) and x.shape[axis] != spec.shape[axis]:
                raise EdgeqError(mismatch)
        if spec.rank and spec.is_static(0) and x.shape[0] != spec.shape[0]:
            raise EdgeqError(
                f"{mismatch}; its batch size is fixed at {spec.shape[0]}: export with --dynamic or --batch N"
            )
        limit = self._max_batch()
        if limit is not None and not spec.is_static(0) and not 1 <= x.shape[0] <= limit:
            raise EdgeqError(f"{mismatch}; it was built for batches of 1 to {limit}: rebuild with a larger --batch")

    def close(self) -> None:
        """Free the backend's resources; the object can be loaded again afterwards."""
        if self._loaded:
            self._close_impl()
        self._loaded = False

    def __enter__(self) -> Backend:
        return self.load()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "loaded" if self._loaded else "not loaded"
        return f"{type(self).__name__}({str(self.path)!r}, {state})"

    def _require_loaded(self, what: str) -> None:
        if not self._loaded:
            raise EdgeqError(f"{self.name} backend for {self.path.name}: call load() before {what}")
