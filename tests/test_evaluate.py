import contextlib
import io
import math
import subprocess
import sys

import numpy as np
import pytest

from edgeq.errors import EdgeqError
from edgeq.runtime.evaluate import coco_map, evaluate, format_map_table
from edgeq.runtime.preprocess import letterbox

SHAPE = (480, 640)


def _gt(*rows):
    return np.array(rows, dtype=np.float32).reshape(-1, 5)


def _det(*rows):
    return np.array(rows, dtype=np.float32).reshape(-1, 6)


def _far_fp(score, cls=0):
    return [400, 400, 450, 450, score, cls]  # overlaps nothing used below


def test_perfect_predictions():
    gts = [_gt([0, 10, 10, 60, 80], [1, 100, 100, 200, 150]), _gt([1, 300, 20, 400, 220]), _gt()]
    preds = [
        _det([10, 10, 60, 80, 0.9, 0], [100, 100, 200, 150, 0.8, 1]),
        _det([300, 20, 400, 220, 0.7, 1]),
        _det(),
    ]
    r = coco_map(preds, gts, [SHAPE] * 3, ["a", "b"])
    assert r["map50"] == 1.0 and r["map50_95"] == 1.0
    assert r["images"] == 3 and r["instances"] == 3
    assert [pc["instances"] for pc in r["per_class"]] == [1, 2]
    assert [pc["map50_95"] for pc in r["per_class"]] == [1.0, 1.0]


def test_iou_0725_passes_five_of_ten_thresholds():
    # prediction is the top 72.5 % of the GT box: IoU = 7250 / 10000 = 0.725.
    # COCO counts a match when IoU >= t; t = 0.50, 0.55, 0.60, 0.65, 0.70 pass, 0.75..0.95 fail.
    # (0.725 is used instead of exactly 0.7 so that no threshold sits on a float rounding edge.)
    r = coco_map([_det([0, 0, 100, 72.5, 0.9, 0])], [_gt([0, 0, 0, 100, 100])], [SHAPE], ["a"])
    assert r["map50"] == pytest.approx(1.0, abs=1e-12)
    assert r["map50_95"] == pytest.approx(5 / 10, abs=1e-12)


def test_high_scoring_false_positive_halves_ap():
    # ranked: FP (0.9), TP (0.8); one GT. Cumulative recall [0, 1], precision [0, 1/2].
    # COCO makes precision monotone from the right -> [1/2, 1/2]; each of the 101 recall
    # points r in 0.00..1.00 takes the first rank with recall >= r, i.e. always 1/2.
    preds = [_det(_far_fp(0.9), [10, 10, 60, 60, 0.8, 0])]
    r = coco_map(preds, [_gt([0, 10, 10, 60, 60])], [SHAPE], ["a"])
    assert r["map50"] == pytest.approx(0.5, abs=1e-12)
    assert r["map50_95"] == pytest.approx(0.5, abs=1e-12)


def test_101_point_interpolation_by_hand():
    # three GTs (two images); ranked TP .9, FP .8, TP .7, TP .6
    # recall    = 1/3, 1/3, 2/3, 1     precision = 1, 1/2, 2/3, 3/4
    # monotone precision from the right            = 1, 3/4, 3/4, 3/4
    # recall points 0.00..0.33 (34 of them) -> 1; 0.34..1.00 (67) -> 3/4
    gts = [_gt([0, 0, 0, 50, 50], [0, 100, 100, 150, 150]), _gt([0, 200, 200, 260, 260])]
    preds = [
        _det([0, 0, 50, 50, 0.9, 0], _far_fp(0.8), [100, 100, 150, 150, 0.7, 0]),
        _det([200, 200, 260, 260, 0.6, 0]),
    ]
    expected = (34 * 1.0 + 67 * 0.75) / 101
    r = coco_map(preds, gts, [SHAPE] * 2, ["a"])
    assert r["map50"] == pytest.approx(expected, abs=1e-12)
    assert r["map50_95"] == pytest.approx(expected, abs=1e-12)


def test_missing_classes():
    # class 0 perfect, class 1 has GT but no prediction (AP 0), class 2 has no GT (NaN, excluded)
    gts = [_gt([0, 10, 10, 60, 60], [1, 100, 100, 160, 160])]
    preds = [_det([10, 10, 60, 60, 0.9, 0], [300, 300, 350, 350, 0.95, 2])]
    r = coco_map(preds, gts, [SHAPE], ["a", "b", "c"])
    pcs = r["per_class"]
    assert (pcs[0]["map50"], pcs[1]["map50"]) == (1.0, 0.0)
    assert math.isnan(pcs[2]["map50"]) and math.isnan(pcs[2]["map50_95"]) and pcs[2]["instances"] == 0
    assert r["map50"] == pytest.approx(0.5) and r["map50_95"] == pytest.approx(0.5)
    table = format_map_table(r)
    assert table.splitlines()[2].split()[0] == "all" and "c" in table and "-" in table.splitlines()[-1]


