"""Tiny sources in genuine COCO and Pascal VOC layouts, written for the importer tests.

Each scene is a noisy background with non-overlapping shapes; the writers return what they drew
(0-based ``[x, y, w, h]`` boxes and binary masks) so tests compare imports with the drawing.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

SIZE = 48
# non-contiguous ids, as in real COCO files
COCO_CATEGORIES = [
    {"id": 1, "name": "square", "supercategory": "shape"},
    {"id": 3, "name": "disc", "supercategory": "shape"},
    {"id": 7, "name": "ring", "supercategory": "shape"},
]
VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    base = rng.uniform(40, 200, size=3)
    return np.clip(base + rng.normal(0, 12, size=(size, size, 3)), 0, 255)


def _ellipse(size: int, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0


def _rectangle(size: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _box_of(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


Shapes = list[tuple[str, np.ndarray]]


def draw_scene(rng: np.random.Generator, kind: str, size: int = SIZE) -> tuple[np.ndarray, Shapes]:
    """Pixels and [(shape name, mask)]: a rectangle on the left, a ``kind`` (disc or ring) on the right."""
    img = _background(rng, size)
    x0, y0 = int(rng.integers(2, 8)), int(rng.integers(2, 20))
    rect = _rectangle(size, x0, y0, x0 + int(rng.integers(10, 16)), y0 + int(rng.integers(10, 20)))
    cx, cy = rng.uniform(34, 38), rng.uniform(16, 30)
    other = _ellipse(size, cx, cy, 8, 10)
    if kind == "ring":
        other &= ~_ellipse(size, cx, cy, 4, 5)
    shapes = [("square", rect), (kind, other)]
    for _, mask in shapes:
        img[mask] = rng.uniform(0, 255, size=3)
    return img.astype(np.uint8), shapes


def uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE (column-major runs, starting with background)."""
    flat = mask.astype(np.uint8).flatten(order="F")
    runs, current, n = [], 0, 0
    for v in flat:
        if v != current:
            runs.append(n)
            current, n = v, 0
        n += 1
    runs.append(n)
    return {"size": list(mask.shape), "counts": runs}


