"""Label-free fine-tuning of the exact INT8 graph: distil the float model into its Q/DQ twin.

Post-training tricks leave the all-integer demo graph 1.2-1.8 mAP50-95 points short of float,
spread over the whole network. This stage trains the flavour's own Q/DQ graph
(:class:`edgeq.export.qdq_torch.QdqModule`: same quantized tensors, scales, zero points, integer
ranges, per-channel weight rounding) so that its head logits match the float model's on the
calibration images, with a straight-through gradient through every rounding. No labels: the
float model's outputs are the targets, so the images users already calibrate with suffice.
Activation scales stay the calibration table's; the trained float weights go back into the
float ONNX and through the normal Q/DQ rewrite, so what was trained is what ships.

The recipe (steps, batch, learning rate, loss) was chosen by measurement on the demo model
(docs/BENCHMARKS.md, "Fine-tuning the all-integer graph").
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from edgeq.errors import EdgeqError


@dataclass
class FinetuneOptions:
    steps: int = 200
    batch: int = 8
    lr: float = 3e-5  # Adam on weights and biases, cosine decay to 0 over the steps
    seed: int = 0
    flip: bool = True  # light augmentation: half the batches mirrored left-right
    jitter: float = 0.0  # and zoomed by a random factor in [1 - jitter, 1 + jitter], cropped or padded back
    block_weight: float = 1.0  # weight of the block outputs' relative MSE beside the head loss (0: head only)
    learn_scales: bool = True  # LSQ: train the activation scales too (log-parametrized, lr scale_lr)
    scale_lr: float = 1e-3
    threads: int | None = None  # torch threads; None: torch's default (every core)

    @classmethod
    def from_record(cls, record: dict) -> FinetuneOptions:
        """The options a calibration table's fine-tune record was made with (to repeat the run)."""
        names = {f for f in cls.__dataclass_fields__ if f != "threads"}
        return cls(**{k: v for k, v in record.items() if k in names})


@dataclass
class FinetuneResult:
    model: object  # the float ONNX ModelProto with the trained weights and biases
    record: dict  # what the calibration table and the artifact record about the run
    scales: dict | None = None  # learned activation scales (tensor -> scale), with learn_scales


def head_loss(student: Sequence, teacher: Sequence, outputs_per_anchor: int | None = None):
    """How far the student's detections are from the teacher's, from the head logits.

    With the YOLO layout known (``outputs_per_anchor`` = 5 + classes), the comparison is made
    where detections are decided, on the sigmoids the decode reads: the box as the decode
    scales it (centre error relative to the box size, log ratio of width and height: what
    IoU at 0.5-0.95 responds to), objectness, and classes; box and class terms weighted by the
    teacher's objectness (background anchors, most of them, carry no box), everything summed
    over anchors and divided by the teacher's total objectness (its object count). Without the
    layout: the logits' MSE relative to the teacher's mean square.
    """
    total = 0.0
    for s, t in zip(student, teacher):
        if outputs_per_anchor is None or t.shape[1] % outputs_per_anchor:
            total = total + ((s - t) ** 2).mean() / (t ** 2).mean().clamp_min(1e-8)
            continue
        shape = (t.shape[0], -1, outputs_per_anchor, *t.shape[2:])
        ps, pt = s.reshape(shape).sigmoid(), t.reshape(shape).sigmoid()
        weight = pt[:, :, 4:5]
        size = (2 * pt[:, :, 2:4]) ** 2  # the decode: width, height = (2 sigmoid)^2 x anchor
        centre = (2 * (ps[:, :, 0:2] - pt[:, :, 0:2]) / size.clamp_min(0.05)) ** 2
        extent = (2 * (_safe_log(ps[:, :, 2:4]) - _safe_log(pt[:, :, 2:4]))) ** 2
        box = ((centre + extent) * weight).sum()
        obj = ((ps[:, :, 4] - pt[:, :, 4]) ** 2).sum()
        cls = (((ps[:, :, 5:] - pt[:, :, 5:]) ** 2) * weight).sum()
        total = total + (box + obj + cls) / weight.sum().clamp_min(1.0)
    return total / len(student)


def _safe_log(x):
    """log, floored at 1e-6 (a sigmoid that underflowed to 0)."""
    return x.clamp_min(1e-6).log()


def _outputs_per_anchor(float_model) -> int | None:
    import json

    from edgeq.graph import metadata_of

    names = metadata_of(float_model).get("edgeq.names")
    return len(json.loads(names)) + 5 if names else None


def zoom(batch: np.ndarray, factor: float, rng) -> np.ndarray:
    """``batch`` zoomed by ``factor`` about a random point, cropped or padded (letterbox grey) to its size."""
    import cv2

    n, c, h, w = batch.shape
    nh, nw = max(8, round(h * factor)), max(8, round(w * factor))
    out = np.full_like(batch, 114 / 255)
    for i in range(n):
        img = cv2.resize(batch[i].transpose(1, 2, 0), (nw, nh), interpolation=cv2.INTER_LINEAR).reshape(nh, nw, c)
        img = img.transpose(2, 0, 1)
        dy, dx = int(rng.integers(0, abs(nh - h) + 1)), int(rng.integers(0, abs(nw - w) + 1))
        if factor >= 1:
            out[i] = img[:, dy:dy + h, dx:dx + w]
        else:
            out[i, :, dy:dy + nh, dx:dx + nw] = img
    return out