def test_no_predictions_and_no_ground_truth():
    r = coco_map([_det()], [_gt([0, 10, 10, 60, 60])], [SHAPE], ["a"])
    assert r["map50"] == 0.0 and r["map50_95"] == 0.0
    r = coco_map([_det([10, 10, 60, 60, 0.9, 0])], [_gt()], [SHAPE], ["a"])
    assert math.isnan(r["map50"]) and r["instances"] == 0


def test_up_to_300_detections_per_image_count():
    # 150 GT in one image, all found: with COCO's default maxDets=100 recall would cap at 2/3.
    xy = np.stack(np.meshgrid(np.arange(15) * 40, np.arange(10) * 40), -1).reshape(-1, 2).astype(np.float32)
    boxes = np.concatenate([xy, xy + 30], axis=1)
    gt = np.concatenate([np.zeros((150, 1), np.float32), boxes], axis=1)
    scores = np.linspace(0.9, 0.1, 150, dtype=np.float32)[:, None]
    det = np.concatenate([boxes, scores, np.zeros((150, 1), np.float32)], axis=1)
    r = coco_map([det], [gt], [SHAPE], ["a"])
    assert r["map50_95"] == pytest.approx(1.0)


def test_bad_inputs_raise():
    with pytest.raises(EdgeqError, match="length"):
        coco_map([_det()], [_gt(), _gt()], [SHAPE], ["a"])
    with pytest.raises(EdgeqError, match="class"):
        coco_map([_det([0, 0, 5, 5, 0.5, 3])], [_gt([0, 0, 0, 5, 5])], [SHAPE], ["a", "b"])


# ---------------------------------------------------------------- cross-check vs pycocotools


def _random_case(seed, n_img=12, nc=4):
    rng = np.random.default_rng(seed)
    preds, gts = [], []
    for _ in range(n_img):
        m = int(rng.integers(0, 9))
        xy = rng.uniform(0, 500, size=(m, 2))
        wh = rng.uniform(5, 120, size=(m, 2))
        cls = rng.integers(0, nc - 1, size=(m, 1))  # class nc-1 never has GT
        gt = np.concatenate([cls, xy, xy + wh], axis=1)
        found = rng.random(m) < 0.8
        jitter = rng.normal(0, 0.08, size=(m, 4)) * np.concatenate([wh, wh], axis=1)
        tp = np.concatenate([gt[found, 1:] + jitter[found], rng.random((found.sum(), 1)), gt[found, :1]], axis=1)
        k = int(rng.integers(0, 6))
        fxy = rng.uniform(0, 500, size=(k, 2))
        fp = np.concatenate(
            [fxy, fxy + rng.uniform(5, 100, size=(k, 2)), rng.random((k, 1)) * 0.9, rng.integers(0, nc, (k, 1))],
            axis=1,
        )
        preds.append(np.concatenate([tp, fp]).astype(np.float32))
        gts.append(gt.astype(np.float32))
    return preds, gts, [SHAPE] * n_img, [f"c{i}" for i in range(nc)]


