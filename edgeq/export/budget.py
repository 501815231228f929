"""``export --int8 --max-map-drop X``: per flavour, the fastest graph whose measured drop holds the budget.

A fixed fallback count buys accuracy with speed whether the model needs it or not; the right
settings differ from model to model (docs/BENCHMARKS.md). The search starts from the fastest
graph (all-integer, fine-tuned where the export fine-tunes) and leaves activation tensors float
in the order of the one sensitivity ranking, one level at a time (LEVELS). At each level every
speed-for-accuracy choice the flavour has is a candidate, tried in the order of expected speed,
each measured once, and the search stops at the first candidate whose drop holds the budget:

- the head convolutions' outputs per channel, then float (flavours that quantize conv outputs);
- the OpenVINO precision of the ops left float: the backend's default (bf16 on CPUs with it),
  then f32;
- bias correction on, then off (same speed: off is only an accuracy alternative); the better
  of the two on the first level is kept for the others.

Fewer float tensors come first because each one costs more time than any of these choices
(docs/BENCHMARKS.md). Every candidate tried is then timed interleaved with the float model of
its backend, for the record. When none holds the budget, the one with the smallest drop is
written and the export says so. TensorRT candidates are scored on ONNX Runtime (a proxy:
TensorRT does not run here) and not timed.
"""

from __future__ import annotations

import itertools
import logging
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from edgeq.flavours import Flavour

log = logging.getLogger("edgeq")

LEVELS = (0, 1, 2, 4, 8, 16)  # float tensors tried, in sensitivity order
LATENCY_RUNS = 30  # interleaved rounds timing the candidates


@dataclass
class Candidate:
    """One graph and runtime setting the search measured."""

    float_tensors: tuple[str, ...]
    head_outputs: str | None  # None: the flavour's default
    bias_correction: bool
    ov_precision: str | None  # OpenVINO only
    drop: float | None = None  # labelled mAP50-95 points (estimated from agreement without labels)
    raw: float | None = None  # the measure's own gap in points
    ms: float | None = None
    speedup: float | None = None  # float model on the same backend / this
    path: Path | None = None
    model: object | None = field(default=None, repr=False)  # the Q/DQ ModelProto
    report: object | None = field(default=None, repr=False)

    def row(self) -> dict:
        return {"float_tensors": len(self.float_tensors), "head_outputs": self.head_outputs,
                "bias_correction": self.bias_correction, "ov_precision": self.ov_precision,
                "drop": _round(self.drop), "raw": _round(self.raw), "ms": _round(self.ms),
                "speedup": _round(self.speedup)}

    def describe(self) -> str:
        parts = [f"{len(self.float_tensors)} float tensors"]
        if self.head_outputs:
            parts.append(f"head outputs {self.head_outputs}")
        parts.append("bias corrected" if self.bias_correction else "no bias correction")
        if self.ov_precision:
            parts.append(f"OpenVINO {self.ov_precision}")
        return ", ".join(parts)


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(float(x), digits)


@dataclass
class BudgetChoice:
    chosen: Candidate
    met: bool
    record: dict  # the ``budget`` entry of the edgeq.int8 record


@dataclass
class SearchInputs:
    """What one flavour's search reads: everything comes from stages that already ran."""

    weights: object  # the float ModelProto whose weights are quantized (the fine-tuned one where it exists)
    table: object  # CalibrationTable
    opts: object  # Int8Options: the flavour's base options (exclude, learned scales, ...)
    ranked: Sequence[str]  # the sensitivity ranking's tensors, worst first
    bias_batches: Sequence[np.ndarray]  # calibration inputs for bias correction; empty: none
    finetuned: bool = False
    float_onnx: Path | None = None  # the latency baseline
    head_outputs: str | None = None  # pinned by the user; None: a candidate each
    ov_precision: str | None = None  # pinned by the user; None: a candidate each


