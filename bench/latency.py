"""Median batch-1 latency of one model on every CPU backend, all runners interleaved in one run.

Rows: PyTorch eager fp32, ONNX Runtime fp32, OpenVINO with an explicit f32 hint, OpenVINO bf16
(its default on CPUs with AVX-512 BF16 or AMX: reported as its own row, never as fp32), each
for the deploy graph (h-swish rewritten) and the original activations. Runners are timed in
turn, round after round, so machine noise hits all of them alike; compare ratios.

    python bench/latency.py                                   # demo model + seed small at 640
    python bench/latency.py --model yolov5s-mobilenetv3-small --imgsz 640 --runs 100
    python bench/latency.py --json latency.json

Results go to stdout as a markdown table (copy into docs/BENCHMARKS.md with the machine line).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def random_checkpoint(cfg: str, imgsz: int, folder: Path, nc: int = 80) -> Path:
    """Random weights with randomized BN statistics (untrained BN would make the graph trivial)."""
    import torch

    from edgeq.models.checkpoint import save_checkpoint
    from edgeq.models.yolo import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel(cfg, nc=nc)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    return save_checkpoint(model.eval(), folder / f"{cfg}-random.pt", imgsz=imgsz, names=[str(i) for i in range(nc)])


def build_runners(weights: Path, imgsz: int, threads: int, folder: Path) -> dict:
    """Every runner; an OpenVINO precision the CPU does not have (it falls back silently) is dropped."""
    import warnings

    from edgeq.export.pipeline import export_model
    from edgeq.runtime.backends import load_backend

    runners = {"PyTorch eager fp32": load_backend(weights, threads=threads)}
    for rewrite, tag in ((True, "rewrite"), (False, "original act.")):
        out = folder / ("rw" if rewrite else "orig")
        arts = export_model(weights, formats="onnx,openvino", out_dir=out, imgsz=imgsz, rewrite=rewrite, force=True).artifacts
        runners[f"ONNX Runtime fp32, {tag}"] = load_backend(arts["onnx"], threads=threads, spin=False)
        runners[f"OpenVINO f32, {tag}"] = load_backend(arts["openvino"], threads=threads, precision="f32")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bf16 = load_backend(arts["openvino"], threads=threads, precision="bf16")
        if bf16.inference_precision == "bf16":
            runners[f"OpenVINO bf16, {tag}"] = bf16
        else:
            print(f"note: OpenVINO runs a bf16 request as {bf16.inference_precision} on this CPU; no bf16 row")
    return runners


def measure(runners: dict, imgsz: int, runs: int, warmup: int) -> dict[str, float]:
    x = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(warmup):
        for runner in runners.values():
            runner.infer(x)
    for _ in range(runs):
        for name, runner in runners.items():
            t0 = time.perf_counter()
            runner.infer(x)
            times[name].append((time.perf_counter() - t0) * 1000)
    return {name: statistics.median(v) for name, v in times.items()}


def table(title: str, medians: dict[str, float], baseline: str) -> str:
    lines = [f"**{title}**", "", "| runner | median ms | vs ONNX Runtime fp32 (rewrite) |", "|---|---|---|"]
    for name, ms in medians.items():
        lines.append(f"| {name} | {ms:.1f} | {ms / medians[baseline]:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", help="checkpoint or bundled config (random weights); repeatable")
    p.add_argument("--imgsz", type=int, action="append", help="size per --model (default: checkpoint's, 640 for configs)")
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the medians here")
    args = p.parse_args(argv)

    import torch

    from edgeq.data.demo import demo_weights
    from edgeq.models.checkpoint import load_model

    torch.set_num_threads(args.threads)
    models = args.model or [str(demo_weights()), "yolov5s-mobilenetv3-small"]
    sizes = args.imgsz or [None] * len(models)
    results = {}
    print(f"machine: {platform.processor() or platform.machine()}, {args.threads} threads, python {sys.version.split()[0]}, "
          f"torch {torch.__version__}; median of {args.runs} interleaved runs after {args.warmup} warm-up, batch 1\n")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for model, size in zip(models, sizes):
            if Path(model).suffix == ".pt":
                weights, imgsz = Path(model), size or load_model(model).imgsz or 640
            else:
                imgsz = size or 640
                weights = random_checkpoint(model, imgsz, folder)
            runners = build_runners(weights, imgsz, args.threads, folder / weights.stem)
            medians = measure(runners, imgsz, args.runs, args.warmup)
            title = f"{Path(model).name} at {imgsz}x{imgsz}"
            results[title] = medians
            print(table(title, medians, "ONNX Runtime fp32, rewrite") + "\n", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
