"""The pipeline runner (pipelines/repro.py) on small DVC pipelines of its own: what it records
equals a serial `dvc repro`, DVC's lock does not fail it, stopping it leaves nothing behind."""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from pipelines.repro import Plan, Runner
from tests.conftest import ROOT

DVC = str(Path(sys.executable).with_name("dvc"))

STEP = """\
import os, sys, time
out, wait, *ins = sys.argv[1:]
if os.path.exists("slow"):
    open("started", "w").write(str(os.getpid()))
    if os.environ.get("JOIN_RAY"):
        import ray
        ray.init(address=os.environ["RAY_ADDRESS"])
        holder = ray.remote(num_cpus=0)(type("Holder", (), {"ping": lambda self: 1})).remote()
        ray.get(holder.ping.remote())
    time.sleep(float(wait))
open(out, "w").write("".join(open(i).read() for i in ins) + out + "\\n")
"""

# A diamond and a tail: a -> b@1..b@4 -> c, plus d independent of all.
DIAMOND = {
    "stages": {
        "a": {"cmd": "python step.py a.txt 0", "deps": ["step.py"], "outs": ["a.txt"]},
        "b": {
            "foreach": [1, 2, 3, 4],
            "do": {
                "cmd": "python step.py b${item}.txt 0 a.txt",
                "deps": ["step.py", "a.txt"],
                "outs": ["b${item}.txt"],
            },
        },
        "c": {
            "cmd": "python step.py c.txt 0 b1.txt b2.txt b3.txt b4.txt",
            "deps": ["step.py", "b1.txt", "b2.txt", "b3.txt", "b4.txt"],
            "outs": ["c.txt"],
        },
        "d": {"cmd": "python step.py d.txt 0", "deps": ["step.py"], "params": ["d"], "outs": ["d.txt"]},
    }
}


def _project(path: Path, pipeline: dict) -> Path:
    path.mkdir(parents=True)
    (path / "step.py").write_text(STEP)
    (path / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    (path / "params.yaml").write_text(yaml.safe_dump({"d": 1, "ray": {"num_cpus": 1, "dashboard": False}}))
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    subprocess.run([DVC, "init", "-q"], cwd=path, check=True)
    return path


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT)
    return env


