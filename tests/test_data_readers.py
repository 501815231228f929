import json
import warnings

import cv2
import numpy as np
import pytest
import yaml

from edgeq.data.coco import CocoDataset
from edgeq.data.images import IMAGE_SUFFIXES, iter_images, list_images, read_image
from edgeq.data.yolo import YoloDataset, label_path_for, load_data_yaml
from edgeq.errors import EdgeqError


def _write_img(path, h=40, w=60, value=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((h, w, 3), 200 if value is None else value, np.uint8)
    cv2.imwrite(str(path), img)
    return img


def _yolo_ds(root, labels, names=("a", "b", "c"), split="val", nc=None):
    """labels: {stem: text or None (no label file)}"""
    for stem, text in labels.items():
        _write_img(root / "images" / split / f"{stem}.jpg")
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        if text is not None:
            (root / "labels" / split / f"{stem}.txt").write_text(text)
    cfg = {"path": ".", split: f"images/{split}", "names": list(names) if isinstance(names, tuple) else names}
    if nc is not None:
        cfg["nc"] = nc
    (root / "data.yaml").write_text(yaml.safe_dump(cfg))
    return root / "data.yaml"


# ----------------------------------------------------------------------------- image folders


def test_list_images_sorted_recursive(tmp_path):
    _write_img(tmp_path / "b.png")
    _write_img(tmp_path / "sub" / "a.jpg")
    _write_img(tmp_path / "C.JPEG")
    (tmp_path / "notes.txt").write_text("x")
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)] == ["C.JPEG", "b.png", "sub/a.jpg"]


def test_list_images_errors(tmp_path):
    with pytest.raises(EdgeqError, match="does not exist"):
        list_images(tmp_path / "nope")
    (tmp_path / "file.jpg").write_text("x")
    with pytest.raises(EdgeqError, match="not a directory"):
        list_images(tmp_path / "file.jpg")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x")
    with pytest.raises(EdgeqError, match=r"no images.*\.webp"):
        list_images(tmp_path / "empty")
    assert ".webp" in IMAGE_SUFFIXES


def test_read_image_and_corrupt_files(tmp_path):
    good = _write_img(tmp_path / "good.png", 10, 12, value=7)
    (tmp_path / "broken1.jpg").write_bytes(b"not a jpeg at all")
    (tmp_path / "broken2.png").write_bytes(b"")
    _write_img(tmp_path / "good2.jpg")
    np.testing.assert_array_equal(read_image(tmp_path / "good.png"), good)
    assert read_image(tmp_path / "broken1.jpg") is None
    assert read_image(tmp_path / "broken2.png") is None
    assert read_image(tmp_path / "missing.png") is None

    with pytest.warns(UserWarning, match=r"Skipped 2 unreadable.*broken1\.jpg.*broken2\.png") as rec:
        got = list(iter_images(list_images(tmp_path)))
    assert len(rec) == 1
    assert [p.name for p, _ in got] == ["good.png", "good2.jpg"]
    assert all(img.dtype == np.uint8 and img.shape[2] == 3 for _, img in got)


def test_iter_images_no_warning_when_all_good(tmp_path):
    _write_img(tmp_path / "a.jpg")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(list(iter_images(list_images(tmp_path)))) == 1


# ----------------------------------------------------------------------------- YOLO


def test_yolo_dataset_loads(tmp_path):
    yml = _yolo_ds(tmp_path, {"x": "0 0.5 0.5 0.2 0.4\n2 0.1 0.2 0.1 0.1\n", "y": "\n1 0.5 0.5 1.0 1.0\n"})
    ds = YoloDataset(yml, "val")
    assert ds.names == ["a", "b", "c"] and ds.nc == 3 and len(ds) == 2
    img, labels, path = ds[0]
    assert img.shape == (40, 60, 3) and img.dtype == np.uint8
    assert labels.dtype == np.float32 and labels.shape == (2, 5)
    np.testing.assert_allclose(labels[0], [0, 0.5, 0.5, 0.2, 0.4])
    assert path.name == "x.jpg"
    assert ds.labels(1).tolist() == [[1, 0.5, 0.5, 1.0, 1.0]]
    assert ds.check_images() == []


