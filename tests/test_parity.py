"""Parity metrics, detection agreement, and the Detector pipeline end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import RuntimeArtifacts, make_images

from edgeq.errors import EdgeqError
from edgeq.runtime.backends.base import Backend, ModelMeta, TensorSpec
from edgeq.runtime.detector import Detector, detections_to_json, draw
from edgeq.runtime.parity import (
    ParityResult,
    compare_outputs,
    detection_agreement,
    error_histograms,
    format_parity_table,
    parity_check,
    tensor_metrics,
)


# --------------------------------------------------------------------------- tensor metrics
def test_identical_tensors():
    a = np.random.default_rng(0).normal(size=(2, 5, 8)).astype(np.float32)
    m = tensor_metrics(a, a.copy())
    assert m == {"cosine": pytest.approx(1.0), "max_abs": 0.0, "mean_abs": 0.0, "rel_l2": 0.0, "snr_db": math.inf}


def test_hand_computed_metrics():
    # a = (3, 4), b = (3, 3): diff (0, 1), |a| = 5, |b| = sqrt(18), a.b = 21
    m = tensor_metrics(np.array([3.0, 4.0]), np.array([3.0, 3.0]))
    assert m["cosine"] == pytest.approx(21 / (5 * math.sqrt(18)))
    assert m["max_abs"] == pytest.approx(1.0)
    assert m["mean_abs"] == pytest.approx(0.5)
    assert m["rel_l2"] == pytest.approx(0.2)
    assert m["snr_db"] == pytest.approx(10 * math.log10(25))  # 13.98 dB


def test_zero_reference_and_shape_mismatch():
    m = tensor_metrics(np.zeros(3), np.array([0.0, 1.0, 0.0]))
    assert (m["rel_l2"], m["snr_db"], m["cosine"]) == (math.inf, -math.inf, 0.0)
    with pytest.raises(EdgeqError, match=r"different shapes: reference \(1, 567, 8\), candidate \(1, 567, 9\)"):
        tensor_metrics(np.zeros((1, 567, 8)), np.zeros((1, 567, 9)))


def test_error_histograms_split_a_detection_output():
    ref = np.zeros((1, 4, 7))  # 4 anchors, 5 + 2 classes
    ref[0, :2, 4] = 0.9  # two confident anchors
    cand = ref.copy()
    cand[0, 0, :4] += 2.0  # a confident box off by 2 px
    cand[0, 3, :4] += 300.0  # an unconfident anchor's box: not counted
    cand[0, 1, 4] -= 0.5  # one objectness error
    box, obj, cls = error_histograms(ref, cand, bins=5)
    assert box["part"].startswith("box") and sum(box["counts"]) == 8  # 2 confident anchors x 4 coordinates
    assert box["edges"][-1] == pytest.approx(2.0, rel=1e-2) and box["counts"][-1] == 4 and box["counts"][2] == 4
    assert sum(obj["counts"]) == 4 and obj["counts"][0] == 1 and obj["mean_abs"] == pytest.approx(0.125)
    assert sum(cls["counts"]) == 8 and cls["counts"][2] == 8 and cls["clipped"] == 0
    # values beyond the 99.9th percentile land in the end bins and are counted as clipped
    flat = error_histograms(np.zeros(10_000), np.r_[np.zeros(9_990), np.full(10, 1e6)], bins=3)
    assert [h["part"] for h in flat] == ["output"] and sum(flat[0]["counts"]) == 10_000 and flat[0]["clipped"] == 10


def test_compare_outputs_names_each_output():
    ref = [np.ones((1, 4)), np.arange(3.0)]
    rows = compare_outputs(ref, [np.ones((1, 4)), np.arange(3.0) * 1.5], ["output0", "aux"])
    assert [r["name"] for r in rows] == ["output0", "aux"] and rows[0]["shape"] == [1, 4]
    assert rows[0]["rel_l2"] == 0.0 and rows[1]["rel_l2"] == pytest.approx(0.5)
    with pytest.raises(EdgeqError, match="output aux: cannot compare outputs of different shapes"):
        compare_outputs(ref, [np.ones((1, 4)), np.arange(4.0)], ["output0", "aux"])
    with pytest.raises(EdgeqError, match="output counts differ"):
        compare_outputs(ref, ref[:1], ["output0", "aux"])


# --------------------------------------------------------------------------- detection agreement
def _dets() -> list[np.ndarray]:
    return [
        np.array([[10, 10, 50, 60, 0.9, 0], [60, 20, 110, 90, 0.8, 1], [5, 70, 30, 95, 0.1, 2]], np.float32),
        np.array([[20, 30, 80, 70, 0.7, 2]], np.float32),
    ]


SHAPES = [(100, 120), (100, 100)]
NAMES3 = ["a", "b", "c"]


def test_identical_detections_agree_fully():
    agree = detection_agreement(_dets(), _dets(), SHAPES, NAMES3)
    assert agree["map50"] == pytest.approx(1.0) and agree["map50_95"] == pytest.approx(1.0)
    assert agree["reference_boxes"] == 3  # the 0.1-score box is below the 0.25 ground-truth threshold


def test_shifted_detections_agree_less():
    shifted = [d.copy() for d in _dets()]
    for d in shifted:
        d[:, [0, 2]] += 8.0
    agree = detection_agreement(_dets(), shifted, SHAPES, NAMES3)
    assert agree["map50_95"] < 0.9 and agree["map50_95"] < agree["map50"] <= 1.0
    far = [d + np.array([200, 200, 200, 200, 0, 0], np.float32) for d in _dets()]
    assert detection_agreement(_dets(), far, SHAPES, NAMES3)["map50"] == pytest.approx(0.0)


def test_flat_boxes_are_ignored():
    # a box in the letterbox padding is clipped flat to the border; COCO IoU of flat boxes is 0
    flat = [np.concatenate([d, [[120, 10, 120, 40, 0.95, 0]]]).astype(np.float32) for d in _dets()]
    agree = detection_agreement(flat, flat, SHAPES, NAMES3)
    assert agree["map50_95"] == pytest.approx(1.0) and agree["reference_boxes"] == 3


def test_agreement_without_reference_boxes():
    empty = [np.zeros((0, 6), np.float32)] * 2
    assert detection_agreement(empty, empty, SHAPES, NAMES3)["map50"] == 1.0
    assert detection_agreement(empty, _dets(), SHAPES, NAMES3)["map50_95"] == 0.0
    with pytest.raises(EdgeqError, match="differ in length"):
        detection_agreement(empty, empty[:1], SHAPES, NAMES3)


def test_parity_result_pass_json_and_table():
    outputs = compare_outputs([np.array([3.0, 4.0])], [np.array([3.0, 3.0])], ["output0"])
    agreement = {"map50": 0.99, "map50_95": 0.93}
    res = ParityResult(outputs=outputs, agreement=agreement, reference="a.pt", candidate="b.onnx")
    assert res.passed(rel_l2_max=0.25, agreement_min=0.9)
    assert not res.passed(rel_l2_max=0.1, agreement_min=0.9)
    assert not res.passed(rel_l2_max=None, agreement_min=0.95)
    assert res.passed(rel_l2_max=None, agreement_min=0.95, metric="map50")
    exact = ParityResult(outputs=compare_outputs([np.ones(2)], [np.ones(2)], ["output0"]))
    assert exact.passed(rel_l2_max=0.0, agreement_min=None) and not exact.passed(rel_l2_max=0.0, agreement_min=0.5)
    as_json = json.loads(json.dumps(exact.to_dict()))
    assert as_json["outputs"][0]["snr_db"] == "inf"
    table = format_parity_table({"onnxruntime": res, "openvino": exact})
    lines = table.splitlines()
    header = ["Candidate", "Output", "cosine", "max_abs", "mean_abs", "rel_l2", "SNR", "dB", "mAP50", "mAP50-95"]
    assert lines[0].split() == header
    assert "onnxruntime" in lines[2] and "0.9300" in lines[2] and "2.000e-01" in lines[2]
    assert lines[3].split()[-3:] == ["inf", "-", "-"]


# --------------------------------------------------------------------------- Detector with a fake backend
class FakeBackend(Backend):
    """Numpy-only backend emitting one fixed box per image, to test the Detector's plumbing."""

    name = "fake"

    def __init__(self, path: Path, batch: int | None, imgsz: int = 96):
        super().__init__(path)
        self.batch, self.imgsz, self.calls = batch, imgsz, []

    def _load_impl(self) -> None:
        dim = self.batch if self.batch is not None else "batch"
        self._inputs = [TensorSpec("images", (dim, 3, self.imgsz, self.imgsz), "float32")]
        self._outputs = [TensorSpec("output0", (dim, 1, 7), "float32")]
        self._meta = ModelMeta(names=["cat", "dog"], imgsz=(self.imgsz, self.imgsz), flavour="float")

    def _infer_impl(self, x: np.ndarray) -> list[np.ndarray]:
        self.calls.append(x.shape[0])
        row = np.array([48, 48, 24, 48, 0.9, 0.1, 0.8], np.float32)  # cx cy w h obj cls0 cls1 (input px)
        return [np.tile(row, (x.shape[0], 1, 1))]


