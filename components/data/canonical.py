"""The canonical on-disk dataset format, shared by every task family.

A prepared dataset is a folder::

    <root>/manifest.json                 source, classes, counts, checksums, generator seed
    <root>/<view>/<split>.json           COCO-format: images, annotations, categories
    <root>/<view>/images/<split>/*.png   the images of that view
    <root>/<view>/masks/<split>/*.png    semantic masks (uint8: 0 background, category index + 1,
                                         255 ignored), named by the image record's ``semantic_mask``
    <root>/quarantine/report.json        samples set aside by validation, with the reason each

A *view* is one rendering of the source data for a group of task families: ``crops`` holds
one object per image with an image-level ``label`` (classification, representation,
retrieval); scene views hold canvases whose COCO ``annotations`` carry boxes and instance
masks (RLE), with semantic masks as PNG next to the images. Loaders read only this format;
importers and generators only write it, through :class:`DatasetWriter`, which writes into a
temporary folder and renames it into place when complete, so a failed prepare never leaves a
half-written dataset that a later stage could take as finished.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")


class DatasetError(ValueError):
    """A prepared dataset is missing, incomplete or inconsistent; names the file."""


@dataclass
class _ViewState:
    task_families: list[str]
    images: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    annotations: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


class DatasetWriter:
    """Write a dataset in the canonical format, atomically.

    Use as a context manager: the folder appears at ``root`` only if the block completes;
    on error the temporary folder is removed and any previous dataset at ``root`` is kept.
    """

    def __init__(self, root: str | Path, *, name: str, categories: list[str]) -> None:
        self.root = Path(root)
        self.name = name
        self.categories = [{"id": i, "name": c} for i, c in enumerate(categories)]
        self._views: dict[str, _ViewState] = {}
        self._checksums: dict[str, str] = {}
        self._tmp: Path | None = None
        self.manifest_extra: dict[str, Any] = {}
        self._quarantined: list[dict[str, Any]] = []

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> DatasetWriter:
        self.root.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.root.name}.partial-", dir=self.root.parent))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._tmp is not None
        if exc_type is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            return
        try:
            self._commit()
        except BaseException:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise

    # -- content ---------------------------------------------------------------------------
    def add_view(self, view: str, task_families: list[str]) -> None:
        if view in self._views:
            raise ValueError(f"view {view!r} added twice")
        self._views[view] = _ViewState(task_families=list(task_families))

    def add_image(
        self,
        view: str,
        split: str,
        pixels: np.ndarray,
        *,
        label: int | None = None,
        annotations: list[dict[str, Any]] | None = None,
        semantic_mask: np.ndarray | None = None,
        extra: dict[str, Any] | None = None,
    ) -> int:
        """Store one image (HxWx3 uint8) with its image-level label and/or COCO annotations.

        Annotations are COCO dicts without ``id``/``image_id`` (``bbox`` [x, y, w, h],
        ``category_id``, optional ``segmentation`` RLE, ``area``, ``iscrowd``).
        ``semantic_mask`` (HxW uint8, see the module docstring) is stored as a PNG beside the image.
        Returns the image id (unique within the split).
        """
        assert self._tmp is not None, "use DatasetWriter as a context manager"
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        state = self._views[view]
        images = state.images.setdefault(split, [])
        anns = state.annotations.setdefault(split, [])
        image_id = len(images) + 1
        rel = f"{view}/images/{split}/{image_id:06d}.png"
        data = encode_png(pixels)
        self._write_bytes(rel, data)
        record: dict[str, Any] = {
            "id": image_id,
            "file_name": rel.split("/", 1)[1],
            "height": int(pixels.shape[0]),
            "width": int(pixels.shape[1]),
        }
        if label is not None:
            record["label"] = int(label)
        if semantic_mask is not None:
            if semantic_mask.shape != pixels.shape[:2] or semantic_mask.dtype != np.uint8:
                raise ValueError(
                    f"semantic mask {semantic_mask.shape}/{semantic_mask.dtype} does not match image {pixels.shape[:2]}"
                )
            mask_rel = f"{view}/masks/{split}/{image_id:06d}.png"
            self._write_bytes(mask_rel, encode_png(semantic_mask))
            record["semantic_mask"] = mask_rel.split("/", 1)[1]
        if extra:
            record.update(extra)
        images.append(record)
        for ann in annotations or []:
            anns.append({"id": len(anns) + 1, "image_id": image_id, **ann})
        return image_id

    def quarantine(self, source: str, reason: str, payload: bytes | None = None, name: str | None = None) -> None:
        """Set a bad sample aside: listed in ``quarantine/report.json`` with its reason, and its
        bytes (when given) kept under ``quarantine/files/`` for inspection."""
        assert self._tmp is not None
        entry: dict[str, Any] = {"source": source, "reason": reason}
        if payload is not None:
            rel = f"quarantine/files/{len(self._quarantined):06d}-{name or Path(source).name}"
            path = self._tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(payload)
            entry["kept_as"] = rel
        self._quarantined.append(entry)

    # -- internals -------------------------------------------------------------------------
    def _write_bytes(self, rel: str, data: bytes) -> None:
        assert self._tmp is not None
        path = self._tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self._checksums[rel] = hashlib.sha256(data).hexdigest()

    def _commit(self) -> None:
        views: dict[str, Any] = {}
        for view, state in self._views.items():
            counts = {}
            for split in SPLITS:
                images = state.images.get(split, [])
                if not images:
                    raise DatasetError(f"{self.root / view / (split + '.json')}: split {split!r} is empty")
                coco = {
                    "info": {"dataset": self.name, "view": view, "split": split},
                    "images": images,
                    "annotations": state.annotations.get(split, []),
                    "categories": self.categories,
                }
                self._write_bytes(f"{view}/{split}.json", _json_bytes(coco))
                counts[split] = {"images": len(images), "annotations": len(coco["annotations"])}
            views[view] = {"task_families": state.task_families, "counts": counts}
        if self._quarantined:
            self._write_bytes("quarantine/report.json", _json_bytes({"quarantined": self._quarantined}))
        manifest = {
            "name": self.name,
            "format_version": FORMAT_VERSION,
            **self.manifest_extra,
            "classes": [c["name"] for c in self.categories],
            "views": views,
            "quarantined": len(self._quarantined),
            "checksums": dict(sorted(self._checksums.items())),
            "checksum": combined_checksum(self._checksums),
        }
        assert self._tmp is not None
        (self._tmp / MANIFEST).write_bytes(_json_bytes(manifest))
        _replace_dir(self._tmp, self.root)

    def set_manifest(self, **fields: Any) -> None:
        """Fields recorded in ``manifest.json`` (source, seed, generator parameters...)."""
        self.manifest_extra.update(fields)


def encode_png(pixels: np.ndarray) -> bytes:
    """Deterministic PNG bytes of an HxWx3 (or HxW) uint8 array."""
    if pixels.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {pixels.dtype}")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO compressed RLE (JSON-ready) of a binary HxW mask."""
    from pycocotools import mask as coco_mask

    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """Binary HxW uint8 mask of a COCO RLE (compressed or uncompressed) or polygon list needs ``size``."""
    from pycocotools import mask as coco_mask

    if isinstance(rle.get("counts"), list):  # uncompressed RLE
        rle = coco_mask.frPyObjects(rle, *rle["size"])
    elif isinstance(rle.get("counts"), str):
        rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    return coco_mask.decode(rle)


