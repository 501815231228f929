"""INT8 flavours on the float ONNX: the graphs each backend needs, run by the real backends."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgeq.errors import EdgeqError
from edgeq.export.calib_table import CalibrationTable, calibrate
from edgeq.export.int8 import Int8Options, quantize_file
from edgeq.export.pipeline import export_model
from edgeq.export.sensitivity import rank_tensors
from edgeq.graph import decode_nodes, read_metadata, read_rt_info
from edgeq.models.checkpoint import save_checkpoint
from edgeq.models.yolo import DetectionModel

S = 64


@pytest.fixture(scope="module")
def images(calib_images):
    return calib_images


@pytest.fixture(scope="module")
def exported(int8_export):
    """The session's shared INT8 export (tests/conftest.py): checkpoint, ExportResult."""
    return int8_export.checkpoint, int8_export.result


def _kernels(path, tmp_path) -> list[str]:
    """The op types ONNX Runtime's CPU provider runs for ``path`` after its graph optimizations."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / f"{Path(path).stem}.optimized.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]


def _batches(folder, count: int) -> list[np.ndarray]:
    from edgeq.data.images import load_sample_images
    from edgeq.runtime.preprocess import preprocess_batch

    return [preprocess_batch([im], S)[0] for im in load_sample_images(folder, count)]


def _values(proto) -> dict[str, np.ndarray]:
    values = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    values.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in proto.graph.node if n.op_type == "Constant"})
    return values


def test_artifacts_name_their_flavour_in_file_name_and_metadata(exported):
    _, result = exported
    names = {k: p.name for k, p in result.artifacts.items()}
    assert names["int8-ort"] == "m.int8-ort.onnx" and names["int8-ov-ir"] == "m.int8-ov.xml"
    assert names["table"] == "m.calib.json"
    assert read_metadata(result.artifacts["int8-ort"])["edgeq.flavour"] == "int8-ort"
    assert read_metadata(result.artifacts["onnx"])["edgeq.flavour"] == "float"
    assert read_rt_info(result.artifacts["int8-ov-ir"])["edgeq.flavour"] == "int8-ov"
    recorded = json.loads(read_metadata(result.artifacts["int8-ort"])["edgeq.int8"])
    assert recorded["method"] == "percentile" and recorded["images"] == 8


def test_trt_flavour_follows_tensorrt_explicit_quantization_rules(exported, tmp_path):
    _, result = exported
    table = result.table
    path, report = quantize_file(result.artifacts["onnx"], table, "trt", tmp_path / "m.int8-trt.onnx")
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert proto.opset_import[0].version >= 13
    values = _values(proto)
    nodes = proto.graph.node
    qs = [n for n in nodes if n.op_type == "QuantizeLinear"]
    dqs = [n for n in nodes if n.op_type == "DequantizeLinear"]
    assert qs and dqs and report.weights > 0
    for n in qs + dqs:  # int8, zero point 0 everywhere
        zp = values[n.input[2]]
        assert zp.dtype == np.int8 and not zp.any(), n.name
    weight_dqs = [n for n in dqs if n.input[0] in values]  # constant int8 weights, per output channel
    assert len(weight_dqs) == report.weights
    for n in weight_dqs:
        w = values[n.input[0]]
        assert w.dtype == np.int8 and w.min() >= -127
        axis = next(a.i for a in n.attribute if a.name == "axis")
        assert axis == 0 and values[n.input[1]].shape == (w.shape[0],)
    for n in qs:  # activations: per-tensor scales
        assert values[n.input[1]].shape == ()
    # every Conv reads a dequantized input and weight; nothing in the decode is quantized
    convs = [n for n in nodes if n.op_type == "Conv"]
    produced_by = {o: n for n in nodes for o in n.output}
    assert all(produced_by[c.input[0]].op_type == "DequantizeLinear" for c in convs)
    assert all(produced_by[c.input[1]].op_type == "DequantizeLinear" for c in convs)
    float_proto = onnx.load(str(result.artifacts["onnx"]))
    decode = decode_nodes(float_proto.graph)
    decode_tensors = {t for n in float_proto.graph.node if n.name in decode for t in (*n.input, *n.output)}
    assert decode and not any(n.input[0] in decode_tensors for n in qs)
    # head convs: quantized inputs, float outputs
    head = [c for c in convs if any(cons.name in decode for cons in float_proto.graph.node if c.output[0] in cons.input)]
    assert len(head) == 3
    assert not any(q.input[0] == h.output[0] for q in qs for h in head)


def test_ort_flavour_fuses_into_integer_kernels(exported, tmp_path):
    _, result = exported
    proto = onnx.load(str(result.artifacts["int8-ort"]))
    zps = [_values(proto)[n.input[2]] for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert zps and all(z.dtype == np.uint8 for z in zps)  # asymmetric uint8 activations
    ops = _kernels(result.artifacts["int8-ort"], tmp_path)
    # every Conv runs as an integer kernel but the head's three, whose logits stay float by default
    convs = sum(n.op_type == "Conv" for n in onnx.load(str(result.artifacts["onnx"])).graph.node)
    assert ops.count("Conv") == 3 and ops.count("QLinearConv") == convs - 3


def test_uint8_weights_are_the_same_values_and_still_integer_kernels(exported, tmp_path):
    """--uint8-weights changes the storage, not the arithmetic: with ORT's optimizations off (the
    Q/DQ graph run as written) both models give the same output; with them on every Conv still
    runs as QLinearConv. The other flavours refuse it (TensorRT needs symmetric int8 weights)."""
    import onnxruntime as ort

    _, result = exported
    path, _ = quantize_file(result.artifacts["onnx"], result.table, "ort", tmp_path / "u8.onnx", Int8Options(uint8_weights=True))
    proto = onnx.load(str(path))
    values = _values(proto)
    weight_dqs = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("_weight_quantized")]
    assert weight_dqs and all(values[n.input[0]].dtype == np.uint8 and (values[n.input[2]] == 128).all() for n in weight_dqs)
    assert json.loads(read_metadata(path)["edgeq.int8"])["weights"] == "uint8"

    x = np.random.default_rng(0).random((1, 3, S, S), dtype=np.float32)
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    int8_path, _ = quantize_file(result.artifacts["onnx"], result.table, "ort", tmp_path / "i8.onnx", Int8Options())
    ref, got = (ort.InferenceSession(str(p), plain, providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
                for p in (int8_path, path))
    np.testing.assert_array_equal(got, ref)
    ops = _kernels(path, tmp_path)
    assert ops.count("Conv") == 3 and ops.count("QLinearConv") == sum(
        n.op_type == "Conv" for n in onnx.load(str(result.artifacts["onnx"])).graph.node) - 3

    for flavour in ("ov", "trt"):
        with pytest.raises(EdgeqError, match="for int8-ort only"):
            quantize_file(result.artifacts["onnx"], result.table, flavour, tmp_path / f"{flavour}.onnx",
                          Int8Options(uint8_weights=True))


def test_ort_head_outputs_float_by_default_per_channel_on_request(exported, images, tmp_path, caplog):
    import onnxruntime as ort

    from edgeq.export.qdq import normalize_heads
    from edgeq.graph import NORMALIZED_SUFFIX, head_tensors

    _, result = exported
    float_proto = onnx.load(str(result.artifacts["onnx"]))
    heads = head_tensors(float_proto.graph)
    channel = result.table.channel_ranges()
    assert set(channel) == set(heads)
    for lo, hi in channel.values():
        assert lo.shape == (3 * (5 + 3),) and np.all(lo <= hi) and np.any(lo < hi)
    # the table keeps them
    reloaded = CalibrationTable.load(result.table.save(tmp_path / "t.json")).channel_ranges()
    assert all(np.array_equal(reloaded[h][0], channel[h][0]) for h in heads)

    # folding the ranges into the convolutions changes nothing in float
    folded = onnx.ModelProto.FromString(float_proto.SerializeToString())
    assert set(normalize_heads(folded, channel)) == {h + NORMALIZED_SUFFIX for h in heads}
    x = np.random.default_rng(0).random((1, 3, S, S), dtype=np.float32)
    ref, got = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
                for m in (float_proto, folded))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-3)

    # the default int8-ort leaves the logits float; per-channel on request quantizes them
    default = onnx.load(str(result.artifacts["int8-ort"]))
    assert not {n.input[0] for n in default.graph.node if n.op_type == "QuantizeLinear"} & set(heads)
    recorded = json.loads(read_metadata(result.artifacts["int8-ort"])["edgeq.int8"])
    assert recorded["head_outputs"] == "float"
    assert recorded["bias_correction"]["images"] == 8  # on by default: 32 asked, the 8 the folder has
    per_channel, report = quantize_file(result.artifacts["onnx"], result.table, "ort", tmp_path / "pc.int8-ort.onnx",
                                        Int8Options(head_outputs="per-channel"))
    assert report.head_outputs == "per-channel"
    proto = onnx.load(str(per_channel))
    quantized = {n.input[0] for n in proto.graph.node if n.op_type == "QuantizeLinear"}
    assert {h + NORMALIZED_SUFFIX for h in heads} <= quantized and not quantized & set(heads)
    assert json.loads(read_metadata(per_channel)["edgeq.int8"])["head_outputs"] == "per-channel"
    assert "Conv" not in _kernels(per_channel, tmp_path)
    # verify --layers still ranks the head convolutions, by the logits they restore
    from edgeq.data.images import load_sample_images
    from edgeq.verify import layer_snr

    rows = layer_snr(result.artifacts["onnx"], per_channel, load_sample_images(images, 1), S)
    snr = {r["tensor"]: r["snr_db"] for r in rows}
    assert all(10 < snr[h] < 80 for h in heads), [snr.get(h) for h in heads]  # quantized, not lost

    # a table from before per-channel head ranges: said loudly, the head stays float
    data = json.loads((tmp_path / "t.json").read_text())
    for entry in data["tensors"].values():
        entry["stats"].pop("channel_min", None), entry["stats"].pop("channel_max", None)
    (tmp_path / "old.json").write_text(json.dumps(data))
    with caplog.at_level("WARNING", logger="edgeq"):
        path, report = quantize_file(result.artifacts["onnx"], CalibrationTable.load(tmp_path / "old.json"), "ort",
                                     tmp_path / "old.int8-ort.onnx", Int8Options(head_outputs="per-channel"))
    assert "no per-channel ranges for the head outputs" in caplog.text and report.head_outputs == "float"
    assert not any(n.output[0].endswith(NORMALIZED_SUFFIX) for n in onnx.load(str(path)).graph.node)
    with pytest.raises(EdgeqError, match="unknown head output mode 'per-layer'"):
        quantize_file(result.artifacts["onnx"], result.table, "ort", tmp_path / "x.onnx", Int8Options(head_outputs="per-layer"))


def test_int8_artifacts_run_close_to_float_on_their_backends(exported, images):
    from edgeq.data.images import load_sample_images
    from edgeq.runtime.parity import check_artifacts

    ckpt, result = exported
    sample = load_sample_images(images, 4)
    res = check_artifacts(ckpt, [str(result.artifacts["int8-ort"]), str(result.artifacts["int8-ov-ir"])], sample)
    for label, r in res.items():
        cosine = r.outputs[0]["cosine"]
        assert 0.98 < cosine < 1.0, (label, cosine)  # quantized (not identical), yet close


def test_openvino_refuses_quietly_running_the_ort_flavour(exported):
    from edgeq.runtime.backends import FlavourWarning, load_backend

    _, result = exported
    with pytest.warns(FlavourWarning, match="onnxruntime"):
        load_backend(result.artifacts["int8-ort"], backend="openvino").close()


def test_table_reuse_gives_the_same_graph_and_other_models_are_refused(exported, tmp_path):
    _, result = exported
    table = CalibrationTable.load(result.table.save(tmp_path / "t.json"))
    a, _ = quantize_file(result.artifacts["onnx"], result.table, "ort", tmp_path / "a.onnx")
    b, _ = quantize_file(result.artifacts["onnx"], table, "ort", tmp_path / "b.onnx")
    ga, gb = onnx.load(str(a)).graph, onnx.load(str(b)).graph
    assert [n.op_type for n in ga.node] == [n.op_type for n in gb.node]
    va, vb = _values(onnx.load(str(a))), _values(onnx.load(str(b)))
    assert all(np.array_equal(va[k], vb[k]) for k in va)

    other = DetectionModel("yolov5n", nc=3).eval()
    ckpt = save_checkpoint(other, tmp_path / "n.pt", names=["a", "b", "c"], imgsz=S)
    float_other = export_model(ckpt, formats="onnx", out_dir=tmp_path / "n").artifacts["onnx"]
    with pytest.raises(EdgeqError, match=r"does not match this model: no range for tensor images|no range for tensor /model"):
        quantize_file(float_other, table, "ort", tmp_path / "n.int8-ort.onnx")


def test_fallback_leaves_the_most_sensitive_tensors_float(exported, images, tmp_path):
    from edgeq.data.images import load_sample_images

    _, result = exported
    ranked = rank_tensors(result.artifacts["onnx"], result.table, "ov", _batches(images, 2), keep=None, progress=False)
    assert len(ranked) > 10 and ranked[0]["nsr"] >= ranked[-1]["nsr"] and ranked[0]["nsr"] > 0
    keep = tuple(r["tensor"] for r in ranked[:3])
    path, report = quantize_file(result.artifacts["onnx"], result.table, "ov", tmp_path / "f.onnx",
                                 Int8Options(float_tensors=keep))
    quantized = {n.input[0] for n in onnx.load(str(path)).graph.node if n.op_type == "QuantizeLinear"}
    assert not quantized & set(keep) and report.float_tensors == sorted(keep)
    full, _ = quantize_file(result.artifacts["onnx"], result.table, "ov", tmp_path / "g.onnx")
    all_q = {n.input[0] for n in onnx.load(str(full)).graph.node if n.op_type == "QuantizeLinear"}
    assert all_q - quantized == set(keep)


def test_ort_sensitivity_ranks_every_tensor_it_quantizes(exported, images, tmp_path):
    """int8-ort quantizes convolution outputs too (its integer kernels need them); on the trained
    demo model the stem convolution's output was the most harmful tensor, so they are ranked."""
    from edgeq.export.qdq_plan import plan

    _, result = exported
    ranked = rank_tensors(result.artifacts["onnx"], result.table, "ort", _batches(images, 1), keep=None, progress=False)
    proto = onnx.load(str(result.artifacts["onnx"]))
    assert {r["tensor"] for r in ranked} == set(plan(proto, "ort").activations)
    conv_outputs = {n.output[0] for n in proto.graph.node if n.op_type == "Conv"}
    worst_conv_output = next(r["tensor"] for r in ranked if r["tensor"] in conv_outputs)
    path, report = quantize_file(result.artifacts["onnx"], result.table, "ort", tmp_path / "f.onnx",
                                 Int8Options(float_tensors=(worst_conv_output,)))
    quantized = {n.input[0] for n in onnx.load(str(path)).graph.node if n.op_type == "QuantizeLinear"}
    assert worst_conv_output not in quantized and report.float_tensors == [worst_conv_output]