def block_tensors(graph) -> list[str]:
    """The outputs of each top-level module (``/model.N/...`` nodes) that later modules read:
    the feature maps a block-wise distillation compares (the head's own outputs excluded)."""
    from edgeq.graph import consumers, decode_nodes, head_tensors

    def block(name: str) -> str | None:
        parts = name.split("/")
        return parts[1] if len(parts) > 2 and parts[0] == "" else None

    heads, decode = set(head_tensors(graph)), decode_nodes(graph)
    readers = consumers(graph)
    found = []
    for node in graph.node:
        owner = block(node.name)
        if owner is None or node.name in decode or node.op_type == "Constant":
            continue
        for out in node.output:
            if out in heads:
                continue
            if any(block(r.name) != owner and r.name not in decode for r in readers.get(out, [])):
                found.append(out)
    return list(dict.fromkeys(found))


class _Teacher:
    """The float model in ONNX Runtime, returning the tensors the loss compares."""

    def __init__(self, float_model, names: list[str]):
        import onnx

        from edgeq.graph import session_with_outputs

        self.names = names
        self.session = session_with_outputs(onnx.ModelProto.FromString(float_model.SerializeToString()), names)
        self.input = self.session.get_inputs()[0].name

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        outs = [self.session.run(self.names, {self.input: batch[i:i + 1]}) for i in range(len(batch))]
        return [np.concatenate([o[j] for o in outs]) for j in range(len(self.names))]


def finetune(float_model, q_model, images: np.ndarray, opts: FinetuneOptions | None = None, *,
             progress: bool = True, desc: str = "fine-tune", init=None) -> FinetuneResult:
    """Train ``q_model``'s weights and biases (initialized from ``float_model`` and ``q_model``)
    to reproduce ``float_model``'s head logits on ``images`` (N, 3, H, W float32 inputs).

    ``init``: a float ONNX of the same graph whose weights the student starts from instead of
    ``float_model``'s (another flavour's fine-tuned weights); ``q_model`` must be quantized from it."""
    import torch

    from edgeq.export.qdq_torch import QdqModule, trained_float_model
    from edgeq.graph import head_tensors
    from edgeq.utils.progress import progress_bar

    opts = opts or FinetuneOptions()
    if opts.steps < 1 or opts.batch < 1:
        raise EdgeqError(f"fine-tune steps and batch must be >= 1, got {opts.steps} and {opts.batch}")
    if len(images) == 0:
        raise EdgeqError("the fine-tune needs calibration images, and none were read")
    images = np.asarray(images, dtype=np.float32)
    heads = head_tensors(float_model.graph)
    blocks = block_tensors(float_model.graph) if opts.block_weight else []
    start = time.perf_counter()
    teacher_model = _Teacher(float_model, heads + blocks)
    student = QdqModule(q_model, heads + blocks, init if init is not None else float_model,
                        learn_scales=opts.learn_scales)
    layout = _outputs_per_anchor(float_model)
    threads = torch.get_num_threads()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    rng = np.random.default_rng(opts.seed)
    torch.manual_seed(opts.seed)
    groups = [{"params": [*student.weights.values(), *student.biases.values()], "lr": opts.lr}]
    if opts.learn_scales:
        groups.append({"params": list(student.log_scales.values()), "lr": opts.scale_lr})
    optim = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda i: 0.5 * (1 + math.cos(math.pi * i / opts.steps)))
    losses: list[float] = []
    order = rng.permutation(len(images))
    cursor = 0
    try:
        with progress_bar(total=opts.steps, desc=desc, unit="step", enabled=progress) as bar:
            for step in range(opts.steps):
                if cursor + opts.batch > len(order):
                    order, cursor = rng.permutation(len(images)), 0
                pick = order[cursor:cursor + opts.batch]
                cursor += opts.batch
                mirrored = bool(opts.flip and rng.random() < 0.5)
                x = np.ascontiguousarray(images[pick][..., ::-1] if mirrored else images[pick])
                if opts.jitter:
                    x = zoom(x, float(rng.uniform(1 - opts.jitter, 1 + opts.jitter)), rng)
                teacher = [torch.from_numpy(t) for t in teacher_model(x)]
                outs = student(torch.from_numpy(x))
                loss = head_loss(outs[:len(heads)], teacher[:len(heads)], layout)
                if blocks:
                    loss = loss + opts.block_weight * sum(
                        ((s - t) ** 2).mean() / (t ** 2).mean().clamp_min(1e-8)
                        for s, t in zip(outs[len(heads):], teacher[len(heads):])) / len(blocks)
                optim.zero_grad(set_to_none=True)
                loss.backward()
                optim.step()
                sched.step()
                losses.append(float(loss.detach()))
                bar.update()
                bar.set_postfix(loss=f"{np.mean(losses[-8:]):.4f}")
    finally:
        torch.set_num_threads(threads)
    trained = trained_float_model(float_model, student)
    record = {
        **{k: v for k, v in asdict(opts).items() if k != "threads"},
        "images": int(len(images)),
        "loss": ("head: box (relative centre, log size), objectness and classes on the sigmoids, weighted by "
                 "the teacher's objectness" if layout else "head: logit MSE / teacher mean square")
                + (f"; + {opts.block_weight} x block outputs' relative MSE" if blocks else "")
                + "; the float model is the teacher, no labels",
        "loss_first": round(float(np.mean(losses[: min(8, len(losses))])), 6),
        "loss_last": round(float(np.mean(losses[-8:])), 6),
        "seconds": round(time.perf_counter() - start, 1),
    }
    return FinetuneResult(trained, record, student.learned_scales() if opts.learn_scales else None)
