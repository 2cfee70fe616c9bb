"""CondInst: instance segmentation with conditional convolutions, without RoI cropping.

Tian, Shen, Chen, "Conditional Convolutions for Instance Segmentation", arXiv 2003.05664.

CondInst is FCOS (see :mod:`components.methods.fcos`) plus two parts:
- A **controller**: one 3x3 convolution on the box tower, in parallel with the centerness
  branch. At every location it outputs the weights and biases of a tiny *dynamic* mask FCN for
  the instance that location detects. The paper's head is three 1x1 convolutions with 8 channels
  over 8 mask-feature channels and 2 relative coordinates: (10x8 + 8) + (8x8 + 8) + (8x1 + 1) =
  169 parameters per instance (:func:`dynamic_param_count`).
- A **mask branch**: shared by all instances, it fuses the pyramid's finest levels (P3-P5) at
  the finest stride (8) and maps them to ``mask_channels`` (8) channels with a few 3x3 convs.
For an instance detected at location (x, y), the mask branch's output is concatenated with
the coordinates of every mask-feature location relative to (x, y) (divided by the size range of
the instance's pyramid level); locations and mask-feature cells both sit at FCOS's
(s//2 + x*s, s//2 + y*s) (:func:`components.methods.fcos.cell_centres`), so the coordinates are 0
at the instance's own cell, and the instance's own dynamic FCN maps that to one mask logit
per location. The logits are upsampled to a quarter of the input resolution (the paper's mask
output stride, 4). No RoI is cropped or resized: each mask covers the whole image, and
instances differ only through their generated weights and their relative coordinates.

Training: FCOS's losses on all locations, plus the Dice loss ``1 - 2 sum(p g) / (sum p^2 +
sum g^2)`` between each positive location's mask (at most ``max_proposals`` sampled per batch,
paper 500) and the ground-truth mask of the instance the location is assigned to, downsampled to
the mask resolution. Inference: FCOS detections after NMS; each keeps its location's dynamic
weights, and its mask is computed, upsampled to the input size and returned as probabilities.

Written here on torchvision's FCOS (heads, box coding, focal/GIoU/centerness losses) and the
location assignment of :func:`components.methods.fcos.fcos_assign`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.fcos import FCOSHead
from torchvision.ops import boxes as box_ops

from components.data.canonical import DatasetInfo
from components.methods.base import register_method
from components.methods.detection_base import InstanceSegmenter
from components.methods.fcos import FCOS, AssignedFCOS, FCOSConfig, cell_centres, fcos_assign


@dataclass
class CondInstConfig(FCOSConfig):
    mask_branch_channels: int = 32  # paper: 128
    mask_branch_convs: int = 4
    mask_channels: int = 8  # C_mask: the mask branch's output, shared by all instances
    mask_branch_levels: int = 3  # pyramid levels fused by the mask branch (P3-P5)
    dynamic_channels: int = 8  # width of the dynamic mask FCN
    dynamic_layers: int = 3
    mask_out_stride: int = 4  # the masks' resolution relative to the input
    max_proposals: int = 500  # positive locations whose masks are trained per batch (paper 500)
    mask_weight: float = 1.0

    def validate(self) -> None:
        super().validate()
        finest = self.backbone.strides()[0]
        if self.mask_out_stride < 1 or finest % self.mask_out_stride:
            raise ValueError(f"mask_out_stride must divide the finest pyramid stride ({finest})")
        if not 1 <= self.mask_branch_levels <= self.backbone.levels:
            raise ValueError(f"mask_branch_levels must be between 1 and backbone.levels ({self.backbone.levels})")
        for name in ("mask_branch_channels", "mask_channels", "dynamic_channels", "dynamic_layers", "max_proposals"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.mask_branch_convs < 0 or self.mask_weight < 0:
            raise ValueError("mask_branch_convs and mask_weight must be >= 0")


def dynamic_layer_shapes(in_channels: int, channels: int, layers: int) -> list[tuple[int, int]]:
    """(out, in) of each 1x1 convolution of the dynamic mask FCN; the input has two extra
    channels (the relative coordinates) and the last layer one output (the mask logit)."""
    shapes, cin = [], in_channels + 2
    for i in range(layers):
        cout = 1 if i == layers - 1 else channels
        shapes.append((cout, cin))
        cin = cout
    return shapes


def dynamic_param_count(in_channels: int, channels: int, layers: int) -> int:
    """Weights and biases of one instance's dynamic mask FCN (169 for the paper's 8, 8, 3)."""
    return sum(o * i + o for o, i in dynamic_layer_shapes(in_channels, channels, layers))


def dynamic_mask_logits(
    params: torch.Tensor, features: torch.Tensor, rel_coords: torch.Tensor, shapes: list[tuple[int, int]]
) -> torch.Tensor:
    """Run each instance's own FCN on the shared features.

    ``params`` K x P (one row per instance, split into the layers' weights then biases in
    order), ``features`` K x C x H x W (each instance's image's mask features), ``rel_coords``
    K x 2 x H x W. Returns K x H x W mask logits.
    """
    k, _, h, w = features.shape
    x = torch.cat([rel_coords, features], dim=1).flatten(2)  # K x (2 + C) x HW
    offset = 0
    for i, (cout, cin) in enumerate(shapes):
        weight = params[:, offset : offset + cout * cin].view(k, cout, cin)
        offset += cout * cin
        bias = params[:, offset : offset + cout].view(k, cout, 1)
        offset += cout
        x = torch.baddbmm(bias, weight, x)
        if i < len(shapes) - 1:
            x = F.relu(x)
    if offset != params.shape[1]:
        raise ValueError(f"expected {offset} dynamic parameters per instance, got {params.shape[1]}")
    return x.view(k, h, w)


def dice_loss(probs: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-instance Dice loss ``1 - 2 sum(p g) / (sum p^2 + sum g^2)`` (V-Net's form, as in
    CondInst); ``probs`` and ``target`` K x H x W. Returns K losses."""
    p, g = probs.flatten(1), target.flatten(1)
    return 1 - 2 * (p * g).sum(1) / ((p * p).sum(1) + (g * g).sum(1) + eps)


