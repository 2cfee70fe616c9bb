"""Pascal VOC sources into the canonical ``scenes`` and ``crops`` views.

Source layout (VOCdevkit/VOC2012 or any folder written the same way)::

    <source>/ImageSets/Main/<split>.txt        image ids, one a line
    <source>/Annotations/<id>.xml              size, objects (name, bndbox, difficult)
    <source>/JPEGImages/<id>.jpg
    <source>/SegmentationObject/<id>.png       optional: palette PNG, object k of the XML = index k
    <source>/SegmentationClass/<id>.png        optional: palette PNG, class index (1-based), 255 void

VOC boxes are 1-based and inclusive; they become COCO ``[x, y, w, h]`` in pixel units. Objects
marked ``difficult`` stay in the scenes (``"difficult": 1``) and get no crop. Images with
segmentation PNGs get instance masks and a semantic mask; the others carry boxes only.
"""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from components.data.canonical import SPLITS, DatasetWriter
from components.data.importers.base import ImporterConfig, local_root
from components.data.importers.coco import (
    IGNORE,
    RejectedInput,
    SceneObject,
    SceneWriter,
    carve_splits,
    check_split_mapping,
    fit_box,
    read_image_file,
    reject,
)
from components.data.validate import SampleError, Validator, check_box, check_mask_shape

FORMAT = "voc"
VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip


@dataclass
class Config(ImporterConfig):
    """``datasets.<name>`` with ``format: voc``."""

    # class names; SegmentationClass PNGs index this list 1-based (their index k is classes[k - 1])
    classes: list[str] = field(default_factory=lambda: list(VOC_CLASSES))
    # canonical split -> ImageSets/Main/<name>.txt; a canonical split left out is carved from train
    splits: dict[str, str] = field(default_factory=lambda: {"train": "train", "val": "val"})
    image_ext: str = ".jpg"
    segmentation: bool = True  # read SegmentationObject/SegmentationClass PNGs where they exist

    def validate(self) -> None:
        check_split_mapping(self.splits)
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise ValueError("classes must be a non-empty list of distinct names")
        if len(self.classes) >= IGNORE:
            raise ValueError(f"at most {IGNORE - 1} classes fit a uint8 semantic mask")


@dataclass
class _VocObject:
    name: str
    box: tuple[float, float, float, float]  # xmin, ymin, xmax, ymax as written (1-based, inclusive)
    difficult: bool


def import_to(out: Path, cfg: Config) -> None:
    """Import the VOC source ``cfg.source`` into ``out`` (atomically)."""
    root = local_root(cfg)
    with DatasetWriter(out, name=out.name, categories=list(cfg.classes)) as writer:
        validator = Validator(cfg.validation, writer)
        lists = _read_lists(root, cfg, validator)
        scenes = SceneWriter(writer, cfg.crop_size)
        for split, image_ids in _plan(lists, cfg).items():
            for image_id in image_ids:
                try:
                    pixels, objects, semantic = _read_sample(root, image_id, cfg)
                except SampleError as err:
                    reject(validator, err)
                    continue
                extra = {"source_file": f"JPEGImages/{image_id}{cfg.image_ext}", "source_id": image_id}
                scenes.add(split, pixels, objects, semantic_mask=semantic, extra=extra)
        scenes.set_manifest(cfg, FORMAT)


# -- split lists -------------------------------------------------------------------------------
def _read_lists(root: Path, cfg: Config, validator: Validator) -> dict[str, list[str]]:
    """Canonical split -> image ids of its source list. An id listed twice (in one list or in
    two) is an error: the same image would be seen twice, or in training and testing."""
    lists: dict[str, list[str]] = {}
    first_seen: dict[str, Path] = {}
    for canon in sorted(cfg.splits, key=SPLITS.index):
        path = root / "ImageSets" / "Main" / f"{cfg.splits[canon]}.txt"
        try:
            lines = _list_lines(path)
        except SampleError as err:
            reject(validator, err)
            lists[canon] = []
            continue
        ids = []
        for lineno, image_id in lines:
            if image_id in first_seen:
                reason = f"duplicate image id {image_id!r} (first in {first_seen[image_id]})"
                reject(validator, SampleError(f"{path} (line {lineno})", reason))
                continue
            first_seen[image_id] = path
            ids.append(image_id)
        lists[canon] = ids
    return lists