def _runner(project: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipelines.repro", *args]
    return subprocess.run(cmd, cwd=project, env=_env(), capture_output=True, text=True, timeout=timeout)


def _status(project: Path) -> str:
    return subprocess.run([DVC, "status"], cwd=project, env=_env(), capture_output=True, text=True).stdout


def _run_cache(project: Path) -> list[str]:
    runs = project / ".dvc" / "cache" / "runs"
    return sorted(str(p.relative_to(runs)) for p in runs.rglob("*") if p.is_file())


def test_parallel_runner_records_what_a_serial_dvc_repro_records(tmp_path):
    serial, parallel = _project(tmp_path / "serial", DIAMOND), _project(tmp_path / "parallel", DIAMOND)
    done = subprocess.run([DVC, "repro"], cwd=serial, env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    ran = _runner(parallel, "-j", "4", "--ray", "never")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "all 7 stages done" in ran.stdout
    # b@1..b@4 and d ran side by side: each started before the first of them was done.
    starts = [ran.stdout.index(f"start   {s} ") for s in ("b@1", "b@2", "b@3", "b@4")]
    assert max(starts) < ran.stdout.index("done    b@")
    assert yaml.safe_load((serial / "dvc.lock").read_text()) == yaml.safe_load((parallel / "dvc.lock").read_text())
    assert _run_cache(serial) == _run_cache(parallel) and len(_run_cache(serial)) == 7
    assert "up to date" in _status(serial) and "up to date" in _status(parallel)
    again = _runner(parallel, "--ray", "never")
    assert again.returncode == 0 and "up to date" in again.stdout and "start" not in again.stdout

    # A params edit re-runs its stage only, as with dvc repro; the runner then records the check.
    (parallel / "params.yaml").write_text(yaml.safe_dump({"d": 2, "ray": {"num_cpus": 1, "dashboard": False}}))
    edited = _runner(parallel, "--ray", "never")
    assert edited.returncode == 0, edited.stdout + edited.stderr
    assert re.findall(r"start   (\S+)", edited.stdout) == ["d"]
    assert "up to date" in _status(parallel)
    assert "no file changed since the last check" in _runner(parallel, "--ray", "never").stdout


def test_contention_for_dvcs_lock_does_not_fail_a_stage(tmp_path):
    wide = {"stages": {"s": {"foreach": list(range(8)), "do": {
        "cmd": "python step.py s${item}.txt 0", "deps": ["step.py"], "outs": ["s${item}.txt"]}}}}  # fmt: skip
    project = _project(tmp_path / "wide", wide)
    stop = threading.Event()

    def hold_the_lock():  # another DVC process at the same time, again and again (it takes the repo lock)
        while not stop.is_set():
            subprocess.run([DVC, "status"], cwd=project, env=_env(), capture_output=True)

    other = threading.Thread(target=hold_the_lock, daemon=True)
    other.start()
    try:
        ran = _runner(project, "-j", "8", "--ray", "never")
    finally:
        stop.set()
        other.join(timeout=30)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "all 8 stages done" in ran.stdout
    assert "up to date" in _status(project)


def _processes_holding(text: str, where: str) -> list[str]:
    """Processes whose ``/proc/<pid>/<where>`` (``cmdline``, ``environ``) holds ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text.encode() in (entry / where).read_bytes().replace(b"\0", b" "):
                    found.append(f"{entry.name}: {(entry / 'cmdline').read_bytes()[:120]!r}")
            except OSError:
                continue
    return found


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stopping_the_runner_leaves_no_stage_or_ray_behind_and_the_next_run_resumes(tmp_path, sig):
    pipeline = {"stages": {
        "long": {"cmd": "python step.py long.txt 120", "deps": ["step.py"], "outs": ["long.txt"]},
        "after": {"cmd": "python step.py after.txt 0 long.txt", "deps": ["step.py", "long.txt"], "outs": ["after.txt"]},
    }}  # fmt: skip
    project = _project(tmp_path / "stop", pipeline)
    (project / "slow").touch()
    # The stage is a driver of the runner's Ray, as training stages are; the token marks every
    # process started for this runner (its Ray's included), whatever it calls itself.
    token = secrets.token_hex(16)
    env = {**_env(), "JOIN_RAY": "1", "RAY_AUTH_TOKEN": token}
    cmd = [sys.executable, "-m", "pipelines.repro", "--ray", "always"]
    runner = subprocess.Popen(cmd, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (project / "started").exists() and time.time() < deadline and runner.poll() is None:
        time.sleep(0.2)
    assert (project / "started").exists(), runner.communicate()[0] if runner.poll() is not None else "no start"
    time.sleep(3)  # the stage has joined the Ray
    runner.send_signal(sig)
    out, _ = runner.communicate(timeout=60)
    assert runner.returncode == 130, out
    assert f"stopping 1 stages ({sig.name})" in out and "resumes where it stopped" in out
    session = re.search(r"token auth; (\S+)\)", out).group(1)
    time.sleep(3)
    assert _processes_holding(token, "environ") == []
    assert _processes_holding(str(project / "step.py"), "cmdline") == []
    assert _processes_holding("step.py long.txt", "cmdline") == []
    assert _processes_holding(session, "cmdline") == [], "a process of the runner's Ray is still there"
    assert not (project / "long.txt").exists()  # nothing left behind as if the stage had finished

    (project / "slow").unlink()
    again = _runner(project, "--ray", "always")
    assert again.returncode == 0, again.stdout + again.stderr
    assert re.findall(r"start   (\S+)", again.stdout) == ["long", "after"]
    assert "up to date" in _status(project)


def test_a_failed_stage_stops_what_needs_it_and_keep_going_runs_the_rest(tmp_path):
    pipeline = {"stages": {
        "bad": {"cmd": "python -c 'raise SystemExit(3)'", "outs": ["bad.txt"]},
        "needs_bad": {"cmd": "python step.py n.txt 0 bad.txt", "deps": ["bad.txt"], "outs": ["n.txt"]},
        "other": {"cmd": "python step.py o.txt 0", "deps": ["step.py"], "outs": ["o.txt"]},
    }}  # fmt: skip
    project = _project(tmp_path / "fail", pipeline)
    ran = _runner(project, "-j", "1", "--keep-going", "--ray", "never")
    assert ran.returncode == 1
    assert "FAILED  bad" in ran.stdout and "done    other" in ran.stdout
    assert "start   needs_bad" not in ran.stdout
    assert "not run: needs_bad" in ran.stdout


def test_runner_schedules_by_the_graph_and_at_most_jobs_at_once(monkeypatch):
    order = ["a", "b", "c", "d"]
    plan = Plan(order, {"a": set(), "b": {"a"}, "c": {"a"}, "d": {"b", "c"}}, [], set(),
                {s: "true" for s in order})  # fmt: skip
    started: list[str] = []

    class Fake:
        def __init__(self, name):
            self.name, self.process = name, self
            self.code = None
            self.started, self.reader = 0.0, threading.Thread(target=lambda: None)
            self.reader.start()

        def poll(self):
            return self.code

    def start(name, root, env, lock):
        started.append(name)
        return Fake(name)

    monkeypatch.setattr("pipelines.repro.start_stage", start)
    runner = Runner(plan, Path("."), 1, False, start_ray=lambda: {}, ray="never")
    runner.step()
    assert started == ["a"]
    runner.running[0].code = 0
    runner.step()
    assert started == ["a", "b"]  # one at a time (-j 1), in dvc.yaml's order
    runner.jobs = 2
    runner.step()
    assert started == ["a", "b", "c"]
    assert not any(s == "d" for s in started)  # d waits for both b and c
    for r in runner.running:
        r.code = 0
    runner.step()
    assert started == ["a", "b", "c", "d"]
    # A training stage goes before lighter ones that became ready with it.
    plan.order += ["e", "c2"]
    plan.upstream.update(e=set(), c2=set())
    plan.commands.update(e="true", c2="python -m pipelines.train --run c2")
    assert runner._ready()[0] == "c2"
    # At most train_jobs training stages at once: the others wait, lighter ones go on.
    runner.jobs, runner.train_jobs = 3, 1
    plan.order += ["c3"]
    plan.upstream.update(c3=set())
    plan.commands.update(c3="python -m pipelines.train --run c3")
    for r in runner.running:
        r.code = 0
    runner.step()
    assert started[-2:] == ["c2", "e"]
