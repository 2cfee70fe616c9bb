"""Sampled augmentation policies over the ops of ``components.augment.ops``.

Four policy spaces, each following its paper:

- sub-policies (AutoAugment, arXiv 1805.09501): one sub-policy per image, its ops in order, each
  with its own probability and magnitude;
- RandAugment (arXiv 1909.13719): ``n`` ops drawn with replacement, all at one magnitude ``m``;
- TrivialAugment (arXiv 2103.10158): one op at a magnitude drawn uniformly from [0, 1];
- PBA (arXiv 1905.05393): a schedule of per-op (probability, magnitude) over training; per image
  a count of 0, 1 or 2, then the ops in a random order, each applied with its probability, until
  ``count`` have been applied (the paper's Algorithm 1). An op may be listed twice in a step, as
  in the paper's policy, each entry with its own values.

A magnitude in [0, 1] means what ``ops.op_value`` says, so a policy found by the differentiable
searcher is applied with the same strength here. Geometric ops move boxes and masks with the
image (boxes that leave the canvas are dropped with their labels and masks); colour ops change
the image only. All randomness comes from torch's global RNG: seeding torch (as DataLoader does
for its workers) makes a run reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import InterpolationMode, Transform
from torchvision.transforms.v2 import functional as F

from components.augment.ops import GEOMETRIC_OPS, OPS, SIGNED_OPS, op_value
from components.config import ConfigError, from_dict, load_yaml, to_dict


class _FieldError(ValueError):
    """A ``validate()`` error that knows which field (dotted path) is wrong, so that
    ``policy_from_dict`` can name the full key, e.g. ``training.augment.sub_policies[0][1].op``."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


def _unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise _FieldError(name, f"must be in [0, 1], got {value}")


def _nested(prefix: str, check: Any) -> None:
    try:
        check()
    except _FieldError as exc:
        raise _FieldError(f"{prefix}.{exc.field}", exc.reason) from None


@dataclass
class OpSpec:
    """One operation of a policy: applied with probability ``prob`` at ``magnitude`` in [0, 1]."""

    op: str
    prob: float = 1.0
    magnitude: float = 0.5

    def validate(self) -> None:
        if self.op not in OPS:
            raise _FieldError("op", f"unknown augmentation op {self.op!r} (known: {', '.join(OPS)})")
        _unit("prob", self.prob)
        _unit("magnitude", self.magnitude)


@dataclass
class ScheduleStep:
    """PBA: from ``from_fraction`` of training on, these ops with their (prob, magnitude)."""

    from_fraction: float
    ops: list[OpSpec] = field(default_factory=list)

    def validate(self) -> None:
        if not 0.0 <= self.from_fraction < 1.0:
            raise _FieldError("from_fraction", f"must be in [0, 1), got {self.from_fraction}")
        for i, spec in enumerate(self.ops):
            _nested(f"ops[{i}]", spec.validate)


@dataclass
class AugmentConfig:
    """``training.augment`` in params.yaml, and the content of a policy file. Fields that do not
    belong to ``kind`` are ignored (a searched policy can be switched off by ``kind: none``)."""

    kind: Literal["none", "randaugment", "trivialaugment", "subpolicies", "pba"] = "none"
    n: int = 2  # randaugment: ops per image
    m: float = 0.3  # randaugment: shared magnitude (torchvision's default M=9 of 31 bins)
    sub_policies: list[list[OpSpec]] = field(default_factory=list)
    schedule: list[ScheduleStep] = field(default_factory=list)
    pba_op_counts: list[float] = field(default_factory=lambda: [0.2, 0.3, 0.5])  # P(0, 1, 2 ops), PBA paper

    def validate(self) -> None:
        if self.n < 0:
            raise _FieldError("n", f"must be >= 0, got {self.n}")
        _unit("m", self.m)
        if not self.pba_op_counts or any(p < 0 for p in self.pba_op_counts):
            raise _FieldError("pba_op_counts", f"must be non-negative probabilities, got {self.pba_op_counts}")
        if abs(sum(self.pba_op_counts) - 1.0) > 1e-6:
            raise _FieldError("pba_op_counts", f"must sum to 1, got {sum(self.pba_op_counts)}")
        # Nested items are validated by from_dict already; this covers configs built in Python.
        for i, sub in enumerate(self.sub_policies):
            for j, spec in enumerate(sub):
                _nested(f"sub_policies[{i}][{j}]", spec.validate)
        for i, step in enumerate(self.schedule):
            _nested(f"schedule[{i}]", step.validate)
        if self.kind == "subpolicies" and not any(self.sub_policies):
            raise _FieldError("sub_policies", "kind 'subpolicies' needs at least one non-empty sub-policy")
        if self.kind == "pba":
            if not self.schedule:
                raise _FieldError("schedule", "kind 'pba' needs a schedule")
            if self.schedule[0].from_fraction != 0.0:
                raise _FieldError("schedule[0].from_fraction", "the first step must start at 0")
            for i in range(1, len(self.schedule)):
                if self.schedule[i].from_fraction <= self.schedule[i - 1].from_fraction:
                    raise _FieldError(f"schedule[{i}].from_fraction", "must be greater than the previous step's")


