"""The embedded digits generator and the canonical format."""

from __future__ import annotations

import json

import numpy as np
import pytest

from components.config import from_dict
from components.data import digits
from components.data.canonical import DatasetError, DatasetWriter, read_info, read_manifest, verify_checksums
from components.data.loaders import ImageLabelDataset


def _cfg(**overrides) -> digits.DigitsConfig:
    base = {"max_per_class": 4, "crop_size": 16, **overrides}
    return from_dict(digits.DigitsConfig, base, source="test")


def test_same_seed_same_checksums(tmp_path):
    digits.generate(tmp_path / "a", _cfg(seed=3))
    digits.generate(tmp_path / "b", _cfg(seed=3))
    a, b = read_manifest(tmp_path / "a"), read_manifest(tmp_path / "b")
    assert a["checksums"] == b["checksums"] and a["checksum"] == b["checksum"]
    digits.generate(tmp_path / "c", _cfg(seed=4))
    assert read_manifest(tmp_path / "c")["checksum"] != a["checksum"]


def test_manifest_and_splits(tmp_path):
    cfg = _cfg(seed=0)
    digits.generate(tmp_path / "d", cfg)
    manifest = read_manifest(tmp_path / "d")
    assert manifest["seed"] == 0 and manifest["classes"] == [str(i) for i in range(10)]
    assert manifest["source"].startswith("generated:sklearn")
    counts = manifest["views"]["crops"]["counts"]
    assert counts["train"]["images"] == 10 * 2 * 2 and counts["val"]["images"] == 10 and counts["test"]["images"] == 10
    verify_checksums(tmp_path / "d")
    # no handwriting sample is in two splits
    sources = {}
    for split in ("train", "val", "test"):
        coco = json.loads((tmp_path / "d" / "crops" / f"{split}.json").read_text())
        sources[split] = {im["source_index"] for im in coco["images"]}
    assert not (sources["train"] & sources["val"]) and not (sources["train"] & sources["test"])
    assert not (sources["val"] & sources["test"])
    info = read_info(tmp_path / "d")
    assert info.num_classes == 10 and info.image_size == (16, 16) and info.in_channels == 3


def test_loader_reads_labels_from_canonical_format(tmp_path):
    digits.generate(tmp_path / "d", _cfg())
    ds = ImageLabelDataset(tmp_path / "d", "crops", "val")
    image, label = ds[0]
    assert image.shape == (3, 16, 16) and 0.0 <= float(image.min()) <= float(image.max()) <= 1.0
    assert sorted(ds.class_counts(10)) == [1] * 10 and 0 <= label < 10


def test_render_has_ink_where_the_digit_is():
    images, labels = digits.load_source_digits()
    rng = np.random.default_rng(0)
    pixels, mask = digits.render_digit(images[0], 32, _cfg(), rng)
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    assert 0.05 < mask.mean() < 0.6
    # ink contrasts with the background
    assert abs(pixels[mask].mean() - pixels[~mask].mean()) > 40


def test_failed_write_leaves_nothing(tmp_path):
    out = tmp_path / "ds"
    with pytest.raises(RuntimeError), DatasetWriter(out, name="x", categories=["a"]) as w:
        w.add_view("crops", ["classification"])
        w.add_image("crops", "train", np.zeros((4, 4, 3), np.uint8), label=0)
        raise RuntimeError("interrupted")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_empty_split_is_an_error_naming_the_file(tmp_path):
    out = tmp_path / "ds"
    with (
        pytest.raises(DatasetError, match=r"crops/val\.json: split 'val' is empty"),
        DatasetWriter(out, name="x", categories=["a"]) as w,
    ):
        w.add_view("crops", ["classification"])
        w.add_image("crops", "train", np.zeros((4, 4, 3), np.uint8), label=0)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_rewrite_replaces_previous_dataset(tmp_path):
    out = tmp_path / "d"
    digits.generate(out, _cfg(seed=1))
    digits.generate(out, _cfg(seed=2))
    assert read_manifest(out)["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_bad_generator_config_names_key():
    from components.config import ConfigError

    with pytest.raises(ConfigError, match=r"split_fractions: fractions must be positive and sum to 1"):
        _cfg(split_fractions={"train": 0.9, "val": 0.2, "test": 0.1})
    with pytest.raises(ConfigError, match=r"crops_per_digit\.train: expected int"):
        _cfg(crops_per_digit={"train": "2"})


def test_missing_dataset_message(tmp_path):
    with pytest.raises(DatasetError, match="run the prepare stage"):
        read_info(tmp_path / "nothing")
