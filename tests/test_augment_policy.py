"""Augmentation policies: boxes and masks follow geometric ops, colour ops touch the image only,
each policy space samples as its paper says, and configs fail with the key named."""

from __future__ import annotations

import itertools
import math
import pickle

import numpy as np
import pytest
import torch
from scipy import stats
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from components.augment.ops import COLOUR_OPS, OPS, op_value
from components.augment.policy import (
    AugmentConfig,
    AugmentPolicy,
    OpSpec,
    PolicyDataset,
    ScheduleStep,
    build_policy,
    load_policy_file,
    policy_from_dict,
    save_policy_file,
    schedule_figure,
)
from components.config import ConfigError

H, W = 64, 100


def scene(boxes=((40, 10, 60, 30), (35, 36, 55, 60)), semantic: bool = False, seed: int = 0):
    """A random canvas with rectangular objects: box, label 1.., and a filled mask per object."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros((len(boxes), H, W), dtype=torch.uint8)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        masks[i, y1:y2, x1:x2] = 1
    target = {
        "boxes": tv_tensors.BoundingBoxes(
            torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), format="XYXY", canvas_size=(H, W)
        ),
        "labels": torch.arange(1, len(boxes) + 1, dtype=torch.int64),
        "image_id": 7,
        "masks": tv_tensors.Mask(masks),
    }
    if semantic:
        target["semantic"] = tv_tensors.Mask(torch.full((H, W), 3, dtype=torch.int64))
    return tv_tensors.Image(torch.rand((3, H, W), generator=g)), target


def sub_policy(*ops: tuple[str, float, float]) -> AugmentPolicy:
    return AugmentPolicy(AugmentConfig(kind="subpolicies", sub_policies=[[OpSpec(*o) for o in ops]]))


def count_ops(policy: AugmentPolicy, monkeypatch) -> list[tuple[str, float]]:
    """Record (op, magnitude) of every op the policy applies, without applying it."""
    calls: list[tuple[str, float]] = []

    def spy(sample, op, magnitude, sign=1.0):
        calls.append((op, magnitude))
        return sample

    monkeypatch.setattr(policy, "apply_op", spy)
    return calls


# --- geometric ops move boxes and masks ---------------------------------------------------------


@pytest.mark.parametrize(("op", "axis", "size"), [("translate_x", 0, W), ("translate_y", 1, H)])
def test_translate_moves_boxes_and_masks_by_op_value(op, axis, size):
    image, target = scene(boxes=((40, 22, 60, 42), (35, 24, 55, 40)))  # both stay inside at +-30%
    policy = sub_policy((op, 1.0, 1.0))
    shift = op_value(op, 1.0) * size
    signs = set()
    for seed in range(8):
        torch.manual_seed(seed)
        out_image, out = policy(image, target)
        delta = out["boxes"] - target["boxes"]
        moved, still = delta[:, [axis, axis + 2]], delta[:, [1 - axis, 3 - axis]]
        assert torch.allclose(moved.abs(), torch.full_like(moved, shift)) and (still == 0).all()
        assert len(set(moved.sign().flatten().tolist())) == 1  # every box the same way
        for k in range(2):
            before = target["masks"][k].nonzero().float().mean(0).flip(0)  # (x, y)
            after = out["masks"][k].nonzero().float().mean(0).flip(0)
            assert (after - before - delta[k, :2]).abs().max() <= 1.0
        assert out_image.shape == image.shape and out_image.dtype == torch.float32
        signs.add(float(moved[0, 0].sign()))
    assert signs == {1.0, -1.0}  # the sign is random


@pytest.mark.parametrize(
    ("op", "grows"),
    [
        ("shear_x", (0.3 * 20, 0.0)),  # a shear factor s widens a rectangle by s * its height
        ("shear_y", (0.0, 0.3 * 20)),
        ("rotate", (20 * (math.cos(math.pi / 6) + math.sin(math.pi / 6)) - 20,) * 2),
    ],
)
def test_shear_and_rotate_strength(op, grows):
    image, target = scene(boxes=((40, 22, 60, 42),))
    policy = AugmentPolicy(AugmentConfig(kind="trivialaugment"))
    for sign in (1.0, -1.0):
        _, out = policy.apply_op((image, target), op, 1.0, sign)
        (x1, y1, x2, y2), (a1, b1, a2, b2) = out["boxes"][0].tolist(), target["boxes"][0].tolist()
        assert abs((x2 - x1) - (a2 - a1) - grows[0]) < 1e-3 and abs((y2 - y1) - (b2 - b1) - grows[1]) < 1e-3
        # centred on the image centre (50, 32): the box centre moves only by the shear/rotation of its offset
        assert abs((x1 + x2) / 2 - 50) < 15 and abs((y1 + y2) / 2 - 32) < 15


@pytest.mark.parametrize("op", ["rotate", "shear_x", "shear_y"])
def test_rotate_and_shear_keep_mask_pixels_inside_their_boxes(op):
    image, target = scene()
    policy = AugmentPolicy(AugmentConfig(kind="trivialaugment"))
    for sign in (1.0, -1.0):
        _, out = policy.apply_op((image, target), op, 1.0, sign)
        assert len(out["boxes"]) == 2 and not torch.equal(out["boxes"], target["boxes"])
        for box, mask in zip(out["boxes"], out["masks"], strict=True):
            ys, xs = mask.nonzero(as_tuple=True)
            assert len(ys) > 0
            x1, y1, x2, y2 = box.tolist()
            # a pixel index i covers [i, i + 1); nearest sampling may stick out by under a pixel
            assert xs.min() >= x1 - 1 and xs.max() + 1 <= x2 + 1
            assert ys.min() >= y1 - 1 and ys.max() + 1 <= y2 + 1


def test_box_pushed_off_the_canvas_is_dropped_with_its_label_and_mask():
    image, target = scene(boxes=((40, 10, 60, 30), (85, 36, 98, 60)))
    policy = AugmentPolicy(AugmentConfig(kind="trivialaugment"))
    _, out = policy.apply_op((image, target), "translate_x", 1.0, 1.0)
    assert out["boxes"].tolist() == [[70.0, 10.0, 90.0, 30.0]]
    assert out["labels"].tolist() == [1]
    assert out["masks"].shape == (1, H, W) and isinstance(out["masks"], tv_tensors.Mask)
    assert torch.equal(out["masks"][0], F.affine(target["masks"][0:1], 0.0, [30.0, 0.0], 1.0, [0.0, 0.0])[0])
    assert out["image_id"] == 7
    _, out = policy.apply_op((image, out), "translate_x", 1.0, 1.0)  # the last one leaves: no error
    assert out["boxes"].shape == (0, 4) and out["labels"].shape == (0,) and out["masks"].shape == (0, H, W)


def test_semantic_mask_is_filled_with_ignore_index():
    image, target = scene(semantic=True)
    policy = AugmentPolicy(AugmentConfig(kind="trivialaugment"), mask_fill=255)
    _, out = policy.apply_op((image, target), "translate_x", 1.0, 1.0)
    semantic = out["semantic"]
    assert semantic.shape == (H, W) and semantic.dtype == torch.int64 and isinstance(semantic, tv_tensors.Mask)
    assert (semantic[:, :30] == 255).all() and (semantic[:, 30:] == 3).all()


# --- colour ops ---------------------------------------------------------------------------------


@pytest.mark.parametrize("op", COLOUR_OPS)
def test_colour_ops_change_the_image_only(op):
    image, target = scene()
    image[:, :4, :4] = 1.0  # some saturated pixels: solarize at magnitude 1 must change those too
    policy = AugmentPolicy(AugmentConfig(kind="trivialaugment"))
    out_image, out = policy.apply_op((image, target), op, 1.0, 1.0)
    for key in ("boxes", "labels", "masks"):
        assert torch.equal(out[key], target[key]) and type(out[key]) is type(target[key])
    assert isinstance(out_image, tv_tensors.Image) and out_image.dtype == image.dtype and out_image.shape == image.shape
    assert out_image.min() >= 0 and out_image.max() <= 1
    assert not torch.equal(out_image, image)


@pytest.mark.parametrize(
    ("op", "fn"),
    [
        ("brightness", F.adjust_brightness),
        ("contrast", F.adjust_contrast),
        ("color", F.adjust_saturation),
        ("sharpness", F.adjust_sharpness),
    ],
)
def test_enhance_ops_use_factor_one_plus_signed_value(op, fn):
    image, _ = scene()
    policy = AugmentPolicy(AugmentConfig(kind="trivialaugment"))
    for sign in (1.0, -1.0):
        expected = fn(image, 1.0 + sign * op_value(op, 0.6))
        assert torch.equal(policy.apply_op(image, op, 0.6, sign), expected)


def test_invert_solarize_posterize_values():
    image, _ = scene()
    image[:, 0, :10] = 1.0
    policy = AugmentPolicy(AugmentConfig(kind="trivialaugment"))
    assert torch.equal(policy.apply_op(image, "invert", 0.5), 1.0 - image)
    solarized = policy.apply_op(image, "solarize", 0.0)  # threshold 1.0: only pure white flips
    changed = solarized != image
    assert torch.equal(changed, image == 1.0) and changed.sum() == 30
    posterized = policy.apply_op(image, "posterize", 1.0)  # 4 bits
    assert all(len(posterized[c].unique()) <= 16 for c in range(3))
    assert torch.equal(policy.apply_op(image, "posterize", 0.0), image)  # 8 bits: unchanged


# --- the policy spaces --------------------------------------------------------------------------


def test_prob_zero_is_identity_and_prob_one_is_the_functional_op():
    image, target = scene()
    out_image, out = sub_policy(("rotate", 0.0, 1.0), ("invert", 0.0, 0.5))(image, target)
    assert torch.equal(out_image, image) and torch.equal(out["boxes"], target["boxes"])
    out_image = sub_policy(("posterize", 1.0, 1.0), ("solarize", 1.0, 0.5))(image)
    as_bytes = image.mul(255).round().to(torch.uint8)
    expected = F.solarize(F.posterize(as_bytes, 4).float() / 255, 0.5)
    assert torch.allclose(out_image, expected, atol=1e-6)
    rotated = sub_policy(("rotate", 1.0, 1.0))(image)
    kw = {
        "translate": [0.0, 0.0],
        "scale": 1.0,
        "shear": [0.0, 0.0],
        "interpolation": F.InterpolationMode.BILINEAR,
        "fill": 0,
    }
    assert any(torch.equal(rotated, F.affine(image, angle=a, **kw)) for a in (30.0, -30.0))


def test_subpolicies_pick_one_sub_policy_uniformly(monkeypatch):
    cfg = AugmentConfig(
        kind="subpolicies",
        sub_policies=[[OpSpec("invert", 1.0), OpSpec("rotate", 1.0, 0.2)], [OpSpec("equalize", 1.0)]],
    )
    policy = AugmentPolicy(cfg)
    calls = count_ops(policy, monkeypatch)
    torch.manual_seed(0)
    for _ in range(1000):
        policy(torch.rand(3, 8, 8))
    first = sum(op == "invert" for op, _ in calls)
    assert calls.count(("rotate", 0.2)) == first and abs(first - 500) < 60  # in order, all or nothing
    assert len(calls) == 2 * first + (1000 - first)


def test_randaugment_draws_n_ops(monkeypatch):
    image, target = scene()
    identity = build_policy(AugmentConfig(kind="randaugment", n=0))
    out_image, out = identity(image, target)
    assert torch.equal(out_image, image) and out is target
    policy = build_policy(AugmentConfig(kind="randaugment", n=2, m=0.4))
    calls = count_ops(policy, monkeypatch)
    for _ in range(20):
        before = len(calls)
        policy(image, target)
        assert len(calls) - before == 2
    assert {m for _, m in calls} == {0.4} and len({op for op, _ in calls}) > 5


def test_trivialaugment_magnitudes_are_uniform(monkeypatch):
    policy = build_policy(AugmentConfig(kind="trivialaugment"))
    calls = count_ops(policy, monkeypatch)
    torch.manual_seed(0)
    image = torch.rand(3, 8, 8)
    for _ in range(3000):
        policy(image)
    assert len(calls) == 3000
    mags = torch.tensor([m for _, m in calls])
    assert abs(mags.mean() - 0.5) < 0.03 and abs((mags < 0.25).float().mean() - 0.25) < 0.03
    assert mags.min() < 0.01 and mags.max() > 0.99
    counts = torch.tensor([sum(op == name for op, _ in calls) for name in OPS], dtype=torch.float)
    assert (abs(counts / 3000 - 1 / len(OPS)) < 0.03).all()


def pba_config() -> AugmentConfig:
    return AugmentConfig(
        kind="pba",
        schedule=[
            ScheduleStep(0.0, [OpSpec("rotate", 1.0, 0.1), OpSpec("invert", 1.0, 0.0), OpSpec("color", 1.0, 0.2)]),
            ScheduleStep(0.5, [OpSpec("shear_x", 1.0, 0.9)]),
            ScheduleStep(0.75, []),
        ],
    )


def test_pba_progress_selects_the_schedule_step(monkeypatch):
    policy = AugmentPolicy(pba_config())
    for fraction, step in ((0.0, 0), (0.4999, 0), (0.5, 1), (0.74, 1), (0.75, 2), (1.0, 2)):
        policy.set_progress(fraction)
        assert policy.step_index == step
    with pytest.raises(ValueError):
        policy.set_progress(1.5)
    dataset = PolicyDataset([(torch.rand(3, 8, 8), 0)] * 3, policy)
    dataset.set_epoch(4, 10)
    assert policy.progress == 0.4 and policy.step_index == 0
    dataset.set_epoch(5, 10)
    assert policy.step_index == 1
    dataset.set_epoch(0, 0)
    assert policy.step_index == 0
    calls = count_ops(policy, monkeypatch)
    dataset.set_epoch(5, 10)
    for _ in range(50):
        dataset[0]
    assert set(calls) == {("shear_x", 0.9)}


def test_pba_op_counts_follow_the_distribution(monkeypatch):
    policy = AugmentPolicy(pba_config())
    calls = count_ops(policy, monkeypatch)
    torch.manual_seed(1)
    image = torch.rand(3, 8, 8)
    histogram = [0, 0, 0]
    for _ in range(3000):
        before = len(calls)
        policy(image)
        drawn = calls[before:]
        assert len({op for op, _ in drawn}) == len(drawn)  # without replacement
        histogram[len(drawn)] += 1
    freq = torch.tensor(histogram, dtype=torch.float) / 3000
    assert (abs(freq - torch.tensor([0.2, 0.3, 0.5])) < 0.03).all()


def pba_algorithm_1(probs: list[float], op_counts: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Exact outcome of PBA's Algorithm 1 (arXiv 1905.05393) on ops with these probabilities:
    draw ``count`` from ``op_counts``, shuffle the ops, walk them applying each with its
    probability, stop once ``count`` are applied. Enumerates every count, order and coin outcome;
    returns P(number of applied ops = k) and P(op i is applied)."""
    n = len(probs)
    n_applied, per_op = np.zeros(len(op_counts)), np.zeros(n)
    orders = list(itertools.permutations(range(n)))
    for count, p_count in enumerate(op_counts):
        for order in orders:
            for coins in itertools.product((False, True), repeat=n):
                p = p_count / len(orders)
                for i, heads in zip(order, coins, strict=True):
                    p *= probs[i] if heads else 1.0 - probs[i]
                applied = [i for i, heads in zip(order, coins, strict=True) if heads][:count]
                n_applied[len(applied)] += p
                per_op[applied] += p
    return n_applied, per_op


