"""Segmentation on the ``scenes`` view: semantic (a class per pixel) and instance (a mask per object).

**Semantic segmentation.** Batches are ``(images, masks)``: images B x C x H x W in [0, 1], masks
B x H x W class indices with 0 the background, ``c + 1`` the dataset's category ``c`` and 255
ignored (padding, pixels an augmentation brought in from outside the canvas). Predictions are
B x H x W class indices in the same numbering. Scores come from one confusion matrix summed over
workers: ``mIoU`` (mean intersection-over-union over the classes that occur in the ground truth
or the predictions, background included as in PASCAL VOC), ``IoU/<class>`` per class, and
``pixel_acc``; ignored pixels count nowhere.

**Instance segmentation.** Batches are the detection ``(images, targets)`` lists with
``targets[i]["masks"]`` (N x H x W, uint8). Predictions follow the torchvision Mask R-CNN
convention: per image ``boxes``, ``scores``, ``labels`` and ``masks`` (N x H x W probabilities
or booleans at the input image's size; a mask is the pixels >= 0.5). Scores come from
faster-coco-eval's ``COCOeval_faster``: ``mask_mAP`` (and ``mask_mAP50`` ...) on the masks, the primary
metric, and ``mAP`` (...) on the boxes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from components.data.loaders import SceneDataset
from components.tasks.base import Evaluator, TaskFamily, all_reduce_sum, register_task
from components.tasks.detection import Detection, DetectionEvaluator, coco_box_metrics, scene_grid

IGNORE_INDEX = 255


def semantic_class_names(classes: tuple[str, ...]) -> tuple[str, ...]:
    """Names of the semantic classes: the background, then the dataset's categories."""
    return ("background", *classes)


def semantic_collate(batch: list[tuple[Any, dict[str, Any]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack images and semantic masks; images of different sizes are padded at the bottom and
    right (black pixels, ignored labels)."""
    images = [image.as_subclass(torch.Tensor) for image, _ in batch]
    masks = [target["semantic"].as_subclass(torch.Tensor) for _, target in batch]
    h = max(im.shape[-2] for im in images)
    w = max(im.shape[-1] for im in images)
    out_images = images[0].new_zeros((len(images), images[0].shape[0], h, w))
    out_masks = torch.full((len(masks), h, w), IGNORE_INDEX, dtype=torch.int64)
    for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
        out_images[i, :, : image.shape[-2], : image.shape[-1]] = image
        out_masks[i, : mask.shape[-2], : mask.shape[-1]] = mask
    return out_images, out_masks


class SemanticEvaluator(Evaluator):
    """Confusion matrix over the background and the ``num_classes`` categories."""

    def __init__(self, num_classes: int, class_names: tuple[str, ...] | None = None) -> None:
        self.k = num_classes + 1
        self.names = class_names or semantic_class_names(tuple(str(c) for c in range(num_classes)))
        if len(self.names) != self.k:
            raise ValueError(f"need {self.k} class names (background first), got {len(self.names)}")
        self.confusion = torch.zeros((self.k, self.k), dtype=torch.float64)  # rows: truth, columns: prediction

    def update(self, predictions: torch.Tensor, batch) -> None:
        truth = batch[1].detach().cpu().reshape(-1)
        predicted = predictions.detach().cpu().reshape(-1).long()
        if predicted.shape != truth.shape:
            raise ValueError(f"predictions {tuple(predictions.shape)} do not match the masks {tuple(batch[1].shape)}")
        valid = truth != IGNORE_INDEX
        truth, predicted = truth[valid], predicted[valid]
        if len(truth) and (int(truth.max()) >= self.k or int(predicted.max()) >= self.k or int(predicted.min()) < 0):
            raise ValueError(f"class index out of range [0, {self.k}) in the masks or predictions")
        self.confusion += torch.bincount(truth * self.k + predicted, minlength=self.k * self.k).view(self.k, self.k)

    def compute(self) -> dict[str, float]:
        confusion = all_reduce_sum(self.confusion)
        hits = confusion.diag()
        union = confusion.sum(0) + confusion.sum(1) - hits
        total = confusion.sum()
        if total == 0:
            raise ValueError("semantic evaluation needs at least one labelled pixel; every pixel was ignored")
        present = union > 0
        iou = torch.where(present, hits / union.clamp(min=1), torch.zeros_like(hits))
        out = {"mIoU": float(iou[present].mean()), "pixel_acc": float(hits.sum() / total)}
        out.update({f"IoU/{name}": float(iou[c]) for c, name in enumerate(self.names) if present[c]})
        return out


class SemanticSegmentation(TaskFamily):
    name = "semantic_segmentation"
    primary_metric = "mIoU"
    view = "scenes"
    augment_mask_fill = IGNORE_INDEX  # pixels a policy's affine brings in are not scored

    def dataset(self, root: Path, split: str, train: bool) -> Dataset:
        from components.augment.geometric import scene_train_transforms

        transforms = scene_train_transforms(mask_fill=IGNORE_INDEX) if train else None
        return SceneDataset(root, split, view=self.view, semantic=True, transforms=transforms)

    def evaluator(self, num_classes: int) -> Evaluator:
        return SemanticEvaluator(num_classes)

    def collate(self):
        return semantic_collate

    def sample_figure(self, sample, classes: tuple[str, ...], path: Path, count: int = 8) -> None:
        draw_semantic(sample, semantic_class_names(classes), path, count)


def _palette(k: int) -> np.ndarray:
    """``k`` distinct RGB colours in [0, 1]; index 0 (background) is dark grey."""
    import matplotlib

    colours = matplotlib.colormaps["tab20"](np.linspace(0, 1, 20))[:, :3]
    out = np.concatenate([[[0.15, 0.15, 0.15]], colours[np.arange(max(k - 1, 0)) % 20]])
    return out[:k]


def draw_semantic(sample, names: tuple[str, ...], path: Path, count: int = 8) -> None:
    """One row per image: the image, the ground truth and the prediction (ignored pixels white)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    (images, masks), predicted = sample
    n = max(1, min(count, len(images)))
    palette = np.concatenate([_palette(len(names)), [[1.0, 1.0, 1.0]]])  # last: ignored

    def colour(label_map: torch.Tensor) -> np.ndarray:
        idx = label_map.detach().cpu().long().numpy()
        return palette[np.where(idx == IGNORE_INDEX, len(names), np.clip(idx, 0, len(names) - 1))]

    fig, axes = plt.subplots(n, 3, figsize=(6.6, 2.2 * n), squeeze=False)
    for i in range(n):
        panels = (
            np.clip(images[i].detach().float().cpu().permute(1, 2, 0).numpy(), 0, 1),
            colour(masks[i]),
            colour(predicted[i]),
        )
        for ax, panel, title in zip(axes[i], panels, ("image", "truth", "prediction"), strict=True):
            ax.imshow(panel, interpolation="nearest")
            ax.axis("off")
            if i == 0:
                ax.set_title(title, fontsize=8)
    handles = [Patch(color=palette[c], label=name) for c, name in enumerate(names)]
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(names)), fontsize=6, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _rle(masks: np.ndarray) -> list[dict[str, Any]]:
    """COCO RLEs of N x H x W boolean masks."""
    from pycocotools import mask as mask_utils

    if len(masks) == 0:
        return []
    return mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))