def policy_to_dict(cfg: AugmentConfig) -> dict[str, Any]:
    return to_dict(cfg)


def policy_from_dict(d: Any, source: str = "<dict>", key: str = "training.augment") -> AugmentConfig:
    """Validated config; a ConfigError names ``source`` and the full dotted key of the bad field."""
    try:
        return from_dict(AugmentConfig, d, source=source, key=key)
    except ConfigError as exc:
        inner = exc.__context__  # from_dict raises "from None", but keeps the validate() error here
        if not isinstance(inner, _FieldError):
            raise
        base = "" if not key and exc.key == AugmentConfig.__name__ else exc.key
        raise ConfigError(source, f"{base}.{inner.field}" if base else inner.field, inner.reason) from None


def load_policy_file(path: str | Path) -> AugmentConfig:
    return policy_from_dict(load_yaml(path), source=str(path), key="")


def save_policy_file(cfg: AugmentConfig, path: str | Path) -> None:
    cfg.validate()
    Path(path).write_text(yaml.safe_dump(policy_to_dict(cfg), sort_keys=False), encoding="utf-8")


def _as_float_image(image: torch.Tensor, fn: Any) -> torch.Tensor:
    """Run a uint8-only kernel (posterize, equalize) on a float image, as PIL would on its bytes."""
    as_bytes = image.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
    return fn(as_bytes).to(image.dtype).div_(255.0)


# PIL's ImageEnhance family: factor 1 is the identity, "color" is saturation.
_ENHANCE = {
    "brightness": F.adjust_brightness,
    "contrast": F.adjust_contrast,
    "color": F.adjust_saturation,
    "sharpness": F.adjust_sharpness,
}


def _colour(image: torch.Tensor, op: str, v: float) -> torch.Tensor:
    floating = image.is_floating_point()
    if op == "identity":
        return image
    if op in _ENHANCE:
        return _ENHANCE[op](image, 1.0 + v)
    if op == "posterize":
        bits = int(math.floor(v))
        if bits >= 8:  # nothing to drop; skip the uint8 round trip, which would quantise the image
            return image
        return _as_float_image(image, lambda x: F.posterize(x, bits)) if floating else F.posterize(image, bits)
    if op == "solarize":
        return F.solarize(image, v if floating else v * 255.0)
    if op == "autocontrast":
        return F.autocontrast(image)
    if op == "equalize":
        return _as_float_image(image, F.equalize) if floating else F.equalize(image)
    if op == "invert":
        return F.invert(image)
    raise KeyError(op)


def _affine_args(op: str, v: float, height: int, width: int) -> dict[str, Any]:
    shear = math.degrees(math.atan(v))  # ops gives a shear factor; affine wants degrees
    return {
        "angle": v if op == "rotate" else 0.0,
        "translate": [v * width if op == "translate_x" else 0.0, v * height if op == "translate_y" else 0.0],
        "scale": 1.0,
        "shear": [shear if op == "shear_x" else 0.0, shear if op == "shear_y" else 0.0],
    }


def _drop_degenerate(node: Any, min_size: float = 2.0) -> Any:
    """Clamp boxes to the canvas and drop those narrower than ``min_size`` together with the
    per-object entries beside them (labels, instance masks: first dimension = number of boxes).
    Done by hand rather than with SanitizeBoundingBoxes, which would also index an H x W semantic
    mask whose height happens to equal the number of boxes."""
    if isinstance(node, tv_tensors.BoundingBoxes):
        return _drop_degenerate({"boxes": node}, min_size)["boxes"]
    if isinstance(node, (list, tuple)) and type(node) in (list, tuple):
        return type(node)(_drop_degenerate(v, min_size) for v in node)
    if not isinstance(node, dict):
        return node
    boxes = next((v for v in node.values() if isinstance(v, tv_tensors.BoundingBoxes)), None)
    if boxes is None:
        return {k: _drop_degenerate(v, min_size) for k, v in node.items()}
    xyxy = F.convert_bounding_box_format(F.clamp_bounding_boxes(boxes), new_format=tv_tensors.BoundingBoxFormat.XYXY)
    keep = (xyxy[:, 2:] - xyxy[:, :2] >= min_size).all(dim=1)
    n, out = len(boxes), {}
    for k, v in node.items():
        if isinstance(v, tv_tensors.BoundingBoxes):
            out[k] = tv_tensors.wrap(F.clamp_bounding_boxes(v)[keep], like=v)
        elif isinstance(v, tv_tensors.Mask) and v.ndim == 3 and v.shape[0] == n:
            out[k] = tv_tensors.wrap(v[keep], like=v)
        elif type(v) is torch.Tensor and v.ndim == 1 and v.shape[0] == n:  # labels, iscrowd, area
            out[k] = v[keep]
        else:
            out[k] = v
    return out


