"""FCOS: anchor-free, per-pixel detection on a feature pyramid.

Tian, Shen, Chen, He, "FCOS: Fully Convolutional One-Stage Object Detection", arXiv 1904.01355.

Every location of every pyramid level is a training sample. A location is positive for a
ground-truth box when it falls inside the box (optionally only within ``center_sampling_radius``
strides of the box centre, the paper's later "center sampling" improvement; 0 turns it off) and
the largest of its four distances to the box sides lies in the level's range: (0, 8s] for the
finest level, (4s, 8s] in between and (4s, inf) for the coarsest, s being the level's stride
(the paper's m_i = 0, 64, 128, ... for P3-P7). A location inside several such boxes is assigned
to the one with the smallest area. Location (x, y) of a level sits at the image point
(s//2 + x*s, s//2 + y*s), near the centre of its receptive field (Sec. 3.1; :func:`cell_centres`),
and every distance (l, t, r, b) is measured from there. Heads: per-class focal-loss
classification, (l, t, r, b) distances trained with an IoU-type loss (torchvision's GIoU), and a
centerness branch (BCE against sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b))) that down-weights
far-off boxes at test time.

Built on torchvision's ``FCOS``; the assignment is :func:`fcos_assign`, written out here, and
the locations come from :class:`CellCentreAnchorGenerator` (torchvision's anchors are centred on
x*s, a cell's top-left corner).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOS as TVFCOS

from components.data.canonical import DatasetInfo
from components.methods.base import register_method
from components.methods.detection_base import Detector, DetectorConfig
from components.models.fpn import build_fpn_backbone


@dataclass
class FCOSConfig(DetectorConfig):
    center_sampling_radius: float = 1.5  # in strides; 0: any location inside the box is positive
    nms_thresh: float = 0.6
    head_convs: int = 4

    def validate(self) -> None:
        super().validate()
        if self.center_sampling_radius < 0:
            raise ValueError("center_sampling_radius must be >= 0")
        if self.head_convs < 1:
            raise ValueError("head_convs must be >= 1")
        if self.backbone.fpn_channels % 32:
            raise ValueError(
                f"backbone.fpn_channels must be a multiple of 32 (the FCOS head's GroupNorm has 32 groups), "
                f"got {self.backbone.fpn_channels}"
            )


def cell_centres(height: int, width: int, stride_y: int, stride_x: int, device=None) -> torch.Tensor:
    """Image points (H*W x 2, x then y, row-major) of the locations of an H x W feature map:
    (s//2 + x*s, s//2 + y*s), FCOS's Sec. 3.1 (AdelaiDet's ``compute_locations``)."""
    xs = torch.arange(width, device=device) * stride_x + stride_x // 2
    ys = torch.arange(height, device=device) * stride_y + stride_y // 2
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.flatten(), grid_y.flatten()], dim=1)


