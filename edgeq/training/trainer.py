"""Train a YOLOv5-style detector: the recipe behind the bundled demo model.

It lives in the package (not a script) so that quantization-aware fine-tuning can reuse it.
Every epoch writes ``last.pt`` (everything needed to resume) and, when validation improves,
``best.pt`` in edgeq's checkpoint format; both atomically, so an interrupted run resumes from
the last finished epoch.
"""

from __future__ import annotations

import csv
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeq.errors import EdgeqError

log = logging.getLogger("edgeq")


@dataclass
class TrainConfig:
    """Everything a run depends on; stored in its checkpoints so it can be reproduced."""

    cfg: str = "yolov5s-mobilenetv3-small"
    data: str = ""
    imgsz: int = 320
    epochs: int = 30
    batch: int = 32
    nominal_batch: int = 64
    optimizer: str = "auto"  # auto | SGD | AdamW
    lr0: float | None = None  # None: 0.01 for SGD, 0.001 for AdamW
    lrf: float = 0.01
    momentum: float = 0.937
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    close_mosaic: int = 3
    mosaic: float = 1.0
    workers: int = 1
    seed: int = 0
    out: str = "runs/train"
    val_every: int = 1
    val_images: int = 0  # 0: the whole validation split
    max_iters: int = 0  # stop after this many iterations in total (tests, smoke runs)
    weights: str = ""  # initialize from this checkpoint (fine-tuning, a second phase at another size)
    extra: dict = field(default_factory=dict)


