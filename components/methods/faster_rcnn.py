"""Faster R-CNN: the two-stage baseline, with a feature pyramid.

Ren, He, Girshick, Sun, "Faster R-CNN: Towards Real-Time Object Detection with Region Proposal
Networks", arXiv 1506.01497 (FPN variant: Lin et al., arXiv 1612.03144).

Stage one, the Region Proposal Network, slides a small head over every pyramid level and, per
anchor, scores objectness and regresses the anchor to a box (anchors IoU >= 0.7 positive, < 0.3
negative, 256 sampled per image, half positive at most); its top proposals after NMS go to
stage two, which pools each with RoIAlign, classifies it over the classes plus background
(softmax) and refines its box per class (smooth L1). Built on torchvision's ``FasterRCNN``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FasterRCNN as TVFasterRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign

from components.data.canonical import DatasetInfo
from components.methods.base import register_method
from components.methods.detection_base import Detector, DetectorConfig, check_levels


@dataclass
class FasterRCNNConfig(DetectorConfig):
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128])  # one size per pyramid level
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    rpn_pre_nms_top_n_train: int = 600
    rpn_post_nms_top_n_train: int = 300
    rpn_pre_nms_top_n_test: int = 300
    rpn_post_nms_top_n_test: int = 100
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = (
        64  # RoIs sampled per image for the second stage (paper: 128 per image with 2 images, 512 in FPN)
    )
    roi_output_size: int = 7
    roi_sampling_ratio: int = 2  # RoIAlign sample points per bin side
    representation_size: int = 256  # the two-layer box head's width (1024 with a full-size backbone)
    nms_thresh: float = 0.5

    def validate(self) -> None:
        super().validate()
        check_levels(self.anchor_sizes, self, "anchor_sizes")
        if self.rpn_post_nms_top_n_train > self.rpn_pre_nms_top_n_train:
            raise ValueError("rpn_post_nms_top_n_train must be <= rpn_pre_nms_top_n_train")
        if self.rpn_post_nms_top_n_test > self.rpn_pre_nms_top_n_test:
            raise ValueError("rpn_post_nms_top_n_test must be <= rpn_pre_nms_top_n_test")


@register_method
class FasterRCNN(Detector):
    name = "faster_rcnn"
    paper = "1506.01497"
    Config = FasterRCNNConfig
    label_offset = 1  # softmax over background (index 0) and the classes

    def build(self, info: DatasetInfo) -> nn.Module:
        backbone, kwargs = self.components(info)
        return TVFasterRCNN(backbone, **kwargs)

    def components(self, info: DatasetInfo) -> tuple[nn.Module, dict]:
        """The pyramid backbone and the keyword arguments of torchvision's two-stage detectors
        (Mask R-CNN adds its mask branch to the same)."""
        from components.models.fpn import build_fpn_backbone

        cfg = self.cfg
        backbone = build_fpn_backbone(cfg.backbone, info.in_channels)
        levels = len(cfg.backbone.strides())
        anchors = AnchorGenerator(
            sizes=tuple((s,) for s in cfg.anchor_sizes), aspect_ratios=(tuple(cfg.aspect_ratios),) * levels
        )
        # RoIs are pooled from the pyramid levels proper (not the extra coarse ones).
        pooler = MultiScaleRoIAlign(
            featmap_names=[str(k) for k in range(cfg.backbone.levels)],
            output_size=cfg.roi_output_size,
            sampling_ratio=cfg.roi_sampling_ratio,
        )
        channels = backbone.out_channels * cfg.roi_output_size**2
        return backbone, dict(
            num_classes=None,
            **cfg.input.torchvision_kwargs(),
            rpn_anchor_generator=anchors,
            rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
            rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
            rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
            rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
            rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
            box_roi_pool=pooler,
            box_head=TwoMLPHead(channels, cfg.representation_size),
            box_predictor=FastRCNNPredictor(cfg.representation_size, info.num_classes + 1),
            box_score_thresh=cfg.score_thresh,
            box_nms_thresh=cfg.nms_thresh,
            box_detections_per_img=cfg.detections_per_image,
            box_batch_size_per_image=cfg.box_batch_size_per_image,
        )
