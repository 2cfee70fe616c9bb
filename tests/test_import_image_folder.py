"""The ImageFolder importer: both layouts into the canonical format, and every bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from components.config import from_dict
from components.data import canonical
from components.data.canonical import DatasetError
from components.data.importers import image_folder
from components.data.loaders import ImageLabelDataset
from components.methods import create_method
from pipelines import prepare

CLASSES = ["cat", "dog", "owl"]


def _image(path: Path, seed: int, size: tuple[int, int] = (20, 14), mode: str = "RGB") -> np.ndarray:
    """Write a small image (PNG or JPEG by suffix) and return its RGB pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path)
    return pixels


def make_flat(root: Path, per_class: int = 6) -> Path:
    for c, name in enumerate(CLASSES):
        for i in range(per_class):
            _image(root / name / f"{i:03d}.{'jpg' if i % 3 == 2 else 'png'}", seed=c * 100 + i)
    return root


def make_split(root: Path, counts: dict[str, int] | None = None) -> Path:
    counts = counts or {"train": 4, "val": 2, "test": 2}
    for s, (split, n) in enumerate(counts.items()):
        for c, name in enumerate(CLASSES):
            for i in range(n):
                _image(root / split / name / f"{i:03d}.png", seed=1000 * s + 100 * c + i)
    return root


def _cfg(source: Path, **kw) -> image_folder.Config:
    return from_dict(image_folder.Config, {"format": "image_folder", "source": str(source), **kw}, source="test")


def _counts(out: Path) -> dict[str, int]:
    views = canonical.read_manifest(out)["views"]
    return {s: c["images"] for s, c in views["crops"]["counts"].items()}


def _assert_nothing_left(out: Path) -> None:
    assert not out.exists()
    assert not out.parent.exists() or not [p for p in out.parent.iterdir() if ".partial" in p.name]


