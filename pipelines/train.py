"""``train@<run>``: train one entry of ``runs`` in params.yaml on Ray Train, tracked in MLflow.

python -m pipelines.train --run classifier [--params params.yaml]
python -m pipelines.train --pretrain digits_trunk   # pretrain@<name>: writes pretrained/<name>/

A run with a ``search`` in params trains with the overrides its search wrote to
``results/tune/<run>/best.yaml`` (tune@<run> runs first).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from components.config import ConfigError, load_yaml
from components.data.canonical import DatasetError
from components.methods import RegistryError
from components.models.pretrained import PRETRAINED_ROOT
from components.search.config import best_file, load_search
from components.tracking.mlflow_run import exit_on_sigterm
from components.training.driver import load_platform, train
from components.training.spec import load_run_spec
from pipelines.stages import check_fresh


def tuned_overrides(path: Path, run: str) -> dict:
    """The best.yaml a run's search wrote; a missing or foreign one is an error naming the file."""
    best = load_yaml(path)  # ConfigError naming the file when it is missing or malformed
    if best.get("run") != run or not isinstance(best.get("overrides"), dict):
        raise ConfigError(str(path), "run", f"not the search result of run {run!r} (run `dvc repro tune@{run}`)")
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", help="a key of `runs` in the params file")
    which.add_argument("--pretrain", help="a key of `pretrain` in the params file")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", type=Path, default=None, help="default: data/prepared/<dataset>")
    parser.add_argument("--tuned", type=Path, default=None, help="a search's best.yaml (default: results/tune/<run>/)")
    args = parser.parse_args(argv)
    try:
        params = load_yaml(args.params)
        check_fresh(params, args.params)
        kind, name = ("pretrain", args.pretrain) if args.pretrain else ("runs", args.run)
        overrides, tags, best_path = None, {}, args.tuned or best_file(name)
        if kind == "runs" and load_search(params, name, args.params) is not None:
            best = tuned_overrides(best_path, name)
            overrides, tags = best["overrides"], {"tuned_by": str(best.get("mlflow_parent_run_id"))}
        spec = load_run_spec(params, name, args.params, kind, overrides=overrides, overrides_source=str(best_path))
        platform = load_platform(params, args.params)
    except (ConfigError, RegistryError) as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return 2
    data_root = args.data or Path("data/prepared") / spec.dataset
    if kind == "pretrain":
        model_dir = results_dir = PRETRAINED_ROOT / name
    else:
        model_dir, results_dir = Path("models") / name, Path("results") / name
    exit_on_sigterm()
    try:
        outcome = train(spec, platform, data_root, model_dir, results_dir, tags=tags)
    except (DatasetError, ConfigError) as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return 2
    tests = ", ".join(f"{k}={v:.4f}" for k, v in outcome.test_metrics.items())
    best = next(s for s in outcome.seeds if s.run_id == outcome.run_id)
    print(
        f"train {spec.key}: group run {outcome.group_run_id}, {len(outcome.seeds)} seed(s); best seed {best.seed} "
        f"(run {outcome.run_id}{', resumed' if outcome.resumed else ''}): best val {outcome.best_val:.4f}; {tests}; "
        f"model version {outcome.model_version}{' (champion)' if outcome.champion else ''}"
    )
    for key in outcome.test_metrics:
        a = outcome.aggregates
        print(f"  {key} over seeds: {a[key + '_mean']:.4f} [{a[key + '_ci_low']:.4f}, {a[key + '_ci_high']:.4f}] "
              f"(95% CI, n = {a[key + '_n']:.0f})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
