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