def compressed_rle(mask: np.ndarray) -> dict[str, Any]:
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def write_coco(root: Path, splits: dict[str, int] | None = None, seed: int = 0) -> dict[str, Any]:
    """``annotations/instances_<split>.json`` + ``<split>/<n>.png``; squares as polygons, discs as
    compressed RLE, rings as uncompressed RLE; the first image of the last split gets a crowd."""
    splits = splits or {"train2017": 10, "val2017": 3}
    rng = np.random.default_rng(seed)
    cat_id = {c["name"]: c["id"] for c in COCO_CATEGORIES}
    truth: dict[str, Any] = {}
    image_id, ann_id = 0, 0
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, n in splits.items():
        images, annotations = [], []
        (root / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image_id += 1
            pixels, shapes = draw_scene(rng, "disc" if i % 2 == 0 else "ring")
            file_name = f"{image_id:012d}.png"
            Image.fromarray(pixels).save(root / split / file_name)
            images.append({"id": image_id, "file_name": file_name, "width": SIZE, "height": SIZE})
            if split == list(splits)[-1] and i == 0:
                shapes.append(("crowd", _rectangle(SIZE, 20, 40, 30, 46)))
            truth[file_name] = {"pixels": pixels, "objects": []}
            for name, mask in shapes:
                ann_id += 1
                x, y, w, h = _box_of(mask)
                if name == "square":
                    seg: Any = [[x, y, x + w, y, x + w, y + h, x, y + h]]
                else:
                    seg = compressed_rle(mask) if name == "disc" else uncompressed_rle(mask)
                crowd = int(name == "crowd")
                category = cat_id["disc" if crowd else name]
                ann = {"id": ann_id, "image_id": image_id, "category_id": category, "bbox": [x, y, w, h]}
                annotations.append({**ann, "area": float(mask.sum()), "iscrowd": crowd, "segmentation": seg})
                truth[file_name]["objects"].append({"ann_id": ann_id, "name": name, "bbox": [x, y, w, h]})
        coco = {"info": {"description": "test"}, "images": images, "annotations": annotations}
        coco["categories"] = COCO_CATEGORIES
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    return truth


def edit_json(path: Path, change) -> None:
    """Apply ``change(data)`` to a JSON file in place."""
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


# -- Pascal VOC --------------------------------------------------------------------------------
def _palette() -> list[int]:
    """The VOC colour map (index -> RGB), so the PNGs look like the real ones."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def save_index_png(path: Path, indices: np.ndarray) -> None:
    im = Image.fromarray(indices.astype(np.uint8), mode="P")
    im.putpalette(_palette())
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def voc_xml(file_name: str, width: int, height: int, objects: list[dict[str, Any]]) -> bytes:
    ann = ET.Element("annotation")
    ET.SubElement(ann, "folder").text = "VOC2012"
    ET.SubElement(ann, "filename").text = file_name
    size = ET.SubElement(ann, "size")
    for tag, v in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(v)
    ET.SubElement(ann, "segmented").text = "0"
    for obj in objects:
        el = ET.SubElement(ann, "object")
        ET.SubElement(el, "name").text = obj["name"]
        ET.SubElement(el, "pose").text = "Unspecified"
        ET.SubElement(el, "truncated").text = "0"
        ET.SubElement(el, "difficult").text = str(int(obj.get("difficult", False)))
        x, y, w, h = obj["bbox"]
        box = ET.SubElement(el, "bndbox")
        # VOC: 1-based, inclusive pixel coordinates
        for tag, v in (("xmin", x + 1), ("ymin", y + 1), ("xmax", x + w), ("ymax", y + h)):
            ET.SubElement(box, tag).text = str(int(v))
    return ET.tostring(ann)


def write_voc(root: Path, splits: dict[str, int] | None = None, seed: int = 0) -> dict[str, Any]:
    """A VOC2012-style folder; every other image has segmentation PNGs (with a void border around
    each object), every third a small ``difficult`` person."""
    splits = splits or {"train": 10, "val": 3}
    rng = np.random.default_rng(seed)
    truth: dict[str, Any] = {}
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    n = 0
    for split, count in splits.items():
        ids = []
        for _ in range(count):
            n += 1
            image_id = f"2012_{n:06d}"
            ids.append(image_id)
            pixels, shapes = draw_scene(rng, "disc")
            named = [("cat", shapes[0][1], False), ("dog", shapes[1][1], False)]
            if n % 3 == 0:
                named.append(("person", _rectangle(SIZE, 20, 40, 26, 47), True))
            objects = [{"name": c, "bbox": _box_of(m), "mask": m, "difficult": d} for c, m, d in named]
            Image.fromarray(pixels).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
            (root / "Annotations" / f"{image_id}.xml").write_bytes(voc_xml(f"{image_id}.jpg", SIZE, SIZE, objects))
            segmented = n % 2 == 1
            if segmented:
                inst = np.zeros((SIZE, SIZE), dtype=np.uint8)
                cls = np.zeros((SIZE, SIZE), dtype=np.uint8)
                for k, obj in enumerate(objects, 1):
                    border = _dilate(obj["mask"]) & ~obj["mask"]
                    inst[border], cls[border] = 255, 255
                    inst[obj["mask"]], cls[obj["mask"]] = k, VOC_CLASSES.index(obj["name"]) + 1
                save_index_png(root / "SegmentationObject" / f"{image_id}.png", inst)
                save_index_png(root / "SegmentationClass" / f"{image_id}.png", cls)
                for k, obj in enumerate(objects, 1):
                    obj["mask"] = inst == k  # what survives the void border of later objects
            truth[image_id] = {"objects": objects, "segmented": segmented}
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return truth


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out