def _head_choices(flavour: Flavour, pinned: str | None) -> list[str | None]:
    conv = flavour.policy.rules.get("Conv")
    if pinned or not (conv and conv.output):  # only a flavour quantizing conv outputs has head outputs to choose
        return [pinned]
    return ["per-channel", "float"]  # faster first


def _precision_choices(flavour: Flavour, pinned: str | None) -> list[str | None]:
    if flavour.backend != "openvino":
        return [None]
    return [pinned] if pinned else ["default", "f32"]


def _scoring_backend(flavour: Flavour) -> str:
    return "onnxruntime" if flavour.backend == "tensorrt" else flavour.backend


def _build_level(flavour: Flavour, inputs: SearchInputs, tensors: tuple[str, ...], heads, bias_options) -> dict:
    """(head, bias) -> (Q/DQ ModelProto, report) for one level of float tensors."""
    from edgeq.export.int8 import quantize_model

    opts = {head: replace(inputs.opts, float_tensors=tensors, head_outputs=head or inputs.opts.head_outputs)
            for head in heads}
    built = {(head, False): quantize_model(inputs.weights, inputs.table, flavour, opts[head]) for head in heads}
    if True in bias_options:
        from edgeq.export.bias_correction import apply_bias_shifts, bias_shifts

        q_models = {str(head): built[(head, False)][0] for head in heads}
        shifts = bias_shifts(inputs.weights, q_models, inputs.bias_batches)
        for head in heads:
            q, report = quantize_model(apply_bias_shifts(inputs.weights, shifts[str(head)]), inputs.table, flavour,
                                       opts[head])
            report.bias_corrected = len(shifts[str(head)])
            built[(head, True)] = (q, report)
    return built


def search(flavour: Flavour, inputs: SearchInputs, judge, max_drop: float, *, progress: bool = True,
           latency_runs: int = LATENCY_RUNS) -> BudgetChoice:
    """The first candidate of ``flavour``, in the order of expected speed, whose drop
    (``judge``) is at most ``max_drop``; else the one with the smallest drop."""
    from edgeq.export.int8 import write_int8
    from edgeq.utils.progress import progress_bar

    start = time.perf_counter()
    heads = _head_choices(flavour, inputs.head_outputs)
    precisions = _precision_choices(flavour, inputs.ov_precision)
    if inputs.finetuned or not len(inputs.bias_batches):  # a fine-tune started from the corrected biases
        bias_options = [False]
    else:
        bias_options = [True, False]
    levels = [n for n in LEVELS if n <= len(inputs.ranked)]
    backend = _scoring_backend(flavour)
    tried: list[Candidate] = []
    with tempfile.TemporaryDirectory(prefix=f"edgeq-budget-{flavour.name}-") as tmp, \
            progress_bar(desc=f"budget {flavour.name}", unit="candidate", enabled=progress) as bar:
        for n in levels:
            tensors = tuple(inputs.ranked[:n])
            built = _build_level(flavour, inputs, tensors, heads, bias_options)
            for head, precision, bias in itertools.product(heads, precisions, bias_options):  # fastest first
                q, report = built[(head, bias)]
                path = Path(tmp) / f"n{n}-{head}-{int(bias)}.onnx"
                if not path.is_file():
                    write_int8(q, flavour, {"budget_candidate": True}, path)
                c = Candidate(tensors, head, bias, precision, path=path, model=q, report=report)
                scored = judge.score(path, backend, precision)
                c.drop, c.raw = scored.drop, scored.raw
                tried.append(c)
                bar.update(1)
                bar.set_postfix(float_tensors=n, drop=f"{c.drop:.2f}")
                if c.drop <= max_drop:
                    break
            if tried[-1].drop <= max_drop:
                break
            if len(bias_options) > 1:  # bias correction is decided once, on the all-integer graph
                mean = {b: np.mean([c.drop for c in tried if c.bias_correction == b]) for b in bias_options}
                bias_options = [min(bias_options, key=lambda b: mean[b])]
        if flavour.backend != "tensorrt" and latency_runs:
            _time(tried, flavour, inputs.float_onnx, latency_runs, judge.threads, progress)
    chosen, met = _choose(tried, max_drop)  # leaves as a ModelProto: the pipeline writes it with its record
    seconds = time.perf_counter() - start
    for c in tried:
        c.path = None
        if c is not chosen:
            c.model = c.report = None
    record = {"max_map_drop": max_drop, "measure": judge.measure, "met": met, "seconds": round(seconds, 1),
              "finetuned": inputs.finetuned,
              "chosen": tried.index(chosen), "candidates": [c.row() for c in tried]}
    (log.info if met else log.warning)(
        "%s: %s budget %.2f points: %s, drop %.2f%s (%d candidates, %.0f s)", flavour.name,
        "holds the" if met else "CANNOT hold the", max_drop, chosen.describe(), chosen.drop,
        f", {chosen.ms:.2f} ms" if chosen.ms else "", len(tried), seconds)
    if not met:
        log.warning("%s: the closest artifact is written; raise --max-map-drop, fine-tune (--finetune) or give "
                    "labelled --budget-data for a measured rather than estimated drop", flavour.name)
    return BudgetChoice(chosen, met, record)


