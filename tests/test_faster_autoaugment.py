"""Faster AutoAugment (arXiv 1911.06987): the differentiable policy, its critic and the search."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from components.augment.ops import GEOMETRIC_OPS, OPS, SIGNED_OPS, op_value
from components.config import ConfigError, from_dict
from components.search.faster_autoaugment import (
    Critic,
    DifferentiablePolicy,
    FasterAAConfig,
    _adam,
    apply_op,
    critic_step,
    policy_step,
    search_policy,
)


def _pinned(ops: list[str], op: str, prob: float, magnitude: float = 0.5, temperature: float = 1e-3):
    """A one-stage, one-sub-policy policy whose weights choose ``op`` with certainty."""
    policy = DifferentiablePolicy(ops, 1, 1, temperature)
    with torch.no_grad():
        policy.op_weights.fill_(-1e3)
        policy.op_weights[..., ops.index(op)] = 1e3
        policy.probs.fill_(prob)
        policy.magnitudes.fill_(magnitude)
    return policy


def _upright(n: int, size: int = 16) -> torch.Tensor:
    """Upright bright 'L' strokes on a dark noisy background, like the digits: inverted (a light
    background), they are obviously not from the data."""
    x = torch.rand(n, 3, size, size) * 0.2
    x[:, :, 3:-3, 4:6] = 0.8 + 0.2 * torch.rand(n, 3, size - 6, 2)
    x[:, :, -5:-3, 4:-4] = 0.8 + 0.2 * torch.rand(n, 3, 2, size - 8)
    return x


def _torchvision_op(op: str, image: torch.Tensor, v: float) -> torch.Tensor:
    """``op`` at signed value ``v`` with torchvision's kernels, as the sampled policy applies it."""

    def on_bytes(fn):
        return fn(image.mul(255).round().to(torch.uint8)).float() / 255

    if op in GEOMETRIC_OPS:
        h, w = image.shape[-2:]
        shear = math.degrees(math.atan(v))
        return TF.affine(
            image,
            angle=v if op == "rotate" else 0.0,
            translate=[v * w if op == "translate_x" else 0.0, v * h if op == "translate_y" else 0.0],
            scale=1.0,
            shear=[shear if op == "shear_x" else 0.0, shear if op == "shear_y" else 0.0],
            interpolation=InterpolationMode.BILINEAR,
            fill=0,
        )
    if op == "posterize":
        return image if v >= 8 else on_bytes(lambda b: TF.posterize(b, int(math.floor(v))))
    return {
        "identity": lambda: image,
        "brightness": lambda: TF.adjust_brightness(image, 1 + v),
        "contrast": lambda: TF.adjust_contrast(image, 1 + v),
        "color": lambda: TF.adjust_saturation(image, 1 + v),
        "sharpness": lambda: TF.adjust_sharpness(image, 1 + v),
        "solarize": lambda: TF.solarize(image, v),
        "autocontrast": lambda: TF.autocontrast(image),
        "equalize": lambda: on_bytes(TF.equalize),
        "invert": lambda: TF.invert(image),
    }[op]()


@pytest.mark.parametrize("op", OPS)
def test_differentiable_ops_mean_what_the_ops_table_says(op):
    torch.manual_seed(0)
    # smooth content, so bilinear sampling is compared on more than noise; H != W
    image = torch.nn.functional.interpolate(torch.rand(1, 3, 7, 6), size=(28, 24), mode="bilinear")
    for magnitude in (0.0, 0.35, 1.0):
        for sign in (1.0, -1.0):
            ours = apply_op(op, image, torch.tensor([magnitude]), torch.tensor([sign]))
            v = op_value(op, magnitude) * (sign if op in SIGNED_OPS else 1.0)
            theirs = _torchvision_op(op, image, v)
            if op in GEOMETRIC_OPS:  # torchvision darkens pixels next to the fill twice: compare the rest
                inside = _torchvision_op(op, torch.ones_like(image), v) > 1 - 1e-6
                assert inside.float().mean() > 0.4
                ours, theirs = ours[inside], theirs[inside]
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0, msg=f"{op} at {magnitude}, sign {sign}")


def test_gradients_reach_every_learnable_part():
    torch.manual_seed(0)
    ops = ["identity", "rotate", "posterize", "contrast"]  # no-magnitude, geometric, straight-through, blend
    policy = DifferentiablePolicy(ops, 1, 2, temperature=0.5)
    critic = Critic(2, [8, 16])
    x, y = torch.rand(64, 3, 12, 12), torch.randint(0, 2, (64,))
    policy_step(policy, torch.optim.SGD(policy.parameters(), lr=0.0), critic, policy(x), y, x[:8], 0.1)
    for name in ("op_weights", "probs", "magnitudes"):
        grad = getattr(policy, name).grad
        assert grad is not None, name
        for stage in range(2):
            for k, op in enumerate(ops):
                if name == "probs" and op == "identity":
                    continue  # b * x + (1 - b) * x does not depend on b: a zero gradient is right
                assert grad[0, stage, k] != 0, f"{name}: stage {stage} op {op} got no gradient"
    # The critic is not trained by the policy step.
    assert all(p.grad is None for p in critic.parameters())