def combined_checksum(checksums: dict[str, str]) -> str:
    """One sha256 over every file's path and sha256, independent of write order."""
    h = hashlib.sha256()
    for rel in sorted(checksums):
        h.update(f"{rel}\t{checksums[rel]}\n".encode())
    return h.hexdigest()


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode("utf-8")


def _replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, replacing a previous ``dst`` only once ``src`` is in place."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -- reading -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetInfo:
    """What a method needs to know about a prepared dataset to build its model."""

    name: str
    root: Path
    classes: tuple[str, ...]
    in_channels: int
    image_size: tuple[int, int]
    checksum: str
    views: dict[str, Any]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _read_json(path: Path, what: str, missing: str) -> dict[str, Any]:
    if not path.is_file():
        raise DatasetError(f"{path}: {missing}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: malformed {what} ({exc})") from None


def read_manifest(root: str | Path) -> dict[str, Any]:
    return _read_json(Path(root) / MANIFEST, "manifest", "no manifest; run the prepare stage for this dataset first")


def read_info(root: str | Path) -> DatasetInfo:
    root = Path(root)
    manifest = read_manifest(root)
    size = manifest.get("image_size", [0, 0])
    return DatasetInfo(
        name=manifest["name"],
        root=root,
        classes=tuple(manifest["classes"]),
        in_channels=int(manifest.get("channels", 3)),
        image_size=(int(size[0]), int(size[1])),
        checksum=manifest["checksum"],
        views=manifest["views"],
    )


def read_split(root: str | Path, view: str, split: str) -> dict[str, Any]:
    """The COCO dict of one split of one view."""
    path = Path(root) / view / f"{split}.json"
    return _read_json(path, "COCO JSON", f"missing; the dataset has no split {split!r} in view {view!r}")


def verify_checksums(root: str | Path) -> None:
    """Recompute every file's sha256 and compare with the manifest."""
    root = Path(root)
    manifest = read_manifest(root)
    for rel, expected in manifest["checksums"].items():
        path = root / rel
        if not path.is_file():
            raise DatasetError(f"{path}: listed in the manifest but missing")
        if hashlib.sha256(path.read_bytes()).hexdigest() != expected:
            raise DatasetError(f"{path}: checksum differs from {root / MANIFEST}")
