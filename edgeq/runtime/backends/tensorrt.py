"""TensorRT 10 backend: deserializes a ``.engine``/``.plan`` and runs it with pycuda buffers.

An engine is compiled for one TensorRT version and one GPU model; loading it elsewhere fails
inside TensorRT with an opaque message, or worse, runs with degraded kernels. The exporter
writes a JSON sidecar (``model.engine.json``) recording both, and :func:`check_engine_compatibility`
(pure, testable without a GPU) refuses a mismatch up front with what to do about it.

Tensor I/O uses the name-based TensorRT 10 API (``num_io_tensors``, ``get_tensor_name``,
``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``); the CUDA work runs in the
device's primary context, which is the one TensorRT's runtime-API calls use too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.runtime.backends.base import META_KEYS, META_PREFIX, Backend, TensorSpec, import_backend_package, parse_meta

_INSTALL_TRT = "pip install tensorrt pycuda (TensorRT 10 needs an NVIDIA GPU with a recent driver)"
_REBUILD = "TensorRT engines are not portable across TensorRT versions or GPU models: rebuild the engine on this device"


def sidecar_path(engine: str | Path) -> Path | None:
    """``model.engine.json`` (preferred) or ``model.json`` beside the engine, if either exists."""
    engine = Path(engine)
    for candidate in (engine.with_name(engine.name + ".json"), engine.with_suffix(".json")):
        if candidate.is_file():
            return candidate
    return None


def read_sidecar(engine: str | Path) -> dict[str, Any]:
    """The sidecar's JSON object ({} when there is none: engines built by other tools)."""
    path = sidecar_path(engine)
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EdgeqError(f"cannot read the engine sidecar {path}: {exc}") from None
    if not isinstance(data, dict):
        raise EdgeqError(f"the engine sidecar {path} must hold a JSON object")
    return data


def sidecar_props(sidecar: dict[str, Any]) -> dict[str, str]:
    """Sidecar values as ``edgeq.*`` strings (keys with or without the prefix, values JSON or strings)."""
    props = {}
    for key, value in sidecar.items():
        short = key[len(META_PREFIX):] if key.startswith(META_PREFIX) else key
        if short in META_KEYS:
            props[META_PREFIX + short] = value if isinstance(value, str) else json.dumps(value)
    return props


def _version(v: str) -> tuple[str, ...]:
    """Major.minor.patch: build numbers after them do not change the engine format."""
    return tuple(str(v).strip().split("."))[:3]


def _known(value: Any) -> str | None:
    """A recorded value, or None when it is missing or "unknown"."""
    text = str(value).strip() if value is not None else ""
    return None if text.lower() in ("", "unknown", "none") else text


def _capability(value: Any) -> tuple[int, int] | None:
    if isinstance(value, str) and "." in value:
        value = value.split(".")
    if isinstance(value, (list, tuple)) and len(value) == 2:
        try:
            return int(value[0]), int(value[1])
        except (TypeError, ValueError):
            return None
    return None


def check_engine_compatibility(
    sidecar: dict[str, Any],
    *,
    trt_version: str,
    device_name: str,
    compute_capability: tuple[int, int] | None,
    engine: str | Path,
) -> None:
    """Raise EdgeqError when the engine was built with another TensorRT version or on another GPU.

    ``sidecar["device"]`` is ``{"name": ..., "compute_capability": [major, minor] or "8.6"}``
    (a bare name string is accepted). Keys the sidecar lacks, or records as "unknown" (the
    exporter could not query the GPU), are not checked.
    """
    built: list[str] = []
    here: list[str] = []
    want_version = _known(sidecar.get("tensorrt_version"))
    if want_version and _version(want_version) != _version(trt_version):
        built.append(f"TensorRT {want_version}")
        here.append(f"TensorRT {trt_version}")
    device = sidecar.get("device")
    device = {"name": device} if isinstance(device, str) else device if isinstance(device, dict) else {}
    want_name = _known(device.get("name"))
    want_cc = _capability(device.get("compute_capability"))
    name_differs = bool(want_name) and str(want_name).strip() != str(device_name).strip()
    cc_differs = want_cc is not None and compute_capability is not None and want_cc != tuple(compute_capability)
    if name_differs or cc_differs:
        cc = f" (compute capability {want_cc[0]}.{want_cc[1]})" if want_cc else ""
        here_cc = f" (compute capability {compute_capability[0]}.{compute_capability[1]})" if compute_capability else ""
        built.append(f"{want_name or 'another GPU'}{cc}")
        here.append(f"{device_name}{here_cc}")
    if built:
        raise EdgeqError(
            f"{Path(engine).name} was built for {' on '.join(built)} "
            f"but this machine has {' on '.join(here)}; {_REBUILD}{_rebuild_command(sidecar)}"
        )


def _rebuild_command(sidecar: dict[str, Any]) -> str:
    """' with `edgeq export m.onnx --format engine` or `trtexec ...`' when the sidecar names its ONNX."""
    onnx = sidecar.get("onnx")
    onnx_file = onnx.get("file") if isinstance(onnx, dict) else None
    if not onnx_file:
        return ""
    trtexec = f" or `{sidecar['trtexec']}`" if sidecar.get("trtexec") else ""
    return f" with `edgeq export {onnx_file} --format engine`{trtexec}"


