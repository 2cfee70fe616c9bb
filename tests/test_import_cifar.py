"""The CIFAR importer: genuine CIFAR-10/100 pickles into the canonical format, and every bad input."""

from __future__ import annotations

import json
import math
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from components.config import from_dict
from components.data import canonical
from components.data.canonical import DatasetError
from components.data.importers import cifar
from components.data.loaders import ImageLabelDataset
from components.methods import create_method
from pipelines import prepare

CIFAR10_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


def _rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _dump(path: Path, obj: dict) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def _batch(label: bytes, data: np.ndarray, labels: list[int], key: bytes = b"labels") -> dict:
    return {
        b"batch_label": label,
        key: labels,
        b"data": data,
        b"filenames": [f"img_{i:04d}.png".encode() for i in range(len(data))],
    }


def make_cifar10(root: Path, per_batch: int = 10, n_test: int = 10) -> Path:
    """``root/cifar-10-batches-py`` with two training batches, a test batch and batches.meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for b in (1, 2):
        labels = [(i + b) % 10 for i in range(per_batch)]
        _dump(folder / f"data_batch_{b}", _batch(f"training batch {b} of 5".encode(), _rows(per_batch, b), labels))
    _dump(folder / "test_batch", _batch(b"testing batch 1 of 1", _rows(n_test, 9), [i % 10 for i in range(n_test)]))
    _dump(folder / "batches.meta", {b"num_cases_per_batch": per_batch, b"label_names": CIFAR10_NAMES, b"num_vis": 3072})
    return folder


def make_cifar100(root: Path, n_train: int = 24, n_test: int = 8) -> Path:
    """``root/cifar-100-python`` with train, test and meta (4 fine classes in 2 coarse ones)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        fine = [i % 4 for i in range(n)]
        obj = _batch(name.encode(), _rows(n, seed), fine, key=b"fine_labels")
        obj[b"coarse_labels"] = [f // 2 for f in fine]
        _dump(folder / name, obj)
    meta = {b"fine_label_names": [b"apple", b"bee", b"cloud", b"dolphin"], b"coarse_label_names": [b"a", b"b"]}
    _dump(folder / "meta", meta)
    return folder


def _cfg(source: Path, **kw) -> cifar.Config:
    return from_dict(cifar.Config, {"format": "cifar", "source": str(source), **kw}, source="test")


def _split(out: Path, split: str) -> dict:
    return canonical.read_split(out, "crops", split)


def _assert_nothing_left(out: Path) -> None:
    assert not out.exists()
    assert not out.parent.exists() or not [p for p in out.parent.iterdir() if ".partial" in p.name]


def test_cifar10_import_counts_pixels_labels(tmp_path):
    make_cifar10(tmp_path / "src")
    out = tmp_path / "prepared" / "c10"
    cifar.import_to(out, _cfg(tmp_path / "src"))
    manifest = canonical.read_manifest(out)
    counts = {s: c["images"] for s, c in manifest["views"]["crops"]["counts"].items()}
    # 20 training rows (2 per class): one per class carved into val; the source test set as is
    assert counts == {"train": 10, "val": 10, "test": 10}
    assert manifest["classes"] == [n.decode() for n in CIFAR10_NAMES]
    assert manifest["variant"] == "cifar10" and manifest["image_size"] == [32, 32] and manifest["quarantined"] == 0
    canonical.verify_checksums(out)

    # every written image equals its source row, channel order included
    source = {
        f"cifar-10-batches-py/data_batch_{b}": pickle.loads(
            (tmp_path / "src" / "cifar-10-batches-py" / f"data_batch_{b}").read_bytes(), encoding="bytes"
        )
        for b in (1, 2)
    }
    seen = set()
    for split in ("train", "val"):
        for record in _split(out, split)["images"]:
            batch_ref, row = record["source_ref"].rsplit(":", 1)
            batch = source[batch_ref]
            expected = batch[b"data"][int(row)].reshape(3, 32, 32).transpose(1, 2, 0)
            written = np.asarray(Image.open(out / "crops" / record["file_name"]))
            assert np.array_equal(written, expected)
            assert written[3, 5, 0] == batch[b"data"][int(row)][3 * 32 + 5]  # R plane first
            assert written[3, 5, 2] == batch[b"data"][int(row)][2048 + 3 * 32 + 5]  # B plane last
            assert record["label"] == batch[b"labels"][int(row)]
            seen.add(record["source_ref"])
    assert len(seen) == 20
    test_refs = [r["source_ref"] for r in _split(out, "test")["images"]]
    assert test_refs == [f"cifar-10-batches-py/test_batch:{i}" for i in range(10)]


def test_cifar10_trains_without_changes(tmp_path):
    make_cifar10(tmp_path / "src")
    out = tmp_path / "c10"
    cifar.import_to(out, _cfg(tmp_path / "src"))
    torch.manual_seed(0)
    method = create_method("classifier", {"widths": [8, 16], "blocks": [1, 1]}, source="test", key="x")
    model = method.build(canonical.read_info(out))
    loader = torch.utils.data.DataLoader(ImageLabelDataset(out, "crops", "train"), batch_size=8, shuffle=True)
    model.train()
    losses = method.training_step(model, next(iter(loader)))
    total = sum(losses.values())
    assert math.isfinite(total.item())
    total.backward()


@pytest.mark.parametrize("label_kind,classes", [("fine", ["apple", "bee", "cloud", "dolphin"]), ("coarse", ["a", "b"])])
def test_cifar100_fine_and_coarse(tmp_path, label_kind, classes):
    folder = make_cifar100(tmp_path / "src")
    out = tmp_path / "c100"
    cifar.import_to(out, _cfg(folder, label_kind=label_kind, crop_size=16, seed=3))  # the batch folder itself
    manifest = canonical.read_manifest(out)
    assert manifest["classes"] == classes and manifest["variant"] == "cifar100"
    counts = {s: c["images"] for s, c in manifest["views"]["crops"]["counts"].items()}
    assert counts["test"] == 8 and counts["train"] + counts["val"] == 24 and counts["val"] >= len(classes)
    train = pickle.loads((folder / "train").read_bytes(), encoding="bytes")
    for record in _split(out, "val")["images"]:
        row = int(record["source_ref"].rsplit(":", 1)[1])
        assert record["label"] == train[f"{label_kind}_labels".encode()][row]
        assert (record["height"], record["width"]) == (16, 16)
    canonical.verify_checksums(out)


def test_batches_pickled_by_numpy_1_load(tmp_path):
    """The published files reference numpy.core.multiarray (numpy 1); they load without warnings."""
    folder = make_cifar10(tmp_path / "src")
    for path in folder.glob("*_batch*"):
        path.write_bytes(path.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cifar.import_to(tmp_path / "c10", _cfg(tmp_path / "src"))
    assert (
        sum(c["images"] for c in canonical.read_manifest(tmp_path / "c10")["views"]["crops"]["counts"].values()) == 30
    )


def test_same_seed_same_dataset(tmp_path):
    make_cifar10(tmp_path / "src")
    for parent in ("a", "b"):  # same dataset name: the name is part of every split's JSON
        cifar.import_to(tmp_path / parent / "c10", _cfg(tmp_path / "src", seed=5))
    first, second = (canonical.read_manifest(tmp_path / p / "c10") for p in ("a", "b"))
    assert first["checksum"] == second["checksum"]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not a pickle at all")


def _edit(key: bytes, value=None, drop: bool = False):
    def apply(path: Path) -> None:
        obj = pickle.loads(path.read_bytes(), encoding="bytes")
        if drop:
            del obj[key]
        else:
            obj[key] = value(obj) if callable(value) else value
        _dump(path, obj)

    return apply


BAD_CIFAR10 = {
    "truncated": ("data_batch_2", _truncate, "data_batch_2", ["truncated pickle"]),
    "malformed": ("data_batch_1", _garbage, "data_batch_1", ["malformed"]),
    "no-data": ("data_batch_1", _edit(b"data", drop=True), "data_batch_1", ["missing key", "data"]),
    "no-labels": ("test_batch", _edit(b"labels", drop=True), "test_batch", ["missing key", "labels"]),
    "data-1024": ("data_batch_1", _edit(b"data", lambda o: o[b"data"][:, :1024].copy()), "data_batch_1", ["shape"]),
    "data-float": (
        "data_batch_2",
        _edit(b"data", lambda o: o[b"data"].astype(np.float32)),
        "data_batch_2",
        ["shape", "float32"],
    ),
    "label-range": (
        "data_batch_2",
        _edit(b"labels", lambda o: o[b"labels"][:3] + [10] + o[b"labels"][4:]),
        "data_batch_2:3",
        ["unknown category", "label 10"],
    ),
    "length": ("data_batch_1", _edit(b"labels", lambda o: o[b"labels"][:-1]), "data_batch_1", ["length mismatch"]),
    "no-meta": ("batches.meta", lambda p: p.unlink(), "batches.meta", ["not found"]),
    "evil": ("data_batch_1", lambda p: p.write_bytes(b"cos\nsystem\n(S'true'\ntR."), "data_batch_1", ["os.system"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CIFAR10))
def test_cifar10_bad_input_fails_naming_file_and_reason(tmp_path, case):
    target, damage, named, words = BAD_CIFAR10[case]
    folder = make_cifar10(tmp_path / "src")
    damage(folder / target)
    out = tmp_path / "prepared" / "bad"
    with pytest.raises(DatasetError) as info:
        cifar.import_to(out, _cfg(tmp_path / "src"))
    message = str(info.value)
    assert named in message and all(w in message for w in words), message
    _assert_nothing_left(out)


def test_cifar100_missing_fine_labels(tmp_path):
    folder = make_cifar100(tmp_path / "src")
    _edit(b"fine_labels", drop=True)(folder / "train")
    out = tmp_path / "prepared" / "bad"
    with pytest.raises(DatasetError, match=r"train: missing key 'fine_labels'"):
        cifar.import_to(out, _cfg(tmp_path / "src"))
    _assert_nothing_left(out)


def test_not_a_cifar_folder(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "prepared").mkdir()
    out = tmp_path / "prepared" / "bad"
    with pytest.raises(DatasetError, match="not a CIFAR folder"):
        cifar.import_to(out, _cfg(tmp_path / "src"))
    _assert_nothing_left(out)


def test_quarantine_keeps_good_samples_and_reports_bad(tmp_path):
    folder = make_cifar10(tmp_path / "src", per_batch=20)
    _edit(b"labels", lambda o: [11] + o[b"labels"][1:])(folder / "test_batch")
    _truncate(folder / "data_batch_2")
    out = tmp_path / "q"
    cifar.import_to(out, _cfg(tmp_path / "src", validation="quarantine"))
    manifest = canonical.read_manifest(out)
    assert manifest["quarantined"] == 2
    counts = {s: c["images"] for s, c in manifest["views"]["crops"]["counts"].items()}
    assert counts == {"train": 10, "val": 10, "test": 9}
    report = json.loads((out / "quarantine" / "report.json").read_text())["quarantined"]
    by_source = {Path(e["source"]).name: e for e in report}
    assert "truncated pickle" in by_source["data_batch_2"]["reason"]
    assert "unknown category" in by_source["test_batch:0"]["reason"]
    assert all((out / e["kept_as"]).is_file() for e in report)
    canonical.verify_checksums(out)


def _params(tmp_path: Path, source: Path) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(
        f"datasets:\n  mycifar:\n    format: cifar\n    source: {source}\n    seed: 1\n    holdout: {{val: 0.2}}\n"
    )
    return p


def test_prepare_stage_entry_point(tmp_path, capsys):
    make_cifar10(tmp_path / "src")
    params = _params(tmp_path, tmp_path / "src")
    assert prepare.main(["--dataset", "mycifar", "--params", str(params), "--out", str(tmp_path / "out")]) == 0
    assert canonical.read_manifest(tmp_path / "out")["format"] == "cifar"

    _truncate(tmp_path / "src" / "cifar-10-batches-py" / "test_batch")
    assert prepare.main(["--dataset", "mycifar", "--params", str(params), "--out", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert "test_batch" in err and "truncated pickle" in err
    assert not (tmp_path / "out2").exists()
