"""Methods, one module each. A new method is one file plus one line in the list below."""

from components.methods import (  # noqa: F401
    classifier,
    condinst,
    contrastive,
    detr,
    faster_rcnn,
    fcos,
    mask_rcnn,
    moco,
    npid,
    retinanet,
    rotnet,
    segformer,
    simclr,
    smooth_ap,
    triplet,
    unet,
)
from components.methods.base import (
    Method,
    RegistryError,
    available_methods,
    create_method,
    get_method_class,
    register_method,
)

__all__ = [
    "Method",
    "RegistryError",
    "available_methods",
    "create_method",
    "get_method_class",
    "register_method",
]
