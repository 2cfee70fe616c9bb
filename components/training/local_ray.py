"""A Ray on this machine only: every server on 127.0.0.1, token authentication, processes that
end with the process that started it.

On Linux, ``ray.init()`` (and ``ray start --node-ip-address=127.0.0.1``) replaces the loopback by
the machine's address, and its GCS, raylet and worker servers listen on every interface. With
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` Ray takes this machine for a single-node one, as it does
on macOS: the node's address is 127.0.0.1 and every server binds to it. Processes started from
such a Ray, and drivers that join it (the pipeline's stages), need the same setting and token;
they inherit them from the environment this module sets.

Its processes also get ``RAY_API_SERVER_ADDRESS``, the address of its dashboard. Ray's state API,
called without an address, otherwise looks for the machine's Ray by its running GCS servers and
fails when it finds two ("Found multiple active Ray instances"). Ray Train's placement-group
cleaner, a detached actor that removes the reservation of a run whose controller died, calls it
that way: on a machine with a second Ray its monitor thread died on that error and the dead run's
CPUs stayed reserved, so the next run waited for them without end.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import threading
from collections.abc import MutableMapping
from contextlib import contextmanager
from pathlib import Path

SINGLE_NODE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
API_SERVER = "RAY_API_SERVER_ADDRESS"  # where Ray's state API goes when it is given no address


def local_ray_environment(environ: MutableMapping[str, str] | None = None, *, poll_interval_s: float = 0.25,
                          usage_stats: bool = False) -> MutableMapping[str, str]:  # fmt: skip
    """Set what a loopback-only, token-authenticated local Ray and its drivers need: values the
    user set are kept; a token is generated unless one is given (``RAY_AUTH_TOKEN``, its path, or
    Ray's default ``~/.ray/auth_token``)."""
    environ = os.environ if environ is None else environ
    environ[SINGLE_NODE] = "0"
    environ["RAY_AUTH_MODE"] = "token"
    given = environ.get("RAY_AUTH_TOKEN") or environ.get("RAY_AUTH_TOKEN_PATH")
    if not given and not (Path.home() / ".ray" / "auth_token").is_file():
        environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    environ.setdefault("RAY_USAGE_STATS_ENABLED", "1" if usage_stats else "0")
    # Ray Train's controller polls its workers every 2 s by default: seconds of idle start-up and
    # shutdown in every short CPU run. The controller runs in this Ray's worker processes.
    environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(poll_interval_s))
    return environ


def start_local_ray(num_cpus: int | None, *, dashboard: bool, project_root: Path, poll_interval_s: float = 0.25,
                    usage_stats: bool = False) -> str:  # fmt: skip
    """Start a local Ray in this process (it ends with this process) and return its GCS address."""
    local_ray_environment(poll_interval_s=poll_interval_s, usage_stats=usage_stats)
    # Workers import the project from this checkout; they inherit this environment.
    pythonpath = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(filter(None, [str(project_root), pythonpath])))
    import ray

    reload_ray_settings()
    options = {"dashboard_port": own_dashboard(os.environ)} if dashboard else {}
    with python_signal_handlers_kept():
        ray.init(num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1", **options)
    return ray.get_runtime_context().gcs_address


def own_dashboard(environ: MutableMapping[str, str]) -> int:
    """A free loopback port for the dashboard of a Ray about to start, named in ``environ`` as
    the state API's address: the Ray's processes inherit it and query their own Ray."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    environ[API_SERVER] = f"http://127.0.0.1:{port}"
    return port


@contextmanager
def python_signal_handlers_kept():
    """``ray.init`` installs a C++ handler for SIGTERM that aborts the process (core dump, no
    ``finally``, no cleanup): put back the Python handlers that were there before it."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        if threading.current_thread() is threading.main_thread():
            for sig, handler in saved.items():
                if callable(handler) or handler in (signal.SIG_IGN, signal.SIG_DFL):
                    signal.signal(sig, handler)


def reload_ray_settings() -> None:
    """Make an already imported Ray see the settings just put in the environment: the
    single-node switch is read when Ray is imported, its C++ config and token once per process."""
    from ray._private import ray_constants
    from ray._raylet import AuthenticationTokenLoader, Config

    ray_constants.ENABLE_RAY_CLUSTER = False

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
