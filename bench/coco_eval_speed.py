"""COCO evaluation time: ``coco_box_metrics`` (faster-coco-eval) against pycocotools' ``COCOeval``
on the same ground truth and detections, for boxes and for masks.

    python -m bench.coco_eval_speed --images 120 --detections 100 --size 128 --repeats 5

The input is the shape of the default job's validation: canvases with 1-4 objects of 10 classes,
a fixed number of scored detections per image (the detectors' ``detections_per_image``), masks as
COCO RLEs at the image size. Only the evaluation is timed (the RLEs exist beforehand, as in
``InstanceEvaluator``); each figure is the min and median of ``--repeats`` runs
(``time.perf_counter``). Results go to bench/results/coco_eval_speed.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import time
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from components.tasks.detection import coco_box_metrics


def _ellipse_masks(boxes: np.ndarray, size: int) -> list[dict]:
    y, x = np.ogrid[:size, :size]
    masks = []
    for x0, y0, x1, y1 in boxes:
        rx, ry = max((x1 - x0) / 2, 1.0), max((y1 - y0) / 2, 1.0)
        masks.append(((x + 0.5 - (x0 + x1) / 2) / rx) ** 2 + ((y + 0.5 - (y0 + y1) / 2) / ry) ** 2 <= 1.0)
    return mask_utils.encode(np.asfortranarray(np.stack(masks, axis=-1).astype(np.uint8)))


def scenes(n_images: int, detections: int, size: int, num_classes: int, seed: int = 0) -> list[dict]:
    """Evaluator records (see ``DetectionEvaluator.record``): a jittered detection of most
    objects, the rest of the ``detections`` random boxes, all with distinct scores."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n_images):
        n = int(rng.integers(1, 5))
        wh = rng.uniform(size / 8, size / 2, size=(n, 2))
        xy = rng.uniform(0, size - wh)
        boxes = np.concatenate([xy, xy + wh], axis=1)
        labels = rng.integers(0, num_classes, size=n)
        hits = boxes + rng.normal(0, 0.05, size=boxes.shape) * np.tile(wh, 2)
        wh_fp = rng.uniform(4, size / 2, size=(detections - n, 2))
        xy_fp = rng.uniform(0, size - wh_fp)
        det_boxes = np.clip(np.concatenate([hits, np.concatenate([xy_fp, xy_fp + wh_fp], axis=1)]), 0, size)
        det_labels = np.concatenate([labels, rng.integers(0, num_classes, size=detections - n)])
        images.append(
            {
                "height": size,
                "width": size,
                "boxes": boxes.astype(np.float32),
                "labels": labels,
                "det_boxes": det_boxes.astype(np.float32),
                "det_scores": rng.permutation(detections).astype(np.float32) / detections + 0.001,
                "det_labels": det_labels,
                "masks": _ellipse_masks(boxes, size),
                "det_masks": _ellipse_masks(det_boxes, size),
            }
        )
    return images


def pycocotools_stats(images: list[dict], num_classes: int, iou_type: str) -> np.ndarray:
    """pycocotools' COCOeval.stats on the records, its output discarded."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = {"images": [], "annotations": [], "categories": [{"id": c + 1} for c in range(num_classes)]}
    results = []
    for image_id, item in enumerate(images, start=1):
        gt["images"].append({"id": image_id, "height": item["height"], "width": item["width"]})
        for k, ((x0, y0, x1, y1), label) in enumerate(zip(item["boxes"].tolist(), item["labels"], strict=True)):
            ann = {"id": len(gt["annotations"]) + 1, "image_id": image_id, "category_id": int(label) + 1}
            ann.update(bbox=[x0, y0, x1 - x0, y1 - y0], area=(x1 - x0) * (y1 - y0), iscrowd=0)
            if iou_type == "segm":
                ann.update(segmentation=item["masks"][k], area=float(mask_utils.area(item["masks"][k])))
            gt["annotations"].append(ann)
        for k, ((x0, y0, x1, y1), score, label) in enumerate(
            zip(item["det_boxes"].tolist(), item["det_scores"].tolist(), item["det_labels"], strict=True)
        ):
            res = {"image_id": image_id, "category_id": int(label) + 1, "score": score}
            if iou_type == "segm":
                res["segmentation"] = item["det_masks"][k]
            else:
                res["bbox"] = [x0, y0, x1 - x0, y1 - y0]
            results.append(res)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        evaluation = COCOeval(coco_gt, coco_gt.loadRes(results), iouType=iou_type)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return np.asarray(evaluation.stats)


def timed(fn, repeats: int) -> tuple[list[float], object]:
    seconds, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        seconds.append(time.perf_counter() - start)
    return seconds, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--detections", type=int, default=100, help="per image")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results/coco_eval_speed.json"))
    args = parser.parse_args()

    images = scenes(args.images, args.detections, args.size, args.classes)
    rows = []
    for iou_type in ("bbox", "segm"):
        ref_s, ref = timed(lambda t=iou_type: pycocotools_stats(images, args.classes, t), args.repeats)
        ours_s, ours = timed(lambda t=iou_type: coco_box_metrics(images, args.classes, t), args.repeats)
        row = {
            "iou_type": iou_type,
            "pycocotools_min_s": min(ref_s),
            "pycocotools_median_s": statistics.median(ref_s),
            "faster_coco_eval_min_s": min(ours_s),
            "faster_coco_eval_median_s": statistics.median(ours_s),
            "speedup_median": statistics.median(ref_s) / statistics.median(ours_s),
            "mAP": ours["mAP"],
            "mAP_abs_diff": abs(ours["mAP"] - float(ref[0])),
        }
        rows.append(row)
        print(
            f"{iou_type}: pycocotools min {row['pycocotools_min_s']:.3f}s median {row['pycocotools_median_s']:.3f}s"
            f" | faster-coco-eval min {row['faster_coco_eval_min_s']:.3f}s"
            f" median {row['faster_coco_eval_median_s']:.3f}s | x{row['speedup_median']:.1f}"
            f" | mAP {row['mAP']:.4f} (|diff| {row['mAP_abs_diff']:.1e})"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    setup = {k: getattr(args, k) for k in ("images", "detections", "size", "classes", "repeats")}
    args.out.write_text(json.dumps({"setup": setup, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
