"""Conditional DETR (arXiv 2108.06152), the ``conditional`` variant of the ``detr`` method: the
properties the paper defines it by, and plain DETR left as it was."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch
from torchvision.ops import box_convert, generalized_box_iou

from components.config import ConfigError, from_dict
from components.methods import create_method
from components.methods.conditional_detr import (
    ConditionalCrossAttention,
    ConditionalDETRModel,
    FocalSetCriterion,
    sine_point_encoding,
)
from components.methods.detr import DETRConfig, DETRModel, sine_position_encoding

TINY = {
    "backbone": {"widths": [8, 16], "blocks": [1, 1], "levels": 1},
    "hidden_dim": 16,
    "nheads": 2,
    "dim_feedforward": 32,
    "enc_layers": 1,
    "dec_layers": 2,
    "num_queries": 4,
    "input": {"min_size": 32, "max_size": 32},
}
INFO = SimpleNamespace(num_classes=3, in_channels=3)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one thread is fastest, and far faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _config(**overrides) -> DETRConfig:
    return from_dict(DETRConfig, {**TINY, **overrides}, source="test", key="runs.x.config")


def _batch():
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 32, 32, generator=g), torch.rand(3, 32, 32, generator=g)]
    targets = [
        {"boxes": torch.tensor([[2.0, 3.0, 20.0, 25.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[5.0, 5.0, 15.0, 30.0], [1.0, 1.0, 9.0, 9.0]]), "labels": torch.tensor([0, 2])},
    ]
    return images, targets


def _model(**overrides) -> ConditionalDETRModel:
    torch.manual_seed(0)
    return ConditionalDETRModel(_config(variant="conditional", dropout=0.0, **overrides), 3, 3)


def _encoded(model: DETRModel):
    images, _ = _batch()
    batch, _ = model.transform(images)
    return model.encode(batch.tensors, batch.image_sizes)


# ---------------------------------------------------------------- config


def test_variant_defaults_to_plain_detr_and_conditional_takes_its_paper_s_weights():
    plain, cond = DETRConfig(), DETRConfig(variant="conditional")
    assert plain.variant == "detr" and (plain.class_cost, plain.ce_weight) == (1.0, 1.0)
    assert (cond.class_cost, cond.ce_weight, cond.l1_weight, cond.giou_weight) == (2.0, 2.0, 5.0, 2.0)
    assert (cond.bbox_cost, cond.giou_cost) == (5.0, 2.0)
    # a weight the config sets is kept, for either variant
    assert _config(variant="conditional", ce_weight=3.0, class_cost=0.5).ce_weight == 3.0
    assert _config(variant="conditional", ce_weight=3.0, class_cost=0.5).class_cost == 0.5
    assert _config(class_cost=2.0).class_cost == 2.0
    with pytest.raises(ConfigError, match="variant"):
        _config(variant="deformable")


def test_the_method_builds_the_variant_it_is_given():
    plain = create_method("detr", TINY, source="test", key="k").build(INFO)
    assert type(plain) is DETRModel and plain.class_embed.out_features == 4  # 3 classes + "no object"
    cond = create_method("detr", {**TINY, "variant": "conditional"}, source="test", key="k").build(INFO)
    assert isinstance(cond, ConditionalDETRModel) and cond.class_embed.out_features == 3
    assert isinstance(cond.criterion, FocalSetCriterion)


def test_plain_detr_is_unchanged():
    """Reference numbers from DETR before the variant existed (same seed, config and batch):
    parameters, losses (dropout included) and detections."""
    torch.manual_seed(0)
    model = DETRModel(_config(), 3, 3)
    images, targets = _batch()
    torch.manual_seed(5)
    losses = model(images, targets)
    expected = {"ce": 1.1143461465835571, "l1": 3.905505895614624, "giou": 2.055797815322876, "aux": 7.3374834060668945}
    assert list(losses) == list(expected)
    for key, value in expected.items():
        assert losses[key].item() == pytest.approx(value, rel=1e-4), key
    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert [d["boxes"].sum().item() for d in detections] == pytest.approx([251.0328064, 250.7655640], rel=1e-4)
    assert [d["scores"].sum().item() for d in detections] == pytest.approx([1.4352181, 1.4600286], rel=1e-4)
    assert [d["labels"].tolist() for d in detections] == [[2, 2, 2, 2], [2, 2, 2, 2]]


# ---------------------------------------------------------------- conditional cross-attention


def test_cross_attention_logit_is_content_dot_plus_spatial_dot_per_head():
    """Concatenation, not addition: per head, c_q . c_k + p_q . p_k over sqrt(2 d / heads),
    each head taking its slice of the content and of the spatial projections."""
    torch.manual_seed(0)
    d, heads, width = 8, 2, 4
    attn = ConditionalCrossAttention(d, heads, dropout=0.0)
    tgt, spatial = torch.randn(1, 3, d), torch.randn(1, 3, d)
    memory, pos = torch.randn(1, 5, d), torch.randn(1, 5, d)

    def project(linear, x):
        return x @ linear.weight.T + linear.bias

    cq, pq = project(attn.content_query, tgt)[0], project(attn.spatial_query, spatial)[0]
    ck, pk = project(attn.content_key, memory)[0], project(attn.spatial_key, pos)[0]
    logits = attn.logits(tgt, spatial, memory, pos)
    assert logits.shape == (1, heads, 3, 5)
    for h in range(heads):
        part = slice(h * width, (h + 1) * width)
        manual = (cq[:, part] @ ck[:, part].T + pq[:, part] @ pk[:, part].T) / math.sqrt(2 * width)
        torch.testing.assert_close(logits[0, h], manual)
    # DETR's addition would add the cross terms c_q . p_k + p_q . c_k
    added = ((cq + pq)[:, :width] @ (ck + pk)[:, :width].T) / math.sqrt(2 * width)
    assert not torch.allclose(logits[0, 0], added, atol=1e-3)

    # the output: softmax over the unpadded keys of those logits, applied to the projected values
    padding = torch.tensor([[False, False, True, False, True]])
    out = attn(tgt, spatial, memory, pos, padding)
    weights = logits.masked_fill(padding[:, None, None, :], float("-inf")).softmax(-1)
    assert torch.all(weights[..., 2] == 0) and torch.all(weights[..., 4] == 0)
    values = project(attn.value, memory)[0]
    mixed = torch.cat([weights[0, h] @ values[:, h * width : (h + 1) * width] for h in range(heads)], -1)
    torch.testing.assert_close(out[0], project(attn.out_proj, mixed))


def test_point_encoding_has_the_keys_frequencies():
    """PE(s) of a point equals the keys' sine encoding at the feature-map position with the same
    normalised coordinates, channel for channel."""
    h, w, d = 3, 5, 16
    keys = sine_position_encoding(torch.zeros(1, h, w, dtype=torch.bool), d)[0]  # (d, H, W)
    ys, xs = torch.meshgrid(torch.arange(1, h + 1) / h, torch.arange(1, w + 1) / w, indexing="ij")
    points = torch.stack((xs, ys), -1)  # (H, W, 2) as (x, y)
    torch.testing.assert_close(sine_point_encoding(points, d), keys.permute(1, 2, 0), atol=1e-4, rtol=1e-4)


def test_spatial_query_is_the_encoding_in_the_first_layer_and_scaled_by_lambda_after():
    model = _model(dec_layers=3)
    memory, pos, padding = _encoded(model)
    seen = []
    for layer in model.decoder.layers:
        layer.register_forward_pre_hook(lambda _, args: seen.append((args[0], args[4])))
    with torch.no_grad():
        model.decode(memory, pos, padding)
        query_pos = model.query_embed.weight[None].expand(memory.shape[0], -1, -1)
        encoding = sine_point_encoding(model.decoder.reference_points(query_pos), TINY["hidden_dim"])
        assert len(seen) == 3
        tgt, spatial = seen[0]
        assert torch.all(tgt == 0)
        assert torch.equal(spatial, encoding)  # lambda_q = 1: PE(s) itself
        for tgt, spatial in seen[1:]:
            lam = model.decoder.query_scale(tgt)  # lambda_q = FFN(f), f the layer's input embedding
            torch.testing.assert_close(spatial, lam * encoding)
            assert not torch.allclose(spatial, encoding, atol=1e-3)


# ---------------------------------------------------------------- boxes relative to the reference


def test_box_centre_follows_the_reference_point_through_its_logit():
    """With the offset FFN's last layer fixed to a constant, box = sigmoid(offset + [logit(s), 0, 0]):
    moving the reference by a step in logit space moves every layer's box centre by that step."""
    model = _model()
    last = model.bbox_embed.layers[-1]
    offset = torch.tensor([0.3, -0.2, 0.1, -0.4])
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(offset)
        memory, pos, padding = _encoded(model)
        query_pos = model.query_embed.weight[None].expand(memory.shape[0], -1, -1)

        def centre_and_reference():
            _, boxes = model.decode(memory, pos, padding)
            return boxes, model.decoder.reference_points(query_pos)

        boxes, ref = centre_and_reference()
        assert boxes.shape == (2, 2, 4, 4)  # layers, images, queries, (cx, cy, w, h)
        torch.testing.assert_close(boxes[..., :2], (torch.logit(ref) + offset[:2]).sigmoid().expand_as(boxes[..., :2]))
        torch.testing.assert_close(boxes[..., 2:], offset[2:].sigmoid().expand_as(boxes[..., 2:]))
        step = torch.tensor([0.7, -0.5])
        model.decoder.reference_head.layers[-1].bias.add_(step)
        moved, moved_ref = centre_and_reference()
    torch.testing.assert_close(torch.logit(moved_ref) - torch.logit(ref), step.expand_as(ref))
    torch.testing.assert_close(
        torch.logit(moved[..., :2]) - torch.logit(boxes[..., :2]), step.expand_as(boxes[..., :2])
    )
    torch.testing.assert_close(moved[..., 2:], boxes[..., 2:])