@pytest.mark.parametrize(
    "specs",
    [
        [("rotate", 0.3, 0.1), ("invert", 0.3, 0.0), ("color", 0.3, 0.2), ("shear_x", 0.3, 0.9)],
        # an op listed twice (as in the paper's policy) is two entries with their own values
        [("rotate", 0.3, 0.1), ("rotate", 0.8, 0.7), ("color", 0.5, 0.2), ("invert", 0.1, 0.4)],
    ],
)
def test_pba_walks_the_shuffled_ops_until_count_are_applied(monkeypatch, specs):
    """An op whose coin fails does not use up one of the image's ``count`` ops (Algorithm 1)."""
    cfg = AugmentConfig(kind="pba", schedule=[ScheduleStep(0.0, [OpSpec(*s) for s in specs])])
    policy = AugmentPolicy(cfg)
    calls = count_ops(policy, monkeypatch)
    torch.manual_seed(0)
    image, draws = torch.rand(3, 8, 8), 4000
    histogram = np.zeros(len(cfg.pba_op_counts))
    for _ in range(draws):
        before = len(calls)
        policy(image)
        histogram[len(calls) - before] += 1
    expected, per_op = pba_algorithm_1([p for _, p, _ in specs], cfg.pba_op_counts)
    chi2 = ((histogram - draws * expected) ** 2 / (draws * expected)).sum()
    assert chi2 < stats.chi2.ppf(0.999, df=len(expected) - 1), (histogram / draws, expected)
    freq = np.array([calls.count((op, m)) for op, _, m in specs]) / draws
    sigma = np.sqrt(per_op * (1 - per_op) / draws)
    assert (abs(freq - per_op) < 4 * sigma).all(), (freq, per_op)
    assert len(calls) == sum(freq) * draws  # every applied op is one of the step's entries


