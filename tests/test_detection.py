"""Detection: the COCO evaluator, and the property each detector's paper defines it by."""

from __future__ import annotations

import itertools
import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from components.config import ConfigError
from components.data.canonical import read_info
from components.methods import create_method
from components.methods.detr import DETRConfig, SetCriterion, hungarian_match, sine_position_encoding
from components.methods.fcos import fcos_assign
from components.methods.retinanet import FocalClassificationHead
from components.tasks.detection import DetectionEvaluator, coco_box_metrics
from components.training.optim import OptimizerConfig, build_optimizer


def _image(boxes, labels, det_boxes, det_scores, det_labels, size=64):
    return {
        "height": size,
        "width": size,
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4).numpy(),
        "labels": torch.tensor(labels, dtype=torch.int64).numpy(),
        "det_boxes": torch.tensor(det_boxes, dtype=torch.float32).reshape(-1, 4).numpy(),
        "det_scores": torch.tensor(det_scores, dtype=torch.float32).numpy(),
        "det_labels": torch.tensor(det_labels, dtype=torch.int64).numpy(),
    }


# ---------------------------------------------------------------- COCO evaluation


def test_perfect_detections_score_one():
    images = [
        _image([[4, 4, 24, 30], [30, 10, 50, 40]], [1, 7], [[4, 4, 24, 30], [30, 10, 50, 40]], [0.9, 0.8], [1, 7]),
        _image([[10, 10, 30, 30]], [3], [[10, 10, 30, 30]], [0.7], [3]),
    ]
    m = coco_box_metrics(images, num_classes=10)
    assert m["mAP"] == pytest.approx(1.0) and m["mAP50"] == pytest.approx(1.0) and m["mAP75"] == pytest.approx(1.0)
    assert m["mAP_small"] == pytest.approx(1.0)  # every box is below COCO's 32^2 "small" area
    assert "mAP_large" not in m  # no large object: left out, not -1


def test_iou_between_thresholds_counts_at_50_not_75():
    # Prediction shifted so IoU = 0.6: a hit at IoU 0.5, a miss at 0.75.
    gt = [0.0, 0.0, 20.0, 20.0]
    shift = 20 * (1 - 0.6) / (1 + 0.6)  # IoU of two 20x20 squares offset by d along x: (20-d)/(20+d)
    pred = [shift, 0.0, 20.0 + shift, 20.0]
    m = coco_box_metrics([_image([gt], [2], [pred], [0.9], [2])], num_classes=10)
    assert m["mAP50"] == pytest.approx(1.0)
    assert m["mAP75"] == pytest.approx(0.0)


def test_wrong_class_or_nothing_scores_zero():
    gt = [[4, 4, 24, 30]]
    assert coco_box_metrics([_image(gt, [1], gt, [0.9], [2])], 10)["mAP"] == 0.0
    assert coco_box_metrics([_image(gt, [1], [], [], [])], 10)["mAP"] == 0.0


def test_ranking_matters():
    # Two objects, one false positive; ranked above the hits it lowers AP, ranked below it does not.
    gt = [[0, 0, 20, 20], [30, 30, 50, 50]]
    fp = [40, 0, 60, 20]
    low = coco_box_metrics([_image(gt, [0, 0], [*gt, fp], [0.9, 0.8, 0.1], [0, 0, 0])], 10)["mAP"]
    high = coco_box_metrics([_image(gt, [0, 0], [fp, *gt], [0.95, 0.9, 0.8], [0, 0, 0])], 10)["mAP"]
    assert low == pytest.approx(1.0)
    assert high < 0.9


def test_no_ground_truth_is_an_error():
    with pytest.raises(ValueError, match="at least one ground-truth box"):
        coco_box_metrics([_image([], [], [], [], [])], 10)


def test_evaluator_reads_batches(tiny_dataset):
    from components.tasks import get_task

    task = get_task("detection")
    ds = task.dataset(tiny_dataset, "val", train=False)
    images, targets = task.collate()([ds[i] for i in range(len(ds))])
    perfect = [{"boxes": t["boxes"], "scores": torch.ones(len(t["labels"])), "labels": t["labels"]} for t in targets]
    evaluator = DetectionEvaluator(read_info(tiny_dataset).num_classes)
    evaluator.update(perfect, (images, targets))
    assert evaluator.compute()["mAP"] == pytest.approx(1.0)


