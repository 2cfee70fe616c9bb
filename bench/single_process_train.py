"""Train one method in this process (no Ray, no MLflow) and print its family's validation metrics
per epoch: a quick way to size a run's budget before putting it in params.yaml.

    python -m bench.single_process_train --method simclr --epochs 10 --batch-size 128 \
        --config '{"temperature": 0.2}' --optimizer '{"name": "adamw", "lr": 2e-3, "weight_decay": 1e-4}'

``--epochs 0`` scores the initial weights (the random-init baseline). It runs the pipeline's own
trainer with its evaluation and progress hooks, so the numbers are the ones a run would log.
"""

from __future__ import annotations

import argparse
import importlib
import json

from components.config import from_dict
from components.data.canonical import read_info
from components.methods import create_method
from components.training.hooks import Evaluation, Hook, Progress
from components.training.loop import assemble
from components.training.sessions import LocalSession
from components.training.spec import TrainingConfig
from components.training.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", required=True)
    parser.add_argument("--data", default="data/prepared/digits")
    parser.add_argument("--config", default="{}", help="the method's config, JSON")
    parser.add_argument("--optimizer", default='{"name": "adamw", "lr": 1e-3, "weight_decay": 1e-4}')
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--import", dest="imports", action="append", default=[], help="a module to import first")
    args = parser.parse_args()
    for module in args.imports:  # e.g. a method module not yet in the registry's list
        importlib.import_module(module)

    training = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "optimizer": json.loads(args.optimizer),
        "scheduler": {"warmup_epochs": 0.5},
        "scaling": {"num_workers": 1, "cpus_per_worker": args.threads},
    }
    cfg = from_dict(TrainingConfig, training, source="--optimizer", key="training")
    trainer = local_trainer(args.method, json.loads(args.config), cfg, args.data)
    trainer.train()


class _Scores(Hook):
    """Every validation metric of the epoch, beside the progress line's primary one."""

    def after_epoch(self, t: Trainer) -> None:
        print("  " + " ".join(f"{k}={v:.4f}" for k, v in t.metrics.items() if k.startswith("val/")), flush=True)


def local_trainer(method_name: str, config: dict, cfg: TrainingConfig, data: str) -> Trainer:
    """The pipeline's trainer in this process: validation every epoch, a progress line each."""
    method = create_method(method_name, config, source="--config", key="config")
    hooks = [Evaluation(), Progress(method_name), _Scores()]
    return assemble(f"bench.{method_name}", method, read_info(data), cfg, LocalSession(), hooks)


if __name__ == "__main__":
    main()
