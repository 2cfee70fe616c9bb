"""The embedded default data: real handwritten digits rendered into a seeded dataset.

The 1,797 8x8 digit images that ship inside scikit-learn (``load_digits``, the UCI optical
recognition of handwritten digits set) are the source. Each source image belongs to exactly one
split (stratified by class), so no handwriting sample is seen in both training and testing.
A digit is upscaled and jittered (scale, rotation, shift), inked in a random colour onto a
noisy, shaded background with faint clutter strokes, and written in the canonical format.

Views written here: ``crops`` (one digit per image, image-level label) and ``scenes`` (canvases
with several digits: boxes, instance masks as COCO RLE, semantic masks as PNG). Scenes draw their
digits from the same split's source images, so splits stay disjoint in handwriting samples too.
The manifest also fixes the open-set retrieval protocol: which classes train, which are held out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from components.config import to_dict
from components.data.canonical import SPLITS, DatasetWriter, mask_to_rle

CLASSES = [str(d) for d in range(10)]


@dataclass
class SplitCounts:
    train: int = 2
    val: int = 1
    test: int = 1

    def validate(self) -> None:
        for split in SPLITS:
            if getattr(self, split) < 1:
                raise ValueError(f"{split} must be >= 1")


@dataclass
class SplitFractions:
    train: float = 0.7
    val: float = 0.15
    test: float = 0.15

    def validate(self) -> None:
        total = self.train + self.val + self.test
        if min(self.train, self.val, self.test) <= 0 or abs(total - 1.0) > 1e-6:
            raise ValueError(f"fractions must be positive and sum to 1, got {total:g}")


@dataclass
class ScenesConfig:
    """Canvases with several digits: boxes, instance masks and semantic masks."""

    canvases: SplitCounts = field(default_factory=lambda: SplitCounts(train=600, val=120, test=120))
    canvas_size: int = 64
    digits_per_canvas: list[int] = field(default_factory=lambda: [1, 4])
    digit_size_range: list[int] = field(default_factory=lambda: [16, 30])
    max_overlap_iou: float = 0.1  # placements overlapping an earlier digit's box more are retried

    def validate(self) -> None:
        lo, hi = self.digits_per_canvas
        if not 1 <= lo <= hi:
            raise ValueError("digits_per_canvas must be [low, high] with 1 <= low <= high")
        s_lo, s_hi = self.digit_size_range
        if not 6 <= s_lo <= s_hi <= self.canvas_size:
            raise ValueError("digit_size_range must satisfy 6 <= low <= high <= canvas_size")


@dataclass
class DigitsConfig:
    """``datasets.digits`` in params.yaml."""

    format: Literal["generated"] = "generated"
    source: str = "sklearn.datasets.load_digits"
    seed: int = 0
    crop_size: int = 32
    crops_per_digit: SplitCounts = field(default_factory=SplitCounts)
    split_fractions: SplitFractions = field(default_factory=SplitFractions)
    max_per_class: int | None = None  # cap source digits per class (small test datasets)
    scale_range: list[float] = field(default_factory=lambda: [0.7, 0.95])
    max_rotation_deg: float = 12.0
    max_shift: float = 0.08  # fraction of the crop size
    noise_std: float = 6.0  # background noise, in 0-255 grey levels
    clutter_strokes: int = 2
    scenes: ScenesConfig = field(default_factory=ScenesConfig)
    # Retrieval protocol (open set): these classes are held out of metric-learning training and
    # only used as queries/gallery at evaluation.
    retrieval_holdout_classes: list[int] = field(default_factory=lambda: [5, 6, 7, 8, 9])

    def validate(self) -> None:
        if self.source != "sklearn.datasets.load_digits":
            raise ValueError(f"source: digits are generated from sklearn.datasets.load_digits, got {self.source!r}")
        if self.crop_size < 8:
            raise ValueError("crop_size must be >= 8")
        lo, hi = self.scale_range
        if not 0 < lo <= hi <= 1:
            raise ValueError("scale_range must satisfy 0 < low <= high <= 1")
        held = set(self.retrieval_holdout_classes)
        if not held < set(range(10)) or not held:
            raise ValueError("retrieval_holdout_classes must be a non-empty proper subset of 0..9")


def load_source_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 8x8 digit images (float in [0, 1]) and labels shipped with scikit-learn."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (bunch.images / 16.0).astype(np.float32), bunch.target.astype(np.int64)


def split_sources(labels: np.ndarray, cfg: DigitsConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Stratified assignment of source indices to splits (each index in exactly one split)."""
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    fr = cfg.split_fractions
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        idx = rng.permutation(idx)
        if cfg.max_per_class is not None:
            idx = idx[: cfg.max_per_class]
        n_val = max(1, round(len(idx) * fr.val))
        n_test = max(1, round(len(idx) * fr.test))
        out["val"].extend(idx[:n_val])
        out["test"].extend(idx[n_val : n_val + n_test])
        out["train"].extend(idx[n_val + n_test :])
    return {s: np.sort(np.asarray(v, dtype=np.int64)) for s, v in out.items()}


