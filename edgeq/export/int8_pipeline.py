"""The INT8 half of ``edgeq export``: the float ONNX and calibration images -> every flavour.

It reads the float ONNX the export wrote and the images, nothing upstream: one calibration
pass decodes each image once and observes every tensor any flavour quantizes; the first few
preprocessed images are kept for the sensitivity analysis and the bias correction, whose one
float pass serves every flavour. Then, per flavour (edgeq/flavours.py): Q/DQ rewrite, the
flavour's steps (IR conversion, TensorRT cache and engine), and an artifact written atomically.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from edgeq.errors import EdgeqError
from edgeq.flavours import CALIBRATION_CACHE, OPENVINO_IR, TENSORRT_ENGINE, Flavour
from edgeq.utils.timing import StageTimes

log = logging.getLogger("edgeq")

SENSITIVITY_IMAGES = 4  # calibration images the sensitivity analysis scores the worst tensors on
# the budget without --max-map-drop or --fallback: estimated without labels, so it leaves room
# under the quickstart's 1-point check (the estimate landed within 0.11 of the labelled drop on
# the demo, docs/BENCHMARKS.md)
DEFAULT_MAX_MAP_DROP = 0.8


@dataclass
class Int8Request:
    """What ``edgeq export --int8`` was asked: calibrate on ``data`` (default: the bundled
    calib_data/) or reuse ``table``."""

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
    ov_precision: str | None = None  # int8-ov: OpenVINO precision of the ops left float (edgeq.ov_precision);
    # None: f32, or with a budget a candidate each for the backend's default and f32
    # the budget (mAP50-95 points) the search holds; None: DEFAULT_MAX_MAP_DROP where the images
    # allow a held-out set, else each flavour's fixed default fallback
    max_map_drop: float | None = None
    budget_data: Path | None = None  # labelled data (data.yaml) the budget is measured on; None: agreement
    budget_images: int | None = None  # held-out images the search scores on; None: BUDGET_IMAGES / AGREEMENT_IMAGES
    finetune: object | None = None  # FinetuneOptions: train each flavour's Q/DQ graph on the calibration images
    progress: bool = True

    @property
    def budget(self) -> bool:
        """Whether a budget search chooses the graphs (a fixed ``--fallback N`` wins over it)."""
        return self.max_map_drop is not None and self.fallback is None

    def fallback_for(self, flavour: Flavour) -> int:
        if self.budget:
            from edgeq.export.budget import LEVELS

            return LEVELS[-1]  # the ranking the search walks
        return flavour.policy.default_fallback if self.fallback is None else self.fallback


def int8_paths(out_dir: Path, stem: str, formats: list[str], request: Int8Request) -> dict[str, Path]:
    """Artifact key -> path of everything the INT8 export of ``formats`` writes."""
    from edgeq import flavours

    paths = {key: out_dir / name for fmt in formats for key, name in flavours.for_format(fmt).artifact_names(stem).items()}
    if request.table is None:
        paths["table"] = out_dir / f"{stem}.calib.json"
    return paths


def _images(request: Int8Request, own_model: bool, needed: bool) -> Path:
    from edgeq.data.demo import calib_dir

    if request.data is None and own_model and needed:
        log.warning("no --data: calibration, the sensitivity analysis and bias correction run on the bundled "
                    "calib_data/ images, which only suit the demo model; pass --data with images of your own model's "
                    "domain")
    return Path(request.data) if request.data is not None else calib_dir()


def export_int8(float_onnx: Path, paths: dict[str, Path], flavour_list: list[Flavour], request: Int8Request, result,
                times: StageTimes, *, batch: int, dynamic: bool, workspace_gb: float, own_model: bool) -> None:
    """Write every flavour of ``flavour_list`` from ``float_onnx``; fills ``result`` (an ExportResult)."""
    import onnx

    from edgeq.export.calib_table import CalibrationTable, calibrate
    from edgeq.export.int8 import Int8Options

    reused = CalibrationTable.load(request.table) if request.table is not None else None
    request = _with_recorded_finetune(request, reused)
    image_dir = _images(request, own_model, True)
    request, judge = _with_budget(request, image_dir, float_onnx)
    fallbacks = {f.name: request.fallback_for(f) for f in flavour_list}
    keep = max(request.bias_images, SENSITIVITY_IMAGES if any(fallbacks.values()) else 0)
    if request.finetune is not None:  # the fine-tune trains on every calibration image
        keep = max(keep, request.num_images)
    keep = min(keep, request.num_images)
    with times("calibration"):
        if reused is not None:
            table = reused
            batches = _first_batches(image_dir, keep, float_onnx) if keep else []
        else:
            table, batches = calibrate(float_onnx, image_dir, num_images=request.num_images,
                                       method=request.method or "percentile", progress=request.progress, keep=keep)
            if request.percentile is not None:
                table.extra["percentile"] = request.percentile
            result.artifacts["table"] = table.save(paths["table"])
    result.table = table
    model = onnx.load(str(float_onnx))
    options, rankings = {}, {f.name: () for f in flavour_list}
    for flavour in flavour_list:
        opts = Int8Options(method=request.method, percentile=request.percentile, exclude=request.exclude,
                           uint8_weights=request.uint8_weights and flavour.uint8_weights,
                           head_outputs=request.head_outputs)
        if fallbacks[flavour.name]:
            with times("sensitivity"):
                chosen = _fallback(model, table, flavour, opts, batches[:SENSITIVITY_IMAGES], fallbacks[flavour.name],
                                   request)
            if request.budget:
                rankings[flavour.name] = chosen  # the search starts all-integer and walks the ranking
            else:
                opts.float_tensors = chosen
        options[flavour.name] = opts
    quantized, weights = {}, {}
    if not request.budget or request.finetune is not None:  # the search builds its own graphs
        quantized = _quantize_all(model, table, flavour_list, options, batches[:request.bias_images], times,
                                  request.progress)
    if request.finetune is not None:
        quantized = _finetune_all(model, table, flavour_list, options, quantized, batches, request, times, weights)
        if "table" in paths and request.table is None:
            result.artifacts["table"] = table.save(paths["table"])  # now with the fine-tune's record
    precisions: dict[str, str] = {}
    if request.budget:
        from edgeq.export.budget_stage import budget_all

        with times("budget search"):
            quantized = budget_all(float_onnx, model, table, flavour_list, options, quantized, weights, rankings,
                                   batches[:request.bias_images], judge, request, precisions)
    with times("q/dq"):
        _write_all(float_onnx, table, flavour_list, options, quantized, len(batches[:request.bias_images]), paths,
                   result, request, precisions)
    for flavour in flavour_list:
        _post_steps(flavour, float_onnx, table, paths, result, times, request, batch=batch, dynamic=dynamic,
                    workspace_gb=workspace_gb)


def _with_budget(request: Int8Request, image_dir: Path, float_onnx: Path):
    """The request with its budget settled, and the judge that scores the search's candidates
    on held-out images (None without a search). A fixed ``fallback`` turns the search off; an
    explicit budget that cannot be measured (too few images, nothing detected) is an error; the
    default budget then gives way to the fixed fallback, with a warning."""
    from dataclasses import replace

    if request.fallback is not None:
        return request, None
    if request.max_map_drop is None:
        if request.table is not None and request.data is None:
            log.info("reused table and no --data: no held-out images for the default budget; each flavour's fixed "
                     "fallback instead")
            return request, None
        try:
            held, judge = _judge(request, image_dir, float_onnx)
        except EdgeqError as exc:
            log.warning("%s: the default budget (%g points, estimated) cannot be measured; each flavour's fixed "
                        "fallback instead", exc.args[0], DEFAULT_MAX_MAP_DROP)
            return request, None
        request = replace(request, max_map_drop=DEFAULT_MAX_MAP_DROP)
    else:
        held, judge = _judge(request, image_dir, float_onnx)
    return replace(request, num_images=min(request.num_images, held.calib_limit)), judge


def _judge(request: Int8Request, image_dir: Path, float_onnx: Path):
    from edgeq.export.budget_judge import Judge, held_out

    held = held_out(image_dir, request.num_images, request.budget_data, request.budget_images)
    return held, Judge(float_onnx, held.images, held.labels, held.names)


def _with_recorded_finetune(request: Int8Request, table) -> Int8Request:
    """A reused ``table`` that records a fine-tune repeats it (same steps, images, seed) unless
    the request says otherwise; ``steps=0`` turns the fine-tune off."""
    from dataclasses import replace

    from edgeq.export.finetune import FinetuneOptions

    finetune = request.finetune
    records = (table.extra.get("finetune") or {}) if table is not None else {}
    if finetune is None and records:
        finetune = FinetuneOptions.from_record(next(iter(records.values())))
        log.info("the table records a fine-tune: repeating it (%d steps, seed %d); --finetune 0 skips it",
                 finetune.steps, finetune.seed)
    if finetune is not None and finetune.steps == 0:
        finetune = None
    return replace(request, finetune=finetune)


def _first_batches(image_dir: Path, count: int, float_onnx: Path) -> list:
    from edgeq.data.images import load_sample_images
    from edgeq.graph import read_imgsz
    from edgeq.runtime.preprocess import preprocess_batch

    size = read_imgsz(float_onnx)
    return [preprocess_batch([im], size)[0] for im in load_sample_images(image_dir, count)]


def _fallback(model, table, flavour: Flavour, opts, batches, count: int, request: Int8Request) -> tuple[str, ...]:
    from edgeq.export.sensitivity import FALLBACK_MIN_NSR, fallback_tensors, rank_tensors

    if not batches:
        raise EdgeqError("the sensitivity analysis needs calibration images, and none were read")
    min_nsr = FALLBACK_MIN_NSR if request.fallback_min_nsr is None else request.fallback_min_nsr
    keep = count if request.budget else max(16, 2 * count)  # the search walks exactly ``count``
    ranked = rank_tensors(model, table, flavour, batches, opts, keep=keep, min_nsr=min_nsr,
                          progress=request.progress)
    chosen = fallback_tensors(ranked, count, min_nsr)
    nsr = {r["tensor"]: r["nsr"] for r in ranked}
    what = "ranked for the budget search" if request.budget else "left float"
    log.info("%s: %d most sensitive tensors %s (at most %d, NSR >= %.0e): %s", flavour.name, len(chosen), what,
             count, min_nsr, ", ".join(f"{t} (NSR {nsr[t]:.1e})" for t in chosen) or "none")
    return chosen


def _quantize_all(model, table, flavour_list, options, bias_batches, times, progress: bool) -> dict:
    """Flavour name -> (Q/DQ ModelProto, report); with ``bias_batches``, the biases corrected from
    one float pass and every flavour quantized again."""
    from edgeq.export.int8 import quantize_model

    with times("q/dq"):
        quantized = {f.name: quantize_model(model, table, f, options[f.name]) for f in flavour_list}
    if bias_batches:
        from edgeq.export.bias_correction import apply_bias_shifts, bias_shifts

        with times("bias correction"):
            shifts = bias_shifts(model, {name: q for name, (q, _) in quantized.items()}, bias_batches, progress=progress)
        with times("q/dq"):
            for f in flavour_list:
                q, report = quantize_model(apply_bias_shifts(model, shifts[f.name]), table, f, options[f.name])
                report.bias_corrected = len(shifts[f.name])
                quantized[f.name] = (q, report)
                log.info("%s: biases of %d convolutions corrected for the mean shift of rounding (%d images)", f.name,
                         report.bias_corrected, len(bias_batches))
    return quantized


def _finetune_all(model, table, flavour_list, options, quantized: dict, batches, request: Int8Request, times,
                  weights: dict | None = None) -> dict:
    """Fine-tune the flavours' weights against the float model, then quantize the trained float
    weights again with the same table: the artifact is the graph that was trained.

    Each flavour trains on its own Q/DQ graph, except one whose record names another
    (``Flavour.finetune_on``): it takes the weights trained on that flavour's graph (made here,
    without bias correction, when that flavour is not being exported) and the table's scales.
    ``weights`` (filled when given): flavour name -> the trained float ModelProto.
    """
    import numpy as np

    from edgeq import flavours
    from edgeq.export.finetune import finetune
    from edgeq.export.int8 import Int8Options, quantize_model

    if not batches:
        raise EdgeqError("the fine-tune needs calibration images, and none were read")
    images = np.concatenate(batches)
    wanted = {f.name: flavours.get(f.finetune_on) if f.finetune_on else f for f in flavour_list}
    trained_on: dict = {}
    for target in {t.name: t for t in wanted.values()}.values():
        if target.name in quantized:
            q = quantized[target.name][0]
        else:
            with times("q/dq"):
                q, _ = quantize_model(model, table, target, Int8Options(method=request.method, percentile=request.percentile,
                                                                        exclude=request.exclude))
        with times("fine-tune"):
            trained_on[target.name] = finetune(model, q, images, request.finetune, progress=request.progress,
                                               desc=f"fine-tune {target.name}")
    records, out = {}, {}
    for f in flavour_list:
        _, report = quantized[f.name]
        trained = trained_on[wanted[f.name].name]
        own = wanted[f.name].name == f.name
        options[f.name].scales = trained.scales if own else None  # learned activation scales (None: the table's)
        with times("q/dq"):
            q, new_report = quantize_model(trained.model, table, f, options[f.name])
        record = {**trained.record, **({} if own else {"trained_on": wanted[f.name].name})}
        new_report.bias_corrected = report.bias_corrected  # the corrected biases were the fine-tune's start
        new_report.finetune = {**record, "learned_scales": len(options[f.name].scales or {})}
        out[f.name] = (q, new_report)
        if weights is not None:
            weights[f.name] = trained.model
        records[f.name] = {**record, **({"scales": trained.scales} if own and trained.scales else {})}
        log.info("%s: fine-tuned %d steps on %s's graph, %d images, %.0f s, distillation loss %.4f -> %.4f", f.name,
                 record["steps"], wanted[f.name].name, record["images"], record["seconds"], record["loss_first"],
                 record["loss_last"])
    table.extra["finetune"] = records
    return out


def _write_all(float_onnx: Path, table, flavour_list, options, quantized: dict, bias_images: int, paths, result,
               request: Int8Request, precisions: dict[str, str]) -> None:
    """Write each flavour's artifact with its record (atomically); an OpenVINO flavour also
    records the precision its float ops run at (``precisions``: what a budget chose), which the
    runtime then uses."""
    from edgeq.export.int8 import int8_record, write_int8
    from edgeq.graph import OV_PRECISION_META
    from edgeq.utils.files import file_sha256

    float_sha256 = file_sha256(float_onnx)
    for f in flavour_list:
        q, report = quantized.pop(f.name)
        record = int8_record(table, f, options[f.name], report, float_onnx, float_sha256, bias_images)
        props = {}
        if f.backend == "openvino":
            precision = precisions.get(f.name) or request.ov_precision or "f32"
            record["ov_precision"] = precision
            props[OV_PRECISION_META] = precision
        result.artifacts[f.name] = write_int8(q, f, record, paths[f.name], props)
        result.int8_reports[f.name] = report


def _post_steps(flavour: Flavour, float_onnx: Path, table, paths, result, times, request: Int8Request, *, batch: int,
                dynamic: bool, workspace_gb: float) -> None:
    """The flavour's steps after its Q/DQ ONNX exists: IR conversion, TensorRT cache and engine."""
    qdq_onnx = result.artifacts[flavour.name]
    if OPENVINO_IR in flavour.steps:
        from edgeq.export.openvino_export import export_openvino

        key = f"{flavour.name}-ir"
        with times("openvino IR"):
            result.artifacts[key] = export_openvino(qdq_onnx, paths[key])
    if CALIBRATION_CACHE in flavour.steps:
        from edgeq.export.calib_table import write_trt_cache

        with times("tensorrt cache"):
            write_trt_cache(table, float_onnx, paths["trt-cache"], method=request.method)
        result.artifacts["trt-cache"] = paths["trt-cache"]
    if TENSORRT_ENGINE in flavour.steps:
        from edgeq.export.trt_plan import BuildOptions, trtexec_command

        key = f"{flavour.name}-engine"
        max_batch = max(batch, 8) if dynamic else batch
        opts = BuildOptions(int8=True, workspace_gb=workspace_gb, min_batch=1, opt_batch=batch, max_batch=max_batch)
        if result.engine_deferred:
            size = result.imgsz or (640, 640)
            implicit = BuildOptions(min_batch=1, opt_batch=batch, max_batch=max_batch, calibration_cache=paths["trt-cache"])
            log.warning("explicit INT8 (recommended): %s", trtexec_command(qdq_onnx, paths[key], opts, imgsz=size))
            log.warning("implicit INT8 (TensorRT < 10.1 style): %s",
                        trtexec_command(float_onnx, paths[key], implicit, imgsz=size))
        else:
            from edgeq.export.trt_build import build_engine

            with times("tensorrt engine"):
                result.artifacts[key] = build_engine(qdq_onnx, paths[key], opts)
