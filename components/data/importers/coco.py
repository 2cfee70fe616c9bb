"""COCO sources (``annotations/instances_<split>.json`` plus image folders) into the canonical
``scenes`` and ``crops`` views.

Source layout (both paths configurable, ``{split}`` is the source split's name)::

    <source>/annotations/instances_train2017.json
    <source>/train2017/<file_name>

Category ids become contiguous indices in the order of the source's ids. Segmentations may be
polygons, uncompressed or compressed RLE; every mask is decoded and checked against the image's
size. Crowd objects (``iscrowd: 1``) stay in the scenes, are ignored (255) in the semantic mask
and get no crop.

A sample is one image with all its annotations: one bad annotation sets the whole image aside,
because keeping the image without that object would teach a detector that it is background.
The scene-view helpers at the top are shared with the other scene importers (VOC).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as coco_mask

from components.config import to_dict
from components.data.canonical import SPLITS, DatasetWriter, mask_to_rle
from components.data.importers.base import ImporterConfig, assign_holdout, crop_object, local_root
from components.data.validate import (
    SampleError,
    Validator,
    check_box,
    check_mask_shape,
    check_unique,
    decode_image,
    load_json,
)

FORMAT = "coco"
SCENE_TASKS = ["detection", "instance_segmentation", "semantic_segmentation"]
CROP_TASKS = ["classification", "representation", "retrieval"]
IGNORE = 255  # semantic mask value for void, crowd and unknown-extent pixels


# -- scene views, shared with the other scene importers ----------------------------------------
class RejectedInput(SampleError):
    """A bad input with the bytes to keep in quarantine (the file, or the offending record)."""

    def __init__(self, file: str | Path, reason: str, payload: bytes | None = None) -> None:
        super().__init__(file, reason)
        self.payload = payload


def reject(validator: Validator, err: SampleError) -> None:
    validator.reject(err, payload=getattr(err, "payload", None))


def read_image_file(path: Path) -> tuple[bytes, np.ndarray]:
    """The file's bytes and its HxWx3 pixels; a missing, unreadable or odd-mode image raises."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SampleError(path, "image file not found") from None
    except OSError as exc:
        raise SampleError(path, f"unreadable image file ({exc.strerror})") from None
    try:
        return data, decode_image(data, path)
    except SampleError as err:
        raise RejectedInput(err.file, err.reason, data) from None


@dataclass
class SceneObject:
    """One checked object of a scene: box [x, y, w, h], category index, optional binary mask."""

    bbox: list[float]
    category: int
    mask: np.ndarray | None = None
    iscrowd: bool = False
    crop: bool = True  # crowd and "difficult" objects stay in the scenes but get no crop
    extra: dict[str, Any] = field(default_factory=dict)


def fit_box(bbox: list[float], width: int, height: int, where: str) -> list[float]:
    """Clip a box that :func:`check_box` accepted within its slack to the image itself."""
    x, y, w, h = bbox
    x0, y0 = max(0.0, x), max(0.0, y)
    x1, y1 = min(float(width), x + w), min(float(height), y + h)
    if x1 <= x0 or y1 <= y0:
        raise SampleError(where, f"box {bbox} lies outside the {width}x{height} image")
    return [x0, y0, x1 - x0, y1 - y0]


def compose_semantic_mask(objects: list[SceneObject], height: int, width: int) -> np.ndarray:
    """0 background, category index + 1, 255 where the class is unknown (crowds, unmasked objects)."""
    sem = np.zeros((height, width), dtype=np.uint8)
    for obj in objects:
        if obj.iscrowd or obj.mask is None:
            region = obj.mask.astype(bool) if obj.mask is not None else _box_region(obj.bbox, height, width)
            sem[region] = IGNORE
    # larger objects first, so a small object in front of a large one stays visible
    masked = [o for o in objects if not o.iscrowd and o.mask is not None]
    for obj in sorted(masked, key=lambda o: -int(o.mask.sum())):
        sem[obj.mask.astype(bool)] = obj.category + 1
    return sem


