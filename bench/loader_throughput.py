"""Loader throughput: images per second per worker process, for every task family's loader.

Builds the default digits dataset (params.yaml) in a temporary folder, then iterates each
loader for a fixed number of batches with ``--workers`` DataLoader processes and prints
images/s in total and per worker process; writes JSON.

    python bench/loader_throughput.py [--workers 1] [--batches 30] [--out bench/results/loader_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components.augment.geometric import crop_train_transforms, scene_train_transforms  # noqa: E402
from components.config import from_dict, load_yaml  # noqa: E402
from components.data import digits  # noqa: E402
from components.data.loaders import (  # noqa: E402
    ImageLabelDataset,
    MPerClassBatchSampler,
    SceneDataset,
    TwoViews,
    detection_collate,
)


def loaders(root: Path, workers: int, batch: int) -> dict[str, torch.utils.data.DataLoader]:
    crops = ImageLabelDataset(root, "crops", "train")
    common = {"num_workers": workers, "persistent_workers": workers > 0}
    return {
        "classification": torch.utils.data.DataLoader(crops, batch_size=batch, shuffle=True, **common),
        "two_views": torch.utils.data.DataLoader(
            TwoViews(crops, crop_train_transforms(crops[0][0].shape[-1])), batch_size=batch, shuffle=True, **common
        ),
        "m_per_class": torch.utils.data.DataLoader(
            crops, batch_sampler=MPerClassBatchSampler(crops.labels, m=4, classes_per_batch=batch // 4), **common
        ),
        "detection": torch.utils.data.DataLoader(
            SceneDataset(root, "train", transforms=scene_train_transforms()),
            batch_size=batch,
            shuffle=True,
            collate_fn=detection_collate,
            **common,
        ),
        "instance_masks": torch.utils.data.DataLoader(
            SceneDataset(root, "train", masks=True, transforms=scene_train_transforms()),
            batch_size=batch,
            shuffle=True,
            collate_fn=detection_collate,
            **common,
        ),
        "semantic": torch.utils.data.DataLoader(
            SceneDataset(root, "train", semantic=True),
            batch_size=batch,
            shuffle=True,
            collate_fn=detection_collate,
            **common,
        ),
    }


def measure(loader: torch.utils.data.DataLoader, batches: int) -> float:
    it = iter(loader)
    next(it)  # start-up (worker processes, first decode) is not throughput
    n, t0 = 0, time.perf_counter()
    for _ in range(batches):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        n += len(batch[0])
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "loader_throughput.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    params = load_yaml(ROOT / "params.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "digits"
        digits.generate(root, from_dict(digits.DigitsConfig, params["datasets"]["digits"], source="params.yaml"))
        results = {}
        for name, loader in loaders(root, args.workers, args.batch_size).items():
            rate = measure(loader, args.batches)
            per_worker = rate / max(1, args.workers)
            results[name] = {"images_per_s": rate, "images_per_s_per_worker": per_worker}
            print(f"{name:15s} {rate:9.1f} images/s   {per_worker:9.1f} per worker process")
    report = {"workers": args.workers, "batch_size": args.batch_size, "batches": args.batches, "loaders": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
