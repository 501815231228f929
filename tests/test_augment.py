import numpy as np
import pytest
import torch

from edgeq.data.augment import (
    mosaic4,
    random_affine,
    random_flip_lr,
    random_hsv,
    resize_long_side,
    xywhn_to_xyxy,
    xyxy_to_xywhn,
)
from edgeq.data.synthetic import generate_dataset
from edgeq.data.yolo import YoloDataset
from edgeq.training.loader import TrainDataset, collate


def _white_rect(h, w, box):
    img = np.zeros((h, w, 3), np.uint8)
    x1, y1, x2, y2 = box
    img[y1:y2, x1:x2] = 255
    return img, np.array([[3, x1, y1, x2, y2]], np.float32)


def _white_box(img):
    """Pixel-edge box (x1, y1, x2, y2) of the bright pixels."""
    ys, xs = np.nonzero(img.max(2) > 127)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def test_conversions_round_trip():
    lab = np.array([[1, 0.5, 0.25, 0.2, 0.1]], np.float32)
    xyxy = xywhn_to_xyxy(lab, 200, 100, padw=3, padh=4)
    np.testing.assert_allclose(xyxy, [[1, 83, 24, 123, 34]])
    back = xyxy_to_xywhn(xywhn_to_xyxy(lab, 200, 100), 200, 100)
    np.testing.assert_allclose(back, lab, atol=1e-6)


def test_flip_moves_box_with_pixels():
    img, lab = _white_rect(60, 80, (10, 5, 30, 25))
    out, new = random_flip_lr(img, lab, np.random.default_rng(0), p=1.0)
    np.testing.assert_allclose(new[0, 1:], _white_box(out))
    assert new[0, 0] == 3
    same, lab2 = random_flip_lr(img, lab, np.random.default_rng(0), p=0.0)
    assert same is img and lab2 is lab


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("degrees", [0.0, 20.0])
def test_affine_moves_box_with_pixels(seed, degrees):
    img, lab = _white_rect(128, 128, (40, 50, 90, 80))
    out, new = random_affine(img, lab, np.random.default_rng(seed), degrees=degrees, translate=0.1, scale=0.3)
    assert out.shape == img.shape
    assert new.shape == (1, 5) and new[0, 0] == 3
    np.testing.assert_allclose(new[0, 1:], _white_box(out), atol=2.0)


def test_affine_border_changes_size_and_drops_boxes_outside():
    img, lab = _white_rect(100, 100, (0, 0, 10, 10))
    lab = np.concatenate([lab, [[1, 45, 45, 55, 55]]]).astype(np.float32)
    out, new = random_affine(img, lab, np.random.default_rng(0), translate=0, scale=0, border=-30)
    assert out.shape == (40, 40, 3)
    assert new[:, 0].tolist() == [1]  # the corner box was cropped away entirely
    np.testing.assert_allclose(new[0, 1:], [15, 15, 25, 25], atol=1e-4)


def test_affine_drops_boxes_that_lose_most_area():
    img, lab = _white_rect(100, 100, (0, 40, 10, 50))
    lab = np.concatenate([lab, [[2, 18, 40, 40, 50]]]).astype(np.float32)
    _, new = random_affine(img, lab, np.random.default_rng(0), translate=0, scale=0, border=-20)
    # box 0 moves to x in [-20, -10]: gone; box 2 keeps (20 of 22 px): kept
    assert new[:, 0].tolist() == [2]


@pytest.mark.parametrize("seed", range(5))
def test_mosaic_boxes_follow_pixels(seed):
    rng = np.random.default_rng(seed)
    samples = []
    for k in range(4):
        h, w = (64, 64) if k % 2 == 0 else (48, 64)
        x1, y1 = int(rng.integers(5, 30)), int(rng.integers(5, 20))
        samples.append(_white_rect(h, w, (x1, y1, x1 + 20, y1 + 18)))
    out, labels = mosaic4(samples, 64, np.random.default_rng(seed), translate=0.0, scale=0.0)
    assert out.shape == (64, 64, 3)
    bright = out.max(2) > 127
    covered = np.zeros_like(bright)
    for _, x1, y1, x2, y2 in labels:
        sub = bright[int(round(y1)):int(round(y2)), int(round(x1)):int(round(x2))]
        assert sub.mean() > 0.95  # each box is filled with white
        covered[int(round(y1)):int(round(y2)), int(round(x1)):int(round(x2))] = True
    # All white pixels are inside some box, except for slivers whose boxes were dropped.
    assert (bright & ~covered).sum() <= 2 * 64


