"""ONNX -> TensorRT engine, built on the device that will run it.

An engine is a plan for one TensorRT version and one GPU: it does not load elsewhere (or loads
and misbehaves), so there is no cross-building. Copy the ONNX to the Jetson / GPU box and build
there; a JSON sidecar (``model.engine.json``) records what the engine was built with so that a
mismatch is reported in one sentence instead of a deserialization error.

INT8 comes two ways:

* **explicit** (recommended): the ``int8-trt`` ONNX flavour carries QuantizeLinear /
  DequantizeLinear pairs (symmetric int8, zero point 0) and TensorRT honours them as written;
  the INT8 builder flag lets it pick int8 kernels. No calibrator.
* **implicit** (TensorRT 10 on older JetPack): the float ONNX plus a calibration cache written by
  :mod:`edgeq.export.trt_calib_cache` from edgeq's own calibration table. Calibrators are
  deprecated since TensorRT 10.1 and removed in 11.

Nothing here imports tensorrt at module level: pure helpers (profiles, the trtexec line, the
sidecar) run and are tested anywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
import subprocess
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgeq.errors import EdgeqError
from edgeq.utils.files import atomic_write_bytes, atomic_write_text

log = logging.getLogger("edgeq")

Shape = tuple[int, ...]
FLAVOURS = ("float", "int8-trt", "int8-ort", "int8-ov")
OTHER_BACKEND_INT8 = {"int8-ort": "ONNX Runtime", "int8-ov": "OpenVINO"}
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
INSTALL_TRT = (
    "TensorRT is not installed: on a Jetson it comes with JetPack (sudo apt install nvidia-jetpack, "
    "and a venv needs --system-site-packages), on x86 run: pip install edgeq[tensorrt]"
)


@dataclass
class BuildOptions:
    """What to build. Batch bounds matter only for an ONNX with a dynamic batch dimension."""

    fp16: bool = False
    int8: bool = False
    workspace_gb: float = 2.0
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 1
    timing_cache: Path | None = None
    calibration_cache: Path | None = None
    verbose: bool = False
    imgsz: tuple[int, int] | None = None  # only for an ONNX whose H, W are dynamic and unrecorded


@dataclass
class OnnxIO:
    """What the builder needs to know about an ONNX before TensorRT sees it."""

    name: str
    shape: Shape  # -1 for dynamic dims
    meta: dict[str, str]
    qdq_nodes: int
    tensors: set[str]  # every tensor name (graph inputs + node outputs): for cache staleness
    zero_point_problems: list[str]


# ---------------------------------------------------------------------------- reading the ONNX


def inspect_onnx(onnx_path: str | Path) -> OnnxIO:
    """Input, metadata and Q/DQ facts of an ONNX, with the ``onnx`` package only."""
    import onnx

    path = Path(onnx_path)
    if not path.is_file():
        raise EdgeqError(f"{path} does not exist")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends
        raise EdgeqError(f"{path} is not a readable ONNX model ({exc})") from None
    graph = model.graph
    weights = {init.name for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in weights]
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs)
        raise EdgeqError(f"{path.name}: expected one image input, found {len(inputs)} ({names})")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in dims)
    tensors = {inputs[0].name} | {out for node in graph.node for out in node.output if out}
    return OnnxIO(
        name=inputs[0].name,
        shape=shape,
        meta={p.key: p.value for p in model.metadata_props},
        qdq_nodes=sum(node.op_type in QDQ_OPS for node in graph.node),
        tensors=tensors,
        zero_point_problems=_zero_point_problems(graph),
    )


def read_onnx_io(onnx_path: str | Path) -> tuple[str, Shape, dict[str, str]]:
    """``(input name, shape with -1 for dynamic dims, metadata)``; refuses other backends' INT8."""
    info = inspect_onnx(onnx_path)
    check_flavour(Path(onnx_path), info)
    return info.name, info.shape, info.meta


