"""A real S3-compatible server on 127.0.0.1 for tests: moto in server mode, with fake credentials.

Unlike ``moto.mock_aws`` (which patches botocore inside this process), the server answers real
HTTP, so subprocesses such as ``dvc push`` (s3fs/aiobotocore) talk to it too. Use the fixture
``s3_endpoint`` by importing it into the test module:

    from tests.s3_server import s3_endpoint_fixture  # noqa: F401

    def test_x(s3_endpoint):
        client = s3_client(s3_endpoint)

(``from tests.s3_server import s3_endpoint`` works as well, but then ruff reports every test
taking ``s3_endpoint`` as a redefinition, F811.)

The endpoint is handed out, not put in ``AWS_ENDPOINT_URL``, so code under test gets it the way
users give it (an argument or params); a developer's own AWS settings are hidden meanwhile.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
# Settings of a developer's shell that would send requests elsewhere or with other credentials.
HIDDEN_AWS_ENV = (
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
)


@contextmanager
def fake_aws_env() -> Iterator[None]:
    """Fake credentials in ``os.environ`` for the duration; the previous values come back after.

    ``~/.aws`` is hidden by pointing the AWS config files at paths that do not exist (dvc-s3
    fails on an existing but non-regular file such as ``/dev/null``).
    """
    files = ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")
    saved = {k: os.environ.get(k) for k in (*FAKE_AWS_ENV, *HIDDEN_AWS_ENV, *files)}
    empty = tempfile.mkdtemp(prefix="no-aws-config-")
    try:
        for k in HIDDEN_AWS_ENV:
            os.environ.pop(k, None)
        os.environ.update(FAKE_AWS_ENV)
        os.environ.update({k: os.path.join(empty, k.lower()) for k in files})
        yield
    finally:
        shutil.rmtree(empty, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def start_s3_server() -> Iterator[str]:
    """Start moto's S3 server on a free port of 127.0.0.1; yields its endpoint URL.

    moto keeps its state per process, not per server, so the state is reset on start: every
    user begins with no buckets.
    """
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        reset = urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")
        with urllib.request.urlopen(reset, timeout=10):
            pass
        with fake_aws_env():
            yield endpoint
    finally:
        server.stop()


@pytest.fixture(name="s3_endpoint")
def s3_endpoint_fixture() -> Iterator[str]:
    """The URL of a fresh, empty S3 server on 127.0.0.1, with fake AWS credentials in the environment."""
    with start_s3_server() as endpoint:
        yield endpoint


s3_endpoint = s3_endpoint_fixture


PROJECT_ROOT = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).with_name("dvc"))


def git_dvc_repo(repo: Path, scratch: Path, timeout: int = 300) -> Callable[..., str]:
    """Make ``repo`` a fresh git + DVC repository isolated from the user's DVC config, and return
    a runner for commands inside it (the environment carries the fake AWS credentials)."""
    repo.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
        "DVC_NO_ANALYTICS": "1",
        "DVC_GLOBAL_CONFIG_DIR": str(scratch / "dvc-global"),
        "DVC_SYSTEM_CONFIG_DIR": str(scratch / "dvc-system"),
        "DVC_SITE_CACHE_DIR": str(scratch / "dvc-site"),
    }

    def run(*cmd: str) -> str:
        done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout, check=False)
        assert done.returncode == 0, f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    run("git", "init", "-q")
    run(DVC, "init", "-q")
    return run