def _list_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, image id) of a split list: the first word of every non-blank line."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SampleError(path, "split list not found") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RejectedInput(path, f"not UTF-8 text (byte {exc.start})", data) from None
    return [(n, line.split()[0]) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def _plan(lists: dict[str, list[str]], cfg: Config) -> dict[str, list[str]]:
    """Canonical split -> image ids; whole images go to exactly one split."""
    plan: dict[str, list[str]] = {s: [] for s in SPLITS}
    train = lists.get("train", [])
    for canon, positions in carve_splits(len(train), set(cfg.splits), cfg).items():
        plan[canon] = [train[i] for i in positions]
    for canon, ids in lists.items():
        if canon != "train":
            plan[canon] = ids
    return plan


# -- one image -------------------------------------------------------------------------------
def _read_sample(root: Path, image_id: str, cfg: Config) -> tuple[np.ndarray, list[SceneObject], np.ndarray | None]:
    """Pixels, checked objects and (when segmentation PNGs exist) the semantic mask of one image."""
    xml_path = root / "Annotations" / f"{image_id}.xml"
    size, voc_objects = _parse_xml(xml_path)
    image_path = root / "JPEGImages" / f"{image_id}{cfg.image_ext}"
    data, pixels = read_image_file(image_path)
    height, width = pixels.shape[:2]
    if size is not None and size != (width, height):
        reason = f"image is {width}x{height} pixels but {xml_path} says {size[0]}x{size[1]}"
        raise RejectedInput(image_path, reason, data)
    try:
        objects = [
            _scene_object(obj, f"{xml_path} (object {k})", cfg.classes, width, height)
            for k, obj in enumerate(voc_objects, 1)
        ]
    except SampleError as err:
        raise RejectedInput(err.file, err.reason, xml_path.read_bytes()) from None
    semantic = _attach_masks(root, image_id, objects, len(cfg.classes), height, width) if cfg.segmentation else None
    return pixels, objects, semantic


def _scene_object(obj: _VocObject, where: str, classes: list[str], width: int, height: int) -> SceneObject:
    if obj.name not in classes:
        raise SampleError(where, f"unknown class {obj.name!r} (expected one of {', '.join(classes)})")
    xmin, ymin, xmax, ymax = obj.box
    bbox = check_box([xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1], width, height, where)
    return SceneObject(
        bbox=fit_box(bbox, width, height, where),
        category=classes.index(obj.name),
        crop=not obj.difficult,  # VOC's evaluation ignores difficult objects; a crop of one is no fair sample
        extra={"difficult": 1} if obj.difficult else {},
    )


def _parse_xml(path: Path) -> tuple[tuple[int, int] | None, list[_VocObject]]:
    """(width, height) when the XML states it, and the objects in file order."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SampleError(path, "annotation file not found") from None
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise RejectedInput(path, f"malformed XML ({exc})", data) from None
    try:
        if root.tag != "annotation":
            raise ValueError(f"root element is <{root.tag}>, expected <annotation>")
        size = None
        if root.find("size") is not None:
            size = (_int(root, "size/width"), _int(root, "size/height"))
        objects = [_parse_object(el, k) for k, el in enumerate(root.findall("object"), 1)]
    except ValueError as exc:
        raise RejectedInput(path, f"malformed VOC annotation: {exc}", data) from None
    return size, objects


def _parse_object(el: ET.Element, k: int) -> _VocObject:
    name = (el.findtext("name") or "").strip()
    if not name:
        raise ValueError(f"object {k} has no <name>")
    if el.find("bndbox") is None:
        raise ValueError(f"object {k} has no <bndbox>")
    box = tuple(_float(el, f"bndbox/{tag}", f"object {k}") for tag in ("xmin", "ymin", "xmax", "ymax"))
    difficult = (el.findtext("difficult") or "0").strip() not in ("0", "")
    return _VocObject(name=name, box=box, difficult=difficult)  # type: ignore[arg-type]


def _int(root: ET.Element, tag: str) -> int:
    text = (root.findtext(tag) or "").strip()
    if not text.isdigit() or int(text) <= 0:
        raise ValueError(f"<{tag}> is {text!r}, expected a positive integer")
    return int(text)


def _float(el: ET.Element, tag: str, what: str) -> float:
    text = (el.findtext(tag) or "").strip()
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{what}: <{tag}> is {text!r}, expected a number") from None


# -- segmentation PNGs -----------------------------------------------------------------------
def _attach_masks(
    root: Path, image_id: str, objects: list[SceneObject], n_classes: int, height: int, width: int
) -> np.ndarray | None:
    """Give each object its instance mask and return the semantic mask, when the PNGs exist."""
    obj_path = root / "SegmentationObject" / f"{image_id}.png"
    cls_path = root / "SegmentationClass" / f"{image_id}.png"
    if not obj_path.exists() and not cls_path.exists():
        return None
    for path, other in ((obj_path, cls_path), (cls_path, obj_path)):
        if not path.exists():
            raise SampleError(path, f"segmentation PNG not found (but {other} exists)")
    instances = _read_index_png(obj_path, height, width)
    classes = _read_index_png(cls_path, height, width)
    _check_values(instances, len(objects), obj_path, "object index", f"the XML has {len(objects)} objects")
    _check_values(classes, n_classes, cls_path, "class index", f"there are {n_classes} classes")
    for k, obj in enumerate(objects, 1):
        mask = (instances == k).astype(np.uint8)
        obj.mask = mask if mask.any() else None  # an object drawn nowhere keeps its box only
    return classes


def _read_index_png(path: Path, height: int, width: int) -> np.ndarray:
    """The raw palette (or greyscale) indices of a segmentation PNG; colours are not decoded."""
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode not in ("P", "L"):
                raise RejectedInput(path, f"segmentation PNG has mode {im.mode!r}, expected 'P' or 'L' indices", data)
            im.load()
            indices = np.array(im, dtype=np.uint8)
    except SampleError:
        raise
    except UnidentifiedImageError:
        raise RejectedInput(path, "unreadable segmentation PNG (not a recognised image format)", data) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise RejectedInput(path, f"unreadable or truncated segmentation PNG ({exc})", data) from None
    try:
        return check_mask_shape(indices, height, width, str(path))
    except SampleError as err:
        raise RejectedInput(err.file, err.reason, data) from None


def _check_values(indices: np.ndarray, highest: int, path: Path, what: str, because: str) -> None:
    bad = [int(v) for v in np.unique(indices) if v > highest and v != IGNORE]
    if bad:
        reason = f"{what} {bad[0]} out of range ({because}; 0 background, {IGNORE} void)"
        raise RejectedInput(path, reason, path.read_bytes())
