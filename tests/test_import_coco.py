"""The COCO importer: a genuine-format source into the canonical format, and every kind of bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as coco_mask

from components.config import ConfigError, from_dict
from components.data.canonical import DatasetError, read_info, read_manifest, read_split, rle_to_mask, verify_checksums
from components.data.importers import coco
from components.data.loaders import ImageLabelDataset
from components.methods import create_method
from pipelines import prepare
from tests.genuine_formats import COCO_CATEGORIES, SIZE, compressed_rle, edit_json, write_coco

TRAIN_JSON = "instances_train2017.json"
VAL_JSON = "instances_val2017.json"


@pytest.fixture
def src(tmp_path) -> Path:
    root = tmp_path / "coco"
    write_coco(root)
    return root


def _cfg(src: Path, **overrides) -> coco.Config:
    return from_dict(coco.Config, {"format": "coco", "source": str(src), "crop_size": 16, **overrides}, source="test")


def _source_mask(seg, height: int, width: int) -> np.ndarray:
    """The source segmentation decoded by pycocotools directly, as the reference."""
    if isinstance(seg, list):
        return coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(seg, height, width)))
    if isinstance(seg["counts"], list):
        return coco_mask.decode(coco_mask.frPyObjects(seg, height, width))
    return coco_mask.decode({"size": seg["size"], "counts": seg["counts"].encode()})


def _assert_nothing_left(out: Path) -> None:
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if ".partial" in p.name]


def test_import_counts_boxes_masks_and_semantics(src, tmp_path):
    out = tmp_path / "prepared" / "mycoco"
    coco.import_to(out, _cfg(src))
    verify_checksums(out)
    manifest = read_manifest(out)
    assert manifest["classes"] == ["square", "disc", "ring"]
    assert manifest["format"] == "coco" and manifest["image_size"] == [16, 16] and manifest["quarantined"] == 0
    # 10 train images: 1 carved for test (val comes from val2017, so its carved share stays in train)
    scenes, crops = manifest["views"]["scenes"]["counts"], manifest["views"]["crops"]["counts"]
    assert {s: c["images"] for s, c in scenes.items()} == {"train": 9, "val": 3, "test": 1}
    assert {s: c["images"] for s, c in crops.items()} == {"train": 18, "val": 6, "test": 2}
    assert scenes["val"]["annotations"] == 7  # two objects per image and one crowd

    sources = {}
    for name in (TRAIN_JSON, VAL_JSON):
        data = json.loads((src / "annotations" / name).read_text())
        sources.update({a["id"]: a for a in data["annotations"]})
    index = {c["id"]: i for i, c in enumerate(COCO_CATEGORIES)}
    seen = set()
    for split in ("train", "val", "test"):
        split_coco = read_split(out, "scenes", split)
        anns = {}
        for a in split_coco["annotations"]:
            anns.setdefault(a["image_id"], []).append(a)
        for record in split_coco["images"]:
            seen.add(record["source_file"])
            folder = "val2017" if split == "val" else "train2017"
            source_pixels = np.asarray(Image.open(src / folder / record["source_file"]).convert("RGB"))
            assert np.array_equal(np.asarray(Image.open(out / "scenes" / record["file_name"])), source_pixels)
            semantic = np.asarray(Image.open(out / "scenes" / record["semantic_mask"]))
            expected = np.zeros((SIZE, SIZE), dtype=np.uint8)
            for a in sorted(anns[record["id"]], key=lambda a: -a["iscrowd"]):
                source = sources[a["source_id"]]
                assert a["bbox"] == source["bbox"] and a["category_id"] == index[source["category_id"]]
                mask = rle_to_mask(a["segmentation"])
                assert np.array_equal(mask, _source_mask(source["segmentation"], SIZE, SIZE))
                expected[mask.astype(bool)] = 255 if a["iscrowd"] else a["category_id"] + 1
            assert np.array_equal(semantic, expected)
        crops = read_split(out, "crops", split)
        assert all(im["width"] == 16 and im["source_file"] in seen for im in crops["images"])
    assert len(seen) == 13  # every image in exactly one split


def test_same_seed_same_dataset_and_crops_train_a_classifier(src, tmp_path):
    a, b = tmp_path / "a" / "mycoco", tmp_path / "b" / "mycoco"
    coco.import_to(a, _cfg(src, seed=1))
    coco.import_to(b, _cfg(src, seed=1))
    assert read_manifest(a)["checksums"] == read_manifest(b)["checksums"]

    torch.manual_seed(0)
    method = create_method("classifier", {"widths": [8, 16], "blocks": [1, 1]}, source="test", key="x")
    model = method.build(read_info(a))
    loader = torch.utils.data.DataLoader(ImageLabelDataset(a, "crops", "train"), batch_size=8, shuffle=True)
    losses = method.training_step(model, next(iter(loader)))
    total = sum(losses.values())
    total.backward()
    assert math.isfinite(total.item())


# -- bad inputs ----------------------------------------------------------------------------------
def _truncate(src: Path) -> None:
    path = src / "train2017" / "000000000003.png"
    path.write_bytes(path.read_bytes()[:200])


def _garbage(src: Path) -> None:
    (src / "train2017" / "000000000003.png").write_bytes(b"this is not an image at all" * 10)


def _sixteen_bit(src: Path) -> None:
    Image.fromarray(np.full((SIZE, SIZE), 40000, dtype=np.uint16)).save(src / "train2017" / "000000000003.png")


def _cmyk(src: Path) -> None:
    Image.new("CMYK", (SIZE, SIZE)).save(src / "train2017" / "000000000003.png", format="TIFF")


def _missing_file(src: Path) -> None:
    (src / "train2017" / "000000000003.png").unlink()


def _ann(change):
    """Edit the first annotation of the train JSON."""
    return lambda src: edit_json(src / "annotations" / TRAIN_JSON, lambda d: change(d["annotations"][0]))


def _orphan(src: Path) -> None:
    def add(d):
        d["annotations"].append({**d["annotations"][0], "id": 9999, "image_id": 999})

    edit_json(src / "annotations" / TRAIN_JSON, add)


def _size_mismatch(src: Path) -> None:
    edit_json(src / "annotations" / TRAIN_JSON, lambda d: d["images"][0].update(width=50))


def _dup_image(src: Path) -> None:
    edit_json(src / "annotations" / TRAIN_JSON, lambda d: d["images"][1].update(id=d["images"][0]["id"]))


def _dup_ann(src: Path) -> None:
    edit_json(src / "annotations" / TRAIN_JSON, lambda d: d["annotations"][1].update(id=d["annotations"][0]["id"]))


BAD = {
    "truncated": (_truncate, ["000000000003.png", "truncated"]),
    "not-an-image": (_garbage, ["000000000003.png", "unreadable"]),
    "16-bit": (_sixteen_bit, ["000000000003.png", "unsupported image mode 'I;16'"]),
    "cmyk": (_cmyk, ["000000000003.png", "unsupported image mode 'CMYK'"]),
    "missing-image-file": (_missing_file, ["000000000003.png", "not found"]),
    "annotation-without-image": (_orphan, [TRAIN_JSON, "annotation 9999", "image id 999"]),
    "unknown-category": (_ann(lambda a: a.update(category_id=42)), [TRAIN_JSON, "annotation 1", "unknown category"]),
    "zero-width-box": (_ann(lambda a: a["bbox"].__setitem__(2, 0)), [TRAIN_JSON, "annotation 1", "non-positive"]),
    "box-outside": (_ann(lambda a: a.update(bbox=[40, 2, 20, 5])), [TRAIN_JSON, "annotation 1", "outside the 48x48"]),
    "mask-shape": (
        _ann(lambda a: a.update(segmentation=compressed_rle(np.ones((24, 24), bool)))),
        [TRAIN_JSON, "annotation 1", "mask of shape 24x24 for a 48x48 image"],
    ),
    "rle-counts": (
        _ann(lambda a: a.update(segmentation={"size": [SIZE, SIZE], "counts": [3, 5]})),
        [TRAIN_JSON, "annotation 1", "RLE counts do not cover"],
    ),
    "degenerate-polygon": (
        _ann(lambda a: a.update(segmentation=[[1, 1, 5, 5]])),
        [TRAIN_JSON, "annotation 1", "no polygon with 3 or more points"],
    ),
    "json-size-differs": (_size_mismatch, ["000000000001.png", "image is 48x48 pixels", "says 50x48"]),
    "duplicate-image-id": (_dup_image, [TRAIN_JSON, "duplicate image id 1"]),
    "duplicate-annotation-id": (_dup_ann, [TRAIN_JSON, "duplicate annotation id 1"]),
    "malformed-json": (
        lambda src: (src / "annotations" / VAL_JSON).write_text('{"images": ['),
        [VAL_JSON, "malformed JSON at line 1"],
    ),
    "not-utf8-json": (
        lambda src: (src / "annotations" / VAL_JSON).write_bytes(b'{"images": "\xff\xfe"}'),
        [VAL_JSON, "not UTF-8"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_fails_naming_file_and_reason(case, src, tmp_path):
    corrupt, expected = BAD[case]
    corrupt(src)
    out = tmp_path / "prepared" / "mycoco"
    with pytest.raises(DatasetError) as info:
        coco.import_to(out, _cfg(src))
    for words in expected:
        assert words in str(info.value)
    _assert_nothing_left(out)


def test_split_emptied_by_quarantine_fails(src, tmp_path):
    for path in (src / "val2017").iterdir():
        path.unlink()
    out = tmp_path / "prepared" / "mycoco"
    with pytest.raises(DatasetError, match=r"scenes/val\.json: split 'val' is empty"):
        coco.import_to(out, _cfg(src, validation="quarantine"))
    _assert_nothing_left(out)


def test_quarantine_sets_bad_samples_aside_with_reasons(src, tmp_path):
    _truncate(src)
    _orphan(src)
    edit_json(src / "annotations" / VAL_JSON, lambda d: d["annotations"][0].update(category_id=42))
    out = tmp_path / "mycoco"
    coco.import_to(out, _cfg(src, validation="quarantine"))
    manifest = read_manifest(out)
    report = json.loads((out / "quarantine" / "report.json").read_text())["quarantined"]
    assert manifest["quarantined"] == len(report) == 3
    reasons = {Path(e["source"].split(" (")[0]).name: e["reason"] for e in report}
    assert "truncated" in reasons["000000000003.png"]
    assert "image id 999" in reasons[TRAIN_JSON] and "unknown category id 42" in reasons[VAL_JSON]
    assert all((out / e["kept_as"]).is_file() for e in report)
    scenes = manifest["views"]["scenes"]["counts"]
    assert sum(c["images"] for c in scenes.values()) == 13 - 2  # the truncated image and the val image
    verify_checksums(out)


# -- through the stage entry point ---------------------------------------------------------------
def _params(tmp_path: Path, src: Path) -> Path:
    p = tmp_path / "params.yaml"
    section = f"datasets:\n  mycoco:\n    format: coco\n    source: {src}\n    crop_size: 16\n    seed: 3\n"
    p.write_text(section + "    splits: {train: train2017, val: val2017}\n    images_dir: '{split}'\n")
    return p


def test_prepare_stage_imports_coco(src, tmp_path, capsys):
    p = _params(tmp_path, src)
    assert prepare.main(["--dataset", "mycoco", "--params", str(p), "--out", str(tmp_path / "out")]) == 0
    assert read_manifest(tmp_path / "out")["seed"] == 3
    _missing_file(src)
    assert prepare.main(["--dataset", "mycoco", "--params", str(p), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "000000000003.png" in err and "image file not found" in err
    _assert_nothing_left(tmp_path / "bad")


@pytest.mark.parametrize(
    ("splits", "words"),
    [
        ({"val": "val2017"}, "'train' must name a source split"),
        ({"train": "train2017", "test": "train2017"}, "two canonical splits name the same source split"),
        ({"train": "train2017", "dev": "val2017"}, "unknown canonical split 'dev'"),
    ],
)
def test_split_mapping_is_checked(splits, words, tmp_path):
    with pytest.raises(ConfigError, match=words):
        _cfg(tmp_path, splits=splits)