def _box_region(bbox: list[float], height: int, width: int) -> np.ndarray:
    x, y, w, h = bbox
    region = np.zeros((height, width), dtype=bool)
    region[int(np.floor(y)) : int(np.ceil(y + h)), int(np.floor(x)) : int(np.ceil(x + w))] = True
    return region


class SceneWriter:
    """Writes one image to the ``scenes`` view and one crop per croppable object to ``crops``."""

    def __init__(self, writer: DatasetWriter, crop_size: int) -> None:
        self.writer = writer
        self.crop_size = crop_size
        self._sizes: list[tuple[int, int]] = []
        writer.add_view("scenes", SCENE_TASKS)
        writer.add_view("crops", CROP_TASKS)

    def set_manifest(self, cfg: ImporterConfig, fmt: str) -> None:
        """The manifest fields every scene importer records (sources with a split mapping)."""
        self.writer.set_manifest(
            source=cfg.source,
            format=fmt,
            seed=cfg.seed,
            channels=3,
            image_size=[cfg.crop_size, cfg.crop_size],
            scene_size_range=self.size_range(),
            source_splits=dict(cfg.splits),
            carved_splits=[s for s in SPLITS if s not in cfg.splits],
            importer=to_dict(cfg),
        )

    def add(
        self,
        split: str,
        pixels: np.ndarray,
        objects: list[SceneObject],
        *,
        semantic_mask: np.ndarray | None,
        extra: dict[str, Any],
    ) -> None:
        annotations = []
        for obj in objects:
            x, y, w, h = obj.bbox
            ann: dict[str, Any] = {
                "bbox": [float(x), float(y), float(w), float(h)],
                "category_id": obj.category,
                "area": float(obj.mask.sum()) if obj.mask is not None else float(w * h),
                "iscrowd": int(obj.iscrowd),
                **obj.extra,
            }
            if obj.mask is not None:
                ann["segmentation"] = mask_to_rle(obj.mask)
            annotations.append(ann)
        scene_id = self.writer.add_image(
            "scenes", split, pixels, annotations=annotations, semantic_mask=semantic_mask, extra=extra
        )
        self._sizes.append(pixels.shape[:2])
        for obj in objects:
            if obj.crop:
                crop = crop_object(pixels, obj.bbox, self.crop_size)
                crop_extra = {**extra, "scene_id": scene_id, "box": [float(v) for v in obj.bbox]}
                self.writer.add_image("crops", split, crop, label=obj.category, extra=crop_extra)

    def size_range(self) -> dict[str, list[int]]:
        """Smallest and largest scene [height, width], for the manifest."""
        if not self._sizes:
            return {}
        hs, ws = zip(*self._sizes, strict=True)
        return {"min": [int(min(hs)), int(min(ws))], "max": [int(max(hs)), int(max(ws))]}


def check_split_mapping(splits: dict[str, str]) -> None:
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise ValueError(f"splits: unknown canonical split {unknown[0]!r}; expected some of {list(SPLITS)}")
    if "train" not in splits:
        raise ValueError("splits: 'train' must name a source split (the others may be carved from it)")
    if len(set(splits.values())) != len(splits):
        raise ValueError("splits: two canonical splits name the same source split")


def carve_splits(n_records: int, mapped: set[str], cfg: ImporterConfig) -> dict[str, list[int]]:
    """Positions of the train source's records per canonical split: splits the source lacks are
    carved out (seeded); the share carved for a split the source has goes back to train."""
    positions = list(range(n_records))
    if all(s in mapped for s in SPLITS) or not positions:
        return {"train": positions}
    held = assign_holdout(positions, cfg)
    plan = {"train": list(held["train"])}
    for split in ("val", "test"):
        if split in mapped:
            plan["train"] += held[split]
        else:
            plan[split] = held[split]
    return {s: sorted(v) for s, v in plan.items()}


# -- COCO ---------------------------------------------------------------------------------------


