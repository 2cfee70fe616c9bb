"""Methods, one module each. A new method is one file plus one line in the list below."""

from components.methods import classifier, detr, faster_rcnn, fcos, retinanet  # noqa: F401
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