def _coin(prob: float) -> bool:
    """True with probability ``prob``; a certain outcome draws no random number."""
    return prob >= 1.0 or float(torch.rand(())) < prob


class AugmentPolicy(Transform):
    """The policy of ``cfg`` as a v2 transform: ``policy(image)``, ``policy(image, target)`` or
    ``policy((image, label))``. The image is the ``tv_tensors.Image`` of the sample, else its first
    plain tensor (v2's rule); masks are filled with ``mask_fill`` where an affine has no pixels."""

    def __init__(self, cfg: AugmentConfig, mask_fill: int = 0) -> None:
        super().__init__()
        cfg.validate()
        self.cfg, self.mask_fill = cfg, mask_fill
        self.progress, self.step_index = 0.0, 0
        self._op_counts = torch.tensor(cfg.pba_op_counts, dtype=torch.float64)

    def set_progress(self, fraction: float) -> None:
        """PBA: the fraction of training done, in [0, 1], selects the schedule step."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"training progress must be in [0, 1], got {fraction}")
        self.progress = float(fraction)
        starts = [s.from_fraction for s in self.cfg.schedule]
        self.step_index = max((i for i, f in enumerate(starts) if f <= fraction), default=0)

    def _draw(self) -> list[tuple[str, float, float]]:
        """(op, prob, magnitude) for this image, in the order they apply."""
        cfg = self.cfg
        if cfg.kind == "randaugment":
            return [(OPS[int(torch.randint(len(OPS), ()))], 1.0, cfg.m) for _ in range(cfg.n)]
        if cfg.kind == "trivialaugment":
            return [(OPS[int(torch.randint(len(OPS), ()))], 1.0, float(torch.rand(())))]
        if cfg.kind == "subpolicies":
            sub = cfg.sub_policies[int(torch.randint(len(cfg.sub_policies), ()))]
            return [(s.op, s.prob, s.magnitude) for s in sub]
        if cfg.kind == "pba":
            # PBA's Algorithm 1: walk the step's ops in a random order, apply each with its
            # probability, and stop once ``count`` ops have been applied; an op whose coin fails
            # does not use up one of the ``count``. The coins are thrown here, so the chosen
            # ops come back with probability 1.
            ops = cfg.schedule[self.step_index].ops
            count = int(torch.multinomial(self._op_counts, 1))
            chosen: list[tuple[str, float, float]] = []
            for i in torch.randperm(len(ops)).tolist():
                if len(chosen) == count:
                    break
                if _coin(ops[i].prob):
                    chosen.append((ops[i].op, 1.0, ops[i].magnitude))
            return chosen
        return []

    def forward(self, *inputs: Any) -> Any:
        sample = inputs if len(inputs) > 1 else inputs[0]
        for op, prob, magnitude in self._draw():
            if not _coin(prob):
                continue
            sign = -1.0 if op in SIGNED_OPS and float(torch.rand(())) < 0.5 else 1.0
            sample = self.apply_op(sample, op, magnitude, sign)
        return sample

    def apply_op(self, sample: Any, op: str, magnitude: float, sign: float = 1.0) -> Any:
        """``op`` at ``magnitude`` (times ``sign`` for signed ops) on one sample, deterministically."""
        v = op_value(op, magnitude) * (sign if op in SIGNED_OPS else 1.0)
        flat, spec = tree_flatten(sample)
        needs = self._needs_transform_list(flat)
        images = [i for i, x in enumerate(flat) if needs[i] and type(x) in (torch.Tensor, tv_tensors.Image)]
        if not images:
            raise TypeError("no image (tv_tensors.Image or plain tensor) in the sample")
        image = flat[images[0]]
        if op not in GEOMETRIC_OPS:
            out = _colour(image.as_subclass(torch.Tensor), op, v)
            flat[images[0]] = tv_tensors.wrap(out, like=image) if isinstance(image, tv_tensors.Image) else out
            return tree_unflatten(flat, spec)
        args = _affine_args(op, v, *image.shape[-2:])
        for i, x in enumerate(flat):
            if not needs[i] or not isinstance(x, torch.Tensor):
                continue
            fill = self.mask_fill if isinstance(x, tv_tensors.Mask) else 0
            flat[i] = F.affine(x, **args, interpolation=InterpolationMode.BILINEAR, fill=fill)
        sample = tree_unflatten(flat, spec)
        if any(isinstance(x, tv_tensors.BoundingBoxes) for x in flat):
            sample = _drop_degenerate(sample)
        return sample


def build_policy(cfg: AugmentConfig, mask_fill: int = 0) -> AugmentPolicy | None:
    return None if cfg.kind == "none" else AugmentPolicy(cfg, mask_fill=mask_fill)


class PolicyDataset(Dataset):
    """Wraps a dataset whose items are (image, target) and applies the policy to each item.
    Other attributes (``labels`` for per-class batch samplers, ...) are the base dataset's."""

    def __init__(self, base: Dataset, policy: AugmentPolicy) -> None:
        self.base, self.policy = base, policy

    def set_epoch(self, epoch: int, epochs: int) -> None:
        # DataLoader workers copy the dataset when an epoch's iterator starts, so this reaches them
        # unless the loader keeps persistent workers.
        self.policy.set_progress(min(1.0, epoch / max(epochs, 1)))

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        image, target = self.base[i]
        return tuple(self.policy(image, target))

    def __getattr__(self, name: str) -> Any:
        if name in ("base", "policy") or name.startswith("__"):  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.base, name)


