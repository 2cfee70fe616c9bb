"""Import CIFAR-10 / CIFAR-100 (the "python version" pickles) into the canonical ``crops`` view.

The source folder is the extracted archive: ``cifar-10-batches-py/`` (``data_batch_1..5``,
``test_batch``, ``batches.meta`` with ``label_names``) or ``cifar-100-python/`` (``train``,
``test``, ``meta`` with ``fine_label_names``/``coarse_label_names``; ``label_kind`` picks which),
or the folder that holds either. Each batch is a dict with bytes keys: ``b"data"`` (N x 3072
uint8, row-major R then G then B planes of 32x32) and ``b"labels"`` (CIFAR-100:
``b"fine_labels"``/``b"coarse_labels"``). The canonical test split is the source's test set;
val is carved from the training batches per class (``holdout.val``, seeded), train is the rest.

Pickles can execute code when loaded, so the source must be trusted: only the expected batch
and meta files are unpickled, and only through an unpickler that allows nothing but the numpy
array globals these files use. A bad batch (malformed pickle, missing keys, wrong shapes) or row
(label out of range) goes through the validation policy, named by file and row
(``data_batch_1:17``); a missing or bad meta file stops the import, since no class is known.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from components.config import to_dict
from components.data.canonical import SPLITS, DatasetError, DatasetWriter, encode_png
from components.data.importers.base import ImporterConfig, local_root, resize_square
from components.data.importers.image_folder import TASK_FAMILIES, stratified_holdout
from components.data.validate import SampleError, Validator

SIDE = 32
ROW_BYTES = 3 * SIDE * SIDE
# The only globals a genuine CIFAR pickle references (numpy arrays; bytes under protocol 2).
ALLOWED_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }
)


@dataclass
class Config(ImporterConfig):
    """``datasets.<name>`` with ``format: cifar``."""

    label_kind: Literal["fine", "coarse"] = "fine"  # CIFAR-100 only: 100 fine or 20 coarse classes

    def validate(self) -> None:
        self.holdout.validate()
        if self.crop_size < 1:
            raise ValueError("crop_size must be >= 1")


@dataclass
class Layout:
    """Where one CIFAR variant keeps its files, and the keys it uses."""

    variant: str
    folder: Path
    meta: Path
    train: list[Path]
    test: Path
    names_key: bytes
    labels_key: bytes


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refers to {module}.{name}, which a CIFAR batch never holds")
        # the published files name numpy 1's module; numpy 2 keeps it only as a deprecated alias
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray"
        return super().find_class(module, name)


def load_pickle(path: Path) -> tuple[dict[bytes, Any], bytes]:
    """The dict in a CIFAR pickle and the file's bytes; anything else raises :class:`SampleError`."""
    if not path.is_file():
        raise SampleError(path, "file not found")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SampleError(path, f"cannot read the file ({exc.strerror or exc})") from None
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # a corrupt pickle can raise almost anything; all mean the same here
        raise SampleError(path, f"malformed or truncated pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise SampleError(path, f"malformed pickle: expected a dict, got {type(obj).__name__}")
    return obj, data


def find_layout(root: Path, label_kind: str) -> Layout:
    """The CIFAR folder at ``root`` or in its ``cifar-10-batches-py``/``cifar-100-python`` child."""
    for folder in (root, root / "cifar-10-batches-py", root / "cifar-100-python"):
        batches = sorted(
            (p for p in folder.glob("data_batch_*") if re.fullmatch(r"data_batch_\d+", p.name)),
            key=lambda p: int(p.name.rsplit("_", 1)[1]),
        )
        if batches or (folder / "test_batch").exists() or (folder / "batches.meta").exists():
            if label_kind != "fine":
                raise DatasetError(f"{folder}: label_kind {label_kind!r} applies only to CIFAR-100; use 'fine'")
            if not batches:
                raise DatasetError(f"{folder}: no training batches (data_batch_1 ... data_batch_5)")
            return Layout(
                "cifar10", folder, folder / "batches.meta", batches, folder / "test_batch", b"label_names", b"labels"
            )
        if (folder / "meta").exists() or (folder / "train").is_file():
            names_key, labels_key = f"{label_kind}_label_names".encode(), f"{label_kind}_labels".encode()
            return Layout(
                "cifar100", folder, folder / "meta", [folder / "train"], folder / "test", names_key, labels_key
            )
    raise DatasetError(
        f"{root}: not a CIFAR folder (expected batches.meta, data_batch_N, test_batch for CIFAR-10 "
        "or meta, train, test for CIFAR-100)"
    )


def read_classes(layout: Layout) -> list[str]:
    meta, _ = load_pickle(layout.meta)
    names = meta.get(layout.names_key)
    if not isinstance(names, list) or not names:
        raise SampleError(layout.meta, f"missing key {layout.names_key.decode()!r} (a list of class names)")
    try:
        classes = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]
    except UnicodeDecodeError:
        raise SampleError(layout.meta, f"{layout.names_key.decode()!r} holds a name that is not UTF-8") from None
    if len(set(classes)) != len(classes):
        raise SampleError(layout.meta, f"duplicate class names in {layout.names_key.decode()!r}")
    return classes