def test_mosaic_boxes_follow_pixels_with_scale():
    samples = [_white_rect(64, 64, (20, 20, 40, 44)) for _ in range(4)]
    for seed in range(4):
        out, labels = mosaic4(samples, 64, np.random.default_rng(seed), degrees=10, translate=0.1, scale=0.3)
        assert out.shape == (64, 64, 3)
        for _, x1, y1, x2, y2 in labels:
            x1, y1, x2, y2 = (int(round(v)) for v in (x1, y1, x2, y2))
            sub = out[max(y1, 0):y2, max(x1, 0):x2].max(2) > 127
            assert sub.any()
            # tight within ~2 px on all sides
            assert sub[:3].any() and sub[-3:].any() and sub[:, :3].any() and sub[:, -3:].any()


def test_hsv_keeps_shape_and_input():
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    before = img.copy()
    out = random_hsv(img, np.random.default_rng(1))
    assert out.shape == img.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(img, before)
    assert not np.array_equal(out, img)


def test_resize_long_side():
    img, lab = _white_rect(50, 100, (10, 10, 30, 20))
    out, new = resize_long_side(img, lab, 200)
    assert out.shape == (100, 200, 3)
    np.testing.assert_allclose(new[0, 1:], [20, 20, 60, 40])


# ----------------------------------------------------------------------------- loader


@pytest.fixture(scope="module")
def tiny_yolo(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    yml = generate_dataset(root, n_train=6, n_val=3, imgsz=96, seed=0)
    return YoloDataset(yml, "train")


@pytest.mark.parametrize("augment", [False, True])
def test_train_dataset_outputs(tiny_yolo, augment):
    ds = TrainDataset(tiny_yolo, imgsz=64, augment=augment, mosaic_p=0.5, seed=1)
    assert len(ds) == len(tiny_yolo)
    for i in range(len(ds)):
        img, tgt = ds[i]
        assert img.shape == (3, 64, 64) and img.dtype == torch.float32
        assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
        assert tgt.dtype == torch.float32 and tgt.ndim == 2 and tgt.shape[1] == 6
        assert torch.all(tgt[:, 0] == 0)
        assert torch.all((tgt[:, 2:] >= 0) & (tgt[:, 2:] <= 1))
        assert torch.all(tgt[:, 4:] > 0)
        assert torch.all(tgt[:, 1] < len(tiny_yolo.names))


def test_train_dataset_val_matches_inference_letterbox(tiny_yolo):
    from edgeq.runtime.preprocess import preprocess

    ds = TrainDataset(tiny_yolo, imgsz=64, augment=False, cache_images=False)
    img, tgt = ds[0]
    expect, _ = preprocess(tiny_yolo[0][0], 64)
    np.testing.assert_array_equal(img.numpy(), expect)
    src = tiny_yolo.labels(0)  # square images: letterbox is a pure scale
    np.testing.assert_allclose(tgt[:, 1:].numpy(), src, atol=1e-5)


def test_train_dataset_reproducible_per_epoch(tiny_yolo):
    a = TrainDataset(tiny_yolo, imgsz=64, augment=True, seed=3)
    b = TrainDataset(tiny_yolo, imgsz=64, augment=True, seed=3, cache_images=False)
    for i in range(3):
        ia, ta = a[i]
        ib, tb = b[i]
        assert torch.equal(ia, ib) and torch.equal(ta, tb)
    first = a[0][0]
    a.set_epoch(1)
    assert not torch.equal(first, a[0][0])


def test_collate_indices(tiny_yolo):
    ds = TrainDataset(tiny_yolo, imgsz=64, augment=False)
    batch = [ds[i] for i in range(3)]
    images, targets = collate(batch)
    assert images.shape == (3, 3, 64, 64)
    counts = [len(t) for _, t in batch]
    assert targets.shape == (sum(counts), 6)
    expect = torch.cat([torch.full((c,), float(k)) for k, c in enumerate(counts)])
    assert torch.equal(targets[:, 0], expect)
    assert all(torch.all(t[:, 0] == 0) for _, t in batch)  # inputs not mutated


def test_dataloader_workers_reproducible(tiny_yolo):
    """Augmentation depends on (seed, epoch, index) only, not on which worker draws a sample."""
    ds = TrainDataset(tiny_yolo, imgsz=64, augment=True, seed=0)
    ds.set_epoch(2)
    batches = []
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=workers, collate_fn=collate)
        batches.append(list(loader))
    for (ia, ta), (ib, tb) in zip(*batches):
        assert ia.shape == (3, 3, 64, 64) and ta.shape[1] == 6
        assert torch.equal(ia, ib) and torch.equal(ta, tb)
