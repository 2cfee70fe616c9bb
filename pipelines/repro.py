"""``make repro``: every stage of dvc.yaml, independent ones at the same time, on one Ray.

python -m pipelines.repro [-j 4] [--keep-going] [STAGE ...]

Walks DVC's stage graph and runs each stage whose inputs changed (and each stage after one) as
``dvc --wait-for-lock repro --single-item <stage>``: DVC itself checks, runs and records every
stage, so ``dvc.lock``, the run cache and ``dvc status`` end as after a serial ``dvc repro``.
DVC holds its repository lock only while it checks and records a stage, not while the command
runs, so stages run side by side and wait their turn for the lock instead of failing on it.

All stages share one Ray: without ``RAY_ADDRESS`` (or ``ray.address`` in params) the runner
starts a local Ray bound to 127.0.0.1 with token authentication and every stage joins it as a
driver; Ray places each run's worker group and queues the rest. With an address, the stages go
to that cluster. Ctrl-C or SIGTERM stops every running stage (each gets SIGTERM and ends its
MLflow run as FAILED; the next repro resumes it from its checkpoint) and then the Ray.

A repro that finds nothing to run records what it checked (the size, mtime and inode of every
file the stages read or write, in ``.dvc/tmp/repro-fingerprint.json``); the next one that finds
exactly the same files says "up to date" without loading DVC.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if not __package__:  # run as a file (`python /path/to/pipelines/repro.py`): the project's modules
    sys.path.insert(0, str(ROOT))
FINGERPRINT = Path(".dvc/tmp/repro-fingerprint.json")
STOP_GRACE_S = 20.0


# --- the fast path: nothing changed since the last check ------------------------------------


def _stat_tree(root: Path, rel: str, out: dict[str, list[int]]) -> None:
    path = root / rel
    try:
        st = path.stat()
    except FileNotFoundError:
        out[rel] = []
        return
    if not path.is_dir():
        out[rel] = [st.st_mtime_ns, st.st_size, st.st_ino]
        return
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if entry.name != "__pycache__":
            _stat_tree(root, f"{rel}/{entry.name}", out)


def fingerprint(root: Path, paths: list[str]) -> dict[str, list[int]]:
    """Size, mtime and inode of every file under ``paths`` (relative to ``root``)."""
    out: dict[str, list[int]] = {}
    for p in paths:
        _stat_tree(root, p, out)
    return out


def unchanged_since_last_check(root: Path) -> bool:
    try:
        recorded = json.loads((root / FINGERPRINT).read_text())
    except (OSError, ValueError):
        return False
    return fingerprint(root, recorded["paths"]) == recorded["files"]


def record_fingerprint(root: Path, paths: list[str]) -> None:
    paths = sorted(set(paths))
    target = root / FINGERPRINT
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps({"paths": paths, "files": fingerprint(root, paths)}))
    tmp.replace(target)


def forget_fingerprint(root: Path) -> None:
    (root / FINGERPRINT).unlink(missing_ok=True)


# --- the plan: DVC's graph and what changed --------------------------------------------------


@dataclass
class Plan:
    order: list[str]  # every stage to run, in dvc.yaml's order
    upstream: dict[str, set[str]]  # stage -> stages (to run) it waits for
    paths: list[str]  # every file the pipeline reads or writes, for the fingerprint
    changed: set[str] = field(default_factory=set)
    commands: dict[str, str] = field(default_factory=dict)  # stage -> its command


def make_plan(root: Path, targets: list[str] | None = None) -> Plan:
    """Which stages to run: those DVC finds changed, and every stage downstream of one."""
    import networkx as nx
    from dvc.repo import Repo

    repo = Repo(str(root))
    try:
        with repo.lock:
            graph = repo.index.graph  # an edge runs from a stage to a stage it depends on
            stages = [s for s in repo.index.stages if s.cmd]
            if targets:
                wanted = {s for t in targets for s in repo.stage.collect(t, with_deps=True)}
                stages = [s for s in stages if s in wanted]
            names = {s: s.addressing for s in stages}
            changed = {s for s in stages if s.changed()}
            to_run = set(changed)
            for s in changed:
                to_run.update(x for x in nx.ancestors(graph, s) if x in names)
            upstream = {
                names[s]: {names[d] for d in nx.descendants(graph, s) if d in to_run and d in names} for s in to_run
            }
            paths = {"dvc.yaml", "dvc.lock", "dvc.runs.yaml"}
            for s in repo.index.stages:
                paths.update(os.path.relpath(d.fs_path, root) for d in s.deps if d.protocol == "local")
                paths.update(os.path.relpath(o.fs_path, root) for o in s.outs if o.protocol == "local")
    finally:
        repo.close()
    order = [names[s] for s in stages if s in to_run]
    commands = {names[s]: " ".join(s.cmd) if isinstance(s.cmd, list) else s.cmd for s in to_run}
    return Plan(order, upstream, sorted(paths), {names[s] for s in changed}, commands)


# --- running stages -------------------------------------------------------------------------


@dataclass
class Running:
    name: str
    process: subprocess.Popen
    started: float
    reader: threading.Thread


# DVC's advice after each stage (git add, autostage, dvc push): said once at the end instead.
DVC_ADVICE = ("To track the changes with git", "\tgit add ", "To enable auto staging", "\tdvc config core.autostage",
              "Use `dvc push`")  # fmt: skip


def _relay(name: str, stream, lock: threading.Lock) -> None:
    width = 28
    blank = False
    for line in iter(stream.readline, ""):
        if line.startswith(DVC_ADVICE) or (blank and not line.strip()):
            continue
        blank = not line.strip()
        with lock:
            sys.stdout.write(f"{name:<{width}}| {line}")
            sys.stdout.flush()
    stream.close()


def _dvc() -> str:
    beside = Path(sys.executable).with_name("dvc")
    return str(beside) if beside.exists() else "dvc"


def start_stage(name: str, root: Path, env: dict[str, str], lock: threading.Lock) -> Running:
    cmd = [_dvc(), "--wait-for-lock", "repro", "--single-item", name]
    # A session of its own: stopping the stage signals DVC and the stage's command together.
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True)  # fmt: skip
    reader = threading.Thread(target=_relay, args=(name, proc.stdout, lock), daemon=True)
    reader.start()
    return Running(name, proc, time.monotonic(), reader)


def _session_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def stop_stages(running: list[Running], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM to each stage's whole session (DVC and the stage's command), then SIGKILL to
    whatever is left of them after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for r in running:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(r.process.pid, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            for r in running:
                r.process.poll()  # reap DVC so that its session can empty
            if not any(_session_alive(r.process.pid) for r in running):
                return
            time.sleep(0.1)


def _fmt(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"


RAY_COMMANDS = ("pipelines.train", "pipelines.tune")  # stages that are Ray drivers
TRAIN_COMMAND = "pipelines.train"


class Runner:
    """Starts ready stages, at most ``jobs`` at once; ``start_ray`` (called once, when the first
    stage whose command is a Ray driver is ready) returns the environment such stages get."""

    def __init__(self, plan: Plan, root: Path, jobs: int, keep_going: bool, start_ray, ray: str = "auto",
                 train_jobs: int | None = None):  # fmt: skip
        self.plan, self.root, self.jobs, self.keep_going = plan, root, jobs, keep_going
        # Training stages at once. Ray does not hand freed resources to worker groups in the order
        # they asked: with several runs waiting, one can wait behind every later one.
        self.train_jobs = jobs if train_jobs is None else train_jobs
        self.start_ray = start_ray
        self.ray = ray  # "auto": for stages that are Ray drivers; "always": for every stage; "never"
        self.env: dict[str, str] | None = None  # set once the Ray is up
        self.done: dict[str, float] = {}
        self.failed: dict[str, int] = {}
        self.skipped: set[str] = set()
        self.running: list[Running] = []
        self.lock = threading.Lock()
        self.t0 = time.monotonic()

    def needs_ray(self, name: str) -> bool:
        if self.ray == "auto":
            return any(c in self.plan.commands[name] for c in RAY_COMMANDS)
        return self.ray == "always"

    def say(self, text: str) -> None:
        with self.lock:
            print(f"repro [{_fmt(time.monotonic() - self.t0):>6}] {text}", flush=True)

    def _ready(self) -> list[str]:
        """Stages whose upstream is done: training first (it holds the cluster's CPUs or GPUs and
        takes longest, so the light stages run beside it), then in dvc.yaml's order."""
        busy = {r.name for r in self.running}
        finished = set(self.done) | set(self.failed) | self.skipped
        ready = [s for s in self.plan.order if s not in busy and s not in finished
                 and self.plan.upstream[s] <= set(self.done)]  # fmt: skip
        return sorted(ready, key=lambda s: not self.is_training(s))

    def is_training(self, name: str) -> bool:
        return TRAIN_COMMAND in self.plan.commands.get(name, "")

    def _blocked(self) -> set[str]:
        """Stages that wait for a failed stage, directly or not."""
        blocked, grew = set(), True
        while grew:
            grew = False
            for s in self.plan.order:
                if s not in blocked and self.plan.upstream[s] & (set(self.failed) | blocked):
                    blocked.add(s)
                    grew = True
        return blocked

    def _summary(self) -> str:
        total = len(self.plan.order)
        queued = total - len(self.done) - len(self.failed) - len(self.running) - len(self.skipped)
        names = ", ".join(r.name for r in self.running) or "-"
        return f"running {len(self.running)} ({names}); queued {queued}; done {len(self.done)}/{total}"

    def step(self) -> bool:
        """Reap finished stages and start ready ones; False once nothing is left to do."""
        for r in list(self.running):
            code = r.process.poll()
            if code is None:
                continue
            r.reader.join(timeout=5)
            self.running.remove(r)
            took = time.monotonic() - r.started
            if code == 0:
                self.done[r.name] = took
                self.say(f"done    {r.name} in {_fmt(took)} | {self._summary()}")
            else:
                self.failed[r.name] = code
                self.say(f"FAILED  {r.name} (exit {code}) after {_fmt(took)} | {self._summary()}")
        if self.failed and not self.keep_going:
            return bool(self.running)
        self.skipped |= self._blocked()
        for name in self._ready():
            if len(self.running) >= self.jobs:
                break
            if self.is_training(name) and sum(self.is_training(r.name) for r in self.running) >= self.train_jobs:
                continue
            if self.env is None and self.needs_ray(name):
                if self.running:  # start what needs no Ray first; Ray starts beside it
                    continue
                self.env = self.start_ray()
            self.running.append(start_stage(name, self.root, self.env or dict(os.environ), self.lock))
            self.say(f"start   {name} | {self._summary()}")
        if (
            self.env is None
            and self.running
            and any(
                any(c in self.plan.commands[n] for c in RAY_COMMANDS) for n in self.plan.order if n not in self.done
            )
        ):
            self.env = self.start_ray()
        return bool(self.running)

    def run(self) -> int:
        while self.step():
            time.sleep(0.2)
        self.skipped |= set(self.plan.order) - set(self.done) - set(self.failed)
        if self.failed:
            self.say(f"failed: {', '.join(self.failed)}; not run: {', '.join(sorted(self.skipped)) or '-'}")
            return 1
        self.say(f"all {len(self.done)} stages done")
        return 0