def check_flavour(path: Path, info: OnnxIO) -> None:
    """TensorRT needs the ``int8-trt`` Q/DQ flavour: symmetric int8, zero point 0."""
    flavour = info.meta.get("edgeq.flavour")
    if flavour is not None and flavour not in FLAVOURS:
        raise EdgeqError(f"{path.name}: unknown edgeq.flavour {flavour!r}", note=f"known: {', '.join(FLAVOURS)}")
    if flavour in OTHER_BACKEND_INT8:
        raise EdgeqError(
            f"{path.name} is the {OTHER_BACKEND_INT8[flavour]} INT8 flavour ({flavour}); TensorRT needs the "
            "int8-trt flavour (symmetric int8 Q/DQ, zero point 0)",
            note="build from the model's *.int8-trt.onnx (explicit INT8) or from the float ONNX",
        )
    if flavour == "int8-trt" and info.qdq_nodes == 0:
        raise EdgeqError(
            f"{path.name} says it is int8-trt but holds no QuantizeLinear/DequantizeLinear nodes; re-export it"
        )
    if info.zero_point_problems:
        raise EdgeqError(
            f"{path.name}: TensorRT needs symmetric int8 Q/DQ with zero point 0, but "
            + "; ".join(info.zero_point_problems[:3]),
            note="build from the model's *.int8-trt.onnx",
        )


def _zero_point_problems(graph) -> list[str]:
    """Q/DQ zero points that are not int8 zeros (an asymmetric or uint8 export)."""
    from onnx import TensorProto, numpy_helper

    consts = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = node.attribute[0].t
    problems = []
    for node in graph.node:
        if node.op_type not in QDQ_OPS or len(node.input) < 3 or not node.input[2]:
            continue
        zp = consts.get(node.input[2])
        if zp is None:
            continue
        label = node.name or node.output[0]
        if zp.data_type != TensorProto.INT8:
            dtype = TensorProto.DataType.Name(zp.data_type).lower()
            problems.append(f"{node.op_type} {label} has a {dtype} zero point")
        elif numpy_helper.to_array(zp).any():
            problems.append(f"{node.op_type} {label} has a non-zero zero point")
    return problems


# ---------------------------------------------------------------------------- pure decisions


def profile_shapes(
    input_shape: Shape, imgsz: tuple[int, int], opts: BuildOptions, input_name: str = "images"
) -> dict[str, tuple[Shape, Shape, Shape]]:
    """``{input_name: (min, opt, max)}`` for the optimization profile and trtexec.

    A dynamic batch (-1) takes the batch bounds from ``opts``; a static one must be the batch
    asked for, since the engine can run nothing else.
    """
    if len(input_shape) != 4:
        raise EdgeqError(f"input {input_name} has shape {list(input_shape)}; expected (N, 3, H, W)")
    _check_batch_range(opts)
    n, c, h, w = input_shape
    if any(v <= 0 for v in imgsz):
        raise EdgeqError(f"imgsz must be positive, got {imgsz}")
    if (h > 0 and h != imgsz[0]) or (w > 0 and w != imgsz[1]):
        raise EdgeqError(f"imgsz {imgsz[0]}x{imgsz[1]} conflicts with the static size {h}x{w} of input {input_name}")
    chw = (c if c > 0 else 3, imgsz[0], imgsz[1])
    if n > 0:
        _check_static_batch(n, opts, input_name)
        return {input_name: ((n, *chw),) * 3}
    return {input_name: tuple((b, *chw) for b in (opts.min_batch, opts.opt_batch, opts.max_batch))}


def _check_batch_range(opts: BuildOptions) -> None:
    if opts.min_batch < 1:
        raise EdgeqError(f"min_batch must be >= 1, got {opts.min_batch}")
    if not opts.min_batch <= opts.opt_batch <= opts.max_batch:
        raise EdgeqError(
            "the batch range needs min_batch <= opt_batch <= max_batch, got "
            f"min_batch={opts.min_batch}, opt_batch={opts.opt_batch}, max_batch={opts.max_batch}"
        )


def _check_static_batch(n: int, opts: BuildOptions, input_name: str) -> None:
    """A static batch n can only be built as n: opt_batch and max_batch must both be n."""
    for arg in ("opt_batch", "max_batch"):
        if getattr(opts, arg) != n:
            raise EdgeqError(
                f"{arg}={getattr(opts, arg)} conflicts with the static batch {n} of input {input_name}",
                note=f"build with batch {n}, or re-export the ONNX with a dynamic batch",
            )


def is_dynamic(shape: Shape) -> bool:
    return any(d < 0 for d in shape)


