"""Latency of the hard-swish/hard-sigmoid spellings on ONNX Runtime CPU and OpenVINO CPU.

Why: ``edgeq.export.hard_act`` spells h-swish as ReLU6 arithmetic for deployment, and the order of
the final multiplies changes what a runtime can fuse. This measures, on the seed
yolov5s-mobilenetv3-small (random weights, randomized BN statistics, BN folded), each form:

* ``original``: ``nn.Hardswish``/``nn.Hardsigmoid`` -> ONNX HardSwish/HardSigmoid ops;
* ``seed``: the seed ``h_swish``/``h_sigmoid`` modules as written (Add, Clip, Div, Mul);
* ``div`` / ``mul`` / ``mul_first``: the deploy forms of ``rewrite_hard_activations``.

All (backend, form) pairs are timed interleaved, in a shuffled order each round, so that load
from other processes hits every form alike; the median of ``--runs`` batch-1 runs is printed as
a markdown table. OpenVINO runs with ``INFERENCE_PRECISION_HINT=f32`` (its CPU default may be
bf16, which is not an fp32 number). Run: ``python bench/activation_forms.py --sizes 320``.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from edgeq.export.bn_fold import fuse_conv_bn
from edgeq.export.hard_act import HARD_FORMS, rewrite_hard_activations
from edgeq.models.mobilenet import h_sigmoid, h_swish
from edgeq.models.yolo import DetectionModel

FORMS = ("original", "seed", *HARD_FORMS)
THREADS = 2


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics so that folding is exercised like on a trained model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.2)


def to_torch_hard_ops(model: nn.Module) -> nn.Module:
    """Seed h_swish/h_sigmoid -> nn.Hardswish/nn.Hardsigmoid (exported as HardSwish/HardSigmoid)."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is h_swish:
                setattr(parent, name, nn.Hardswish())
            elif type(child) is h_sigmoid:
                setattr(parent, name, nn.Hardsigmoid())
    return model


def build_forms(nc: int = 8) -> dict[str, nn.Module]:
    """One fused eval model per activation form."""
    torch.manual_seed(0)
    base = DetectionModel("yolov5s-mobilenetv3-small", nc=nc)
    randomize_bn(base)
    fused, _ = fuse_conv_bn(base)
    models = {"original": to_torch_hard_ops(fused), "seed": fused}
    for form in HARD_FORMS:
        models[form] = rewrite_hard_activations(fused, form=form)[0]
    return models


def export(model: nn.Module, size: int, path: Path) -> Path:
    x = torch.zeros(1, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, x, str(path), dynamo=False, opset_version=17, input_names=["images"], output_names=["output0"]
        )
    return path


def ort_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"images": x})[0]


def ov_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": THREADS, "PERFORMANCE_HINT": "LATENCY"}
    compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    precision = compiled.get_property("INFERENCE_PRECISION_HINT")
    if precision != ov.Type.f32:
        raise RuntimeError(f"OpenVINO did not keep f32 (got {precision})")
    request = compiled.create_infer_request()
    return lambda x: request.infer({0: x})[compiled.output(0)]


def measure(runners: dict[tuple[str, str], Callable], x: np.ndarray, runs: int, warmup: int) -> dict:
    """Median ms per (backend, form), all timed interleaved in a shuffled order per round."""
    keys = list(runners)
    for _ in range(warmup):
        for key in keys:
            runners[key](x)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in keys}
    rng = random.Random(0)
    for _ in range(runs):
        rng.shuffle(keys)
        for key in keys:
            t0 = time.perf_counter()
            runners[key](x)
            times[key].append((time.perf_counter() - t0) * 1e3)
    return {key: statistics.median(v) for key, v in times.items()}


def check_outputs(runners: dict, x: np.ndarray) -> dict:
    """Max abs difference of each form to ``original`` on the same backend (sanity)."""
    diffs = {}
    for (backend, form), run in runners.items():
        ref = runners[(backend, "original")](x)
        diffs[(backend, form)] = float(np.abs(run(x) - ref).max())
    return diffs


def table(size: int, medians: dict, diffs: dict) -> str:
    backends = sorted({b for b, _ in medians})
    head = "| form | " + " | ".join(f"{b} ms (vs original)" for b in backends) + " |"
    lines = [f"### {size}x{size}, batch 1, median ms", "", head, "|---" * (len(backends) + 1) + "|"]
    for form in FORMS:
        cells = []
        for b in backends:
            ms, base = medians[(b, form)], medians[(b, "original")]
            cells.append(f"{ms:.2f} ({ms / base - 1:+.1%}; max abs diff {diffs[(b, form)]:.1e})")
        lines.append(f"| {form} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[320, 640])
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    models = build_forms()
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            runners = {}
            for form, model in models.items():
                path = export(model, size, Path(tmp) / f"{form}_{size}.onnx")
                runners[("onnxruntime", form)] = ort_runner(path)
                runners[("openvino-f32", form)] = ov_runner(path)
            x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
            diffs = check_outputs(runners, x)
            medians = measure(runners, x, args.runs, args.warmup)
            print(table(size, medians, diffs), flush=True)


if __name__ == "__main__":
    main()
