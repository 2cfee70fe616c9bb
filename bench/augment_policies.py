"""Augmentation policies compared at equal epochs: one run's params, trained in this process (no
Ray, no MLflow) under each policy for several seeds; prints validation metrics per policy.

    python -m bench.augment_policies --run classifier --seeds 0 1 \
        --policy results/tune/classifier/best.yaml --policy my_policy.yaml

Always compared: no augmentation, RandAugment at torchvision's defaults (N=2, M=9 of 31 bins, about
0.3) and TrivialAugment. A ``--policy`` file is a search's best.yaml (its
``overrides.training.augment``) or a policy file (``components.augment.policy``). Results go to
bench/results/augment_policies.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import yaml
from torch.utils.data import DataLoader

from components.augment.policy import PolicyDataset, build_policy, load_policy_file, policy_from_dict
from components.config import load_yaml, to_dict
from components.data.canonical import read_info
from components.tasks import get_task
from components.training.optim import build_optimizer, build_scheduler
from components.training.spec import load_run_spec

BASELINES = {
    "none": {"kind": "none"},
    "randaugment": {"kind": "randaugment", "n": 2, "m": 0.3},
    "trivialaugment": {"kind": "trivialaugment"},
}


def read_policy(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    if isinstance(data, dict) and "overrides" in data:  # a search's best.yaml
        return data["overrides"]["training"]["augment"]
    return to_dict(load_policy_file(path))


def train_once(spec, augment: dict, data: str, seed: int, threads: int) -> dict:
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    info = read_info(data)
    method = spec.create_method()
    task = get_task(method.task)
    cfg = spec.training
    model = method.build(info)
    train_set = task.dataset(info.root, "train", train=True)
    policy = build_policy(policy_from_dict(augment, source="bench"), mask_fill=task.augment_mask_fill)
    if policy is not None:
        train_set = PolicyDataset(train_set, policy)
    loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=True, collate_fn=task.collate())
    val_loader = DataLoader(task.dataset(info.root, "val", train=False), batch_size=256, collate_fn=task.collate())
    optimizer = build_optimizer(model, cfg.optimizer, method.param_groups(model))
    scheduler = build_scheduler(optimizer, cfg.scheduler, cfg.epochs, len(loader))
    curve, t0 = [], time.perf_counter()
    for epoch in range(cfg.epochs):
        if policy is not None:
            train_set.set_epoch(epoch, cfg.epochs)
        model.train()
        for batch in loader:
            loss = sum(method.training_step(model, batch).values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        model.eval()
        evaluator = task.evaluator(info.num_classes)
        with torch.no_grad():
            for batch in val_loader:
                evaluator.update(method.predict(model, batch), batch)
        curve.append(evaluator.compute()[task.primary_metric])
    return {"final": curve[-1], "best": max(curve), "curve": curve, "seconds": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="classifier", help="a key of `runs` in the params file")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/prepared/digits")
    parser.add_argument("--epochs", type=int, default=None, help="default: the run's")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--policy", type=Path, action="append", default=[], help="a best.yaml or policy file")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/augment_policies.json"))
    args = parser.parse_args()

    params = load_yaml(args.params)
    params["runs"][args.run].pop("search", None)  # the run as it is, without its search's best values
    overrides = {"training": {"epochs": args.epochs}} if args.epochs else None
    spec = load_run_spec(params, args.run, args.params, overrides=overrides, overrides_source="--epochs")
    policies = dict(BASELINES)
    for path in args.policy:
        policies[str(path)] = read_policy(path)
    metric = get_task(spec.create_method().task).primary_metric
    print(f"{args.run}: {spec.training.epochs} epochs, batch {spec.training.batch_size}, seeds {args.seeds}")
    results = {}
    for name, augment in policies.items():
        runs = [train_once(spec, augment, args.data, seed, args.threads) for seed in args.seeds]
        finals, bests = [r["final"] for r in runs], [r["best"] for r in runs]
        results[name] = {"augment": augment, "runs": runs}
        spread = f" ± {statistics.stdev(finals):.4f}" if len(finals) > 1 else ""
        print(
            f"{name:>40}: val/{metric} final {statistics.mean(finals):.4f}{spread} (per seed "
            f"{', '.join(f'{v:.3f}' for v in finals)}), best {statistics.mean(bests):.4f}, "
            f"{statistics.mean(r['seconds'] for r in runs):.0f} s per run",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"run": args.run, "epochs": spec.training.epochs, "results": results}, indent=2))


if __name__ == "__main__":
    main()
