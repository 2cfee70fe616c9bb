"""Segmentation: the evaluators against hand-computed scores, and the defining property of each
method (U-Net's resolution, Dice, SegFormer's hierarchy without positional embeddings,
CondInst's per-instance dynamic heads)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from components.data.canonical import read_info
from components.methods import create_method
from components.methods.condinst import (
    CondInstNet,
    dice_loss,
    dynamic_layer_shapes,
    dynamic_mask_logits,
    dynamic_param_count,
)
from components.methods.segformer import EfficientSelfAttention
from components.methods.segmentation_base import soft_dice_loss
from components.tasks.segmentation import IGNORE_INDEX, InstanceEvaluator, SemanticEvaluator, semantic_collate

# --- semantic evaluator ----------------------------------------------------------------------


def test_semantic_metrics_match_hand_computed_confusion():
    truth = torch.tensor([[[0, 0, 1, 1], [2, 2, IGNORE_INDEX, IGNORE_INDEX]]])
    predicted = torch.tensor([[[0, 1, 1, 1], [2, 0, 2, 1]]])  # the two ignored pixels are wrong on purpose
    ev = SemanticEvaluator(num_classes=3)  # background + 3 classes; class index 3 never occurs
    ev.update(predicted, (None, truth))
    m = ev.compute()
    # background: hit 1, union {0,0,2->0} = 3; class 1 (index 1): hit 2, union 3; class 2: hit 1, union 2
    assert m["IoU/background"] == pytest.approx(1 / 3)
    assert m["IoU/0"] == pytest.approx(2 / 3)
    assert m["IoU/1"] == pytest.approx(1 / 2)
    assert "IoU/2" not in m  # absent from truth and predictions: not averaged in
    assert m["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert m["pixel_acc"] == pytest.approx(4 / 6)


def test_semantic_evaluator_rejects_out_of_range_and_all_ignored():
    ev = SemanticEvaluator(num_classes=2)
    with pytest.raises(ValueError, match="out of range"):
        ev.update(torch.tensor([[5]]), (None, torch.tensor([[1]])))
    ev = SemanticEvaluator(num_classes=2)
    ev.update(torch.tensor([[1]]), (None, torch.tensor([[IGNORE_INDEX]])))
    with pytest.raises(ValueError, match="every pixel was ignored"):
        ev.compute()


def test_semantic_collate_pads_with_ignore():
    a = (tv_tensors.Image(torch.ones(3, 4, 5)), {"semantic": tv_tensors.Mask(torch.ones(4, 5, dtype=torch.int64))})
    b = (tv_tensors.Image(torch.ones(3, 6, 3)), {"semantic": tv_tensors.Mask(torch.full((6, 3), 2))})
    images, masks = semantic_collate([a, b])
    assert images.shape == (2, 3, 6, 5) and masks.shape == (2, 6, 5)
    assert (masks[0, 4:] == IGNORE_INDEX).all() and (masks[1, :, 3:] == IGNORE_INDEX).all()
    assert (images[0, :, 4:] == 0).all() and (masks[0, :4, :5] == 1).all()


# --- instance evaluator ----------------------------------------------------------------------


def _disc(cx: int, cy: int, r: int, size: int = 32) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return (((x - cx) ** 2 + (y - cy) ** 2) <= r * r).to(torch.uint8)


def _instance_case(pred_masks: torch.Tensor):
    masks = torch.stack([_disc(8, 8, 5), _disc(22, 20, 6)])
    boxes = torch.tensor([[3.0, 3.0, 14.0, 14.0], [16.0, 14.0, 29.0, 27.0]])
    target = {"boxes": boxes, "labels": torch.tensor([1, 4]), "masks": masks}
    pred = {"boxes": boxes.clone(), "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 4])}
    pred["masks"] = pred_masks
    ev = InstanceEvaluator(num_classes=5)
    ev.update([pred], ([torch.zeros(3, 32, 32)], [target]))
    return ev.compute(), masks


def test_instance_evaluator_scores_masks_and_boxes_separately():
    perfect, masks = _instance_case(torch.stack([_disc(8, 8, 5), _disc(22, 20, 6)]).float())
    assert perfect["mask_mAP"] == pytest.approx(1.0) and perfect["mAP"] == pytest.approx(1.0)
    # Same boxes, masks shifted off their objects: box AP stays perfect, mask AP collapses.
    shifted, _ = _instance_case(torch.stack([_disc(4, 12, 5), _disc(27, 26, 6)]).float())
    assert shifted["mAP"] == pytest.approx(1.0)
    assert shifted["mask_mAP"] < 0.2
    # Probabilities are thresholded at 0.5; Mask R-CNN's N x 1 x H x W layout is accepted.
    soft, _ = _instance_case((masks.float() * 0.6)[:, None])
    assert soft["mask_mAP"] == pytest.approx(1.0)


def test_instance_evaluator_rejects_masks_of_the_wrong_size():
    with pytest.raises(ValueError, match="one H x W mask per detection"):
        _instance_case(torch.zeros(2, 16, 16))


# --- losses ----------------------------------------------------------------------------------


def test_soft_dice_is_zero_for_a_perfect_prediction_and_matches_its_formula():
    target = torch.tensor([[[0, 0], [1, 1]]])
    perfect = torch.nn.functional.one_hot(target, 2).permute(0, 3, 1, 2).float()
    assert soft_dice_loss(perfect, target).item() == 0.0
    p0 = torch.tensor([[0.8, 0.6], [0.1, 0.3]])
    probs = torch.stack([p0, 1 - p0])[None]
    # class 0: 2*(0.8+0.6)+1 over (1.8 + 2 + 1); class 1: 2*(0.9+0.7)+1 over (2.2 + 2 + 1)
    expected = 1 - (3.8 / 4.8 + 4.2 / 5.2) / 2
    assert soft_dice_loss(probs, target).item() == pytest.approx(expected, abs=1e-6)
    # An ignored pixel changes nothing, whatever is predicted there.
    ignored = torch.tensor([[[0, 0, IGNORE_INDEX], [1, 1, IGNORE_INDEX]]])
    padded = torch.cat([probs, torch.tensor([0.5, 0.5]).view(1, 2, 1, 1).expand(1, 2, 2, 1)], dim=3)
    assert soft_dice_loss(padded, ignored).item() == pytest.approx(expected, abs=1e-6)


def test_unet_dice_option_trains_on_dice(tiny_dataset):
    info = read_info(tiny_dataset)
    method = create_method("unet", {"widths": [4, 8], "loss": "ce+dice", "dice_weight": 0.5}, source="t", key="k")
    model = method.build(info)
    images, target = torch.rand(2, 3, 16, 16), torch.randint(0, info.num_classes + 1, (2, 16, 16))
    losses = method.training_step(model, (images, target))
    assert set(losses) == {"ce", "dice"}
    assert losses["dice"].item() == pytest.approx(0.5 * soft_dice_loss(model(images).softmax(1), target).item())


def test_condinst_dice_matches_its_formula():
    g = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    assert dice_loss(g.clone(), g).item() == pytest.approx(0.0, abs=1e-5)
    p = torch.tensor([[[0.5, 1.0], [0.5, 0.0]]])
    # 2 * (0.5 + 1) / ((0.25 + 1 + 0.25) + 2)
    assert dice_loss(p, g).item() == pytest.approx(1 - 3.0 / 3.5, abs=1e-5)


# --- U-Net -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(64, 64), (50, 37)])
def test_unet_output_resolution_equals_input(tiny_dataset, size):
    info = read_info(tiny_dataset)
    method = create_method("unet", {"widths": [4, 8, 16, 32]}, source="t", key="k")
    model = method.build(info).eval()
    with torch.no_grad():
        logits = model(torch.rand(2, 3, *size))
    assert logits.shape == (2, info.num_classes + 1, *size)
    prediction = method.predict(model, (torch.rand(1, 3, *size), None))
    assert prediction.shape == (1, *size)


def test_unet_skip_connections_concatenate_encoder_features(tiny_dataset):
    model = create_method("unet", {"widths": [4, 8, 16]}, source="t", key="k").build(read_info(tiny_dataset))
    # Each decoder block sees twice the width: its up-convolution's output and the skip.
    assert [block[0].in_channels for block in model.up] == [16, 8]
    assert [up.out_channels for up in model.upconv] == [8, 4]


# --- SegFormer -------------------------------------------------------------------------------


SMALL_SEGFORMER = {"widths": [8, 16, 24, 32], "depths": [1, 2, 1, 1], "heads": [1, 2, 3, 4], "decoder_width": 16}


@pytest.mark.parametrize("size", [(64, 64), (96, 128)])
def test_segformer_encoder_has_four_scales_at_strides_4_to_32(tiny_dataset, size):
    info = read_info(tiny_dataset)
    model = create_method("segformer", SMALL_SEGFORMER, source="t", key="k").build(info).eval()
    x = torch.rand(1, 3, *size)
    with torch.no_grad():
        features = model.encoder(model.normalize(x))
        logits = model(x)
    assert [tuple(f.shape[-2:]) for f in features] == [(size[0] // s, size[1] // s) for s in (4, 8, 16, 32)]
    assert [f.shape[1] for f in features] == SMALL_SEGFORMER["widths"]
    assert logits.shape == (1, info.num_classes + 1, *size)
    merges = model.encoder.merges
    assert (merges[0].proj.kernel_size, merges[0].proj.stride, merges[0].proj.padding) == ((7, 7), (4, 4), (3, 3))
    for m in merges[1:]:  # overlapping: kernel larger than stride
        assert (m.proj.kernel_size, m.proj.stride, m.proj.padding) == ((3, 3), (2, 2), (1, 1))


def test_segformer_has_no_positional_embedding(tiny_dataset):
    model = create_method("segformer", SMALL_SEGFORMER, source="t", key="k").build(read_info(tiny_dataset))
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    assert not [n for n in names if "pos" in n.lower()]
    # Position enters through the Mix-FFN's 3x3 depth-wise convolution, so the same weights
    # run at any resolution (a learned position embedding would fix the token count).
    assert all(block.ffn.dwconv.groups == block.ffn.dwconv.in_channels for s in model.encoder.stages for block in s)
    model.eval()
    with torch.no_grad():
        for size in ((32, 32), (64, 96), (128, 64)):
            assert model(torch.rand(1, 3, *size)).shape[-2:] == size


def test_efficient_attention_shrinks_keys_by_the_reduction_ratio():
    attention = EfficientSelfAttention(dim=8, heads=2, reduction=4, dropout=0.0)
    seen = {}
    attention.kv.register_forward_hook(lambda m, i, o: seen.update(keys=o.shape[1]))
    out = attention(torch.rand(1, 16 * 16, 8), 16, 16)
    assert out.shape == (1, 256, 8) and seen["keys"] == (16 // 4) * (16 // 4)


# --- CondInst --------------------------------------------------------------------------------


def test_condinst_dynamic_head_has_169_parameters_per_instance(tiny_dataset):
    assert dynamic_param_count(8, 8, 3) == 169  # (10*8 + 8) + (8*8 + 8) + (8*1 + 1), as in the paper
    assert dynamic_layer_shapes(8, 8, 3) == [(8, 10), (8, 8), (1, 8)]
    method = create_method("condinst", {"mask_channels": 8, "dynamic_channels": 8}, source="t", key="k")
    model = method.build(read_info(tiny_dataset))
    assert isinstance(model, CondInstNet)
    assert model.head.controller.out_channels == 169
    assert not any("roi" in n.lower() for n, _ in model.named_modules())  # no RoI pooling anywhere


def test_condinst_instances_get_different_masks_from_the_same_features():
    torch.manual_seed(0)
    shapes = dynamic_layer_shapes(8, 8, 3)
    features = torch.randn(1, 8, 12, 12).expand(2, -1, -1, -1)  # one image's mask features, shared
    rel = torch.randn(1, 2, 12, 12).expand(2, -1, -1, -1)
    params = torch.randn(2, 169)
    masks = dynamic_mask_logits(params, features, rel, shapes)
    assert masks.shape == (2, 12, 12)
    assert not torch.allclose(masks[0], masks[1], atol=1e-3)  # different generated weights, different masks
    same = dynamic_mask_logits(params[:1].expand(2, -1), features, rel, shapes)
    torch.testing.assert_close(same[0], same[1])  # same weights, same coordinates: the same mask
    # The generated weights are exactly a per-instance FCN of 1x1 convolutions over [coords, features].
    x, offset = torch.cat([rel[:1], features[:1]], dim=1), 0
    for i, (cout, cin) in enumerate(shapes):
        weight = params[0, offset : offset + cout * cin].view(cout, cin, 1, 1)
        offset += cout * cin
        x = torch.nn.functional.conv2d(x, weight, params[0, offset : offset + cout])
        offset += cout
        x = torch.relu(x) if i < len(shapes) - 1 else x
    torch.testing.assert_close(masks[0], x[0, 0], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="dynamic parameters"):
        dynamic_mask_logits(torch.randn(1, 170), features[:1], rel[:1], shapes)


def test_condinst_relative_coordinates_separate_instances_with_equal_weights(tiny_dataset):
    """Two instances with the same generated weights at different locations still get different
    masks: the relative coordinates tell them apart (no RoI crop does)."""
    torch.manual_seed(0)
    method = create_method("condinst", {}, source="t", key="k")
    model = method.build(read_info(tiny_dataset))
    features = torch.randn(2, 8, 16, 16)
    params = torch.randn(1, 169).expand(2, -1)
    locations = torch.tensor([[20.0, 20.0], [100.0, 90.0]])
    masks = model.instance_masks(features[:1].expand(2, -1, -1, -1), 8, params, locations, torch.full((2,), 64.0))
    assert masks.shape == (2, 32, 32)  # mask output stride 4 of a 128-px input: the whole image
    assert not torch.allclose(masks[0], masks[1], atol=1e-3)


def test_condinst_predicts_full_image_masks_and_learns_masks(tiny_dataset):
    from components.tasks import get_task

    torch.manual_seed(0)
    info = read_info(tiny_dataset)
    method = create_method(
        "condinst",
        {"backbone": {"widths": [8, 16, 16, 32], "fpn_channels": 32}, "mask_branch_channels": 16},
        source="t",
        key="k",
    )
    task = get_task(method.task)
    model = method.build(info)
    data = task.dataset(tiny_dataset, "train", train=False)
    batch = task.collate()([data[i] for i in range(4)])
    optimizer = torch.optim.Adam(model.parameters(), 2e-3)
    first = None
    for _ in range(25):
        losses = method.training_step(model, batch)
        first = first if first is not None else losses["mask"].item()
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    assert losses["mask"].item() < first - 0.05, (first, losses["mask"].item())
    model.eval()
    with torch.no_grad():
        predictions = method.predict(model, batch)
    for image, pred in zip(batch[0], predictions, strict=True):
        assert pred["masks"].shape == (len(pred["boxes"]), *image.shape[-2:])
        assert pred["masks"].min() >= 0 and pred["masks"].max() <= 1


def test_mask_rcnn_predicts_one_mask_per_detection_at_image_size(tiny_dataset):
    from components.tasks import get_task

    info = read_info(tiny_dataset)
    method = create_method("mask_rcnn", {"score_thresh": 0.0}, source="t", key="k")
    task = get_task(method.task)
    data = task.dataset(tiny_dataset, "val", train=False)
    batch = task.collate()([data[0], data[1]])
    model = method.build(info).eval()
    with torch.no_grad():
        predictions = method.predict(model, batch)
    assert any(len(p["boxes"]) for p in predictions)
    for image, pred in zip(batch[0], predictions, strict=True):
        assert pred["masks"].shape == (len(pred["boxes"]), *image.shape[-2:])


def test_semantic_training_transform_fills_ignore_outside_the_canvas(tiny_dataset):
    from components.tasks import get_task

    task = get_task("semantic_segmentation")
    torch.manual_seed(3)
    data = task.dataset(tiny_dataset, "train", train=True)
    labels = set()
    for i in range(len(data)):
        labels |= set(np.unique(data[i][1]["semantic"].numpy()).tolist())
    assert IGNORE_INDEX in labels and 0 in labels