def check_batch(path: Path, batch: dict[bytes, Any], labels_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The batch's ``data`` (N x 3072 uint8) and labels (N ints), or :class:`SampleError` saying why."""
    for key in (b"data", labels_key):
        if key not in batch:
            raise SampleError(path, f"missing key {key.decode()!r}")
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != ROW_BYTES:
        got = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise SampleError(path, f"wrong 'data' shape: expected N x {ROW_BYTES} uint8, got {got}")
    labels = np.asarray(batch[labels_key])
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise SampleError(path, f"{labels_key.decode()!r} is not a list of integers")
    if len(labels) != len(data):
        raise SampleError(path, f"length mismatch: {len(data)} rows in 'data' but {len(labels)} labels")
    return data, labels.astype(np.int64)


def row_pixels(row: np.ndarray) -> np.ndarray:
    """HxWx3 of one 3072-byte row: the R, G and B planes, each 32x32 row-major."""
    return row.reshape(3, SIDE, SIDE).transpose(1, 2, 0)


class _Importer:
    def __init__(self, root: Path, cfg: Config, writer: DatasetWriter, layout: Layout, num_classes: int) -> None:
        self.root, self.cfg, self.writer, self.layout = root, cfg, writer, layout
        self.num_classes = num_classes
        self.validator = Validator(cfg.validation, writer)

    def read(self, path: Path) -> list[tuple[str, np.ndarray, int]]:
        """``(source_ref, row, label)`` of every valid row of one batch file."""
        try:
            batch, payload = load_pickle(path)
        except SampleError as err:
            # the file's bytes are kept for inspection when it could be read at all
            payload = path.read_bytes() if path.is_file() and os.access(path, os.R_OK) else None
            self.validator.reject(err, payload=payload)
            return []
        try:
            data, labels = check_batch(path, batch, self.layout.labels_key)
        except SampleError as err:
            self.validator.reject(err, payload=payload)
            return []
        ref = path.relative_to(self.root).as_posix()
        rows = []
        for i, (row, label) in enumerate(zip(data, labels, strict=True)):
            if not 0 <= label < self.num_classes:
                reason = (
                    f"unknown category: label {label} is outside 0..{self.num_classes - 1} "
                    f"(the classes in {self.layout.meta.name})"
                )
                self.validator.reject(SampleError(f"{path}:{i}", reason), payload=encode_png(row_pixels(row)))
                continue
            rows.append((f"{ref}:{i}", row, int(label)))
        return rows

    def write(self, split: str, rows: list[tuple[str, np.ndarray, int]]) -> None:
        for ref, row, label in rows:
            pixels = row_pixels(row)
            if self.cfg.crop_size != SIDE:
                pixels = resize_square(np.ascontiguousarray(pixels), self.cfg.crop_size)
            self.writer.add_image("crops", split, pixels, label=label, extra={"source_ref": ref})


def import_to(out: Path, cfg: Config) -> None:
    """Write ``cfg.source`` (an extracted CIFAR archive) to ``out`` in the canonical format, atomically."""
    out = Path(out)
    root = local_root(cfg)
    layout = find_layout(root, cfg.label_kind)
    if not layout.test.is_file():
        raise DatasetError(f"{layout.test}: missing; the source's test set becomes the canonical test split")
    classes = read_classes(layout)
    with DatasetWriter(out, name=out.name, categories=classes) as writer:
        writer.add_view("crops", TASK_FAMILIES)
        imp = _Importer(root, cfg, writer, layout, len(classes))
        train = [row for path in layout.train for row in imp.read(path)]
        picked = stratified_holdout([label for _, _, label in train], {"val": cfg.holdout.val}, cfg.seed)
        splits = {s: [train[i] for i in idx] for s, idx in picked.items()}
        splits["test"] = imp.read(layout.test)
        for split in SPLITS:
            imp.write(split, splits[split])
        writer.set_manifest(
            source=cfg.source,
            format="cifar",
            variant=layout.variant,
            label_kind=cfg.label_kind,
            seed=cfg.seed,
            channels=3,
            image_size=[cfg.crop_size, cfg.crop_size],
            importer=to_dict(cfg),
            source_split_sizes={s: len(v) for s, v in splits.items()},
        )
