"""ONNX -> TensorRT engine through the TensorRT 10 Python API, on the device that will run it.

An engine is a plan for one TensorRT version and one GPU: it does not load elsewhere (or loads
and misbehaves), so there is no cross-building. Copy the ONNX to the Jetson / GPU box and build
there; the sidecar (``model.engine.json``, :mod:`edgeq.runtime.engine_sidecar`) records what the
engine was built with so that the runtime reports a mismatch in one sentence instead of a
deserialization error.

This module only talks to TensorRT: parse, configure, hand over the calibration cache, reuse
the timing cache, build, serialize. What to build (flavour checks, profile shapes, INT8 mode,
the trtexec line) is decided beforehand by :mod:`edgeq.export.trt_plan`, without TensorRT.

INT8 comes two ways:

* **explicit** (recommended): the ``int8-trt`` ONNX flavour carries QuantizeLinear /
  DequantizeLinear pairs (symmetric int8, zero point 0) and TensorRT honours them as written;
  the INT8 builder flag lets it pick int8 kernels. No calibrator.
* **implicit** (TensorRT 10 on older JetPack): the float ONNX plus a calibration cache written by
  :mod:`edgeq.export.trt_calib_cache` from edgeq's own calibration table. Calibrators are
  deprecated since TensorRT 10.1 and removed in 11.

tensorrt is imported inside :func:`import_tensorrt`, so importing this module needs no GPU.
"""

from __future__ import annotations

import logging
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from edgeq.errors import EdgeqError
from edgeq.export import trt_plan as plan
from edgeq.runtime import engine_sidecar
from edgeq.utils.files import atomic_write_bytes, file_sha256

log = logging.getLogger("edgeq")

INSTALL_TRT = (
    "TensorRT is not installed: on a Jetson it comes with JetPack (sudo apt install nvidia-jetpack, "
    "and a venv needs --system-site-packages), on x86 run: pip install edgeq[tensorrt]"
)


def import_tensorrt() -> Any:
    """``tensorrt``, or one sentence on how to install it."""
    try:
        import tensorrt as trt
    except ImportError:
        raise EdgeqError(INSTALL_TRT) from None
    return trt


# ---------------------------------------------------------------------------- implicit INT8


def make_cache_calibrator(trt: Any, cache: bytes) -> Any:
    """A calibrator that only hands TensorRT an existing cache (edgeq's calibration table).

    Implicit INT8 for TensorRT 10 on older JetPack: ``IInt8EntropyCalibrator2`` and
    ``config.int8_calibrator`` are deprecated since TensorRT 10.1 and removed in 11, where
    only explicit Q/DQ remains. The class is defined here, not at module level, so that
    importing this module never imports tensorrt.
    """

    class CacheCalibrator(trt.IInt8EntropyCalibrator2):
        """No data: the cache provides every scale, so TensorRT never asks for a batch."""

        def __init__(self, data: bytes):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._cache = data

        def get_batch_size(self) -> int:  # deprecated in 10.0 (explicit batch), still abstract
            return 1

        def get_batch(self, names):  # asked only if TensorRT rejected the cache
            log.error("TensorRT did not accept the calibration cache and asked for calibration data")
            return None

        def read_calibration_cache(self) -> bytes:
            return self._cache

        def write_calibration_cache(self, cache) -> None:  # never overwrite edgeq's table
            return None

    return CacheCalibrator(cache)


def prepare_calibration_cache(cache_path: Path, info: plan.OnnxIO, trt_version: str) -> bytes:
    """The cache bytes to hand TensorRT: checked against this ONNX, under this TensorRT's tag.

    TensorRT silently runs tensors it has no scale for in float and ignores a cache under
    another version's header, so both are settled here, before the build.
    """
    from edgeq.export.trt_calib_cache import (
        cache_mismatch,
        parse_calibration_cache,
        read_cache_text,
        retag_calibration_cache,
    )

    cache_path = Path(cache_path)
    text = read_cache_text(cache_path)
    header, scales = parse_calibration_cache(text, str(cache_path))
    stale = cache_mismatch(scales, info.tensors, info.name)
    if stale:
        raise EdgeqError(
            f"{cache_path.name} does not belong to this ONNX: {stale}",
            note="a stale cache from another export; write it again from this model's calibration table",
        )
    text, changed = retag_calibration_cache(text, trt_version)
    if changed:
        log.info("%s was written as %s; presented to TensorRT %s under its own header "
                 "(edgeq's scales do not depend on the TensorRT version)", cache_path.name, header, trt_version)
    return text.encode("utf-8")


# ---------------------------------------------------------------------------- parse and configure


def parser_errors(parser: Any, onnx_name: str) -> str:
    """Every ONNX parser error as 'node 12 (Conv_34): description'."""
    lines = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        name = err.node_name() if hasattr(err, "node_name") else ""  # node_name(): TensorRT >= 10
        where = (f"node {err.node()}" + (f" ({name})" if name else "")) if err.node() >= 0 else "the graph"
        lines.append(f"{where}: {err.desc()} [{err.code()}]")
    return f"{onnx_name}: TensorRT could not parse " + "; ".join(lines or ["the model (no parser error recorded)"])


def _parse(trt, builder, logger, onnx_path: Path):
    network = builder.create_network(0)  # TensorRT 10: always explicit batch, the flag is ignored
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise EdgeqError(parser_errors(parser, onnx_path.name))
    return network, parser


