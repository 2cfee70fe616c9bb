"""Faster R-CNN and Mask R-CNN: the mechanisms their papers define them by, checked on our built
models (torchvision's detectors with our settings) with hand-placed boxes and hand-built head
outputs, no training.

- Faster R-CNN (arXiv 1506.01497, section 3.1.2): an anchor is positive at IoU >= 0.7 with a
  ground-truth box or as the highest-IoU anchor of a ground-truth box, negative below 0.3 with
  every box, otherwise ignored; the loss samples 256 anchors an image, at most half positive.
- Fast R-CNN's head loss (torchvision's ``fastrcnn_loss``): cross-entropy over every sampled RoI
  plus smooth L1 (beta 1/9) on the positives' deltas of their own class, summed and divided by the
  number of sampled RoIs; deltas encode the matched box with weights (10, 10, 5, 5).
- Mask R-CNN (arXiv 1703.06870, section 3): the mask loss of a positive RoI is the mean per-pixel
  binary cross-entropy of its own class's mask only, against the ground-truth mask cropped to the
  RoI by RoIAlign at the head's output resolution.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models.detection import roi_heads as tv_roi_heads
from torchvision.ops import roi_align

from components.config import load_yaml
from components.data.canonical import DatasetInfo
from components.methods import create_method
from components.methods.faster_rcnn import FasterRCNNConfig
from tests.conftest import ROOT, TINY_MODELS

INFO = DatasetInfo("t", Path("."), ("a", "b", "c", "d"), 3, (64, 64), "", {})
BETA = 1 / 9  # torchvision's smooth-L1 beta for the RPN and the box head


def _build(name: str, config: dict | None = None):
    method = create_method(name, config if config is not None else TINY_MODELS[name], source="test", key=name)
    return method, method.build(INFO)


def _params_configs(*methods: str) -> list[tuple[str, dict]]:
    """The configs params.yaml gives the runs of ``methods``: the models the pipeline trains."""
    runs = load_yaml(ROOT / "params.yaml")["runs"]
    return [(r["method"], r.get("config", {})) for r in runs.values() if r["method"] in methods]


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of XYXY boxes, len(a) x len(b)."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a, area_b = (a[:, 2:] - a[:, :2]).prod(-1), (b[:, 2:] - b[:, :2]).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def _shifted(box: list[float], iou: float, axis: int = 0, sign: float = 1.0) -> list[float]:
    """``box`` moved along x (axis 0) or y (axis 1) so that its IoU with ``box`` is ``iou``: for a
    side s and an offset d, IoU = (s - d) / (s + d). The offset is rounded to 1/64 px, so boxes
    moved by the same amount either way have bit-identical IoUs in float32 (an exact tie)."""
    side = box[2 + axis] - box[axis]
    d = sign * round(64 * side * (1 - iou) / (1 + iou)) / 64
    out = list(box)
    out[axis] += d
    out[axis + 2] += d
    return out


def _smooth_l1(d: torch.Tensor, beta: float) -> torch.Tensor:
    a = d.abs()
    return torch.where(a < beta, 0.5 * a**2 / beta, a - 0.5 * beta)


def _encode(gt: torch.Tensor, proposal: torch.Tensor, weights=(10.0, 10.0, 5.0, 5.0)) -> torch.Tensor:
    """The R-CNN box parametrisation: centre offsets in proposal sizes, log size ratios."""
    pw, ph = proposal[:, 2] - proposal[:, 0], proposal[:, 3] - proposal[:, 1]
    gw, gh = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
    px, py = proposal[:, 0] + pw / 2, proposal[:, 1] + ph / 2
    gx, gy = gt[:, 0] + gw / 2, gt[:, 1] + gh / 2
    wx, wy, ww, wh = weights
    return torch.stack([wx * (gx - px) / pw, wy * (gy - py) / ph, ww * torch.log(gw / pw), wh * torch.log(gh / ph)], 1)


# ---------------------------------------------------------------- RPN: anchor labels and sampling


def _rpn_case(hi: float, lo: float):
    """Hand-placed anchors around three ground-truth boxes, and the label each must get."""
    a, b, c = [0.0, 0.0, 40.0, 40.0], [100.0, 100.0, 130.0, 130.0], [150.0, 10.0, 190.0, 50.0]
    anchors = [
        (a, 1),  # IoU 1
        (_shifted(a, hi + 0.02), 1),  # just above the positive threshold
        (_shifted(a, hi - 0.02), -1),  # just below it: ignored
        (_shifted(a, lo + 0.02), -1),  # just above the negative threshold: ignored
        (_shifted(a, lo - 0.02), 0),  # just below it: negative
        ([60.0, 150.0, 80.0, 170.0], 0),  # overlaps nothing
        (_shifted(b, (hi + lo) / 2, sign=1.0), 1),  # b's best anchors (an exact tie), though below hi
        (_shifted(b, (hi + lo) / 2, sign=-1.0), 1),
        (_shifted(b, lo * 0.5, axis=1), 0),  # not b's best and below lo
        (_shifted(c, lo * 0.6, axis=1), 1),  # c's only anchor: positive even below lo
    ]
    boxes = torch.tensor([a, b, c])
    matched = {0: 0, 1: 0, 6: 1, 7: 1, 9: 2}  # anchor -> ground-truth box of the positives
    return boxes, torch.tensor([x for x, _ in anchors]), torch.tensor([y for _, y in anchors]).float(), matched


@pytest.mark.parametrize(("name", "config"), _params_configs("faster_rcnn", "mask_rcnn"))
def test_rpn_has_the_paper_settings(name, config):
    method, model = _build(name, config)
    matcher, sampler = model.rpn.proposal_matcher, model.rpn.fg_bg_sampler
    assert (matcher.high_threshold, matcher.low_threshold) == (0.7, 0.3)
    assert matcher.allow_low_quality_matches  # the highest-IoU anchor of each box is positive
    assert sampler.batch_size_per_image == method.cfg.rpn_batch_size_per_image
    assert sampler.positive_fraction == 0.5
    assert FasterRCNNConfig().rpn_batch_size_per_image == 256


@pytest.mark.parametrize(("name", "config"), _params_configs("faster_rcnn", "mask_rcnn"))
def test_rpn_labels_anchors_by_the_iou_thresholds(name, config):
    _, model = _build(name, config)
    rpn = model.rpn
    hi, lo = rpn.proposal_matcher.high_threshold, rpn.proposal_matcher.low_threshold
    gt, anchors, expected, matched = _rpn_case(hi, lo)
    iou = _iou(gt, anchors)
    assert iou[0, 1] >= hi > iou[0, 2] and iou[0, 3] >= lo > iou[0, 4]  # the placement is right
    assert iou[1, 6] == iou[1, 7] and lo <= iou[1, 6] < hi and 0 < iou[2, 9] < lo
    labels, matched_boxes = rpn.assign_targets_to_anchors([anchors], [{"boxes": gt}])
    assert labels[0].tolist() == expected.tolist()
    for anchor, box in matched.items():
        assert torch.equal(matched_boxes[0][anchor], gt[box])


def test_rpn_anchor_labels_follow_the_thresholds_the_model_has():
    """The hand-placed anchors tell the thresholds apart: moved by 0.04, the labels change."""
    _, model = _build("faster_rcnn")
    gt, anchors, expected, _ = _rpn_case(0.7, 0.3)
    for attr, delta in (("high_threshold", -0.04), ("low_threshold", 0.04)):
        matcher = model.rpn.proposal_matcher
        setattr(matcher, attr, getattr(matcher, attr) + delta)
        labels, _ = model.rpn.assign_targets_to_anchors([anchors], [{"boxes": gt}])
        assert labels[0].tolist() != expected.tolist(), attr
        setattr(matcher, attr, getattr(matcher, attr) - delta)


@pytest.mark.parametrize(("positives", "negatives"), [(300, 1000), (10, 1000), (10, 20)])
@pytest.mark.parametrize(("name", "config"), _params_configs("faster_rcnn", "mask_rcnn"))
def test_rpn_samples_at_most_the_positive_fraction(name, config, positives, negatives):
    _, model = _build(name, config)
    sampler = model.rpn.fg_bg_sampler
    size, fraction = sampler.batch_size_per_image, sampler.positive_fraction
    labels = torch.cat([torch.ones(positives), -torch.ones(40), torch.zeros(negatives)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    (pos,), (neg,) = sampler([labels])
    pos, neg = pos.bool(), neg.bool()
    want_pos = min(positives, int(size * fraction))
    assert int(pos.sum()) == want_pos
    assert int(neg.sum()) == min(negatives, size - want_pos)
    assert bool((labels[pos] == 1).all()) and bool((labels[neg] == 0).all())  # ignored never drawn


def test_rpn_loss_is_over_the_sampled_anchors():
    """Objectness: binary cross-entropy averaged over the sampled anchors; boxes: smooth L1 over
    the sampled positives, divided by the number sampled."""
    _, model = _build("faster_rcnn")
    rpn = model.rpn
    g = torch.Generator().manual_seed(1)
    labels = torch.cat([torch.ones(200), -torch.ones(50), torch.zeros(500)])
    objectness = torch.randn(len(labels), generator=g) * 3
    deltas, targets = torch.randn(len(labels), 4, generator=g), torch.randn(len(labels), 4, generator=g)
    torch.manual_seed(5)
    (pos,), (neg,) = rpn.fg_bg_sampler([labels])
    torch.manual_seed(5)  # the same draw inside compute_loss
    obj_loss, box_loss = rpn.compute_loss(objectness, deltas, [labels], [targets])
    sampled = pos.bool() | neg.bool()
    x, t = objectness[sampled], labels[sampled]
    bce = (torch.clamp(x, min=0) - x * t + torch.log1p(torch.exp(-x.abs()))).mean()
    assert obj_loss.item() == pytest.approx(bce.item(), rel=1e-6)
    smooth = _smooth_l1(deltas[pos.bool()] - targets[pos.bool()], BETA).sum() / int(sampled.sum())
    assert box_loss.item() == pytest.approx(smooth.item(), rel=1e-6)


# ---------------------------------------------------------------- the box head's loss


def _hand_fastrcnn_loss(logits, deltas, labels, targets):
    n = len(labels)
    ce = sum(torch.logsumexp(logits[i], 0) - logits[i, labels[i]] for i in range(n)) / n
    box = sum(
        _smooth_l1(deltas[i, 4 * labels[i] : 4 * labels[i] + 4] - targets[i], BETA).sum()
        for i in range(n)
        if labels[i] > 0
    )
    return ce, box / n


def test_fastrcnn_loss_equals_the_hand_computation():
    g = torch.Generator().manual_seed(0)
    labels = [torch.tensor([0, 2, 0, 4]), torch.tensor([1, 0])]  # two images, three positives
    flat = torch.cat(labels)
    logits = torch.randn(6, 5, generator=g) * 2
    targets = torch.randn(6, 4, generator=g)
    deltas = torch.randn(6, 20, generator=g) * 5  # garbage in every other class
    for i, k in enumerate(flat.tolist()):  # own class: errors on both sides of beta
        deltas[i, 4 * k : 4 * k + 4] = targets[i] + torch.tensor([0.05, -0.03, 0.5, -1.2])
    cls, box = tv_roi_heads.fastrcnn_loss(logits, deltas, labels, [targets[:4], targets[4:]])
    hand_cls, hand_box = _hand_fastrcnn_loss(logits, deltas, flat, targets)
    assert cls.item() == pytest.approx(hand_cls.item(), rel=1e-6)
    assert box.item() == pytest.approx(hand_box.item(), rel=1e-6)
    # 3 positives x (smooth(0.05) + smooth(0.03) + 0.5 - beta/2 + 1.2 - beta/2), over 6 RoIs
    per_positive = 0.5 * (0.05**2 + 0.03**2) / BETA + (0.5 - BETA / 2) + (1.2 - BETA / 2)
    assert box.item() == pytest.approx(3 * per_positive / 6, rel=1e-5)
    other = deltas.clone()
    other[:, :4] += 100  # the background's deltas and negatives' targets do not count
    bg_targets = targets.clone()
    bg_targets[flat == 0] += 100
    assert tv_roi_heads.fastrcnn_loss(logits, other, labels, [bg_targets[:4], bg_targets[4:]])[1] == box


class _Fixed(nn.Module):
    """A head predictor that ignores its input and returns hand-built outputs, one row per RoI."""

    def __init__(self, *outputs: torch.Tensor) -> None:
        super().__init__()
        self.outputs = outputs
        self.rois: list[int] = []

    def forward(self, x: torch.Tensor):
        self.rois.append(x.shape[0])
        out = tuple(o[: x.shape[0]] for o in self.outputs)
        return out if len(out) > 1 else out[0]


def _roi_case():
    """One 64 x 64 image, two objects, hand-placed proposals around them and one background one."""
    gt = torch.tensor([[8.0, 8.0, 30.0, 30.0], [34.0, 20.0, 60.0, 56.0]])
    proposals = torch.tensor(
        [
            _shifted(gt[0].tolist(), 0.8),
            [0.0, 40.0, 14.0, 62.0],  # background
            _shifted(gt[1].tolist(), 0.7, axis=1),
            _shifted(gt[1].tolist(), 0.75, sign=-1.0),
        ]
    )
    return gt, proposals


@pytest.mark.parametrize("name", ["faster_rcnn", "mask_rcnn"])
def test_box_head_loss_through_our_roi_heads(name):
    """Our model's RoI heads: hand-placed proposals (plus the ground truth torchvision adds) are
    labelled by IoU, their box targets encoded, and the loss of hand-built predictions equals the
    hand computation."""
    torch.manual_seed(0)
    _, model = _build(name)
    heads = model.roi_heads.train()
    assert type(heads) is tv_roi_heads.RoIHeads
    fg, bg = heads.proposal_matcher.high_threshold, heads.proposal_matcher.low_threshold
    gt, proposals = _roi_case()
    gt_labels = torch.tensor([2, 4])  # category indices + 1: 0 is the background
    rois = torch.cat([proposals, gt])  # torchvision appends the ground truth to the proposals
    iou = _iou(rois, gt)
    best, which = iou.max(1)
    assert bool(((best >= fg) | (best < bg)).all())  # nothing near a threshold
    labels = torch.where(best >= fg, gt_labels[which], 0)
    assert labels.tolist() == [2, 0, 4, 4, 2, 4]
    targets = _encode(gt[which], rois)
    g = torch.Generator().manual_seed(3)
    logits, deltas = torch.randn(6, 5, generator=g), torch.randn(6, 20, generator=g)
    heads.box_predictor = _Fixed(logits, deltas)
    features = model.backbone(torch.rand(1, 3, 64, 64))
    target = {"boxes": gt, "labels": gt_labels}
    if heads.has_mask():
        target["masks"] = torch.zeros(2, 64, 64, dtype=torch.uint8)
    _, losses = heads(features, [proposals], [(64, 64)], [target])
    assert heads.box_predictor.rois == [6]  # every RoI sampled: 5 positives, 1 negative
    hand_cls, hand_box = _hand_fastrcnn_loss(logits, deltas, labels, targets)
    assert losses["loss_classifier"].item() == pytest.approx(hand_cls.item(), rel=1e-5)
    assert losses["loss_box_reg"].item() == pytest.approx(hand_box.item(), rel=1e-5)


@pytest.mark.parametrize("name", ["faster_rcnn", "mask_rcnn"])
def test_our_training_step_uses_torchvisions_rcnn_losses(name, monkeypatch):
    """Our training step reaches torchvision's ``fastrcnn_loss`` (and ``maskrcnn_loss``), and its
    losses are what those return."""
    torch.manual_seed(0)
    method, model = _build(name)
    calls: dict[str, list] = {"fastrcnn_loss": [], "maskrcnn_loss": []}
    for fn in calls:
        real = getattr(tv_roi_heads, fn)

        def spy(*args, _real=real, _fn=fn):
            out = _real(*args)
            calls[_fn].append(out)
            return out

        monkeypatch.setattr(tv_roi_heads, fn, spy)
    gt, _ = _roi_case()
    target = {"boxes": gt, "labels": torch.tensor([1, 3])}
    if name == "mask_rcnn":
        target["masks"] = torch.zeros(2, 64, 64, dtype=torch.uint8)
        target["masks"][:, 10:30, 10:30] = 1
    losses = method.training_step(model.train(), ([torch.rand(3, 64, 64)], [target]))
    ((cls, box),) = calls["fastrcnn_loss"]
    assert losses["loss_classifier"] is cls and losses["loss_box_reg"] is box
    if name == "mask_rcnn":
        assert len(calls["maskrcnn_loss"]) == 1 and losses["loss_mask"] is calls["maskrcnn_loss"][0]
    else:
        assert calls["maskrcnn_loss"] == [] and "loss_mask" not in losses


# ---------------------------------------------------------------- Mask R-CNN's mask loss


def _object_masks() -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    disc = ((x + 0.5 - 19) ** 2 + (y + 0.5 - 19) ** 2) <= 10**2
    ell = (x >= 34) & (x < 60) & (y >= 20) & (y < 56) & ~((x >= 44) & (y < 44))  # an L shape
    return torch.stack([disc, ell]).to(torch.uint8)


def _nearest_crop(mask: torch.Tensor, box: torch.Tensor, size: int) -> torch.Tensor:
    """``mask`` inside ``box``, size x size, each bin the pixel nearest its centre."""

    def centres(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        return (lo + (torch.arange(size) + 0.5) * (hi - lo) / size).round().long().clamp(0, mask.shape[-1] - 1)

    return mask[centres(box[1], box[3])][:, centres(box[0], box[2])].float()


def test_mask_loss_is_own_class_bce_against_roialigned_ground_truth():
    torch.manual_seed(0)
    method, model = _build("mask_rcnn")
    heads = model.roi_heads.train()
    assert type(heads) is tv_roi_heads.RoIHeads and heads.has_mask()
    gt, proposals = _roi_case()
    gt_labels, masks = torch.tensor([2, 4]), _object_masks()
    features = model.backbone(torch.rand(1, 3, 64, 64))
    # the head's own output resolution: a 2x deconvolution of the RoIAligned features
    size = heads.mask_predictor(heads.mask_head(heads.mask_roi_pool(features, [gt], [(64, 64)]))).shape[-1]
    assert size == 2 * method.cfg.mask_roi_output_size

    seen: list[torch.Tensor] = []  # the boxes the mask branch pools
    heads.mask_roi_pool.register_forward_pre_hook(lambda _module, args: seen.append(args[1][0].clone()))
    target = {"boxes": gt, "labels": gt_labels, "masks": masks}

    def loss_of(mask_logits: torch.Tensor) -> torch.Tensor:
        heads.mask_predictor = _Fixed(mask_logits)
        seen.clear()
        return heads(features, [proposals], [(64, 64)], [target])[1]["loss_mask"]

    rois = torch.cat([proposals, gt])  # torchvision appends the ground truth to the proposals
    best, which = _iou(rois, gt).max(1)
    positive = best >= heads.proposal_matcher.high_threshold
    boxes, objects = rois[positive], which[positive]
    labels, n = gt_labels[objects], int(positive.sum())
    assert n == 5  # proposals 0, 2, 3 and the two objects; the background proposal is not one
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(n, 5, size, size, generator=g) * 50  # garbage in every channel ...
    own = torch.randn(n, size, size, generator=g) * 2
    logits[torch.arange(n), labels] = own  # ... but each RoI's own class
    loss = loss_of(logits)
    assert len(seen) == 1 and torch.equal(seen[0], boxes)  # only the positives reach the mask branch

    # Targets: each positive's object mask cropped to the RoI and resampled to size x size.
    crops = torch.cat(
        [
            roi_align(masks[j][None, None].float(), [box[None]], output_size=size, spatial_scale=1.0)
            for box, j in zip(boxes, objects.tolist(), strict=True)
        ]
    )[:, 0]
    for crop, box, j in zip(crops, boxes, objects.tolist(), strict=True):  # the crop of that object
        nearest = _nearest_crop(masks[j], box, size)
        assert ((crop >= 0.5).float() == nearest).float().mean() > 0.85
        assert 0.1 < crop.mean() < 0.9
    bce = torch.clamp(own, min=0) - own * crops + torch.log1p(torch.exp(-own.abs()))  # per pixel
    assert loss.item() == pytest.approx(bce.mean().item(), rel=1e-5)

    others = torch.ones(n, 5, dtype=torch.bool)
    others[torch.arange(n), labels] = False
    changed = logits.clone()
    changed[others] = torch.randn(int(others.sum()), size, size, generator=g) * 50
    assert torch.equal(loss_of(changed), loss)  # the other classes' masks do not count
    moved = logits.clone()
    moved[torch.arange(n), labels] += 1.0
    assert abs(loss_of(moved).item() - loss.item()) > 1e-3  # the own class's mask does