class CellCentreAnchorGenerator(AnchorGenerator):
    """torchvision's ``AnchorGenerator`` with every anchor moved by half a stride, so that the
    anchors of a level of stride s are centred on :func:`cell_centres` rather than on (x*s, y*s).
    torchvision's box coder measures FCOS's (l, t, r, b) from the anchor centres, so regression
    targets, centerness targets and decoded boxes all refer to the paper's locations."""

    def grid_anchors(self, grid_sizes: list[list[int]], strides: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        anchors = super().grid_anchors(grid_sizes, strides)
        shifted = []
        for anchors_per_level, (stride_y, stride_x) in zip(anchors, strides, strict=True):
            half = torch.stack([stride_x // 2, stride_y // 2, stride_x // 2, stride_y // 2])
            shifted.append(anchors_per_level + half.to(anchors_per_level))
        return shifted


def fcos_assign(
    points: torch.Tensor, strides: torch.Tensor, level_of: torch.Tensor, boxes: torch.Tensor, radius: float
) -> torch.Tensor:
    """Index of the ground-truth box each location regresses, -1 for background.

    ``points`` (P, 2) location centres in pixels, ``strides`` (P,) their level's stride,
    ``level_of`` (P,) their level index (0 finest), ``boxes`` (M, 4) XYXY.
    """
    if boxes.numel() == 0:
        return torch.full((points.shape[0],), -1, dtype=torch.long, device=points.device)
    x, y = points[:, 0:1], points[:, 1:2]
    ltrb = torch.stack([x - boxes[:, 0], y - boxes[:, 1], boxes[:, 2] - x, boxes[:, 3] - y], dim=2)  # (P, M, 4)
    inside = ltrb.min(dim=2).values > 0
    if radius > 0:
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        near = (points[:, None, :] - centres[None]).abs().max(dim=2).values < radius * strides[:, None]
        inside &= near
    reach = ltrb.max(dim=2).values
    last = int(level_of.max())
    lower = torch.where(level_of == 0, torch.zeros_like(strides), strides * 4)
    upper = torch.where(level_of == last, torch.full_like(strides, float("inf")), strides * 8)
    candidate = inside & (reach > lower[:, None]) & (reach <= upper[:, None])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    masked = torch.where(candidate, areas[None, :].expand_as(candidate), torch.full_like(ltrb[..., 0], float("inf")))
    smallest, index = masked.min(dim=1)
    index[torch.isinf(smallest)] = -1
    return index


class AssignedFCOS(TVFCOS):
    """torchvision's FCOS with the location-to-box assignment of :func:`fcos_assign`."""

    @staticmethod
    def _locations(anchors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image points (P x 2) and strides (P) of the locations whose anchors are given: one
        square of side = stride per location, centred on it (:class:`CellCentreAnchorGenerator`)."""
        return (anchors[:, :2] + anchors[:, 2:]) / 2, anchors[:, 2] - anchors[:, 0]

    def compute_loss(self, targets, head_outputs, anchors, num_anchors_per_level):
        device = anchors[0].device
        level_of = torch.repeat_interleave(
            torch.arange(len(num_anchors_per_level), device=device),
            torch.as_tensor(num_anchors_per_level, device=device),
        )
        matched = []
        for anchors_per_image, target in zip(anchors, targets, strict=True):
            points, strides = self._locations(anchors_per_image)
            matched.append(fcos_assign(points, strides, level_of, target["boxes"], self.center_sampling_radius))
        return self.head.compute_loss(targets, head_outputs, anchors, matched)


@register_method
class FCOS(Detector):
    name = "fcos"
    paper = "1904.01355"
    Config = FCOSConfig

    def build(self, info: DatasetInfo) -> nn.Module:
        cfg = self.cfg
        backbone, kwargs = self.components(info)
        model = AssignedFCOS(backbone, info.num_classes, **kwargs)
        if cfg.head_convs != 4:
            from torchvision.models.detection.fcos import FCOSHead

            model.head = FCOSHead(backbone.out_channels, 1, info.num_classes, num_convs=cfg.head_convs)
        return model

    def components(self, info: DatasetInfo) -> tuple[nn.Module, dict]:
        """The pyramid backbone and the keyword arguments of torchvision's ``FCOS`` (CondInst
        builds on the same): one anchor per pyramid position, a square of side = stride centred
        on the position's location (:func:`cell_centres`)."""
        cfg = self.cfg
        backbone = build_fpn_backbone(cfg.backbone, info.in_channels)
        strides = cfg.backbone.strides()
        anchors = CellCentreAnchorGenerator(sizes=tuple((s,) for s in strides), aspect_ratios=((1.0,),) * len(strides))
        return backbone, dict(
            **cfg.input.torchvision_kwargs(),
            anchor_generator=anchors,
            center_sampling_radius=cfg.center_sampling_radius,
            score_thresh=cfg.score_thresh,
            nms_thresh=cfg.nms_thresh,
            detections_per_img=cfg.detections_per_image,
        )
