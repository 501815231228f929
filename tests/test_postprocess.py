import numpy as np
import pytest

from edgeq.errors import EdgeqError
from edgeq.runtime.postprocess import non_max_suppression


def _iou(a, b):
    """IoU of one xyxy box against many (float64, brute force)."""
    ix1, iy1 = np.maximum(a[0], b[:, 0]), np.maximum(a[1], b[:, 1])
    ix2, iy2 = np.minimum(a[2], b[:, 2]), np.minimum(a[3], b[:, 3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def _reference(pred, conf, iou, max_det, multi_label, agnostic):
    """Textbook greedy NMS written independently of the implementation under test."""
    out = []
    for x in pred.astype(np.float64):
        cands = []  # (score, cls, box)
        for row in x:
            cx, cy, w, h, obj = row[:5]
            box = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
            scores = obj * row[5:]
            classes = np.nonzero(scores > conf)[0] if multi_label else [int(np.argmax(scores))]
            for c in classes:
                if obj > conf and scores[c] > conf:
                    cands.append((scores[c], c, box))
        cands.sort(key=lambda t: -t[0])
        kept = []
        for s, c, b in cands:
            others = [k for k in kept if agnostic or k[1] == c]
            if others and np.max(_iou(b, np.array([k[2] for k in others]))) > iou:
                continue
            kept.append((s, c, b))
        kept = kept[:max_det]
        out.append(np.array([[*b, s, c] for s, c, b in kept]).reshape(-1, 6))
    return out


def _random_pred(rng, n_img=3, anchors=400, nc=4, spread=40.0):
    """Clustered boxes (so NMS has work to do), some reaching past the image's top-left."""
    pred = np.zeros((n_img, anchors, 5 + nc), dtype=np.float32)
    centers = rng.uniform(-10, 300, size=(12, 2))
    pick = rng.integers(0, len(centers), size=(n_img, anchors))
    pred[..., 0:2] = centers[pick] + rng.normal(0, spread / 4, size=(n_img, anchors, 2))
    pred[..., 2:4] = rng.uniform(10, spread * 2, size=(n_img, anchors, 2))
    pred[..., 4] = rng.uniform(0, 1, size=(n_img, anchors))
    pred[..., 5:] = rng.uniform(0, 1, size=(n_img, anchors, nc))
    return pred


def _assert_same(got, ref):
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g.dtype == np.float32 and g.shape[1] == 6
        assert g.shape == r.shape
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("agnostic", [False, True])
@pytest.mark.parametrize("multi_label", [False, True])
@pytest.mark.parametrize("iou", [0.3, 0.45, 0.7])
def test_nms_matches_brute_force(agnostic, multi_label, iou):
    rng = np.random.default_rng(int(iou * 100) + 2 * agnostic + multi_label)
    pred = _random_pred(rng)
    conf = 0.2
    got = non_max_suppression(pred, conf, iou, max_det=1000, multi_label=multi_label, agnostic=agnostic)
    ref = _reference(pred, conf, iou, 1000, multi_label, agnostic)
    _assert_same(got, ref)
    unsuppressed = non_max_suppression(pred, conf, 1.0, max_det=10**6, multi_label=multi_label, agnostic=agnostic)
    assert sum(map(len, got)) < sum(map(len, unsuppressed))  # suppression really happened


def test_class_aware_keeps_overlapping_boxes_of_other_classes():
    # two identical boxes, different classes: class-aware keeps both, agnostic keeps one
    pred = np.zeros((1, 2, 7), dtype=np.float32)
    pred[0, :, :4] = [50, 50, 20, 20]
    pred[0, 0, 4:] = [0.9, 1.0, 0.0]
    pred[0, 1, 4:] = [0.8, 0.0, 1.0]
    assert len(non_max_suppression(pred)[0]) == 2
    (det,) = non_max_suppression(pred, agnostic=True)
    np.testing.assert_allclose(det, [[40, 40, 60, 60, 0.9, 0]])


def test_conf_threshold_uses_obj_times_cls():
    pred = np.zeros((1, 3, 6), dtype=np.float32)
    pred[0, :, :4] = [[10, 10, 4, 4], [100, 100, 4, 4], [200, 200, 4, 4]]
    pred[0, :, 4] = [0.9, 0.9, 0.2]
    pred[0, :, 5] = [0.9, 0.2, 1.0]  # scores 0.81, 0.18, 0.2
    (det,) = non_max_suppression(pred, conf_thres=0.19)
    np.testing.assert_allclose(det[:, 4], [0.81, 0.2], rtol=1e-6)
    np.testing.assert_allclose(det[:, :4], [[8, 8, 12, 12], [198, 198, 202, 202]])


def test_multi_label_keeps_each_class_above_conf():
    pred = np.zeros((1, 1, 8), dtype=np.float32)
    pred[0, 0] = [50, 50, 10, 10, 1.0, 0.7, 0.0005, 0.4]
    (single,) = non_max_suppression(pred, conf_thres=0.001)
    (multi,) = non_max_suppression(pred, conf_thres=0.001, multi_label=True)
    assert single[:, 5].tolist() == [0]
    assert multi[:, 5].tolist() == [0, 2]  # sorted by score, class 1 under conf
    np.testing.assert_allclose(multi[:, 4], [0.7, 0.4], rtol=1e-6)


def test_max_det_keeps_highest_scores():
    rng = np.random.default_rng(0)
    pred = np.zeros((1, 50, 6), dtype=np.float32)
    pred[0, :, 0] = np.arange(50) * 30 + 15  # disjoint boxes: NMS removes nothing
    pred[0, :, 1] = 15
    pred[0, :, 2:4] = 10
    pred[0, :, 4] = rng.permutation(np.linspace(0.3, 0.99, 50))
    pred[0, :, 5] = 1.0
    (det,) = non_max_suppression(pred, max_det=7)
    assert len(det) == 7
    np.testing.assert_allclose(det[:, 4], np.sort(pred[0, :, 4])[::-1][:7], rtol=1e-6)


def test_max_nms_limits_candidates():
    pred = np.zeros((1, 10, 6), dtype=np.float32)
    pred[0, :, 0] = np.arange(10) * 30 + 15
    pred[0, :, 1], pred[0, :, 2:4], pred[0, :, 5] = 15, 10, 1.0
    pred[0, :, 4] = np.linspace(0.5, 0.95, 10)
    (det,) = non_max_suppression(pred, max_nms=3)
    np.testing.assert_allclose(det[:, 4], [0.95, 0.9, 0.85], rtol=1e-6)


def test_empty_inputs():
    assert non_max_suppression(np.zeros((0, 100, 85), np.float32)) == []
    out = non_max_suppression(np.zeros((2, 0, 85), np.float32))
    assert [o.shape for o in out] == [(0, 6), (0, 6)]
    out = non_max_suppression(np.zeros((2, 100, 85), np.float32), multi_label=True)  # all below conf
    assert all(o.shape == (0, 6) and o.dtype == np.float32 for o in out)


def test_bad_shape_raises():
    with pytest.raises(EdgeqError, match=r"\(100, 85\)"):
        non_max_suppression(np.zeros((100, 85), np.float32))
    with pytest.raises(EdgeqError):
        non_max_suppression(np.zeros((1, 100, 85), np.float32), conf_thres=1.5)
