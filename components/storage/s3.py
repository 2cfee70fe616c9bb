"""S3 (and S3-compatible servers): URIs, a boto3 client with retries, folder-sized transfers.

Credentials come only from the environment or the standard AWS config files (``~/.aws``, an
instance or pod role), never from ``params.yaml``, so nothing secret is tracked by git or DVC.
The endpoint of an S3-compatible server (MinIO, Ceph, moto) is an argument or the environment
(``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path, PurePosixPath
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

SCHEME = "s3://"
ENDPOINT_ENV_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
MAX_RETRIES = 8  # after the first attempt (botocore's "max_attempts"); standard mode backs off up to 20 s
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60
TRANSFER_THREADS = 8  # objects downloaded at once; a dataset is many small images


class S3Error(RuntimeError):
    """An S3 request failed; the message names the URI (and key) it was about."""


def is_s3_uri(s: str) -> bool:
    return isinstance(s, str) and s.startswith(SCHEME)


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b/`` -> ``("bucket", "a/b")``; the prefix has no leading or trailing ``/``."""
    if not is_s3_uri(uri):
        raise ValueError(f"{uri!r}: not an S3 URI (expected s3://bucket/prefix)")
    bucket, _, prefix = uri[len(SCHEME) :].partition("/")
    if not bucket:
        raise ValueError(f"{uri!r}: no bucket name (expected s3://bucket/prefix)")
    if any(c.isspace() for c in bucket) or any(c in bucket for c in "?#\\"):
        raise ValueError(f"{uri!r}: invalid bucket name {bucket!r}")
    return bucket, prefix.strip("/")


def join_s3_uri(bucket: str, key: str) -> str:
    return f"{SCHEME}{bucket}/{key}" if key else f"{SCHEME}{bucket}"


def resolve_endpoint_url(configured: str | None = None) -> str | None:
    """The endpoint to use given the one in params: the environment wins, as for Ray and MLflow."""
    for var in ENDPOINT_ENV_VARS:
        if os.environ.get(var):
            return os.environ[var]
    return configured or None


def s3_client(endpoint_url: str | None = None) -> Any:
    """A boto3 S3 client that retries throttling and transient network errors.

    ``endpoint_url`` wins over the environment; without either, boto3 talks to AWS S3.
    """
    config = Config(
        retries={"max_attempts": MAX_RETRIES, "mode": "standard"},
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        max_pool_connections=max(10, TRANSFER_THREADS * 2),
    )
    endpoint = endpoint_url or resolve_endpoint_url()
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)


def list_objects(client: Any, uri: str) -> list[tuple[str, int]]:
    """``(key, size)`` of every object under the folder ``uri``, paginated; errors name the URI."""
    bucket, prefix = split_s3_uri(uri)
    folder = f"{prefix}/" if prefix else ""
    found: list[tuple[str, int]] = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder):
            found.extend((obj["Key"], obj["Size"]) for obj in page.get("Contents", []))
    except ClientError as exc:
        raise S3Error(f"{uri}: cannot list objects: {_describe(exc)}") from exc
    except BotoCoreError as exc:
        raise S3Error(f"{uri}: cannot list objects: {exc}") from exc
    return found


