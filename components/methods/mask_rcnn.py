"""Mask R-CNN: Faster R-CNN with a mask branch on RoIAlign features.

He, Gkioxari, Dollár, Girshick, "Mask R-CNN", arXiv 1703.06870.

Everything of :mod:`components.methods.faster_rcnn` (FPN, RPN, box head), plus:
- RoIAlign: bilinear sampling at exact (unquantised) bin positions, so masks align with pixels;
  14 x 14 RoIs for the mask branch, from the pyramid level chosen by the RoI's size.
- A small FCN mask head (four 3x3 convolutions, a 2x2 deconvolution, then a 1x1 convolution to
  one 28 x 28 mask per class), trained only on positive RoIs with a per-pixel sigmoid and binary
  cross-entropy on the mask of the RoI's ground-truth class: classes do not compete for pixels,
  which decouples mask and class prediction.
- At test time the mask of the predicted class is pasted into the image at its box.

Built on torchvision's ``MaskRCNN``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torchvision.models.detection.mask_rcnn import MaskRCNN as TVMaskRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign

from components.data.canonical import DatasetInfo
from components.methods.base import register_method
from components.methods.detection_base import InstanceSegmenter
from components.methods.faster_rcnn import FasterRCNN, FasterRCNNConfig


@dataclass
class MaskRCNNConfig(FasterRCNNConfig):
    mask_roi_output_size: int = 14
    mask_head_layers: list[int] = field(default_factory=lambda: [64, 64, 64, 64])  # paper: 4 x 256
    mask_predictor_width: int = 64  # the deconvolution's channels (paper: 256)

    def validate(self) -> None:
        super().validate()
        if not self.mask_head_layers or any(c < 1 for c in self.mask_head_layers):
            raise ValueError("mask_head_layers needs at least one positive width")
        if self.mask_roi_output_size < 2 or self.mask_predictor_width < 1:
            raise ValueError("mask_roi_output_size must be >= 2 and mask_predictor_width >= 1")


@register_method
class MaskRCNN(InstanceSegmenter, FasterRCNN):
    name = "mask_rcnn"
    paper = "1703.06870"
    Config = MaskRCNNConfig
    label_offset = 1  # softmax over background (index 0) and the classes

    def build(self, info: DatasetInfo) -> nn.Module:
        cfg = self.cfg
        backbone, kwargs = self.components(info)
        return TVMaskRCNN(
            backbone,
            **kwargs,
            mask_roi_pool=MultiScaleRoIAlign(
                featmap_names=[str(k) for k in range(cfg.backbone.levels)],
                output_size=cfg.mask_roi_output_size,
                sampling_ratio=cfg.roi_sampling_ratio,
            ),
            mask_head=MaskRCNNHeads(backbone.out_channels, cfg.mask_head_layers, dilation=1),
            mask_predictor=MaskRCNNPredictor(cfg.mask_head_layers[-1], cfg.mask_predictor_width, info.num_classes + 1),
        )

    def predict(self, model: nn.Module, batch) -> list[dict[str, torch.Tensor]]:
        return [{**d, "masks": d["masks"][:, 0]} for d in super().predict(model, batch)]
