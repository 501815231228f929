import numpy as np
import pytest

from edgeq.errors import EdgeqError
from edgeq.runtime.postprocess import scale_boxes
from edgeq.runtime.preprocess import LetterboxInfo, letterbox, preprocess, preprocess_batch, to_input


def _img(h, w, c=3, seed=0):
    rng = np.random.default_rng(seed)
    shape = (h, w) if c is None else (h, w, c)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


@pytest.mark.parametrize(
    "hw, new_shape, ratio, pad",
    [
        ((480, 640), 640, 1.0, (0.0, 80.0)),  # landscape: pad top/bottom
        ((640, 480), 640, 1.0, (80.0, 0.0)),  # portrait: pad left/right
        ((500, 500), 320, 320 / 500, (0.0, 0.0)),  # square, shrink
        ((100, 50), 400, 4.0, (100.0, 0.0)),  # upscale: 400x200 padded by 100 on each side
        ((720, 1280), (384, 640), 0.5, (0.0, 12.0)),  # rectangular target (h, w)
    ],
)
def test_letterbox_shape_ratio_pad(hw, new_shape, ratio, pad):
    out, info = letterbox(_img(*hw), new_shape)
    expect_hw = (new_shape, new_shape) if isinstance(new_shape, int) else new_shape
    assert out.shape == (*expect_hw, 3)
    assert out.dtype == np.uint8
    assert info.ratio == pytest.approx(ratio)
    assert info.pad == pad
    assert info.orig_shape == hw


def test_letterbox_odd_padding_and_colour():
    out, info = letterbox(_img(100, 301), 320)  # 301 -> 320, 100 -> round(106.3) = 106, pad 214
    assert out.shape == (320, 320, 3)
    assert info.pad == (0.0, 107.0)
    assert np.all(out[:107] == 114) and np.all(out[107 + 106 :] == 114)
    assert not np.all(out[107:213] == 114)


def test_letterbox_no_scaleup_only_pads():
    img = _img(100, 50)
    out, info = letterbox(img, 200, scaleup=False)
    assert out.shape == (200, 200, 3)
    assert info.ratio == 1.0 and info.pad == (75.0, 50.0)
    np.testing.assert_array_equal(out[50:150, 75:125], img)


def test_letterbox_identity_returns_copy():
    img = _img(64, 64)
    out, info = letterbox(img, 64)
    np.testing.assert_array_equal(out, img)
    assert out is not img and info == LetterboxInfo(1.0, (0.0, 0.0), (64, 64))


@pytest.mark.parametrize("hw, imgsz", [((480, 640), 640), ((640, 480), 320), ((37, 91), 416), ((300, 200), (256, 512))])
def test_box_round_trip(hw, imgsz):
    _, info = letterbox(_img(*hw), imgsz)
    h, w = hw
    box = np.array([[0.1 * w, 0.2 * h, 0.7 * w, 0.9 * h], [0, 0, w, h]], dtype=np.float32)
    fwd = box.copy()
    fwd[:, [0, 2]] = fwd[:, [0, 2]] * info.ratio + info.pad[0]
    fwd[:, [1, 3]] = fwd[:, [1, 3]] * info.ratio + info.pad[1]
    np.testing.assert_allclose(scale_boxes(fwd, info), box, atol=1e-3)


def test_scale_boxes_clips_and_keeps_extra_columns():
    info = LetterboxInfo(ratio=0.5, pad=(10.0, 0.0), orig_shape=(100, 200))
    det = np.array([[0, -5, 500, 40, 0.9, 3]], dtype=np.float32)
    out = scale_boxes(det, info)
    np.testing.assert_allclose(out, [[0, 0, 200, 80, 0.9, 3]])
    assert det[0, 0] == 0  # input untouched


def test_to_input_layout_and_range():
    img = np.zeros((2, 3, 3), dtype=np.uint8)
    img[..., 0] = 255  # blue channel in BGR
    x = to_input(img)
    assert x.shape == (3, 2, 3) and x.dtype == np.float32 and x.flags["C_CONTIGUOUS"]
    assert np.all(x[2] == 1.0) and np.all(x[:2] == 0.0)  # blue ends up last (RGB)


def test_preprocess_grayscale_and_bgra_accepted():
    gray = _img(50, 80, c=None)
    x2, _ = preprocess(gray, 64)
    x1, _ = preprocess(gray[..., None], 64)
    x3, _ = preprocess(np.repeat(gray[..., None], 3, axis=2), 64)
    np.testing.assert_array_equal(x2, x3)
    np.testing.assert_array_equal(x1, x3)

    bgra = _img(50, 80, c=4)
    xa, _ = preprocess(bgra, 64)
    xb, _ = preprocess(np.ascontiguousarray(bgra[..., :3]), 64)
    np.testing.assert_array_equal(xa, xb)
    assert xa.shape == (3, 64, 64)


def test_preprocess_batch_matches_single():
    imgs = [_img(480, 640, seed=1), _img(200, 100, seed=2), _img(64, 64, c=None, seed=3)]
    batch, infos = preprocess_batch(imgs, 128)
    assert batch.shape == (3, 3, 128, 128) and batch.dtype == np.float32
    for img, x, info in zip(imgs, batch, infos):
        single, single_info = preprocess(img, 128)
        np.testing.assert_array_equal(x, single)
        assert info == single_info


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((10, 10, 3), dtype=np.float32),
        np.zeros((10, 10, 3), dtype=np.uint16),
        np.zeros((10, 10, 2), dtype=np.uint8),
        np.zeros((2, 10, 10, 3), dtype=np.uint8),
        np.zeros((10,), dtype=np.uint8),
        np.zeros((0, 10, 3), dtype=np.uint8),
        [[1, 2], [3, 4]],
    ],
)
def test_bad_images_raise(bad):
    with pytest.raises(EdgeqError) as exc:
        preprocess(bad, 32)
    if isinstance(bad, np.ndarray):
        assert str(bad.shape) in str(exc.value)


@pytest.mark.parametrize("size", [0, -32, (32,), (32, 0), 32.0, "640", True])
def test_bad_size_raises(size):
    with pytest.raises(EdgeqError):
        letterbox(_img(10, 10), size)


def test_empty_batch_raises():
    with pytest.raises(EdgeqError):
        preprocess_batch([], 32)
