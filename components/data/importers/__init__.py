"""Importers: real sources (COCO, Pascal VOC, CIFAR, an image folder; local or ``s3://``) into the
canonical format. Each format is one module exposing ``Config`` (a dataclass extending
:class:`~components.data.importers.base.ImporterConfig`) and ``import_to(out, cfg)``."""

from __future__ import annotations

import importlib
from types import ModuleType

# format name -> module; modules are imported on use so one format's dependencies never
# burden another's.
FORMATS = {
    "coco": "components.data.importers.coco",
    "voc": "components.data.importers.voc",
    "cifar": "components.data.importers.cifar",
    "image_folder": "components.data.importers.image_folder",
}


def importer(fmt: str) -> ModuleType:
    if fmt not in FORMATS:
        raise KeyError(f"unknown source format {fmt!r}; available: {', '.join(sorted(FORMATS))}")
    return importlib.import_module(FORMATS[fmt])
