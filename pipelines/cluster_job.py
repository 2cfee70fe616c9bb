"""Run the pipeline on a Ray cluster as a Ray job: this checkout is the job's working directory.

python -m pipelines.cluster_job submit [--address http://127.0.0.1:8265] [--env NAME ...] [-- COMMAND]
python -m pipelines.cluster_job run [-- COMMAND]        # the job's entrypoint, on the cluster

COMMAND defaults to ``python -m pipelines.repro``: every stage through DVC, independent ones at
once, each run's worker group placed on the cluster's nodes (``-- dvc repro`` runs them one by one).

``submit`` uploads the working tree (git-ignored files left out) through Ray's Jobs API, waits,
prints the job's log and exits 0 only if the job succeeded. The address comes from ``--address``,
``RAY_API_SERVER_ADDRESS`` or ``RAY_ADDRESS``; token authentication (``RAY_AUTH_MODE=token``)
works as for the ``ray`` CLI. The same job without this wrapper:

    ray job submit --working-dir . -- python -m pipelines.cluster_job run

Where the cluster puts runs and checkpoints is the cluster's environment (``MLFLOW_TRACKING_URI``,
``CVFLOW_STORAGE_PATH``...) or params; ``--env NAME`` forwards a variable of this shell, and
refuses names that look secret: credentials belong to the cluster's nodes (a role, a Secret),
not to the job's definition, which Ray keeps and shows in its dashboard.

Ray leaves ``.git`` out of a job's working directory, so ``run`` tells DVC to work without git
(in ``.dvc/config.local`` of the job's copy only) and the MLflow runs get the commit that
``submit`` saw (``CVFLOW_GIT_COMMIT``). With ``storage.dvc_remote.url`` in params, ``run``
configures that remote and pushes the outputs to it after the command succeeds.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from components.config import load_yaml
from components.tracking.mlflow_run import GIT_COMMIT_ENV, git_commit, is_secret_key

DEFAULT_COMMAND = ["python", "-m", "pipelines.repro"]  # every stage, many at once, on the cluster
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def job_entrypoint(command: list[str]) -> str:
    return shlex.join(["python", "-m", "pipelines.cluster_job", "run", "--", *command])


def job_runtime_env(working_dir: str | Path, forward: list[str], environ: dict[str, str]) -> dict:
    """The job's runtime environment: the working tree and the variables asked for (none secret)."""
    env_vars = {GIT_COMMIT_ENV: git_commit(working_dir)}
    for name in forward:
        if is_secret_key(name):
            raise ValueError(f"--env {name}: looks like a credential; give it to the cluster's nodes instead")
        if name not in environ:
            raise ValueError(f"--env {name}: not set in this environment")
        env_vars[name] = environ[name]
    return {"working_dir": str(working_dir), "env_vars": env_vars}


def api_address(given: str | None, environ: dict[str, str]) -> str:
    address = given or environ.get("RAY_API_SERVER_ADDRESS") or environ.get("RAY_ADDRESS")
    if not address:
        raise ValueError("no cluster address: pass --address or set RAY_API_SERVER_ADDRESS (http://head:8265)")
    return address


def submit(args: argparse.Namespace) -> int:
    from ray.job_submission import JobSubmissionClient

    try:
        address = api_address(args.address, dict(os.environ))
        runtime_env = job_runtime_env(args.working_dir, args.env, dict(os.environ))
    except ValueError as exc:
        print(f"cluster_job: error: {exc}", file=sys.stderr)
        return 2
    client = JobSubmissionClient(address)
    job_id = client.submit_job(entrypoint=job_entrypoint(args.command or DEFAULT_COMMAND), runtime_env=runtime_env)
    print(f"cluster_job: submitted {job_id} to {address}", flush=True)
    if args.no_wait:
        return 0
    status = client.get_job_status(job_id)
    while str(status.value if hasattr(status, "value") else status) not in TERMINAL:
        time.sleep(0.5)
        status = client.get_job_status(job_id)
    status = str(status.value if hasattr(status, "value") else status)
    print(client.get_job_logs(job_id), end="")
    print(f"cluster_job: {job_id} {status}", flush=True)
    return 0 if status == "SUCCEEDED" else 1


def run(command: list[str], cwd: Path = Path(".")) -> int:
    """The job's entrypoint: ``command`` (the pipeline's runner) in the job's copy of the project."""
    if not (cwd / ".git").exists():  # Ray leaves .git out of the working directory
        subprocess.run(["dvc", "config", "--local", "core.no_scm", "true"], cwd=cwd, check=True)
    remote = ((load_yaml(cwd / "params.yaml").get("storage") or {}).get("dvc_remote") or {}).get("url")
    if remote:
        subprocess.run([sys.executable, "-m", "pipelines.dvc_remote"], cwd=cwd, check=True)
    from components.config import ConfigError
    from pipelines.stages import refresh

    try:  # dvc.runs.yaml from the job's params, also for a plain `-- dvc repro`
        refresh(cwd)
    except ConfigError as exc:
        print(f"cluster_job: error: {exc}", file=sys.stderr)
        return 2
    done = subprocess.run(command, cwd=cwd)
    if done.returncode != 0:
        return done.returncode
    if remote:  # the outputs outlive the job's temporary working directory
        return subprocess.run(["dvc", "push"], cwd=cwd).returncode
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    s = sub.add_parser("submit", help="submit the pipeline as a Ray job and wait for it")
    s.add_argument("--address", default=None, help="the Jobs API, e.g. http://127.0.0.1:8265")
    s.add_argument("--working-dir", default=".", type=Path)
    s.add_argument("--env", action="append", default=[], metavar="NAME", help="forward this variable to the job")
    s.add_argument("--no-wait", action="store_true")
    r = sub.add_parser("run", help="the job's entrypoint (runs on the cluster)")
    for p in (s, r):
        p.add_argument("command", nargs="*", help="default: python -m pipelines.repro")
    args = parser.parse_args(argv)
    if args.action == "submit":
        return submit(args)
    return run(args.command or DEFAULT_COMMAND)


if __name__ == "__main__":
    sys.exit(main())
