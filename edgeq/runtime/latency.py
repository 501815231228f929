"""Is the INT8 artifact faster than the float model the user would otherwise run? (``edgeq verify``)

INT8 that is no faster than float is a common complaint, and on a CPU with bf16 it is easy to
miss: OpenVINO runs a float IR in bf16 by default there, so the baseline a user compares with is
not f32. For every artifact this measures the median latency next to the float model on the
same backend at that backend's default precision (OpenVINO: no precision hint, i.e. what
``compile_model`` picks; ONNX Runtime: fp32; TensorRT: the float engine beside it) and, for
OpenVINO, also at f32 as its own row. Every model is loaded once, warmed up, then timed
interleaved with the other models of its backend (one run of each per round, the order
rotating) on the same input, so that a machine busy with something else slows them all alike;
the backends take turns, so ONNX Runtime's spinning threads never overlap an OpenVINO run. Speed-up is float ms / artifact ms.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from edgeq.errors import EdgeqError

WARMUP = 10
RUNS = 50


@dataclass(frozen=True)
class Timed:
    """One model to time: ``precision`` is OpenVINO's (None: what the artifact records, else f32)."""

    path: str
    backend: str
    precision: str | None = None

    @property
    def key(self) -> tuple:
        return (self.path, self.backend, self.precision)


@dataclass
class Baseline:
    """The float model an artifact is compared with on its backend."""

    model: Timed
    default: bool  # the backend's default precision: the figure the speed-up is taken against
    label: str  # how the row names it, e.g. "float IR, OpenVINO default"


@dataclass
class LatencyPlan:
    artifact: Timed
    baselines: list[Baseline] = field(default_factory=list)
    note: str = ""  # why there is no baseline, when there is none


def plan_for(artifact: str, backend: str, float_onnx: Path | None, is_int8: bool) -> LatencyPlan:
    """What to time for ``artifact`` (run by ``backend``): itself and, for an INT8 artifact, the
    float model it was made from on the same backend (the float IR beside a float ONNX for
    OpenVINO, the float engine for TensorRT)."""
    plan = LatencyPlan(Timed(artifact, backend))
    if not is_int8:
        return plan
    if float_onnx is None:
        plan.note = "no float ONNX beside it (edgeq.int8 names it), so no float baseline"
        return plan
    if backend == "onnxruntime":
        plan.baselines.append(Baseline(Timed(str(float_onnx), "onnxruntime"), True, "float ONNX, fp32"))
    elif backend == "openvino":
        ir = float_onnx.with_suffix(".xml")
        source = ir if ir.is_file() and ir.with_suffix(".bin").is_file() else float_onnx
        what = "float IR" if source == ir else "float ONNX"
        plan.baselines.append(Baseline(Timed(str(source), "openvino", "default"), True, f"{what}, OpenVINO default"))
        plan.baselines.append(Baseline(Timed(str(source), "openvino", "f32"), False, f"{what}, f32"))
    elif backend == "tensorrt":
        engine = float_onnx.with_suffix(".engine")
        if engine.is_file():
            plan.baselines.append(Baseline(Timed(str(engine), "tensorrt"), True, "float engine, as built"))
        else:
            plan.note = f"no float engine {engine.name} beside it: export --format engine without --int8 makes one"
    return plan


def _input_for(runner, images: Sequence[np.ndarray]) -> np.ndarray:
    from edgeq.runtime.preprocess import preprocess_batch

    spec = runner.inputs[0]
    h, w = spec.shape[2], spec.shape[3]
    if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
        size = runner.meta.imgsz
        if size is None:
            raise EdgeqError(f"{runner.path.name}: dynamic input size and no edgeq.imgsz; cannot time it")
        h, w = size
    batch = spec.shape[0] if spec.is_static(0) else 1
    if images:
        x = preprocess_batch(list(images[:1]), h if h == w else (h, w))[0]
    else:
        x = np.random.default_rng(0).random((1, 3, h, w), dtype=np.float32)
    return np.repeat(x, batch, axis=0)