def _configure(trt, builder, config, opts: plan.BuildOptions, shapes, dynamic: bool, mode: str | None,
               calibrator) -> None:
    """Workspace, precision flags, the profile (needed for any dynamic input) and the calibrator."""
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes(opts))
    if opts.fp16:
        if not getattr(builder, "platform_has_fast_fp16", True):  # deprecated in 10.5, still there
            log.warning("this GPU has no fast FP16: the FP16 engine may be no faster than FP32")
        config.set_flag(trt.BuilderFlag.FP16)
    if mode:
        if not getattr(builder, "platform_has_fast_int8", True):
            log.warning("this GPU has no fast INT8: the INT8 engine may be no faster than FP32")
        config.set_flag(trt.BuilderFlag.INT8)
    profile = None
    if dynamic:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    if calibrator is not None:
        config.int8_calibrator = calibrator  # deprecated in 10.1: implicit INT8 only
        if profile is not None:
            config.set_calibration_profile(profile)


def _load_timing_cache(config, path: Path | None) -> None:
    """Reuse the timing cache file when there is one: a rebuild then skips most tactic timing."""
    if path is None:
        return
    data = Path(path).read_bytes() if Path(path).is_file() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("timing cache %s does not match this TensorRT/GPU; starting a new one", path)


def _save_timing_cache(config, path: Path | None) -> None:
    if path is None:
        return
    cache = config.get_timing_cache()
    if cache is not None:
        atomic_write_bytes(Path(path), bytes(cache.serialize()))


# ---------------------------------------------------------------------------- what the sidecar records


def detect_device() -> dict[str, Any]:
    """GPU name and compute capability, through pycuda or nvidia-smi; "unknown" without them."""
    try:
        import pycuda.driver as cuda

        cuda.init()
        dev = cuda.Device(0)
        major, minor = dev.compute_capability()
        return {"name": dev.name(), "compute_capability": f"{major}.{minor}"}
    except ImportError:
        log.debug("pycuda is not installed (pip install pycuda); asking nvidia-smi")
    except Exception as exc:  # pycuda raises its own LogicError/RuntimeError types
        log.debug("pycuda could not query the GPU: %s", exc)
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout.splitlines()[0]
        name, cap = (s.strip() for s in out.split(",", 1))
        return {"name": name, "compute_capability": cap}
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        log.warning("cannot tell which GPU this is (install pycuda: pip install pycuda); the sidecar says 'unknown'")
        return {"name": "unknown", "compute_capability": None}


def record_build(
    engine_path: Path,
    onnx_path: Path,
    info: plan.OnnxIO,
    opts: plan.BuildOptions,
    trt_version: str,
    *,
    profile: dict[str, tuple[plan.Shape, plan.Shape, plan.Shape]],
    int8: str | None,
    trtexec: str,
    build_seconds: float,
) -> Path:
    """Write ``<engine>.json``: this device, this TensorRT, the options that took effect, the ONNX.

    Split from :func:`build_engine` so that what the builder records, and that the runtime
    reads it back, is tested without TensorRT.
    """
    data = engine_sidecar.sidecar_dict(
        info.meta, trt_version, detect_device(), file_sha256(onnx_path),
        fp16=opts.fp16, workspace_gb=opts.workspace_gb, calibration_cache=opts.calibration_cache,
        profile=profile, int8=int8, onnx_name=onnx_path.name, trtexec=trtexec, build_seconds=build_seconds,
    )
    return engine_sidecar.write_sidecar(engine_path, data)


# ---------------------------------------------------------------------------- the build


def build_engine(onnx_path: str | Path, engine_path: str | Path, opts: plan.BuildOptions) -> Path:
    """Build ``engine_path`` (plain serialized plan, no header) and ``<engine>.json`` beside it.

    Run this on the target device: the engine is tied to this TensorRT version and this GPU.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    info = plan.inspect_onnx(onnx_path)
    plan.check_flavour(onnx_path, info)
    mode = plan.int8_mode(onnx_path, info, opts)
    imgsz = plan.engine_imgsz(onnx_path, info, opts)
    shapes = plan.profile_shapes(info.shape, imgsz, opts, info.name)
    trt = import_tensorrt()
    implicit = mode == "implicit"
    calib_bytes = prepare_calibration_cache(opts.calibration_cache, info, trt.__version__) if implicit else None
    effective = replace(opts, int8=bool(mode), calibration_cache=opts.calibration_cache if implicit else None)
    command = plan.trtexec_command(onnx_path, engine_path, effective, info.name, imgsz, info.shape)
    log.info("building %s on this device (trtexec equivalent: %s)", engine_path.name, command)

    logger = trt.Logger(trt.Logger.VERBOSE if opts.verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = _parse(trt, builder, logger, onnx_path)
    config = builder.create_builder_config()
    calibrator = make_cache_calibrator(trt, calib_bytes) if calib_bytes is not None else None
    _configure(trt, builder, config, opts, shapes, plan.is_dynamic(info.shape), mode, calibrator)
    _load_timing_cache(config, opts.timing_cache)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise EdgeqError(
            f"TensorRT could not build an engine from {onnx_path.name}",
            note="run again with verbose=True (edgeq --verbose) to see TensorRT's log",
        )
    _save_timing_cache(config, opts.timing_cache)
    atomic_write_bytes(engine_path, bytes(serialized))
    record_build(engine_path, onnx_path, info, effective, trt.__version__,
                 profile=shapes, int8=mode, trtexec=command, build_seconds=seconds)
    log.info("wrote %s in %.1f s (TensorRT %s)", engine_path, seconds, trt.__version__)
    return engine_path