# ---------------------------------------------------------------- DETR


@pytest.mark.parametrize("seed", range(20))
def test_hungarian_matching_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    queries = int(torch.randint(2, 7, (1,), generator=g))
    targets = int(torch.randint(1, queries + 1, (1,), generator=g))
    cost = torch.rand(queries, targets, generator=g) * 10 - 3
    rows, cols = hungarian_match(cost)
    assert len(set(rows.tolist())) == len(rows) == targets  # one-to-one, every target matched
    assert sorted(cols.tolist()) == list(range(targets))
    best = min(
        sum(float(cost[q, t]) for t, q in enumerate(perm)) for perm in itertools.permutations(range(queries), targets)
    )
    assert float(cost[rows, cols].sum()) == pytest.approx(best, abs=1e-5)


def test_detr_trains_the_trunk_at_a_tenth_of_the_learning_rate_by_default(tiny_dataset):
    """The paper: 1e-4 for the transformer, 1e-5 for the backbone."""
    assert DETRConfig().backbone_lr_ratio == 0.1
    method = create_method("detr", {}, source="test", key="runs.x.config")
    model = method.build(read_info(tiny_dataset))
    trunk = {id(p) for p in method.trunk(model).parameters()}
    optimizer = build_optimizer(model, OptimizerConfig(lr=1e-4), method.param_groups(model))
    for group in optimizer.param_groups:
        in_trunk = {id(p) in trunk for p in group["params"]}
        assert len(in_trunk) == 1  # a group is all trunk or all the rest
        assert group["lr"] == pytest.approx(1e-5 if in_trunk.pop() else 1e-4)
    assert len(optimizer.param_groups) == 2


def test_matcher_pairs_each_object_with_its_query():
    cfg = DETRConfig()
    criterion = SetCriterion(3, cfg)
    target = {"labels": torch.tensor([2, 0]), "boxes": torch.tensor([[0.7, 0.7, 0.2, 0.2], [0.2, 0.3, 0.1, 0.2]])}
    boxes = torch.tensor([[[0.5, 0.5, 0.3, 0.3], [0.2, 0.3, 0.1, 0.2], [0.71, 0.69, 0.2, 0.2]]])
    logits = torch.zeros(1, 3, 4)
    logits[0, 1, 0] = logits[0, 2, 2] = 5.0
    ((rows, cols),) = criterion.match(logits, boxes, [target])
    assert dict(zip(cols.tolist(), rows.tolist(), strict=True)) == {0: 2, 1: 1}


def test_matcher_copies_the_batch_to_the_host_once(monkeypatch):
    """Each device-to-host copy syncs a GPU: the batch's costs go over in one, and each image
    (an empty one included) still gets its own optimal assignment."""
    criterion = SetCriterion(3, DETRConfig())
    g = torch.Generator().manual_seed(0)
    targets = [
        {"labels": torch.tensor([0, 2]), "boxes": torch.rand(2, 4, generator=g) * 0.4 + 0.1},
        {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)},
        {"labels": torch.tensor([1, 1, 0]), "boxes": torch.rand(3, 4, generator=g) * 0.4 + 0.1},
    ]
    logits, boxes = torch.randn(3, 5, 4, generator=g), torch.rand(3, 5, 4, generator=g) * 0.4 + 0.1
    expected = [criterion.match(logits[i : i + 1], boxes[i : i + 1], [t])[0] for i, t in enumerate(targets)]
    copies = []
    original = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: copies.append(1) or original(self, *a, **k))
    matched = criterion.match(logits, boxes, targets)
    assert len(copies) == 1
    for (rows, cols), (want_rows, want_cols) in zip(matched, expected, strict=True):
        assert torch.equal(rows, want_rows) and torch.equal(cols, want_cols)
    assert len(matched[1][0]) == 0