@dataclass
class Config(ImporterConfig):
    """``datasets.<name>`` with ``format: coco``."""

    # canonical split -> source split name; a canonical split left out is carved from train
    splits: dict[str, str] = field(default_factory=lambda: {"train": "train2017", "val": "val2017"})
    annotation_file: str = "annotations/instances_{split}.json"  # relative to the source
    images_dir: str = "{split}"  # relative to the source; holds each image's file_name

    def validate(self) -> None:
        check_split_mapping(self.splits)
        for name in ("annotation_file", "images_dir"):
            try:
                getattr(self, name).format(split="x")
            except (KeyError, IndexError, ValueError):
                raise ValueError(f"{name}: only the placeholder {{split}} is allowed") from None


@dataclass
class _Source:
    """One source split's JSON, indexed: valid image records and their annotations."""

    json_path: Path
    image_dir: Path
    n_records: int
    images: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # (position, record)
    annotations: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    bad_images: set[int] = field(default_factory=set)


def import_to(out: Path, cfg: Config) -> None:
    """Import the COCO source ``cfg.source`` into ``out`` (atomically)."""
    root = local_root(cfg)
    order = sorted(cfg.splits, key=SPLITS.index)  # train first: its categories are the reference
    loaded = {c: _load_json(root / cfg.annotation_file.format(split=cfg.splits[c])) for c in order}
    categories, failures = _categories(loaded)
    usable = {c: pd for c, pd in loaded.items() if not isinstance(pd[1], SampleError)}
    with DatasetWriter(out, name=out.name, categories=[name for _, name in categories]) as writer:
        validator = Validator(cfg.validation, writer)
        for err in failures:
            reject(validator, err)
        cat_index = {cid: i for i, (cid, _) in enumerate(categories)}
        sources = {
            canon: _index(path, data, root / cfg.images_dir.format(split=cfg.splits[canon]), validator)
            for canon, (path, data) in usable.items()
        }
        has_masks = any(_has_segmentation(src) for src in sources.values())
        scenes = SceneWriter(writer, cfg.crop_size)
        for split, items in _plan(sources, cfg).items():
            for src, record in items:
                try:
                    pixels, objects = _read_scene(src, record, cat_index)
                except SampleError as err:
                    reject(validator, err)
                    continue
                semantic = compose_semantic_mask(objects, *pixels.shape[:2]) if has_masks else None
                extra = {"source_file": record["file_name"], "source_id": record["id"]}
                scenes.add(split, pixels, objects, semantic_mask=semantic, extra=extra)
        scenes.set_manifest(cfg, FORMAT)


# -- the JSON files --------------------------------------------------------------------------
def _load_json(path: Path) -> tuple[Path, dict[str, Any] | SampleError]:
    """The parsed JSON, or the error that makes the whole file unusable (kept, not raised yet,
    because the writer that records it needs the categories of the files that are usable)."""
    try:
        data = load_json(path)
        if not isinstance(data, dict):
            raise SampleError(path, f"expected a JSON object at top level, got {type(data).__name__}")
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                raise SampleError(path, f"no {key!r} list (not a COCO instances file)")
        categories = []
        for c in data["categories"]:
            if not (isinstance(c, dict) and isinstance(c.get("id"), int) and isinstance(c.get("name"), str)):
                raise SampleError(path, f"category {c!r} lacks an integer 'id' or a 'name'")
            categories.append((c["id"], c["name"]))
        check_unique((cid for cid, _ in categories), "category", path)
        data["categories"] = sorted(categories)
        return path, data
    except SampleError as err:
        return path, RejectedInput(err.file, err.reason, _bytes_or_none(path))


def _categories(loaded: dict[str, tuple[Path, Any]]) -> tuple[list[tuple[int, str]], list[SampleError]]:
    """The category list (from train when usable) and the files that cannot be used; a file
    whose categories differ from the reference is marked unusable in ``loaded``."""
    failures = [data for _, data in loaded.values() if isinstance(data, SampleError)]
    usable = [(c, path, data) for c, (path, data) in loaded.items() if not isinstance(data, SampleError)]
    if not usable:
        raise failures[0]
    _, ref_path, ref = usable[0]
    for canon, path, data in usable[1:]:
        if data["categories"] != ref["categories"]:
            err = RejectedInput(path, f"categories differ from those in {ref_path}", _bytes_or_none(path))
            failures.append(err)
            loaded[canon] = (path, err)
    if not ref["categories"]:
        raise SampleError(ref_path, "no categories")
    return ref["categories"], failures


