"""The local scale-out stack for tests: ``infra/local/stack.sh`` on free ports of 127.0.0.1.

An S3-compatible server (moto), an MLflow server with basic auth whose artifacts go to that S3,
and a Ray cluster with token authentication: a head without CPUs and worker nodes of one CPU.
Nothing here touches ``os.environ`` of the test process except inside ``client_env()``: drivers
run as subprocesses with ``environ()``, so the stack's credentials cannot leak into other tests.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import ROOT

STACK_SH = ROOT / "infra" / "local" / "stack.sh"
BIN = Path(sys.executable).parent
# A node whose raylet is gone is declared dead after ~3 s (3 refused checks, 1 s apart) instead
# of Ray's ~20 s (defaults: initial delay 5000 ms, period 3000 ms, failure threshold 5). A check
# that gets no answer still waits Ray's default 10000 ms: a raylet starved of CPU by a busy machine
# answers late but is not taken for dead (a 1000 ms timeout lost live nodes under load).
FAST_NODE_DEATH = {
    "RAY_health_check_initial_delay_ms": "1000",  # Ray: 5000
    "RAY_health_check_period_ms": "1000",  # Ray: 3000
    "RAY_health_check_timeout_ms": "10000",  # Ray's default
    "RAY_health_check_failure_threshold": "3",  # Ray: 5
}
# Settings of the calling shell that would point drivers elsewhere.
# Settings of other Rays and stores that must not reach the stack; RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# (a loopback-only local Ray's) would stop its worker nodes from joining.
FOREIGN = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI", "CVFLOW_STORAGE_PATH", "AWS_ENDPOINT_URL",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export ") :].split("#")[0].strip().partition("=")
            env[key] = value
    return env


@dataclass
class LocalStack:
    dir: Path
    temp_dir: Path  # the Ray nodes' folders
    env: dict[str, str]  # what `source <dir>/env` exports, plus the Ray token
    ray_port: int
    agent_port: int

    def environ(self, **extra: str) -> dict[str, str]:
        """An environment for a driver or a CLI on this stack."""
        base = {k: v for k, v in os.environ.items() if k not in FOREIGN}
        base["PATH"] = f"{BIN}{os.pathsep}{base.get('PATH', '')}"
        return {**base, **self.env, **extra}

    @property
    def secrets(self) -> dict[str, str]:
        """The credentials this stack made; none may end up in MLflow."""
        keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "RAY_AUTH_TOKEN")
        return {k: self.env[k] for k in keys}

    @contextmanager
    def client_env(self) -> Iterator[None]:
        """The stack's MLflow and S3 settings in ``os.environ`` for the duration (MLflow's and
        boto3's clients in the test process read them there)."""
        keys = [k for k in self.env if k.startswith(("MLFLOW_", "AWS_"))]
        saved = {k: os.environ.get(k) for k in keys}
        os.environ.update({k: self.env[k] for k in keys})
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def raylets(self) -> list:
        import psutil

        found = []
        for proc in psutil.process_iter(["name", "cmdline"]):
            cmd = " ".join(proc.info["cmdline"] or [])
            if proc.info["name"] == "raylet" and f"{self.temp_dir}/" in cmd:
                found.append(proc)
        return found

    def train_workers(self) -> list:
        """The live training processes of this cluster (children of its raylets): Ray Train's
        workers, and the actors that one-worker runs train in (components/training/actor_run.py)."""
        workers = []
        for raylet in self.raylets():
            for child in raylet.children():
                try:
                    if any(name in " ".join(child.cmdline()) for name in ("RayTrainWorker", "RunActor")):
                        workers.append(child)
                except Exception:  # exited meanwhile
                    continue
        return workers

    def add_worker_node(self, name: str, cpus: int = 1) -> None:
        """Start one more worker node, as an autoscaler would replace a lost one."""
        cmd = [
            str(BIN / "ray"),
            "start",
            f"--address=127.0.0.1:{self.ray_port}",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={cpus}",
            f"--temp-dir={self.temp_dir}/{name}",
            f"--node-name={name}",
            f"--dashboard-agent-listen-port={free_port()}",
            "--disable-usage-stats",
        ]
        subprocess.run(cmd, env=self.environ(), check=True, capture_output=True, timeout=120)


def wait_for(predicate, timeout: float, what: str, every: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


@contextmanager
def local_stack(stack_dir: Path, workers: int = 2, cpus: int = 1) -> Iterator[LocalStack]:
    """Start the stack, yield it, stop it (also when the start fails half way)."""
    # Unix socket paths are limited to ~107 bytes: the Ray folders live under a short name.
    temp_dir = Path(tempfile.mkdtemp(prefix="cvr-", dir="/tmp"))
    ports = {k: str(free_port()) for k in ("S3_PORT", "MLFLOW_PORT", "RAY_HEAD_PORT", "RAY_DASHBOARD_PORT")}
    ports["RAY_CLIENT_PORT"] = str(free_port())
    agent_port = free_port()
    settings = {
        "STACK_DIR": str(stack_dir),
        "RAY_TEMP_DIR": str(temp_dir),
        "RAY_AGENT_PORT": str(agent_port),
        "RAY_AUTH_TOKEN": secrets.token_hex(32),  # this stack's token; ~/.ray is left alone
        **ports,
        **FAST_NODE_DEATH,
    }
    base = {k: v for k, v in os.environ.items() if k not in FOREIGN}
    base["PATH"] = f"{BIN}{os.pathsep}{base.get('PATH', '')}"
    env = {**base, **settings}

    def down() -> None:
        subprocess.run([str(STACK_SH), "down"], env=env, capture_output=True, timeout=120, check=False)

    try:
        up = subprocess.run(
            [str(STACK_SH), "up", str(workers), str(cpus)], env=env, capture_output=True, text=True, timeout=300
        )
        assert up.returncode == 0, f"stack.sh up failed:\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}"
        stack_env = _read_env_file(stack_dir / "env")
        stack_env.update({k: settings[k] for k in ("RAY_AUTH_TOKEN", *FAST_NODE_DEATH)})
        yield LocalStack(stack_dir, temp_dir, stack_env, int(ports["RAY_HEAD_PORT"]), agent_port)
    finally:
        down()


def kill(proc, sig: int = signal.SIGKILL) -> None:
    with suppress(ProcessLookupError):
        os.kill(proc.pid, sig)