# --- Ray for the stages ---------------------------------------------------------------------


def ray_params(params_file: Path):
    """The ``ray`` section of params (a ConfigError names a bad field)."""
    from components.config import load_yaml
    from components.training.platform import load_platform

    return load_platform(load_yaml(str(params_file)), str(params_file)).ray


def stage_environment(root: Path, cfg) -> tuple[dict[str, str], bool]:
    """The stages' environment; starts the pipeline's local Ray unless a cluster is given."""
    from components.training.platform import ray_address

    if ray_address(cfg):
        return dict(os.environ), False
    from components.training.local_ray import start_local_ray

    address = start_local_ray(cfg.num_cpus, dashboard=cfg.dashboard, project_root=root,
                              poll_interval_s=cfg.train_poll_interval_s, usage_stats=cfg.usage_stats)  # fmt: skip
    import ray

    session = ray._private.worker._global_node.get_session_dir_path()
    env = dict(os.environ)
    env["RAY_ADDRESS"] = address
    print(f"repro: one local Ray for every stage at {address} (127.0.0.1 only, token auth; {session})", flush=True)
    return env, True


def _on_signal(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stages", nargs="*", help="stages to reproduce (with what they depend on); default: all")
    parser.add_argument("-j", "--jobs", type=int, default=int(os.environ.get("CVFLOW_REPRO_JOBS", "4")),
                        help="stages at once (default 4, or CVFLOW_REPRO_JOBS)")  # fmt: skip
    parser.add_argument("--train-jobs", type=int, default=None,
                        help="training stages at once (default: on the local Ray, one per CPU and one ready to "
                        "take a freed place; -j on a cluster; or CVFLOW_REPRO_TRAIN_JOBS)")  # fmt: skip
    parser.add_argument("-k", "--keep-going", action="store_true", help="after a failure, run what does not need it")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--cd", type=Path, default=None, help="the project's folder (default: here)")
    parser.add_argument("--ray", choices=("auto", "always", "never"), default="auto",
                        help="start the stages' Ray: for stages that train or tune (auto), any, or none")  # fmt: skip
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"-j/--jobs: must be at least 1, got {args.jobs}")
    if args.train_jobs is None and os.environ.get("CVFLOW_REPRO_TRAIN_JOBS"):
        args.train_jobs = int(os.environ["CVFLOW_REPRO_TRAIN_JOBS"])
    if args.train_jobs is not None and args.train_jobs < 1:
        parser.error(f"--train-jobs: must be at least 1, got {args.train_jobs}")
    if args.cd is not None:
        os.chdir(args.cd)
    root = Path.cwd()
    if not args.stages and unchanged_since_last_check(root):
        print("repro: everything is up to date (no file changed since the last check)")
        return 0
    from components.config import ConfigError
    from pipelines.stages import refresh

    try:  # each run's inputs in dvc.runs.yaml, before DVC reads dvc.yaml
        if refresh(root, str(args.params)):
            print("repro: params changed the runs' inputs; wrote dvc.runs.yaml", flush=True)
    except ConfigError as exc:
        print(f"repro: error: {exc}", file=sys.stderr)
        return 2
    plan = make_plan(root, args.stages or None)
    if not plan.order:
        if not args.stages:
            record_fingerprint(root, plan.paths)
        print("repro: everything is up to date")
        return 0
    forget_fingerprint(root)
    from components.training.platform import ray_address

    try:
        cfg = ray_params(args.params)
    except ConfigError as exc:
        print(f"repro: error: {exc}", file=sys.stderr)
        return 2
    # Both, explicitly: a shell starts background jobs with SIGINT ignored.
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    ray_state: dict[str, bool] = {}

    def start_ray() -> dict[str, str]:
        env, ray_state["local"] = stage_environment(root, cfg)
        return env

    train_jobs = args.train_jobs
    if train_jobs is None:  # a cluster fits several runs at once; the local Ray one per CPU (and one waiting)
        train_jobs = args.jobs if ray_address(cfg) else min(args.jobs, (cfg.num_cpus or os.cpu_count() or 1) + 1)
    print(f"repro: {len(plan.order)} stages to run, {args.jobs} at a time ({train_jobs} training); "
          f"changed: {', '.join(sorted(plan.changed))}")  # fmt: skip
    runner = Runner(plan, root, args.jobs, args.keep_going, start_ray, args.ray, train_jobs)
    try:
        code = runner.run()
    except KeyboardInterrupt as stop:
        if runner.running:
            runner.say(f"stopping {len(runner.running)} stages ({stop or 'SIGINT'})")
            stop_stages(runner.running)
        print("repro: stopped; `make repro` resumes where it stopped", flush=True)
        code = 130
    except BaseException:
        stop_stages(runner.running)  # no stage outlives the runner
        raise
    finally:
        if ray_state.get("local"):
            import ray

            ray.shutdown()
    if code == 0 and not args.stages:
        after = make_plan(root)
        if not after.order:
            record_fingerprint(root, after.paths)
    return code


if __name__ == "__main__":
    sys.exit(main())