@pytest.fixture()
def fake_path(tmp_path: Path) -> Path:
    path = tmp_path / "fake.bin"
    path.write_bytes(b"")
    return path


def test_detector_maps_boxes_to_original_pixels(fake_path: Path):
    # 200 (h) x 100 (w) into 96x96: ratio 0.48, resized to 48x96, padded 24 px left and right.
    # Input box x 36..60, y 24..72 -> original x (36-24)/0.48 = 25 .. 75, y 24/0.48 = 50 .. 150.
    detector = Detector(FakeBackend(fake_path, batch=1), conf_thres=0.25)
    (det,) = detector(np.zeros((200, 100, 3), np.uint8))
    np.testing.assert_allclose(det, [[25, 50, 75, 150, 0.9 * 0.8, 1]], rtol=1e-5, atol=1e-4)
    assert detector.names == ["cat", "dog"] and detector.imgsz == (96, 96)


def test_detector_batching_follows_the_artifact(fake_path: Path):
    images = [np.zeros((50, 60, 3), np.uint8)] * 3
    static2 = FakeBackend(fake_path, batch=2)
    assert len(Detector(static2)(images)) == 3 and static2.calls == [2, 2]  # last chunk zero-padded
    single = FakeBackend(fake_path, batch=1)
    Detector(single)(images)
    assert single.calls == [1, 1, 1]
    dynamic = FakeBackend(fake_path, batch=None)
    Detector(dynamic)(np.stack(images))  # an NxHxWx3 stack works like a list
    assert dynamic.calls == [3]


