"""Which activation tensors hurt the head's outputs most when quantized alone, worst first.

Per-tensor scales fail where one tensor mixes channels of very different ranges; ranking every
tensor a flavour quantizes by the noise it causes at the head finds those, whatever the
calibrator, and the fallback leaves the worst ones float. Every tensor counts, not only
convolution inputs: on the trained demo model the stem convolution's output is the worst
tensor of int8-ort (docs/BENCHMARKS.md).

How it stays fast: one ONNX Runtime session holds the whole graph with a switchable Q/DQ pair on
every candidate tensor (``Where(switch[i], DQ(Q(t)), t)``), so measuring a set of tensors is one
run with their switches on, not a graph rewrite and a new session per tensor. A screening on one
image finds the worst tensors by splitting groups of them (best first), without a run per
tensor; only those are then scored on every image. The score is the noise-to-signal ratio at
the head convolutions' outputs (summed over the three scales), with the logits clipped to
+-LOGIT_LIMIT where the sigmoid stops moving.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from edgeq.flavours import Flavour
from edgeq.graph import DEQUANTIZED, LOGIT_LIMIT, QUANTIZED, consumers, head_tensors, insert_nodes
from edgeq.utils.progress import progress_bar

SWITCH_INPUT = "edgeq_sensitivity_switch"


def switchable_model(model, ranges: dict, flavour: Flavour, tensors: Sequence[str], *,
                     exclude: frozenset[str] = frozenset()):
    """A copy of float ``model`` where input ``SWITCH_INPUT`` (bool, one per tensor) turns the
    Q/DQ pair of each of ``tensors`` on or off. Constant operands are quantized as the flavour
    quantizes them; weights stay float, so each switch measures one activation tensor alone."""
    from onnx import TensorProto, helper, numpy_helper

    from edgeq.export.qdq import quantize_onnx
    from edgeq.export.qdq_plan import activation_params

    base, _ = quantize_onnx(model, ranges, flavour, exclude=exclude, only_tensors=set(), weights=False)
    graph = base.graph
    dtypes = {"int8": np.int8, "uint8": np.uint8}
    users = consumers(graph)
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output}
    added: dict[int, list] = {}
    inits = []
    for i, tensor in enumerate(tensors):
        scale, zp, dtype = activation_params(*ranges[tensor], flavour.policy.activations)
        base_name = f"{tensor}_switch"
        inits += [numpy_helper.from_array(np.array(scale, np.float32), f"{base_name}_scale"),
                  numpy_helper.from_array(np.array(zp, dtypes[dtype]), f"{base_name}_zero_point"),
                  numpy_helper.from_array(np.array(i, np.int64), f"{base_name}_index")]
        switched = f"{base_name}ed"
        for node in users.get(tensor, []):
            if node.name in exclude:
                continue
            for j, name in enumerate(node.input):
                if name == tensor:
                    node.input[j] = switched
        q_params = [f"{base_name}_scale", f"{base_name}_zero_point"]
        added.setdefault(producer.get(tensor, -1) + 1, []).extend([
            helper.make_node("QuantizeLinear", [tensor, *q_params], [f"{base_name}{QUANTIZED}"]),
            helper.make_node("DequantizeLinear", [f"{base_name}{QUANTIZED}", *q_params], [f"{base_name}{DEQUANTIZED}"]),
            helper.make_node("Gather", [SWITCH_INPUT, f"{base_name}_index"], [f"{base_name}_on"], axis=0),
            helper.make_node("Where", [f"{base_name}_on", f"{base_name}{DEQUANTIZED}", tensor], [switched]),
        ])
    insert_nodes(graph, added)
    graph.initializer.extend(inits)
    graph.input.append(helper.make_tensor_value_info(SWITCH_INPUT, TensorProto.BOOL, [len(tensors)]))
    return base


def tensor_sensitivity(
    float_model,
    ranges: dict,
    flavour: Flavour,
    tensors: Sequence[str],
    batches: Sequence[np.ndarray],
    *,
    exclude: frozenset[str] = frozenset(),
    keep: int | None = 16,
    group: int = 8,
    screen_images: int = 1,
    min_nsr: float = 0.0,
    progress: bool = True,
) -> list[dict]:
    """Rank ``tensors`` by the noise each one, quantized alone, causes at the head.

    ``batches``: preprocessed (1, 3, H, W) float32 inputs. With ``keep``, a screening on the
    first ``screen_images`` finds the ``keep`` worst tensors without measuring each: groups of
    ``group`` neighbouring tensors are switched on together (their noise adds up, so a group
    scores at least as high as any of its members), and the worst group is split in halves
    until single tensors come out, best first. Those ``keep`` come first, scored on every batch
    (``images`` says how many); the other tensors follow with their group's score as an upper
    bound (``bound``: True). The search stops early once no group left reaches half of
    ``min_nsr`` (the floor the fallback applies). ``keep=None`` scores every tensor on every batch.
    Returns ``[{"tensor", "nsr", "images", "bound"}]``.
    """
    import heapq
    import itertools

    from edgeq.graph import session_with_outputs

    if not tensors:
        return []
    heads = head_tensors(float_model.graph)
    reference = session_with_outputs(type(float_model).FromString(float_model.SerializeToString()), heads)
    input_name = float_model.graph.input[0].name
    feeds = [np.ascontiguousarray(b, dtype=np.float32) for b in batches]
    refs = [[np.clip(r, -LOGIT_LIMIT, LOGIT_LIMIT).astype(np.float64) for r in reference.run(heads, {input_name: b})]
            for b in feeds]
    session = session_with_outputs(switchable_model(float_model, ranges, flavour, tensors, exclude=exclude), heads)
    index = {t: i for i, t in enumerate(tensors)}
    screen = max(1, min(screen_images, len(feeds)))

    def measure(members: Sequence[str], images: range, bar) -> tuple[float, float]:
        """(signal, noise) summed over ``images`` with ``members`` quantized."""
        switch = np.zeros(len(tensors), dtype=bool)
        switch[[index[t] for t in members]] = True
        signal = noise = 0.0
        for k in images:
            got = session.run(heads, {input_name: feeds[k], SWITCH_INPUT: switch})
            for r, g in zip(refs[k], got):
                signal += float(np.square(r).sum())
                noise += float(np.square(r - np.clip(g, -LOGIT_LIMIT, LOGIT_LIMIT)).sum())
            bar.update(1)
        return signal, noise

    def nsr(signal: float, noise: float) -> float:
        return noise / max(signal, 1e-30)

    every = range(len(feeds))
    with progress_bar(desc=f"sensitivity {flavour.name}", unit="run", enabled=progress) as bar:
        if keep is None or keep >= len(tensors) or screen >= len(feeds):
            rows = [{"tensor": t, "nsr": nsr(*measure([t], every, bar)), "images": len(feeds), "bound": False}
                    for t in tensors]
            return sorted(rows, key=lambda r: -r["nsr"])
        order = itertools.count()
        screened: dict[str, tuple[float, float]] = {}  # a single tensor's screening sums, reused below

        def push(members: list[str]) -> None:
            sums = measure(members, range(screen), bar)
            if len(members) == 1:
                screened[members[0]] = sums
            heapq.heappush(heap, (-nsr(*sums), next(order), members))

        heap: list = []
        for i in range(0, len(tensors), group):
            push(list(tensors[i:i + group]))
        found: list[str] = []
        # stop once the worst group left is well below the floor the caller applies: a group
        # scores at least as high as each of its members
        while heap and len(found) < keep and -heap[0][0] >= min_nsr / 2:
            _, _, members = heapq.heappop(heap)
            if len(members) == 1:
                found.append(members[0])
                continue
            half = len(members) // 2
            push(members[:half])
            push(members[half:])
        best = []
        for t in found:
            signal, noise = measure([t], range(screen, len(feeds)), bar)
            first = screened[t]
            best.append({"tensor": t, "nsr": nsr(signal + first[0], noise + first[1]), "images": len(feeds),
                         "bound": False})
    rest = [{"tensor": t, "nsr": -bound, "images": screen, "bound": True}
            for bound, _, members in sorted(heap) for t in members]
    return sorted(best, key=lambda r: -r["nsr"]) + rest


def rank_tensors(float_model, table, flavour: Flavour | str, batches: Sequence[np.ndarray], opts=None, *,
                 keep: int | None = 16, min_nsr: float = 0.0, progress: bool = True) -> list[dict]:
    """:func:`tensor_sensitivity` of every activation the flavour (with ``opts``, an
    :class:`~edgeq.export.int8.Int8Options`) quantizes, ranges from ``table``.
    ``float_model``: a ModelProto or the path of the float ONNX."""
    import onnx

    from edgeq.export.int8 import Int8Options, flavour_of, flavour_ranges
    from edgeq.export.qdq_plan import plan

    opts = opts or Int8Options()
    model = float_model if hasattr(float_model, "graph") else onnx.load(str(float_model))
    resolved = flavour_of(flavour, opts)
    exclude = frozenset(opts.exclude)
    tensors = plan(model, resolved, exclude).activations
    return tensor_sensitivity(model, flavour_ranges(table, resolved, opts), resolved, tensors, batches, exclude=exclude,
                              keep=keep, min_nsr=min_nsr, progress=progress)


# A tensor whose quantization alone leaves the head outputs above 50 dB SNR is not worth a
# float layer: on the demo model the 80 tensors below the 8 worst add up to NSR 2e-4 and cost at
# most about 0.1 mAP50-95 point together, while each float tensor costs OpenVINO real time. On a
# random-weight model every tensor is far below (1e-9 and less), so nothing is left float there.
FALLBACK_MIN_NSR = 1e-5


def fallback_tensors(ranked: list[dict], count: int, min_nsr: float = FALLBACK_MIN_NSR) -> tuple[str, ...]:
    """The tensors to leave float: the ``count`` worst of ``ranked`` (:func:`tensor_sensitivity`)
    whose noise-to-signal ratio is at least ``min_nsr``."""
    return tuple(r["tensor"] for r in ranked[:count] if r["nsr"] >= min_nsr)
