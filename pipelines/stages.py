"""``dvc.runs.yaml``: what each run's stages read, written from params.yaml for dvc.yaml.

python -m pipelines.stages [--params params.yaml] [--check]

DVC's ``foreach`` gives every entry the same dependencies, and ``${item.x}`` holds one value, not
a list. So that a run waits only for what it reads, this file gives each run, by name:

- ``dataset`` and ``method``, as in params;
- ``trunk``: ``pretrained/<name>`` for a run that starts from a pretrained trunk
  (``config.backbone.pretrained``), else its prepared dataset again (a dependency it has anyway):
  only such a run waits for ``pretrain@<name>``, and re-training a trunk re-runs only its runs;
- ``tuned``: ``results/tune/<run>/best.yaml`` for a run with a ``search``, else its dataset again.

``searches`` lists the runs with a ``search``: only they get a ``tune@<run>`` stage.

``make repro`` refreshes the file before it plans; a stage run by DVC refuses to start while the
file disagrees with params (:func:`check_fresh`), naming the entry and this command.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from components.config import ConfigError, load_yaml

RUNS_FILE = Path("dvc.runs.yaml")
HEADER = (
    "# What each run's stages read, for dvc.yaml. Written from params.yaml by `python -m pipelines.stages`\n"
    "# (`make repro` does it before every plan): edit params.yaml, not this file.\n"
)


def _text(entry, source: str, key: str, field: str) -> str:
    value = entry.get(field) if isinstance(entry, dict) else None
    if not isinstance(value, str) or not value:
        raise ConfigError(source, f"runs.{key}.{field}", f"expected a name, got {value!r}")
    return value


def stage_inputs(params: dict, source: str = "params.yaml") -> dict:
    """``{"run_inputs": {run: {...}}, "searches": {run: {...}}}`` for every entry of ``runs``."""
    runs = params.get("runs")
    if not isinstance(runs, dict) or not runs:
        raise ConfigError(source, "runs", "expected a mapping of at least one run")
    datasets = params.get("datasets") or {}
    pretrain = params.get("pretrain") or {}
    run_inputs, searches = {}, {}
    for key, entry in runs.items():
        dataset = _text(entry, source, key, "dataset")
        method = _text(entry, source, key, "method")
        if dataset not in datasets:
            known = ", ".join(datasets) or "none"
            raise ConfigError(source, f"runs.{key}.dataset", f"no dataset {dataset!r} (datasets: {known})")
        prepared = f"data/prepared/{dataset}"
        backbone = (entry.get("config") or {}).get("backbone")
        name = backbone.get("pretrained") if isinstance(backbone, dict) else None
        if name and name not in pretrain:
            known = ", ".join(pretrain) or "none"
            raise ConfigError(
                source, f"runs.{key}.config.backbone.pretrained", f"no pretrain entry {name!r} (entries: {known})"
            )
        searched = entry.get("search") is not None
        item = {
            "dataset": dataset,
            "method": method,
            "trunk": f"pretrained/{name}" if name else prepared,
            "tuned": f"results/tune/{key}/best.yaml" if searched else prepared,
        }
        run_inputs[key] = item
        if searched:
            searches[key] = dict(item)  # a copy, so that YAML writes it out instead of an alias
    return {"run_inputs": run_inputs, "searches": searches}


def render(params: dict, source: str = "params.yaml") -> str:
    return HEADER + yaml.safe_dump(stage_inputs(params, source), sort_keys=False)


def refresh(root: Path = Path("."), params_file: str = "params.yaml") -> bool:
    """Write ``dvc.runs.yaml`` when it differs from what params give; True if it was written. A
    project whose ``dvc.yaml`` does not read the file is left alone."""
    if not _reads_runs_file(root):
        return False
    text = render(load_yaml(root / params_file), params_file)
    target = root / RUNS_FILE
    if target.is_file() and target.read_text() == text:
        return False
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(text)
    tmp.replace(target)
    return True


def _reads_runs_file(root: Path) -> bool:
    try:
        return RUNS_FILE.name in (load_yaml(root / "dvc.yaml").get("vars") or [])
    except ConfigError:
        return False


def check_fresh(params: dict, source: str, root: Path = Path(".")) -> None:
    """Under DVC (``DVC_STAGE`` set), a ConfigError when ``dvc.runs.yaml`` disagrees with params:
    DVC would run stages with another run's inputs."""
    if not os.environ.get("DVC_STAGE") or not _reads_runs_file(root):
        return
    target = root / RUNS_FILE
    fix = "run `python -m pipelines.stages` (make repro does it) and repro again"
    try:
        written = yaml.safe_load(target.read_text()) or {}
    except (OSError, yaml.YAMLError):
        raise ConfigError(str(target), "", f"missing or unreadable; {fix}") from None
    wanted = stage_inputs(params, source)
    for part, entries in wanted.items():
        have = written.get(part) or {}
        for key in sorted(set(entries) | set(have)):
            if entries.get(key) != have.get(key):
                raise ConfigError(str(target), f"{part}.{key}", f"stale: {source} gives {entries.get(key)!r}; {fix}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale, write nothing")
    args = parser.parse_args(argv)
    try:
        if args.check:
            fresh = RUNS_FILE.is_file() and RUNS_FILE.read_text() == render(load_yaml(args.params), args.params)
            print(f"stages: {RUNS_FILE} is {'up to date' if fresh else 'stale'}")
            return 0 if fresh else 1
        wrote = refresh(Path("."), args.params)
    except ConfigError as exc:
        print(f"stages: error: {exc}", file=sys.stderr)
        return 2
    print(f"stages: {'wrote' if wrote else 'unchanged:'} {RUNS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
