"""Import an image folder (one subfolder per class) into the canonical ``crops`` view.

Two layouts are understood (``layout`` in the config; ``auto`` picks by the top-level folders):

* ``flat``: ``<root>/<class>/*.png|jpg|...``. Every image is carved into train/val/test by a
  seeded split stratified by class (``holdout.val`` and ``holdout.test`` of each class).
* ``split``: ``<root>/{train,val,test}/<class>/*``. The source's own splits are kept; a missing
  ``val`` or ``test`` folder is carved from ``train`` as above.

``auto`` means ``split`` when every top-level folder is one of ``train``/``val``/``test`` and
``flat`` when none is; a mix is refused (set ``layout`` explicitly). Images in nested folders
below a class folder belong to that class. Classes are the sorted class-folder names (across
all splits), or ``classes`` from the config, which fixes their order and makes any other
folder an unknown-category error. Images of any size are resized to ``crop_size`` squares.

Only known harmless entries (:data:`HARMLESS`, e.g. ``.DS_Store``) are skipped; every other
file that is not a readable RGB/grey image goes through the validation policy, and an empty
class or split folder stops the import, each error naming the path and the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from components.config import to_dict
from components.data.canonical import SPLITS, DatasetError, DatasetWriter
from components.data.importers.base import ImporterConfig, local_root, resize_square
from components.data.validate import SampleError, Validator, decode_image

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
# Operating-system and notebook metadata that never holds samples.
HARMLESS = frozenset({".DS_Store", "Thumbs.db", "desktop.ini", "__MACOSX", ".ipynb_checkpoints"})
TASK_FAMILIES = ["classification", "representation", "retrieval"]


@dataclass
class Config(ImporterConfig):
    """``datasets.<name>`` with ``format: image_folder``."""

    layout: Literal["auto", "flat", "split"] = "auto"
    classes: list[str] | None = None  # fixes the class list and order; other folders are errors

    def validate(self) -> None:
        self.holdout.validate()
        if self.crop_size < 1:
            raise ValueError("crop_size must be >= 1")
        if self.classes is not None:
            if not self.classes or any(not c for c in self.classes):
                raise ValueError("classes must be a non-empty list of non-empty folder names")
            if len(set(self.classes)) != len(self.classes):
                raise ValueError(f"classes has duplicate names: {self.classes}")


def stratified_holdout(labels: Sequence[int], fractions: dict[str, float], seed: int) -> dict[str, list[int]]:
    """Seeded per-class split of item indices into ``train`` and the splits in ``fractions``.

    Each class gives ``max(1, round(n * fraction))`` items to each split, but always keeps at
    least one in train, so a class with a single image is never missing from training.
    """
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels, dtype=np.int64)
    out: dict[str, list[int]] = {"train": [], **{s: [] for s in fractions}}
    for cls in np.unique(labels_arr):
        idx = rng.permutation(np.flatnonzero(labels_arr == cls)).tolist()
        for split, fraction in fractions.items():
            take = min(max(1, round(len(idx) * fraction)), len(idx) - 1) if len(idx) > 1 else 0
            out[split].extend(idx[:take])
            idx = idx[take:]
        out["train"].extend(idx)
    return {s: sorted(v) for s, v in out.items()}


def _entries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name not in HARMLESS)


def detect_layout(root: Path, layout: str) -> str:
    if layout != "auto":
        return layout
    dirs = {p.name for p in _entries(root) if p.is_dir()}
    split_dirs = dirs & set(SPLITS)
    if not split_dirs:
        return "flat"
    if dirs - split_dirs:
        raise DatasetError(
            f"{root}: mixes split folders ({', '.join(sorted(split_dirs))}) with other folders "
            f"({', '.join(sorted(dirs - split_dirs))}); set layout: flat or split"
        )
    return "split"


def list_files(class_dir: Path) -> list[Path]:
    """Every non-harmless file below a class folder (nested folders included), sorted."""
    found: list[Path] = []
    for entry in _entries(class_dir):
        found.extend(list_files(entry) if entry.is_dir() else [entry])
    return found


class _Importer:
    """Walks the source, validating every entry, and writes the accepted images."""

    def __init__(self, root: Path, cfg: Config, writer: DatasetWriter, classes: list[str]) -> None:
        self.root, self.cfg, self.writer, self.classes = root, cfg, writer, classes
        self.validator = Validator(cfg.validation, writer)

    def collect(self, folder: Path, every_class: bool) -> list[tuple[Path, int]]:
        """``(file, class index)`` of the files under ``folder/<class>/``; stray entries are rejected.

        ``every_class``: each class must have a folder here (the training data must cover all).
        """
        entries = _entries(folder)
        if not any(e.is_dir() for e in entries):
            raise SampleError(folder, "empty folder: no class folders (expected <class>/<image>)")
        missing = [c for c in self.classes if not (folder / c).is_dir()]
        if missing and every_class:
            raise SampleError(folder / missing[0], f"missing class folder: class {missing[0]!r} has no images")
        items: list[tuple[Path, int]] = []
        for entry in entries:
            if not entry.is_dir():
                self.reject(entry, "file outside any class folder (expected <class>/<image>)")
                continue
            files = list_files(entry)
            if entry.name not in self.classes:
                known = ", ".join(self.classes)
                reason = f"unknown category folder {entry.name!r} (not in the configured classes: {known})"
                for f in files or [entry]:
                    self.reject(f, reason)
                continue
            if not files:
                raise SampleError(entry, f"empty class folder: no images of class {entry.name!r}")
            items.extend((f, self.classes.index(entry.name)) for f in files)
        return items

    def reject(self, path: Path, reason: str) -> None:
        payload = _read(path) if path.is_file() else None
        self.validator.reject(SampleError(path, reason), payload=payload)

    def write(self, split: str, items: list[tuple[Path, int]]) -> None:
        for path, label in items:
            pixels = self.load(path)
            if pixels is None:
                continue
            if pixels.shape[:2] != (self.cfg.crop_size, self.cfg.crop_size):
                pixels = resize_square(pixels, self.cfg.crop_size)
            ref = path.relative_to(self.root).as_posix()
            self.writer.add_image("crops", split, pixels, label=label, extra={"source_ref": ref})

    def load(self, path: Path) -> np.ndarray | None:
        data = None
        try:
            data = _read(path)
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                raise SampleError(path, f"not an image file (unknown extension {path.suffix or '(none)'!r})")
            return decode_image(data, path)
        except SampleError as err:
            self.validator.reject(err, payload=data)
            return None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SampleError(path, f"cannot read the file ({exc.strerror or exc})") from None


def _class_names(root: Path, layout: str, cfg: Config) -> list[str]:
    if cfg.classes is not None:
        return list(cfg.classes)
    parents = [root] if layout == "flat" else [root / s for s in SPLITS if (root / s).is_dir()]
    names = sorted({p.name for parent in parents for p in _entries(parent) if p.is_dir()})
    if not names:
        raise DatasetError(f"{root}: no class folders found (expected <class>/<image> in {layout} layout)")
    return names


def _plan_splits(root: Path, layout: str, imp: _Importer) -> tuple[dict[str, list[tuple[Path, int]]], list[str]]:
    """The items of each canonical split, and which splits were carved from train."""
    if layout == "flat":
        sources = {"train": imp.collect(root, every_class=True)}
    else:
        if not (root / "train").is_dir():
            raise DatasetError(f"{root / 'train'}: missing; the split layout needs at least a train folder")
        for entry in _entries(root):
            if entry.name not in SPLITS or not entry.is_dir():
                imp.reject(entry, "unexpected entry in the split layout (expected only train/, val/, test/)")
        sources = {s: imp.collect(root / s, every_class=s == "train") for s in SPLITS if (root / s).is_dir()}
    carve = [s for s in ("val", "test") if s not in sources]
    if carve:
        train = sources["train"]
        fractions = {s: getattr(imp.cfg.holdout, s) for s in carve}
        picked = stratified_holdout([label for _, label in train], fractions, imp.cfg.seed)
        sources.update({s: [train[i] for i in idx] for s, idx in picked.items()})
    return sources, carve


def import_to(out: Path, cfg: Config) -> None:
    """Write ``cfg.source`` (an image folder) to ``out`` in the canonical format, atomically."""
    out = Path(out)
    root = local_root(cfg)
    layout = detect_layout(root, cfg.layout)
    classes = _class_names(root, layout, cfg)
    with DatasetWriter(out, name=out.name, categories=classes) as writer:
        writer.add_view("crops", TASK_FAMILIES)
        imp = _Importer(root, cfg, writer, classes)
        sources, carved = _plan_splits(root, layout, imp)
        for split in SPLITS:
            imp.write(split, sources[split])
        writer.set_manifest(
            source=cfg.source,
            format="image_folder",
            layout=layout,
            carved_from_train=carved,
            seed=cfg.seed,
            channels=3,
            image_size=[cfg.crop_size, cfg.crop_size],
            importer=to_dict(cfg),
            source_split_sizes={s: len(sources[s]) for s in SPLITS},  # files listed, before validation
        )
