import numpy as np
import pytest
import yaml

from edgeq.data import synthetic, synthetic_render
from edgeq.data.synthetic import generate_dataset, generate_images, generate_split
from edgeq.data.synthetic_render import CLASS_NAMES, render_sample


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_class_names():
    assert len(CLASS_NAMES) >= 8
    assert len(set(CLASS_NAMES)) == len(CLASS_NAMES)


def test_same_seed_is_byte_identical(tmp_path):
    a = generate_split(tmp_path / "a", 6, 128, seed=3, split_name="val")
    b = generate_split(tmp_path / "b", 6, 128, seed=3, split_name="val")
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a == tmp_path / "a" / "images" / "val"
    assert sorted(fa) == sorted(fb)
    assert len([k for k in fa if k.endswith(".jpg")]) == 6
    assert len([k for k in fa if k.endswith(".txt")]) == 6
    assert fa == fb


def test_different_seed_differs(tmp_path):
    generate_split(tmp_path / "a", 3, 128, seed=0, split_name="train")
    generate_split(tmp_path / "b", 3, 128, seed=1, split_name="train")
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert all(fa[k] != fb[k] for k in fa if k.endswith(".jpg"))


def test_image_depends_only_on_seed_and_index(tmp_path):
    generate_split(tmp_path / "a", 4, 96, seed=5, split_name="x")
    generate_split(tmp_path / "b", 2, 96, seed=5, split_name="x")
    for name in ("000000.jpg", "000001.jpg"):
        assert (tmp_path / "a/images/x" / name).read_bytes() == (tmp_path / "b/images/x" / name).read_bytes()


def test_regenerating_smaller_removes_stale_files(tmp_path):
    generate_split(tmp_path, 5, 64, seed=0, split_name="val")
    generate_split(tmp_path, 2, 64, seed=0, split_name="val")
    assert len(list((tmp_path / "images/val").iterdir())) == 2
    assert len(list((tmp_path / "labels/val").iterdir())) == 2


def test_generate_dataset_layout_and_labels(tmp_path):
    data_yaml = generate_dataset(tmp_path / "ds", n_train=8, n_val=4, imgsz=160, seed=0)
    cfg = yaml.safe_load(data_yaml.read_text())
    assert cfg["train"] == "images/train" and cfg["val"] == "images/val"
    assert cfg["nc"] == len(CLASS_NAMES) and cfg["names"] == list(CLASS_NAMES)
    assert f"v{synthetic_render.GENERATOR_VERSION} " in cfg["generator"]
    assert (tmp_path / "ds").resolve().as_posix() == cfg["path"].replace("\\", "/")
    train = tmp_path / "ds/images/train/000000.jpg"
    val = tmp_path / "ds/images/val/000000.jpg"
    assert train.read_bytes() != val.read_bytes()  # val uses its own seed stream
    n_objects = 0
    for txt in sorted((tmp_path / "ds/labels").rglob("*.txt")):
        rows = [ln.split() for ln in txt.read_text().splitlines()]
        for r in rows:
            assert len(r) == 5 and all(len(v.split(".")[1]) == 6 for v in r[1:])
            cls, vals = int(r[0]), [float(v) for v in r[1:]]
            assert 0 <= cls < len(CLASS_NAMES)
            assert all(0.0 <= v <= 1.0 for v in vals)
            cx, cy, w, h = vals
            assert cx - w / 2 >= -1e-6 and cx + w / 2 <= 1 + 1e-6
            assert cy - h / 2 >= -1e-6 and cy + h / 2 <= 1 + 1e-6
        n_objects += len(rows)
    assert n_objects >= 12 * 2 - 2  # 2-10 placed per image; a rare drop is allowed


def test_generate_images_only(tmp_path):
    paths = generate_images(tmp_path / "calib", 3, 96, seed=7)
    assert [p.name for p in paths] == ["000000.jpg", "000001.jpg", "000002.jpg"]
    assert not list((tmp_path / "calib").glob("*.txt"))


def test_render_sample_shapes_and_counts():
    counts, classes = [], set()
    for i in range(40):
        img, labels = render_sample(np.random.default_rng([11, i]), 320)
        assert img.shape == (320, 320, 3) and img.dtype == np.uint8
        assert labels.dtype == np.float32 and labels.shape[1] == 5
        assert np.all(labels[:, 1:] >= 0) and np.all(labels[:, 1:] <= 1)
        assert np.all(labels[:, 3:] * 320 >= synthetic_render.MIN_BOX_PX)
        counts.append(len(labels))
        classes.update(int(c) for c in labels[:, 0])
    assert 1 <= min(counts) and max(counts) <= 10
    assert 3 <= np.mean(counts) <= 8
    assert classes == set(range(len(CLASS_NAMES)))
    sizes = []
    for i in range(40):
        _, labels = render_sample(np.random.default_rng([12, i]), 320)
        sizes.extend(np.maximum(labels[:, 3], labels[:, 4]) * 320)
    sizes = np.array(sizes)
    assert sizes.min() < 16 and sizes.max() > 100  # small to large
    assert np.median(sizes) < 80  # skewed towards small/medium


@pytest.mark.parametrize("i", range(12))
def test_boxes_are_tight_on_drawn_pixels(i):
    """Objects drawn onto the background change exactly the pixels inside their boxes."""
    rng = np.random.default_rng([99, i])
    bg = synthetic_render._background(rng, 256)
    img = bg.copy()
    labels = synthetic_render._place_objects(img, rng, 256)
    assert len(labels) >= 1
    changed = np.abs(img.astype(int) - bg.astype(int)).max(2) > 3
    boxes = np.round(np.stack([
        (labels[:, 1] - labels[:, 3] / 2) * 256, (labels[:, 2] - labels[:, 4] / 2) * 256,
        (labels[:, 1] + labels[:, 3] / 2) * 256, (labels[:, 2] + labels[:, 4] / 2) * 256,
    ], 1)).astype(int)
    inside = np.zeros_like(changed)
    for x1, y1, x2, y2 in boxes:
        inside[max(y1 - 2, 0):y2 + 2, max(x1 - 2, 0):x2 + 2] = True  # faint antialiasing fringe
    assert not np.any(changed & ~inside), "drawn pixels outside every box"
    for (x1, y1, x2, y2), (cls, *_) in zip(boxes, labels):
        sub = changed[y1:y2, x1:x2]
        assert sub.mean() > 0.1, f"box of {CLASS_NAMES[int(cls)]} is mostly empty"
        # Tight: the object reaches (within 1 px) each of the four box edges.
        assert sub[:2].any() and sub[-2:].any() and sub[:, :2].any() and sub[:, -2:].any()


def test_generator_is_fast_enough():
    import time

    render_sample(np.random.default_rng(0), 320)  # warm-up (builds the noise bank)
    t = time.process_time()  # CPU time: robust to other processes competing for the cores
    for i in range(30):
        render_sample(np.random.default_rng([0, i]), 320)
    rate = 30 / max(time.process_time() - t, 1e-9)
    assert rate > 40, f"{rate:.0f} images/s"  # the target is >= 100/s on one core; loose for slow CI


def test_parallel_workers_give_identical_files(tmp_path):
    n = 2 * synthetic._CHUNK + 3  # enough for the process pool to be used
    generate_split(tmp_path / "seq", n, 48, seed=4, split_name="val")
    generate_split(tmp_path / "par", n, 48, seed=4, split_name="val", workers=2)
    assert _files(tmp_path / "seq") == _files(tmp_path / "par")
