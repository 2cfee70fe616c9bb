"""The method registry, and a smoke test every registered method gets without new test code."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from components.data.canonical import read_info
from components.methods import Method, RegistryError, available_methods, create_method, get_method_class
from components.methods.base import register_method, unregister_method
from components.tasks import get_task
from components.training.evaluation import evaluate


def test_unknown_method_lists_available():
    with pytest.raises(RegistryError) as err:
        get_method_class("resnet9000")
    message = str(err.value)
    assert "unknown method 'resnet9000'" in message
    for name in available_methods():
        assert name in message


def test_duplicate_name_raises():
    @dataclass
    class Cfg:
        pass

    class Dup(Method):
        name = "classifier"
        task = "classification"
        paper = "0000.00000"
        Config = Cfg

    with pytest.raises(RegistryError, match="'classifier' is already registered by components.methods.classifier"):
        register_method(Dup)
    assert get_method_class("classifier").__module__ == "components.methods.classifier"


def test_incomplete_method_rejected():
    class NoTask(Method):
        name = "no_task_method"

    with pytest.raises(TypeError, match="must define 'task'"):
        register_method(NoTask)
    unregister_method("no_task_method")


def test_every_method_cites_a_paper():
    for name in available_methods():
        cls = get_method_class(name)
        module = __import__(cls.__module__, fromlist=["_"])
        assert "arXiv" in (module.__doc__ or "") or cls.paper in (module.__doc__ or ""), name
        assert cls.paper.replace(".", "").isdigit(), f"{name}: paper must be an arXiv id"


@pytest.mark.parametrize("name", available_methods())
def test_method_smoke(name, tiny_dataset):
    """Build, one train step with gradients reaching every trainable parameter, predict, evaluate."""
    torch.manual_seed(0)
    method = create_method(name, {}, source="test", key=f"{name}.config")
    task = get_task(method.task)
    info = read_info(tiny_dataset)
    model = method.build(info)
    train_set = task.dataset(tiny_dataset, "train", train=True)
    batch_sampler = task.train_batch_sampler(train_set, 8, 0, 1, 0, method.cfg)  # the loop's batches
    if batch_sampler is not None:
        loader = torch.utils.data.DataLoader(train_set, batch_sampler=batch_sampler, collate_fn=task.collate())
    else:
        loader = torch.utils.data.DataLoader(train_set, batch_size=8, shuffle=True, collate_fn=task.collate())
    batch = next(iter(loader))
    model.train()
    losses = method.training_step(model, batch)
    assert losses and all(v.dim() == 0 for v in losses.values())
    total = sum(losses.values())
    assert math.isfinite(total.item())
    total.backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name}: no gradient reaches {pname}"
            assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient in {pname}"
    eval_set = task.dataset(tiny_dataset, "val", train=False)  # one batch: all of the tiny split
    loader = torch.utils.data.DataLoader(eval_set, batch_size=len(eval_set), collate_fn=task.collate())
    metrics, _ = evaluate(method, task, model, loader, info.num_classes)
    assert task.primary_metric in metrics and math.isfinite(metrics[task.primary_metric])
