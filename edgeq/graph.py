"""Facts about edgeq's ONNX graphs that export, runtime and verify all need, torch-free.

Which tensors are the head's logits and which nodes are the detection decode, how a Q/DQ
rewrite names what it adds, where the ``edgeq.*`` metadata lives in each artifact, and how to
read intermediate tensors ("taps") with ONNX Runtime. Export writes graphs by these rules and
verify reads them back by the same rules, so neither imports the other. onnx, onnxruntime and
openvino are imported inside the functions that need them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from edgeq.errors import EdgeqError

WEIGHTED = {"Conv": 1, "Gemm": 1}  # op -> index of its weight input

# Every head output goes through a sigmoid. Beyond +-LOGIT_LIMIT it is flat (sigmoid(-8) = 3e-4,
# under the usual 0.001 confidence threshold even before objectness x class): calibration spends
# the levels where a logit still moves a box or a score, and comparisons clip there too.
LOGIT_LIMIT = 8.0

# How the Q/DQ rewrite names what it adds to a float tensor ``t``:
QUANTIZED = "_quantized"  # t_quantized: QuantizeLinear's output
DEQUANTIZED = "_dequantized"  # t_dequantized: what the consumers of t read instead
NORMALIZED_SUFFIX = "_normalized"  # a head conv with per-channel ranges writes t_normalized, restored to t

INT8_META = "edgeq.int8"  # JSON record of an INT8 artifact's calibration and placement
FLAVOUR_META = "edgeq.flavour"
OV_PRECISION_META = "edgeq.ov_precision"  # the OpenVINO precision an INT8 IR's float ops are meant to run at


def float_name(tensor: str) -> str:
    """The float tensor a Q/DQ graph's tensor stands for (``t_dequantized`` -> ``t``)."""
    return tensor.removesuffix(DEQUANTIZED)


# --------------------------------------------------------------------------- structure


def constants(graph) -> dict[str, np.ndarray]:
    """Initializers and Constant-node outputs by name."""
    from onnx import numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def consumers(graph) -> dict[str, list]:
    """Tensor name -> the nodes that read it."""
    users: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def decode_nodes(graph) -> set[str]:
    """Names of the nodes after the last convolution: the detection decode, never quantized.

    A node is part of the decode when it is not a Conv and no Conv/Gemm is reachable from it.
    """
    users = consumers(graph)
    feeds_conv: dict[str, bool] = {}

    def reaches_conv(node) -> bool:
        if node.name in feeds_conv:
            return feeds_conv[node.name]
        feeds_conv[node.name] = False  # cycle guard (ONNX graphs are acyclic)
        result = any(nxt.op_type in WEIGHTED or reaches_conv(nxt) for out in node.output for nxt in users.get(out, []))
        feeds_conv[node.name] = result
        return result

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph.node) + 100))
    try:
        return {n.name for n in graph.node if n.op_type not in WEIGHTED and n.op_type != "Constant" and not reaches_conv(n)}
    finally:
        sys.setrecursionlimit(limit)


def head_tensors(graph, decode: set[str] | None = None) -> list[str]:
    """The head convolutions' outputs: what the decode turns into boxes and scores."""
    decode = decode_nodes(graph) if decode is None else decode
    feeds = {name for n in graph.node if n.name in decode for name in n.input}
    return [n.output[0] for n in graph.node if n.op_type == "Conv" and n.output[0] in feeds]


def insert_nodes(graph, before: dict[int, list]) -> None:
    """Put ``before[i]`` ahead of node ``i`` (``i == len(graph.node)``: at the end), in place.

    How a rewrite adds nodes right after the producer of the tensor they read (index + 1;
    0 for a graph input) and keeps the graph topologically sorted.
    """
    ordered = []
    for i, node in enumerate(graph.node):
        ordered.extend(before.get(i, []))
        ordered.append(node)
    ordered.extend(before.get(len(graph.node), []))
    del graph.node[:]
    graph.node.extend(ordered)


def tensor_names(graph) -> set[str]:
    """Every tensor a node produces, and the graph's first input."""
    return {out for node in graph.node for out in node.output} | {graph.input[0].name}


