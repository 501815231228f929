"""The fine-tune's PyTorch graph is the exported INT8 graph, and training it ships what was trained."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from edgeq import flavours
from edgeq.errors import EdgeqError
from edgeq.export.calib_table import CalibrationTable
from edgeq.export.finetune import FinetuneOptions, finetune
from edgeq.export.int8 import Int8Options, quantize_model
from edgeq.export.qdq_torch import QdqModule, trained_float_model
from edgeq.graph import constants, head_tensors, read_metadata, session_with_outputs


def _inputs(int8_export, count: int = 8) -> np.ndarray:
    from edgeq.data.images import load_sample_images
    from edgeq.runtime.preprocess import preprocess_batch

    return np.concatenate([preprocess_batch([im], 64)[0] for im in load_sample_images(int8_export.images, count)])


def _ort(model, names, x) -> list[np.ndarray]:
    session = session_with_outputs(onnx.ModelProto.FromString(model.SerializeToString()), names)
    outs = [session.run(names, {"images": x[i:i + 1]}) for i in range(len(x))]
    return [np.concatenate([o[j] for o in outs]) for j in range(len(names))]


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def models(int8_export):
    result = int8_export.result
    float_model = onnx.load(str(result.artifacts["onnx"]))
    table = CalibrationTable.load(result.artifacts["table"])
    return float_model, table


def test_float_graph_runs_as_onnx_runtime_does(int8_export, models, one_torch_thread):
    float_model, _ = models
    x = _inputs(int8_export, 4)
    names = head_tensors(float_model.graph) + ["output0"]
    with torch.no_grad():
        ours = [o.numpy() for o in QdqModule(float_model, names)(torch.from_numpy(x))]
    for a, b in zip(ours, _ort(float_model, names, x)):
        assert _rel(a, b) < 1e-5


@pytest.mark.parametrize("name", flavours.NAMES)
def test_qdq_graph_rounds_as_the_artifact_does(int8_export, models, name, one_torch_thread):
    """Every quantized tensor holds the backend's integers, given the backend's own inputs.

    A whole network cannot be compared exactly: a float32 ulp of difference in one convolution
    moves a value across a rounding boundary now and then, and that step propagates (the same
    PyTorch graph in float64 differs from itself in float32 as much as from ONNX Runtime). So
    each fake-quant is checked on its own: fed ONNX Runtime's float input, it must give
    ONNX Runtime's dequantized output at (almost) every element, with a non-trivial step.
    """
    float_model, table = models
    q_model, _ = quantize_model(float_model, table, name, Int8Options())
    module = QdqModule(q_model, head_tensors(float_model.graph), float_model)
    x = _inputs(int8_export, 2)
    pairs = [(dq, *spec) for dq, spec in module._pairs.items()]
    outputs = {n.name: n.output[0] for n in q_model.graph.node}
    names = [p[1] for p in pairs] + [outputs[p[0]] for p in pairs]
    values = dict(zip(names, _ort(q_model, names, x)))
    steps = 0
    for dq, source, scale, zero, low, high in pairs:
        ours = torch.fake_quantize_per_tensor_affine(torch.from_numpy(values[source]), scale, zero, low, high).numpy()
        theirs = values[outputs[dq]]
        assert np.mean(np.abs(ours - theirs) <= 1e-6 * max(1.0, float(np.abs(theirs).max()))) > 0.9999, dq
        steps += int(np.any(ours != values[source]))
    assert steps > len(pairs) // 2  # the fake-quants really round


@pytest.mark.parametrize("name", flavours.NAMES)
def test_qdq_graph_is_closer_to_the_artifact_than_float_is(int8_export, models, name, one_torch_thread):
    float_model, table = models
    q_model, _ = quantize_model(float_model, table, name, Int8Options())
    x = _inputs(int8_export, 8)
    heads = head_tensors(float_model.graph)  # the logits: the decoded boxes' pixels would hide the score noise
    flat = lambda arrays: np.concatenate([np.asarray(a).ravel() for a in arrays])  # noqa: E731
    with torch.no_grad():
        ours = flat(QdqModule(q_model, heads, float_model)(torch.from_numpy(x)))
    backend, reference = flat(_ort(q_model, heads, x)), flat(_ort(float_model, heads, x))
    assert _rel(backend, reference) > 1e-4  # quantization did something
    assert _rel(ours, backend) < 0.7 * _rel(backend, reference)


def test_untrained_weights_reexport_to_the_same_artifact(int8_export, models, one_torch_thread):
    """Parameters written back and quantized again give the artifact the module started from."""
    float_model, table = models
    for name in flavours.NAMES:
        q_model, _ = quantize_model(float_model, table, name, Int8Options())
        module = QdqModule(q_model, head_tensors(float_model.graph), float_model)
        again, _ = quantize_model(trained_float_model(float_model, module), table, name, Int8Options())
        before, after = constants(q_model.graph), constants(again.graph)
        assert before.keys() == after.keys()
        for key in before:
            assert np.array_equal(before[key], after[key]), (name, key)


def test_finetune_lowers_the_distillation_loss_and_records_itself(int8_export, models, one_torch_thread):
    float_model, table = models
    q_model, _ = quantize_model(float_model, table, "int8-ov", Int8Options())
    x = _inputs(int8_export, 8)
    result = finetune(float_model, q_model, x, FinetuneOptions(steps=30, batch=4, lr=1e-3), progress=False)
    record = result.record
    assert record["steps"] == 30 and record["images"] == 8 and record["seed"] == 0
    assert record["loss_last"] < record["loss_first"]
    trained = constants(result.model.graph)
    original = constants(float_model.graph)
    assert any(not np.array_equal(trained[k], original[k]) for k in original)


def test_unsupported_op_names_the_node():
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Softmax", ["images"], ["y"], "the_softmax")], "g", [x], [y])
    module = QdqModule(helper.make_model(graph), ["y"])
    with pytest.raises(EdgeqError, match="the_softmax: op Softmax"):
        module(torch.zeros(1, 3, 4, 4))


def test_shared_weight_cannot_be_written_back():
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 2, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    w = numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w")
    nodes = [helper.make_node("Conv", ["images", "w"], ["a"], "c1"), helper.make_node("Conv", ["a", "w"], ["y"], "c2")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w]))
    module = QdqModule(model, ["y"])
    with pytest.raises(EdgeqError, match="not a constant of its own"):
        trained_float_model(model, module)


def test_export_finetune_cli_records_the_run(int8_export, tmp_path, one_torch_thread):
    from edgeq.cli import main

    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(["export", str(int8_export.checkpoint), "--int8", "--format", "onnx", "--data",
                   str(int8_export.images), "--calib-images", "8", "--imgsz", "64", "--finetune", "3", "--fallback",
                   "0", "--out", str(out), "--num-images", "2"])
    assert rc == 0
    artifact = next(out.glob("*.int8-ort.onnx"))
    record = json.loads(read_metadata(artifact)["edgeq.int8"])
    assert record["finetune"]["steps"] == 3 and record["finetune"]["images"] == 8
    table = json.loads(next(out.glob("*.calib.json")).read_text())
    assert table["extra"]["finetune"]["int8-ort"]["steps"] == 3


def test_reused_table_repeats_the_recorded_finetune(int8_export, tmp_path, one_torch_thread):
    from edgeq.cli import main

    first, second, third = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    common = [str(int8_export.checkpoint), "--format", "onnx", "--data", str(int8_export.images), "--calib-images", "8",
              "--imgsz", "64", "--fallback", "0", "--num-images", "0"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["export", *common, "--int8", "--finetune", "2", "--out", str(first)]) == 0
        table = next(first.glob("*.calib.json"))
        assert main(["export", *common, "--table", str(table), "--out", str(second)]) == 0
        assert main(["export", *common, "--table", str(table), "--finetune", "0", "--out", str(third)]) == 0
    records = [json.loads(read_metadata(next(d.glob("*.int8-ort.onnx")))["edgeq.int8"]) for d in (first, second, third)]
    assert records[1]["finetune"]["steps"] == 2 and records[1]["finetune"]["seed"] == records[0]["finetune"]["seed"]
    assert "finetune" not in records[2]
    a, b = (constants(onnx.load(str(next(d.glob("*.int8-ort.onnx")))).graph) for d in (first, second))
    assert all(np.array_equal(a[k], b[k]) for k in a)  # same images, seed and steps: the same artifact