def test_flat_layout_stratified_holdout(tmp_path):
    src = make_flat(tmp_path / "src", per_class=10)
    (src / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (src / "cat" / "Thumbs.db").write_bytes(b"\xd0\xcf")
    out = tmp_path / "prepared" / "pets"
    image_folder.import_to(out, _cfg(src, crop_size=16, seed=2))
    manifest = canonical.read_manifest(out)
    assert manifest["classes"] == CLASSES and manifest["layout"] == "flat"
    assert manifest["image_size"] == [16, 16] and manifest["carved_from_train"] == ["val", "test"]
    assert _counts(out) == {"train": 24, "val": 3, "test": 3}
    refs = {}
    for split in ("train", "val", "test"):
        images = canonical.read_split(out, "crops", split)["images"]
        refs[split] = {r["source_ref"] for r in images}
        if split != "train":
            assert sorted(r["label"] for r in images) == [0, 1, 2]  # one of each class
        for r in images:
            assert CLASSES[r["label"]] == r["source_ref"].split("/")[0]
            assert (r["height"], r["width"]) == (16, 16)
    assert (
        not (refs["train"] & refs["val"])
        and not (refs["train"] & refs["test"])
        and len(set().union(*refs.values())) == 30
    )
    canonical.verify_checksums(out)


def test_split_layout_keeps_splits_and_pixels(tmp_path):
    src = make_split(tmp_path / "src")
    _image(src / "train" / "dog" / "000.png", seed=7, size=(16, 16))  # already crop_size: stored unchanged
    _image(src / "test" / "owl" / "nested" / "x.jpg", seed=8, size=(16, 16))
    out = tmp_path / "pets"
    image_folder.import_to(out, _cfg(src, crop_size=16))
    assert canonical.read_manifest(out)["layout"] == "split" and _counts(out) == {"train": 12, "val": 6, "test": 7}
    train = {r["source_ref"]: r for r in canonical.read_split(out, "crops", "train")["images"]}
    record = train["train/dog/000.png"]
    written = np.asarray(Image.open(out / "crops" / record["file_name"]))
    assert np.array_equal(written, np.asarray(Image.open(src / "train" / "dog" / "000.png")))
    test = {r["source_ref"]: r for r in canonical.read_split(out, "crops", "test")["images"]}
    assert test["test/owl/nested/x.jpg"]["label"] == 2
    written = np.asarray(Image.open(out / "crops" / test["test/owl/nested/x.jpg"]["file_name"]))
    assert np.array_equal(written, np.asarray(Image.open(src / "test" / "owl" / "nested" / "x.jpg").convert("RGB")))


def test_split_layout_without_val_carves_it_from_train(tmp_path):
    src = make_split(tmp_path / "src", {"train": 5, "test": 1})
    out = tmp_path / "pets"
    image_folder.import_to(out, _cfg(src, layout="split"))
    assert _counts(out) == {"train": 12, "val": 3, "test": 3}
    assert canonical.read_manifest(out)["carved_from_train"] == ["val"]


def test_fixed_classes_set_label_order_and_duplicate_names_are_fine(tmp_path):
    src = make_flat(tmp_path / "src")  # every class has 000.png: different samples
    out = tmp_path / "pets"
    image_folder.import_to(out, _cfg(src, classes=["owl", "cat", "dog"]))
    assert canonical.read_manifest(out)["classes"] == ["owl", "cat", "dog"]
    assert sum(_counts(out).values()) == 18
    for split in ("train", "val", "test"):
        for r in canonical.read_split(out, "crops", split)["images"]:
            assert ["owl", "cat", "dog"][r["label"]] == r["source_ref"].split("/")[0]


def test_trains_without_changes(tmp_path):
    out = tmp_path / "pets"
    image_folder.import_to(out, _cfg(make_flat(tmp_path / "src"), crop_size=16))
    torch.manual_seed(0)
    method = create_method("classifier", {"widths": [8, 16], "blocks": [1, 1]}, source="test", key="x")
    model = method.build(canonical.read_info(out))
    loader = torch.utils.data.DataLoader(ImageLabelDataset(out, "crops", "train"), batch_size=8, shuffle=True)
    losses = method.training_step(model.train(), next(iter(loader)))
    total = sum(losses.values())
    assert math.isfinite(total.item())
    total.backward()


def _truncated(path: Path) -> None:
    _image(path, seed=1, size=(64, 64))
    path.write_bytes(path.read_bytes()[:120])


def _i16(path: Path) -> None:
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"


def _cmyk(path: Path) -> None:
    _image(path, seed=2, mode="CMYK")


BAD_FILES = {
    "unreadable": ("cat/bad.png", lambda p: p.write_bytes(b"not an image"), ["unreadable image"]),
    "truncated": ("dog/cut.png", _truncated, ["truncated"]),
    "i16-png": ("dog/deep.png", _i16, ["unsupported image mode", "I;16"]),
    "cmyk-jpeg": ("owl/print.jpg", _cmyk, ["unsupported image mode", "CMYK"]),
    "unknown-ext": ("owl/labels.txt", lambda p: p.write_text("owl"), ["not an image file", ".txt"]),
    "no-ext": ("cat/README", lambda p: p.write_text("hi"), ["not an image file"]),
    "stray-top-file": ("notes.csv", lambda p: p.write_text("a,b"), ["outside any class folder"]),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_fails_naming_file_and_reason(tmp_path, case):
    rel, damage, words = BAD_FILES[case]
    src = make_flat(tmp_path / "src")
    damage(src / rel)
    out = tmp_path / "prepared" / "pets"
    with pytest.raises(DatasetError) as info:
        image_folder.import_to(out, _cfg(src))
    message = str(info.value)
    assert str(src / rel) in message and all(w in message for w in words), message
    _assert_nothing_left(out)


def _make_bad_tree(case: str, src: Path) -> tuple[dict, str, list[str]]:
    """Damage a good tree; return extra config, the path the error must name and its reason words."""
    if case == "unknown-category":
        _image(src / "cow" / "000.png", seed=3)
        return {"classes": CLASSES}, str(src / "cow"), ["unknown category folder", "'cow'"]
    if case == "empty-class":
        (src / "bat").mkdir()
        return {}, str(src / "bat"), ["empty class folder"]
    if case == "missing-class":
        return {"classes": [*CLASSES, "emu"]}, str(src / "emu"), ["missing class folder"]
    if case == "mixed-layout":
        _image(src / "train" / "cat" / "000.png", seed=4)
        return {}, str(src), ["mixes split folders", "set layout"]
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["unknown-category", "empty-class", "missing-class", "mixed-layout"])
def test_bad_tree_fails_naming_folder_and_reason(tmp_path, case):
    src = make_flat(tmp_path / "src")
    extra, named, words = _make_bad_tree(case, src)
    out = tmp_path / "prepared" / "pets"
    with pytest.raises(DatasetError) as info:
        image_folder.import_to(out, _cfg(src, **extra))
    message = str(info.value)
    assert named in message and all(w in message for w in words), message
    _assert_nothing_left(out)


def test_empty_split_folder_fails(tmp_path):
    src = make_split(tmp_path / "src")
    for f in (src / "val").rglob("*.png"):
        f.unlink()
    for d in (src / "val").iterdir():
        d.rmdir()
    out = tmp_path / "prepared" / "pets"
    with pytest.raises(DatasetError, match=r"val: empty folder"):
        image_folder.import_to(out, _cfg(src))
    _assert_nothing_left(out)


def test_split_emptied_by_quarantine_fails_naming_the_split(tmp_path):
    src = make_split(tmp_path / "src", {"train": 2, "val": 1, "test": 1})
    for f in (src / "test").rglob("*.png"):
        f.write_bytes(b"broken")
    out = tmp_path / "prepared" / "pets"
    with pytest.raises(DatasetError, match=r"crops/test\.json: split 'test' is empty"):
        image_folder.import_to(out, _cfg(src, validation="quarantine"))
    _assert_nothing_left(out)


def test_quarantine_keeps_good_samples_and_reports_bad(tmp_path):
    src = make_flat(tmp_path / "src")
    _truncated(src / "cat" / "cut.png")
    _cmyk(src / "dog" / "print.jpg")
    (src / "owl" / "labels.txt").write_text("owl")
    _image(src / "cow" / "000.png", seed=5)
    out = tmp_path / "pets"
    image_folder.import_to(out, _cfg(src, validation="quarantine", classes=CLASSES))
    manifest = canonical.read_manifest(out)
    assert manifest["quarantined"] == 4 and sum(_counts(out).values()) == 18
    report = json.loads((out / "quarantine" / "report.json").read_text())["quarantined"]
    reasons = {Path(e["source"]).relative_to(src).as_posix(): e["reason"] for e in report}
    assert set(reasons) == {"cat/cut.png", "dog/print.jpg", "owl/labels.txt", "cow/000.png"}
    assert "truncated" in reasons["cat/cut.png"] and "CMYK" in reasons["dog/print.jpg"]
    assert "not an image file" in reasons["owl/labels.txt"] and "unknown category" in reasons["cow/000.png"]
    assert all((out / e["kept_as"]).is_file() for e in report)
    canonical.verify_checksums(out)


def test_prepare_stage_entry_point(tmp_path, capsys):
    src = make_flat(tmp_path / "src")
    params = tmp_path / "params.yaml"
    params.write_text(f"datasets:\n  pets:\n    format: image_folder\n    source: {src}\n    crop_size: 16\n")
    argv = ["--dataset", "pets", "--params", str(params), "--out"]
    assert prepare.main([*argv, str(tmp_path / "out")]) == 0
    assert canonical.read_manifest(tmp_path / "out")["format"] == "image_folder"
    (src / "dog" / "x.png").write_bytes(b"junk")
    assert prepare.main([*argv, str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert str(src / "dog" / "x.png") in err and "unreadable image" in err
    assert not (tmp_path / "out2").exists()