# --------------------------------------------------------------------------- metadata


def set_metadata(proto, props: dict[str, str]) -> None:
    """Replace or add ``metadata_props`` entries of an ONNX ModelProto."""
    existing = {p.key: p for p in proto.metadata_props}
    for key, value in props.items():
        if key in existing:
            existing[key].value = value
        else:
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value


def metadata_of(proto) -> dict[str, str]:
    """An ONNX ModelProto's ``metadata_props`` as a dict."""
    return {p.key: p.value for p in proto.metadata_props}


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ONNX file's ``metadata_props`` (external weights are not loaded)."""
    import onnx

    return metadata_of(onnx.load(str(path), load_external_data=False))


def imgsz_of(props: dict[str, str]) -> int:
    """The (square) input size an edgeq ONNX was exported at, from its ``edgeq.imgsz`` metadata."""
    return int(json.loads(props.get("edgeq.imgsz", "[640]"))[0])


def read_imgsz(path: str | Path) -> int:
    """:func:`imgsz_of` an ONNX file."""
    return imgsz_of(read_metadata(path))


RT_INFO_ROOT = "edgeq"  # the IR's rt_info section holding the ONNX metadata


def read_rt_info(xml_path: str | Path) -> dict[str, str]:
    """The ``edgeq.*`` metadata of an OpenVINO IR, without compiling it."""
    try:
        import openvino as ov
    except ImportError:
        raise EdgeqError("OpenVINO is not installed", note="pip install openvino") from None
    model = ov.Core().read_model(str(xml_path))
    info = model.get_rt_info()
    if RT_INFO_ROOT not in info:
        return {}
    section = info[RT_INFO_ROOT]
    section = section.astype(dict) if hasattr(section, "astype") else section
    return {str(k): (v.astype(str) if hasattr(v, "astype") else str(v)) for k, v in dict(section).items()}


def artifact_metadata(path: str | Path) -> dict[str, str]:
    """``edgeq.*`` metadata of an ONNX or IR artifact; {} for other files."""
    path = str(path)
    if path.endswith(".onnx"):
        return read_metadata(path)
    if path.endswith(".xml"):
        return read_rt_info(path)
    return {}


def int8_record(path: str | Path) -> dict:
    """The ``edgeq.int8`` record of an INT8 artifact (ONNX metadata or IR rt_info), else {}."""
    try:
        return json.loads(artifact_metadata(path).get(INT8_META, "{}"))
    except (OSError, ValueError, EdgeqError):
        return {}


# --------------------------------------------------------------------------- taps


def session_with_outputs(model, names: list[str], *, basic: bool = False, threads: int | None = None,
                         spin: bool = True):
    """An ONNX Runtime session on ``model`` (a ModelProto, changed in place) that can also return
    the intermediate tensors ``names``. ``basic``: only basic graph optimizations, so fusions do
    not change what the observed tensors hold. ``spin=False``: ONNX Runtime's threads sleep
    between runs instead of busy-waiting, leaving the cores to work done between the runs."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    present = {o.name for o in model.graph.output}
    model.graph.output.extend(
        helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in dict.fromkeys(names) if name not in present
    )
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if basic:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if threads:
        opts.intra_op_num_threads = threads
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


_SESSIONS: dict[tuple[str, tuple[str, ...]], object] = {}


def run_with_outputs(onnx_path: str | Path, names: list[str], batch: np.ndarray) -> list[np.ndarray]:
    """The values of ``names`` (intermediate tensors) for one batch; sessions are cached per file."""
    import onnx

    key = (str(Path(onnx_path).resolve()), tuple(names))
    session = _SESSIONS.get(key)
    if session is None:
        session = session_with_outputs(onnx.load(str(onnx_path)), names)
        while len(_SESSIONS) >= 4:  # keep a few large sessions alive, not every one ever made
            _SESSIONS.pop(next(iter(_SESSIONS)))
        _SESSIONS[key] = session
    return session.run(names, {session.get_inputs()[0].name: np.ascontiguousarray(batch, dtype=np.float32)})