def test_pinned_policy_equals_the_hard_op():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 10, 10)
    assert torch.equal(_pinned(list(OPS), "invert", prob=1.0)(x), 1 - x)
    # probability 0: the image is untouched, whatever the op
    torch.testing.assert_close(_pinned(["invert", "rotate"], "invert", prob=0.0)(x), x, atol=1e-6, rtol=0)

    # translate_x at magnitude 1 moves a single bright pixel by op_value * W, to either side
    width, row, col = 20, 7, 10
    dot = torch.zeros(16, 3, width, width)
    dot[:, :, row, col] = 1.0
    with torch.no_grad():
        out = _pinned(list(OPS), "translate_x", prob=1.0, magnitude=1.0)(dot)
    shift = op_value("translate_x", 1.0) * width
    assert shift == pytest.approx(6.0)
    columns = set()
    for image in out:
        flat = int(image[0].argmax())
        r, c = divmod(flat, width)
        assert r == row and image[:, r, c].min() > 0.99 and image.sum() == pytest.approx(3.0, abs=1e-3)
        assert abs(c - col) == round(shift)
        columns.add(c)
    assert columns == {col - 6, col + 6}, "the sign is drawn per image"


def test_probabilities_and_magnitudes_stay_in_unit_interval():
    torch.manual_seed(0)
    policy = DifferentiablePolicy(["rotate", "solarize", "brightness"], 2, 2, temperature=0.5)
    critic = Critic(2, [8, 16])
    opt = _adam(policy.parameters(), lr=0.8)  # steps far larger than the interval
    x, y = torch.rand(32, 3, 12, 12), torch.randint(0, 2, (32,))
    for _ in range(4):
        policy_step(policy, opt, critic, policy(x), y, x, 0.1)
    for tensor in (policy.probs, policy.magnitudes):
        assert tensor.min() >= 0 and tensor.max() <= 1
    both = torch.cat([policy.probs.flatten(), policy.magnitudes.flatten()])
    assert ((both == 0) | (both == 1)).any(), "the steps never reached a bound: the clamp was not exercised"
    policy_dict = policy.to_policy()
    for sub in policy_dict["sub_policies"]:
        for stage in sub:
            assert 0 <= stage["prob"] <= 1 and 0 <= stage["magnitude"] <= 1


def test_short_search_returns_a_valid_deterministic_policy():
    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(64, 3, 16, 16, generator=g), torch.randint(0, 3, (64,), generator=g)
    cfg = FasterAAConfig(num_sub_policies=4, epochs=2, batch_size=32, critic_widths=[8, 16], seed=3)
    logged = []
    torch.manual_seed(123)
    result = search_policy(images, labels, 3, cfg, log=lambda epoch, m: logged.append((epoch, m)))
    after = torch.rand(1)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(1)), "the caller's RNG state must be left alone"

    assert result.policy["kind"] == "subpolicies"
    subs = result.policy["sub_policies"]
    assert len(subs) == 4 and all(len(sub) == 2 for sub in subs)
    for sub in subs:
        for stage in sub:
            assert set(stage) == {"op", "prob", "magnitude"} and stage["op"] in OPS
            assert 0 <= stage["prob"] <= 1 and 0 <= stage["magnitude"] <= 1
    assert len(result.history) == 2 and [e for e, _ in logged] == [0, 1]
    for row in result.history:
        assert {"wasserstein", "critic_loss", "policy_loss", "classification_loss", "seconds"} <= set(row)
        assert all(math.isfinite(v) for v in row.values())
    assert len(result.op_weights) == 4 and all(len(sub) == 2 for sub in result.op_weights)
    for stage in (s for sub in result.op_weights for s in sub):
        assert list(stage) == list(OPS) and sum(stage.values()) == pytest.approx(1.0, abs=1e-5)

    again = search_policy(images, labels, 3, cfg)
    assert again.policy == result.policy and again.op_weights == result.op_weights
    other = search_policy(images, labels, 3, FasterAAConfig(**{**cfg.__dict__, "seed": 4}))
    assert other.op_weights != result.op_weights


def _trained_critic_distance(policy: DifferentiablePolicy, steps: int = 40) -> tuple[Critic, float]:
    torch.manual_seed(1)
    critic = Critic(2, [8, 16])
    opt = _adam(critic.parameters(), lr=3e-3)
    estimates = []
    for _ in range(steps):
        real, source = _upright(32), _upright(32)
        y = torch.zeros(32, dtype=torch.long)
        with torch.no_grad():
            fake = policy(source)
        estimates.append(critic_step(critic, opt, real, y, fake, gp_weight=10.0)["wasserstein"])
    return critic, sum(estimates[-10:]) / 10


def test_critic_separates_a_distribution_moving_op_from_identity():
    ops = ["identity", "invert"]
    _, w_identity = _trained_critic_distance(_pinned(ops, "identity", prob=1.0))
    critic, w_invert = _trained_critic_distance(_pinned(ops, "invert", prob=1.0))
    assert w_invert > 5.0 and w_invert > w_identity + 5.0, (w_invert, w_identity)
    assert abs(w_identity) < 0.5, w_identity

    # ... and its gradient tells the policy to apply invert less often.
    policy = _pinned(ops, "invert", prob=0.5, temperature=0.5)
    torch.manual_seed(2)
    source = _upright(64)
    policy_step(
        policy,
        torch.optim.SGD(policy.parameters(), lr=0.0),
        critic,
        policy(source),
        torch.zeros(64, dtype=torch.long),
        _upright(64),
        0.1,
    )
    assert policy.probs.grad[0, 0, ops.index("invert")] > 0


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"ops": ["rotate", "flip_sideways"]}, "ops"),
        ({"ops_per_sub_policy": 0}, "ops_per_sub_policy"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
    ],
)
def test_config_validation_names_the_field(changes, field):
    with pytest.raises(ValueError, match=field) as info:
        FasterAAConfig(**changes).validate()
    if field == "ops":
        assert "translate_x" in str(info.value), "the error lists the known ops"
    with pytest.raises(ConfigError, match=field):
        from_dict(FasterAAConfig, changes, source="params.yaml", key="search.faster_autoaugment")
    with pytest.raises(ValueError, match=field):
        search_policy(torch.rand(4, 3, 8, 8), torch.zeros(4, dtype=torch.long), 1, FasterAAConfig(**changes))
