"""``prepare@<dataset>``: build ``data/prepared/<dataset>`` in the canonical format.

python -m pipelines.prepare --dataset digits [--params params.yaml] [--out data/prepared/digits]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from components.config import ConfigError, from_dict, load_yaml, section
from components.data import digits
from components.data.canonical import DatasetError, read_manifest
from components.data.card import contact_sheet
from components.data.importers import importer
from components.storage.s3 import S3Error

GENERATORS = {"digits": (digits.DigitsConfig, digits.generate)}


def prepare(dataset: str, params_path: str, out: Path) -> dict:
    """Generate or import ``datasets.<dataset>`` into ``out`` (atomically); return its manifest."""
    params = load_yaml(params_path)
    raw = section(params, f"datasets.{dataset}", params_path)
    key = f"datasets.{dataset}"
    fmt = raw.get("format", "generated") if isinstance(raw, dict) else None
    if fmt == "generated":
        if dataset not in GENERATORS:
            raise ConfigError(
                params_path, key, f"no generator for this dataset; generated datasets: {', '.join(GENERATORS)}"
            )
        config_cls, generate = GENERATORS[dataset]
        generate(out, from_dict(config_cls, raw, source=params_path, key=key))
    else:
        try:
            module = importer(fmt)
        except KeyError as exc:
            raise ConfigError(params_path, f"{key}.format", str(exc.args[0])) from None
        module.import_to(out, from_dict(module.Config, raw, source=params_path, key=key))
    contact_sheet(out)
    return read_manifest(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or Path("data/prepared") / args.dataset
    t0 = time.perf_counter()
    try:
        manifest = prepare(args.dataset, args.params, out)
    except (ConfigError, DatasetError, S3Error) as exc:
        print(f"prepare: error: {exc}", file=sys.stderr)
        return 2
    counts = {v: {s: c["images"] for s, c in info["counts"].items()} for v, info in manifest["views"].items()}
    print(f"prepared {out} in {time.perf_counter() - t0:.1f}s: {counts}, checksum {manifest['checksum'][:16]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
