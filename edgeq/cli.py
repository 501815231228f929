"""The ``edgeq`` command: parses arguments, calls the Python API, prints. No logic of its own.

Every handler imports what it needs inside the function, so ``edgeq --help`` and
``edgeq <cmd> --help`` stay fast and never load torch, OpenVINO or TensorRT.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from edgeq.cli_args import build_parser
from edgeq.errors import EdgeqError


def _write_json(path: str | None, payload: dict) -> None:
    if not path:
        return
    from edgeq.utils.files import atomic_write_text

    atomic_write_text(Path(path), json.dumps(payload, indent=2, sort_keys=True, default=float) + "\n")
    print(f"wrote {path}")


def _model_source(arg: str | None) -> str:
    if arg:
        return arg
    from edgeq.data.demo import demo_weights

    return str(demo_weights())


# ----------------------------------------------------------------------------- handlers
def cmd_info(args: argparse.Namespace) -> int:
    from edgeq.models.checkpoint import load_model
    from edgeq.models.info import format_summary, summarize

    loaded = load_model(_model_source(args.model), nc=args.nc, trust=args.trust_checkpoint)
    summary = summarize(loaded.model, loaded.input_size(args.imgsz))
    print(format_summary(summary, title=Path(str(args.model or loaded.path)).name))
    if loaded.source != "config":
        print(f"classes: {', '.join(loaded.names)}")
    payload = summary.to_dict() | {"source": loaded.source, "names": loaded.names}
    _write_json(args.json, payload)
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from edgeq.data.synthetic import generate_dataset

    path = generate_dataset(args.out_dir, n_train=args.train, n_val=args.val, imgsz=args.imgsz, seed=args.seed)
    print(f"wrote {path}")
    return 0


def cmd_data_calib(args: argparse.Namespace) -> int:
    from edgeq.data.synthetic import generate_images

    paths = generate_images(args.out_dir, n=args.num, imgsz=args.imgsz, seed=args.seed)
    print(f"wrote {len(paths)} images to {args.out_dir}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from edgeq.training.trainer import TrainConfig, Trainer

    if not args.resume and not args.data:
        raise EdgeqError("edgeq train needs --data DATA_YAML (or --resume with --out of an earlier run)")
    cfg = TrainConfig(
        cfg=args.cfg,
        data=str(args.data or ""),
        imgsz=args.imgsz,
        epochs=args.epochs or 30,
        batch=args.batch,
        optimizer=args.optimizer,
        lr0=args.lr0,
        workers=args.workers,
        seed=args.seed,
        out=args.out,
        val_images=args.val_images,
        max_iters=args.max_iters,
        weights=args.weights or "",
        close_mosaic=args.close_mosaic,
        warmup_epochs=args.warmup_epochs,
    )
    trainer = Trainer(cfg, resume=args.resume, epochs=args.epochs)
    metrics = trainer.fit()
    print(f"done: {metrics}")
    print(f"weights: {trainer.best_path} (best), {trainer.last_path} (resumable)")
    _write_json(args.json, metrics)
    return 0


def cmd_val(args: argparse.Namespace) -> int:
    from edgeq.data.demo import demo_data_yaml
    from edgeq.data.yolo import YoloDataset
    from edgeq.runtime.evaluate import format_map_table
    from edgeq.validate import evaluate_model

    data = args.data or demo_data_yaml()
    dataset = YoloDataset(data, split=args.split)
    result = evaluate_model(
        _model_source(args.weights), dataset, imgsz=args.imgsz, batch_size=args.batch, trust=args.trust_checkpoint
    )
    print(format_map_table(result))
    print(f"mAP50 {result['map50']:.4f}  mAP50-95 {result['map50_95']:.4f}  ({result['images']} images, {data})")
    _write_json(args.json, result)
    return 0


def _print_parity(reference: str, artifacts: list[str], args: argparse.Namespace) -> dict:
    from edgeq.data.demo import calib_dir
    from edgeq.data.images import load_sample_images
    from edgeq.runtime.parity import check_artifacts, failed_artifacts, format_parity_table

    images = load_sample_images(args.data or calib_dir(), args.num_images)
    results = check_artifacts(reference, artifacts, images, threads=args.threads)
    print(f"parity against {reference} on {len(images)} images:")
    print(format_parity_table(results))
    _write_json(args.json, {"reference": str(reference), "images": len(images),
                            "artifacts": {k: v.to_dict() for k, v in results.items()}})
    failed = failed_artifacts(results, args.max_rel_l2, args.min_agreement)
    if failed:
        print(f"FAILED: {', '.join(failed)} (budget: rel L2 <= {args.max_rel_l2:g}, "
              f"detection agreement mAP50-95 >= {args.min_agreement:g})")
    return {"results": results, "failed": failed}


def cmd_calibrate(args: argparse.Namespace) -> int:
    from edgeq.export.pipeline import calibrate_model

    table, out = calibrate_model(_model_source(args.weights), data=args.data, num_images=args.num_images,
                                 imgsz=args.imgsz, method=args.method, trust=args.trust_checkpoint, output=args.output)
    print(f"calibrated {len(table.tensors)} tensors on {table.image_count} images at {table.imgsz}x{table.imgsz}; "
          f"wrote {out} (default method {table.method})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from edgeq.export.finetune import FinetuneOptions
    from edgeq.export.pipeline import Int8Request, ParityRequest, export_model

    weights = _model_source(args.weights)
    int8 = None
    if args.int8 or args.table:
        int8 = Int8Request(
            data=Path(args.data) if args.data else None,
            table=Path(args.table) if args.table else None,
            method=args.method,
            num_images=args.calib_images,
            percentile=args.percentile,
            exclude=tuple(x for x in (args.float_nodes or "").split(",") if x),
            fallback=args.fallback,
            fallback_min_nsr=args.fallback_min_nsr,
            uint8_weights=args.uint8_weights,
            bias_images=args.bias_correction,
            head_outputs=args.head_outputs,
            ov_precision=args.ov_precision,
            max_map_drop=args.max_map_drop,
            budget_data=Path(args.budget_data) if args.budget_data else None,
            budget_images=args.budget_images,
            finetune=None if args.finetune is None else FinetuneOptions(steps=args.finetune),
        )
    parity = ParityRequest(data=Path(args.data) if args.data else None, num_images=args.num_images,
                           max_rel_l2=args.max_rel_l2, min_agreement=args.min_agreement, threads=args.threads)
    result = export_model(
        weights,
        formats=args.format,
        out_dir=args.out,
        imgsz=args.imgsz,
        batch=args.batch,
        dynamic=args.dynamic,
        half=args.half,
        opset=args.opset,
        rewrite=not args.no_rewrite,
        raw=args.raw,
        force=args.force,
        trust=args.trust_checkpoint,
        int8=int8,
        parity=parity,
    )
    for fmt, path in result.artifacts.items():
        print(f"wrote {fmt:<15} {path}")
    for key, rep in result.int8_reports.items():
        print(f"{key}: {rep.activations} activation and {rep.weights} weight tensors quantized"
              + (f", {len(rep.excluded)} node(s) kept float" if rep.excluded else "")
              + (f", {len(rep.float_tensors)} sensitive tensor(s) left float" if rep.float_tensors else ""))
    budgets = {key: rep.budget for key, rep in result.int8_reports.items() if rep.budget}
    if budgets:
        from edgeq.export.budget import format_budget_table

        print(format_budget_table(budgets))
    rep = result.deploy_report
    if rep:
        print(f"deploy graph: {len(rep['fused'])} BatchNorm folded, {len(rep['rewritten'])} hard activations "
              f"rewritten ({rep['form']} form), max relative error vs the original {rep['max_rel_error']:.1e}")
    if result.stage_seconds:
        print("stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.stage_seconds.items())
              + f" (total {sum(result.stage_seconds.values()):.1f} s)")
    payload = {"artifacts": {}, "stages_s": result.stage_seconds, "outputs": {k: str(v) for k, v in result.artifacts.items()}}
    if result.parity:
        from edgeq.runtime.parity import format_parity_table

        print(f"parity against {weights} on {result.parity_images} images:")
        print(format_parity_table(result.parity))
        payload.update(reference=str(weights), images=result.parity_images,
                       artifacts={k: v.to_dict() for k, v in result.parity.items()})
    if result.parity_failed:
        print(f"FAILED: {', '.join(result.parity_failed)} (budget: rel L2 <= {args.max_rel_l2:g}, "
              f"detection agreement mAP50-95 >= {args.min_agreement:g})")
    _write_json(args.json, payload)
    if int8 is not None and result.deployed():
        print("INT8 accuracy is judged by mAP, not by float parity budgets: run edgeq verify "
              f"{weights} {' '.join(str(p) for p in result.deployed())}")
    return 1 if result.parity_failed else 0


def cmd_verify(args: argparse.Namespace) -> int:
    from edgeq.data.demo import calib_dir, demo_data_yaml
    from edgeq.data.images import load_sample_images
    from edgeq.verify import format_verify_table, reference_backend, verify

    artifacts = list(args.artifacts)
    if args.reference or (args.weights and reference_backend(args.weights) != "torch"):
        if args.weights:
            artifacts.insert(0, args.weights)  # every positional is an artifact
        args.weights = args.reference  # None: the demo checkpoint
    weights = _model_source(args.weights)
    if args.report:  # fail before the long evaluation, not after it
        from edgeq.report import report_format
        from edgeq.utils.files import check_writable_dir

        report_format(args.report)
        check_writable_dir(Path(args.report).parent if str(Path(args.report).parent) else Path("."))
    images = load_sample_images(args.images or calib_dir(), args.num_images) if args.num_images else []
    report = verify(weights, artifacts, args.data or demo_data_yaml(), max_map_drop=args.max_map_drop,
                    parity_images=images, layers=5 if args.layers else 0, threads=args.threads,
                    trust=args.trust_checkpoint, latency_runs=args.latency_runs, min_speedup=args.min_speedup)
    print(f"{report['images']} labelled images ({report['data']}); drops in mAP points (0-100), "
          "parity against the PyTorch float model:")
    print(format_verify_table(report))
    _write_json(args.json, report)
    if args.report:
        from edgeq.report import write_report

        print(f"wrote {write_report(report, args.report)}")
    if not report["passed"]:
        budget = args.max_map_drop
        lost = [Path(a["artifact"]).name for a in report["artifacts"] if budget is not None and a["drop50_95"] > budget]
        slow = [Path(a["artifact"]).name for a in report["artifacts"] if not (a["latency"] or {}).get("passed", True)]
        if lost:
            print(f"FAILED: {', '.join(lost)} lost more than {budget:g} mAP50-95 points")
        if slow:
            print(f"FAILED: {', '.join(slow)} not at least {args.min_speedup:g}x faster than the float model at its "
                  "backend's default precision")
        return 1
    return 0


def cmd_parity(args: argparse.Namespace) -> int:
    return 1 if _print_parity(args.weights, args.artifacts, args)["failed"] else 0


def cmd_run(args: argparse.Namespace) -> int:
    from edgeq.runtime.run import run_source

    summary = run_source(
        _model_source(args.model), args.source, save_dir=args.save, conf_thres=args.conf, iou_thres=args.iou,
        threads=args.threads,
    )
    print(f"{summary['images']} images, {summary['detections']} detections"
          + (f"; wrote {summary['saved']} images and {summary['json']}" if args.save else ""))
    return 0


HANDLERS = {name.removeprefix("cmd_"): fn for name, fn in globals().items() if name.startswith("cmd_")}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = bool(getattr(args, "verbose", False))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")
    handler = HANDLERS.get(getattr(args, "handler", ""))
    if handler is None:
        parser.print_help()
        return 0
    try:
        return int(handler(args) or 0)
    except EdgeqError as exc:
        if verbose:
            raise
        print(f"edgeq {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
