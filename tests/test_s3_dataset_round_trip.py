"""The data path end to end against an S3-compatible server on 127.0.0.1: import a dataset
from ``s3://``, version the prepared output with DVC on an S3 remote, wipe it and the cache,
pull it back, and find the same checksums."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from components.data.canonical import read_manifest, verify_checksums
from components.storage.s3 import upload_dir
from tests.s3_server import DVC, git_dvc_repo, s3_endpoint_fixture  # noqa: F401
from tests.test_storage_s3 import make_bucket


def _image_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for cls in ("circle", "square"):
        for i in range(10):
            pixels = rng.integers(0, 255, size=(20, 20, 3), dtype=np.uint8)
            (root / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / cls / f"{i:03d}.png")
    return root


@pytest.mark.slow
def test_import_from_s3_then_dvc_push_wipe_pull(s3_endpoint, tmp_path):
    make_bucket(s3_endpoint, "raw")
    make_bucket(s3_endpoint, "pipeline")
    assert upload_dir(_image_folder(tmp_path / "shapes"), "s3://raw/shapes", endpoint_url=s3_endpoint) == 20
    params = {
        "datasets": {
            "shapes": {
                "format": "image_folder",
                "source": "s3://raw/shapes",
                "s3_endpoint_url": s3_endpoint,
                "crop_size": 16,
                "holdout": {"val": 0.2, "test": 0.2},
            }
        },
        "storage": {"s3_endpoint_url": s3_endpoint, "dvc_remote": {"name": "storage", "url": "s3://pipeline/dvc"}},
    }
    repo = tmp_path / "repo"
    run = git_dvc_repo(repo, tmp_path)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    run(sys.executable, "-m", "pipelines.prepare", "--dataset", "shapes")
    prepared = repo / "data" / "prepared" / "shapes"
    verify_checksums(prepared)
    before = read_manifest(prepared)
    assert (
        before["source"] == "s3://raw/shapes"
        and sum(c["images"] for c in before["views"]["crops"]["counts"].values()) == 20
    )

    run(DVC, "add", "-q", "data/prepared/shapes")
    run(sys.executable, "-m", "pipelines.dvc_remote")
    run(DVC, "push")
    shutil.rmtree(prepared)
    shutil.rmtree(repo / ".dvc" / "cache")
    run(DVC, "pull")
    verify_checksums(prepared)
    after = read_manifest(prepared)
    assert after["checksum"] == before["checksum"] and after["checksums"] == before["checksums"]