def _pycocotools_reference(preds, gts, shapes, nc):
    """Per-class AP straight from pycocotools, built independently of edgeq's code."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, anns, dets = [], [], []
    for i, (p, g, (h, w)) in enumerate(zip(preds, gts, shapes)):
        images.append({"id": i + 1, "height": h, "width": w})
        for row in g.astype(np.float64):
            bw, bh = row[3] - row[1], row[4] - row[2]
            anns.append(
                {"id": len(anns) + 1, "image_id": i + 1, "category_id": int(row[0]) + 1,
                 "bbox": [row[1], row[2], bw, bh], "area": bw * bh, "iscrowd": 0}
            )
        for row in p.astype(np.float64):
            dets.append({"image_id": i + 1, "category_id": int(row[5]) + 1, "score": row[4],
                         "bbox": [row[0], row[1], row[2] - row[0], row[3] - row[1]]})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": c + 1} for c in range(nc)]}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.params.maxDets = [1, 10, 300]
        ev.evaluate()
        ev.accumulate()
    prec = ev.eval["precision"][:, :, :, 0, -1]  # area "all", maxDets 300
    per50, per = [], []
    for k in range(nc):
        p = prec[:, :, k]
        per50.append(p[0].mean() if (p > -1).all() else np.nan)
        per.append(p.mean() if (p > -1).all() else np.nan)
    # overall means as COCOeval.summarize() forms them (mean of the entries > -1); summarize()
    # itself cannot be used: pycocotools hard-codes maxDets=100 there and reports -1 for [1, 10, 300]
    overall = (prec[prec > -1].mean(), prec[0][prec[0] > -1].mean())
    return np.array(per50), np.array(per), overall


@pytest.fixture(params=["faster_coco_eval", "pycocotools"])
def backend(request, monkeypatch):
    if request.param == "pycocotools":
        monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # import now raises ImportError
    return request.param


@pytest.mark.parametrize("seed", [0, 1])
def test_agrees_with_pycocotools(seed, backend):
    from edgeq.runtime.evaluate import _coco_api

    assert _coco_api()[0].__module__.startswith(backend)
    preds, gts, shapes, names = _random_case(seed)
    ref50, ref, (ref_map, ref_map50) = _pycocotools_reference(preds, gts, shapes, len(names))
    r = coco_map(preds, gts, shapes, names)
    got50 = np.array([pc["map50"] for pc in r["per_class"]])
    got = np.array([pc["map50_95"] for pc in r["per_class"]])
    np.testing.assert_allclose(got50, ref50, atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(got, ref, atol=1e-6, equal_nan=True)
    assert math.isnan(got[-1])  # class without GT
    assert r["map50_95"] == pytest.approx(ref_map, abs=1e-6)
    assert r["map50"] == pytest.approx(ref_map50, abs=1e-6)
    assert 0.2 < r["map50_95"] < 0.95  # a non-trivial case


# ---------------------------------------------------------------- end to end


def _tiny_dataset():
    rng = np.random.default_rng(3)
    shapes = [(480, 640), (640, 480), (300, 300), (123, 457), (720, 1280)]
    data = []
    for i, (h, w) in enumerate(shapes):
        img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        n = 1 + i % 3
        cxcy = rng.uniform(0.25, 0.75, size=(n, 2))
        wh = rng.uniform(0.05, 0.4, size=(n, 2))
        cls = rng.integers(0, 3, size=(n, 1))
        data.append((img, np.concatenate([cls, cxcy, wh], axis=1).astype(np.float32), f"img{i}.jpg"))
    return data


def _perfect_predictor(dataset, imgsz, nc, anchors=20):
    """A fake model that returns the labels as raw output, in letterboxed input pixels."""
    state = {"next": 0}

    def predict(batch):
        out = np.zeros((len(batch), anchors, 5 + nc), dtype=np.float32)
        for b in range(len(batch)):
            img, labels, _ = dataset[state["next"]]
            state["next"] += 1
            _, info = letterbox(img, imgsz)
            h, w = info.orig_shape
            for a, (c, cx, cy, bw, bh) in enumerate(labels):
                out[b, a, 0] = cx * w * info.ratio + info.pad[0]
                out[b, a, 1] = cy * h * info.ratio + info.pad[1]
                out[b, a, 2] = bw * w * info.ratio
                out[b, a, 3] = bh * h * info.ratio
                out[b, a, 4] = 0.9
                out[b, a, 5 + int(c)] = 1.0
            out[b, len(labels):, :4] = 10.0  # filler rows with zero objectness
        return out

    return predict


def test_evaluate_end_to_end_perfect():
    data = _tiny_dataset()
    names = ["x", "y", "z"]
    r = evaluate(_perfect_predictor(data, 320, 3), data, 320, names, batch_size=2, progress=False)
    assert r["map50"] == pytest.approx(1.0) and r["map50_95"] == pytest.approx(1.0)
    assert r["images"] == 5 and r["instances"] == sum(len(d[1]) for d in data)
    assert r["speed_ms_per_image"] >= 0.0


def test_evaluate_rejects_wrong_output_shape():
    data = _tiny_dataset()[:2]
    with pytest.raises(EdgeqError, match="predict returned"):
        evaluate(lambda x: np.zeros((1, 10, 8), np.float32), data, 64, ["a", "b", "c"], progress=False)
    with pytest.raises(EdgeqError, match="empty"):
        evaluate(lambda x: x, [], 64, ["a"], progress=False)


def test_runtime_needs_no_torch():
    # design rule: edgeq.runtime must run where only numpy + OpenCV (+ a backend) are installed
    code = (
        "import sys, edgeq.runtime.preprocess, edgeq.runtime.postprocess, edgeq.runtime.evaluate;"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('edgeq.export', 'edgeq.models'))];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
