"""TensorRT 10 backend: deserializes a ``.engine``/``.plan`` and runs it with pycuda buffers.

An engine is compiled for one TensorRT version and one GPU model; loading it elsewhere fails
inside TensorRT with an opaque message, or worse, runs with degraded kernels. Before
deserializing, the backend reads the engine's JSON sidecar through
:mod:`edgeq.runtime.engine_sidecar` (the module the builder writes it with) and refuses a
mismatch up front with what to do about it; the sidecar also gives the model's metadata.

Tensor I/O uses the name-based TensorRT 10 API (``num_io_tensors``, ``get_tensor_name``,
``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``); the CUDA work runs in the
device's primary context, which is the one TensorRT's runtime-API calls use too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.runtime import engine_sidecar
from edgeq.runtime.backends.base import Backend, TensorSpec, import_backend_package

_INSTALL_TRT = "pip install tensorrt pycuda (TensorRT 10 needs an NVIDIA GPU with a recent driver)"


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
        sidecar = engine_sidecar.read_sidecar(self.path)
        try:
            cuda.init()
            gpu = cuda.Device(self.device)
        except cuda.Error as exc:
            raise EdgeqError(f"no usable CUDA device {self.device} for {self.path.name}: {exc}") from None
        engine_sidecar.check_engine_compatibility(
            sidecar, trt_version=trt.__version__, device_name=gpu.name(),
            compute_capability=tuple(gpu.compute_capability()), engine=self.path,
        )
        self._meta = engine_sidecar.model_meta(sidecar, str(self.path))
        self._inputs, self._outputs = [], []
        self._ctx = gpu.retain_primary_context()
        self._ctx.push()
        try:
            self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))  # must outlive the engine
            self._engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self._engine is None:
                raise EdgeqError(
                    f"TensorRT {trt.__version__} cannot deserialize {self.path.name}; {engine_sidecar.REBUILD}"
                )
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