def _time(tried: list[Candidate], flavour: Flavour, float_onnx: Path | None, runs: int, threads: int | None,
          progress: bool) -> None:
    """Median latency of every candidate and of the float model on the same backend, interleaved."""
    from edgeq.runtime.latency import Timed, measure, plan_for

    models = [Timed(str(c.path), flavour.backend, c.ov_precision) for c in tried]
    baseline = None
    if float_onnx is not None:
        plan = plan_for(str(tried[0].path), flavour.backend, float_onnx, True)
        baseline = next((b.model for b in plan.baselines if b.default), None)
    timed = measure(models + ([baseline] if baseline else []), runs=runs, warmup=5, threads=threads,
                    progress=progress)
    for c, m in zip(tried, models):
        c.ms = timed[m.key]["ms"]
        if baseline is not None and c.ms:
            c.speedup = timed[baseline.key]["ms"] / c.ms


def _choose(tried: list[Candidate], max_drop: float) -> tuple[Candidate, bool]:
    """The candidate that holds the budget (the search stops at the first), else the closest."""
    if tried[-1].drop <= max_drop:
        return tried[-1], True
    return min(tried, key=lambda c: c.drop), False


def summary_rows(flavour: str, record: dict) -> list[list[str]]:
    """Rows of the export summary's table of candidates (the chosen one marked)."""
    rows = []
    for i, c in enumerate(record["candidates"]):
        mark = "chosen" if i == record["chosen"] else ""
        rows.append([flavour if not rows else "", str(c["float_tensors"]), c["head_outputs"] or "-",
                     "on" if c["bias_correction"] else ("before fine-tune" if record.get("finetuned") else "off"),
                     c["ov_precision"] or "-", f"{c['drop']:.2f}",
                     f"{c['ms']:.2f}" if c["ms"] is not None else "-",
                     f"{c['speedup']:.2f}x" if c["speedup"] is not None else "-", mark])
    return rows


def format_budget_table(records: dict[str, dict]) -> str:
    """The candidates every flavour's search measured, as an aligned text table."""
    header = ["flavour", "float tensors", "head outputs", "bias", "OpenVINO", "drop", "ms", "vs float", ""]
    rows = [header] + [r for name, rec in records.items() for r in summary_rows(name, rec)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    first = next(iter(records.values()))
    notes = [f"budget {first['max_map_drop']:g} mAP50-95 points, measured by {first['measure']}"]
    for name, rec in records.items():
        if not rec["met"]:
            notes.append(f"{name}: no candidate holds the budget; the closest one was written")
    return "\n".join(lines + notes)
