"""What every importer shares: its config fields, source materialisation, crops, splits."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from components.data.canonical import DatasetError

SPLIT_NAMES = ("train", "val", "test")


@dataclass
class HoldoutFractions:
    """Fractions of the source's training data carved out for splits the source lacks."""

    val: float = 0.1
    test: float = 0.1

    def validate(self) -> None:
        if not (0 < self.val < 1 and 0 < self.test < 1 and self.val + self.test < 1):
            raise ValueError("val and test must be in (0, 1) and sum to less than 1")


@dataclass
class ImporterConfig:
    """Keys every imported dataset's section has (``datasets.<name>`` in params.yaml)."""

    format: str
    source: str  # a local folder or s3://bucket/prefix
    validation: Literal["fail", "quarantine"] = "fail"
    seed: int = 0
    crop_size: int = 32  # the crops view: objects (or whole images) resized to this square
    holdout: HoldoutFractions = field(default_factory=HoldoutFractions)
    s3_endpoint_url: str | None = None


def materialize_source(cfg: ImporterConfig, cache_root: Path | None = None) -> Path:
    """A local folder holding the source: the path itself, or a download of the ``s3://`` prefix."""
    from components.storage.s3 import materialize

    cache = cache_root or Path(tempfile.gettempdir()) / "cvflow-sources"
    return materialize(cfg.source, cache, endpoint_url=cfg.s3_endpoint_url)


def local_root(cfg: ImporterConfig) -> Path:
    """The source as a local folder; a missing or unreachable source is a :class:`DatasetError`."""
    from components.storage.s3 import S3Error

    try:
        root = materialize_source(cfg)
    except (OSError, ValueError, S3Error) as exc:
        raise DatasetError(f"{cfg.source}: cannot read the source ({exc})") from None
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder (expected the extracted dataset)")
    return root


def assign_holdout(keys: list, cfg: ImporterConfig) -> dict[str, list]:
    """Seeded split of ``keys`` (from a source's training data) into train/val/test."""
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(keys))
    n_val = max(1, round(len(keys) * cfg.holdout.val))
    n_test = max(1, round(len(keys) * cfg.holdout.test))
    pick = [keys[i] for i in order]
    return {"val": pick[:n_val], "test": pick[n_val : n_val + n_test], "train": pick[n_val + n_test :]}


def crop_object(pixels: np.ndarray, bbox: list[float], size: int, context: float = 0.1) -> np.ndarray:
    """A square crop around a COCO box (with a little context), resized to ``size``."""
    x, y, w, h = bbox
    side = max(w, h) * (1 + 2 * context)
    cx, cy = x + w / 2, y + h / 2
    left, top = int(round(cx - side / 2)), int(round(cy - side / 2))
    side = max(1, int(round(side)))
    canvas = np.zeros((side, side, 3), dtype=np.uint8)
    H, W = pixels.shape[:2]
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + side, H), min(left + side, W)
    if y1 > y0 and x1 > x0:
        canvas[y0 - top : y1 - top, x0 - left : x1 - left] = pixels[y0:y1, x0:x1]
    return np.asarray(Image.fromarray(canvas).resize((size, size), Image.BILINEAR), dtype=np.uint8)


def resize_square(pixels: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize((size, size), Image.BILINEAR), dtype=np.uint8)
