"""Per-trial overhead of a Ray Tune search: a one-worker trial in its own process against the
same trial on a Ray Train worker group of its own (``search.single_worker_in_trial``).

    python -m bench.trial_overhead [--run classifier] [--trials 4] [--epochs 1]

Both searches run through the search stage itself (random sampling, every trial to the end, two
at a time, MLflow in a throwaway database), one after the other, each in a process (and a local
Ray) of its own.
Printed for each: the search's wall time per trial, and each trial's overhead: its MLflow run's
duration minus the time its epochs took (start-up, worker group, process group, shutdown).
Results go to bench/results/trial_overhead.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from components.config import from_dict, load_yaml
from components.search.config import SearchConfig
from components.search.tuner import run_search
from components.training.driver import load_platform

VARIANTS = {"worker_group": False, "in_trial_process": True}  # -> search.single_worker_in_trial


def trial_overheads(db: Path) -> list[float]:
    """Each finished trial's run duration minus the sum of its epoch times, in seconds."""
    con = sqlite3.connect(db)
    rows = con.execute(
        "select r.run_uuid, r.start_time, r.end_time from runs r join tags t on r.run_uuid = t.run_uuid "
        "where t.key = 'mlflow.parentRunId' and r.status = 'FINISHED'"
    ).fetchall()
    out = []
    for run_id, start, end in rows:
        (epochs,) = con.execute(
            "select coalesce(sum(value), 0) from metrics where run_uuid = ? and key = 'time/epoch_s'", (run_id,)
        ).fetchone()
        out.append((end - start) / 1000 - epochs)
    return out


def search_once(params: dict, args, in_process: bool, workdir: Path) -> dict:
    p = copy.deepcopy(params)
    p["runs"][args.run]["search"] = {
        "algorithm": "random",
        "num_samples": args.trials,
        "epochs": args.epochs,
        "max_concurrent_trials": args.concurrent,
        "single_worker_in_trial": in_process,
        "space": {"training.optimizer.lr": {"loguniform": [0.01, 0.3]}},
    }
    p["mlflow"]["tracking_uri"] = f"sqlite:///{workdir}/mlflow.db"
    p["mlflow"]["register_models"] = False
    p["storage"]["path"] = str(workdir / "ray_results")
    search = from_dict(SearchConfig, {**p["search"], **p["runs"][args.run]["search"]}, source="bench")
    t0 = time.perf_counter()
    run_search(p, args.run, search, load_platform(p), args.data, workdir / "out", source="bench")
    wall = time.perf_counter() - t0
    overheads = trial_overheads(workdir / "mlflow.db")
    return {
        "wall_s": wall,
        "wall_per_trial_s": wall / args.trials,
        "trial_overhead_s": {
            "median": statistics.median(overheads),
            "min": min(overheads),
            "max": max(overheads),
            "n": len(overheads),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="classifier")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/prepared/digits")
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--concurrent", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/trial_overhead.json"))
    parser.add_argument("--variant", choices=VARIANTS, default=None, help=argparse.SUPPRESS)  # one search, to --out
    args = parser.parse_args()
    if args.variant:
        with tempfile.TemporaryDirectory(prefix=f"trial-overhead-{args.variant}-") as tmp:
            result = search_once(load_yaml(args.params), args, VARIANTS[args.variant], Path(tmp))
        args.out.write_text(json.dumps(result))
        return
    results = {}
    for label in VARIANTS:
        with tempfile.TemporaryDirectory() as tmp:
            one = Path(tmp) / "result.json"
            argv = [a for a in sys.argv[1:]]
            cmd = [sys.executable, "-m", "bench.trial_overhead", *argv, "--variant", label, "--out", str(one)]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            results[label] = json.loads(one.read_text())
        r = results[label]
        o = r["trial_overhead_s"]
        print(
            f"{label:>17}: {r['wall_s']:.1f} s for {args.trials} trials ({r['wall_per_trial_s']:.1f} s/trial); "
            f"overhead per trial median {o['median']:.1f} s (min {o['min']:.1f}, max {o['max']:.1f}, n={o['n']})",
            flush=True,
        )
    ratio = (
        results["in_trial_process"]["trial_overhead_s"]["median"]
        / results["worker_group"]["trial_overhead_s"]["median"]
    )
    print(f"overhead ratio (in process / worker group): {ratio:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, **results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