def test_detector_checks_imgsz_and_options(fake_path: Path):
    with pytest.raises(EdgeqError, match=r"fixed input size 96x96, but imgsz=128 was given"):
        Detector(FakeBackend(fake_path, batch=1), imgsz=128)
    with pytest.raises(EdgeqError, match=r"conf_thres must be in \[0, 1\)"):
        Detector(FakeBackend(fake_path, batch=1), conf_thres=1.5)
    with pytest.raises(EdgeqError, match="only apply when Detector is given a path"):
        Detector(FakeBackend(fake_path, batch=1), threads=2)


def test_draw_and_json(fake_path: Path):
    image = np.full((200, 100, 3), 30, np.uint8)
    detector = Detector(FakeBackend(fake_path, batch=1))
    dets = detector(image)[0]
    canvas = detector.draw(image, dets)
    assert canvas.shape == image.shape and canvas.dtype == np.uint8
    assert (canvas != image).any() and (image == 30).all()  # drawn on a copy
    assert draw(image[..., 0], dets, ["cat", "dog"]).shape == (200, 100, 3)
    rows = detections_to_json(dets, detector.names, Path("img/0001.jpg"))
    box = [25.0, 50.0, 75.0, 150.0]
    assert rows == [{"image": "img/0001.jpg", "class": 1, "name": "dog", "score": 0.72, "box": box}]
    json.dumps(rows)


# --------------------------------------------------------------------------- Detector on real artifacts
def test_onnxruntime_detector_matches_torch_detector(runtime_artifacts: RuntimeArtifacts):
    images = make_images(3)
    art = runtime_artifacts
    with Detector(art.onnx_dynamic, threads=1) as ort_det, Detector(art.checkpoint, threads=1) as pt_det:
        assert ort_det.imgsz == (96, 96) and ort_det.names == runtime_artifacts.names
        ours, ref = ort_det(images), pt_det(images)
    assert sum(len(d) for d in ref) > 0
    for img, a, b in zip(images, ours, ref):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=1e-3, rtol=0)
        h, w = img.shape[:2]  # original-image coordinates, clipped to the image
        assert (a[:, [0, 2]] >= 0).all() and (a[:, [0, 2]] <= w).all()
        assert (a[:, [1, 3]] >= 0).all() and (a[:, [1, 3]] <= h).all()


def test_static_batch_detector_runs_image_by_image(runtime_artifacts: RuntimeArtifacts):
    images = make_images(2, seed=3)
    art = runtime_artifacts
    with Detector(art.onnx, threads=1) as one, Detector(art.onnx_dynamic, threads=1) as many:
        for a, b in zip(one(images), many(images)):
            np.testing.assert_allclose(a, b, atol=1e-3, rtol=0)


def test_parity_check_onnxruntime_against_torch(runtime_artifacts: RuntimeArtifacts):
    art = runtime_artifacts
    with Detector(art.checkpoint, threads=1) as ref, Detector(art.onnx_dynamic, threads=1) as cand:
        result = parity_check(ref, cand, make_images(3))
    assert result.outputs[0]["rel_l2"] < 1e-5 and result.agreement["reference_boxes"] > 0
    assert result.agreement["map50_95"] == pytest.approx(1.0)
    assert result.passed(rel_l2_max=1e-5, agreement_min=0.99)
