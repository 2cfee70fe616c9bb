"""Object detection: boxes and classes on the ``scenes`` view, scored by COCO mAP.

Batches are ``(images, targets)`` lists (every image has its own number of objects); targets
hold ``boxes`` (XYXY pixels), ``labels`` (category indices) and ``image_id``. Predictions are
one dict per image with ``boxes`` (XYXY pixels of the input image), ``scores`` and ``labels``:
the torchvision convention, which every detection method returns.

Scores come from faster-coco-eval's ``COCOeval_faster`` (https://github.com/MiXaiLL76/faster_coco_eval):
the COCO evaluation protocol of pycocotools' ``COCOeval`` with the per-image matching and the
accumulation in C++, and the same summary statistics (tests/test_coco_eval.py checks them
against pycocotools on one set of predictions). ``mAP`` is AP averaged over IoU 0.50:0.95,
``mAP50``/``mAP75`` at one IoU, ``mAP_small``/``_medium``/``_large`` by object area (COCO's 32²
and 96² pixel thresholds; a size with no ground-truth object is left out rather than logged as
-1), ``mAR100`` the recall with 100 detections per image.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from components.data.loaders import SceneDataset, detection_collate
from components.tasks.base import Evaluator, TaskFamily, all_gather_objects, register_task

_STATS = (  # COCOeval.stats, in order
    *("mAP", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large"),
    *("mAR1", "mAR10", "mAR100", "mAR_small", "mAR_medium", "mAR_large"),
)
_REPORTED = ("mAP", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large", "mAR100")
_LOG = logging.getLogger(__name__)


def _xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    out = boxes.astype(np.float64).copy()
    out[:, 2:] -= out[:, :2]
    return out


def coco_box_metrics(images: list[dict[str, Any]], num_classes: int, iou_type: str = "bbox") -> dict[str, float]:
    """COCO metrics of ``images``: dicts with ``height``, ``width``, ground truth ``boxes``
    (XYXY) and ``labels``, and detections ``det_boxes``, ``det_scores``, ``det_labels``.

    ``iou_type="segm"`` scores masks instead of boxes: every image then also holds ``masks`` and
    ``det_masks``, one COCO RLE per object (``pycocotools.mask.encode``); areas come from them.
    """
    from faster_coco_eval import COCO, COCOeval_faster
    from faster_coco_eval import mask as mask_utils

    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    segm = iou_type == "segm"
    gt: dict[str, Any] = {
        "images": [],
        "annotations": [],
        "categories": [{"id": c + 1, "name": str(c)} for c in range(num_classes)],
    }
    detections: list[dict[str, Any]] = []
    for image_id, item in enumerate(images, start=1):
        gt["images"].append({"id": image_id, "height": int(item["height"]), "width": int(item["width"])})
        for k, (box, label) in enumerate(zip(_xyxy_to_xywh(item["boxes"]), item["labels"], strict=True)):
            ann = {
                "id": len(gt["annotations"]) + 1,  # ids from 1: the evaluator reads id 0 as "unmatched"
                "image_id": image_id,
                "category_id": int(label) + 1,
                "bbox": box.tolist(),
                "area": float(box[2] * box[3]),
                "iscrowd": 0,
            }
            if segm:
                ann["segmentation"] = item["masks"][k]
                ann["area"] = float(mask_utils.area(item["masks"][k]))
            gt["annotations"].append(ann)
        for k, (box, score, label) in enumerate(
            zip(_xyxy_to_xywh(item["det_boxes"]), item["det_scores"], item["det_labels"], strict=True)
        ):
            det = {"image_id": image_id, "category_id": int(label) + 1, "bbox": box.tolist(), "score": float(score)}
            if segm:  # loadRes derives the box and the area from the mask
                del det["bbox"]
                det["segmentation"] = item["det_masks"][k]
            detections.append(det)
    if not gt["annotations"]:
        raise ValueError("COCO evaluation needs at least one ground-truth box; the evaluated split has none")
    if not detections:  # nothing detected: AP and recall are 0, without running the evaluator
        return dict.fromkeys(("mAP", "mAP50", "mAP75", "mAR100"), 0.0)
    # Both classes take the function their progress lines go to: this module's logger at DEBUG
    # level, silent unless asked for (and, unlike stdout redirection, in every thread).
    coco_gt = COCO(gt, print_function=_LOG.debug)
    coco_dt = coco_gt.loadRes(detections)
    evaluation = COCOeval_faster(coco_gt, coco_dt, iouType=iou_type, print_function=_LOG.debug)
    evaluation.run()  # evaluate, accumulate, summarize
    stats = dict(zip(_STATS, (float(s) for s in evaluation.stats), strict=True))
    return {k: stats[k] for k in _REPORTED if stats[k] >= 0}  # -1: no object of that size


class DetectionEvaluator(Evaluator):
    """Collects ground truth and detections; ``compute`` gathers every worker's images and runs
    the COCO evaluation on all of them, so the score does not depend on how the split was sharded."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.images: list[dict[str, Any]] = []

    def update(self, predictions: list[dict[str, torch.Tensor]], batch) -> None:
        images, targets = batch
        for image, target, pred in zip(images, targets, predictions, strict=True):
            self.images.append(self.record(image, target, pred))

    def record(self, image: torch.Tensor, target: dict[str, Any], pred: dict[str, torch.Tensor]) -> dict[str, Any]:
        """What COCO evaluation keeps of one image (the input of :func:`coco_box_metrics`)."""
        return {
            "height": image.shape[-2],
            "width": image.shape[-1],
            "boxes": target["boxes"].detach().float().cpu().numpy().reshape(-1, 4),
            "labels": target["labels"].detach().cpu().numpy(),
            "det_boxes": pred["boxes"].detach().float().cpu().numpy().reshape(-1, 4),
            "det_scores": pred["scores"].detach().float().cpu().numpy(),
            "det_labels": pred["labels"].detach().cpu().numpy(),
        }

    def gathered(self) -> list[dict[str, Any]]:
        """Every worker's image records, in rank order."""
        return [image for part in all_gather_objects(self.images) for image in part]

    def compute(self) -> dict[str, float]:
        return coco_box_metrics(self.gathered(), self.num_classes)