def download_prefix(uri: str, dest: Path, endpoint_url: str | None = None) -> list[Path]:
    """Download every object under ``uri`` to ``dest/<key relative to the prefix>``.

    The objects land in a temporary folder next to ``dest`` that is renamed into place at the
    end, so a failure leaves no partial ``dest`` (an existing ``dest`` is replaced only then).
    Zero-byte keys ending in ``/`` are the "folders" consoles create and are skipped.
    Returns the downloaded files under ``dest``, sorted.
    """
    dest = Path(dest)
    client = s3_client(endpoint_url)
    bucket, prefix = split_s3_uri(uri)
    folder = f"{prefix}/" if prefix else ""
    plan: list[tuple[str, PurePosixPath]] = []
    for key, size in list_objects(client, uri):
        if key.endswith("/"):
            if size:
                raise ValueError(f"{join_s3_uri(bucket, key)}: a key ending in '/' holds {size} bytes; not a folder")
            continue
        plan.append((key, _relative_key(bucket, key, folder)))
    if not plan:
        raise ValueError(f"{uri}: no objects under this prefix")

    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        _download_all(client, bucket, [(key, staging.joinpath(*rel.parts)) for key, rel in plan])
        _replace_dir(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return sorted(dest.joinpath(*rel.parts) for _, rel in plan)


def upload_dir(src: Path, uri: str, endpoint_url: str | None = None, last: str | None = None) -> int:
    """Upload every file under ``src`` to ``uri/<path relative to src>``; returns the file count.

    ``last`` (a path relative to ``src``) is uploaded after every other file, so readers that
    wait for it never see a partial folder."""
    src = Path(src)
    if not src.is_dir():
        raise NotADirectoryError(f"{src}: not a folder (nothing to upload to {uri})")
    bucket, prefix = split_s3_uri(uri)
    client = s3_client(endpoint_url)
    files = sorted((p for p in src.rglob("*") if p.is_file()), key=lambda p: (p.relative_to(src).as_posix() == last, p))
    for path in files:
        rel = path.relative_to(src).as_posix()
        key = f"{prefix}/{rel}" if prefix else rel
        try:
            client.upload_file(str(path), bucket, key)
        except (ClientError, BotoCoreError, OSError) as exc:
            raise S3Error(f"{join_s3_uri(bucket, key)}: upload of {path} failed: {_describe(exc)}") from exc
    return len(files)


def materialize(source: str, cache_dir: Path, endpoint_url: str | None = None) -> Path:
    """A local folder for ``source``: a local path as-is, an ``s3://`` URI downloaded into the cache.

    An S3 prefix lands in ``cache_dir/<bucket>/<prefix>`` and is downloaded afresh on every call,
    so the local copy always matches the bucket.
    """
    if is_s3_uri(source):
        bucket, prefix = split_s3_uri(source)
        parts = [p for p in prefix.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise ValueError(f"{source}: '.' or '..' in the prefix cannot be mapped to a local folder")
        dest = Path(cache_dir, bucket, *parts)
        download_prefix(source, dest, endpoint_url)
        return dest
    if "://" in source:
        raise ValueError(f"{source!r}: unsupported URI scheme (expected a local path or s3://bucket/prefix)")
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{source}: no such file or folder")
    return path


def _relative_key(bucket: str, key: str, folder: str) -> PurePosixPath:
    """The key's path below ``folder``; a key that would escape ``dest`` is refused, naming it."""
    rel = PurePosixPath(key[len(folder) :])
    parts = [p for p in rel.parts if p != "/"]
    if not parts or any(p in (".", "..") for p in parts):
        raise ValueError(f"{join_s3_uri(bucket, key)}: key cannot be mapped to a local file path")
    return PurePosixPath(*parts)


def _download_all(client: Any, bucket: str, jobs: list[tuple[str, Path]]) -> None:
    """Download ``(key, target)`` pairs on a few threads; the first failure cancels the rest."""

    def fetch(key: str, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            client.download_file(bucket, key, str(target))
        except (ClientError, BotoCoreError, OSError) as exc:
            raise S3Error(f"{join_s3_uri(bucket, key)}: download failed: {_describe(exc)}") from exc

    with ThreadPoolExecutor(max_workers=TRANSFER_THREADS, thread_name_prefix="s3-download") as pool:
        futures = [pool.submit(fetch, key, target) for key, target in jobs]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((f for f in futures if f in done and f.exception() is not None), None)
        if failed is not None:
            pool.shutdown(wait=True, cancel_futures=True)
            failed.result()


def _replace_dir(staging: Path, dest: Path) -> None:
    """Rename ``staging`` to ``dest``; an existing ``dest`` is moved aside first, then deleted."""
    old = None
    if dest.exists() or dest.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
        os.replace(dest, old / dest.name)
    os.replace(staging, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = err.get("Code", "?")
        message = err.get("Message") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
        return f"{code}: {message}"
    return f"{type(exc).__name__}: {exc}"
