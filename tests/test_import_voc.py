"""The Pascal VOC importer: a genuine-format source into the canonical format, and every kind of bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from components.config import from_dict
from components.data.canonical import DatasetError, read_info, read_manifest, read_split, rle_to_mask, verify_checksums
from components.data.importers import voc
from components.data.loaders import ImageLabelDataset
from components.methods import create_method
from pipelines import prepare
from tests.genuine_formats import SIZE, VOC_CLASSES, save_index_png, write_voc

FIRST = "2012_000001"  # segmented, no difficult object
THIRD = "2012_000003"  # segmented, with a difficult person


@pytest.fixture
def written(tmp_path) -> tuple[Path, dict]:
    root = tmp_path / "VOC2012"
    return root, write_voc(root)


@pytest.fixture
def src(written) -> Path:
    return written[0]


@pytest.fixture
def truth(written) -> dict:
    return written[1]  # what was drawn, per image id


def _cfg(src: Path, **overrides) -> voc.Config:
    return from_dict(voc.Config, {"format": "voc", "source": str(src), "crop_size": 16, **overrides}, source="test")


def _assert_nothing_left(out: Path) -> None:
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if ".partial" in p.name]


def test_import_counts_boxes_masks_and_semantics(src, truth, tmp_path):
    out = tmp_path / "prepared" / "myvoc"
    voc.import_to(out, _cfg(src))
    verify_checksums(out)
    manifest = read_manifest(out)
    assert manifest["classes"] == VOC_CLASSES and manifest["format"] == "voc" and manifest["quarantined"] == 0
    assert manifest["image_size"] == [16, 16] and manifest["carved_splits"] == ["test"]
    scenes, crops = manifest["views"]["scenes"]["counts"], manifest["views"]["crops"]["counts"]
    assert {s: c["images"] for s, c in scenes.items()} == {"train": 9, "val": 3, "test": 1}
    n_crops = sum(c["images"] for c in crops.values())
    assert n_crops == sum(1 for t in truth.values() for o in t["objects"] if not o["difficult"])

    seen = set()
    for split in ("train", "val", "test"):
        split_coco = read_split(out, "scenes", split)
        anns: dict[int, list] = {}
        for a in split_coco["annotations"]:
            anns.setdefault(a["image_id"], []).append(a)
        for record in split_coco["images"]:
            image_id = record["source_id"]
            seen.add(image_id)
            expected_objects = truth[image_id]["objects"]
            got = anns[record["id"]]
            assert [a["bbox"] for a in got] == [o["bbox"] for o in expected_objects]
            assert [a["category_id"] for a in got] == [VOC_CLASSES.index(o["name"]) for o in expected_objects]
            assert [a.get("difficult", 0) for a in got] == [int(o["difficult"]) for o in expected_objects]
            if truth[image_id]["segmented"]:
                for a, o in zip(got, expected_objects, strict=True):
                    assert np.array_equal(rle_to_mask(a["segmentation"]).astype(bool), o["mask"])
                semantic = np.asarray(Image.open(out / "scenes" / record["semantic_mask"]))
                source = np.asarray(Image.open(src / "SegmentationClass" / f"{image_id}.png"))
                assert np.array_equal(semantic, source) and set(np.unique(semantic)) <= {0, 8, 12, 15, 255}
            else:
                assert "semantic_mask" not in record and all("segmentation" not in a for a in got)
        labels = {im["label"] for im in read_split(out, "crops", split)["images"]}
        assert labels <= {VOC_CLASSES.index("cat"), VOC_CLASSES.index("dog")}  # difficult persons: no crop
    assert len(seen) == 13


def test_crops_train_a_classifier(src, tmp_path):
    out = tmp_path / "myvoc"
    voc.import_to(out, _cfg(src))
    torch.manual_seed(0)
    method = create_method("classifier", {"widths": [8, 16], "blocks": [1, 1]}, source="test", key="x")
    model = method.build(read_info(out))
    loader = torch.utils.data.DataLoader(ImageLabelDataset(out, "crops", "train"), batch_size=8, shuffle=True)
    losses = method.training_step(model, next(iter(loader)))
    total = sum(losses.values())
    total.backward()
    assert math.isfinite(total.item())


# -- bad inputs ----------------------------------------------------------------------------------
def _xml(src: Path, image_id: str = FIRST) -> Path:
    return src / "Annotations" / f"{image_id}.xml"


def _edit_xml(old: str, new: str, count: int = 1):
    def change(src: Path) -> None:
        text = _xml(src).read_text()
        assert old in text
        _xml(src).write_text(text.replace(old, new, count))

    return change


def _jpeg(src: Path) -> Path:
    return src / "JPEGImages" / f"{FIRST}.jpg"


def _truncate(src: Path) -> None:
    _jpeg(src).write_bytes(_jpeg(src).read_bytes()[:300])


def _cmyk(src: Path) -> None:
    Image.new("CMYK", (SIZE, SIZE), (0, 50, 100, 0)).save(_jpeg(src), format="JPEG")


def _sixteen_bit(src: Path) -> None:
    Image.fromarray(np.full((SIZE, SIZE), 40000, dtype=np.uint16)).save(_jpeg(src), format="PNG")


def _small_object_png(src: Path) -> None:
    save_index_png(src / "SegmentationObject" / f"{FIRST}.png", np.zeros((24, 24), np.uint8))


def _object_index_too_high(src: Path) -> None:
    path = src / "SegmentationObject" / f"{FIRST}.png"
    indices = np.array(Image.open(path))
    indices[0, 0] = 7
    save_index_png(path, indices)


def _duplicate_in_lists(src: Path) -> None:
    with open(src / "ImageSets" / "Main" / "val.txt", "a") as f:
        f.write(f"{FIRST}\n")


BAD = {
    "truncated": (_truncate, [f"{FIRST}.jpg", "truncated"]),
    "cmyk": (_cmyk, [f"{FIRST}.jpg", "unsupported image mode 'CMYK'"]),
    "16-bit": (_sixteen_bit, [f"{FIRST}.jpg", "unsupported image mode 'I;16'"]),
    "missing-image-file": (lambda s: _jpeg(s).unlink(), [f"{FIRST}.jpg", "image file not found"]),
    "missing-xml": (lambda s: _xml(s).unlink(), [f"{FIRST}.xml", "annotation file not found"]),
    "malformed-xml": (_edit_xml("</annotation>", "</annotatio>"), [f"{FIRST}.xml", "malformed XML"]),
    "bad-coordinate": (_edit_xml("<xmin>", "<xmin>x"), [f"{FIRST}.xml", "object 1", "expected a number"]),
    "unknown-class": (_edit_xml("<name>cat<", "<name>kitten<"), [f"{FIRST}.xml (object 1)", "unknown class 'kitten'"]),
    "non-positive-box": (_edit_xml("<xmax>", "<xmax>-"), [f"{FIRST}.xml (object 1)", "non-positive size"]),
    "box-outside": (_edit_xml("<ymax>", "<ymax>9"), [f"{FIRST}.xml (object 1)", "outside the 48x48 image"]),
    "size-differs": (_edit_xml("<width>48<", "<width>64<"), [f"{FIRST}.jpg", f"{FIRST}.xml says 64x48"]),
    "mask-shape": (_small_object_png, [f"SegmentationObject/{FIRST}.png", "mask of shape 24x24 for a 48x48"]),
    "object-index": (_object_index_too_high, [f"SegmentationObject/{FIRST}.png", "object index 7 out of range"]),
    "class-png-missing": (
        lambda s: (s / "SegmentationClass" / f"{FIRST}.png").unlink(),
        [f"SegmentationClass/{FIRST}.png", "segmentation PNG not found"],
    ),
    "duplicate-id": (_duplicate_in_lists, ["val.txt (line 4)", f"duplicate image id '{FIRST}'"]),
    "split-list-missing": (
        lambda s: (s / "ImageSets" / "Main" / "val.txt").unlink(),
        ["Main/val.txt", "split list not found"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_fails_naming_file_and_reason(case, src, tmp_path):
    corrupt, expected = BAD[case]
    corrupt(src)
    out = tmp_path / "prepared" / "myvoc"
    with pytest.raises(DatasetError) as info:
        voc.import_to(out, _cfg(src))
    for words in expected:
        assert words in str(info.value)
    _assert_nothing_left(out)


def test_split_emptied_by_quarantine_fails(src, tmp_path):
    (src / "ImageSets" / "Main" / "val.txt").write_text("2012_999998\n2012_999999\n")
    out = tmp_path / "prepared" / "myvoc"
    with pytest.raises(DatasetError, match=r"scenes/val\.json: split 'val' is empty"):
        voc.import_to(out, _cfg(src, validation="quarantine"))
    _assert_nothing_left(out)


def test_quarantine_sets_bad_samples_aside_with_reasons(src, tmp_path):
    _truncate(src)
    _edit_xml("<name>dog<", "<name>wolf<")(src)  # the same image: one entry per problem found first
    text = _xml(src, "2012_000012").read_text().replace("<name>cat<", "<name>kitten<")
    _xml(src, "2012_000012").write_text(text)
    _xml(src, "2012_000005").write_text("<annotation><object>")
    out = tmp_path / "myvoc"
    voc.import_to(out, _cfg(src, validation="quarantine"))
    manifest = read_manifest(out)
    report = json.loads((out / "quarantine" / "report.json").read_text())["quarantined"]
    assert manifest["quarantined"] == len(report) == 3
    reasons = {Path(e["source"].split(" (")[0]).name: e["reason"] for e in report}
    assert "truncated" in reasons[f"{FIRST}.jpg"] and "malformed XML" in reasons["2012_000005.xml"]
    assert "unknown class 'kitten'" in reasons["2012_000012.xml"]
    scenes = manifest["views"]["scenes"]["counts"]
    assert sum(c["images"] for c in scenes.values()) == 13 - 3
    verify_checksums(out)


def test_prepare_stage_imports_voc(src, tmp_path, capsys):
    p = tmp_path / "params.yaml"
    section = f"datasets:\n  myvoc:\n    format: voc\n    source: {src}\n    crop_size: 16\n"
    p.write_text(section + "    holdout: {test: 0.2}\n")
    assert prepare.main(["--dataset", "myvoc", "--params", str(p), "--out", str(tmp_path / "out")]) == 0
    assert read_manifest(tmp_path / "out")["views"]["scenes"]["counts"]["test"]["images"] == 2
    _edit_xml("</annotation>", "</annotatio>")(src)
    assert prepare.main(["--dataset", "myvoc", "--params", str(p), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert f"{FIRST}.xml" in err and "malformed XML" in err
    _assert_nothing_left(tmp_path / "bad")
