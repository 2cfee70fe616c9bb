"""Datasets that read the canonical format (and nothing else)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from components.data.canonical import DatasetError, read_split


class ImageLabelDataset(Dataset):
    """Images of one view and split with their image-level class index.

    Items are ``(image, label)``: ``image`` a float tensor CxHxW in [0, 1] after ``transform``.
    Images are decoded once and kept in memory (the embedded crops are small); pass
    ``cache=False`` for large datasets.
    """

    def __init__(
        self,
        root: str | Path,
        view: str,
        split: str,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        cache: bool = True,
    ) -> None:
        self.root = Path(root)
        self.view = view
        coco = read_split(root, view, split)
        cat_ids = [c["id"] for c in coco["categories"]]
        index_of = {cid: i for i, cid in enumerate(cat_ids)}
        json_path = self.root / view / f"{split}.json"
        self.files: list[Path] = []
        self.labels: list[int] = []
        for record in coco["images"]:
            if "label" not in record:
                raise DatasetError(f"{json_path}: image {record.get('id')} has no image-level 'label'")
            if record["label"] not in index_of:
                raise DatasetError(f"{json_path}: image {record['id']} has unknown category {record['label']}")
            self.files.append(self.root / view / record["file_name"])
            self.labels.append(index_of[record["label"]])
        self.transform = transform
        self._cache: list[torch.Tensor] | None = [self._load(p) for p in self.files] if cache else None

    def __len__(self) -> int:
        return len(self.files)

    @staticmethod
    def _load(path: Path) -> torch.Tensor:
        try:
            with Image.open(path) as im:
                arr = np.array(im.convert("RGB"), dtype=np.uint8)
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{path}: unreadable image ({exc})") from None
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        raw = self._cache[i] if self._cache is not None else self._load(self.files[i])
        image = raw.float().div_(255.0)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[i]

    def class_counts(self, num_classes: int) -> list[int]:
        return np.bincount(np.asarray(self.labels), minlength=num_classes).tolist()


def describe(ds: Any) -> str:
    return f"{type(ds).__name__}({getattr(ds, 'root', '?')}, n={len(ds)})"


class SceneDataset(Dataset):
    """Canvases of a ``scenes`` view with their objects, for detection and segmentation.

    Items are ``(image, target)``: ``image`` a ``tv_tensors.Image`` (float, [0, 1]); ``target``
    holds ``boxes`` (``tv_tensors.BoundingBoxes``, XYXY pixels), ``labels`` (category indices),
    ``image_id``, and with ``masks=True`` the instance masks (``tv_tensors.Mask``, N x H x W),
    with ``semantic=True`` the semantic mask (``tv_tensors.Mask``, H x W, long; 255 ignored).
    ``transforms`` (``torchvision.transforms.v2``) move boxes and masks with the image.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        view: str = "scenes",
        masks: bool = False,
        semantic: bool = False,
        transforms: Callable | None = None,
    ) -> None:
        self.root = Path(root) / view
        coco = read_split(root, view, split)
        json_path = self.root / f"{split}.json"
        index_of = {c["id"]: i for i, c in enumerate(coco["categories"])}
        self.records = coco["images"]
        by_image: dict[int, list[dict[str, Any]]] = {r["id"]: [] for r in self.records}
        for ann in coco["annotations"]:
            if ann["image_id"] not in by_image:
                raise DatasetError(f"{json_path}: annotation {ann['id']} refers to missing image {ann['image_id']}")
            if ann["category_id"] not in index_of:
                raise DatasetError(f"{json_path}: annotation {ann['id']} has unknown category {ann['category_id']}")
            by_image[ann["image_id"]].append(ann)
        self.annotations = by_image
        self.index_of = index_of
        self.masks, self.semantic, self.transforms = masks, semantic, transforms
        if semantic and any("semantic_mask" not in r for r in self.records):
            raise DatasetError(f"{json_path}: semantic masks requested but some images have none")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        from torchvision import tv_tensors

        from components.data.canonical import rle_to_mask

        record = self.records[i]
        h, w = record["height"], record["width"]
        image = tv_tensors.Image(ImageLabelDataset._load(self.root / record["file_name"]).float().div_(255.0))
        anns = [a for a in self.annotations[record["id"]] if not a.get("iscrowd", 0)]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        xyxy = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(xyxy, format="XYXY", canvas_size=(h, w)),
            "labels": torch.tensor([self.index_of[a["category_id"]] for a in anns], dtype=torch.int64),
            "image_id": record["id"],
        }
        if self.masks:
            stack = [torch.from_numpy(rle_to_mask(a["segmentation"])) for a in anns]
            target["masks"] = tv_tensors.Mask(
                torch.stack(stack) if stack else torch.zeros((0, h, w), dtype=torch.uint8)
            )
        if self.semantic:
            with Image.open(self.root / record["semantic_mask"]) as im:
                target["semantic"] = tv_tensors.Mask(torch.from_numpy(np.array(im, dtype=np.int64)))
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def detection_collate(batch: list[tuple[Any, dict[str, Any]]]) -> tuple[list[Any], list[dict[str, Any]]]:
    """Images and targets as lists: every image has its own number of objects."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


class TwoViews(Dataset):
    """Two independently augmented views of each image, for self-supervised methods.

    Items are ``(view_1, view_2, label, index)``; the index identifies the instance (NPID's
    memory bank slot), the label is kept for evaluation only.
    """

    def __init__(self, base: ImageLabelDataset, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        image, label = self.base[i]
        return self.transform(image), self.transform(image), label, i


class MPerClassBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of ``classes_per_batch`` classes with ``m`` samples each (metric learning).

    Each batch draws its classes, and ``m`` samples of each, afresh from a generator seeded by
    ``(seed, epoch)`` (an epoch may show an image twice and skip another); a class with fewer
    than ``m`` samples is sampled with replacement. ``rank``/``world`` give each worker its own
    batches, so the global batch is the union of per-worker ``m``-per-class batches.
    """

    def __init__(
        self, labels: list[int], m: int, classes_per_batch: int, seed: int = 0, rank: int = 0, world: int = 1
    ) -> None:
        self.by_class: dict[int, np.ndarray] = {}
        for idx, label in enumerate(labels):
            self.by_class.setdefault(int(label), []).append(idx)
        self.by_class = {c: np.asarray(v) for c, v in self.by_class.items()}
        if classes_per_batch > len(self.by_class):
            raise ValueError(f"classes_per_batch={classes_per_batch} but the data has {len(self.by_class)} classes")
        self.m, self.k, self.seed, self.rank, self.world = m, classes_per_batch, seed, rank, world
        self.epoch = 0
        self.num_batches = max(1, len(labels) // (m * classes_per_batch) // world)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        classes = np.asarray(sorted(self.by_class))
        batches = []
        for _ in range(self.num_batches * self.world):
            picked = rng.choice(classes, size=self.k, replace=False)
            batch = []
            for c in picked:
                pool = self.by_class[int(c)]
                batch.extend(rng.choice(pool, size=self.m, replace=len(pool) < self.m).tolist())
            batches.append(batch)
        yield from batches[self.rank :: self.world]
