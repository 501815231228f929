"""Training: the loss learns a fixed batch; the trainer writes resumable checkpoints."""

from __future__ import annotations

import csv

import pytest
import torch

from edgeq.data.synthetic import generate_dataset
from edgeq.data.yolo import YoloDataset
from edgeq.models.checkpoint import load_checkpoint
from edgeq.models.yolo import DetectionModel
from edgeq.training.loader import TrainDataset, collate
from edgeq.training.loss import DetectionLoss, bbox_ciou
from edgeq.training.trainer import TrainConfig, Trainer


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("tiny"), n_train=8, n_val=4, imgsz=128, seed=3)


def test_ciou_of_identical_boxes_is_one_and_drops_with_offset():
    box = torch.tensor([[10.0, 10.0, 4.0, 6.0]])
    assert torch.allclose(bbox_ciou(box, box), torch.ones(1), atol=1e-6)
    shifted = box + torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    assert bbox_ciou(box, shifted).item() < 0.8


def test_loss_goes_down_on_a_fixed_batch(tiny_data):
    torch.manual_seed(0)
    data = TrainDataset(YoloDataset(tiny_data, "train"), 128, augment=False)
    imgs, targets = collate([data[i] for i in range(8)])
    model = DetectionModel("yolov5n", nc=8).train()
    loss_fn = DetectionLoss(model.detect, imgsz=128)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(25):
        loss, parts = loss_fn(model(imgs), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        assert parts.shape == (3,) and torch.isfinite(parts).all()
    assert targets.shape[0] > 8  # several objects per image reach the loss
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses


def test_trainer_checkpoints_and_resumes(tiny_data, tmp_path):
    cfg = TrainConfig(cfg="yolov5n", data=str(tiny_data), imgsz=128, epochs=2, batch=4, workers=0, out=str(tmp_path))
    Trainer(cfg, progress=False).fit()
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    best = load_checkpoint(tmp_path / "best.pt")
    assert best.names == YoloDataset(tiny_data, "val").names and best.imgsz == 128
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1

    resumed = Trainer(TrainConfig(out=str(tmp_path), workers=0), resume=True, progress=False, epochs=3)
    assert resumed.start_epoch == 2 and resumed.cfg.imgsz == 128 and resumed.cfg.data == str(tiny_data)
    resumed.fit()
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]


def test_resume_without_last_checkpoint_is_a_clear_error(tmp_path):
    from edgeq.errors import EdgeqError

    with pytest.raises(EdgeqError, match="last.pt does not exist"):
        Trainer(TrainConfig(out=str(tmp_path)), resume=True)