class Detection(TaskFamily):
    name = "detection"
    primary_metric = "mAP"
    view = "scenes"

    def dataset(self, root: Path, split: str, train: bool) -> Dataset:
        from components.augment.geometric import scene_train_transforms

        return SceneDataset(root, split, view=self.view, transforms=scene_train_transforms() if train else None)

    def evaluator(self, num_classes: int) -> Evaluator:
        return DetectionEvaluator(num_classes)

    def collate(self):
        return detection_collate

    def sample_figure(self, sample, classes: tuple[str, ...], path: Path, count: int = 16) -> None:
        draw_detections(sample, classes, path, count)


def scene_grid(n: int):
    """A matplotlib figure of up to four panels a row for ``n`` images, and its ``n`` axes
    (axes beyond ``n`` are hidden)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, n) or 1
    rows = max(1, (n + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.4, rows * 2.4))
    axes = np.atleast_1d(axes).ravel()
    for ax in axes:
        ax.axis("off")
    return fig, list(axes[:n])


def draw_detections(sample, classes: tuple[str, ...], path: Path, count: int = 16, min_score: float = 0.3) -> None:
    """Images with ground truth (dashed white) and detections scoring at least ``min_score``
    (green: matches a same-class ground-truth box at IoU >= 0.5, red: does not)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    from torchvision.ops import box_iou

    (images, targets), predictions = sample
    fig, axes = scene_grid(min(count, len(images)))
    for i, ax in enumerate(axes):
        ax.imshow(np.clip(images[i].detach().float().cpu().permute(1, 2, 0).numpy(), 0, 1))
        gt_boxes, gt_labels = targets[i]["boxes"].detach().float().cpu(), targets[i]["labels"].cpu()
        for x0, y0, x1, y1 in gt_boxes.tolist():
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="white", ls="--", lw=0.8))
        pred = predictions[i]
        keep = pred["scores"].detach().cpu() >= min_score
        boxes = pred["boxes"].detach().float().cpu()[keep]
        labels, scores = pred["labels"].cpu()[keep], pred["scores"].detach().float().cpu()[keep]
        iou = box_iou(boxes, gt_boxes) if len(gt_boxes) and len(boxes) else torch.zeros(len(boxes), 0)
        for j, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
            hit = bool(((iou[j] >= 0.5) & (gt_labels == labels[j])).any()) if iou.shape[1] else False
            colour = "lime" if hit else "red"
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=colour, lw=1.2))
            ax.text(x0, y0, f"{classes[int(labels[j])]} {float(scores[j]):.2f}", color=colour, fontsize=6, va="bottom")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


DETECTION = register_task(Detection())
