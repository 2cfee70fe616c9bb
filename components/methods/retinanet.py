"""RetinaNet: a one-stage detector with anchors on a feature pyramid, trained with focal loss.

Lin, Goyal, Girshick, He, Dollár, "Focal Loss for Dense Object Detection", arXiv 1708.02002.

- Anchors: A = 3 scales (2^0, 2^(1/3), 2^(2/3)) x 3 aspect ratios per pyramid location; an anchor
  is foreground at IoU >= 0.5 with a ground-truth box, background below 0.4, ignored between.
- Classification: per-class sigmoid outputs (no background class), bias initialised to the
  prior pi = 0.01, trained with the focal loss ``FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t)``
  summed over all non-ignored anchors of an image and divided by its foreground count.
  ``focal_gamma: 0`` with ``focal_alpha: null`` is plain binary cross-entropy, the paper's
  baseline (``retinanet_ce`` in params.yaml uses alpha-balanced CE, its best CE variant).
- Box regression: smooth-L1/L1 on anchor deltas, or GIoU (Rezatofighi et al., arXiv 1902.09630)
  on the decoded boxes (``box_loss``).

Built on torchvision's ``RetinaNet`` and ``sigmoid_focal_loss``; the classification loss is
replaced so gamma and alpha are parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import RetinaNet as TVRetinaNet
from torchvision.models.detection.retinanet import RetinaNetClassificationHead, RetinaNetHead
from torchvision.ops import sigmoid_focal_loss

from components.data.canonical import DatasetInfo
from components.methods.base import register_method
from components.methods.detection_base import Detector, DetectorConfig, check_levels
from components.models.fpn import build_fpn_backbone


@dataclass
class RetinaNetConfig(DetectorConfig):
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128])  # base size per pyramid level
    anchor_scales: list[float] = field(default_factory=lambda: [1.0, 2 ** (1 / 3), 2 ** (2 / 3)])
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    focal_gamma: float = 2.0
    focal_alpha: float | None = 0.25  # null: no alpha balancing
    box_loss: Literal["l1", "smooth_l1", "giou"] = "l1"
    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.4
    nms_thresh: float = 0.5

    def validate(self) -> None:
        super().validate()
        check_levels(self.anchor_sizes, self, "anchor_sizes")
        if self.focal_gamma < 0:
            raise ValueError("focal_gamma must be >= 0")
        if self.focal_alpha is not None and not 0.0 <= self.focal_alpha <= 1.0:
            raise ValueError("focal_alpha must be in [0, 1] or null")
        if not 0.0 < self.bg_iou_thresh <= self.fg_iou_thresh < 1.0:
            raise ValueError("need 0 < bg_iou_thresh <= fg_iou_thresh < 1")


class FocalClassificationHead(RetinaNetClassificationHead):
    """torchvision's head with the focal loss's gamma and alpha as parameters."""

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, gamma: float, alpha: float | None):
        super().__init__(in_channels, num_anchors, num_classes)
        self.gamma, self.alpha = gamma, alpha

    def compute_loss(self, targets, head_outputs, matched_idxs) -> torch.Tensor:
        losses = []
        for target, logits, matched in zip(targets, head_outputs["cls_logits"], matched_idxs, strict=True):
            foreground = matched >= 0
            wanted = torch.zeros_like(logits)
            wanted[foreground, target["labels"][matched[foreground]]] = 1.0
            valid = matched != self.BETWEEN_THRESHOLDS  # anchors between the IoU thresholds are ignored
            loss = sigmoid_focal_loss(
                logits[valid],
                wanted[valid],
                alpha=-1.0 if self.alpha is None else self.alpha,  # torchvision: alpha < 0 switches it off
                gamma=self.gamma,
                reduction="sum",
            )
            losses.append(loss / foreground.sum().clamp(min=1))
        return torch.stack(losses).sum() / len(targets)


def build_retinanet(cfg: RetinaNetConfig, num_classes: int, in_channels: int) -> TVRetinaNet:
    backbone = build_fpn_backbone(cfg.backbone, in_channels)
    anchors = AnchorGenerator(
        sizes=tuple(tuple(s * k for k in cfg.anchor_scales) for s in cfg.anchor_sizes),
        aspect_ratios=(tuple(cfg.aspect_ratios),) * len(cfg.anchor_sizes),
    )
    num_anchors = anchors.num_anchors_per_location()[0]
    head = RetinaNetHead(backbone.out_channels, num_anchors, num_classes)
    head.classification_head = FocalClassificationHead(
        backbone.out_channels, num_anchors, num_classes, cfg.focal_gamma, cfg.focal_alpha
    )
    head.regression_head._loss_type = cfg.box_loss
    return TVRetinaNet(
        backbone,
        num_classes,
        **cfg.input.torchvision_kwargs(),
        anchor_generator=anchors,
        head=head,
        score_thresh=cfg.score_thresh,
        nms_thresh=cfg.nms_thresh,
        detections_per_img=cfg.detections_per_image,
        fg_iou_thresh=cfg.fg_iou_thresh,
        bg_iou_thresh=cfg.bg_iou_thresh,
    )


@register_method
class RetinaNet(Detector):
    name = "retinanet"
    paper = "1708.02002"
    Config = RetinaNetConfig

    def build(self, info: DatasetInfo) -> nn.Module:
        return build_retinanet(self.cfg, info.num_classes, info.in_channels)