def test_seeding_torch_reproduces_the_output():
    image, target = scene()
    policy = build_policy(AugmentConfig(kind="randaugment", n=3, m=0.8))
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append([policy(image, target) for _ in range(5)])
    for (a_img, a), (b_img, b) in zip(*runs, strict=True):
        assert torch.equal(a_img, b_img) and torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["masks"], b["masks"])
    assert not all(torch.equal(runs[0][0][0], r[0]) for r in runs[0][1:])  # but images differ


def test_policy_dataset_with_classification_and_scene_items():
    crops = [(torch.rand(3, 16, 16), i) for i in range(4)]
    scenes = [scene(seed=i) for i in range(4)]
    policy = build_policy(AugmentConfig(kind="trivialaugment"))
    torch.manual_seed(0)
    for base in (crops, scenes):
        dataset = PolicyDataset(base, policy)
        assert len(dataset) == 4
        for _ in range(5):
            for i in range(len(dataset)):
                image, target = dataset[i]
                assert image.dtype == torch.float32 and image.shape == base[i][0].shape
                assert image.min() >= 0.0 and image.max() <= 1.0
                if base is crops:
                    assert type(image) is torch.Tensor and target == i and type(target) is int
                else:
                    assert isinstance(image, tv_tensors.Image) and set(target) == set(base[i][1])
                    assert len(target["boxes"]) == len(target["labels"]) == len(target["masks"])