def measure(models: Sequence[Timed], images: Sequence[np.ndarray] = (), *, runs: int = RUNS, warmup: int = WARMUP,
            threads: int | None = None, progress: bool = True) -> dict[tuple, dict]:
    """Median ms per inference of every model (by :attr:`Timed.key`), timed interleaved.

    Returns ``{key: {"ms": median, "runs": n, "precision": what the backend ran at}}``.
    """
    from edgeq.runtime.backends import load_backend
    from edgeq.utils.progress import progress_bar

    unique = list({m.key: m for m in models}.values())
    loaded, inputs, times = [], [], []
    try:
        for m in unique:
            options = {"precision": m.precision} if m.backend == "openvino" else {}
            runner = load_backend(m.path, backend=m.backend, threads=threads, **options)
            loaded.append(runner)
            inputs.append(_input_for(runner, images))
            times.append([])
        # one backend at a time: ONNX Runtime's threads spin on after a run and would slow an
        # OpenVINO model timed right after it; within a backend, interleaved
        groups: dict[str, list[int]] = {}
        for i, m in enumerate(unique):
            groups.setdefault(m.backend, []).append(i)
        with progress_bar(total=runs * len(groups), desc="latency", unit="round", enabled=progress) as bar:
            for group in groups.values():
                for j in group:
                    for _ in range(warmup):
                        loaded[j].infer(inputs[j])
                for r in range(runs):
                    for i in range(len(group)):
                        j = group[(i + r) % len(group)]  # rotate, so no model always runs right after the same one
                        start = time.perf_counter()
                        loaded[j].infer(inputs[j])
                        times[j].append(1000.0 * (time.perf_counter() - start))
                    bar.update(1)
        return {m.key: {"ms": statistics.median(t), "runs": len(t), "precision": _precision(runner)}
                for m, t, runner in zip(unique, times, loaded)}
    finally:
        for runner in loaded:
            runner.close()


def _precision(runner) -> str:
    if runner.name == "openvino":
        chosen = runner.inference_precision or runner.precision
        return f"default ({chosen})" if runner.precision == "default" else chosen
    if runner.name == "onnxruntime":
        return "fp32 float ops"
    return "as built"


def latency_entry(plan: LatencyPlan, timed: dict[tuple, dict], min_speedup: float | None) -> dict:
    """The ``latency`` record of one artifact in the verify report."""
    own = timed[plan.artifact.key]
    entry = {"ms": own["ms"], "runs": own["runs"], "precision": own["precision"], "baselines": [],
             "speedup": None, "min_speedup": min_speedup, "passed": True, "note": plan.note}
    for b in plan.baselines:
        t = timed[b.model.key]
        speedup = t["ms"] / own["ms"] if own["ms"] > 0 else None
        entry["baselines"].append({"model": Path(b.model.path).name, "label": b.label, "precision": t["precision"],
                                   "default": b.default, "ms": t["ms"], "speedup": speedup})
        if b.default:
            entry["speedup"] = speedup
    if min_speedup is not None and plan.baselines:
        entry["passed"] = entry["speedup"] is not None and entry["speedup"] >= min_speedup
    return entry


def latency_rows(report: dict) -> list[list[str]]:
    """Header and rows of the latency table of a verify report (empty when nothing was timed)."""
    timed = [a for a in report["artifacts"] if a.get("latency")]
    if not timed:
        return []
    rows = [["artifact", "runs at", "ms", "float baseline", "baseline runs at", "float ms", "speed-up", "verdict"]]
    for a in timed:
        lat = a["latency"]
        name = Path(a["artifact"]).name
        verdict = "" if lat["min_speedup"] is None else ("ok" if lat["passed"] else "FAIL")
        if not lat["baselines"]:
            rows.append([name, lat["precision"], f"{lat['ms']:.2f}", lat["note"] or "-", "-", "-", "-", verdict])
        for i, b in enumerate(lat["baselines"]):
            rows.append([name if i == 0 else "", lat["precision"] if i == 0 else "", f"{lat['ms']:.2f}" if i == 0 else "",
                         b["label"] + ("" if b["default"] else " (for comparison)"), b["precision"], f"{b['ms']:.2f}",
                         f"{b['speedup']:.2f}x" if b["speedup"] else "-", verdict if b["default"] else ""])
    return rows


def latency_summary(report: dict) -> str:
    """One sentence on how the latency was measured, for the text table and the pages."""
    lat = next((a["latency"] for a in report["artifacts"] if a.get("latency")), None)
    if lat is None:
        return ""
    budget = report.get("min_speedup")
    return (f"median of {lat['runs']} interleaved runs per model, batch as the artifact's input, after {WARMUP} "
            "warm-up runs, on one preprocessed image; speed-up = float ms / artifact ms against the float model on "
            "the same backend at its default precision" + (f"; budget: at least {budget:g}x" if budget else ""))