class MaskBranch(nn.Module):
    """Fuse the finest pyramid levels at the finest stride, then convolutions to C_mask."""

    def __init__(self, in_channels: int, levels: int, channels: int, convs: int, out_channels: int) -> None:
        super().__init__()

        def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True))

        self.refine = nn.ModuleList(conv_bn_relu(in_channels, channels) for _ in range(levels))
        self.tower = nn.Sequential(*(conv_bn_relu(channels, channels) for _ in range(convs)))
        self.out = nn.Conv2d(channels, out_channels, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.refine[0](features[0])
        for refine, f in zip(self.refine[1:], features[1:], strict=False):
            x = x + F.interpolate(refine(f), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.out(self.tower(x))


class CondInstHead(FCOSHead):
    """FCOS's head with the controller beside the centerness branch on the box tower."""

    def __init__(self, in_channels: int, num_classes: int, num_convs: int, num_params: int) -> None:
        super().__init__(in_channels, 1, num_classes, num_convs=num_convs)
        self.controller = nn.Conv2d(in_channels, num_params, 3, padding=1)
        nn.init.normal_(self.controller.weight, std=0.01)
        nn.init.zeros_(self.controller.bias)

    @staticmethod
    def _flat(x: torch.Tensor) -> torch.Tensor:
        """N x K x H x W -> N x HW x K (the order of torchvision's anchors)."""
        return x.flatten(2).transpose(1, 2)

    def forward(self, x: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        reg, ctr, ctl = [], [], []
        head = self.regression_head
        for features in x:
            tower = head.conv(features)
            reg.append(self._flat(F.relu(head.bbox_reg(tower))))
            ctr.append(self._flat(head.bbox_ctrness(tower)))
            ctl.append(self._flat(self.controller(tower)))
        return {
            "cls_logits": self.classification_head(x),
            "bbox_regression": torch.cat(reg, dim=1),
            "bbox_ctrness": torch.cat(ctr, dim=1),
            "controller": torch.cat(ctl, dim=1),
        }


class CondInstNet(AssignedFCOS):
    """torchvision's FCOS (with our assignment) extended by the controller and the mask branch.

    Follows the torchvision detector convention; eval-mode detections carry ``masks``
    (N x H x W probabilities at the input image's size).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, cfg: CondInstConfig, **kwargs) -> None:
        super().__init__(backbone, num_classes, **kwargs)
        self.shapes = dynamic_layer_shapes(cfg.mask_channels, cfg.dynamic_channels, cfg.dynamic_layers)
        num_params = dynamic_param_count(cfg.mask_channels, cfg.dynamic_channels, cfg.dynamic_layers)
        self.head = CondInstHead(backbone.out_channels, num_classes, cfg.head_convs, num_params)
        self.mask_branch = MaskBranch(
            backbone.out_channels,
            cfg.mask_branch_levels,
            cfg.mask_branch_channels,
            cfg.mask_branch_convs,
            cfg.mask_channels,
        )
        self.mask_levels = cfg.mask_branch_levels
        self.mask_out_stride = cfg.mask_out_stride
        self.max_proposals = cfg.max_proposals
        self.mask_weight = cfg.mask_weight

    # -- dynamic masks ------------------------------------------------------------------------
    def instance_masks(
        self,
        mask_features: torch.Tensor,
        feature_stride: int,
        params: torch.Tensor,
        locations: torch.Tensor,
        scales: torch.Tensor,
    ) -> torch.Tensor:
        """Mask logits (K x H/out_stride x W/out_stride of the batched input) of K instances.

        ``mask_features`` K x C x h x w (each instance's image), ``params`` K x P,
        ``locations`` K x 2 (x, y input pixels of the detecting location, as
        :meth:`AssignedFCOS._locations` gives them), ``scales`` K (the
        relative coordinates' divisor: the size range of the location's pyramid level).
        """
        k, _, h, w = mask_features.shape
        factor = feature_stride // self.mask_out_stride
        if k == 0:
            return mask_features.new_zeros((0, h * factor, w * factor))
        # Mask-feature cells sit where FCOS's locations of the same stride do (AdelaiDet's
        # compute_locations at the mask stride), so an instance's coordinates are 0 at its own
        # cell when it is detected at the mask features' stride.
        grid = cell_centres(h, w, feature_stride, feature_stride, mask_features.device).to(locations.dtype)
        grid_x, grid_y = grid[:, 0].view(h, w), grid[:, 1].view(h, w)
        rel_x = (locations[:, 0, None, None] - grid_x) / scales[:, None, None]
        rel_y = (locations[:, 1, None, None] - grid_y) / scales[:, None, None]
        rel = torch.stack([rel_x, rel_y], dim=1).to(mask_features.dtype)
        logits = dynamic_mask_logits(params, mask_features, rel, self.shapes)
        if factor > 1:
            logits = F.interpolate(logits[:, None], scale_factor=factor, mode="bilinear", align_corners=False)[:, 0]
        return logits

    @staticmethod
    def _scale(strides: torch.Tensor) -> torch.Tensor:
        """The relative coordinates' divisor at a level: 8 strides, the top of FCOS's size range
        there (64 px on P3, as the paper's sizes of interest)."""
        return strides * 8

    # -- forward ------------------------------------------------------------------------------
    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None):
        if self.training and targets is None:
            raise ValueError("targets are required in training mode")
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        images, targets = self.transform(images, targets)
        features = self.backbone(images.tensors)
        if isinstance(features, torch.Tensor):
            features = OrderedDict([("0", features)])
        features = list(features.values())
        head_outputs = self.head(features)
        anchors = self.anchor_generator(images, features)
        num_per_level = [f.size(2) * f.size(3) for f in features]
        mask_features = self.mask_branch(features[: self.mask_levels])
        feature_stride = images.tensors.shape[-1] // mask_features.shape[-1]
        if self.training:
            return self._losses(targets, head_outputs, anchors, num_per_level, mask_features, feature_stride, images)
        return self._detect(head_outputs, anchors, num_per_level, mask_features, feature_stride, images, original_sizes)

    def _losses(self, targets, head_outputs, anchors, num_per_level, mask_features, feature_stride, images):
        device = anchors[0].device
        level_of = torch.repeat_interleave(
            torch.arange(len(num_per_level), device=device), torch.as_tensor(num_per_level, device=device)
        )
        matched = []
        for anchors_per_image, target in zip(anchors, targets, strict=True):
            points, strides = self._locations(anchors_per_image)
            matched.append(fcos_assign(points, strides, level_of, target["boxes"], self.center_sampling_radius))
        losses = self.head.compute_loss(targets, head_outputs, anchors, matched)

        # Masks of the positive locations (sampled down to max_proposals).
        matched_all = torch.stack(matched)  # images x locations
        image_idx, loc_idx = matched_all.ge(0).nonzero(as_tuple=True)
        if len(image_idx) > self.max_proposals:
            keep = torch.randperm(len(image_idx), device=device)[: self.max_proposals]
            image_idx, loc_idx = image_idx[keep], loc_idx[keep]
        if len(image_idx) == 0:
            losses["mask"] = head_outputs["controller"].sum() * 0.0 + mask_features.sum() * 0.0
            return losses
        gt_idx = matched_all[image_idx, loc_idx]
        centres, strides = self._locations(torch.stack(anchors)[image_idx, loc_idx])
        params = head_outputs["controller"][image_idx, loc_idx]
        logits = self.instance_masks(mask_features[image_idx], feature_stride, params, centres, self._scale(strides))
        # Ground truth at the padded batch size, averaged down to the mask resolution.
        h, w = images.tensors.shape[-2:]
        gt = torch.zeros((len(image_idx), h, w), device=device)
        for i in image_idx.unique().tolist():
            sel = (image_idx == i).nonzero().flatten()
            m = targets[i]["masks"][gt_idx[sel]].float()
            gt[sel, : m.shape[-2], : m.shape[-1]] = m
        gt = F.avg_pool2d(gt[:, None], self.mask_out_stride)[:, 0]
        losses["mask"] = self.mask_weight * dice_loss(logits.float().sigmoid(), gt).mean()
        return losses

    def _detect(self, head_outputs, anchors, num_per_level, mask_features, feature_stride, images, original_sizes):
        detections = []
        for i, (anchors_i, image_size) in enumerate(zip(anchors, images.image_sizes, strict=True)):
            scores = torch.sqrt(head_outputs["cls_logits"][i].sigmoid() * head_outputs["bbox_ctrness"][i].sigmoid())
            num_classes = scores.shape[1]
            boxes, kept_scores, labels, locs = [], [], [], []
            start = 0
            for n in num_per_level:  # per level: threshold, then the top candidates
                level = scores[start : start + n].flatten()
                idx = torch.where(level > self.score_thresh)[0]
                top = det_utils._topk_min(idx, self.topk_candidates, 0)
                level_scores, order = level[idx].topk(top)
                idx = idx[order]
                loc = start + torch.div(idx, num_classes, rounding_mode="floor")
                decoded = self.head.box_coder.decode(head_outputs["bbox_regression"][i][loc], anchors_i[loc])
                boxes.append(box_ops.clip_boxes_to_image(decoded, image_size))
                kept_scores.append(level_scores)
                labels.append(idx % num_classes)
                locs.append(loc)
                start += n
            boxes_t, scores_t, labels_t, locs_t = (torch.cat(v) for v in (boxes, kept_scores, labels, locs))
            keep = box_ops.batched_nms(boxes_t, scores_t, labels_t, self.nms_thresh)[: self.detections_per_img]
            boxes_t, scores_t, labels_t, locs_t = boxes_t[keep], scores_t[keep], labels_t[keep], locs_t[keep]
            centres, strides = self._locations(anchors_i[locs_t])
            logits = self.instance_masks(
                mask_features[i : i + 1].expand(len(keep), -1, -1, -1),
                feature_stride,
                head_outputs["controller"][i][locs_t],
                centres,
                self._scale(strides),
            )
            detections.append({"boxes": boxes_t, "scores": scores_t, "labels": labels_t, "mask_logits": logits})

        out = self.transform.postprocess(
            [{k: d[k] for k in ("boxes", "scores", "labels")} for d in detections], images.image_sizes, original_sizes
        )
        for det, o, (h, w), size in zip(detections, out, images.image_sizes, original_sizes, strict=True):
            logits = det["mask_logits"]
            if len(logits):
                full = F.interpolate(logits[:, None], scale_factor=self.mask_out_stride, mode="bilinear")[:, :, :h, :w]
                o["masks"] = F.interpolate(full, size=size, mode="bilinear", align_corners=False)[:, 0].sigmoid()
            else:
                o["masks"] = logits.new_zeros((0, *size))
        return out


@register_method
class CondInst(InstanceSegmenter, FCOS):
    name = "condinst"
    paper = "2003.05664"
    Config = CondInstConfig

    def build(self, info: DatasetInfo) -> nn.Module:
        backbone, kwargs = self.components(info)
        return CondInstNet(backbone, info.num_classes, self.cfg, **kwargs)