def digit_ink(digit: np.ndarray, side: int, cfg: DigitsConfig, rng: np.random.Generator) -> np.ndarray:
    """Ink opacity (float in [0, 1]) of an 8x8 digit upscaled to ``side`` and rotated."""
    ink = Image.fromarray((digit * 255).astype(np.uint8)).resize((side, side), Image.BICUBIC)
    ink = ink.rotate(rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg), Image.BILINEAR, expand=True)
    # Bicubic upscaling leaves faint ink around the 8x8 cell's border; cut it so no square shows.
    return np.clip((np.asarray(ink, dtype=np.float32) / 255.0 - 0.25) / 0.6, 0.0, 1.0)


def render_digit(
    digit: np.ndarray, size: int, cfg: DigitsConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Render one 8x8 digit as an RGB ``size``x``size`` image; also return its ink mask (bool)."""
    scale = rng.uniform(*cfg.scale_range)
    ink_arr = digit_ink(digit, max(4, int(round(size * scale))), cfg, rng)
    alpha = np.zeros((size, size), dtype=np.float32)
    h, w = ink_arr.shape
    shift = cfg.max_shift * size
    top = int(round((size - h) / 2 + rng.uniform(-shift, shift)))
    left = int(round((size - w) / 2 + rng.uniform(-shift, shift)))
    _paste(alpha, ink_arr, top, left)

    background = _background(size, cfg, rng)
    ink_colour = _contrasting_colour(background.mean(axis=(0, 1)), rng)
    a = alpha[..., None]
    image = background * (1 - a) + ink_colour * a
    return np.clip(image, 0, 255).astype(np.uint8), alpha > 0.5


def render_scene(
    sources: list[np.ndarray], labels: list[int], cfg: DigitsConfig, rng: np.random.Generator
) -> tuple[np.ndarray, list[dict[str, Any]], np.ndarray]:
    """A canvas with the given digits placed at random, little overlapping.

    Returns the RGB pixels, COCO annotations (box, RLE instance mask of the visible ink,
    category) and the semantic mask (0 background, digit + 1). Later digits occlude earlier ones.
    """
    sc = cfg.scenes
    size = sc.canvas_size
    canvas = _background(size, cfg, rng)
    bg_mean = canvas.mean(axis=(0, 1))
    instances: list[tuple[int, np.ndarray]] = []
    boxes: list[list[float]] = []
    for digit, label in zip(sources, labels, strict=True):
        for _ in range(20):
            ink = digit_ink(digit, int(rng.integers(sc.digit_size_range[0], sc.digit_size_range[1] + 1)), cfg, rng)
            h, w = ink.shape
            top, left = (
                int(rng.integers(-h // 8, size - h + h // 8 + 1)),
                int(rng.integers(-w // 8, size - w + w // 8 + 1)),
            )
            alpha = np.zeros((size, size), dtype=np.float32)
            _paste(alpha, ink, top, left)
            box = _mask_box(alpha > 0.5)
            if box is not None and all(_iou(box, b) <= sc.max_overlap_iou for b in boxes):
                break
        else:
            continue  # no free place left on this canvas: it holds fewer digits
        colour = _contrasting_colour(bg_mean, rng)
        canvas = canvas * (1 - alpha[..., None]) + colour * alpha[..., None]
        mask = alpha > 0.5
        instances = [(lab, m & ~mask) for lab, m in instances]
        instances.append((int(label), mask))
        boxes.append(box)

    semantic = np.zeros((size, size), dtype=np.uint8)
    annotations = []
    for label, mask in instances:
        box = _mask_box(mask)
        if box is None:  # fully hidden by later digits: not an object any more
            continue
        semantic[mask] = label + 1
        annotations.append(
            {
                "bbox": box,
                "category_id": label,
                "area": float(mask.sum()),
                "iscrowd": 0,
                "segmentation": mask_to_rle(mask),
            }
        )
    return np.clip(canvas, 0, 255).astype(np.uint8), annotations, semantic


def _mask_box(mask: np.ndarray) -> list[float] | None:
    """Tight COCO box ``[x, y, w, h]`` of a boolean mask (None when empty)."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def _iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _paste(dst: np.ndarray, src: np.ndarray, top: int, left: int) -> None:
    """Paste ``src`` into ``dst`` at (top, left) with clipping at the borders (max-blend)."""
    h, w = src.shape
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + h, dst.shape[0]), min(left + w, dst.shape[1])
    if y1 <= y0 or x1 <= x0:
        return
    region = src[y0 - top : y1 - top, x0 - left : x1 - left]
    dst[y0:y1, x0:x1] = np.maximum(dst[y0:y1, x0:x1], region)


