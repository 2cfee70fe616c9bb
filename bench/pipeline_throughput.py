"""Throughput of the whole pipeline: wall time, and the share of it spent training.

    python -m bench.pipeline_throughput [--command "python -m pipelines.repro -j 4"] [--noop-repeats 5]
    python -m bench.pipeline_throughput --db old/mlflow.db --wall 2373   # a repro measured before

Clones this repository's HEAD into a temporary folder (a fresh checkout: nothing prepared,
trained or cached), runs the pipeline there with the default params and measures:

- the wall time of the command;
- the **training share**: the union of every run's epoch intervals over the wall time. Each
  epoch's interval ends at its ``time/epoch_s`` metric's MLflow timestamp and lasts that many
  seconds; overlapping epochs of runs that train side by side count once;
- the sum of all epoch times (above the union when runs overlap);
- a no-op repro (nothing changed) against ``dvc version``, each run ``--noop-repeats`` times one
  after the other (median, min, max), and once more with the runner's record of the last check
  removed, so that DVC itself checks every stage.

``--db`` reads an existing MLflow database instead (with ``--wall``, the wall time measured for
it). Results go to bench/results/pipeline_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def epoch_intervals(db: Path) -> list[tuple[float, float]]:
    con = sqlite3.connect(db)
    rows = con.execute("select value, timestamp from metrics where key = 'time/epoch_s'").fetchall()
    return sorted((ts / 1000 - value, ts / 1000) for value, ts in rows)


def union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def run_span(db: Path) -> float:
    """From the first MLflow run's start to the last one's end, in seconds."""
    con = sqlite3.connect(db)
    first, last = con.execute("select min(start_time), max(end_time) from runs").fetchone()
    return (last - first) / 1000


def handovers(db: Path) -> dict:
    """Per trained run (an MLflow run with epochs): seconds from its start to its first epoch's
    start (Ray, the workers, the model and data), and from its last epoch's end to its end (test
    scoring, the ledger, files). The best seed's run is reopened when its entry registers the
    model, so its "after" also holds the entry's finish: read the median, not the sum."""
    con = sqlite3.connect(db)
    rows = con.execute(
        "select r.run_uuid, r.start_time, r.end_time, min(m.timestamp - 1000 * m.value), max(m.timestamp) "
        "from runs r join metrics m on r.run_uuid = m.run_uuid where m.key = 'time/epoch_s' "
        "and r.status = 'FINISHED' group by r.run_uuid"
    ).fetchall()
    if not rows:
        return {"runs": 0}
    before = [(first - start) / 1000 for _, start, _, first, _ in rows]
    after = [(end - last) / 1000 for _, _, end, _, last in rows]
    return {"runs": len(rows), "before_first_epoch_s": stats(before), "after_last_epoch_s": stats(after),
            "before_sum_s": sum(before), "after_sum_s": sum(after)}  # fmt: skip


def training_figures(db: Path, wall: float) -> dict:
    intervals = epoch_intervals(db)
    union = union_length(intervals)
    return {
        "handovers": handovers(db),
        "wall_s": wall,
        "epochs": len(intervals),
        "epoch_union_s": union,
        "epoch_sum_s": sum(b - a for a, b in intervals),
        "training_share": union / wall,
        "mlflow_run_span_s": run_span(db),
    }


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def noop_figures(command: list[str], cwd: Path, env: dict[str, str], repeats: int) -> dict:
    dvc = str(Path(sys.executable).with_name("dvc"))
    repro, version = [], []
    for _ in range(repeats):  # side by side: one of each in turn
        repro.append(timed(command, cwd, env))
        version.append(timed([dvc, "version"], cwd, env))
    (cwd / ".dvc" / "tmp" / "repro-fingerprint.json").unlink(missing_ok=True)
    checked = timed(command, cwd, env)  # DVC checks every stage (and records the check again)
    return {
        "repro_noop_s": stats(repro),
        "dvc_version_s": stats(version),
        "ratio": statistics.median(repro) / statistics.median(version),
        "repro_noop_dvc_checks_s": checked,
        "ratio_dvc_checks": checked / statistics.median(version),
    }


def fresh_run(command: list[str], repeats: int, keep: Path | None) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="pipeline-throughput-")) if keep is None else keep
    clone = tmp / "clone"
    subprocess.run(["git", "clone", "-q", "--local", str(ROOT), str(clone)], check=True)
    env = {
        k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "CVFLOW_STORAGE_PATH")
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(clone)
    log = tmp / "repro.log"
    print(f"pipeline_throughput: {shlex.join(command)} in {clone} (log: {log})", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(command, cwd=clone, env=env, stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"pipeline_throughput: the repro failed (exit {done.returncode}); see {log}")
    figures = training_figures(clone / "mlflow.db", wall)
    figures["noop"] = noop_figures(command, clone, env, repeats)
    figures["clone"] = str(clone)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--command", default=f"{sys.executable} -m pipelines.repro -j 4")
    parser.add_argument("--noop-repeats", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the clone here (default: a temporary folder)")
    parser.add_argument("--db", type=Path, default=None, help="analyse this MLflow database instead of running")
    parser.add_argument("--wall", type=float, default=None, help="with --db: the wall time it took, in seconds")
    parser.add_argument("--out", type=Path, default=Path("bench/results/pipeline_throughput.json"))
    args = parser.parse_args()
    if args.db is not None:
        if args.wall is None:
            parser.error("--db needs --wall (the measured wall time of that repro)")
        figures = training_figures(args.db, args.wall)
    else:
        figures = fresh_run(shlex.split(args.command), args.noop_repeats, args.workdir)
    print(
        f"wall {figures['wall_s']:.0f} s; {figures['epochs']} epochs; union of epochs {figures['epoch_union_s']:.0f} s "
        f"(sum {figures['epoch_sum_s']:.0f} s); training share {figures['training_share']:.3f}"
    )
    h = figures["handovers"]
    if h["runs"]:
        b, a = h["before_first_epoch_s"], h["after_last_epoch_s"]
        print(
            f"{h['runs']} trained runs: before the first epoch median {b['median']:.1f} s "
            f"(sum {h['before_sum_s']:.0f} s), "
            f"after the last epoch median {a['median']:.1f} s (sum {h['after_sum_s']:.0f} s)"
        )
    if "noop" in figures:
        n = figures["noop"]
        print(
            f"no-op repro median {n['repro_noop_s']['median']:.2f} s vs dvc version "
            f"{n['dvc_version_s']['median']:.2f} s: "
            f"{n['ratio']:.1f}x; with DVC checking every stage {n['repro_noop_dvc_checks_s']:.2f} s "
            f"({n['ratio_dvc_checks']:.1f}x)"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": args.command, "db": str(args.db), **figures}, indent=2) + "\n")


if __name__ == "__main__":
    main()
