"""Loaders for every task family read the canonical format; geometric ops move boxes and masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from components.augment.geometric import crop_train_transforms, scene_train_transforms
from components.data import digits
from components.data.canonical import read_manifest, rle_to_mask
from components.data.card import contact_sheet
from components.data.loaders import (
    ImageLabelDataset,
    MPerClassBatchSampler,
    SceneDataset,
    TwoViews,
    detection_collate,
)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from components.config import from_dict

    cfg = from_dict(
        digits.DigitsConfig,
        {"max_per_class": 6, "crop_size": 16, "scenes": {"canvases": {"train": 12, "val": 4, "test": 4}}},
        source="test",
    )
    out = tmp_path_factory.mktemp("scenes") / "digits"
    digits.generate(out, cfg)
    return out


def _mask_box(mask: torch.Tensor) -> torch.Tensor:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def test_scene_targets_agree(scenes):
    ds = SceneDataset(scenes, "train", masks=True, semantic=True)
    image, target = ds[0]
    assert image.shape == (3, 64, 64) and float(image.max()) <= 1.0
    n = len(target["labels"])
    assert n >= 1 and target["boxes"].shape == (n, 4) and target["masks"].shape == (n, 64, 64)
    for box, mask, label in zip(target["boxes"], target["masks"], target["labels"], strict=True):
        torch.testing.assert_close(_mask_box(mask), box)  # tight boxes of the visible ink
        assert (target["semantic"][mask.bool()] == label + 1).all()
    assert set(target["semantic"].unique().tolist()) <= {0, *(target["labels"] + 1).tolist()}


def test_flip_moves_boxes_and_masks_with_the_image(scenes):
    ds = SceneDataset(scenes, "train", masks=True, semantic=True)
    image, target = ds[1]
    flipped_image, flipped = v2.RandomHorizontalFlip(p=1.0)(image, target)
    torch.testing.assert_close(flipped_image, image.flip(-1))
    torch.testing.assert_close(flipped["masks"], target["masks"].flip(-1))
    torch.testing.assert_close(flipped["semantic"], target["semantic"].flip(-1))
    for box, mask in zip(flipped["boxes"], flipped["masks"], strict=True):
        torch.testing.assert_close(_mask_box(mask), box)


def test_random_affine_keeps_masks_inside_their_boxes(scenes):
    torch.manual_seed(0)
    ds = SceneDataset(scenes, "train", masks=True, transforms=scene_train_transforms(max_rotation=15, translate=0.2))
    checked = 0
    for i in range(len(ds)):
        _, target = ds[i]
        assert len(target["labels"]) == len(target["boxes"]) == len(target["masks"])
        for box, mask in zip(target["boxes"], target["masks"], strict=True):
            if mask.sum() == 0:
                continue
            mb = _mask_box(mask)
            assert (mb[:2] >= box[:2] - 1.5).all() and (mb[2:] <= box[2:] + 1.5).all()
            checked += 1
    assert checked > 5


def test_detection_collate_keeps_variable_object_counts(scenes):
    loader = torch.utils.data.DataLoader(SceneDataset(scenes, "val"), batch_size=4, collate_fn=detection_collate)
    images, targets = next(iter(loader))
    assert len(images) == len(targets) == 4
    assert all(t["boxes"].shape[1] == 4 and len(t["labels"]) == len(t["boxes"]) for t in targets)


def test_scene_rle_is_the_instance_mask(scenes):
    from components.data.canonical import read_split

    coco = read_split(scenes, "scenes", "train")
    ann = coco["annotations"][0]
    mask = rle_to_mask(ann["segmentation"])
    assert mask.sum() == ann["area"] and mask.shape == (64, 64)


def test_two_views_are_different_augmentations_of_one_image(scenes):
    torch.manual_seed(0)
    ds = TwoViews(ImageLabelDataset(scenes, "crops", "train"), crop_train_transforms(16))
    a, b, label, index = ds[3]
    assert a.shape == b.shape == (3, 16, 16) and index == 3 and label == ds.base.labels[3]
    assert not torch.equal(a, b)


def test_m_per_class_batches(scenes):
    labels = ImageLabelDataset(scenes, "crops", "train").labels
    sampler = MPerClassBatchSampler(labels, m=4, classes_per_batch=3, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) >= 1
    for batch in batches:
        counts = np.bincount([labels[i] for i in batch], minlength=10)
        assert sorted(c for c in counts if c) == [4, 4, 4]
    # two workers get disjoint batch lists of the same length
    w0 = list(MPerClassBatchSampler(labels, 4, 3, seed=1, rank=0, world=2))
    w1 = list(MPerClassBatchSampler(labels, 4, 3, seed=1, rank=1, world=2))
    assert len(w0) == len(w1) and w0 != w1
    with pytest.raises(ValueError, match="classes_per_batch=11"):
        MPerClassBatchSampler(labels, 2, 11)


def test_retrieval_protocol_and_card(scenes, tmp_path):
    manifest = read_manifest(scenes)
    protocol = manifest["protocols"]["retrieval"]
    assert set(protocol["train_classes"]).isdisjoint(protocol["eval_classes"])
    assert sorted(protocol["train_classes"] + protocol["eval_classes"]) == list(range(10))
    card = contact_sheet(scenes, tmp_path / "card.png")
    assert card.stat().st_size > 10_000
