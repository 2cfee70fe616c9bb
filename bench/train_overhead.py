"""Overhead of the project's Ray Train path against a plain PyTorch loop.

Same model (the registered ``classifier``), same data (the prepared digits crops), same batch
size, optimiser and thread count, same number of steps: (a) a plain single-process loop,
(b) ``components.training.driver.fit`` with one worker, on a Ray that is already up (as the
pipeline's stages share one): on a Ray Train worker group (``one_worker_in_actor: false``) and
in one actor (the default), in turn ``--repeats`` times (checkpoint and validation every epoch
in all). Prints the throughputs and their ratios, in steady state (training steps only) and
end to end, and each path's per-run overhead: its wall time less its epochs' (min/median/max).

    python bench/train_overhead.py [--epochs 3] [--threads 1] [--repeats 3] [--out bench/results/train_overhead.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.pipeline_throughput import stats  # noqa: E402
from components.config import load_yaml  # noqa: E402
from components.data import digits  # noqa: E402
from components.data.canonical import read_info  # noqa: E402
from components.tasks import get_task  # noqa: E402
from components.training.driver import fit, init_ray, load_platform  # noqa: E402
from components.training.optim import build_optimizer, build_scheduler  # noqa: E402
from components.training.spec import load_run_spec  # noqa: E402


def plain_loop(spec, data_root: Path, threads: int) -> dict:
    t_start = time.perf_counter()
    torch.set_num_threads(threads)
    torch.manual_seed(spec.training.seed)
    method = spec.create_method()
    task = get_task(method.task)
    info = read_info(data_root)
    model = method.build(info)
    train_set = task.dataset(data_root, "train", train=True)
    loader = torch.utils.data.DataLoader(train_set, batch_size=spec.training.batch_size, shuffle=True, drop_last=True)
    val_loader = torch.utils.data.DataLoader(task.dataset(data_root, "val", train=False), batch_size=256)
    optimizer = build_optimizer(model, spec.training.optimizer)
    scheduler = build_scheduler(optimizer, spec.training.scheduler, spec.training.epochs, len(loader))
    train_time, steps = 0.0, 0
    for _ in range(spec.training.epochs):
        t0 = time.perf_counter()
        model.train()
        for batch in loader:
            loss = sum(method.training_step(model, batch).values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            steps += 1
        train_time += time.perf_counter() - t0
        model.eval()
        evaluator = task.evaluator(info.num_classes)
        with torch.no_grad():
            for batch in val_loader:
                evaluator.update(method.predict(model, batch), batch)
        evaluator.compute()
    return {
        "steps": steps,
        "train_images_per_s": steps * spec.training.batch_size / train_time,
        "wall_s": time.perf_counter() - t_start,
    }


def ray_path(spec, platform, data_root: Path) -> dict:
    t_start = time.perf_counter()
    result = fit(spec, platform, read_info(data_root), ray_name=f"bench-{os.getpid()}-{time.time_ns()}")
    wall = time.perf_counter() - t_start
    with result.checkpoint.as_directory() as d:
        history = json.loads((Path(d) / "history.json").read_text())
    train_time = sum(h["time/train_epoch_s"] for h in history)
    steps = round(sum(h["throughput/train_images_per_s"] * h["time/train_epoch_s"] for h in history))
    steps //= spec.training.batch_size
    epochs_s = sum(h["time/epoch_s"] for h in history)
    return {"steps": steps, "train_images_per_s": steps * spec.training.batch_size / train_time, "wall_s": wall,
            "overhead_s": wall - epochs_s}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each Ray path, alternating")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train_overhead.json")
    args = parser.parse_args()

    params = copy.deepcopy(load_yaml(ROOT / "params.yaml"))
    t = params["training"]
    t["epochs"] = args.epochs
    t["scaling"].update(num_workers=1, cpus_per_worker=float(args.threads), use_gpu=False)
    with tempfile.TemporaryDirectory() as tmp:
        params["storage"]["path"] = str(Path(tmp) / "ray_results")
        data_root = Path(tmp) / "digits"
        from components.config import from_dict

        digits.generate(data_root, from_dict(digits.DigitsConfig, params["datasets"]["digits"], source="params.yaml"))
        specs = {}
        for variant, in_actor in (("worker_group", False), ("actor", True)):
            params["training"]["scaling"]["one_worker_in_actor"] = in_actor
            specs[variant] = load_run_spec(params, "classifier")
        platform = load_platform(params)
        plain = plain_loop(specs["actor"], data_root, args.threads)
        t0 = time.perf_counter()
        init_ray(platform.ray)
        ray_start = time.perf_counter() - t0
        runs: dict[str, list[dict]] = {variant: [] for variant in specs}
        for _ in range(args.repeats):
            for variant, spec in specs.items():
                runs[variant].append(ray_path(spec, platform, data_root))

    report = {
        "model": "classifier",
        "epochs": args.epochs,
        "batch_size": specs["actor"].training.batch_size,
        "threads": args.threads,
        "ray_start_s": ray_start,
        "plain": plain,
    }
    for variant, results in runs.items():
        median_wall = statistics.median(r["wall_s"] for r in results)
        report[variant] = {
            "runs": results,
            "wall_s": stats([r["wall_s"] for r in results]),
            "overhead_s": stats([r["overhead_s"] for r in results]),
            "steady_state_ratio_over_plain": statistics.median(r["train_images_per_s"] for r in results)
            / plain["train_images_per_s"],
            "end_to_end_ratio_over_plain": plain["wall_s"] / median_wall,
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"plain PyTorch loop: {plain['train_images_per_s']:8.1f} images/s ({plain['wall_s']:.1f} s wall)")
    print(f"Ray started once in {ray_start:.1f} s (not counted below)")
    for variant in runs:
        r = report[variant]
        o = r["overhead_s"]
        print(
            f"1 worker, {variant:12s}: wall median {r['wall_s']['median']:.1f} s; overhead (wall less epochs) "
            f"median {o['median']:.1f} s (min {o['min']:.1f}, max {o['max']:.1f}, n {o['n']}); throughput ratio "
            f"over plain: steady {r['steady_state_ratio_over_plain']:.3f}, "
            f"end to end {r['end_to_end_ratio_over_plain']:.3f}"
        )
    ratio = report["actor"]["overhead_s"]["median"] / report["worker_group"]["overhead_s"]["median"]
    print(f"overhead ratio actor / worker group: {ratio:.2f}")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
