"""YOLOv5's detection loss: anchor matching by shape ratio, CIoU boxes, BCE objectness/classes.

Targets are ``(M, 6)`` rows ``[image_index, class, cx, cy, w, h]`` with coordinates normalized
to the input image. Each target is assigned to every anchor whose width and height ratios are
within ``anchor_t`` and to its grid cell plus the two neighbouring cells nearest its centre,
as YOLOv5 does; the objectness target is the (detached) CIoU of the matched prediction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from edgeq.models.common import Detect


@dataclass
class LossWeights:
    """Loss gains at 640 px and 80 classes; :class:`DetectionLoss` rescales them."""

    box: float = 0.05
    obj: float = 1.0
    cls: float = 0.5
    anchor_t: float = 4.0
    label_smoothing: float = 0.0


def bbox_ciou(box1: torch.Tensor, box2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Complete IoU of matching rows of two (N, 4) cx, cy, w, h tensors."""
    (x1, y1, w1, h1), (x2, y2, w2, h2) = box1.unbind(-1), box2.unbind(-1)
    b1x1, b1x2, b1y1, b1y2 = x1 - w1 / 2, x1 + w1 / 2, y1 - h1 / 2, y1 + h1 / 2
    b2x1, b2x2, b2y1, b2y2 = x2 - w2 / 2, x2 + w2 / 2, y2 - h2 / 2, y2 + h2 / 2
    inter = (torch.min(b1x2, b2x2) - torch.max(b1x1, b2x1)).clamp(0) * (
        torch.min(b1y2, b2y2) - torch.max(b1y1, b2y1)
    ).clamp(0)
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    cw = torch.max(b1x2, b2x2) - torch.min(b1x1, b2x1)
    ch = torch.max(b1y2, b2y2) - torch.min(b1y1, b2y1)
    c2 = cw**2 + ch**2 + eps
    rho2 = (x2 - x1) ** 2 + (y2 - y1) ** 2
    v = (4 / math.pi**2) * (torch.atan(w2 / (h2 + eps)) - torch.atan(w1 / (h1 + eps))).pow(2)
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (rho2 / c2 + v * alpha)


class DetectionLoss:
    """Callable ``loss(maps, targets) -> (total * batch_size, parts[box, obj, cls])``."""

    balance_by_levels = {3: (4.0, 1.0, 0.4), 4: (4.0, 1.0, 0.25, 0.06), 5: (4.0, 1.0, 0.25, 0.06, 0.02)}

    def __init__(self, head: Detect, imgsz: int, weights: LossWeights | None = None):
        w = weights or LossWeights()
        self.head = head
        self.na, self.nc, self.nl = head.na, head.nc, head.nl
        scale = 3 / self.nl
        self.box_gain = w.box * scale
        self.cls_gain = w.cls * self.nc / 80 * scale
        self.obj_gain = w.obj * (imgsz / 640) ** 2 * scale
        self.anchor_t = w.anchor_t
        self.cp, self.cn = 1.0 - 0.5 * w.label_smoothing, 0.5 * w.label_smoothing
        self.balance = self.balance_by_levels.get(self.nl, (4.0, 1.0, 0.4) + (0.4,) * (self.nl - 3))
        self.bce = nn.BCEWithLogitsLoss()

    def __call__(self, maps: list[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = maps[0].device
        lbox = torch.zeros(1, device=device)
        lobj = torch.zeros(1, device=device)
        lcls = torch.zeros(1, device=device)
        for i, (p, (b, a, gj, gi, tbox, tcls, anch)) in enumerate(zip(maps, self.build_targets(maps, targets))):
            tobj = torch.zeros(p.shape[:4], dtype=p.dtype, device=device)
            if b.shape[0]:
                ps = p[b, a, gj, gi]
                pxy = ps[:, :2].sigmoid() * 2 - 0.5
                pwh = (ps[:, 2:4].sigmoid() * 2) ** 2 * anch
                iou = bbox_ciou(torch.cat((pxy, pwh), 1), tbox)
                lbox = lbox + (1.0 - iou).mean()
                tobj[b, a, gj, gi] = iou.detach().clamp(0).to(tobj.dtype)
                if self.nc > 1:
                    t = torch.full_like(ps[:, 5:], self.cn)
                    t[torch.arange(b.shape[0], device=device), tcls] = self.cp
                    lcls = lcls + self.bce(ps[:, 5:], t)
            lobj = lobj + self.bce(p[..., 4], tobj) * self.balance[i]
        lbox, lobj, lcls = lbox * self.box_gain, lobj * self.obj_gain, lcls * self.cls_gain
        bs = maps[0].shape[0]
        return (lbox + lobj + lcls) * bs, torch.cat((lbox, lobj, lcls)).detach()

    def build_targets(self, maps: list[torch.Tensor], targets: torch.Tensor):
        """Per level: image, anchor, grid y, grid x indices, box (offset xy, wh), class, anchor wh."""
        na, nt = self.na, targets.shape[0]
        device = targets.device
        gain = torch.ones(7, device=device)
        ai = torch.arange(na, device=device, dtype=torch.float32).view(na, 1).repeat(1, nt)
        t_all = torch.cat((targets.repeat(na, 1, 1), ai[..., None]), 2)  # (na, nt, 7)
        g = 0.5
        offsets = (
            torch.tensor([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], device=device, dtype=torch.float32) * g
        )
        out = []
        for i in range(self.nl):
            anchors = self.head.anchors[i]
            _, _, ny, nx, _ = maps[i].shape
            gain[2:6] = torch.tensor([nx, ny, nx, ny], device=device, dtype=torch.float32)
            t = t_all * gain
            if nt:
                r = t[..., 4:6] / anchors[:, None]
                keep = torch.max(r, 1 / r).max(2)[0] < self.anchor_t
                t = t[keep]
                gxy = t[:, 2:4]
                gxi = gain[[2, 3]] - gxy
                j, k = ((gxy % 1 < g) & (gxy > 1)).T
                l, m = ((gxi % 1 < g) & (gxi > 1)).T
                sel = torch.stack((torch.ones_like(j), j, k, l, m))
                t = t.repeat((5, 1, 1))[sel]
                off = (torch.zeros_like(gxy)[None] + offsets[:, None])[sel]
            else:
                t = t_all[0]
                off = torch.zeros(0, 2, device=device)
            bc, gxy, gwh, a = t.split((2, 2, 2, 1), 1)
            a, (b, c) = a.long().view(-1), bc.long().T
            gij = (gxy - off).long()
            gi = gij[:, 0].clamp_(0, nx - 1)
            gj = gij[:, 1].clamp_(0, ny - 1)
            tbox = torch.cat((gxy - torch.stack((gi, gj), 1), gwh), 1)
            out.append((b, a, gj, gi, tbox, c, anchors[a]))
        return out