def test_yolo_names_dict_and_from_dataset_yaml(tmp_path):
    yml = _yolo_ds(tmp_path, {"x": "1 0.5 0.5 0.2 0.2\n"}, names={1: "dog", 0: "cat"}, nc=2)
    ds = YoloDataset.from_dataset_yaml(yml, "val")
    assert ds.names == ["cat", "dog"]
    assert load_data_yaml(yml).names == ["cat", "dog"]


def test_yolo_yaml_without_path_resolves_against_yaml_folder(tmp_path):
    _yolo_ds(tmp_path / "ds", {"x": "0 0.5 0.5 0.2 0.2\n"})
    (tmp_path / "ds" / "other.yaml").write_text(yaml.safe_dump({"val": "images/val", "names": ["a"]}))
    assert len(YoloDataset(tmp_path / "ds" / "other.yaml")) == 1


def test_yolo_folder_source(tmp_path):
    _write_img(tmp_path / "images" / "val" / "x.jpg")
    (tmp_path / "labels" / "val").mkdir(parents=True)
    (tmp_path / "labels" / "val" / "x.txt").write_text("4 0.5 0.5 0.2 0.2\n")
    ds = YoloDataset(tmp_path, "val")
    assert len(ds) == 1 and ds.names == ["0", "1", "2", "3", "4"]


def test_label_path_convention(tmp_path):
    p = tmp_path / "images" / "x" / "images" / "val" / "a.b.jpg"
    assert label_path_for(p) == tmp_path / "images" / "x" / "labels" / "val" / "a.b.txt"


def test_yolo_missing_labels_folder(tmp_path):
    _write_img(tmp_path / "images" / "val" / "x.jpg")
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"val": "images/val", "names": ["a"]}))
    with pytest.raises(EdgeqError, match=r"Labels folder .*labels.val does not exist"):
        YoloDataset(tmp_path / "data.yaml")


def test_yolo_missing_label_file_is_background_with_one_warning(tmp_path):
    yml = _yolo_ds(tmp_path, {"x": "0 0.5 0.5 0.2 0.2\n", "y": None, "z": None})
    with pytest.warns(UserWarning, match=r"2 of 3 images .*background.*y\.jpg") as rec:
        ds = YoloDataset(yml)
    assert len(rec) == 1
    assert ds.labels(1).shape == (0, 5)


@pytest.mark.parametrize(
    "text, match",
    [
        ("0 0.5 0.5 0.2 0.2\n0 0.5 1.2 0.2 0.2\n", r"x\.txt, line 2: coordinate outside \[0, 1\]"),
        ("0 0.5 0.5 0.2 -0.01\n", r"line 1: coordinate outside"),
        ("3 0.5 0.5 0.2 0.2\n", r"x\.txt, line 1: class id 3 is out of range for nc=3"),
        ("0 0.5 0.5 0.2\n", r"x\.txt, line 1: expected 5 values"),
        ("0 0.5 abc 0.2 0.2\n", r"x\.txt, line 1: expected numbers"),
        ("\n\n1.5 0.5 0.5 0.2 0.2\n", r"line 3: class id must be a non-negative integer"),
        ("0 0.5 0.5 0.2 nan\n", r"line 1: .*non-finite"),
    ],
)
def test_yolo_bad_labels(tmp_path, text, match):
    yml = _yolo_ds(tmp_path, {"x": text})
    with pytest.raises(EdgeqError, match=match):
        YoloDataset(yml)


def test_yolo_tolerates_tiny_overshoot_and_segments(tmp_path):
    yml = _yolo_ds(tmp_path, {"x": "0 0.5 0.5 1.0005 0.2\n1 0.1 0.1 0.3 0.1 0.3 0.5 0.1 0.5\n"})
    labels = YoloDataset(yml).labels(0)
    assert labels[0, 3] == 1.0
    np.testing.assert_allclose(labels[1], [1, 0.2, 0.3, 0.2, 0.4], atol=1e-6)


def test_yolo_yaml_errors(tmp_path):
    yml = _yolo_ds(tmp_path, {"x": "0 0.5 0.5 0.2 0.2\n"})
    with pytest.raises(EdgeqError, match="no 'train' split"):
        YoloDataset(yml, "train")
    (tmp_path / "bad.yaml").write_text("names: [a, b\n")
    with pytest.raises(EdgeqError, match="not valid YAML"):
        YoloDataset(tmp_path / "bad.yaml")
    (tmp_path / "nc.yaml").write_text(yaml.safe_dump({"val": "images/val", "names": ["a"], "nc": 2}))
    with pytest.raises(EdgeqError, match="'nc' is 2 but 'names' lists 1"):
        YoloDataset(tmp_path / "nc.yaml")
    with pytest.raises(EdgeqError, match="does not exist"):
        YoloDataset(tmp_path / "missing.yaml")


