"""One call from a checkpoint to every backend's artifact: what ``edgeq export`` runs.

Order: load -> deploy graph (fuse + h-swish rewrite, checked against the original) -> ONNX
(always: it is the source of the other formats) -> OpenVINO IR -> TensorRT engine. Every
target path is checked before any work, so an existing artifact is kept unless ``force``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from edgeq import __version__
from edgeq.errors import EdgeqError

log = logging.getLogger("edgeq")

FORMATS = ("onnx", "openvino", "engine")


@dataclass
class ExportResult:
    artifacts: dict[str, Path]
    deploy_report: dict = field(default_factory=dict)
    source: Path | None = None
    imgsz: tuple[int, int] | None = None
    table: object | None = None  # the CalibrationTable an INT8 export used
    engine_deferred: bool = False  # engines requested but TensorRT is absent: ONNX + trtexec lines instead
    int8_reports: dict = field(default_factory=dict)


def parse_formats(formats: str | list[str]) -> list[str]:
    items = [f.strip().lower() for f in (formats.split(",") if isinstance(formats, str) else formats) if f.strip()]
    aliases = {"ov": "openvino", "ir": "openvino", "trt": "engine", "tensorrt": "engine"}
    items = [aliases.get(f, f) for f in items]
    unknown = [f for f in items if f not in FORMATS]
    if unknown or not items:
        raise EdgeqError(f"--format {','.join(unknown) or '(empty)'} is not supported", note=f"choose from {', '.join(FORMATS)}")
    return list(dict.fromkeys(items))


def artifact_paths(out_dir: Path, stem: str, formats: list[str], half: bool, tag: str = "") -> dict[str, Path]:
    """Where each format goes. The ONNX is always written: the others are built from it."""
    suffix = f".{tag}" if tag else ""
    half_tag = ".fp16" if half else ""
    paths = {"onnx": out_dir / f"{stem}{suffix}.onnx"}
    if "openvino" in formats:
        paths["openvino"] = out_dir / f"{stem}{suffix}{half_tag}.xml"
    if "engine" in formats:
        paths["engine"] = out_dir / f"{stem}{suffix}{half_tag}.engine"
    return paths


def _companions(path: Path) -> list[Path]:
    if path.suffix == ".xml":
        return [path, path.with_suffix(".bin")]
    if path.suffix == ".engine":
        return [path, path.with_name(path.name + ".json")]
    return [path]


def check_targets(paths: dict[str, Path], force: bool) -> None:
    existing = [str(p) for path in paths.values() for p in _companions(path) if p.exists()]
    if existing and not force:
        raise EdgeqError(
            f"{existing[0]} already exists" + (f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""),
            note="pass --force to overwrite, or --out to write elsewhere",
        )


def export_model(
    weights: str | Path,
    *,
    formats: str | list[str] = ("onnx", "openvino"),
    out_dir: str | Path | None = None,
    imgsz: int | None = None,
    batch: int = 1,
    dynamic: bool = False,
    half: bool = False,
    opset: int = 17,
    rewrite: bool = True,
    raw: bool = False,
    force: bool = False,
    trust: bool = False,
    workspace_gb: float = 2.0,
    int8: Int8Request | None = None,
) -> ExportResult:
    """Export a checkpoint to the requested formats; with ``int8``, also each backend's INT8 flavour.

    See ``edgeq export --help``.
    """
    fmts = parse_formats(formats)
    if int8 is not None and batch != 1 and not dynamic:
        raise EdgeqError(f"--int8 with --batch {batch}: calibration and the sensitivity analysis feed one image at a "
                         f"time, which a graph fixed at batch {batch} refuses",
                         note="export with --dynamic (any batch, INT8 included) or without --batch")
    if Path(str(weights)).suffix == ".onnx":  # no torch on this path: a Jetson builds its engine here
        return _export_from_onnx(Path(weights), fmts, out_dir, half, batch, dynamic, force, workspace_gb)

    from edgeq.export.fuse import deploy
    from edgeq.export.onnx_export import export_onnx
    from edgeq.models.checkpoint import load_model

    loaded = load_model(weights, trust=trust)
    size = imgsz or loaded.imgsz or 640
    out = Path(out_dir) if out_dir else Path("runs/export") / Path(str(weights)).stem
    stem = Path(str(weights)).stem
    paths = artifact_paths(out, stem, fmts, half)
    if int8 is not None:
        paths.update(int8_paths(out, stem, fmts, int8))
    check_targets(paths, force)

    stride = int(max(loaded.stride)) if loaded.stride else 32
    if size <= 0 or size % stride:
        raise EdgeqError(f"--imgsz {size} must be a positive multiple of the model's stride {stride}")
    deployed, report = deploy(loaded.model, rewrite=rewrite, example_shape=(1, 3, size, size))
    metadata = {
        "edgeq.names": loaded.names,
        "edgeq.stride": [float(s) for s in loaded.stride],
        "edgeq.version": __version__,
        "edgeq.source": Path(str(weights)).name,
        "edgeq.source_sha256": loaded.sha256,
        "edgeq.flavour": "float",
        "edgeq.rewrite": "hswish-relu6" if rewrite else "none",
        "edgeq.batch": "dynamic" if dynamic else str(batch),
    }
    log.info("exporting %s at %dx%d (stride %d)", weights, size, size, stride)
    export_onnx(
        deployed, paths["onnx"], imgsz=size, batch=batch, dynamic=dynamic, opset=opset, raw=raw, metadata=metadata
    )
    result = ExportResult(artifacts={"onnx": paths["onnx"]}, deploy_report=report, source=Path(str(weights)), imgsz=(size, size))
    if int8 is not None and "engine" in fmts and not _tensorrt_available():
        # INT8 for a Jetson is prepared here and built there: write the ONNX flavours and the
        # cache, print how to build, instead of failing the whole export on this machine.
        log.warning("TensorRT is not installed here: writing the ONNX (float and int8-trt) and the calibration "
                    "cache; build the engines on the device (the trtexec lines follow)")
        result.engine_deferred = True
    _convert(paths, fmts if not result.engine_deferred else [f for f in fmts if f != "engine"], half, batch, dynamic,
             workspace_gb, result)
    if int8 is not None:
        _export_int8(weights, paths, fmts, int8, batch, dynamic, workspace_gb, trust, result)
    return result


@dataclass
class Int8Request:
    """What ``edgeq export --int8`` was asked: calibrate on ``data`` or reuse ``table``."""

    data: Path | None = None
    table: Path | None = None
    method: str | None = None
    num_images: int = 256
    percentile: float | None = None
    exclude: tuple[str, ...] = ()
    fallback: int | None = None  # leave the N most sensitive activation tensors float; None: the flavour's default
    fallback_min_nsr: float | None = None  # ... of those, only the ones at least this harmful; None: FALLBACK_MIN_NSR
    uint8_weights: bool = False  # int8-ort only: ONNX Runtime's non-saturating kernels on CPUs without VNNI
    bias_images: int = 32  # calibration images the bias correction is measured on; 0: no correction
    head_outputs: str | None = None  # the head convolutions' outputs (float, per-channel, per-tensor); None: the flavour's
    progress: bool = True


INT8_FORMATS = {"onnx": "ort", "openvino": "ov", "engine": "trt"}  # target format -> the flavour it runs


def int8_paths(out_dir: Path, stem: str, formats: list[str], request: Int8Request) -> dict[str, Path]:
    paths: dict[str, Path] = {}
    for fmt in formats:
        flavour = INT8_FORMATS[fmt]
        paths[f"int8-{flavour}"] = out_dir / f"{stem}.int8-{flavour}.onnx"
        if fmt == "openvino":
            paths["int8-ov-ir"] = out_dir / f"{stem}.int8-ov.xml"
        if fmt == "engine":
            paths["int8-trt-engine"] = out_dir / f"{stem}.int8-trt.engine"
            paths["trt-cache"] = out_dir / f"{stem}.calib.cache"
    if request.table is None:
        paths["table"] = out_dir / f"{stem}.calib.json"
    return paths


def _tensorrt_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


def _default_calib() -> Path:
    from edgeq.data.demo import calib_dir

    return calib_dir()


def _export_int8(weights, paths, fmts, request: Int8Request, batch, dynamic, workspace_gb, trust, result) -> None:
    from edgeq.data.images import load_sample_images
    from edgeq.export.calib_table import CalibrationTable, collect, write_trt_cache
    from edgeq.export.int8 import Int8Options, quantize_file
    from edgeq.export.qdq import policy_for

    if request.table is not None:
        table = CalibrationTable.load(request.table)
    else:
        if request.data is None:
            raise EdgeqError("--int8 needs calibration images (--data DIR) or a table (--table FILE)")
        table = collect(weights, request.data, num_images=request.num_images, method=request.method or "percentile",
                        progress=request.progress, trust=trust, float_onnx=paths["onnx"])
        if request.percentile is not None:
            table.extra["percentile"] = request.percentile
        result.artifacts["table"] = table.save(paths["table"])
    result.table = table
    from edgeq.data.demo import DEMO_WEIGHTS

    own_model = not isinstance(weights, (str, Path)) or Path(weights).resolve() != DEMO_WEIGHTS.resolve()
    if request.data is None and own_model and (request.bias_images or request.fallback != 0):
        log.warning("no --data: the sensitivity analysis and bias correction run on the bundled calib_data/ images, "
                    "which only suit the demo model; pass --data with images of your own model's domain")
    image_dir = request.data or _default_calib()
    sensitivity_images: list | None = None  # loaded once, for every flavour that falls back
    correction_images = load_sample_images(image_dir, request.bias_images) if request.bias_images else []
    for fmt in fmts:
        flavour = INT8_FORMATS[fmt]
        key = f"int8-{flavour}"
        opts = Int8Options(method=request.method, percentile=request.percentile, exclude=request.exclude,
                           uint8_weights=request.uint8_weights and flavour == "ort", head_outputs=request.head_outputs)
        fallback = policy_for(flavour).default_fallback if request.fallback is None else request.fallback
        if fallback:
            from edgeq.export.int8 import FALLBACK_MIN_NSR, fallback_tensors, tensor_sensitivity

            if sensitivity_images is None:
                sensitivity_images = load_sample_images(image_dir, 4)
            ranked = tensor_sensitivity(paths["onnx"], table, flavour, sensitivity_images, opts, progress=request.progress)
            min_nsr = FALLBACK_MIN_NSR if request.fallback_min_nsr is None else request.fallback_min_nsr
            opts.float_tensors = fallback_tensors(ranked, fallback, min_nsr)
            nsr = {r["tensor"]: r["nsr"] for r in ranked}
            log.info("%s: %d most sensitive tensors left float (at most %d, NSR >= %.0e): %s", key,
                     len(opts.float_tensors), fallback, min_nsr,
                     ", ".join(f"{t} (NSR {nsr[t]:.1e})" for t in opts.float_tensors) or "none")
        path, report = quantize_file(paths["onnx"], table, flavour, paths[key], opts,
                                     correction_images=correction_images, progress=request.progress)
        if report.bias_corrected:
            log.info("%s: biases of %d convolutions corrected for the mean shift of rounding (%d images)", key,
                     report.bias_corrected, len(correction_images))
        result.artifacts[key] = path
        result.int8_reports[key] = report
        if fmt == "openvino":
            from edgeq.export.openvino_export import export_openvino

            result.artifacts["int8-ov-ir"] = export_openvino(path, paths["int8-ov-ir"])
        if fmt == "engine":
            from edgeq.export.trt_build import BuildOptions, build_engine

            result.artifacts["trt-cache"] = paths["trt-cache"]
            write_trt_cache(table, paths["onnx"], paths["trt-cache"], method=request.method)
            max_batch = max(batch, 8) if dynamic else batch
            opts_trt = BuildOptions(int8=True, workspace_gb=workspace_gb, min_batch=1, opt_batch=batch, max_batch=max_batch)
            if result.engine_deferred:
                from edgeq.export.trt_build import trtexec_command

                size = result.imgsz or (640, 640)
                implicit = BuildOptions(min_batch=1, opt_batch=batch, max_batch=max_batch,
                                        calibration_cache=paths["trt-cache"])
                log.warning("explicit INT8 (recommended): %s", trtexec_command(path, paths["int8-trt-engine"], opts_trt, imgsz=size))
                log.warning("implicit INT8 (TensorRT < 10.1 style): %s",
                            trtexec_command(paths["onnx"], paths["int8-trt-engine"], implicit, imgsz=size))
            else:
                result.artifacts["int8-trt-engine"] = build_engine(path, paths["int8-trt-engine"], opts_trt)


def _export_from_onnx(onnx_path: Path, fmts, out_dir, half, batch, dynamic, force, workspace_gb) -> ExportResult:
    """An existing edgeq ONNX -> IR / engine (how a Jetson builds its own engine)."""
    if not onnx_path.is_file():
        raise EdgeqError(f"{onnx_path} does not exist")
    out = Path(out_dir) if out_dir else onnx_path.parent
    paths = artifact_paths(out, onnx_path.stem, fmts, half)
    paths["onnx"] = onnx_path
    check_targets({k: v for k, v in paths.items() if k != "onnx"}, force)
    result = ExportResult(artifacts={"onnx": onnx_path}, source=onnx_path)
    _convert(paths, fmts, half, batch, dynamic, workspace_gb, result)
    return result


def _convert(paths, fmts, half, batch, dynamic, workspace_gb, result: ExportResult) -> None:
    if "openvino" in fmts:
        from edgeq.export.openvino_export import export_openvino

        result.artifacts["openvino"] = export_openvino(paths["onnx"], paths["openvino"], half=half)
    if "engine" in fmts:
        from edgeq.export.trt_build import BuildOptions, build_engine

        from edgeq.export.onnx_export import read_metadata

        max_batch = max(batch, 8) if dynamic else batch
        explicit_int8 = read_metadata(paths["onnx"]).get("edgeq.flavour") == "int8-trt"  # Q/DQ: INT8 kernels allowed
        opts = BuildOptions(fp16=half, int8=explicit_int8, workspace_gb=workspace_gb, min_batch=1, opt_batch=batch,
                            max_batch=max_batch)
        result.artifacts["engine"] = build_engine(paths["onnx"], paths["engine"], opts)
