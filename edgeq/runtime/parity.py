"""Numerical parity between a reference run and a candidate (another backend, an INT8 model).

Two views, because each alone misleads:

* tensor metrics on the raw output (cosine, max/mean abs error, relative L2, SNR): exact and
  sensitive, right for float exports where the error should be ~1e-6;
* detection agreement: the candidate's detections scored with COCO mAP against the reference's
  confident detections as ground truth. For INT8 models the raw tensors always differ; what
  matters is whether the boxes that would be shown still are.

Needs numpy, OpenCV and the COCO evaluator that :mod:`edgeq.runtime.evaluate` uses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.runtime.backends.base import Backend
from edgeq.runtime.evaluate import coco_map

if TYPE_CHECKING:
    from edgeq.runtime.detector import Detector

METRIC_KEYS = ("cosine", "max_abs", "mean_abs", "rel_l2", "snr_db")


def tensor_metrics(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """cosine, max_abs, mean_abs, rel_l2 = ||a-b|| / ||a||, snr_db = 10 log10(||a||^2 / ||a-b||^2).

    Computed in float64. Identical tensors give cosine 1, errors 0 and snr_db inf; a zero
    reference with a non-zero candidate gives rel_l2 inf and snr_db -inf.
    """
    a = np.asarray(reference, dtype=np.float64)
    b = np.asarray(candidate, dtype=np.float64)
    if a.shape != b.shape:
        raise EdgeqError(f"cannot compare outputs of different shapes: reference {a.shape}, candidate {b.shape}")
    if a.size == 0:
        return {"cosine": 1.0, "max_abs": 0.0, "mean_abs": 0.0, "rel_l2": 0.0, "snr_db": math.inf}
    a, b = a.ravel(), b.ravel()
    diff = a - b
    norm_a, norm_b, norm_d = (float(np.linalg.norm(v)) for v in (a, b, diff))
    if norm_a == 0.0 or norm_b == 0.0:
        cosine = 1.0 if norm_a == norm_b else 0.0
    else:
        cosine = float(np.dot(a, b) / (norm_a * norm_b))
    if norm_d == 0.0:
        rel_l2, snr_db = 0.0, math.inf
    elif norm_a == 0.0:
        rel_l2, snr_db = math.inf, -math.inf
    else:
        rel_l2 = norm_d / norm_a
        snr_db = 10.0 * math.log10(norm_a**2 / norm_d**2)
    abs_diff = np.abs(diff, out=diff)
    return {
        "cosine": cosine,
        "max_abs": float(np.max(abs_diff)),
        "mean_abs": float(np.mean(abs_diff)),
        "rel_l2": rel_l2,
        "snr_db": snr_db,
    }


def compare_outputs(
    reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], names: Sequence[str]
) -> list[dict]:
    """:func:`tensor_metrics` per output, each with its ``name`` and ``shape``."""
    if not len(reference) == len(candidate) == len(names):
        raise EdgeqError(
            f"output counts differ: reference {len(reference)}, candidate {len(candidate)}, names {len(names)}"
        )
    rows = []
    for name, ref, cand in zip(names, reference, candidate):
        try:
            metrics = tensor_metrics(ref, cand)
        except EdgeqError as exc:
            raise EdgeqError(f"output {name}: {exc}") from None
        rows.append({"name": str(name), "shape": list(np.shape(ref)), **metrics})
    return rows


def error_histograms(reference: np.ndarray, candidate: np.ndarray, bins: int = 41,
                     confident_obj: float = 0.25) -> list[dict]:
    """Histograms of the signed error (candidate - reference) of a detection output, per part.

    A decoded output (..., 5 + classes) is split into box x/y/w/h (pixels, only where the float
    model's objectness is at least ``confident_obj``), objectness and class scores, because their
    errors live on different scales and matter differently; any other output is one part. Bins are symmetric around 0 and span the 99.9th percentile of the
    absolute error; errors beyond it are counted in the end bins (``clipped`` says how many).
    """
    a = np.asarray(reference, dtype=np.float64)
    b = np.asarray(candidate, dtype=np.float64)
    if a.shape != b.shape:
        raise EdgeqError(f"cannot compare outputs of different shapes: reference {a.shape}, candidate {b.shape}")
    err = b - a
    if err.ndim >= 2 and err.shape[-1] >= 6:
        confident = a[..., 4] >= confident_obj  # boxes of anchors that find nothing are never shown
        box = err[confident][:, :4] if confident.any() else err[..., :4]
        parts = [(f"box x, y, w, h (pixels), objectness >= {confident_obj:g}", box), ("objectness", err[..., 4]),
                 ("class scores", err[..., 5:])]
    else:
        parts = [("output", err)]
    out = []
    for name, values in parts:
        values = values.ravel()
        finite = values[np.isfinite(values)]
        span = float(np.percentile(np.abs(finite), 99.9)) if finite.size else 0.0
        span = span if span > 0 else 1e-6
        counts, edges = np.histogram(np.clip(finite, -span, span), bins=bins, range=(-span, span))
        out.append({"part": name, "edges": edges.tolist(), "counts": counts.tolist(),
                    "clipped": int((np.abs(finite) > span).sum()), "non_finite": int(values.size - finite.size),
                    "mean_abs": float(np.abs(finite).mean()) if finite.size else 0.0})
    return out


def _visible(dets: np.ndarray) -> np.ndarray:
    """(K, 6) float64 detections with positive width and height."""
    dets = np.asarray(dets, dtype=np.float64).reshape(-1, 6)
    return dets[(dets[:, 2] > dets[:, 0]) & (dets[:, 3] > dets[:, 1])]


def detection_agreement(
    reference_dets: Sequence[np.ndarray],
    candidate_dets: Sequence[np.ndarray],
    image_shapes: Sequence[tuple[int, int]],
    names: Sequence[str],
    score_thres: float = 0.25,
) -> dict[str, Any]:
    """COCO mAP50 / mAP50-95 of the candidate's detections against the reference's as ground truth.

    Reference detections with score >= ``score_thres`` become ground truth; the candidate's
    are scored as they are (lower-scored ones only extend its recall). Zero-area boxes (boxes
    in the letterbox padding, clipped flat to the image border) are dropped from both: COCO
    IoU of two flat boxes is 0, so identical outputs would otherwise not agree. When the
    reference has no confident box at all, agreement is 1.0 if the candidate has none either,
    else 0.0.
    """
    if not len(reference_dets) == len(candidate_dets) == len(image_shapes):
        raise EdgeqError(
            f"detection lists differ in length: reference {len(reference_dets)}, "
            f"candidate {len(candidate_dets)}, image shapes {len(image_shapes)}"
        )
    truths, preds = [], []
    for ref, cand in zip(reference_dets, candidate_dets):
        ref, cand = _visible(ref), _visible(cand)
        ref = ref[ref[:, 4] >= score_thres]
        truths.append(np.concatenate([ref[:, 5:6], ref[:, 0:4]], axis=1))  # cls, x1, y1, x2, y2
        preds.append(cand)
    n_ref = int(sum(len(t) for t in truths))
    n_cand = int(sum(int((p[:, 4] >= score_thres).sum()) for p in preds))
    result = {"score_thres": float(score_thres), "reference_boxes": n_ref, "candidate_boxes": n_cand}
    if n_ref == 0:
        agree = 1.0 if n_cand == 0 else 0.0
        return {"map50": agree, "map50_95": agree, **result}
    metrics = coco_map(preds, truths, image_shapes, names)
    return {"map50": metrics["map50"], "map50_95": metrics["map50_95"], **result}


@dataclass
class ParityResult:
    """Parity of one candidate against the reference: per-output metrics plus detection agreement."""

    outputs: list[dict] = field(default_factory=list)
    agreement: dict[str, Any] | None = None
    reference: str = ""
    candidate: str = ""
    error_histograms: list[dict] = field(default_factory=list)

    def worst_rel_l2(self) -> float:
        values = [float(o["rel_l2"]) for o in self.outputs]
        return max(values, key=lambda v: math.inf if math.isnan(v) else v) if values else 0.0

    def passed(self, rel_l2_max: float | None, agreement_min: float | None, metric: str = "map50_95") -> bool:
        """Every output's rel_l2 <= ``rel_l2_max`` and agreement[``metric``] >= ``agreement_min``.

        A None threshold skips that check (INT8 candidates are judged on agreement only); NaN
        never passes.
        """
        if rel_l2_max is not None:
            worst = self.worst_rel_l2()
            if math.isnan(worst) or worst > rel_l2_max:
                return False
        if agreement_min is not None:
            if self.agreement is None:
                return False
            value = float(self.agreement.get(metric, math.nan))
            if math.isnan(value) or value < agreement_min:
                return False
        return True

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: non-finite floats become the strings "inf", "-inf", "nan"."""
        return _jsonable({"reference": self.reference, "candidate": self.candidate,
                          "outputs": self.outputs, "agreement": self.agreement,
                          "error_histograms": self.error_histograms})


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return v if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
    if isinstance(value, np.integer):
        return int(value)
    return value


def parity_check(
    reference: Detector,
    candidate: Detector,
    images: Sequence[np.ndarray],
    *,
    score_thres: float = 0.25,
    conf_thres: float = 0.001,
    cache: dict | None = None,
    histograms: bool = True,
) -> ParityResult:
    """Run two Detectors on the same images; compare raw outputs and detections.

    Both see the identical preprocessed batch (the reference's ``imgsz``). Detections use
    NMS at ``conf_thres`` so the candidate's low-scored boxes count towards recall. ``cache``
    (a dict kept by the caller) holds the reference's outputs per input size, so comparing
    several candidates with one reference runs the reference once. ``histograms=False`` skips
    the error histograms (the report page draws them; on a 640 x 640, 80-class output they cost
    3 s per candidate).
    """
    key = tuple(reference.imgsz)
    if cache is not None and key in cache:
        batch, infos, ref_raw = cache[key]
    else:
        batch, infos = reference.preprocess(images)
        ref_raw = reference.predict_raw(batch)
        if cache is not None:
            cache[key] = (batch, infos, ref_raw)
    cand_raw = candidate.predict_raw(batch)
    outputs = compare_outputs([ref_raw], [cand_raw], [reference.backend.outputs[0].name])
    saved = reference.conf_thres, candidate.conf_thres
    try:
        reference.conf_thres = candidate.conf_thres = conf_thres
        ref_dets, cand_dets = reference.postprocess(ref_raw, infos), candidate.postprocess(cand_raw, infos)
    finally:
        reference.conf_thres, candidate.conf_thres = saved
    shapes = [info.orig_shape for info in infos]
    agreement = detection_agreement(ref_dets, cand_dets, shapes, reference.names, score_thres=score_thres)
    return ParityResult(outputs=outputs, agreement=agreement, reference=str(reference.backend.path),
                        candidate=str(candidate.backend.path),
                        error_histograms=error_histograms(ref_raw, cand_raw) if histograms else [])


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    v = float(value)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return format(v, spec)


def format_parity_table(results: dict[str, ParityResult]) -> str:
    """One row per candidate output: tensor metrics and detection agreement, aligned for logs."""
    header = ("Candidate", "Output", "cosine", "max_abs", "mean_abs", "rel_l2", "SNR dB", "mAP50", "mAP50-95")
    rows = []
    for label, res in results.items():
        agree = res.agreement or {}
        for out in res.outputs or [{"name": "-"}]:
            rows.append((
                str(label), str(out.get("name", "-")),
                _fmt(out.get("cosine"), ".6f"), _fmt(out.get("max_abs"), ".3e"), _fmt(out.get("mean_abs"), ".3e"),
                _fmt(out.get("rel_l2"), ".3e"), _fmt(out.get("snr_db"), ".1f"),
                _fmt(agree.get("map50"), ".4f"), _fmt(agree.get("map50_95"), ".4f"),
            ))
    widths = [max(len(header[j]), *(len(r[j]) for r in rows)) if rows else len(header[j]) for j in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join([cells[0].ljust(widths[0]), cells[1].ljust(widths[1]),
                          *(c.rjust(w) for c, w in zip(cells[2:], widths[2:]))])

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def check_artifacts(
    reference: str | Path | Backend,
    artifacts: Sequence[str | Path],
    images: Sequence[np.ndarray],
    *,
    threads: int | None = None,
    histograms: bool = True,
) -> dict[str, ParityResult]:
    """Parity of each artifact against ``reference`` (a path, usually the .pt, or a loaded
    backend such as the export's own PyTorch model) on the same images; ``histograms``: see
    :func:`parity_check`.

    The reference runs at each artifact's input size; OpenVINO artifacts run at the precision
    they record (``edgeq.ov_precision``: what the runtime will run), else with an explicit f32
    hint, so a float IR is compared as float, never in OpenVINO's default bf16.
    """
    from edgeq.runtime.detector import Detector

    shared = isinstance(reference, Backend)  # the caller's: used for every artifact, closed by the caller
    results: dict[str, ParityResult] = {}
    cache: dict = {}  # the reference runs once per input size
    for artifact in artifacts:
        with Detector(artifact, threads=threads) as candidate:  # at the precision it records, else f32
            ref = Detector(reference, imgsz=candidate.imgsz)
            try:
                results[str(artifact)] = parity_check(ref, candidate, images, cache=cache, histograms=histograms)
            finally:
                if not shared:
                    ref.close()
    return results


def failed_artifacts(results: dict[str, ParityResult], max_rel_l2: float | None, min_agreement: float | None
                     ) -> list[str]:
    """The artifacts of :func:`check_artifacts` outside the budget: the parity verdict."""
    return [name for name, r in results.items() if not r.passed(max_rel_l2, min_agreement)]