def test_yolo_undecodable_image(tmp_path):
    yml = _yolo_ds(tmp_path, {"x": "0 0.5 0.5 0.2 0.2\n", "y": ""})
    bad = tmp_path / "images" / "val" / "y.jpg"
    bad.write_bytes(b"garbage")
    ds = YoloDataset(yml)  # no decode at load time
    assert ds.check_images() == [bad]
    with pytest.raises(EdgeqError, match=r"y\.jpg cannot be decoded"):
        ds[1]
    assert ds[0][0].shape == (40, 60, 3)


# ----------------------------------------------------------------------------- COCO


def _coco(tmp_path, extra_images=(), annotations=None):
    img_dir = tmp_path / "imgs"
    _write_img(img_dir / "a.jpg", 100, 200)
    _write_img(img_dir / "b.jpg", 50, 50)
    data = {
        "images": [
            {"id": 7, "file_name": "a.jpg", "width": 200, "height": 100},
            {"id": 9, "file_name": "b.jpg", "width": 50, "height": 50},
            *extra_images,
        ],
        "categories": [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}],
        "annotations": annotations
        if annotations is not None
        else [
            {"id": 1, "image_id": 7, "category_id": 18, "bbox": [10, 20, 40, 30], "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 1, "bbox": [190, 90, 20, 20]},  # clipped to image
            {"id": 3, "image_id": 9, "category_id": 1, "bbox": [0, 0, 50, 50], "iscrowd": 1},  # crowd: left out
        ],
    }
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps(data))
    return ann, img_dir


def test_coco_round_trip(tmp_path):
    ann, img_dir = _coco(tmp_path)
    ds = CocoDataset(ann, img_dir)
    assert ds.names == ["person", "dog"] and ds.category_ids == [1, 18]
    assert len(ds) == 2 and ds.image_ids == [7, 9]
    img, labels, path = ds[0]
    assert img.shape == (100, 200, 3) and path.name == "a.jpg"
    np.testing.assert_allclose(labels[0], [1, 30 / 200, 35 / 100, 40 / 200, 30 / 100], rtol=1e-6)
    np.testing.assert_allclose(labels[1], [0, 195 / 200, 95 / 100, 10 / 200, 10 / 100], rtol=1e-6)
    # Back to COCO pixel xywh with the original category id.
    cls, cx, cy, w, h = labels[0]
    assert ds.category_ids[int(cls)] == 18
    xywh = [(cx - w / 2) * 200, (cy - h / 2) * 100, w * 200, h * 100]
    np.testing.assert_allclose(xywh, [10, 20, 40, 30], rtol=1e-5)
    assert ds.labels(1).shape == (0, 5)


def test_coco_missing_images_warn_and_skip(tmp_path):
    ann, img_dir = _coco(tmp_path, extra_images=[{"id": 11, "file_name": "gone.jpg", "width": 5, "height": 5}])
    with pytest.warns(UserWarning, match=r"Skipped 1 image.*gone\.jpg"):
        ds = CocoDataset(ann, img_dir)
    assert len(ds) == 2


def test_coco_errors(tmp_path):
    ann, img_dir = _coco(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [,]}')
    with pytest.raises(EdgeqError, match=r"bad\.json is not valid JSON \(line 1"):
        CocoDataset(bad, img_dir)
    bad.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(EdgeqError, match="has no 'categories' key"):
        CocoDataset(bad, img_dir)
    ann2, _ = _coco(tmp_path, annotations=[{"image_id": 7, "category_id": 5, "bbox": [0, 0, 1, 1]}])
    with pytest.raises(EdgeqError, match="category_id 5"):
        CocoDataset(ann2, img_dir)
    ann3, _ = _coco(tmp_path, annotations=[{"image_id": 7, "category_id": 1}])
    with pytest.raises(EdgeqError, match=r"annotations\[0\] has no 'bbox'"):
        CocoDataset(ann3, img_dir)
    with pytest.raises(EdgeqError, match="does not exist"):
        CocoDataset(tmp_path / "nope.json", img_dir)
