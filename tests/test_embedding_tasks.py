"""The representation and retrieval families: their protocols, on hand-made cases and tiny data."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from components.data.canonical import MANIFEST, DatasetError
from components.tasks import get_task
from components.tasks.representation import RepresentationEvaluator, linear_probe, weighted_knn
from components.tasks.retrieval import retrieval_metrics


def _on_circle(degrees: list[float]) -> torch.Tensor:
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=1)


def test_retrieval_metrics_hand_case():
    # Angles 0, 12, 30 (class 0) and 20, 90 (class 1). Neighbours by angle, per query:
    #   0: 12 30 | hits T F T F  -> r@1 1, r@2 1, AP@R (R=2): (1/1)/2 = 0.5
    #  12: 20 0 30 | F T T F      -> r@1 0, r@2 1, AP@R: (1/2)/2 = 0.25
    #  30: 20 12 0 | F T T F      -> r@1 0, r@2 1, AP@R: 0.25
    #  20: 12 30 0 90 | F F F T   -> r@1 0, r@2 0, r@4 1, AP@R (R=1): 0
    #  90: 30 20 12 0 | F T F F   -> r@1 0, r@2 1, AP@R: 0
    features = _on_circle([0, 12, 30, 20, 90]) * torch.tensor([[1.0], [2.0], [0.5], [3.0], [1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1, 1])
    m = retrieval_metrics(features, labels)  # scaled rows: cosine similarity ignores the norm
    assert m["recall_at_1"] == pytest.approx(1 / 5)
    assert m["recall_at_2"] == pytest.approx(4 / 5)
    assert m["recall_at_4"] == pytest.approx(1.0)
    assert m["recall_at_8"] == pytest.approx(1.0)
    assert m["map_at_r"] == pytest.approx((0.5 + 0.25 + 0.25 + 0 + 0) / 5)


def test_retrieval_metrics_perfect_and_too_small():
    features = torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1.0], [0.1, 0.9]])
    m = retrieval_metrics(features, torch.tensor([0, 0, 1, 1]))
    assert m["recall_at_1"] == 1.0 and m["map_at_r"] == 1.0
    with pytest.raises(ValueError, match="at least 2"):
        retrieval_metrics(features[:1], torch.tensor([0]))


def test_weighted_knn_weights_by_similarity():
    # One class-1 reference very close to the query, three class-0 references further away.
    references = _on_circle([5, 20, 25, 30]).float()
    labels = torch.tensor([1, 0, 0, 0])
    query = _on_circle([0]).float()
    assert weighted_knn(query, references, labels, 2, k=4, tau=0.01).item() == 1  # sharp: the nearest dominates
    assert weighted_knn(query, references, labels, 2, k=4, tau=1.0).item() == 0  # flat: the majority wins
    assert weighted_knn(query, references, labels, 2, k=1, tau=1.0).item() == 1


def test_linear_probe_separates_blobs():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g) * 3
    y = torch.arange(3).repeat_interleave(40)
    x = centres[y] + torch.randn(len(y), 16, generator=g)
    predicted = linear_probe(x[::2], y[::2], x[1::2], 3)
    assert (predicted == y[1::2]).float().mean() > 0.95
    shuffled = linear_probe(x[::2], y[::2][torch.randperm(60, generator=g)], x[1::2], 3)
    assert (shuffled == y[1::2]).float().mean() < 0.8  # labels carry the signal, not the probe


def test_representation_evaluator_roles():
    evaluator = RepresentationEvaluator(num_classes=2, k=3)
    refs = _on_circle([0, 5, 90, 95]).float()
    queries = _on_circle([2, 88]).float()
    evaluator.update(queries, (None, torch.tensor([0, 1]), torch.tensor([1, 1])))
    evaluator.update(refs, (None, torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 0, 0])))
    scores = evaluator.compute()
    assert scores["knn_top1"] == 1.0 and set(scores) == {"knn_top1", "linear_top1"}
    only_queries = RepresentationEvaluator(num_classes=2)
    only_queries.update(queries, (None, torch.tensor([0, 1]), torch.tensor([1, 1])))
    with pytest.raises(ValueError, match="reference"):
        only_queries.compute()


def test_representation_datasets(tiny_dataset):
    task = get_task("representation")
    train = task.dataset(tiny_dataset, "train", train=True)
    view_1, view_2, label, index = train[3]
    assert index == 3 and view_1.shape == view_2.shape and not torch.equal(view_1, view_2)
    val = task.dataset(tiny_dataset, "val", train=False)
    roles = [val[i][2] for i in range(len(val))]
    n_query = sum(roles)
    assert roles == [1] * n_query + [0] * (len(val) - n_query)  # the split's queries, then the train references
    assert len(val) - n_query == len(train)


def test_retrieval_datasets_follow_the_protocol(tiny_dataset):
    task = get_task("retrieval")
    protocol = json.loads((tiny_dataset / MANIFEST).read_text())["protocols"]["retrieval"]
    train = task.dataset(tiny_dataset, "train", train=True)
    val = task.dataset(tiny_dataset, "val", train=False)
    assert set(train.labels) == set(protocol["train_classes"])
    assert {val[i][1] for i in range(len(val))} == set(protocol["eval_classes"])
    sampler = task.train_batch_sampler(train, 8, 0, 1, 0, type("Cfg", (), {"samples_per_class": 4})())
    for batch in sampler:
        labels = [train.labels[i] for i in batch]
        assert len(batch) == 8 and sorted(labels.count(c) for c in set(labels)) == [4, 4]
    with pytest.raises(ValueError, match="samples_per_class"):
        task.train_batch_sampler(train, 6, 0, 1, 0, type("Cfg", (), {"samples_per_class": 4})())
    with pytest.raises(ValueError, match="lower training.batch_size"):
        task.train_batch_sampler(train, 40, 0, 1, 0, type("Cfg", (), {"samples_per_class": 4})())


def test_retrieval_protocol_errors_name_the_manifest(tiny_dataset, tmp_path):
    data = tmp_path / "digits"
    shutil.copytree(tiny_dataset, data)
    manifest = json.loads((data / MANIFEST).read_text())
    task = get_task("retrieval")
    manifest["protocols"]["retrieval"]["eval_classes"] = [4, 5]
    (data / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match=r"manifest.json: protocols.retrieval classes \[4\]"):
        task.dataset(data, "val", train=False)
    del manifest["protocols"]
    (data / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match=r"manifest.json: no 'protocols.retrieval'"):
        task.dataset(data, "train", train=True)