def test_fallback_takes_at_most_n_tensors_and_only_harmful_ones():
    from edgeq.export.sensitivity import FALLBACK_MIN_NSR, fallback_tensors

    ranked = [{"tensor": t, "nsr": v} for t, v in (("a", 4e-4), ("b", 6e-5), ("c", 2e-5), ("d", 9e-6), ("e", 1e-9))]
    assert fallback_tensors(ranked, 2) == ("a", "b")
    assert fallback_tensors(ranked, 8) == ("a", "b", "c")  # d and e are below 50 dB SNR's noise
    assert fallback_tensors(ranked, 8, min_nsr=0) == ("a", "b", "c", "d", "e")
    assert fallback_tensors(ranked, 0) == () and FALLBACK_MIN_NSR == 1e-5


def test_empty_calibration_folder_is_refused(exported, tmp_path):
    _, result = exported
    with pytest.raises(EdgeqError, match=tmp_path.name):
        calibrate(result.artifacts["onnx"], tmp_path, progress=False)


def test_onnxruntime_spin_option(exported):
    from edgeq.runtime.backends import load_backend

    _, result = exported
    runner = load_backend(result.artifacts["int8-ort"], spin=False)
    x = np.random.default_rng(0).random((1, 3, S, S), dtype=np.float32)
    assert runner.infer(x)[0].shape[0] == 1
    runner.close()
    with pytest.raises(EdgeqError, match="spin= is an ONNX Runtime option"):
        load_backend(result.artifacts["int8-ov-ir"], spin=False)


