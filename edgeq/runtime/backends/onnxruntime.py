"""ONNX Runtime backend: the reference deployment path and the one the ``int8-ort`` flavour targets.

CPUExecutionProvider by default: parity numbers should not depend on whichever GPU provider
happens to be installed. Graph optimizations are at ALL (what production sessions use), so
parity is measured on the graph that will actually run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.runtime.backends.base import Backend, TensorSpec, import_backend_package, parse_meta

# ONNX Runtime type strings -> numpy dtype names
_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(uint8)": "uint8",
    "tensor(int8)": "int8",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}
Provider = str | tuple[str, dict[str, Any]]


def _dim(d: Any) -> int | str | None:
    return int(d) if isinstance(d, int) and d >= 0 else (d if isinstance(d, str) and d else None)


class OnnxRuntimeBackend(Backend):
    """Runs a ``.onnx`` file with ``onnxruntime.InferenceSession``."""

    name = "onnxruntime"

    def __init__(
        self,
        path: str | Path,
        *,
        threads: int | None = None,
        providers: Sequence[Provider] | None = None,
        spin: bool = True,
    ):
        super().__init__(path, threads=threads)
        self.providers = list(providers) if providers is not None else ["CPUExecutionProvider"]
        # ORT's worker threads busy-wait after a run (lower latency on an idle CPU); off, they
        # leave the cores to whatever runs next (benchmarks interleaving runtimes, shared boards).
        self.spin = spin
        self._session: Any = None

    def _load_impl(self) -> None:
        ort = import_backend_package("onnxruntime", self.name, "pip install onnxruntime (or onnxruntime-gpu)")
        available = ort.get_available_providers()
        wanted = [p if isinstance(p, str) else p[0] for p in self.providers]
        missing = [p for p in wanted if p not in available]
        if missing:
            raise EdgeqError(
                f"onnxruntime provider(s) {', '.join(missing)} are not available in this install; "
                f"available: {', '.join(available)}"
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: ORT's warnings are not actionable for users
        if self.threads is not None:
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
        if not self.spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(str(self.path), sess_options=options, providers=self.providers)
        except Exception as exc:  # noqa: BLE001  (ORT raises its own pybind exception types)
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EdgeqError(f"onnxruntime cannot load {self.path}: {detail}") from None

        self._inputs = [self._spec(i) for i in self._session.get_inputs()]
        self._outputs = [self._spec(o) for o in self._session.get_outputs()]
        props = dict(self._session.get_modelmeta().custom_metadata_map)
        self._meta = parse_meta(props, str(self.path))

    @staticmethod
    def _spec(arg: Any) -> TensorSpec:
        return TensorSpec(arg.name, tuple(_dim(d) for d in arg.shape), _ORT_TYPES.get(arg.type, arg.type))

    def _infer_impl(self, x: np.ndarray) -> list[np.ndarray]:
        try:
            results = self._session.run(None, {self._inputs[0].name: x})
        except Exception as exc:  # noqa: BLE001
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EdgeqError(f"onnxruntime failed to run {self.path.name} on shape {x.shape}: {detail}") from None
        return [np.asarray(r) for r in results]

    def _close_impl(self) -> None:
        self._session = None

    @property
    def active_providers(self) -> list[str]:
        """The providers the session really uses (ORT silently drops ones that fail to start)."""
        self._require_loaded("active_providers")
        return list(self._session.get_providers())
