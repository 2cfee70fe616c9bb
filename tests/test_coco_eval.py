"""COCO evaluation: ``coco_box_metrics`` (faster-coco-eval) gives pycocotools' ``COCOeval``
numbers on the same ground truth and detections, for boxes and for masks."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from bench.coco_eval_speed import pycocotools_stats
from components.tasks.detection import coco_box_metrics

# coco_box_metrics' keys and their places in COCOeval.stats
_INDEX = {"mAP": 0, "mAP50": 1, "mAP75": 2, "mAP_small": 3, "mAP_medium": 4, "mAP_large": 5, "mAR100": 8}


def _ellipse(box: np.ndarray, size: int) -> np.ndarray:
    """A filled ellipse inscribed in an XYXY box, as a size x size boolean mask."""
    x0, y0, x1, y1 = box
    y, x = np.ogrid[:size, :size]
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, max((x1 - x0) / 2, 1.0), max((y1 - y0) / 2, 1.0)
    return ((x + 0.5 - cx) / rx) ** 2 + ((y + 0.5 - cy) / ry) ** 2 <= 1.0


def _rles(boxes: np.ndarray, size: int) -> list[dict]:
    if len(boxes) == 0:
        return []
    masks = np.stack([_ellipse(b, size) for b in boxes], axis=-1)
    return mask_utils.encode(np.asfortranarray(masks.astype(np.uint8)))


def _scenes(
    seed: int, n_images: int = 6, size: int = 128, num_classes: int = 4, false_positives: int = 2
) -> list[dict]:
    """Images with 1-5 objects from 8 to 110 pixels a side (small, medium and large by COCO's
    areas) and detections that miss some objects, find some twice, take the wrong class for some,
    and add false positives; scores are distinct, so every ranking is unambiguous."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n_images):
        n = int(rng.integers(1, 6))
        wh = rng.uniform(8, 110, size=(n, 2))
        xy = rng.uniform(0, size - wh)
        boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
        labels = rng.integers(0, num_classes, size=n)
        det_boxes, det_labels = [], []
        for box, label in zip(boxes, labels, strict=True):
            if rng.random() < 0.2:  # missed
                continue
            copies = 2 if rng.random() < 0.3 else 1  # duplicates
            for _ in range(copies):
                jitter = rng.normal(0, 0.08, size=4) * np.tile(box[2:] - box[:2], 2)
                det_boxes.append(np.clip(box + jitter, 0, size))
                det_labels.append(int(rng.integers(0, num_classes)) if rng.random() < 0.1 else int(label))
        for _ in range(false_positives):
            w, h = rng.uniform(8, 60, size=2)
            x, y = rng.uniform(0, size - w), rng.uniform(0, size - h)
            det_boxes.append(np.array([x, y, x + w, y + h]))
            det_labels.append(int(rng.integers(0, num_classes)))
        det_boxes = np.array(det_boxes, dtype=np.float32).reshape(-1, 4)
        images.append(
            {
                "height": size,
                "width": size,
                "boxes": boxes,
                "labels": labels,
                "det_boxes": det_boxes,
                "det_scores": rng.permutation(len(det_boxes)).astype(np.float32) / len(det_boxes) + 0.01,
                "det_labels": np.array(det_labels, dtype=np.int64),
                "masks": _rles(boxes, size),
                "det_masks": _rles(det_boxes, size),
            }
        )
    return images


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
@pytest.mark.parametrize("seed", range(4))
def test_metrics_equal_pycocotools(seed, iou_type):
    images = _scenes(seed)
    ours = coco_box_metrics(images, num_classes=4, iou_type=iou_type)
    reference = pycocotools_stats(images, num_classes=4, iou_type=iou_type)
    expected = {k: float(reference[i]) for k, i in _INDEX.items() if reference[i] >= 0}
    assert set(ours) == set(expected)
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-9), key
    assert 0.05 < ours["mAP"] < 0.95  # neither trivial nor perfect: misses and duplicates count


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_at_most_100_detections_per_image_and_class_count_as_in_pycocotools(iou_type):
    # COCOeval caps the detections of each (image, class) pair: one class, about 135 an image
    images = _scenes(5, n_images=3, num_classes=1, false_positives=130)
    assert min(len(item["det_boxes"]) for item in images) > 100
    ours = coco_box_metrics(images, num_classes=1, iou_type=iou_type)
    reference = pycocotools_stats(images, num_classes=1, iou_type=iou_type)
    assert ours == pytest.approx({k: float(reference[i]) for k, i in _INDEX.items() if reference[i] >= 0}, abs=1e-9)


def test_sizes_without_ground_truth_are_left_out():
    images = _scenes(0, n_images=2)
    for item in images:  # only objects under 32 x 32 pixels
        item["boxes"] = np.tile(item["boxes"][:, :2], 2) + np.array([0, 0, 20, 20], dtype=np.float32)
    out = coco_box_metrics(images, num_classes=4)
    assert "mAP_small" in out and "mAP_medium" not in out and "mAP_large" not in out


def test_no_detections_score_zero():
    images = _scenes(1, n_images=2)
    for item in images:
        item.update(det_boxes=np.zeros((0, 4), np.float32), det_scores=np.zeros(0, np.float32))
        item.update(det_labels=np.zeros(0, np.int64), det_masks=[])
    for iou_type in ("bbox", "segm"):
        assert coco_box_metrics(images, 4, iou_type) == {"mAP": 0.0, "mAP50": 0.0, "mAP75": 0.0, "mAR100": 0.0}


def test_evaluation_prints_and_logs_nothing_above_debug(capfd, caplog):
    caplog.set_level(logging.INFO)
    coco_box_metrics(_scenes(2, n_images=2), num_classes=4, iou_type="segm")
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert [r for r in caplog.records if r.levelno >= logging.INFO] == []