def test_cli_calibrate_then_export_from_the_table(exported, images, tmp_path, capsys):
    from edgeq.cli import main

    ckpt, _ = exported
    table = tmp_path / "m.calib.json"
    assert main(["calibrate", str(ckpt), "--data", str(images), "--num-images", "4", "-o", str(table)]) == 0
    assert "on 4 images" in capsys.readouterr().out
    rc = main(["export", str(ckpt), "--table", str(table), "--method", "mse", "--format", "onnx", "--out",
               str(tmp_path / "out"), "--data", str(images), "--num-images", "2"])
    assert rc == 0
    meta = read_metadata(tmp_path / "out" / "m.int8-ort.onnx")
    assert meta["edgeq.flavour"] == "int8-ort" and json.loads(meta["edgeq.int8"])["method"] == "mse"
    assert json.loads(meta["edgeq.int8"])["images"] == 4
    assert not (tmp_path / "out" / "m.calib.json").exists()  # the given table is reused, not rewritten


def test_int8_with_a_fixed_batch_above_one_is_refused_before_any_work(tmp_path, capsys):
    from edgeq.cli import main

    out = tmp_path / "out"
    assert main(["export", "--int8", "--batch", "4", "--format", "onnx", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "--int8 with --batch 4" in err and "--dynamic" in err
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("inputs", [["x", "w"], ["x", "w", ""]])
def test_normalize_heads_adds_the_shift_to_a_conv_without_bias(inputs):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from edgeq.export.qdq import normalize_heads

    rng = np.random.default_rng(0)
    weight = rng.normal(size=(6, 4, 1, 1)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", inputs, ["y"], name="conv"), helper.make_node("Sigmoid", ["y"], ["z"], name="sig")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 3, 3])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 6, 3, 3])], [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.normal(size=(1, 4, 3, 3)).astype(np.float32)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    y = np.einsum("oc,bchw->bohw", weight[:, :, 0, 0], x)
    assert normalize_heads(model, {"y": (y.min(axis=(0, 2, 3)) - 0.1, y.max(axis=(0, 2, 3)) + 0.2)}) == {
        "y_normalized": (-1.0, 1.0, 1.0)}
    onnx.checker.check_model(model)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, atol=1e-6)


def test_layer_snr_compares_head_logits_where_the_sigmoid_still_moves(exported, images, tmp_path):
    """Two head logits of -100 and -60 give the same score (sigmoid ~ 0): no error. Unclipped,
    the difference would rank that head worst of all (it did on the demo: 9 dB, all of it there)."""
    from edgeq.data.images import load_sample_images
    from edgeq.graph import head_tensors
    from edgeq.verify import layer_snr

    _, result = exported
    proto = onnx.load(str(result.artifacts["onnx"]))
    head = head_tensors(proto.graph)[0]
    conv = next(n for n in proto.graph.node if n.output[0] == head)
    bias = next(i for i in proto.graph.initializer if i.name == conv.input[2])
    paths = []
    for shift in (-100.0, -60.0):  # channel 4 of the first head: an objectness logit, pushed far below -8
        b = numpy_helper.to_array(bias).copy()
        b[4] += shift
        bias.CopyFrom(numpy_helper.from_array(b, bias.name))
        paths.append(tmp_path / f"shift{-shift:.0f}.onnx")
        onnx.save(proto, str(paths[-1]))
        b[4] -= shift
        bias.CopyFrom(numpy_helper.from_array(b, bias.name))
    rows = {r["tensor"]: r for r in layer_snr(paths[0], paths[1], load_sample_images(images, 2), S)}
    assert rows[head]["snr_db"] == float("inf") and rows[head]["added_nsr"] == 0


def test_switched_sensitivity_equals_quantizing_each_tensor_alone(exported, images):
    """The one-session switch graph measures what a graph with only that tensor quantized gives."""
    from edgeq import flavours
    from edgeq.export.int8 import flavour_ranges
    from edgeq.export.qdq import quantize_onnx
    from edgeq.export.qdq_plan import plan
    from edgeq.export.sensitivity import tensor_sensitivity
    from edgeq.graph import LOGIT_LIMIT, head_tensors, session_with_outputs

    _, result = exported
    model = onnx.load(str(result.artifacts["onnx"]))
    heads = head_tensors(model.graph)
    batches = _batches(images, 2)
    for flavour in (flavours.get("ort"), flavours.get("ov")):
        ranges = flavour_ranges(result.table, flavour)
        tensors = plan(model, flavour).activations[:6]
        ranked = tensor_sensitivity(model, ranges, flavour, tensors, batches, keep=None, progress=False)
        float_session = session_with_outputs(onnx.ModelProto.FromString(model.SerializeToString()), heads)
        for row in ranked:
            alone, _ = quantize_onnx(model, ranges, flavour, only_tensors={row["tensor"]}, weights=False)
            session = session_with_outputs(alone, heads)
            signal = noise = 0.0
            for b in batches:
                ref = float_session.run(heads, {"images": b})
                got = session.run(heads, {"images": b})
                for r, g in zip(ref, got):
                    r = np.clip(r, -LOGIT_LIMIT, LOGIT_LIMIT).astype(np.float64)
                    signal += float(np.square(r).sum())
                    noise += float(np.square(r - np.clip(g, -LOGIT_LIMIT, LOGIT_LIMIT)).sum())
            assert row["nsr"] == pytest.approx(noise / signal, rel=1e-3, abs=1e-12), (flavour.name, row)


def test_screened_sensitivity_scores_the_worst_on_every_image(exported, images):
    from edgeq.export.sensitivity import rank_tensors

    _, result = exported
    full = rank_tensors(result.artifacts["onnx"], result.table, "ov", _batches(images, 3), keep=None, progress=False)
    screened = rank_tensors(result.artifacts["onnx"], result.table, "ov", _batches(images, 3), keep=5, progress=False)
    assert len(screened) == len(full) and {r["tensor"] for r in screened} == {r["tensor"] for r in full}
    assert [r["images"] for r in screened[:5]] == [3] * 5 and all(r["images"] == 1 for r in screened[5:])
    assert not any(r["bound"] for r in screened[:5]) and all(r["bound"] for r in screened[5:])
    exact = {r["tensor"]: r["nsr"] for r in full}
    assert all(r["nsr"] == pytest.approx(exact[r["tensor"]], rel=1e-6) for r in screened[:5])
    # the group search finds the worst tensors the exhaustive ranking finds
    assert {r["tensor"] for r in screened[:3]} == {r["tensor"] for r in full[:3]}
