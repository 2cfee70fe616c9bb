"""Configure the DVC remote from ``storage.dvc_remote`` in params.yaml, in ``.dvc/config.local``.

python -m pipelines.dvc_remote [--params params.yaml]

``.dvc/config.local`` is git-ignored by DVC, so the remote URL and the endpoint of an
S3-compatible server stay on this machine; credentials are never written anywhere: DVC reads
them from the AWS environment variables or ``~/.aws`` like boto3 does.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from components.config import ConfigError, from_dict, load_yaml
from components.storage import DvcRemoteParams
from components.storage.s3 import is_s3_uri, resolve_endpoint_url, split_s3_uri

DVC_TIMEOUT_S = 120


@dataclass
class _RemoteSection:
    """The keys of ``storage`` this command reads; ``storage.path`` belongs to training."""

    s3_endpoint_url: str | None = None
    dvc_remote: DvcRemoteParams = field(default_factory=DvcRemoteParams)


@dataclass(frozen=True)
class RemoteSettings:
    name: str
    url: str
    endpoint_url: str | None  # S3 remotes only


def remote_settings(params: dict, params_path: str) -> RemoteSettings:
    """The remote to configure, from params (and the endpoint's environment variables)."""
    storage = params.get("storage") or {}
    if not isinstance(storage, dict):
        raise ConfigError(params_path, "storage", f"expected a mapping, got {type(storage).__name__}")
    picked = {k: storage[k] for k in ("s3_endpoint_url", "dvc_remote") if k in storage}
    cfg = from_dict(_RemoteSection, picked, source=params_path, key="storage")
    url = cfg.dvc_remote.url
    if not url:
        raise ConfigError(
            params_path, "storage.dvc_remote.url", "not set; set it to the remote's URL, e.g. s3://bucket/dvc-cache"
        )
    endpoint = None
    if is_s3_uri(url):
        try:
            split_s3_uri(url)
        except ValueError as exc:
            raise ConfigError(params_path, "storage.dvc_remote.url", str(exc)) from None
        endpoint = resolve_endpoint_url(cfg.s3_endpoint_url)
    return RemoteSettings(cfg.dvc_remote.name, url, endpoint)


def dvc_commands(settings: RemoteSettings) -> list[list[str]]:
    """The ``dvc`` argument lists that write ``settings`` to ``.dvc/config.local``.

    ``remote add --force`` replaces the whole remote section, so an endpoint set by an earlier
    run does not outlive its removal from params.
    """
    commands = [["remote", "add", "--local", "--force", "-d", settings.name, settings.url]]
    if settings.endpoint_url:
        commands.append(["remote", "modify", "--local", settings.name, "endpointurl", settings.endpoint_url])
    return commands


def dvc_executable() -> str:
    """The ``dvc`` installed next to this interpreter (the project's virtualenv), else on PATH."""
    beside = Path(sys.executable).with_name("dvc")
    if beside.is_file():
        return str(beside)
    found = shutil.which("dvc")
    if found is None:
        raise FileNotFoundError(f"dvc: not found next to {sys.executable} nor on PATH")
    return found


def configure_remote(params_path: str, repo: Path = Path(".")) -> RemoteSettings:
    """Write the remote from ``params_path`` into the DVC repository at ``repo``."""
    settings = remote_settings(load_yaml(params_path), params_path)
    dvc = dvc_executable()
    for args in dvc_commands(settings):
        done = subprocess.run(
            [dvc, *args], cwd=repo, capture_output=True, text=True, timeout=DVC_TIMEOUT_S, check=False
        )
        if done.returncode != 0:
            detail = (done.stderr or done.stdout).strip()
            raise RuntimeError(f"`dvc {' '.join(args)}` failed in {Path(repo).resolve()}: {detail}")
    return settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    try:
        settings = configure_remote(args.params)
    except ConfigError as exc:
        print(f"dvc_remote: error: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        print(f"dvc_remote: error: {exc}", file=sys.stderr)
        return 1
    where = f" (endpoint {settings.endpoint_url})" if settings.endpoint_url else ""
    print(f"DVC remote '{settings.name}' -> {settings.url}{where}, default, in .dvc/config.local")
    return 0


if __name__ == "__main__":
    sys.exit(main())