def _index(path: Path, data: dict[str, Any], image_dir: Path, validator: Validator) -> _Source:
    """Check the image and annotation records' ids and links; reject the records that fail."""
    src = _Source(json_path=path, image_dir=image_dir, n_records=len(data["images"]))
    ids = Counter(_int_id(r) for r in data["images"])
    gone: set[int | None] = set()  # ids of rejected image records: their annotations leave with them
    for pos, record in enumerate(data["images"]):
        try:
            _check_image_record(record, pos, path)
            if ids[record["id"]] > 1:
                raise SampleError(f"{path} (image {record['id']})", f"duplicate image id {record['id']!r}")
        except SampleError as err:
            gone.add(_int_id(record))
            reject(validator, RejectedInput(err.file, err.reason, _record_bytes(record)))
            continue
        src.images.append((pos, record))
    known = {r["id"] for _, r in src.images}
    ann_ids = Counter(_int_id(a) for a in data["annotations"])
    for pos, ann in enumerate(data["annotations"]):
        image_id = _int_id(ann, "image_id")
        ann_id = _int_id(ann)
        where = f"{path} (image {image_id!r}, annotation {ann_id if ann_id is not None else '#' + str(pos)})"
        if image_id is not None and image_id in gone:
            continue
        reason = None
        if ann_id is None:
            reason = "annotation record is not an object with an integer 'id'"
        elif ann_ids[ann_id] > 1:
            reason = f"duplicate annotation id {ann_id!r}"
        elif image_id not in known:
            reason = f"refers to image id {image_id!r}, which is not among the file's images"
        if reason is None:
            src.annotations.setdefault(image_id, []).append(ann)
            continue
        if image_id in known:
            src.bad_images.add(image_id)
        reject(validator, RejectedInput(where, reason, _record_bytes(ann)))
    return src


def _check_image_record(record: Any, pos: int, path: Path) -> None:
    if not isinstance(record, dict) or not isinstance(record.get("id"), int):
        raise SampleError(f"{path} (image record #{pos})", "image record is not an object with an integer 'id'")
    where = f"{path} (image {record['id']})"
    if not isinstance(record.get("file_name"), str) or not record["file_name"]:
        raise SampleError(where, "image record has no 'file_name'")
    for key in ("width", "height"):
        if not isinstance(record.get(key), int) or record[key] <= 0:
            raise SampleError(where, f"image record's {key!r} is not a positive integer")


def _plan(sources: dict[str, _Source], cfg: Config) -> dict[str, list[tuple[_Source, dict[str, Any]]]]:
    """Canonical split -> (source, image record); whole images go to exactly one split."""
    plan: dict[str, list[tuple[_Source, dict[str, Any]]]] = {s: [] for s in SPLITS}
    train = sources.get("train")
    if train is not None:
        for canon, positions in carve_splits(train.n_records, set(cfg.splits), cfg).items():
            chosen = set(positions)
            plan[canon] = [(train, r) for pos, r in train.images if pos in chosen]
    for canon, src in sources.items():
        if canon != "train":
            plan[canon] = [(src, r) for _, r in src.images]
    return plan


# -- one image -------------------------------------------------------------------------------
def _read_scene(src: _Source, record: dict[str, Any], cat_index: dict[int, int]) -> tuple[np.ndarray, list]:
    """Decoded pixels and checked objects of one image record; any problem raises."""
    if record["id"] in src.bad_images:
        raise SampleError(f"{src.json_path} (image {record['id']})", "has a rejected annotation")
    image_path = src.image_dir / record["file_name"]
    data, pixels = read_image_file(image_path)
    height, width = pixels.shape[:2]
    if (record["width"], record["height"]) != (width, height):
        reason = (
            f"image is {width}x{height} pixels but {src.json_path} (image {record['id']}) "
            f"says {record['width']}x{record['height']}"
        )
        raise RejectedInput(image_path, reason, data)
    objects = []
    for ann in src.annotations.get(record["id"], []):
        where = f"{src.json_path} (image {record['id']}, annotation {ann['id']})"
        try:
            objects.append(_parse_annotation(ann, where, height, width, cat_index))
        except SampleError as err:
            raise RejectedInput(err.file, err.reason, _record_bytes(ann)) from None
    return pixels, objects


