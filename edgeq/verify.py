"""``edgeq verify``: what quantization (or any export) cost, per backend, against the float model.

For every artifact: mAP50 and mAP50-95 on labelled data through the one preprocessing and NMS
path, the drop against the PyTorch float checkpoint in mAP points (0-100 scale), tensor parity
and detection agreement on sample images, optionally the layers that lose the most (SNR of
every Conv output against the float ONNX), and the latency of each INT8 artifact next to the float
model on the same backend at its default precision (:mod:`edgeq.runtime.latency`). A drop above the
budget, or a speed-up below ``min_speedup``, fails the run.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from edgeq import flavours
from edgeq.errors import EdgeqError

log = logging.getLogger("edgeq")


@dataclass
class ArtifactScore:
    artifact: str
    backend: str
    flavour: str
    map50: float
    map50_95: float
    drop50: float  # mAP points (0-100 scale) lost against float
    drop50_95: float
    parity: dict = field(default_factory=dict)
    worst_layers: list[dict] = field(default_factory=list)
    layer_snr_db: list[list] = field(default_factory=list)  # [node, SNR dB or None for exact] of every Conv, worst first
    passed: bool = True
    ms_per_image: float | None = None  # inside the backend during evaluation (batch 1, not a benchmark)
    calibration: dict = field(default_factory=dict)  # what an INT8 artifact records about its calibration
    latency: dict = field(default_factory=dict)  # edgeq.runtime.latency.latency_entry: ms, float baselines, speed-up


def evaluate_artifact(path: str, dataset, *, threads: int | None = None, progress: bool = True) -> dict:
    from edgeq.runtime.detector import Detector
    from edgeq.runtime.evaluate import evaluate

    with Detector(path, threads=threads) as det:  # OpenVINO: the recorded precision, else f32
        if len(det.names) != len(dataset.names):
            raise EdgeqError(f"{path} predicts {len(det.names)} classes but the data set has {len(dataset.names)}")
        batch = det.backend.inputs[0].shape[0] if det.backend.inputs[0].is_static(0) else 8
        result = evaluate(det.predict_raw, dataset, det.imgsz[0], list(dataset.names), batch_size=batch,
                          progress=progress)
        result["backend"] = det.backend.name
        result["imgsz"] = det.imgsz[0]
        result["flavour"] = det.backend.meta.flavour
    return result


def layer_snr(float_onnx: str | Path, quant_onnx: str | Path, images: Sequence[np.ndarray], imgsz: int) -> list[dict]:
    """Per Conv of ``quant_onnx``: SNR (dB) of its output against the float model, and the noise
    it adds (noise-to-signal ratio of the output minus that of its input: the error this layer
    introduces, not what it inherits). Sorted by SNR, worst first.

    Head outputs are compared clipped to +-LOGIT_LIMIT: past it the sigmoid is flat, so a logit
    of -35 read back as -8 costs no detection, and an unclipped comparison would rank the heads
    worst for an error that does not exist.
    """
    import onnx

    from edgeq.graph import LOGIT_LIMIT, NORMALIZED_SUFFIX, float_name, head_tensors, run_with_outputs, tensor_names
    from edgeq.runtime.preprocess import preprocess_batch

    qgraph = onnx.load(str(quant_onnx), load_external_data=False).graph
    fgraph = onnx.load(str(float_onnx), load_external_data=False).graph
    fnames = tensor_names(fgraph)
    convs = []
    for n in qgraph.node:
        src = float_name(n.input[0]) if n.input else ""
        out = n.output[0] if n.output else ""
        if out.endswith(NORMALIZED_SUFFIX) and out.removesuffix(NORMALIZED_SUFFIX) in fnames:
            out = out.removesuffix(NORMALIZED_SUFFIX)  # a head with per-channel ranges: the restored logits
        if n.op_type == "Conv" and out in fnames and src in fnames:
            convs.append((n.name, n.input[0], src, out))
    if not convs:
        raise EdgeqError(f"{quant_onnx} shares no Conv tensor with the float model; is it an edgeq export?")
    fetch_q = list(dict.fromkeys([c[1] for c in convs] + [c[3] for c in convs]))
    heads = set(head_tensors(fgraph))
    fetch_f = [float_name(name) for name in fetch_q]
    signal = np.zeros(len(fetch_q))
    noise = np.zeros(len(fetch_q))

    def values(path, graph, names: list[str], batch: np.ndarray) -> dict[str, np.ndarray]:
        """``names`` by name for one batch; the graph input is the batch itself, not a fetch."""
        fetch = [n for n in names if n != graph.input[0].name]
        return {graph.input[0].name: batch, **dict(zip(fetch, run_with_outputs(path, fetch, batch)))}

    for image in images:
        batch = preprocess_batch([image], imgsz)[0]
        ref_map = values(float_onnx, fgraph, fetch_f, batch)
        got_map = values(quant_onnx, qgraph, fetch_q, batch)
        for i, (fq, ff) in enumerate(zip(fetch_q, fetch_f)):
            r, g = ref_map[ff].astype(np.float64), got_map[fq]
            if ff in heads:
                r, g = np.clip(r, -LOGIT_LIMIT, LOGIT_LIMIT), np.clip(g, -LOGIT_LIMIT, LOGIT_LIMIT)
            signal[i] += float(np.square(r).sum())
            noise[i] += float(np.square(r - g).sum())
    snr = {name: (math.inf if n == 0 else 10 * math.log10(max(s, 1e-30) / n)) for name, s, n in zip(fetch_q, signal, noise)}
    rows = []
    for node, q_in, _, out in convs:
        s_in, s_out = snr[q_in], snr[out]
        added = 10 ** (-s_out / 10) - 10 ** (-s_in / 10)  # inf SNR -> 0 noise
        rows.append({"node": node, "tensor": out, "snr_db": s_out, "input_snr_db": s_in, "added_nsr": added})
    return sorted(rows, key=lambda r: r["snr_db"])


def reference_backend(weights: str | Path) -> str:
    """The backend the float reference runs on: "torch" for a checkpoint, else the artifact's own."""
    from edgeq.runtime.backends import SUFFIXES

    return SUFFIXES.get(Path(str(weights)).suffix.lower(), "torch")