def test_boxes_start_at_the_reference_points():
    model = _model()
    memory, pos, padding = _encoded(model)
    with torch.no_grad():
        _, boxes = model.decode(memory, pos, padding)
        ref = model.decoder.reference_points(model.query_embed.weight[None])
    torch.testing.assert_close(boxes[..., :2], ref.expand_as(boxes[..., :2]))
    assert torch.all(boxes[..., 2:] == 0.5)


# ---------------------------------------------------------------- focal cost and loss


def _focal_terms(x: float) -> tuple[float, float]:
    p = 1 / (1 + math.exp(-x))
    pos = 0.25 * (1 - p) ** 2 * -math.log(p)
    neg = 0.75 * p**2 * -math.log(1 - p)
    return pos, neg


def test_focal_class_cost_follows_the_formula():
    criterion = FocalSetCriterion(3, DETRConfig(variant="conditional"))
    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 0.0, 1.5]])
    labels = torch.tensor([2, 0, 2])
    cost = criterion.class_cost_matrix(logits, labels)
    assert cost.shape == (2, 3)
    for q in range(2):
        for t, c in enumerate(labels.tolist()):
            pos, neg = _focal_terms(float(logits[q, c]))
            assert cost[q, t].item() == pytest.approx(2.0 * (pos - neg), rel=1e-5)