def _parse_annotation(ann: dict, where: str, height: int, width: int, cat_index: dict[int, int]) -> SceneObject:
    cid = ann.get("category_id")
    if not isinstance(cid, int) or cid not in cat_index:
        raise SampleError(where, f"unknown category id {cid!r} (known: {sorted(cat_index)})")
    bbox = check_box(ann.get("bbox"), width, height, where)
    crowd = ann.get("iscrowd", 0)
    if crowd not in (0, 1):
        raise SampleError(where, f"iscrowd must be 0 or 1, got {crowd!r}")
    seg = ann.get("segmentation")
    mask = decode_segmentation(seg, height, width, where) if seg else None
    return SceneObject(
        bbox=fit_box(bbox, width, height, where),
        category=cat_index[cid],
        mask=mask,
        iscrowd=bool(crowd),
        crop=not crowd,
        extra={"source_id": ann["id"]},
    )


def decode_segmentation(seg: Any, height: int, width: int, where: str) -> np.ndarray:
    """HxW uint8 mask of COCO polygons, uncompressed or compressed RLE, fully checked first:
    pycocotools decodes counts that do not cover the image into uninitialised memory."""
    if isinstance(seg, list):
        for poly in seg:
            ok = isinstance(poly, list) and len(poly) % 2 == 0
            if not ok or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in poly):
                raise SampleError(where, "polygon is not a list of x, y number pairs")
        # a fragment of one or two points encloses no area (and pycocotools would read four numbers
        # as a box), so it is left out; an object made only of such fragments is an error
        polygons = [poly for poly in seg if len(poly) >= 6]
        if not polygons:
            raise SampleError(where, "segmentation has no polygon with 3 or more points")
        rle = coco_mask.merge(coco_mask.frPyObjects(polygons, height, width))
    elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
        size, counts = seg["size"], seg["counts"]
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
            raise SampleError(where, f"RLE size {size!r} is not [height, width]")
        if isinstance(counts, list):
            runs = counts
            rle = None
        elif isinstance(counts, str):
            runs = _compressed_runs(counts, where)
            rle = {"size": size, "counts": counts.encode("ascii")}
        else:
            raise SampleError(where, "RLE counts are neither a list nor a string")
        if not all(isinstance(v, int) and v >= 0 for v in runs) or sum(runs) != size[0] * size[1]:
            raise SampleError(where, f"RLE counts do not cover the {size[0]}x{size[1]} mask exactly")
        rle = rle or coco_mask.frPyObjects(seg, *size)
    else:
        raise SampleError(where, "segmentation is neither polygons nor an RLE object")
    try:
        mask = np.ascontiguousarray(coco_mask.decode(rle))
    except ValueError as exc:
        raise SampleError(where, f"undecodable segmentation ({exc})") from None
    return check_mask_shape(mask, height, width, where)


def _compressed_runs(counts: str, where: str) -> list[int]:
    """Run lengths of a compressed RLE string (pycocotools' rleFrString, with bounds checks)."""
    runs: list[int] = []
    p = 0
    while p < len(counts):
        x, k, more = 0, 0, True
        while more:
            if p >= len(counts) or not 48 <= ord(counts[p]) < 112:
                raise SampleError(where, "malformed compressed RLE counts")
            c = ord(counts[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


def _int_id(record: Any, key: str = "id") -> int | None:
    """``record[key]`` when it is an integer id (None otherwise, so a malformed one cannot crash)."""
    value = record.get(key) if isinstance(record, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _has_segmentation(src: _Source) -> bool:
    return any(a.get("segmentation") for anns in src.annotations.values() for a in anns)


def _record_bytes(record: Any) -> bytes:
    return json.dumps(record, indent=1).encode("utf-8")


def _bytes_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None