def _giou(a, b):
    """GIoU of XYXY box pairs, from the definition (arXiv 1902.09630, Alg. 1)."""
    ix = (torch.min(a[:, 2], b[:, 2]) - torch.max(a[:, 0], b[:, 0])).clamp(min=0)
    iy = (torch.min(a[:, 3], b[:, 3]) - torch.max(a[:, 1], b[:, 1])).clamp(min=0)
    inter = ix * iy
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    union = area(a) + area(b) - inter
    hull = (torch.max(a[:, 2], b[:, 2]) - torch.min(a[:, 0], b[:, 0])) * (
        torch.max(a[:, 3], b[:, 3]) - torch.min(a[:, 1], b[:, 1])
    )
    return inter / union - (hull - union) / hull


def _cxcywh_to_xyxy(b):
    return torch.cat([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], dim=1)


def test_detr_loss_terms_follow_the_definitions():
    torch.manual_seed(0)
    cfg = DETRConfig(aux_loss=False)
    criterion = SetCriterion(4, cfg)
    targets = [
        {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
        {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    ]
    logits = torch.randn(1, 2, 5, 5)
    boxes = torch.rand(1, 2, 5, 4) * 0.5 + 0.25
    losses = criterion(logits, boxes, targets)
    indices = criterion.match(logits[0], boxes[0], targets)
    matched = torch.cat([boxes[0, i][rows] for i, (rows, _) in enumerate(indices)])
    wanted = torch.cat([t["boxes"][cols] for t, (_, cols) in zip(targets, indices, strict=True)])
    assert losses["l1"].item() == pytest.approx(5.0 * (matched - wanted).abs().sum().item() / 3, rel=1e-5)
    giou = _giou(_cxcywh_to_xyxy(matched), _cxcywh_to_xyxy(wanted))
    assert losses["giou"].item() == pytest.approx(2.0 * (1 - giou).sum().item() / 3, rel=1e-5)
    classes = torch.full((2, 5), 4)
    for i, (rows, cols) in enumerate(indices):
        classes[i, rows] = targets[i]["labels"][cols]
    weight = torch.where(classes == 4, 0.1, 1.0)
    ce = F.cross_entropy(logits[0].transpose(1, 2), classes, reduction="none")
    assert losses["ce"].item() == pytest.approx(((ce * weight).sum() / weight.sum()).item(), rel=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shards():
    """A global batch of 4 images whose two halves hold very different numbers of boxes."""
    g = torch.Generator().manual_seed(3)
    counts = [1, 1, 4, 3]
    targets = []
    for n in counts:
        centres = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        sizes = torch.rand(n, 2, generator=g) * 0.2 + 0.05
        targets.append({"labels": torch.randint(0, 4, (n,), generator=g), "boxes": torch.cat([centres, sizes], 1)})
    logits = torch.randn(3, 4, 6, 5, generator=g)  # 3 decoder layers, 4 images, 6 queries, 4 classes + none
    boxes = torch.rand(3, 4, 6, 4, generator=g) * 0.5 + 0.25
    return logits, boxes, targets


def _detr_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        logits, boxes, targets = _shards()
        half = slice(2 * rank, 2 * rank + 2)
        losses = SetCriterion(4, DETRConfig())(logits[:, half], boxes[:, half], targets[half])
        torch.save({k: v.detach() for k, v in losses.items()}, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_detr_loss_normalised_across_workers(tmp_path):
    """Data-parallel training averages the workers' gradients, so the effective loss is the
    workers' mean; normalised by the global box count it equals one worker on the whole batch."""
    logits, boxes, targets = _shards()
    single = SetCriterion(4, DETRConfig())(logits, boxes, targets)
    out = str(tmp_path / "loss")
    torch.multiprocessing.spawn(_detr_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    parts = [torch.load(f"{out}.{r}") for r in range(2)]
    for key in ("ce", "l1", "giou", "aux"):
        mean = (parts[0][key] + parts[1][key]) / 2
        assert mean.item() == pytest.approx(single[key].item(), rel=1e-5), key
    # The same shards normalised per worker give a different loss: the test can tell.
    local = [SetCriterion(4, DETRConfig())(logits[:, s], boxes[:, s], targets[s]) for s in (slice(0, 2), slice(2, 4))]
    assert abs((local[0]["l1"] + local[1]["l1"]).item() / 2 - single["l1"].item()) > 1e-2


def test_sine_encoding_separates_positions_and_ignores_padding():
    mask = torch.zeros(1, 4, 6, dtype=torch.bool)
    pos = sine_position_encoding(mask, 32)
    assert pos.shape == (1, 32, 4, 6)
    flat = pos[0].flatten(1).T
    assert torch.cdist(flat, flat).add(torch.eye(24) * 1e3).min() > 1e-3  # every location distinct
    padded = torch.zeros(1, 4, 8, dtype=torch.bool)
    padded[:, :, 6:] = True  # the same image padded on the right: unpadded positions keep their codes
    assert torch.allclose(sine_position_encoding(padded, 32)[..., :6], pos, atol=1e-5)


# ---------------------------------------------------------------- RetinaNet


def _head_inputs(gamma, alpha, seed=0):
    g = torch.Generator().manual_seed(seed)
    head = FocalClassificationHead(8, 1, 3, gamma=gamma, alpha=alpha)
    logits = torch.randn(2, 10, 3, generator=g)
    matched = [torch.tensor([0, -1, -1, 1, -2, -1, 0, -1, -1, -2]), torch.tensor([-1, 0, -1, -1, -1, -1, -2, -1, 0, 0])]
    targets = [{"labels": torch.tensor([2, 0])}, {"labels": torch.tensor([1])}]
    return head, logits, matched, targets


def _one_hot(matched, targets):
    out = []
    for m, t in zip(matched, targets, strict=True):
        y = torch.zeros(len(m), 3)
        fg = m >= 0
        y[fg, t["labels"][m[fg]]] = 1.0
        out.append(y)
    return out


def test_focal_loss_with_gamma_zero_and_no_alpha_is_bce():
    head, logits, matched, targets = _head_inputs(gamma=0.0, alpha=None)
    loss = head.compute_loss(targets, {"cls_logits": logits}, matched)
    expected = 0.0
    for x, y, m in zip(logits, _one_hot(matched, targets), matched, strict=True):
        valid = m != -2  # anchors between the IoU thresholds are ignored
        bce = F.binary_cross_entropy_with_logits(x[valid], y[valid], reduction="sum")
        expected += bce / max(1, int((m >= 0).sum()))
    assert loss.item() == pytest.approx(expected.item() / 2, rel=1e-6)


def test_focal_loss_matches_the_paper_formula():
    head, logits, matched, targets = _head_inputs(gamma=2.0, alpha=0.25, seed=1)
    loss = head.compute_loss(targets, {"cls_logits": logits}, matched)
    expected = 0.0
    for x, y, m in zip(logits, _one_hot(matched, targets), matched, strict=True):
        valid = m != -2
        p = torch.sigmoid(x[valid])
        p_t = torch.where(y[valid] == 1, p, 1 - p)
        alpha_t = torch.where(y[valid] == 1, 0.25, 0.75)
        expected += (-alpha_t * (1 - p_t) ** 2 * torch.log(p_t)).sum() / max(1, int((m >= 0).sum()))
    assert loss.item() == pytest.approx(expected.item() / 2, rel=1e-5)
    # Easy examples are down-weighted: the focal loss is below plain BCE on the same anchors.
    bce_head, *_ = _head_inputs(gamma=0.0, alpha=None, seed=1)
    assert loss < bce_head.compute_loss(targets, {"cls_logits": logits}, matched)


def test_giou_box_loss_option(tiny_dataset):
    info = read_info(tiny_dataset)
    method = create_method("retinanet", {"box_loss": "giou"}, source="test", key="runs.x.config")
    model = method.build(info)
    reg = model.head.regression_head
    g = torch.Generator().manual_seed(0)
    anchors = [torch.tensor([[0.0, 0.0, 32.0, 32.0], [16.0, 16.0, 48.0, 48.0], [8.0, 0.0, 40.0, 64.0]])]
    deltas = torch.randn(1, 3, 4, generator=g) * 0.2
    matched = [torch.tensor([0, -1, 1])]
    targets = [{"boxes": torch.tensor([[2.0, 3.0, 30.0, 35.0], [10.0, 4.0, 36.0, 60.0]])}]
    loss = reg.compute_loss(targets, {"bbox_regression": deltas}, anchors, matched)
    decoded = model.box_coder.decode_single(deltas[0][[0, 2]], anchors[0][[0, 2]])
    expected = (1 - _giou(decoded, targets[0]["boxes"])).sum() / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


# ---------------------------------------------------------------- FCOS


def _brute_force_assign(points, strides, levels, boxes, radius):
    last = max(levels)
    out = []
    for (x, y), s, lvl in zip(points.tolist(), strides.tolist(), levels.tolist(), strict=True):
        best, best_area = -1, math.inf
        for j, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
            dists = (x - x0, y - y0, x1 - x, y1 - y)
            if min(dists) <= 0:
                continue
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            if radius > 0 and max(abs(x - cx), abs(y - cy)) >= radius * s:
                continue
            reach = max(dists)
            lower = 0 if lvl == 0 else 4 * s
            upper = math.inf if lvl == last else 8 * s
            if not lower < reach <= upper:
                continue
            area = (x1 - x0) * (y1 - y0)
            if area < best_area:
                best, best_area = j, area
        out.append(best)
    return out


@pytest.mark.parametrize("radius", [0.0, 1.5])
@pytest.mark.parametrize("seed", range(5))
def test_fcos_assigns_each_location_to_the_smallest_box_containing_it(seed, radius):
    g = torch.Generator().manual_seed(seed)
    points, strides, levels = [], [], []
    for lvl, s in enumerate((8, 16, 32)):
        n = 128 // s
        ys, xs = torch.meshgrid(torch.arange(n) * s + s / 2, torch.arange(n) * s + s / 2, indexing="ij")
        points.append(torch.stack([xs.flatten(), ys.flatten()], 1))
        strides.append(torch.full((n * n,), float(s)))
        levels.append(torch.full((n * n,), lvl))
    points, strides, levels = torch.cat(points), torch.cat(strides), torch.cat(levels)
    xy = torch.rand(6, 2, generator=g) * 80
    wh = torch.rand(6, 2, generator=g) * 70 + 8
    boxes = torch.cat([xy, (xy + wh).clamp(max=128)], 1)  # nested and overlapping boxes of many sizes
    got = fcos_assign(points, strides, levels, boxes, radius)
    assert got.tolist() == _brute_force_assign(points, strides, levels, boxes, radius)
    assert (got >= 0).any()


def test_fcos_overlap_goes_to_the_smaller_box():
    boxes = torch.tensor([[0.0, 0.0, 60.0, 60.0], [20.0, 20.0, 40.0, 40.0]])
    points = torch.tensor([[30.0, 30.0], [10.0, 10.0]])
    got = fcos_assign(points, torch.tensor([8.0, 8.0]), torch.tensor([0, 0]), boxes, radius=0.0)
    assert got.tolist() == [1, 0]


# ---------------------------------------------------------------- configs


def test_anchor_sizes_must_match_the_pyramid():
    with pytest.raises(ConfigError, match=r"runs\.r\.config.*anchor_sizes needs one entry per pyramid level"):
        create_method("retinanet", {"anchor_sizes": [32, 64]}, source="params.yaml", key="runs.r.config")


def test_fcos_head_width_must_suit_its_group_norm():
    with pytest.raises(ConfigError, match=r"runs\.f\.config.*fpn_channels must be a multiple of 32"):
        create_method("fcos", {"backbone": {"fpn_channels": 48}}, source="params.yaml", key="runs.f.config")


@pytest.mark.slow
def test_full_size_configuration_builds_and_runs(tiny_dataset):
    """The configuration a GPU user would pick: ResNet-50 + FPN P3-P7, COCO-style anchors."""
    info = read_info(tiny_dataset)
    cfg = {
        "backbone": {"name": "resnet50", "levels": 3, "extra": "p6p7", "fpn_channels": 256},
        "anchor_sizes": [32, 64, 128, 256, 512],
        "input": {"min_size": 256, "max_size": 320},
    }
    model = create_method("retinanet", cfg, source="test", key="x").build(info).eval()
    assert sum(p.numel() for p in model.parameters()) > 30e6
    with torch.no_grad():
        out = model([torch.rand(3, 64, 64)])
    assert set(out[0]) == {"boxes", "scores", "labels"}