class InstanceEvaluator(DetectionEvaluator):
    """The detection evaluator with masks: COCO mask AP (primary) and box AP."""

    def record(self, image: torch.Tensor, target: dict[str, Any], pred: dict[str, torch.Tensor]) -> dict[str, Any]:
        h, w = image.shape[-2:]
        det_masks = pred["masks"].detach().float().cpu()
        if det_masks.ndim == 4:  # N x 1 x H x W (torchvision's Mask R-CNN)
            det_masks = det_masks[:, 0]
        if det_masks.shape[-2:] != (h, w) or len(det_masks) != len(pred["boxes"]):
            raise ValueError(
                f"predicted masks {tuple(pred['masks'].shape)} must be one H x W mask per detection "
                f"({len(pred['boxes'])}) at the image size {(h, w)}"
            )
        return {
            **super().record(image, target, pred),
            "masks": _rle(target["masks"].detach().cpu().numpy() > 0),
            "det_masks": _rle(det_masks.numpy() >= 0.5),
        }

    def compute(self) -> dict[str, float]:
        gathered = self.gathered()
        out = {f"mask_{k}": v for k, v in coco_box_metrics(gathered, self.num_classes, iou_type="segm").items()}
        out.update(coco_box_metrics(gathered, self.num_classes, iou_type="bbox"))
        return out


class InstanceSegmentation(Detection):
    """Detection's batches with instance masks in the targets and the predictions."""

    name = "instance_segmentation"
    primary_metric = "mask_mAP"

    def dataset(self, root: Path, split: str, train: bool) -> Dataset:
        from components.augment.geometric import scene_train_transforms

        transforms = scene_train_transforms() if train else None
        return SceneDataset(root, split, view=self.view, masks=True, transforms=transforms)

    def evaluator(self, num_classes: int) -> Evaluator:
        return InstanceEvaluator(num_classes)

    def sample_figure(self, sample, classes: tuple[str, ...], path: Path, count: int = 16) -> None:
        draw_instances(sample, classes, path, count)


def draw_instances(sample, classes: tuple[str, ...], path: Path, count: int = 16, min_score: float = 0.3) -> None:
    """Images with their predicted masks (one colour per detection scoring at least
    ``min_score``, labelled with class and score) and the ground-truth boxes (dashed white)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    (images, targets), predictions = sample
    palette = _palette(21)[1:]
    fig, axes = scene_grid(min(count, len(images)))
    for i, ax in enumerate(axes):
        canvas = np.clip(images[i].detach().float().cpu().permute(1, 2, 0).numpy(), 0, 1).copy()
        pred = predictions[i]
        keep = (pred["scores"].detach().float().cpu() >= min_score).nonzero().flatten().tolist()
        masks = pred["masks"].detach().float().cpu()
        masks = masks[:, 0] if masks.ndim == 4 else masks
        for j, d in enumerate(keep):
            m = masks[d].numpy() >= 0.5
            canvas[m] = 0.45 * canvas[m] + 0.55 * palette[j % len(palette)]
        ax.imshow(canvas)
        for x0, y0, x1, y1 in targets[i]["boxes"].detach().float().cpu().tolist():
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="white", ls="--", lw=0.8))
        for j, d in enumerate(keep):
            x0, y0, x1, y1 = pred["boxes"][d].detach().float().cpu().tolist()
            c = palette[j % len(palette)]
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=c, lw=1.0))
            label = f"{classes[int(pred['labels'][d])]} {float(pred['scores'][d]):.2f}"
            ax.text(x0, y0, label, color=c, fontsize=6, va="bottom")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


SEMANTIC_SEGMENTATION = register_task(SemanticSegmentation())
INSTANCE_SEGMENTATION = register_task(InstanceSegmentation())
