"""One call from a checkpoint to every backend's artifact: what ``edgeq export`` runs.

The stages run in one direction and each reads what the previous one wrote: checkpoint ->
deploy graph (fuse + h-swish rewrite, checked against the original) -> float ONNX (always: it
is the source of everything after) -> OpenVINO IR / TensorRT engine -> INT8 (from the float ONNX
and the calibration images only, :mod:`edgeq.export.int8_pipeline`) -> parity against the
checkpoint. Every target path is checked before any work, so an existing artifact is kept
unless ``force``; the wall time of each stage is recorded in ``ExportResult.stage_seconds``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from edgeq import __version__, flavours
from edgeq.errors import EdgeqError
from edgeq.export.int8_pipeline import Int8Request, export_int8, int8_paths
from edgeq.utils.timing import StageTimes

log = logging.getLogger("edgeq")

FORMATS = ("onnx", "openvino", "engine")


@dataclass
class ParityRequest:
    """Check the float artifacts against the checkpoint on the first ``num_images`` images of
    ``data`` (default: the bundled calib_data/) within a budget."""

    data: Path | None = None
    num_images: int = 16
    max_rel_l2: float = 1e-4
    min_agreement: float = 0.99
    threads: int | None = None


@dataclass
class ExportResult:
    artifacts: dict[str, Path]
    deploy_report: dict = field(default_factory=dict)
    source: Path | None = None
    imgsz: tuple[int, int] | None = None
    table: object | None = None  # the CalibrationTable an INT8 export used
    engine_deferred: bool = False  # engines requested but TensorRT is absent: ONNX + trtexec lines instead
    int8_reports: dict = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    parity: dict = field(default_factory=dict)  # artifact -> ParityResult of the float artifacts
    parity_failed: list[str] = field(default_factory=list)  # artifacts outside the parity budget
    parity_images: int = 0

    def deployed(self) -> list[Path]:
        """The INT8 artifacts each backend runs (the IR for OpenVINO, the engine for TensorRT)."""
        keys = [flavours.get(rep.flavour).deployed_key() for rep in self.int8_reports.values()]
        return [self.artifacts[k] for k in keys if k in self.artifacts]


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
    parity: ParityRequest | None = None,
) -> ExportResult:
    """Export a checkpoint to the requested formats; with ``int8``, also each backend's INT8 flavour;
    with ``parity``, check the float artifacts against the checkpoint.

    See ``edgeq export --help``.
    """
    fmts = parse_formats(formats)
    if int8 is not None and batch != 1 and not dynamic:
        raise EdgeqError(f"--int8 with --batch {batch}: calibration and the sensitivity analysis feed one image at a "
                         f"time, which a graph fixed at batch {batch} refuses",
                         note="export with --dynamic (any batch, INT8 included) or without --batch")
    if Path(str(weights)).suffix == ".onnx":  # no torch on this path: a Jetson builds its engine here
        return _export_from_onnx(Path(weights), fmts, out_dir, half, batch, dynamic, force, workspace_gb)

    from edgeq.export.deploy import deploy
    from edgeq.export.onnx_export import export_onnx
    from edgeq.models.checkpoint import load_model

    times = StageTimes()
    with times("load"):
        loaded = load_model(weights, trust=trust)
    size = loaded.input_size(imgsz)
    out = Path(out_dir) if out_dir else Path("runs/export") / Path(str(weights)).stem
    stem = Path(str(weights)).stem
    paths = artifact_paths(out, stem, fmts, half)
    if int8 is not None:
        paths.update(int8_paths(out, stem, fmts, int8))
    check_targets(paths, force)

    stride = int(max(loaded.stride)) if loaded.stride else 32
    with times("deploy"):
        deployed, report = deploy(loaded.model, rewrite=rewrite, example_shape=(1, 3, size, size))
    metadata = {
        "edgeq.names": loaded.names,
        "edgeq.stride": [float(s) for s in loaded.stride],
        "edgeq.version": __version__,
        "edgeq.source": Path(str(weights)).name,
        "edgeq.source_sha256": loaded.sha256,
        "edgeq.flavour": flavours.FLOAT,
        "edgeq.rewrite": "hswish-relu6" if rewrite else "none",
        "edgeq.batch": "dynamic" if dynamic else str(batch),
    }
    log.info("exporting %s at %dx%d (stride %d)", weights, size, size, stride)
    with times("onnx"):
        export_onnx(deployed, paths["onnx"], imgsz=size, batch=batch, dynamic=dynamic, opset=opset, raw=raw,
                    metadata=metadata)
    del deployed  # from here on only the parity check reads the PyTorch model (the one in memory)
    result = ExportResult(artifacts={"onnx": paths["onnx"]}, deploy_report=report, source=Path(str(weights)),
                          imgsz=(size, size))
    if int8 is not None and "engine" in fmts and not _tensorrt_available():
        # INT8 for a Jetson is prepared here and built there: write the ONNX flavours and the
        # cache, print how to build, instead of failing the whole export on this machine.
        log.warning("TensorRT is not installed here: writing the ONNX (float and %s) and the calibration "
                    "cache; build the engines on the device (the trtexec lines follow)", flavours.for_format("engine").name)
        result.engine_deferred = True
    _convert(paths, fmts if not result.engine_deferred else [f for f in fmts if f != "engine"], half, batch, dynamic,
             workspace_gb, result, times)
    if int8 is not None:
        export_int8(paths["onnx"], paths, [flavours.for_format(f) for f in fmts], int8, result, times,
                    batch=batch, dynamic=dynamic, workspace_gb=workspace_gb, own_model=_own_model(weights))
    if parity is not None and parity.num_images and not raw:
        with times("parity"):
            _check_parity(loaded, result, parity)
    result.stage_seconds = times.to_dict()
    log.debug("export stages: %s", times.summary())
    return result


def calibrate_model(weights: str | Path, *, data: str | Path | None = None, num_images: int = 256,
                    imgsz: int | None = None, method: str = "percentile", trust: bool = False,
                    output: str | Path | None = None, progress: bool = True):
    """``edgeq calibrate``: a reusable calibration table of a checkpoint (its float ONNX is
    exported to a temporary folder first) or of an edgeq float ONNX. Returns (table, path)."""
    import tempfile

    from edgeq.data.demo import calib_dir
    from edgeq.export.calib_table import calibrate
    from edgeq.utils.files import check_writable_dir

    out = Path(output) if output else Path(Path(str(weights)).with_suffix(".calib.json").name)
    check_writable_dir(out.parent if str(out.parent) else Path("."))
    images = Path(data) if data else calib_dir()
    if Path(str(weights)).suffix == ".onnx":
        table, _ = calibrate(weights, images, num_images=num_images, method=method, progress=progress)
    else:
        with tempfile.TemporaryDirectory(prefix="edgeq-calib-") as tmp:
            float_onnx = export_model(weights, formats="onnx", out_dir=tmp, imgsz=imgsz, trust=trust).artifacts["onnx"]
            table, _ = calibrate(float_onnx, images, num_images=num_images, method=method, progress=progress)
    return table, table.save(out)


def _check_parity(loaded, result: ExportResult, request: ParityRequest) -> None:
    """The float artifacts against the checkpoint already in memory (it is not read again)."""
    from edgeq.data.demo import calib_dir
    from edgeq.data.images import load_sample_images
    from edgeq.runtime.backends.torch import TorchBackend
    from edgeq.runtime.parity import check_artifacts, failed_artifacts

    images = load_sample_images(request.data or calib_dir(), request.num_images)
    checkable = [str(result.artifacts[f]) for f in ("onnx", "openvino") if f in result.artifacts]
    with TorchBackend(loaded.path, loaded=loaded) as reference:
        result.parity = check_artifacts(reference, checkable, images, threads=request.threads, histograms=False)
    result.parity_images = len(images)
    result.parity_failed = failed_artifacts(result.parity, request.max_rel_l2, request.min_agreement)


def _own_model(weights) -> bool:
    from edgeq.data.demo import DEMO_WEIGHTS

    return not isinstance(weights, (str, Path)) or Path(weights).resolve() != DEMO_WEIGHTS.resolve()


def _tensorrt_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


def _export_from_onnx(onnx_path: Path, fmts, out_dir, half, batch, dynamic, force, workspace_gb) -> ExportResult:
    """An existing edgeq ONNX -> IR / engine (how a Jetson builds its own engine)."""
    if not onnx_path.is_file():
        raise EdgeqError(f"{onnx_path} does not exist")
    out = Path(out_dir) if out_dir else onnx_path.parent
    paths = artifact_paths(out, onnx_path.stem, fmts, half)
    paths["onnx"] = onnx_path
    check_targets({k: v for k, v in paths.items() if k != "onnx"}, force)
    from edgeq.graph import FLAVOUR_META, read_metadata

    result = ExportResult(artifacts={"onnx": onnx_path}, source=onnx_path)
    times = StageTimes()
    # a given ONNX may be the TensorRT flavour (Q/DQ): the engine may then use INT8 kernels
    flavour = read_metadata(onnx_path).get(FLAVOUR_META, flavours.FLOAT) if "engine" in fmts else flavours.FLOAT
    _convert(paths, fmts, half, batch, dynamic, workspace_gb, result, times, flavour)
    result.stage_seconds = times.to_dict()
    return result


def _convert(paths, fmts, half, batch, dynamic, workspace_gb, result: ExportResult, times: StageTimes,
             flavour: str = flavours.FLOAT) -> None:
    """IR and engine from ``paths["onnx"]``, whose ``edgeq.flavour`` is ``flavour``."""
    if "openvino" in fmts:
        from edgeq.export.openvino_export import export_openvino

        with times("openvino IR"):
            result.artifacts["openvino"] = export_openvino(paths["onnx"], paths["openvino"], half=half)
    if "engine" in fmts:
        from edgeq.export.trt_build import build_engine
        from edgeq.export.trt_plan import BuildOptions

        max_batch = max(batch, 8) if dynamic else batch
        opts = BuildOptions(fp16=half, int8=flavours.made_for(flavour) == "tensorrt", workspace_gb=workspace_gb,
                            min_batch=1, opt_batch=batch, max_batch=max_batch)
        with times("tensorrt engine"):
            result.artifacts["engine"] = build_engine(paths["onnx"], paths["engine"], opts)