def test_focal_loss_and_matching_follow_the_formula():
    cfg = DETRConfig(variant="conditional", aux_loss=False)
    criterion = FocalSetCriterion(3, cfg)
    g = torch.Generator().manual_seed(0)
    targets = [
        {"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
        {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    ]
    logits = torch.randn(1, 2, 4, 3, generator=g)
    boxes = torch.rand(1, 2, 4, 4, generator=g) * 0.5 + 0.25
    losses = criterion(logits, boxes, targets)
    assert set(losses) == {"focal", "l1", "giou"}
    indices = criterion.match(logits[0], boxes[0], targets)
    total = 0.0
    for i, (rows, cols) in enumerate(indices):
        positive = {(int(r), int(targets[i]["labels"][c])) for r, c in zip(rows, cols, strict=True)}
        for q in range(4):
            for c in range(3):
                x = float(logits[0, i, q, c])
                p = 1 / (1 + math.exp(-x))
                if (q, c) in positive:
                    total += 0.25 * (1 - p) ** 2 * -math.log(p)
                else:
                    total += 0.75 * p**2 * -math.log(1 - p)
    assert losses["focal"].item() == pytest.approx(2.0 * total / 3, rel=1e-5)  # weight 2, 3 boxes
    # the assignment minimises focal cost + 5 L1 - 2 GIoU, not DETR's softmax class cost
    for i, (rows, cols) in enumerate(indices):
        t = targets[i]
        xyxy = lambda b: box_convert(b, "cxcywh", "xyxy")  # noqa: E731
        cost = (
            criterion.class_cost_matrix(logits[0, i], t["labels"])
            + 5.0 * torch.cdist(boxes[0, i], t["boxes"], p=1)
            - 2.0 * generalized_box_iou(xyxy(boxes[0, i]), xyxy(t["boxes"]))
        )
        best = min(
            sum(float(cost[q, j]) for j, q in enumerate(perm)) for perm in itertools.permutations(range(4), len(cols))
        )
        assert float(cost[rows, cols].sum()) == pytest.approx(best, abs=1e-5)


def test_every_decoder_layer_gets_the_loss():
    model = _model()
    images, targets = _batch()
    losses = model(images, targets)
    assert set(losses) == {"focal", "l1", "giou", "aux"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["aux"].item() > 0


# ---------------------------------------------------------------- inference


def test_detections_are_the_top_k_of_all_query_class_scores():
    model = _model(detections_per_image=4)
    logits = torch.tensor([[[3.0, 2.0], [-1.0, 0.0], [1.0, -2.0]]])  # one image, 3 queries x 2 classes
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1], [0.8, 0.7, 0.2, 0.4]]])
    sizes = torch.tensor([[10.0, 20.0, 10.0, 20.0]])
    (det,) = model.detections(logits, boxes, sizes)
    scores = logits[0].sigmoid()
    ranked = sorted(((scores[q, c].item(), q, c) for q in range(3) for c in range(2)), reverse=True)[:4]
    assert det["scores"].tolist() == pytest.approx([s for s, _, _ in ranked])
    assert det["labels"].tolist() == [c for _, _, c in ranked] == [0, 1, 0, 1]  # query 0 twice
    assert torch.allclose(det["boxes"][0], torch.tensor([4.0, 8.0, 6.0, 12.0]))
    assert torch.equal(det["boxes"][0], det["boxes"][1])
    (everything,) = _model().detections(logits, boxes, sizes)  # at most 100: all 6 here
    assert len(everything["scores"]) == 6