def workspace_bytes(opts: BuildOptions) -> int:
    if not opts.workspace_gb > 0:
        raise EdgeqError(f"workspace_gb must be > 0, got {opts.workspace_gb}")
    return int(opts.workspace_gb * (1 << 30))


def _dims(shape: Shape) -> str:
    return "x".join(str(d) for d in shape)


def trtexec_command(
    onnx_path: str | Path,
    engine_path: str | Path,
    opts: BuildOptions,
    input_name: str = "images",
    imgsz: tuple[int, int] = (640, 640),
    input_shape: Shape | None = None,
) -> str:
    """The trtexec line (TensorRT 10 syntax) that builds the same engine.

    ``--int8`` serves both INT8 ways: with Q/DQ in the ONNX TensorRT takes the scales from the
    graph (no calibrator; the flag is still needed for a weakly typed network), without them
    ``--calib`` gives the cache. ``--stronglyTyped`` is the TensorRT 11 way and forbids
    ``--int8``/``--fp16``, so the layers outside Q/DQ would run in FP32: not used here.
    ``input_shape=None`` means a dynamic batch when the batch bounds differ.
    """
    if input_shape is None:
        n = -1 if opts.min_batch != opts.max_batch else opts.opt_batch
        input_shape = (n, 3, *imgsz)
    parts = ["trtexec", f"--onnx={shlex.quote(str(onnx_path))}", f"--saveEngine={shlex.quote(str(engine_path))}"]
    if is_dynamic(input_shape):
        lo, opt, hi = profile_shapes(input_shape, imgsz, opts, input_name)[input_name]
        parts += [f"--{k}Shapes={input_name}:{_dims(v)}" for k, v in (("min", lo), ("opt", opt), ("max", hi))]
    if opts.fp16:
        parts.append("--fp16")
    if opts.int8 or opts.calibration_cache:
        parts.append("--int8")
    if opts.calibration_cache:
        parts.append(f"--calib={shlex.quote(str(opts.calibration_cache))}")
    parts.append(f"--memPoolSize=workspace:{max(1, round(workspace_bytes(opts) / (1 << 20)))}M")
    if opts.timing_cache:
        parts.append(f"--timingCacheFile={shlex.quote(str(opts.timing_cache))}")
    if opts.verbose:
        parts.append("--verbose")
    parts.append("--skipInference")
    return " ".join(parts)


def int8_mode(path: Path, info: OnnxIO, opts: BuildOptions) -> str | None:
    """``"explicit"`` (Q/DQ in the graph), ``"implicit"`` (calibration cache) or None (float)."""
    if info.qdq_nodes:
        if opts.calibration_cache:
            log.warning("%s has Q/DQ nodes: their scales are used, %s is ignored", path.name, opts.calibration_cache)
        return "explicit"
    if opts.calibration_cache:
        return "implicit"
    if opts.int8:
        raise EdgeqError(
            f"{path.name} is a float ONNX (no Q/DQ nodes): INT8 needs the int8-trt export or a calibration cache",
            note="build from the model's *.int8-trt.onnx (recommended), or pass calib.cache for implicit INT8",
        )
    return None


def engine_imgsz(path: Path, info: OnnxIO, opts: BuildOptions) -> tuple[int, int]:
    """Image size from the options, edgeq's metadata, or the static input shape."""
    if opts.imgsz:
        return tuple(opts.imgsz)
    if "edgeq.imgsz" in info.meta:
        try:
            h, w = json.loads(info.meta["edgeq.imgsz"])
            return int(h), int(w)
        except (ValueError, TypeError):
            raise EdgeqError(f"{path.name}: unreadable edgeq.imgsz {info.meta['edgeq.imgsz']!r}") from None
    if info.shape[2] > 0 and info.shape[3] > 0:
        return info.shape[2], info.shape[3]
    raise EdgeqError(f"{path.name} has a dynamic image size and no edgeq.imgsz metadata; pass imgsz")


# ---------------------------------------------------------------------------- the sidecar


