"""Train one method in this process (no Ray, no MLflow) and print its family's validation metrics
per epoch: a quick way to size a run's budget before putting it in params.yaml.

    python -m bench.single_process_train --method simclr --epochs 10 --batch-size 128 \
        --config '{"temperature": 0.2}' --optimizer '{"name": "adamw", "lr": 2e-3, "weight_decay": 1e-4}'

``--epochs 0`` scores the initial weights (the random-init baseline).
"""

from __future__ import annotations

import argparse
import importlib
import json
import time

import torch
from torch.utils.data import DataLoader

from components.config import from_dict
from components.data.canonical import read_info
from components.methods import create_method
from components.tasks import get_task
from components.training.optim import OptimizerConfig, SchedulerConfig, build_optimizer, build_scheduler


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

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    info = read_info(args.data)
    method = create_method(args.method, json.loads(args.config), source="--config", key="config")
    task = get_task(method.task)
    model = method.build(info)
    train_set = task.dataset(info.root, "train", train=True)
    batch_sampler = task.train_batch_sampler(train_set, args.batch_size, 0, 1, args.seed, method.cfg)
    if batch_sampler is not None:
        loader = DataLoader(train_set, batch_sampler=batch_sampler, collate_fn=task.collate())
    else:
        loader = DataLoader(
            train_set, batch_size=args.batch_size, shuffle=True, drop_last=True, collate_fn=task.collate()
        )
    val_loader = DataLoader(task.dataset(info.root, "val", train=False), batch_size=256, collate_fn=task.collate())
    opt_cfg = from_dict(OptimizerConfig, json.loads(args.optimizer), source="--optimizer")
    optimizer = build_optimizer(model, opt_cfg, method.param_groups(model))
    scheduler = build_scheduler(optimizer, SchedulerConfig(warmup_epochs=0.5), max(args.epochs, 1), len(loader))

    for epoch in range(max(args.epochs, 1)):
        t0 = time.perf_counter()
        model.train()
        total, steps = 0.0, 0
        if batch_sampler is not None:
            batch_sampler.set_epoch(epoch)
        for batch in loader if args.epochs > 0 else ():
            losses = method.training_step(model, batch)
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total, steps = total + loss.item(), steps + 1
        train_s = time.perf_counter() - t0
        model.eval()
        evaluator = task.evaluator(info.num_classes)
        with torch.no_grad():
            for batch in val_loader:
                evaluator.update(method.predict(model, batch), batch)
        scores = evaluator.compute()
        shown = " ".join(f"{k}={v:.4f}" for k, v in scores.items())
        eval_s = time.perf_counter() - t0 - train_s
        print(
            f"epoch {epoch} loss={total / max(steps, 1):.4f} train_s={train_s:.1f} eval_s={eval_s:.1f} {shown}",
            flush=True,
        )


if __name__ == "__main__":
    main()
