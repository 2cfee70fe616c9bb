"""What a search leaves behind: ``best.yaml`` (the overrides train@<run> merges), ``summary.json``,
``trials.csv``, the trials' validation curves (``search.png``) and the found policy (``policy.png``)."""

from __future__ import annotations

import csv
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

BEST_FILE, SUMMARY_FILE, TRIALS_FILE = "best.yaml", "summary.json", "trials.csv"
SEARCH_FIGURE, POLICY_FIGURE = "search.png", "policy.png"


def summarize(run, search, metric, mode, best, trials, wall_s: float, parent_id: str) -> dict[str, Any]:
    counts = {s: sum(t["status"] == s for t in trials) for s in ("completed", "pruned", "errored")}
    counts["trials"] = len(trials)
    counts["epochs_total"] = sum(t["epochs"] for t in trials)
    return {
        "run": run,
        "algorithm": search.algorithm,
        "metric": metric,
        "mode": mode,
        "best_value": best["best_value"],
        "best_trial": best["best_trial"],
        "counts": counts,
        "wall_s": round(wall_s, 1),
        "mlflow_parent_run_id": parent_id,
        "trials": [{k: v for k, v in t.items() if k not in ("curve", "times")} for t in trials],
    }


def write_outputs(out_dir: Path, best, summary, trials, metric: str) -> None:
    """Write everything into a fresh folder beside ``out_dir``, then swap it in."""
    from components.augment.policy import policy_from_dict, schedule_figure

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        (tmp / BEST_FILE).write_text(yaml.safe_dump(best, sort_keys=False))
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n")
        with open(tmp / TRIALS_FILE, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["trial_id", "status", "epochs", "best_value", "last_value", "best", "config"])
            for t in trials:
                writer.writerow(
                    [
                        t["trial_id"],
                        t["status"],
                        t["epochs"],
                        t["best_value"],
                        t["last_value"],
                        t["best"],
                        json.dumps(t["config"], sort_keys=True, default=str),
                    ]  # fmt: skip
                )
        if any(t["curve"] for t in trials):
            search_figure(trials, metric, tmp / SEARCH_FIGURE)
        augment = (best["overrides"].get("training") or {}).get("augment")
        if augment is not None:
            schedule_figure(policy_from_dict(augment, source=str(out_dir / BEST_FILE)), tmp / POLICY_FIGURE)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def search_figure(trials: list[dict[str, Any]], metric: str, path: Path) -> None:
    """Every trial's validation curve: pruned ones grey, the best one red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for t in trials:
        if not t["curve"]:
            continue
        epochs = range(1, len(t["curve"]) + 1)
        style = {"color": "red", "lw": 2, "zorder": 3} if t["best"] else {}
        if t["status"] == "pruned":
            style = {"color": "0.6", "ls": "--"}
        ax.plot(epochs, t["curve"], marker="o", ms=3, label=t["trial_id"] if t["best"] else None, **style)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title("trials (grey dashed: stopped early; red: best)")
    if any(t["best"] and t["curve"] for t in trials):
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
