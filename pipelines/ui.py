"""``make ui``: the MLflow UI on the local store, with a link to each experiment's runs.

python -m pipelines.ui [--backend-store-uri sqlite:///mlflow.db] [--port 5000]

Prints, for every experiment, the address that opens it on its runs table in the saved view
(group runs with their means and 95% intervals, see ``components.tracking.mlflow_run.runs_view``)
and the report; then runs ``mlflow ui`` bound to 127.0.0.1 in this process.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path


def links(store: str, ui: str) -> list[str]:
    """One line per experiment: its name and the address of its runs in the saved view."""
    import mlflow

    from components.tracking import mlflow_run as tracking

    client = mlflow.MlflowClient(store)
    lines = []
    for exp in client.search_experiments(order_by=["name ASC"]):
        if tracking.VIEW_TAG_PREFIX + tracking.VIEW_KEY in exp.tags:
            lines.append(f"  {exp.name:32s} {tracking.runs_view_url(ui, exp.experiment_id)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend-store-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args(argv)
    ui = f"http://127.0.0.1:{args.port}"
    if args.backend_store_uri.startswith("sqlite:///") and not Path(args.backend_store_uri[10:]).is_file():
        print(f"ui: no MLflow store at {args.backend_store_uri[10:]}: run `make repro` first", file=sys.stderr)
        return 2
    lines = links(args.backend_store_uri, ui)
    print(f"MLflow UI: {ui}  (each experiment's training runs, seeds under their group run:)")
    print("\n".join(lines) if lines else "  (no trained runs yet)")
    if Path("reports/index.html").is_file():
        print(f"The comparison report: {Path('reports/index.html').resolve()}")
    mlflow_bin = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or "mlflow"
    cmd = [mlflow_bin, "ui", "--backend-store-uri", args.backend_store_uri, "--host", "127.0.0.1"]
    os.execv(mlflow_bin, [*cmd, "--port", str(args.port)])
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