def test_policy_dataset_pickles_for_dataloader_workers():
    dataset = PolicyDataset([scene()], build_policy(AugmentConfig(kind="randaugment", n=2, m=0.7)))
    copy = pickle.loads(pickle.dumps(dataset))
    outputs = []
    for ds in (dataset, copy):
        torch.manual_seed(5)
        outputs.append(ds[0])
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1]["boxes"], outputs[1][1]["boxes"])


def test_policy_dataset_exposes_the_base_attributes():
    class Base(list):
        labels = [0, 1]

    dataset = PolicyDataset(Base([(torch.rand(3, 4, 4), 0)]), build_policy(AugmentConfig(kind="trivialaugment")))
    assert dataset.labels == [0, 1]
    with pytest.raises(AttributeError):
        dataset.no_such_attribute  # noqa: B018


# --- configuration ------------------------------------------------------------------------------


def test_policy_file_round_trip(tmp_path):
    sub = AugmentConfig(kind="subpolicies", sub_policies=[[OpSpec("rotate", 0.4, 0.7), OpSpec("equalize", 1.0)]])
    for cfg in (pba_config(), sub, AugmentConfig(kind="randaugment", n=1, m=0.9)):
        save_policy_file(cfg, tmp_path / "policy.yaml")
        assert load_policy_file(tmp_path / "policy.yaml") == cfg


