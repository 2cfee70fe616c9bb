"""Checks a run's driver makes before MLflow or Ray start.

A mistake that a look at the params and the dataset's manifest would catch (a batch larger than
the train split, an instance segmenter on a dataset without masks, a crops-only dataset for a
detector, more workers than the machine has) is a :class:`PreflightError` naming the params key
and what is missing; the stage prints it and exits 2, and no MLflow run is left behind. Found
inside a Ray worker instead, it would be retried ``max_failures`` times behind a long traceback.
"""

from __future__ import annotations

import os

from components.config import ConfigError
from components.data.canonical import DatasetInfo, read_split
from components.tasks import get_task
from components.training.spec import RunSpec

# What each family's loaders read from a split: a predicate over (image record, its annotations).
NEEDS = {
    "classification": "image-level labels",
    "representation": "image-level labels",
    "retrieval": "image-level labels",
    "detection": "boxes",
    "instance_segmentation": "instance masks",
    "semantic_segmentation": "semantic masks",
}


class PreflightError(ConfigError):
    """A run that cannot work with this dataset or these resources; names the params key."""


def check_run(spec: RunSpec, info: DatasetInfo) -> None:
    """The method's task family against the dataset's views and annotations, and the batch
    sizes against the splits."""
    family = spec.create_method().task
    view = get_task(family).view
    views = info.views or {}
    if view not in views or family not in views[view].get("task_families", []):
        have = ", ".join(f"{v} ({', '.join(d.get('task_families', []))})" for v, d in views.items()) or "none"
        raise PreflightError(
            spec.source,
            f"{spec.key}.dataset",
            f"dataset {spec.dataset!r} has no {view!r} view for {family} (it has: {have})",
        )
    sizes = {}
    for split in ("train", "val", "test"):
        sizes[split] = _usable_images(info, view, split, family, spec)
    cfg = spec.training
    if cfg.epochs > 0 and cfg.batch_size > sizes["train"]:
        raise PreflightError(
            spec.source,
            f"{spec.key}.training.batch_size",
            f"{cfg.batch_size} is larger than the {sizes['train']} training images of {spec.dataset!r} ({view}) "
            "for this family: the loop drops a partial batch, so no step would train",
        )
    workers = cfg.scaling.num_workers
    if cfg.epochs > 0 and family == "retrieval":
        _check_classes_per_batch(spec, info, cfg.batch_size // workers)
    if cfg.epochs > 0 and sizes["val"] < workers:
        raise PreflightError(
            spec.source,
            f"{spec.key}.training.scaling.num_workers",
            f"{workers} workers but {sizes['val']} validation images in {spec.dataset!r}: each worker scores a slice",
        )


def _usable_images(info: DatasetInfo, view: str, split: str, family: str, spec: RunSpec) -> int:
    """Images of ``split`` the family can use; an error when none carries what it needs."""
    coco = read_split(info.root, view, split)
    images = coco["images"]
    if family in ("classification", "representation", "retrieval"):
        usable = [im for im in images if "label" in im]
        if family == "retrieval":
            usable = _retrieval_classes(info, split, usable)
    elif family == "semantic_segmentation":
        usable = [im for im in images if im.get("semantic_mask")]
    else:
        key = "segmentation" if family == "instance_segmentation" else "bbox"
        with_it = {a["image_id"] for a in coco.get("annotations", []) if a.get(key)}
        usable = [im for im in images if im["id"] in with_it]
    if not usable:
        raise PreflightError(
            spec.source,
            f"{spec.key}.method",
            f"{family} needs {NEEDS[family]}, and the {split} split of {spec.dataset!r} ({view}) has none "
            f"({info.root / view / (split + '.json')})",
        )
    return len(images) if family in ("detection", "instance_segmentation") else len(usable)


def _check_classes_per_batch(spec: RunSpec, info: DatasetInfo, per_worker: int) -> None:
    """Metric learning draws ``samples_per_class`` images of each class in a worker's batch: the
    batch must not ask for more classes than the protocol trains on."""
    m = int(getattr(spec.create_method().cfg, "samples_per_class", 4))
    view = get_task("retrieval").view
    labels = {im["label"] for im in _retrieval_classes(info, "train", read_split(info.root, view, "train")["images"])
              if "label" in im}  # fmt: skip
    key = f"{spec.key}.training.batch_size"
    if per_worker % m:
        raise PreflightError(spec.source, key, f"the per-worker batch ({per_worker}) is not a multiple of "
                             f"samples_per_class ({m})")  # fmt: skip
    if per_worker // m > len(labels):
        raise PreflightError(
            spec.source,
            key,
            f"a per-worker batch of {per_worker} (batch_size / num_workers) at samples_per_class {m} needs "
            f"{per_worker // m} classes per batch, but the retrieval protocol of {spec.dataset!r} trains on "
            f"{len(labels)}; lower batch_size or raise num_workers",
        )


def _retrieval_classes(info: DatasetInfo, split: str, images: list[dict]) -> list[dict]:
    """Retrieval trains on some classes and retrieves the others (the manifest's protocol)."""
    from components.data.canonical import read_manifest

    protocol = (read_manifest(info.root).get("protocols") or {}).get("retrieval")
    if not protocol:
        return images
    wanted = set(protocol["train_classes"] if split == "train" else protocol["eval_classes"])
    return [im for im in images if im["label"] in wanted]


def check_resources(spec: RunSpec, available: dict[str, float], where: str) -> None:
    """The workers and resources the run asks for against ``available`` (Ray's resource names)."""
    scaling = spec.training.scaling
    key = f"{spec.key}.training.scaling"
    if scaling.use_gpu and scaling.gpus_per_worker < 1 and scaling.num_workers > 1:
        raise PreflightError(
            spec.source,
            f"{key}.gpus_per_worker",
            f"{scaling.gpus_per_worker} with {scaling.num_workers} workers lets Ray place two workers of one run "
            "on one GPU, and NCCL fails ('Duplicate GPU detected'); use whole GPUs for a multi-worker run",
        )
    cpus = scaling.num_workers * scaling.cpus_per_worker
    if cpus > available.get("CPU", 0.0):
        raise PreflightError(
            spec.source,
            key,
            f"{scaling.num_workers} workers x {scaling.cpus_per_worker} CPUs = {cpus:g} CPUs, "
            f"but {where} has {available.get('CPU', 0.0):g}; lower num_workers or cpus_per_worker",
        )
    if not scaling.use_gpu:
        return
    gpus, have = scaling.num_workers * scaling.gpus_per_worker, available.get("GPU", 0.0)
    if have == 0:
        raise PreflightError(spec.source, f"{key}.use_gpu", f"{where} has no GPU; set use_gpu: false")
    if gpus > have:
        raise PreflightError(
            spec.source,
            key,
            f"{scaling.num_workers} workers x {scaling.gpus_per_worker} GPUs = {gpus:g}, {where} has {have:g}",
        )


def local_resources(num_cpus: int | None) -> dict[str, float]:
    """What a local Ray on this machine has."""
    import torch

    return {"CPU": float(num_cpus or os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}
