"""Pick and load the right runner for an artifact: ``load_backend("model.onnx")``.

Each backend lives in its own module and is imported only when chosen, so running an ONNX
model never imports OpenVINO, TensorRT or torch.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgeq import flavours
from edgeq.errors import EdgeqError
from edgeq.runtime.backends.base import Backend, ModelMeta, TensorSpec

# backend name -> (module, class, suffixes it reads)
BACKENDS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "onnxruntime": ("edgeq.runtime.backends.onnxruntime", "OnnxRuntimeBackend", (".onnx",)),
    "openvino": ("edgeq.runtime.backends.openvino", "OpenVINOBackend", (".xml", ".onnx")),
    "tensorrt": ("edgeq.runtime.backends.tensorrt", "TensorRTBackend", (".engine", ".plan")),
    "torch": ("edgeq.runtime.backends.torch", "TorchBackend", (".pt", ".pth")),
}
# the default backend for each suffix
SUFFIXES = {
    ".onnx": "onnxruntime", ".xml": "openvino", ".engine": "tensorrt", ".plan": "tensorrt",
    ".pt": "torch", ".pth": "torch",
}


class FlavourWarning(UserWarning):
    """An INT8 artifact quantized for one backend is being run on another."""


def _export_target(backend: str) -> str:
    """How the re-export advice names a backend: ``openvino (int8-ov)``, or the bare name (torch)."""
    flavour = flavours.for_backend(backend)
    return f"{backend} ({flavour.name})" if flavour else backend


def backend_class(name: str) -> type[Backend]:
    """The runner class for a backend name (imports only that backend's module)."""
    if name not in BACKENDS:
        raise EdgeqError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    module, cls, _ = BACKENDS[name]
    return getattr(importlib.import_module(module), cls)


def _choose(path: Path, backend: str | None) -> str:
    suffix = path.suffix.lower()
    if backend is None:
        if suffix not in SUFFIXES:
            supported = ", ".join(SUFFIXES)
            raise EdgeqError(
                f"cannot tell which backend runs {path.name}: unknown suffix {suffix or '(none)'}; "
                f"supported: {supported}"
            )
        return SUFFIXES[suffix]
    if backend not in BACKENDS:
        raise EdgeqError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    readable = BACKENDS[backend][2]
    if suffix not in readable:
        raise EdgeqError(f"the {backend} backend reads {', '.join(readable)} files, not {path.name}")
    return backend


def check_flavour(backend: Backend) -> None:
    """Warn (do not refuse) when an INT8 artifact made for one backend runs on another.

    The quantization recipes differ per backend (TensorRT wants symmetric per-tensor Q/DQ,
    ORT and OpenVINO have their own patterns), so the model runs, but slower or less accurate
    than the artifact made for this backend.
    """
    made_for = backend.meta.made_for
    if made_for is not None and made_for != backend.name:
        warnings.warn(
            f"{backend.path.name} is an INT8 model quantized for {made_for} (flavour {backend.meta.flavour}) "
            f"but is running on {backend.name}; expect lower accuracy or speed, and re-export it for "
            f"{_export_target(backend.name)} to deploy on {backend.name}",
            FlavourWarning,
            stacklevel=3,
        )


def load_backend(
    path: str | Path,
    *,
    backend: str | None = None,
    threads: int | None = None,
    precision: str | None = None,
    providers: Sequence[Any] | None = None,
    spin: bool | None = None,
) -> Backend:
    """Load ``path`` with the backend its suffix implies (or ``backend=``) and return it loaded.

    ``.onnx`` -> onnxruntime (``backend="openvino"`` runs it with OpenVINO), ``.xml`` -> openvino,
    ``.engine``/``.plan`` -> tensorrt, ``.pt``/``.pth`` -> torch. ``precision`` is OpenVINO's
    inference precision, ``providers`` ONNX Runtime's execution providers, ``spin=False`` stops
    ONNX Runtime's threads busy-waiting between runs.
    """
    path = Path(path)
    name = _choose(path, backend)
    if not path.exists():
        raise EdgeqError(f"model file {path} not found")
    if path.is_dir():
        raise EdgeqError(f"{path} is a directory, not a model file")
    if precision is not None and name != "openvino":
        raise EdgeqError(
            f"precision= is an OpenVINO option; the {name} backend runs {path.name} at the precision it was built with"
        )
    if providers is not None and name != "onnxruntime":
        raise EdgeqError(f"providers= is an ONNX Runtime option, not one of the {name} backend")
    options: dict[str, Any] = {"threads": threads}
    if name == "openvino":
        options["precision"] = precision
    if name == "onnxruntime" and providers is not None:
        options["providers"] = providers
    if spin is not None:
        if name != "onnxruntime":
            raise EdgeqError(f"spin= is an ONNX Runtime option, not one of the {name} backend")
        options["spin"] = spin
    runner = backend_class(name)(path, **options).load()
    check_flavour(runner)
    return runner


__all__ = [
    "BACKENDS",
    "Backend",
    "FlavourWarning",
    "ModelMeta",
    "SUFFIXES",
    "TensorSpec",
    "backend_class",
    "check_flavour",
    "load_backend",
]