@pytest.mark.parametrize(
    ("data", "key", "words"),
    [
        (
            {"kind": "subpolicies", "sub_policies": [[{"op": "rotate"}, {"op": "rotat"}]]},
            "training.augment.sub_policies[0][1].op",
            ["rotat", "shear_x", "equalize"],
        ),
        ({"kind": "subpolicies", "sub_policies": [[{"op": "rotate", "prob": 1.5}]]}, "sub_policies[0][0].prob", []),
        ({"kind": "subpolicies", "sub_policies": [[]]}, "training.augment.sub_policies", []),
        ({"kind": "pba", "schedule": [{"from_fraction": 0.1, "ops": []}]}, "schedule[0].from_fraction", ["0"]),
        (
            {"kind": "pba", "schedule": [{"from_fraction": 0.0}, {"from_fraction": 0.0}]},
            "schedule[1].from_fraction",
            [],
        ),
        ({"kind": "pba", "schedule": [{"from_fraction": 0.0, "ops": [{"op": "x"}]}]}, "schedule[0].ops[0].op", []),
        ({"kind": "pba"}, "training.augment.schedule", []),
        ({"kind": "randaugment", "m": 2.0}, "training.augment.m", []),
        ({"kind": "randaugment", "n": -1}, "training.augment.n", []),
        ({"kind": "pba_op_counts", "n": 1}, "training.augment.kind", []),
        ({"pba_op_counts": [0.5, 0.6]}, "training.augment.pba_op_counts", []),
        ({"kind": "none", "strength": 1}, "training.augment.strength", []),
    ],
)
def test_config_errors_name_the_key(data, key, words):
    with pytest.raises(ConfigError) as err:
        policy_from_dict(data, source="params.yaml")
    assert err.value.key.endswith(key) and err.value.source == "params.yaml"
    assert f"params.yaml: {err.value.key}" in str(err.value) and all(w in str(err.value) for w in words)