def schedule_figure(cfg: AugmentConfig, path: str | Path) -> None:
    """PNG of the policy: PBA's per-op probability and magnitude over training (step plots), a
    table of AutoAugment sub-policies, or a line describing the other kinds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if cfg.kind == "pba":
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharex=True)
        starts = [s.from_fraction for s in cfg.schedule] + [1.0]
        names: list[tuple[str, int]] = []  # (op, occurrence): an op may appear twice in a step
        for step in cfg.schedule:
            for j, spec in enumerate(step.ops):
                key = (spec.op, sum(s.op == spec.op for s in step.ops[:j]))
                if key not in names:
                    names.append(key)
        colours = plt.get_cmap("tab20")
        for c, (op, occ) in enumerate(names):
            probs, mags = [], []
            for step in cfg.schedule:
                same = [s for s in step.ops if s.op == op]
                probs.append(same[occ].prob if occ < len(same) else 0.0)
                mags.append(same[occ].magnitude if occ < len(same) else float("nan"))
            label = op if occ == 0 else f"{op} #{occ + 1}"
            for ax, ys in ((axes[0], probs), (axes[1], mags)):
                ax.step(starts, [*ys, ys[-1]], where="post", color=colours(c % 20), label=label)
        for ax, title in ((axes[0], "probability"), (axes[1], "magnitude")):
            ax.set(xlabel="fraction of training", title=title, xlim=(0, 1), ylim=(-0.05, 1.05))
            ax.grid(alpha=0.3)
        if names:
            axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    elif cfg.kind == "subpolicies":
        width = max((len(sub) for sub in cfg.sub_policies), default=1)
        rows = [
            [str(i)] + [f"{s.op}  p={s.prob:.2f} m={s.magnitude:.2f}" for s in sub] + [""] * (width - len(sub))
            for i, sub in enumerate(cfg.sub_policies)
        ]
        fig, ax = plt.subplots(figsize=(2 + 3 * width, 0.6 + 0.28 * len(rows)))
        ax.axis("off")
        labels = ["#", *(f"op {j + 1}" for j in range(width))]
        table = ax.table(cellText=rows, colLabels=labels, colWidths=[0.05] + [0.95 / width] * width, loc="center")
        table.auto_set_font_size(False)
        table.set_fontsize(8)
        ax.set_title("AutoAugment sub-policies (one per image, ops in order)", fontsize=9)
    else:
        text = {
            "none": "no augmentation policy",
            "randaugment": f"RandAugment: {cfg.n} ops per image from {len(OPS)}, magnitude m={cfg.m:.2f}",
            "trivialaugment": f"TrivialAugment: 1 op per image from {len(OPS)}, magnitude ~ U[0, 1]",
        }[cfg.kind]
        fig, ax = plt.subplots(figsize=(6, 1))
        ax.axis("off")
        ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