def _onnx_of(artifact: str) -> Path | None:
    """The QDQ ONNX an artifact was built from (itself, or the IR's sibling of the same stem)."""
    p = Path(artifact)
    if p.suffix == ".onnx":
        return p
    sibling = p.with_suffix(".onnx")
    return sibling if sibling.exists() else None


def float_onnx_of(artifact: str, record: dict, weights: str | Path) -> Path | None:
    """The float ONNX an INT8 artifact was made from: the reference itself when it is one, else
    the file its ``edgeq.int8`` record names, next to the artifact (export writes them side by
    side). None when neither is there; verify never rebuilds it from the checkpoint."""
    if str(weights).endswith(".onnx"):
        return Path(str(weights))
    name = record.get("float_onnx")
    candidate = Path(artifact).parent / name if name else None
    return candidate if candidate is not None and candidate.is_file() else None


def verify(
    weights: str | Path,
    artifacts: Sequence[str | Path],
    data: str | Path,
    *,
    max_map_drop: float | None = None,
    parity_images: Sequence[np.ndarray] = (),
    layers: int = 0,
    threads: int | None = None,
    progress: bool = True,
    trust: bool = False,
    latency_runs: int = 50,
    min_speedup: float | None = None,
) -> dict:
    """Score ``artifacts`` against the float ``weights`` on the labelled ``data``; see the module doc.

    ``weights`` is the PyTorch checkpoint, or on a device without PyTorch the float artifact
    (e.g. ``best.onnx``) the INT8 ones are compared with. ``latency_runs``: timed runs per model
    (0: no latency); ``min_speedup``: the least speed-up over float an INT8 artifact must show.
    """
    from edgeq.data.yolo import YoloDataset
    from edgeq.graph import int8_record
    from edgeq.runtime.parity import check_artifacts

    if not artifacts:
        raise EdgeqError("verify needs at least one artifact (.onnx, .xml, .engine)")
    if min_speedup is not None and latency_runs <= 0:
        raise EdgeqError("--min-speedup needs the latency measurement; do not combine it with --latency-runs 0")
    for a in artifacts:
        if not Path(a).exists():
            raise EdgeqError(f"{a} does not exist")
    dataset = YoloDataset(data, split="val")
    references: dict[int, dict] = {}  # the float model, at each artifact's input size

    float_artifact = reference_backend(weights) != "torch"  # a float artifact: a device without torch

    def reference_at(size: int) -> dict:
        if size not in references:
            if float_artifact:
                references[size] = evaluate_artifact(str(weights), dataset, threads=threads, progress=progress)
            else:
                from edgeq.validate import evaluate_model  # imports torch, only where the reference is a checkpoint

                references[size] = evaluate_model(weights, dataset, imgsz=size, trust=trust, progress=progress)
        return references[size]

    scores: list[ArtifactScore] = []
    parity = check_artifacts(weights, [str(a) for a in artifacts], list(parity_images), threads=threads) if parity_images else {}
    for artifact in map(str, artifacts):
        result = evaluate_artifact(artifact, dataset, threads=threads, progress=progress)
        reference = reference_at(result["imgsz"])
        record = int8_record(artifact)
        score = ArtifactScore(
            artifact=artifact,
            backend=result["backend"],
            flavour=result["flavour"],
            map50=result["map50"],
            map50_95=result["map50_95"],
            drop50=100.0 * (reference["map50"] - result["map50"]),
            drop50_95=100.0 * (reference["map50_95"] - result["map50_95"]),
            parity=parity[artifact].to_dict() if artifact in parity else {},
            ms_per_image=result.get("speed_ms_per_image"),
            calibration=record,
        )
        if layers and parity_images and flavours.is_int8(result["flavour"]):
            qonnx, float_onnx = _onnx_of(artifact), float_onnx_of(artifact, record, weights)
            if qonnx is None or float_onnx is None:
                log.warning("%s: no per-layer SNR (--layers): %s not found next to it", Path(artifact).name,
                            "its Q/DQ ONNX" if qonnx is None else f"the float ONNX {record.get('float_onnx', '')!r}")
            else:
                every = layer_snr(float_onnx, qonnx, list(parity_images)[:8], reference["imgsz"])
                score.worst_layers = every[:layers]
                score.layer_snr_db = [[r["node"], round(r["snr_db"], 2) if math.isfinite(r["snr_db"]) else None]
                                      for r in every]
        if max_map_drop is not None:
            score.passed = score.drop50_95 <= max_map_drop
        scores.append(score)
    if latency_runs > 0:
        _time_artifacts(scores, weights, parity_images, latency_runs, min_speedup, threads, progress)
    first = next(iter(references.values()))
    return {
        "weights": str(weights),
        "data": str(data),
        "images": first["images"],
        "float": {"map50": first["map50"], "map50_95": first["map50_95"], "imgsz": next(iter(references))},
        "float_by_imgsz": {str(k): {"map50": v["map50"], "map50_95": v["map50_95"]} for k, v in references.items()},
        "max_map_drop": max_map_drop,
        "min_speedup": min_speedup,
        "artifacts": [s.__dict__ for s in scores],
        "passed": all(s.passed for s in scores),
    }


