"""Search efficiency: Optuna TPE + ASHA against random search without early stopping, at an equal
total budget of training epochs, on the same space and run, for several seeds.

    python -m bench.search_efficiency --run classifier --budget-epochs 16 --epochs 4 --seeds 0 1 2

Random search trains budget/epochs trials to the end. TPE + ASHA samples up to three times as many
and stops the weak ones at ASHA's rungs; the whole search stops when its trials have trained the
budget (``search.budget_epochs``). Both run through the search stage itself (Ray Tune trials, each a
Ray Train run, MLflow in a throwaway database). Printed per seed: the best validation metric each
reached, the epochs each used, and the epochs each needed to first reach random search's best
(counted over all trials' epochs in the order they were reported). Results go to
bench/results/search_efficiency.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
from pathlib import Path

from components.config import from_dict, load_yaml
from components.search.config import SearchConfig
from components.search.tuner import run_search
from components.training.driver import load_platform

DEFAULT_SPACE = {
    "training.optimizer.lr": {"loguniform": [1.0e-3, 1.0]},
    "training.optimizer.weight_decay": {"loguniform": [1.0e-6, 1.0e-2]},
    "config.label_smoothing": {"uniform": [0.0, 0.3]},
}


def epochs_to_reach(trials: list[dict], target: float, higher_is_better: bool = True) -> int | None:
    """Epochs trained, over all trials in report order, until a point first reached ``target``."""
    points = sorted((t, v) for trial in trials for t, v in zip(trial["times"], trial["curve"], strict=True))
    for count, (_, value) in enumerate(points, start=1):
        if (value >= target) if higher_is_better else (value <= target):
            return count
    return None


def search_once(params: dict, run: str, algorithm: str, seed: int, args, workdir: Path) -> dict:
    p = copy.deepcopy(params)
    per_trial = args.epochs
    samples = args.budget_epochs // per_trial if algorithm == "random" else 3 * args.budget_epochs // per_trial
    p["runs"][run]["search"] = {
        "algorithm": algorithm,
        "num_samples": samples,
        "epochs": per_trial,
        "seed": seed,
        "budget_epochs": args.budget_epochs,
        "max_concurrent_trials": args.concurrent,
        "space": DEFAULT_SPACE,
    }
    p["mlflow"]["tracking_uri"] = f"sqlite:///{workdir}/mlflow.db"
    p["mlflow"]["register_models"] = False
    p["storage"]["path"] = str(workdir / "ray_results")
    search = from_dict(SearchConfig, {**p["search"], **p["runs"][run]["search"]}, source="bench")
    out = workdir / f"{algorithm}-{seed}"
    outcome = run_search(p, run, search, load_platform(p), args.data, out, source="bench")
    return {
        "best": outcome.best["best_value"],
        "best_any": max(v for t in outcome.trials for v in t["curve"]),
        "epochs": outcome.summary["counts"]["epochs_total"],
        "trials": outcome.trials,
        "counts": outcome.summary["counts"],
        "wall_s": outcome.summary["wall_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="classifier")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/prepared/digits")
    parser.add_argument("--budget-epochs", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=4, help="one trial's schedule (ASHA's max_t)")
    parser.add_argument("--concurrent", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("bench/results/search_efficiency.json"))
    args = parser.parse_args()
    params = load_yaml(args.params)
    rows = []
    with tempfile.TemporaryDirectory(prefix="search-efficiency-") as tmp:
        for seed in args.seeds:
            random_result = search_once(params, args.run, "random", seed, args, Path(tmp))
            asha_result = search_once(params, args.run, "tpe_asha", seed, args, Path(tmp))
            target = random_result["best_any"]
            row = {
                "seed": seed,
                "random": {**random_result, "epochs_to_random_best": epochs_to_reach(random_result["trials"], target)},
                "tpe_asha": {**asha_result, "epochs_to_random_best": epochs_to_reach(asha_result["trials"], target)},
            }
            rows.append(row)
            for name in ("random", "tpe_asha"):
                r = row[name]
                print(
                    f"seed {seed} {name:>8}: best val {r['best_any']:.4f} (picked trial {r['best']:.4f}), "
                    f"{r['epochs']} epochs in {r['counts']['trials']} trials ({r['counts']['pruned']} stopped early), "
                    f"epochs to reach random's best {target:.4f}: {r['epochs_to_random_best']}, {r['wall_s']:.0f} s",
                    flush=True,
                )
    for name in ("random", "tpe_asha"):
        bests = [r[name]["best_any"] for r in rows]
        reached = [r[name]["epochs_to_random_best"] for r in rows]
        print(
            f"{name:>8}: best val mean {statistics.mean(bests):.4f} over {len(rows)} seeds; "
            f"epochs to reach random's best: {reached}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for row in rows:  # curves stay; the per-trial configs are in the search outputs
        for name in ("random", "tpe_asha"):
            keep = ("trial_id", "status", "curve", "times")
            row[name]["trials"] = [{k: t[k] for k in keep} for t in row[name]["trials"]]
    args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