def sidecar_path(engine_path: str | Path) -> Path:
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def sidecar_dict(
    meta: dict[str, str],
    trt_version: str,
    device: dict[str, Any],
    opts: BuildOptions,
    onnx_sha256: str,
    *,
    profile: dict[str, tuple[Shape, Shape, Shape]] | None = None,
    int8: str | None = None,
    onnx_name: str | None = None,
    trtexec: str | None = None,
    build_seconds: float | None = None,
    built_at: str | None = None,
) -> dict[str, Any]:
    """Everything needed to tell, later and elsewhere, whether this engine can be used.

    Keys follow what ``edgeq.runtime.backends.tensorrt`` reads: ``tensorrt_version``, ``device``
    and the ONNX's ``edgeq.*`` metadata at the top level (names, imgsz, flavour, ...).
    """
    from edgeq import __version__

    return {
        "format": "edgeq-engine/1",
        "tensorrt_version": trt_version,
        "device": {"name": device.get("name", "unknown"), "compute_capability": device.get("compute_capability")},
        "precision": {"fp16": bool(opts.fp16), "int8": int8},
        "workspace_gb": opts.workspace_gb,
        "profile": {k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])} for k, v in (profile or {}).items()},
        "onnx": {"file": onnx_name, "sha256": onnx_sha256},
        "built_at": built_at or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": None if build_seconds is None else round(build_seconds, 2),
        "trtexec": trtexec,
        "calibration_cache": str(opts.calibration_cache) if int8 == "implicit" else None,
        "edgeq_version": __version__,
        **{k: v for k, v in meta.items() if k.startswith("edgeq.")},
    }


def write_sidecar(engine_path: str | Path, data: dict[str, Any]) -> Path:
    """``<engine>.json``, written beside the engine (temp file + rename)."""
    return atomic_write_text(sidecar_path(engine_path), json.dumps(data, indent=2, sort_keys=False) + "\n")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


# ---------------------------------------------------------------------------- the TensorRT build


def import_tensorrt():
    """``tensorrt``, or one sentence on how to install it."""
    try:
        import tensorrt as trt
    except ImportError:
        raise EdgeqError(INSTALL_TRT) from None
    return trt


def make_cache_calibrator(trt, cache: bytes):
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


def prepare_calibration_cache(cache_path: Path, info: OnnxIO, trt_version: str) -> bytes:
    """The cache bytes to hand TensorRT: checked against this ONNX, under this TensorRT's tag."""
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


def parser_errors(parser, onnx_name: str) -> str:
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


def _configure(trt, builder, config, opts: BuildOptions, shapes, dynamic: bool, mode: str | None, calibrator) -> None:
    """Workspace, precision flags, the profile (needed for any dynamic input) and the calibrator."""
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes(opts))
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


def build_engine(onnx_path: str | Path, engine_path: str | Path, opts: BuildOptions) -> Path:
    """Build ``engine_path`` (plain serialized plan, no header) and ``<engine>.json`` beside it.

    Run this on the target device: the engine is tied to this TensorRT version and this GPU.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    info = inspect_onnx(onnx_path)
    check_flavour(onnx_path, info)
    mode = int8_mode(onnx_path, info, opts)
    imgsz = engine_imgsz(onnx_path, info, opts)
    shapes = profile_shapes(info.shape, imgsz, opts, info.name)
    trt = import_tensorrt()
    implicit = mode == "implicit"
    calib_bytes = prepare_calibration_cache(opts.calibration_cache, info, trt.__version__) if implicit else None
    effective = replace(opts, int8=bool(mode), calibration_cache=opts.calibration_cache if implicit else None)
    command = trtexec_command(onnx_path, engine_path, effective, info.name, imgsz, info.shape)
    log.info("building %s on this device (trtexec equivalent: %s)", engine_path.name, command)

    logger = trt.Logger(trt.Logger.VERBOSE if opts.verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = _parse(trt, builder, logger, onnx_path)
    config = builder.create_builder_config()
    calibrator = make_cache_calibrator(trt, calib_bytes) if calib_bytes is not None else None
    _configure(trt, builder, config, opts, shapes, is_dynamic(info.shape), mode, calibrator)
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
    data = sidecar_dict(
        info.meta, trt.__version__, detect_device(), effective, file_sha256(onnx_path),
        profile=shapes, int8=mode, onnx_name=onnx_path.name, trtexec=command, build_seconds=seconds,
    )
    write_sidecar(engine_path, data)
    log.info("wrote %s in %.1f s (TensorRT %s)", engine_path, seconds, trt.__version__)
    return engine_path
