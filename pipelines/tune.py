"""``tune@<run>``: search one run's hyperparameters or augmentation policy with Ray Tune.

python -m pipelines.tune --run classifier [--params params.yaml]

Writes ``results/tune/<run>/best.yaml`` (the overrides ``train@<run>`` trains with),
``summary.json``, ``trials.csv`` and figures. Only a run with a ``search`` in params has a
``tune@<run>`` stage (``dvc.runs.yaml``); for any other run this says so and writes nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from components.config import ConfigError, load_yaml
from components.search.config import TUNE_ROOT, load_search
from pipelines.stages import check_fresh


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a key of `runs` in the params file")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", type=Path, default=None, help="default: data/prepared/<dataset>")
    parser.add_argument("--out", type=Path, default=None, help="default: results/tune/<run>")
    args = parser.parse_args(argv)
    out = args.out or TUNE_ROOT / args.run
    try:
        params = load_yaml(args.params)
        check_fresh(params, args.params)
        if args.run not in (params.get("runs") or {}):
            raise ConfigError(args.params, f"runs.{args.run}", "no such run")
        search = load_search(params, args.run, args.params)
    except ConfigError as exc:
        print(f"tune: error: {exc}", file=sys.stderr)
        return 2
    if search is None:  # dvc.yaml has no tune stage for such a run; train@<run> uses its params
        print(f"tune {args.run}: no `search` in runs.{args.run}; nothing to search, nothing written")
        return 0

    from components.data.canonical import DatasetError
    from components.methods import RegistryError
    from components.search.tuner import run_search
    from components.tracking.mlflow_run import exit_on_sigterm
    from components.training.driver import load_platform

    exit_on_sigterm()
    try:
        platform = load_platform(params, args.params)
        dataset = params["runs"][args.run].get("dataset")
        outcome = run_search(params, args.run, search, platform, args.data or Path("data/prepared") / dataset, out,
                             source=args.params)  # fmt: skip
    except (ConfigError, RegistryError, DatasetError) as exc:
        print(f"tune: error: {exc}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{k} {v}" for k, v in outcome.summary["counts"].items())
    best = outcome.best
    found = f"best {best['metric']} {best['best_value']:.4f} ({best['best_trial']})" if best["metric"] else "a policy"
    print(
        f"tune {args.run}: mlflow run {outcome.parent_run_id}{' (resumed)' if outcome.resumed else ''}; "
        f"{search.algorithm}: {counts}; {found}; wrote {out / 'best.yaml'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
