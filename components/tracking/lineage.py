"""What a run was trained and tested on, and what loading its model needs, in MLflow's own terms.

Each split a run reads is logged with ``mlflow.log_input`` as a dataset named
``<dataset>/<view>/<split>`` whose digest is the prepared data's manifest checksum (MLflow keeps
digests to 36 characters: its first 32 hex digits; the whole checksum is the input's tag
``checksum``) and whose source is where the data came from: the generator for generated data,
the folder or ``s3://`` URI an importer read.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import importlib.util
import json
import warnings
from pathlib import Path

from components.data.canonical import DatasetInfo, read_manifest

DIGEST_LENGTH = 32  # MLflow's dataset digest holds at most 36 characters
CONTEXTS = {"train": "training", "val": "validation", "test": "testing"}


def dataset_source(origin: str):
    """An MLflow dataset source for a manifest's ``source``."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    if origin.startswith("generated:"):
        return CodeDatasetSource(tags={"generator": origin.removeprefix("generated:")})
    try:
        with warnings.catch_warnings():  # a local path matches MLflow's local source twice; either is right
            warnings.simplefilter("ignore", UserWarning)
            return resolve_dataset_source(origin)
    except Exception:  # a source no registered MLflow source resolves: keep it as a description
        return CodeDatasetSource(tags={"source": origin})


def log_dataset_inputs(info: DatasetInfo, view: str, splits: tuple[str, ...] = ("train", "val", "test")) -> None:
    """Log each split of ``view`` the run reads as an input of the active MLflow run."""
    import mlflow
    from mlflow.data.meta_dataset import MetaDataset

    manifest = read_manifest(info.root)
    source = dataset_source(str(manifest.get("source", info.root)))
    counts = manifest["views"][view]["counts"]
    datasets, contexts, tags = [], [], []
    for split in splits:
        datasets.append(MetaDataset(source, name=f"{info.name}/{view}/{split}", digest=info.checksum[:DIGEST_LENGTH]))
        contexts.append(CONTEXTS.get(split, split))
        tags.append({"checksum": info.checksum, "counts": json.dumps(counts.get(split, {}), sort_keys=True)})
    mlflow.log_inputs(datasets=datasets, contexts=contexts, tags_list=tags)


def model_requirements(module: str, root: Path) -> list[str]:
    """``name==version`` of every installed distribution that importing ``module`` (a module of
    the project under ``root``, with its package ``__init__`` files) imports at module level:
    what loading a pickled model of that module needs."""
    project = module.split(".")[0]
    seen: set[str] = set()
    pending, third_party = [module], set()
    while pending:
        parts = pending.pop().split(".")
        for i in range(1, len(parts) + 1):  # a package's __init__ runs before its modules
            name = ".".join(parts[:i])
            path = _source_file(name, root)
            if name in seen or path is None:
                continue
            seen.add(name)
            for imported in _module_level_imports(path, name):
                if imported.split(".")[0] == project:
                    pending.append(imported)
                else:
                    third_party.add(imported.split(".")[0])
    return _distributions(third_party)


def _source_file(module: str, root: Path) -> Path | None:
    base = root.joinpath(*module.split("."))
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def _module_level_imports(path: Path, module: str) -> set[str]:
    """Absolute names imported by the statements at the top of a module, with ``from a import b``
    also as ``a.b`` (b may be a module). Imports inside functions and under ``if TYPE_CHECKING``
    run only when used, so loading does not need them."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: up from this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return {n for n in names if n and n.split(".")[0] != "__future__"}


@functools.cache
def _providers() -> dict[str, list[str]]:
    """Top-level module -> installed distributions: read once per process (a few seconds: it
    walks every installed distribution's file list), not once per seed's model."""
    return importlib.metadata.packages_distributions()


def _distributions(top_level: set[str]) -> list[str]:
    """Installed distributions providing these top-level modules (the standard library has none)."""
    providers = _providers()
    out = set()
    for name in top_level:
        for dist in providers.get(name, []):
            out.add(f"{dist}=={importlib.metadata.version(dist).split('+')[0]}")
    return sorted(out, key=str.lower)