def test_predict_returns_top_k_detections_in_image_pixels():
    """Boxes are not clipped (as in DETR): their centres lie in the original image."""
    method = create_method("detr", {**TINY, "variant": "conditional"}, source="test", key="k")
    torch.manual_seed(0)
    model = method.build(INFO).eval()
    images, targets = _batch()
    images = [images[0], torch.rand(3, 40, 24)]  # another size: resized in, boxes mapped back
    with torch.no_grad():
        out = method.predict(model, (images, targets))
    assert len(out) == 2
    for det, img in zip(out, images, strict=True):
        k = TINY["num_queries"] * INFO.num_classes  # 12 < detections_per_image (100)
        assert det["boxes"].shape == (k, 4) and det["scores"].shape == (k,) and det["labels"].shape == (k,)
        assert det["labels"].min() >= 0 and det["labels"].max() < INFO.num_classes
        assert torch.all(det["scores"][:-1] >= det["scores"][1:])
        h, w = img.shape[-2:]
        centres = (det["boxes"][:, :2] + det["boxes"][:, 2:]) / 2  # sigmoid outputs: inside the image
        assert torch.all(centres >= 0) and torch.all(centres <= torch.tensor([w, h]))
        assert torch.all(det["boxes"][:, 2:] > det["boxes"][:, :2])


def test_a_few_training_steps_lower_the_loss():
    method = create_method("detr", {**TINY, "variant": "conditional", "dropout": 0.0}, source="test", key="k")
    torch.manual_seed(0)
    model = method.build(INFO).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    batch = _batch()
    totals = []
    for _ in range(12):
        losses = method.training_step(model, batch)
        total = sum(losses.values())
        assert torch.isfinite(total)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(total.item())
    assert min(totals[-3:]) < 0.8 * totals[0], totals


def test_the_commented_params_row_is_one_uncomment_away_from_a_valid_run():
    """params.yaml offers the variant as a commented `detr_conditional` row: uncommented, it
    loads as a run of the conditional variant on plain DETR's trunk and input."""
    import yaml

    from components.training.spec import load_run_spec
    from tests.conftest import ROOT

    lines = (ROOT / "params.yaml").read_text().splitlines()
    start = lines.index("  # detr_conditional:")
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith("  #   "))
    lines[start:end] = ["  " + line[4:] for line in lines[start:end]]
    params = yaml.safe_load("\n".join(lines))
    spec = load_run_spec(params, "detr_conditional")
    method = spec.create_method()
    assert method.cfg.variant == "conditional" and (method.cfg.class_cost, method.cfg.ce_weight) == (2.0, 2.0)
    plain = load_run_spec(params, "detr").create_method().cfg
    assert (method.cfg.backbone, method.cfg.input) == (plain.backbone, plain.input)
    assert spec.training.epochs == load_run_spec(params, "detr").training.epochs
