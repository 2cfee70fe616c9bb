"""``train@<run>``: train one entry of ``runs`` in params.yaml on Ray Train, tracked in MLflow.

python -m pipelines.train --run classifier [--params params.yaml]
python -m pipelines.train --pretrain digits_trunk   # pretrain@<name>: writes pretrained/<name>/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from components.config import ConfigError, load_yaml
from components.data.canonical import DatasetError
from components.methods import RegistryError
from components.models.pretrained import PRETRAINED_ROOT
from components.training.driver import load_platform, train
from components.training.spec import load_run_spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", help="a key of `runs` in the params file")
    which.add_argument("--pretrain", help="a key of `pretrain` in the params file")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", type=Path, default=None, help="default: data/prepared/<dataset>")
    args = parser.parse_args(argv)
    try:
        params = load_yaml(args.params)
        kind, name = ("pretrain", args.pretrain) if args.pretrain else ("runs", args.run)
        spec = load_run_spec(params, name, args.params, kind)
        platform = load_platform(params, args.params)
    except (ConfigError, RegistryError) as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return 2
    data_root = args.data or Path("data/prepared") / spec.dataset
    if kind == "pretrain":
        model_dir = results_dir = PRETRAINED_ROOT / name
    else:
        model_dir, results_dir = Path("models") / name, Path("results") / name
    try:
        outcome = train(spec, platform, data_root, model_dir, results_dir)
    except (DatasetError, ConfigError) as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return 2
    tests = ", ".join(f"{k}={v:.4f}" for k, v in outcome.test_metrics.items())
    print(
        f"train {spec.key}: mlflow run {outcome.run_id}{' (resumed)' if outcome.resumed else ''}; "
        f"best val {outcome.best_val:.4f}; {tests}; model version {outcome.model_version}"
        f"{' (champion)' if outcome.champion else ''}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