def _param_groups(model: nn.Module, weight_decay: float):
    """Decay conv/linear weights only (not BatchNorm weights, not biases)."""
    decay, no_decay_bn, biases = [], [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if name == "bias":
                biases.append(p)
            elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d, nn.LayerNorm)):
                no_decay_bn.append(p)
            else:
                decay.append(p)
    return [
        {"params": no_decay_bn, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
        {"params": biases, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig, total_iters: int, accumulate: int):
    name = cfg.optimizer
    if name == "auto":  # Short schedules converge faster with AdamW, long ones generalize better with SGD.
        name = "AdamW" if total_iters < 10000 else "SGD"
    lr = cfg.lr0 if cfg.lr0 is not None else (0.001 if name == "AdamW" else 0.01)
    wd = cfg.weight_decay * cfg.batch * accumulate / cfg.nominal_batch
    groups = _param_groups(model, wd)
    if name == "SGD":
        opt = torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=True)
    elif name == "AdamW":
        opt = torch.optim.AdamW(groups, lr=lr, betas=(cfg.momentum, 0.999))
    else:
        raise EdgeqError(f"--optimizer must be auto, SGD or AdamW, got {cfg.optimizer!r}")
    for g in opt.param_groups:
        g["initial_lr"] = lr
    return opt, name


class Trainer:
    """``Trainer(TrainConfig(...)).fit()``; ``resume=True`` continues from ``out/last.pt``."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, progress: bool = True, epochs: int | None = None):
        from edgeq.data.yolo import YoloDataset
        from edgeq.models.yolo import DetectionModel
        from edgeq.training.ema import ModelEMA
        from edgeq.training.loader import TrainDataset, collate
        from edgeq.training.loss import DetectionLoss

        self.out = Path(cfg.out)
        self.last_path, self.best_path = self.out / "last.pt", self.out / "best.pt"
        state = None
        if resume:
            if not self.last_path.is_file():
                raise EdgeqError(f"cannot resume: {self.last_path} does not exist")
            state = torch.load(self.last_path, map_location="cpu", weights_only=True)
            saved = TrainConfig(**state["config"])
            saved.epochs = epochs or saved.epochs
            saved.workers, saved.max_iters = cfg.workers, cfg.max_iters
            cfg = saved
        self.cfg, self.progress = cfg, progress
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EdgeqError(f"cannot create the output folder {self.out} ({exc.strerror})") from None
        _seed_everything(cfg.seed)

        self.train_set = YoloDataset(cfg.data, split="train")
        self.val_set = YoloDataset(cfg.data, split="val")
        self.names = list(self.train_set.names)
        self.model = DetectionModel(cfg.cfg, nc=len(self.names))
        self.model.names = self.names
        if cfg.weights and state is None:
            self._init_from(cfg.weights)
        self.data = TrainDataset(self.train_set, cfg.imgsz, augment=True, mosaic_p=cfg.mosaic, seed=cfg.seed)
        self.loader = torch.utils.data.DataLoader(
            self.data,
            batch_size=cfg.batch,
            shuffle=True,
            num_workers=cfg.workers,
            collate_fn=collate,
            drop_last=len(self.data) > cfg.batch,
            generator=torch.Generator().manual_seed(cfg.seed),
            persistent_workers=False,
        )
        self.nb = len(self.loader)
        self.accumulate = max(round(cfg.nominal_batch / cfg.batch), 1)
        self.optimizer, self.optimizer_name = build_optimizer(self.model, cfg, cfg.epochs * self.nb, self.accumulate)
        self.loss_fn = DetectionLoss(self.model.detect, cfg.imgsz)
        self.ema = ModelEMA(self.model)
        self.start_epoch, self.best_fitness, self.iterations = 0, -1.0, 0
        if state is not None:
            self.model.load_state_dict(state["model"])
            self.ema.ema.load_state_dict(state["ema"])
            self.ema.updates = state["ema_updates"]
            self.optimizer.load_state_dict(state["optimizer"])
            self.start_epoch = state["epoch"] + 1
            self.best_fitness = state["best_fitness"]
            self.iterations = state.get("iterations", 0)
            log.info("resuming %s from epoch %d", self.out, self.start_epoch)

    def _init_from(self, weights: str) -> None:
        from edgeq.models.checkpoint import load_checkpoint

        loaded = load_checkpoint(weights)
        if loaded.model.nc != self.model.nc:
            raise EdgeqError(f"{weights} has {loaded.model.nc} classes but {self.cfg.data} has {self.model.nc}")
        self.model.load_state_dict(loaded.model.state_dict())
        log.info("initialized from %s", weights)

    def lr_factor(self, epoch_float: float) -> float:
        """Cosine from 1 to lrf over the run."""
        x = min(epoch_float / max(self.cfg.epochs, 1), 1.0)
        return ((1 - math.cos(x * math.pi)) / 2) * (self.cfg.lrf - 1) + 1

    def _set_lr(self, ni: int, epoch: int, i: int) -> None:
        cfg = self.cfg
        warmup_iters = max(round(cfg.warmup_epochs * self.nb), 50) if cfg.warmup_epochs > 0 else 0
        factor = self.lr_factor(epoch + i / self.nb)
        for j, g in enumerate(self.optimizer.param_groups):
            target = g["initial_lr"] * factor
            if ni < warmup_iters:
                start = 0.1 if j == 2 and self.optimizer_name == "SGD" else 0.0
                g["lr"] = float(np.interp(ni, [0, warmup_iters], [start, target]))
                if "momentum" in g:
                    g["momentum"] = float(np.interp(ni, [0, warmup_iters], [0.8, cfg.momentum]))
            else:
                g["lr"] = target

    def fit(self) -> dict:
        cfg = self.cfg
        metrics: dict = {}
        for epoch in range(self.start_epoch, cfg.epochs):
            if epoch >= cfg.epochs - cfg.close_mosaic:
                self.data.mosaic_p = 0.0
            self.data.set_epoch(epoch)
            t0 = time.time()
            mean_loss = self._train_epoch(epoch)
            metrics = {"epoch": epoch, "box": mean_loss[0], "obj": mean_loss[1], "cls": mean_loss[2]}
            metrics["train_s"] = round(time.time() - t0, 1)
            last_epoch = epoch == cfg.epochs - 1
            stopped = bool(cfg.max_iters and self.iterations >= cfg.max_iters)
            if cfg.val_every and ((epoch + 1) % cfg.val_every == 0 or last_epoch or stopped):
                result = self.validate()
                metrics.update(map50=result["map50"], map50_95=result["map50_95"])
                fitness = 0.1 * result["map50"] + 0.9 * result["map50_95"]
                if fitness > self.best_fitness:
                    self.best_fitness = fitness
                    self._save_best(metrics)
            self._save_last(epoch)
            self._log_row(metrics)
            log.info("epoch %d: %s", epoch, metrics)
            if stopped:
                break
        return metrics

    def _train_epoch(self, epoch: int) -> list[float]:
        from edgeq.utils.progress import progress_bar

        self.model.train()
        totals = torch.zeros(3)
        bar = progress_bar(total=self.nb, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", unit="batch",
                           enabled=self.progress)
        self.optimizer.zero_grad()
        with bar:
            return self._train_batches(epoch, bar, totals)

    def _train_batches(self, epoch: int, bar, totals) -> list[float]:
        n = 0
        for i, (imgs, targets) in enumerate(self.loader):
            ni = i + self.nb * epoch
            self._set_lr(ni, epoch, i)
            maps = self.model(imgs)
            loss, parts = self.loss_fn(maps, targets)
            if not torch.isfinite(loss):
                raise EdgeqError(f"training diverged at epoch {epoch}, batch {i} (loss {loss.item()})")
            loss.backward()
            if (ni + 1) % self.accumulate == 0 or i == self.nb - 1:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=10.0)
                self.optimizer.step()
                self.optimizer.zero_grad()
                self.ema.update(self.model)
            totals += parts
            n += 1
            self.iterations += 1
            mean = totals / n
            bar.set_postfix(box=f"{mean[0]:.4f}", obj=f"{mean[1]:.4f}", cls=f"{mean[2]:.4f}", lr=f"{self.optimizer.param_groups[1]['lr']:.2e}")
            bar.update(1)
            if self.cfg.max_iters and self.iterations >= self.cfg.max_iters:
                break
        return [round(float(v), 5) for v in totals / max(n, 1)]

    def validate(self) -> dict:
        from edgeq.runtime.evaluate import evaluate

        model = self.ema.ema.eval()
        val = self.val_set
        if self.cfg.val_images and self.cfg.val_images < len(val):
            val = _Subset(val, self.cfg.val_images)

        @torch.no_grad()
        def predict(x: np.ndarray) -> np.ndarray:
            return model(torch.from_numpy(x)).numpy()

        return evaluate(predict, val, self.cfg.imgsz, self.names, batch_size=16, progress=self.progress)

    def _save_last(self, epoch: int) -> None:
        state = {
            "config": asdict(self.cfg),
            "epoch": epoch,
            "model": self.model.state_dict(),
            "ema": self.ema.ema.state_dict(),
            "ema_updates": self.ema.updates,
            "optimizer": self.optimizer.state_dict(),
            "best_fitness": self.best_fitness,
            "iterations": self.iterations,
        }
        from edgeq.utils.files import atomic_path

        with atomic_path(self.last_path) as tmp:
            torch.save(state, tmp)

    def _save_best(self, metrics: dict) -> None:
        from edgeq.models.checkpoint import save_checkpoint

        extra = {"train": asdict(self.cfg), "metrics": dict(metrics), "optimizer": self.optimizer_name}
        save_checkpoint(self.ema.ema, self.best_path, names=self.names, imgsz=self.cfg.imgsz, extra=extra)

    def _log_row(self, metrics: dict) -> None:
        path = self.out / "results.csv"
        new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["epoch", "box", "obj", "cls", "map50", "map50_95", "train_s"])
            if new:
                writer.writeheader()
            writer.writerow({k: metrics.get(k, "") for k in writer.fieldnames})


class _Subset:
    def __init__(self, dataset, n: int):
        self.dataset, self.n = dataset, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if i >= self.n:
            raise IndexError(i)
        return self.dataset[i]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