def _background(size: int, cfg: DigitsConfig, rng: np.random.Generator) -> np.ndarray:
    base = rng.uniform(20, 235, size=3)
    ramp = np.linspace(-1, 1, size, dtype=np.float32)
    direction = rng.uniform(-1, 1, size=2)
    shade = (ramp[:, None] * direction[0] + ramp[None, :] * direction[1]) * rng.uniform(0, 25)
    bg = base[None, None, :] + shade[..., None] + rng.normal(0, cfg.noise_std, size=(size, size, 3))
    for _ in range(cfg.clutter_strokes):
        _stroke(bg, rng)
    return bg.astype(np.float32)


def _stroke(img: np.ndarray, rng: np.random.Generator) -> None:
    """A faint straight stroke: clutter that is not a digit."""
    size = img.shape[0]
    p0, p1 = rng.uniform(0, size, size=2), rng.uniform(0, size, size=2)
    n = int(np.hypot(*(p1 - p0))) + 1
    ys = np.clip(np.linspace(p0[0], p1[0], n).astype(int), 0, size - 1)
    xs = np.clip(np.linspace(p0[1], p1[1], n).astype(int), 0, size - 1)
    img[ys, xs] = img[ys, xs] * 0.6 + rng.uniform(0, 255, size=3) * 0.4


def _contrasting_colour(bg_mean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An ink colour whose brightness differs clearly from the background's."""
    bright = bg_mean.mean()
    target = rng.uniform(0, 60) if bright > 128 else rng.uniform(195, 255)
    tint = rng.uniform(-40, 40, size=3)
    return np.clip(target + tint, 0, 255).astype(np.float32)


def generate(out_dir: str | Path, cfg: DigitsConfig) -> dict[str, Any]:
    """Write the digits dataset to ``out_dir`` (atomically); return the manifest fields written."""
    images, labels = load_source_digits()
    rng = np.random.default_rng(cfg.seed)
    splits = split_sources(labels, cfg, rng)
    writer = DatasetWriter(out_dir, name="digits", categories=CLASSES)
    with writer:
        writer.add_view("crops", ["classification", "representation", "retrieval"])
        for split in SPLITS:
            per_digit = getattr(cfg.crops_per_digit, split)
            for src in splits[split]:
                for _ in range(per_digit):
                    pixels, _mask = render_digit(images[src], cfg.crop_size, cfg, rng)
                    writer.add_image("crops", split, pixels, label=int(labels[src]), extra={"source_index": int(src)})
        _write_scenes(writer, images, labels, splits, cfg)
        writer.set_manifest(
            source="generated:sklearn.datasets.load_digits",
            seed=cfg.seed,
            generator=to_dict(cfg),
            channels=3,
            image_size=[cfg.crop_size, cfg.crop_size],
            scene_size=[cfg.scenes.canvas_size, cfg.scenes.canvas_size],
            source_split_sizes={s: int(len(v)) for s, v in splits.items()},
            semantic_masks={"background": 0, "value": "category index + 1", "ignore_index": 255},
            protocols={
                "retrieval": {
                    "view": "crops",
                    "train_classes": sorted(set(range(10)) - set(cfg.retrieval_holdout_classes)),
                    "eval_classes": sorted(cfg.retrieval_holdout_classes),
                }
            },
        )
    return {"splits": {s: int(len(v)) for s, v in splits.items()}}


def _write_scenes(writer: DatasetWriter, images, labels, splits, cfg: DigitsConfig) -> None:
    """The ``scenes`` view; its own random stream, so the crops do not change with scene settings."""
    rng = np.random.default_rng([cfg.seed, 1])
    writer.add_view("scenes", ["detection", "instance_segmentation", "semantic_segmentation"])
    lo, hi = cfg.scenes.digits_per_canvas
    for split in SPLITS:
        pool = splits[split]
        for _ in range(getattr(cfg.scenes.canvases, split)):
            picks = rng.choice(pool, size=int(rng.integers(lo, hi + 1)))
            pixels, annotations, semantic = render_scene(
                [images[i] for i in picks], [int(labels[i]) for i in picks], cfg, rng
            )
            writer.add_image("scenes", split, pixels, annotations=annotations, semantic_mask=semantic)
