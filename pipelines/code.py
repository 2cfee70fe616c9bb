"""``code``: what code each stage runs, as manifests its stages depend on.

python -m pipelines.code [--out results/code]

For every entry point (``prepare``, ``train``, ``tune``, ``compare``) and, for train and tune, every registered
method, a manifest ``results/code/<entry>[-<method>].json`` lists the project files that the
entry point imports (statically, function-level imports included, followed transitively) plus
the method's module and its task family's, each with its SHA-256. A ``train``/``tune`` stage
depends on its own manifest instead of all of ``components/``: editing one method's module
changes that method's manifests only, so every other run stays up to date, while editing the
training loop (which every entry imports) changes them all. The ``code`` stage itself depends
on all the code and re-runs in about a second; DVC then re-runs a stage only if the content of
its manifest changed.

Methods and task families are imported by name when first asked for
(``components.methods.METHOD_MODULES``, ``components.tasks.TASK_MODULES``), which is why the
static closure of an entry point holds no method but its own. Nothing here imports a method:
a method's task family is read from its class's source.
"""

from __future__ import annotations

import argparse
import ast
import functools
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("components", "pipelines")
CODE_ROOT = Path("results/code")
ENTRY_POINTS = {
    "prepare": "pipelines.prepare",
    "train": "pipelines.train",
    "tune": "pipelines.tune",
    "compare": "pipelines.compare",
}
PER_METHOD = ("train", "tune")


def module_file(module: str, root: Path = ROOT) -> Path | None:
    base = root.joinpath(*module.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


@functools.cache
def _parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


@functools.cache
def imported_modules(path: Path, module: str) -> frozenset[str]:
    """Project modules that ``path`` (module ``module``) imports anywhere in its body."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(_parsed(path)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return frozenset(name for name in found if name.split(".")[0] in PACKAGES)


def closure(modules: list[str], root: Path = ROOT) -> set[Path]:
    """Files of ``modules``, their parent packages and everything they import, transitively."""
    seen: dict[Path, str] = {}
    todo = list(modules)
    while todo:
        module = todo.pop()
        path = module_file(module, root)
        if path is None or path in seen:
            continue
        seen[path] = module
        parts = module.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        todo.extend(imported_modules(path, module))
    return set(seen)


def _class_attrs(path: Path) -> dict[str, tuple[dict[str, str], list[str]]]:
    """Each class in ``path``: its string-valued class attributes and the names of its bases."""
    classes = {}
    for node in _parsed(path).body:
        if isinstance(node, ast.ClassDef):
            attrs = {
                t.id: stmt.value.value
                for stmt in node.body
                if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Constant)
                and isinstance(stmt.value.value, str)
                for t in stmt.targets
                if isinstance(t, ast.Name)
            }  # fmt: skip
            bases = [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases]
            classes[node.name] = (attrs, bases)
    return classes


def registry(module: str, name: str, root: Path = ROOT) -> dict[str, str]:
    """A name -> module table such as ``METHOD_MODULES``, read from source (importing the
    package would import torch)."""
    for node in ast.parse(module_file(module, root).read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise ValueError(f"{module}: no {name}")


def method_task(name: str, root: Path = ROOT) -> str:
    """The task family of method ``name``, read from its class (or a base class) without
    importing it: the class whose ``name = "<name>"``, then its ``task``, else its bases'."""
    module = f"components.methods.{registry('components.methods', 'METHOD_MODULES', root)[name]}"
    classes: dict[str, tuple[dict[str, str], list[str]]] = {}
    for path in sorted(closure([module], root)):
        for cls, info in _class_attrs(path).items():
            classes.setdefault(cls, info)
    own = _class_attrs(module_file(module, root))
    todo = [cls for cls, (attrs, _) in own.items() if attrs.get("name") == name]
    while todo:
        attrs, bases = classes.get(todo.pop(0), ({}, []))
        if "task" in attrs:
            return attrs["task"]
        todo.extend(bases)
    raise ValueError(f"{module}: no class with name = {name!r} and a task")


def method_modules(name: str, root: Path = ROOT) -> list[str]:
    """The method's module and its task family's."""
    methods = registry("components.methods", "METHOD_MODULES", root)
    tasks = registry("components.tasks", "TASK_MODULES", root)
    return [f"components.methods.{methods[name]}", f"components.tasks.{tasks[method_task(name, root)]}"]


def dynamic_imports(entry: str, root: Path = ROOT) -> list[str]:
    """Modules an entry point imports by name at run time: ``prepare`` picks a dataset's
    importer from ``components.data.importers.FORMATS``; ``compare`` reads every task family's
    primary metric."""
    if entry == "compare":
        return [f"components.tasks.{m}" for m in registry("components.tasks", "TASK_MODULES", root).values()]
    if entry != "prepare":
        return []
    folder = root / "components" / "data" / "importers"
    return [f"components.data.importers.{f.stem}" for f in sorted(folder.glob("*.py")) if f.stem != "__init__"]


def manifest(entry: str, method: str | None = None, root: Path = ROOT) -> dict:
    modules = [ENTRY_POINTS[entry], *dynamic_imports(entry, root), *(method_modules(method, root) if method else [])]
    files = sorted(closure(modules, root))
    digests = {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    return {"entry": entry, "method": method, "files": digests}


def manifest_name(entry: str, method: str | None = None) -> str:
    return f"{entry}-{method}.json" if method else f"{entry}.json"


def all_manifests(root: Path = ROOT) -> dict[str, dict]:
    out = {manifest_name(e): manifest(e, root=root) for e in ENTRY_POINTS if e not in PER_METHOD}
    for method in sorted(registry("components.methods", "METHOD_MODULES", root)):
        for entry in PER_METHOD:
            out[manifest_name(entry, method)] = manifest(entry, method, root)
    return out


def write_manifests(out: Path, root: Path = ROOT) -> list[str]:
    """Write every manifest into ``out`` (a fresh folder: no stale manifest stays behind)."""
    manifests = all_manifests(root)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for stale in tmp.iterdir():
        stale.unlink()
    for name, content in manifests.items():
        (tmp / name).write_text(json.dumps(content, indent=1, sort_keys=True) + "\n")
    if out.exists():
        for old in out.iterdir():
            old.unlink()
        out.rmdir()
    tmp.rename(out)
    return sorted(manifests)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=CODE_ROOT)
    args = parser.parse_args(argv)
    names = write_manifests(args.out)
    print(f"code: {len(names)} manifests in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
