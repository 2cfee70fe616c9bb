"""Where FCOS's locations sit in the image, and what follows from it.

FCOS (arXiv 1904.01355, Sec. 3.1) maps location (x, y) of a feature map of stride s to the image
point (floor(s/2) + x*s, floor(s/2) + y*s), near the centre of its receptive field; its regression
targets, centre sampling, centerness target and decoded boxes are all measured from that point.
CondInst (arXiv 2003.05664) measures its relative coordinates from the same points, so an
instance's coordinates vanish at its own location's mask-feature cell.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torchvision.models.detection.image_list import ImageList

from components.data.canonical import DatasetInfo
from components.methods import condinst, create_method
from tests.conftest import TINY_MODELS

INFO = DatasetInfo(
    name="grid", root=Path("."), classes=("a", "b", "c"), in_channels=3, image_size=(32, 32), checksum="", views={}
)


def _model_and_anchors(method_name: str, size: int, config: dict | None = None):
    """The model of a tiny ``method_name`` and the anchors its own generator gives a
    ``size`` x ``size`` input (one image), with the number of locations per level."""
    method = create_method(method_name, {**TINY_MODELS[method_name], **(config or {})}, source="t", key="k")
    model = method.build(INFO)
    strides = method.cfg.backbone.strides()
    assert strides == [8, 16, 32]
    images = ImageList(torch.zeros(1, 3, size, size), [(size, size)])
    features = [torch.zeros(1, 32, size // s, size // s) for s in strides]
    anchors = model.anchor_generator(images, features)
    return model, anchors, [f.shape[-2] * f.shape[-1] for f in features]


def _cell_centres(size: int, stride: int) -> list[tuple[float, float]]:
    """The paper's (s//2 + x*s, s//2 + y*s), row-major as the heads flatten their maps."""
    n = size // stride
    return [(stride // 2 + x * stride, stride // 2 + y * stride) for y in range(n) for x in range(n)]


def test_fcos_locations_are_the_cell_centres_of_each_stride():
    """A 32x32 input at strides 8, 16, 32: (4, 4), (12, 4), ... then (8, 8), (24, 8), ... then
    (16, 16), read back through inference's box decoding: zero distances to the four sides decode
    to the location itself."""
    model, anchors, _ = _model_and_anchors("fcos", 32)
    zero = model.head.box_coder.decode(torch.zeros_like(anchors[0]), anchors[0])
    expected = _cell_centres(32, 8) + _cell_centres(32, 16) + _cell_centres(32, 32)
    assert expected[:3] == [(4, 4), (12, 4), (20, 4)]
    assert zero[:, :2].tolist() == [list(p) for p in expected]
    assert zero[:, 2:].tolist() == [list(p) for p in expected]


def test_fcos_centerness_target_at_the_cell_centres():
    """Positive locations and their centerness targets sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b))
    for box (2, 6, 30, 22) in a 32x32 input, recovered from the gradient of the model's own
    centerness loss: BCE-with-logits has d/dz = sigmoid(z) - target, divided by the number of
    positives. Without centre sampling, the positives are the stride-8 cell centres strictly
    inside the box (no side farther than 64 px, P3's range): x in {4, 12, 20, 28}, y in {12, 20}."""
    model, anchors, num_per_level = _model_and_anchors("fcos", 32, {"center_sampling_radius": 0.0})
    x0, y0, x1, y1 = 2.0, 6.0, 30.0, 22.0
    targets = [{"boxes": torch.tensor([[x0, y0, x1, y1]]), "labels": torch.tensor([1])}]
    total = sum(num_per_level)
    logit = -30.0  # sigmoid(logit) ~ 1e-13: every positive's gradient is about -target / positives
    ctrness = torch.full((1, total, 1), logit, requires_grad=True)
    head_outputs = {
        "cls_logits": torch.zeros(1, total, len(INFO.classes)),
        "bbox_regression": torch.ones(1, total, 4),
        "bbox_ctrness": ctrness,
    }
    losses = model.compute_loss(targets, head_outputs, anchors, num_per_level)
    (grad,) = torch.autograd.grad(losses["bbox_ctrness"], ctrness)
    grad = grad[0, :, 0]
    positive = (grad < 0).nonzero().flatten().tolist()
    locations = _cell_centres(32, 8)
    expected = [(x, y) for x, y in locations if x0 < x < x1 and y0 < y < y1]
    assert [locations[i] for i in positive] == expected
    got = (torch.sigmoid(torch.tensor(logit)) - grad[positive] * len(positive)).tolist()
    want = []
    for x, y in expected:
        left, top, right, bottom = x - x0, y - y0, x1 - x, y1 - y
        want.append(math.sqrt(min(left, right) / max(left, right) * min(top, bottom) / max(top, bottom)))
    assert want[expected.index((12, 12))] == pytest.approx(math.sqrt(1 / 3))  # l, t, r, b = 10, 6, 18, 10
    assert got == pytest.approx(want, rel=1e-5)


def test_condinst_relative_coordinates_vanish_at_the_instances_own_mask_cell(monkeypatch):
    """For an instance detected at P3 location (x, y) (stride 8, the mask features' stride), the
    relative coordinates its dynamic head sees are 0 at mask-feature cell (x, y) and, divided by
    the size of interest S, (x - j) * 8 / S and (y - i) * 8 / S at cell (j, i)."""
    size, stride = 64, 8
    model, anchors, num_per_level = _model_and_anchors("condinst", size)
    n = size // stride
    assert num_per_level[0] == n * n
    centres, strides = model._locations(anchors[0][: n * n])  # the P3 locations, as training and inference take them
    scales = model._scale(strides)
    seen = {}

    def recording(params, features, rel_coords, shapes):
        seen["rel"] = rel_coords
        return torch.zeros(rel_coords.shape[0], *rel_coords.shape[-2:])

    monkeypatch.setattr(condinst, "dynamic_mask_logits", recording)
    k = n * n
    model.instance_masks(torch.zeros(k, 8, n, n), stride, torch.zeros(k, 169), centres, scales)
    rel = seen["rel"] * scales[:, None, None, None]  # back to pixels
    own_x, own_y = torch.arange(k) % n, torch.arange(k) // n
    assert rel[torch.arange(k), :, own_y, own_x].abs().max().item() == 0.0
    cols, rows = torch.arange(n), torch.arange(n)
    torch.testing.assert_close(
        rel[:, 0], ((own_x[:, None, None] - cols[None, None, :]) * stride).float().expand(-1, n, -1)
    )
    torch.testing.assert_close(
        rel[:, 1], ((own_y[:, None, None] - rows[None, :, None]) * stride).float().expand(-1, -1, n)
    )
