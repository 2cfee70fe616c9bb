"""Geometric augmentation for every task family, on ``torchvision.transforms.v2``.

The same transform applies to an image and to the ``tv_tensors`` in its target (boxes, instance
masks, semantic masks), so a shifted digit keeps its box and mask. Horizontal flips are off by
default: mirrored handwriting is not the same digit.
"""

from __future__ import annotations

from torchvision import tv_tensors
from torchvision.transforms import v2


def scene_train_transforms(
    max_rotation: float = 10.0,
    translate: float = 0.1,
    scale: tuple[float, float] = (0.85, 1.15),
    hflip: float = 0.0,
    mask_fill: int = 0,
) -> v2.Compose:
    """Random affine (+ optional flip) for scenes; boxes that leave the canvas are dropped with
    their labels and masks by ``SanitizeBoundingBoxes``. Pixels the affine brings in from outside
    the canvas are black in the image and ``mask_fill`` in masks (255: a semantic mask's ignore
    index; instance masks keep 0)."""
    fill = {tv_tensors.Image: 0, tv_tensors.Mask: mask_fill}
    ops = [v2.RandomAffine(degrees=max_rotation, translate=(translate, translate), scale=scale, fill=fill)]
    if hflip:
        ops.append(v2.RandomHorizontalFlip(hflip))
    ops.append(v2.ClampBoundingBoxes())
    ops.append(v2.SanitizeBoundingBoxes(min_size=2.0))
    return v2.Compose(ops)


def crop_train_transforms(size: int, scale: tuple[float, float] = (0.7, 1.0), max_rotation: float = 10.0) -> v2.Compose:
    """Random resized crop and small rotation for single-object crops (two-view methods)."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=scale, ratio=(0.85, 1.15), antialias=True),
            v2.RandomRotation(max_rotation),
            v2.ColorJitter(0.4, 0.4, 0.4, 0.1),
        ]
    )
