"""Methods, one module each. A new method is one file plus one line in the list below.

A module is imported when its method is first asked for, so a run imports (and its stage
depends on) its own method's code only: see ``pipelines/code.py``.
"""

from components.methods.base import (
    Method,
    RegistryError,
    available_methods,
    create_method,
    get_method_class,
    register_method,
)

# Registered method name -> its module under components/methods/.
METHOD_MODULES = {
    "classifier": "classifier",
    "condinst": "condinst",
    "contrastive": "contrastive",
    "detr": "detr",
    "faster_rcnn": "faster_rcnn",
    "fcos": "fcos",
    "mask_rcnn": "mask_rcnn",
    "moco": "moco",
    "npid": "npid",
    "retinanet": "retinanet",
    "rotnet": "rotnet",
    "segformer": "segformer",
    "simclr": "simclr",
    "smooth_ap": "smooth_ap",
    "triplet": "triplet",
    "unet": "unet",
}

__all__ = [
    "METHOD_MODULES",
    "Method",
    "RegistryError",
    "available_methods",
    "create_method",
    "get_method_class",
    "register_method",
]
