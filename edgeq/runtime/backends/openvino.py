"""OpenVINO backend (CPU): runs an IR (``.xml`` + ``.bin``) or an ``.onnx`` file directly.

The precision of the ops that run in float is chosen on purpose, never left to chance: on CPUs
with AMX/AVX512-BF16 OpenVINO picks bf16 on its own, and a float model would then "fail" parity
for reasons that have nothing to do with the export. With ``precision=None`` the backend takes
what the artifact records (``edgeq.ov_precision``, written by ``edgeq export`` for INT8 IRs, so
that what ``edgeq verify`` measured is what the runtime runs), else f32. ``"bf16"``/``"f16"``
ask for the fast path; ``"default"`` sets no hint and takes the plugin's own choice (bf16 on
CPUs that have it): the float model a user gets by default. :attr:`inference_precision` reports
what the plugin actually chose (CPUs without the instructions fall back to f32; a warning says so
when a precision was asked for).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.graph import OV_PRECISION_META
from edgeq.runtime.backends.base import META_PREFIX, Backend, TensorSpec, import_backend_package, parse_meta

PRECISIONS = ("f32", "bf16", "f16", "default")
PRECISION_META = OV_PRECISION_META.removeprefix(META_PREFIX)  # the key as ModelMeta.extra holds it
# IRs written by edgeq keep metadata under rt_info["edgeq"]; an ONNX read by OpenVINO exposes
# its metadata_props under rt_info["framework"].
_RT_SECTIONS = ("edgeq", "framework")


class OpenVINOBackend(Backend):
    """Compiles the model for the ``CPU`` device with a latency hint and an explicit precision."""

    name = "openvino"

    def __init__(self, path: str | Path, *, threads: int | None = None, precision: str | None = None):
        super().__init__(path, threads=threads)
        precision = None if precision is None else _checked(str(precision).lower(), "precision=")
        self.requested = precision
        self.precision = precision or "f32"  # settled in _load_impl, once the metadata is read
        self.inference_precision: str | None = None
        self._compiled: Any = None
        self._request: Any = None

    def _load_impl(self) -> None:
        ov = import_backend_package("openvino", self.name, "pip install openvino")
        suffix = self.path.suffix.lower()
        if suffix == ".xml" and not self.path.with_suffix(".bin").is_file():
            raise EdgeqError(f"{self.path} needs its weights file {self.path.with_suffix('.bin').name} beside it")
        if suffix not in (".xml", ".onnx"):
            raise EdgeqError(f"the OpenVINO backend reads .xml (IR) or .onnx files, not {self.path.name}")
        core = ov.Core()
        try:
            model = core.read_model(str(self.path))
        except RuntimeError as exc:
            raise EdgeqError(f"OpenVINO cannot read {self.path}: {_last_line(exc)}") from None

        self._meta = parse_meta(self._rt_props(model), str(self.path))
        if self.requested is None and PRECISION_META in self._meta.extra:
            self.precision = _checked(str(self._meta.extra[PRECISION_META]).lower(),
                                      f"{self.path.name}: metadata edgeq.{PRECISION_META}")
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if self.precision != "default":
            config["INFERENCE_PRECISION_HINT"] = self.precision
        if self.threads is not None:
            config["INFERENCE_NUM_THREADS"] = self.threads
        try:
            self._compiled = core.compile_model(model, "CPU", config)
        except RuntimeError as exc:
            raise EdgeqError(f"OpenVINO cannot compile {self.path.name} for CPU: {_last_line(exc)}") from None
        self._request = self._compiled.create_infer_request()
        self._inputs = [self._spec(p) for p in self._compiled.inputs]
        self._outputs = [self._spec(p) for p in self._compiled.outputs]

        used = self._compiled.get_property("INFERENCE_PRECISION_HINT")
        self.inference_precision = used.get_type_name() if hasattr(used, "get_type_name") else str(used)
        if self.precision != "default" and self.inference_precision != self.precision:
            warnings.warn(
                f"OpenVINO runs {self.path.name} in {self.inference_precision}, not the requested {self.precision}: "
                "this CPU lacks the instructions for it",
                stacklevel=3,
            )

    @staticmethod
    def _rt_props(model: Any) -> dict[str, str]:
        """Every ``edgeq.*`` value in rt_info (the ``edgeq`` section first), as strings.

        ``get_rt_info()`` is a map of sections; a section is a dict of ``OVAny`` values, each
        read with ``.astype(str)`` (the same as ``get_rt_info([section, key]).astype(str)``).
        """
        info = model.get_rt_info()
        props: dict[str, str] = {}
        for section in _RT_SECTIONS:
            if section not in info:
                continue
            values = info[section]
            values = values.astype(dict) if hasattr(values, "astype") else values
            for key, value in dict(values).items():
                if str(key).startswith(META_PREFIX) and str(key) not in props:
                    props[str(key)] = value.astype(str) if hasattr(value, "astype") else str(value)
        return props

    @staticmethod
    def _spec(port: Any) -> TensorSpec:
        try:
            name = port.get_any_name()
        except RuntimeError:  # an unnamed tensor
            name = "?"
        shape = tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape())
        return TensorSpec(name, shape, np.dtype(port.get_element_type().to_dtype()).name)

    def _infer_impl(self, x: np.ndarray) -> list[np.ndarray]:
        try:
            results = self._request.infer({0: x})
        except RuntimeError as exc:
            raise EdgeqError(f"OpenVINO failed to run {self.path.name} on shape {x.shape}: {_last_line(exc)}") from None
        return [np.array(results[port]) for port in self._compiled.outputs]

    def _close_impl(self) -> None:
        self._request = None
        self._compiled = None


def _checked(precision: str, what: str) -> str:
    if precision not in PRECISIONS:
        raise EdgeqError(f"{what} OpenVINO precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def _last_line(exc: BaseException) -> str:
    """OpenVINO messages are multi-line C++ traces; the last non-empty line says what went wrong."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