def test_config_ignores_fields_of_other_kinds_and_python_configs_are_checked():
    cfg = policy_from_dict({"kind": "randaugment", "sub_policies": [[{"op": "invert"}]], "schedule": []})
    assert cfg.kind == "randaugment" and build_policy(AugmentConfig()) is None
    with pytest.raises(ValueError, match=r"sub_policies\[0\]\[0\]\.op"):
        AugmentPolicy(AugmentConfig(kind="subpolicies", sub_policies=[[OpSpec("blur")]]))


def test_load_policy_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_policy_file(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: [subpolicies\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_policy_file(broken)
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: subpolicies\nsub_policies:\n  - - op: rotate\n      prob: 2\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_policy_file(bad)
    assert err.value.source == str(bad) and err.value.key == "sub_policies[0][0].prob"


# --- figures ------------------------------------------------------------------------------------


def test_schedule_figure_for_every_kind(tmp_path):
    configs = [
        AugmentConfig(),
        AugmentConfig(kind="randaugment"),
        AugmentConfig(kind="trivialaugment"),
        AugmentConfig(
            kind="subpolicies", sub_policies=[[OpSpec("rotate", 0.4, 0.7), OpSpec("invert")], [OpSpec("color")]]
        ),
        pba_config(),
    ]
    for cfg in configs:
        path = tmp_path / f"{cfg.kind}.png"
        schedule_figure(cfg, path)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
