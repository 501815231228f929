"""What a TensorRT build will do, decided without TensorRT: options, ONNX checks, shapes, trtexec line.

Every decision that can go wrong before TensorRT is involved is made here, so that a wrong
flavour, a stale size or an impossible batch range fails in one sentence on any machine
(the x86 box that exported the model as well as the Jetson that builds the engine), and so
that these rules are tested where TensorRT cannot be installed:

* which ONNX can become an engine: float or the TensorRT flavour (symmetric int8 Q/DQ, zero
  point 0); another backend's INT8 flavour is refused with the file to use instead;
* the optimization profile (min/opt/max shapes) and the workspace size;
* INT8 **explicit** (Q/DQ in the graph, recommended) or **implicit** (float ONNX plus a
  calibration cache, TensorRT 10 on older JetPack);
* the equivalent ``trtexec`` line, logged and recorded in the sidecar so a user can rebuild
  by hand.

:mod:`edgeq.export.trt_build` runs the TensorRT API on these decisions. Only the ``onnx``
package is used, and it is imported inside :func:`inspect_onnx`.
"""

from __future__ import annotations

import json
import logging
import shlex
from dataclasses import dataclass
from pathlib import Path

from edgeq import flavours
from edgeq.errors import EdgeqError
from edgeq.graph import metadata_of

log = logging.getLogger("edgeq")

Shape = tuple[int, ...]
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
# the flavour an engine export quantizes for: what every refusal below points the user to
ENGINE_FLAVOUR = flavours.for_format("engine").name


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
        meta=metadata_of(model),
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
    """TensorRT needs its own Q/DQ flavour (symmetric int8, zero point 0) or a float ONNX.

    Another backend's INT8 graph would parse, but TensorRT would run its uint8/asymmetric
    Q/DQ badly or not at all; the user gets the file name to build from instead.
    """
    flavour = info.meta.get("edgeq.flavour")
    if flavour is not None and not flavours.known(flavour):
        known = ", ".join((flavours.FLOAT, *flavours.NAMES))
        raise EdgeqError(f"{path.name}: unknown edgeq.flavour {flavour!r}", note=f"known: {known}")
    if flavour is not None and not flavours.engine_source(flavour):
        title = flavours.FLAVOURS[flavour].backend_title
        raise EdgeqError(
            f"{path.name} is the {title} INT8 flavour ({flavour}); TensorRT needs the "
            f"{ENGINE_FLAVOUR} flavour (symmetric int8 Q/DQ, zero point 0)",
            note=f"build from the model's *.{ENGINE_FLAVOUR}.onnx (explicit INT8) or from the float ONNX",
        )
    if flavour is not None and flavours.is_int8(flavour) and info.qdq_nodes == 0:
        raise EdgeqError(
            f"{path.name} says it is {flavour} but holds no QuantizeLinear/DequantizeLinear nodes; re-export it"
        )
    if info.zero_point_problems:
        raise EdgeqError(
            f"{path.name}: TensorRT needs symmetric int8 Q/DQ with zero point 0, but "
            + "; ".join(info.zero_point_problems[:3]),
            note=f"build from the model's *.{ENGINE_FLAVOUR}.onnx",
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


# ---------------------------------------------------------------------------- shapes and sizes


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
    """Whether any dimension is dynamic (-1): then TensorRT needs an optimization profile."""
    return any(d < 0 for d in shape)


def workspace_bytes(opts: BuildOptions) -> int:
    """The builder's workspace pool in bytes; a non-positive size would fail deep inside TensorRT."""
    if not opts.workspace_gb > 0:
        raise EdgeqError(f"workspace_gb must be > 0, got {opts.workspace_gb}")
    return int(opts.workspace_gb * (1 << 30))


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


# ---------------------------------------------------------------------------- INT8 and trtexec


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
            f"{path.name} is a float ONNX (no Q/DQ nodes): INT8 needs the {ENGINE_FLAVOUR} export "
            "or a calibration cache",
            note=f"build from the model's *.{ENGINE_FLAVOUR}.onnx (recommended), or pass calib.cache for implicit INT8",
        )
    return None


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