class TensorRTBackend(Backend):
    """Runs a serialized TensorRT 10 engine on CUDA device ``device`` (default 0)."""

    name = "tensorrt"

    def __init__(self, path: str | Path, *, threads: int | None = None, device: int = 0):
        super().__init__(path, threads=threads)  # threads: accepted for a uniform API; GPU work ignores it
        self.device = device
        self._trt: Any = None
        self._cuda: Any = None
        self._ctx: Any = None
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: Any = None
        self._buffers: dict[str, tuple[Any, Any]] = {}  # name -> (page-locked host array, device allocation)
        self._bound: tuple[int, ...] | None = None
        self._profile_max: int | None = None

    def _load_impl(self) -> None:
        trt = self._trt = import_backend_package("tensorrt", self.name, _INSTALL_TRT)
        cuda = self._cuda = import_backend_package("pycuda.driver", self.name, _INSTALL_TRT)
        sidecar = read_sidecar(self.path)
        try:
            cuda.init()
            gpu = cuda.Device(self.device)
        except cuda.Error as exc:
            raise EdgeqError(f"no usable CUDA device {self.device} for {self.path.name}: {exc}") from None
        check_engine_compatibility(
            sidecar, trt_version=trt.__version__, device_name=gpu.name(),
            compute_capability=tuple(gpu.compute_capability()), engine=self.path,
        )
        self._meta = parse_meta(sidecar_props(sidecar), str(self.path))
        self._meta.extra.update({k: v for k, v in sidecar.items() if k in ("tensorrt_version", "device")})
        self._inputs, self._outputs = [], []
        self._ctx = gpu.retain_primary_context()
        self._ctx.push()
        try:
            self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))  # must outlive the engine
            self._engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self._engine is None:
                raise EdgeqError(f"TensorRT {trt.__version__} cannot deserialize {self.path.name}; {_REBUILD}")
            self._context = self._engine.create_execution_context()
            self._stream = cuda.Stream()
            for i in range(self._engine.num_io_tensors):
                name = self._engine.get_tensor_name(i)
                shape = tuple(int(d) if d >= 0 else None for d in self._engine.get_tensor_shape(name))
                spec = TensorSpec(name, shape, np.dtype(trt.nptype(self._engine.get_tensor_dtype(name))).name)
                is_input = self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
                (self._inputs if is_input else self._outputs).append(spec)
            if self._inputs and self._inputs[0].shape and self._inputs[0].shape[0] is None:
                # (min, opt, max) shapes of optimization profile 0
                self._profile_max = int(self._engine.get_tensor_profile_shape(self._inputs[0].name, 0)[2][0])
        except BaseException:
            self._context = self._engine = self._stream = self._runtime = None
            self._ctx.pop()
            self._ctx.detach()
            self._ctx = None
            raise
        self._ctx.pop()

    def _max_batch(self) -> int | None:
        return self._profile_max

    def _bind(self, shape: tuple[int, ...]) -> None:
        """(Re)allocate page-locked host and device buffers when the input shape changes."""
        if self._bound == shape:
            return
        self._free_buffers()
        cuda, name = self._cuda, self._inputs[0].name
        if not self._context.set_input_shape(name, shape):
            raise EdgeqError(f"TensorRT rejected input shape {shape} for {name} of {self.path.name}")
        for spec in [self._inputs[0], *self._outputs]:
            dims = tuple(self._context.get_tensor_shape(spec.name))
            host = cuda.pagelocked_empty(dims, dtype=np.dtype(spec.dtype))
            device = cuda.mem_alloc(max(host.nbytes, 1))
            self._context.set_tensor_address(spec.name, int(device))
            self._buffers[spec.name] = (host, device)
        self._bound = shape

    def _infer_impl(self, x: np.ndarray) -> list[np.ndarray]:
        cuda = self._cuda
        self._ctx.push()
        try:
            self._bind(tuple(x.shape))
            host_in, device_in = self._buffers[self._inputs[0].name]
            np.copyto(host_in, x)
            cuda.memcpy_htod_async(device_in, host_in, self._stream)
            if not self._context.execute_async_v3(self._stream.handle):
                raise EdgeqError(f"TensorRT failed to run {self.path.name} on shape {x.shape}")
            for spec in self._outputs:
                host, device = self._buffers[spec.name]
                cuda.memcpy_dtoh_async(host, device, self._stream)
            self._stream.synchronize()
            return [np.array(self._buffers[spec.name][0]) for spec in self._outputs]
        finally:
            self._ctx.pop()

    def _free_buffers(self) -> None:
        for _, device in self._buffers.values():
            device.free()
        self._buffers.clear()
        self._bound = None

    def _close_impl(self) -> None:
        if self._ctx is None:
            return
        self._ctx.push()
        try:
            self._free_buffers()
            self._context = self._engine = self._stream = self._runtime = None
        finally:
            self._ctx.pop()
            self._ctx.detach()
            self._ctx = None
