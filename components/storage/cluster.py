"""Storage a Ray cluster shares: where Ray Train and Tune keep checkpoints, and how a prepared
dataset reaches workers on other machines.

``storage.path`` (or ``CVFLOW_STORAGE_PATH``) is a local folder on a laptop and ``s3://bucket/prefix``
on a cluster. For an S3-compatible server (``storage.s3_endpoint_url`` or ``AWS_ENDPOINT_URL``)
Ray gets an explicit pyarrow filesystem pointed at it; credentials are never passed: pyarrow
and boto3 read them from the environment, the AWS config files or the node's role on every node.

With S3 storage the driver uploads the prepared dataset once per checksum to
``<storage>/datasets/<name>-<checksum>/``, ``manifest.json`` last, so an object
``manifest.json`` there means the upload is complete; each node downloads it once into a local
cache, so workers on machines without the driver's disk read the same bytes.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from components.data.canonical import MANIFEST
from components.storage.s3 import is_s3_uri, resolve_endpoint_url, split_s3_uri

DATA_CACHE_ENV = "CVFLOW_DATA_CACHE"  # where nodes keep downloaded datasets; default: <tmp>/cvflow-datasets


@dataclass(frozen=True)
class RayStorage:
    """Where Ray Train and Tune write: ``uri`` as the user gave it, and the endpoint of an
    S3-compatible server if any."""

    uri: str
    endpoint_url: str | None = None

    @property
    def is_s3(self) -> bool:
        return is_s3_uri(self.uri)

    def run_config_args(self) -> dict[str, Any]:
        """``storage_path`` (and ``storage_filesystem``) for a Ray ``RunConfig``."""
        return {"storage_path": self.ray_path(), "storage_filesystem": self.filesystem()}

    def ray_path(self, *parts: str) -> str:
        """The path Ray is given (with a filesystem, the URI without its scheme), plus ``parts``."""
        base = self.uri.rstrip("/")
        if self.is_s3 and self.endpoint_url:
            base = base[len("s3://") :]
        return "/".join([base, *parts])

    def filesystem(self):
        """A pyarrow S3 filesystem for an S3-compatible endpoint; ``None`` lets Ray infer one."""
        if not (self.is_s3 and self.endpoint_url):
            return None
        from pyarrow import fs

        url = urlsplit(self.endpoint_url)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise ValueError(f"{self.endpoint_url!r}: an S3 endpoint must be http(s)://host[:port]")
        return fs.S3FileSystem(endpoint_override=url.netloc, scheme=url.scheme)

    def arrow_location(self, *parts: str):
        """A pyarrow filesystem and the path in it of ``parts`` under this storage: the explicit
        S3-compatible one (:meth:`filesystem`), else the one the URI names (a local folder, S3)."""
        explicit = self.filesystem()
        if explicit is not None:
            return explicit, self.ray_path(*parts)
        from pyarrow import fs

        filesystem, base = fs.FileSystem.from_uri(self.uri.rstrip("/"))
        return filesystem, "/".join([base.rstrip("/"), *parts])


def ray_storage(path: str, endpoint_url: str | None = None) -> RayStorage:
    """The storage for ``path`` (a folder, made absolute, or a URI); the endpoint applies to S3 only."""
    if "://" not in path:
        return RayStorage(str(Path(path).resolve()))
    if is_s3_uri(path):
        split_s3_uri(path)  # a clear error for s3:// without a bucket
        return RayStorage(path, resolve_endpoint_url(endpoint_url))
    return RayStorage(path)


def stage_dataset(root: str | Path, name: str, checksum: str, storage: RayStorage) -> str | None:
    """Upload the prepared dataset at ``root`` next to the checkpoints; returns its URI, or
    ``None`` when storage is local (workers then read ``root`` itself)."""
    from components.storage.s3 import s3_client, upload_dir

    if not storage.is_s3:
        return None
    uri = f"{storage.uri.rstrip('/')}/datasets/{name}-{checksum[:16]}"
    bucket, prefix = split_s3_uri(uri)
    client = s3_client(storage.endpoint_url)
    try:
        client.head_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST}")
        return uri  # complete from an earlier run: the manifest goes last
    except client.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
            raise
    upload_dir(Path(root), uri, storage.endpoint_url, last=MANIFEST)
    return uri


def local_dataset(uri: str, endpoint_url: str | None = None) -> Path:
    """This node's copy of a staged dataset, downloaded on first use (one download per node even
    when several workers ask at once)."""
    from components.storage.s3 import download_prefix

    cache = Path(os.environ.get(DATA_CACHE_ENV) or Path(tempfile.gettempdir()) / "cvflow-datasets")
    bucket, prefix = split_s3_uri(uri)
    dest = cache / bucket / prefix
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (dest / MANIFEST).is_file():
            download_prefix(uri, dest, endpoint_url)
    return dest
