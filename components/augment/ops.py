"""The augmentation operations every policy space is built from, and what a magnitude means.

A magnitude is a number in [0, 1] for every operation; this table maps it to the operation's own
unit. The sampled policies (``components.augment.policy``) and the differentiable searcher
(``components.search.faster_autoaugment``) both read it, so a policy found by one is applied with
the same strength by the other. The set follows AutoAugment (arXiv 1805.09501) and its successors
(RandAugment 1909.13719, TrivialAugment 2103.10158, PBA 1905.05393, Faster AutoAugment
1911.06987); ranges are torchvision's AutoAugment ranges, with translation cut to 30% of the
image, because a crop here holds one centred digit.

Geometric operations move boxes and masks with the image; colour operations change the image
only. Signed operations (shear, translate, rotate and the enhancement factors) get a random sign
when sampled, as in the papers.
"""

from __future__ import annotations

GEOMETRIC_OPS = ("shear_x", "shear_y", "translate_x", "translate_y", "rotate")
COLOUR_OPS = (
    "brightness",
    "contrast",
    "color",
    "sharpness",
    "posterize",
    "solarize",
    "autocontrast",
    "equalize",
    "invert",
)
OPS = ("identity", *GEOMETRIC_OPS, *COLOUR_OPS)

# op -> (value at magnitude 0, value at magnitude 1): linear in between.
MAX_SHEAR = 0.3  # shear factor (tan of the angle): 0.3 is about 16.7 degrees
MAX_TRANSLATE = 0.3  # fraction of the image's width (x) or height (y)
MAX_ROTATE_DEG = 30.0
MAX_ENHANCE = 0.9  # brightness/contrast/color/sharpness factor 1 +- 0.9 (PIL's ImageEnhance scale)
MAGNITUDE_RANGES: dict[str, tuple[float, float]] = {
    "shear_x": (0.0, MAX_SHEAR),
    "shear_y": (0.0, MAX_SHEAR),
    "translate_x": (0.0, MAX_TRANSLATE),
    "translate_y": (0.0, MAX_TRANSLATE),
    "rotate": (0.0, MAX_ROTATE_DEG),
    "brightness": (0.0, MAX_ENHANCE),
    "contrast": (0.0, MAX_ENHANCE),
    "color": (0.0, MAX_ENHANCE),
    "sharpness": (0.0, MAX_ENHANCE),
    "posterize": (8.0, 4.0),  # bits kept per channel (rounded down)
    "solarize": (1.0, 0.0),  # threshold on [0, 1] pixels: pixels at or above it are inverted
}
SIGNED_OPS = frozenset({*GEOMETRIC_OPS, "brightness", "contrast", "color", "sharpness"})
# Operations whose result does not depend on the magnitude.
NO_MAGNITUDE_OPS = frozenset({"identity", "autocontrast", "equalize", "invert"})


def op_value(op: str, magnitude: float) -> float:
    """The operation's own parameter at ``magnitude`` in [0, 1] (before any random sign); 0.0 for
    operations without one. For the enhancement ops this is the offset from factor 1."""
    if op not in OPS:
        raise KeyError(f"unknown augmentation op {op!r}; known: {', '.join(OPS)}")
    if op in NO_MAGNITUDE_OPS:
        return 0.0
    lo, hi = MAGNITUDE_RANGES[op]
    return lo + (hi - lo) * float(magnitude)
