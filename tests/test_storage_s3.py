"""S3 storage helpers and the DVC remote, against a real S3-compatible server on 127.0.0.1 (moto)."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
from pathlib import Path

import pytest
import yaml
from botocore.exceptions import EndpointConnectionError

from components.storage import s3
from components.storage.s3 import (
    S3Error,
    download_prefix,
    is_s3_uri,
    materialize,
    resolve_endpoint_url,
    s3_client,
    split_s3_uri,
    upload_dir,
)
from pipelines import dvc_remote
from tests.s3_server import DVC, git_dvc_repo, s3_endpoint_fixture  # noqa: F401

FILES = {
    "a.txt": b"alpha\n",
    "sub/b.bin": bytes(range(256)) * 40,
    "sub/deeper/c.json": b'{"c": 3}\n',
}


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def make_bucket(endpoint: str, name: str) -> None:
    s3_client(endpoint).create_bucket(Bucket=name)


# --- URIs and the client -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://bucket", ("bucket", "")),
        ("s3://bucket/", ("bucket", "")),
        ("s3://bucket/raw/digits/", ("bucket", "raw/digits")),
        ("s3://my.bucket-1/a/b.png", ("my.bucket-1", "a/b.png")),
    ],
)
def test_split_s3_uri(uri, expected):
    assert is_s3_uri(uri)
    assert split_s3_uri(uri) == expected


@pytest.mark.parametrize("uri", ["s3://", "s3:///raw/digits", "http://bucket/raw", "bucket/raw", "s3://bad bucket/x"])
def test_malformed_uri_error_names_the_uri(uri):
    with pytest.raises(ValueError) as err:
        split_s3_uri(uri)
    assert repr(uri) in str(err.value)


def test_client_retries_transient_errors_and_takes_the_endpoint(monkeypatch):
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    client = s3_client("http://127.0.0.1:9")
    # botocore stores retries={"max_attempts": 8} as 9 attempts in all.
    assert client.meta.config.retries == {"total_max_attempts": 9, "mode": "standard"}
    assert client.meta.config.connect_timeout > 0 and client.meta.config.read_timeout > 0
    assert client.meta.endpoint_url == "http://127.0.0.1:9"

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:10")
    assert s3_client().meta.endpoint_url == "http://127.0.0.1:10"
    assert s3_client("http://127.0.0.1:9").meta.endpoint_url == "http://127.0.0.1:9"


def test_endpoint_from_environment_wins_over_params(monkeypatch):
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    assert resolve_endpoint_url(None) is None
    assert resolve_endpoint_url("http://params:9000") == "http://params:9000"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://env:9000")
    assert resolve_endpoint_url("http://params:9000") == "http://env:9000"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://env-s3:9000")
    assert resolve_endpoint_url("http://params:9000") == "http://env-s3:9000"


# --- transfers -----------------------------------------------------------------------------


def test_upload_download_round_trip(s3_endpoint, tmp_path):
    make_bucket(s3_endpoint, "data")
    src = write_tree(tmp_path / "src", FILES)
    assert upload_dir(src, "s3://data/raw/digits/", s3_endpoint) == len(FILES)
    client = s3_client(s3_endpoint)
    client.put_object(Bucket="data", Key="raw/digits/sub/", Body=b"")  # a console's "folder"
    client.put_object(Bucket="data", Key="raw/digits-other/x.txt", Body=b"not under the prefix")

    dest = tmp_path / "out" / "digits"
    paths = download_prefix("s3://data/raw/digits", dest, s3_endpoint)

    assert paths == sorted(dest / rel for rel in FILES)
    assert tree_bytes(dest) == FILES
    assert sorted(p.name for p in dest.parent.iterdir()) == ["digits"]  # no staging folder left


def test_empty_prefix_and_missing_bucket_name_the_uri(s3_endpoint, tmp_path):
    make_bucket(s3_endpoint, "data")
    s3_client(s3_endpoint).put_object(Bucket="data", Key="raw/only-a-folder/", Body=b"")
    with pytest.raises(ValueError, match=r"^s3://data/raw/only-a-folder: no objects under this prefix$"):
        download_prefix("s3://data/raw/only-a-folder", tmp_path / "dest", s3_endpoint)
    with pytest.raises(S3Error, match=r"^s3://no-such-bucket/raw: cannot list objects: NoSuchBucket"):
        download_prefix("s3://no-such-bucket/raw", tmp_path / "dest", s3_endpoint)
    assert not (tmp_path / "dest").exists()


def test_failure_mid_download_leaves_no_partial_dest(s3_endpoint, tmp_path, monkeypatch):
    make_bucket(s3_endpoint, "data")
    upload_dir(write_tree(tmp_path / "src", FILES), "s3://data/raw", s3_endpoint)
    real_client = s3.s3_client
    calls = {"n": 0}
    lock = threading.Lock()

    def flaky_client(endpoint_url=None):
        client = real_client(endpoint_url)
        download = client.download_file

        def download_file(bucket, key, filename, *args, **kwargs):
            with lock:
                calls["n"] += 1
                nth = calls["n"]
            if nth == 2:
                raise EndpointConnectionError(endpoint_url=endpoint_url)
            return download(bucket, key, filename, *args, **kwargs)

        client.download_file = download_file
        return client

    monkeypatch.setattr(s3, "s3_client", flaky_client)
    dest = tmp_path / "out" / "raw"
    with pytest.raises(S3Error, match=r"^s3://data/raw/.+: download failed: EndpointConnectionError"):
        download_prefix("s3://data/raw", dest, s3_endpoint)
    assert not dest.exists()
    assert list((tmp_path / "out").iterdir()) == []

    # A copy from an earlier download survives a failed refresh untouched.
    write_tree(dest, {"old.txt": b"old"})
    calls["n"] = 0
    with pytest.raises(S3Error):
        download_prefix("s3://data/raw", dest, s3_endpoint)
    assert tree_bytes(dest) == {"old.txt": b"old"}
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["raw"]


def test_materialize_s3_prefix_and_local_path(s3_endpoint, tmp_path):
    make_bucket(s3_endpoint, "data")
    upload_dir(write_tree(tmp_path / "src", FILES), "s3://data/raw/digits", s3_endpoint)
    cache = tmp_path / "cache"

    local = materialize("s3://data/raw/digits/", cache, s3_endpoint)
    assert local == cache / "data" / "raw" / "digits"
    assert tree_bytes(local) == FILES

    # Each call mirrors the bucket as it is now: changed objects and deleted ones included.
    client = s3_client(s3_endpoint)
    client.put_object(Bucket="data", Key="raw/digits/a.txt", Body=b"changed\n")
    client.delete_object(Bucket="data", Key="raw/digits/sub/b.bin")
    assert tree_bytes(materialize("s3://data/raw/digits", cache, s3_endpoint)) == {
        "a.txt": b"changed\n",
        "sub/deeper/c.json": FILES["sub/deeper/c.json"],
    }

    assert materialize(str(tmp_path / "src"), cache) == tmp_path / "src"
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=f"^{missing}: no such file or folder$"):
        materialize(missing, cache)
    with pytest.raises(ValueError, match="gs://bucket/x"):
        materialize("gs://bucket/x", cache)


# --- the DVC remote ------------------------------------------------------------------------


def write_params(path: Path, url: str | None, endpoint: str | None) -> Path:
    storage = {"path": "ray_results", "s3_endpoint_url": endpoint, "dvc_remote": {"name": "storage", "url": url}}
    path.write_text(yaml.safe_dump({"storage": storage}))
    return path


def test_dvc_remote_without_url_exits_2_naming_the_key(tmp_path, capsys):
    params = write_params(tmp_path / "params.yaml", None, None)
    assert dvc_remote.main(["--params", str(params)]) == 2
    assert f"{params}: storage.dvc_remote.url: not set" in capsys.readouterr().err


def test_dvc_remote_commands(monkeypatch, tmp_path):
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    params = {"storage": {"s3_endpoint_url": "http://127.0.0.1:9000", "dvc_remote": {"url": "s3://b/dvc"}}}
    settings = dvc_remote.remote_settings(params, "p.yaml")
    assert dvc_remote.dvc_commands(settings) == [
        ["remote", "add", "--local", "--force", "-d", "storage", "s3://b/dvc"],
        ["remote", "modify", "--local", "storage", "endpointurl", "http://127.0.0.1:9000"],
    ]
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    assert dvc_remote.remote_settings(params, "p.yaml").endpoint_url == "http://minio:9000"
    # An endpoint means nothing to a non-S3 remote.
    params["storage"]["dvc_remote"]["url"] = str(tmp_path / "remote")
    assert dvc_remote.dvc_commands(dvc_remote.remote_settings(params, "p.yaml")) == [
        ["remote", "add", "--local", "--force", "-d", "storage", str(tmp_path / "remote")]
    ]
    params["storage"]["dvc_remote"] = {"url": "s3://b", "nmae": "x"}
    with pytest.raises(dvc_remote.ConfigError, match=r"^p\.yaml: storage\.dvc_remote\.nmae: unknown key"):
        dvc_remote.remote_settings(params, "p.yaml")


def sha256_tree(root: Path) -> dict[str, str]:
    return {rel: hashlib.sha256(data).hexdigest() for rel, data in tree_bytes(root).items()}


@pytest.mark.slow
def test_dvc_push_pull_round_trip_through_s3(s3_endpoint, tmp_path):
    repo = tmp_path / "repo"
    run = git_dvc_repo(repo, tmp_path)
    raw = write_tree(repo / "raw", {**FILES, "images/0001.png": os.urandom(300_000), "images/0002.png": b""})
    original = sha256_tree(raw)
    run(DVC, "add", "-q", "raw")

    make_bucket(s3_endpoint, "pipeline")
    params = write_params(tmp_path / "params.yaml", "s3://pipeline/dvc", s3_endpoint)
    out = run(sys.executable, "-m", "pipelines.dvc_remote", "--params", str(params))
    assert "s3://pipeline/dvc" in out

    committed = (repo / ".dvc" / "config").read_text()
    local = (repo / ".dvc" / "config.local").read_text()
    host = s3_endpoint.split("://")[1]
    for secret_or_local in ("endpointurl", host, "testing", "access_key", "secret"):
        assert secret_or_local not in committed
    assert "url = s3://pipeline/dvc" in local and f"endpointurl = {s3_endpoint}" in local
    assert "testing" not in local and "access_key" not in local
    assert "config.local" in (repo / ".dvc" / ".gitignore").read_text()

    run(DVC, "push")
    stored = s3_client(s3_endpoint).list_objects_v2(Bucket="pipeline", Prefix="dvc/")
    assert stored["KeyCount"] >= len(original)

    shutil.rmtree(raw)
    shutil.rmtree(repo / ".dvc" / "cache")
    run(DVC, "pull")
    assert sha256_tree(raw) == original