def _time_artifacts(scores: list[ArtifactScore], weights, images, runs: int, min_speedup: float | None,
                    threads: int | None, progress: bool) -> None:
    """Fill each score's ``latency``: all artifacts and their float baselines timed in one interleaved run."""
    from edgeq.runtime.latency import latency_entry, measure, plan_for

    plans = [plan_for(s.artifact, s.backend, float_onnx_of(s.artifact, s.calibration, weights),
                      flavours.is_int8(s.flavour)) for s in scores]
    models = [m for p in plans for m in [p.artifact, *(b.model for b in p.baselines)]]
    timed = measure(models, list(images), runs=runs, threads=threads, progress=progress)
    for score, plan in zip(scores, plans):
        score.latency = latency_entry(plan, timed, min_speedup if flavours.is_int8(score.flavour) else None)
        score.passed = score.passed and score.latency["passed"]


def table_rows(report: dict, *, timing: bool = False) -> list[list[str]]:
    """Header and one row per model (float first) of a :func:`verify` report, as strings.

    ``timing`` adds the time per image inside the backend during evaluation (the report page).
    """
    header = ["artifact", "backend", "flavour", "mAP50", "mAP50-95", "drop50", "drop50-95", "rel L2", "agree50-95",
              *(["ms/image"] if timing else []), "verdict"]
    f = report["float"]
    backend = reference_backend(report["weights"])
    first = "float (PyTorch)" if backend == "torch" else f"float ({Path(report['weights']).name})"  # --reference
    rows = [header, [first, backend, "float", f"{f['map50']:.4f}", f"{f['map50_95']:.4f}", "-", "-", "-", "-",
                     *(["-"] if timing else []), ""]]
    for s in report["artifacts"]:
        out = (s["parity"].get("outputs") or [{}])[0]
        agree = s["parity"].get("agreement") or {}
        budget = report["max_map_drop"]
        verdict = "" if budget is None else ("ok" if s["drop50_95"] <= budget else "FAIL")
        ms = s.get("ms_per_image")
        rows.append([
            Path(s["artifact"]).name, s["backend"], s["flavour"], f"{s['map50']:.4f}", f"{s['map50_95']:.4f}",
            f"{s['drop50']:+.2f}", f"{s['drop50_95']:+.2f}",
            f"{out['rel_l2']:.2e}" if "rel_l2" in out else "-",
            f"{agree['map50_95']:.4f}" if "map50_95" in agree else "-",
            *([f"{ms:.1f}" if ms is not None else "-"] if timing else []), verdict,
        ])
    return rows


def _widths(rows: list[list[str]]) -> list[int]:
    return [max(len(r[j]) for r in rows) for j in range(len(rows[0]))]


def _aligned(rows: list[list[str]], left: set[int]) -> list[str]:
    """``rows`` as text columns: the ``left`` columns flush left, the others flush right."""
    widths = _widths(rows)
    return ["  ".join(c.ljust(w) if j in left else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in rows]


def format_verify_table(report: dict) -> str:
    rows = table_rows(report)
    lines = _aligned(rows, left={0, 1, 2})
    lines.insert(1, "  ".join("-" * w for w in _widths(rows)))
    from edgeq.runtime.latency import latency_rows, latency_summary

    latency = latency_rows(report)
    if latency:
        lines.append(f"\nlatency ({latency_summary(report)}):")
        lines += _aligned(latency, left={0, 1, 3, 4})
    for s in report["artifacts"]:
        if s["worst_layers"]:
            lines.append(f"\nworst layers of {Path(s['artifact']).name} (SNR of the Conv output vs float):")
            lines += [f"  {r['snr_db']:6.1f} dB  (adds noise/signal {r['added_nsr']:.3f})  {r['node']}"
                      for r in s["worst_layers"]]
    return "\n".join(lines)
