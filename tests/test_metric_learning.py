"""Metric learning: each loss and miner against hand-computed cases, Smooth-AP against the true AP,
the selective gradient of the hard-negative triplet loss, 1-worker vs 2-worker equality of the
gathered losses and their gradients, and a short run of every method on the tiny dataset."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import components.methods.contrastive  # noqa: F401  (registers the methods until the
import components.methods.smooth_ap  # noqa: F401   registry's module list names them)
import components.methods.triplet  # noqa: F401
from components.config import ConfigError
from components.data.canonical import DatasetInfo
from components.methods import create_method
from components.methods.contrastive import contrastive_loss
from components.methods.metric_losses import distance_matrix
from components.methods.smooth_ap import smooth_ap
from components.methods.triplet import (
    batch_hard_mine,
    batch_hard_triplet_loss,
    selectively_contrastive_loss,
    selectively_contrastive_terms,
    semi_hard_mine,
)
from components.tasks import get_task
from tests.conftest import TINY_MODELS


def _on_circle(degrees: list[float], scale: list[float] | None = None) -> torch.Tensor:
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    points = torch.stack([rad.cos(), rad.sin()], dim=1)
    return points * torch.tensor(scale, dtype=torch.float64)[:, None] if scale else points


def _chord(degrees: float) -> float:
    """Distance between unit vectors ``degrees`` apart."""
    return 2 * math.sin(math.radians(degrees) / 2)


# --- triplet miners ---------------------------------------------------------------------------


def test_batch_hard_picks_farthest_positive_and_nearest_negative():
    # class 0 at 0, 10, 40 degrees; class 1 at 60, 100, 210. Norms vary: only angles matter.
    emb = _on_circle([0, 10, 40, 60, 100, 210], scale=[1, 3, 0.5, 2, 1, 4])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    dist = distance_matrix(emb)
    pos, neg, valid = batch_hard_mine(dist, labels)
    # anchor 0: positives 10, 40 -> 40 (idx 2); negatives 60, 100, 210 -> 60 (idx 3)
    # anchor 3 (60): positives 100, 210 -> 210 (idx 5, 150 deg away); negatives 0, 10, 40 -> 40 (idx 2)
    # anchor 5 (210): positives 60 (150 deg), 100 (110 deg) -> idx 3; negatives 0 (150 deg),
    # 10 (160), 40 (170) -> idx 0
    assert pos.tolist() == [2, 2, 0, 5, 5, 3]
    assert neg.tolist() == [3, 3, 3, 2, 2, 0]
    assert valid.all()
    margin = 0.3
    expected = [
        max(0.0, _chord(a) - _chord(n) + margin)
        for a, n in [(40, 60), (30, 50), (40, 20), (150, 20), (110, 60), (150, 150)]
    ]
    loss = batch_hard_triplet_loss(dist, labels, margin)
    assert loss.item() == pytest.approx(sum(expected) / 6, abs=1e-9)


def test_semi_hard_picks_the_negative_inside_the_margin_band():
    # anchor 0 deg, positive 30 deg; negatives at 20 (harder than the positive), 40 (semi-hard),
    # 150 (easy). The first anchor-positive pair is (0, 1).
    emb = _on_circle([0, 30, 20, 40, 150])
    labels = torch.tensor([0, 0, 1, 1, 1])
    dist = distance_matrix(emb)
    anchors, positives, negatives = semi_hard_mine(dist, labels)
    first = (anchors == 0) & (positives == 1)
    assert first.sum() == 1
    n = int(negatives[first])
    margin = 0.2
    assert n == 3
    assert dist[0, 1] < dist[0, n] < dist[0, 1] + margin  # inside the band
    # Every pair's negative is the nearest one beyond its positive, when there is one.
    for a, p, n in zip(anchors.tolist(), positives.tolist(), negatives.tolist(), strict=True):
        beyond = [j for j in range(5) if labels[j] != labels[a] and dist[a, j] > dist[a, p]]
        if beyond:
            assert n == min(beyond, key=lambda j: dist[a, j])


def test_semi_hard_falls_back_to_the_farthest_negative():
    # anchor 0 deg, positive 180 deg: every negative (20, 40 deg) is nearer than the positive.
    emb = _on_circle([0, 180, 20, 40])
    labels = torch.tensor([0, 0, 1, 1])
    anchors, positives, negatives = semi_hard_mine(distance_matrix(emb), labels)
    first = (anchors == 0) & (positives == 1)
    assert int(negatives[first]) == 3


# --- selectively contrastive (hard-negative) triplet loss --------------------------------------


def test_sct_gives_no_gradient_to_the_positive_of_a_hard_triplet():
    s_ap = torch.tensor([0.3, 0.7], requires_grad=True)
    s_an = torch.tensor([0.5, 0.4], requires_grad=True)  # hard (0.5 > 0.3), then easy (0.4 < 0.7)
    terms = selectively_contrastive_terms(s_ap, s_an, temperature=0.1, lam=2.0)
    assert terms[0].item() == pytest.approx(2.0 * 0.5)
    assert terms[1].item() == pytest.approx(math.log1p(math.exp((0.4 - 0.7) / 0.1)))
    terms.sum().backward()
    assert s_ap.grad[0].item() == 0.0  # exactly: the hard triplet does not pull the positive in
    assert s_an.grad[0].item() == pytest.approx(2.0)  # it only pushes the negative away
    sigma = 1 / (1 + math.exp(-(0.4 - 0.7) / 0.1))
    assert s_ap.grad[1].item() == pytest.approx(-sigma / 0.1)  # the easy one pulls...
    assert s_an.grad[1].item() == pytest.approx(sigma / 0.1)  # ...and pushes


def test_sct_on_a_similarity_matrix_mines_easy_positive_and_hard_negative():
    # Items 0, 1, 2 of class 0; 3, 4 of class 1. Symmetric similarities.
    s = torch.tensor(
        [
            [1.0, 0.2, 0.3, 0.6, 0.1],  # anchor 0: easy positive 2 (0.3) < hard negative 3 (0.6): hard
            [0.2, 1.0, 0.8, 0.1, 0.0],  # anchor 1: positive 2 (0.8) > negative 3 (0.1): easy
            [0.3, 0.8, 1.0, 0.2, 0.1],
            [0.6, 0.1, 0.2, 1.0, 0.9],
            [0.1, 0.0, 0.1, 0.9, 1.0],
        ],
        requires_grad=True,
    )
    labels = torch.tensor([0, 0, 0, 1, 1])
    loss = selectively_contrastive_loss(s, labels, temperature=0.1, lam=1.0)
    loss.backward()
    g = s.grad
    assert g[0, 2].item() == 0.0 and g[0, 1].item() == 0.0  # hard anchor: no positive gradient
    assert g[0, 3].item() == pytest.approx(1.0 / 5)  # lambda / (5 anchors)
    assert g[1, 2].item() < 0 and g[1, 3].item() > 0  # easy anchor: pull positive, push negative
    assert g[1, 0].item() == 0.0  # not its easy positive
    easy = [math.log1p(math.exp((n - p) / 0.1)) for p, n in [(0.8, 0.1), (0.8, 0.2), (0.9, 0.6), (0.9, 0.1)]]
    assert loss.item() == pytest.approx((0.6 + sum(easy)) / 5, rel=1e-6)


# --- contrastive -------------------------------------------------------------------------------


def test_contrastive_loss_matches_its_formula():
    emb = _on_circle([0, 60, 90], scale=[2, 1, 0.5])
    labels = torch.tensor([0, 0, 1])
    pull, push = contrastive_loss(distance_matrix(emb), labels, margin=1.0)
    # positive pair (0, 60): D = 1 -> 1/2; negatives (0, 90): D = sqrt 2 > m -> 0; (60, 90): D = chord(30)
    assert pull.item() == pytest.approx(0.5, abs=1e-9)
    assert push.item() == pytest.approx((0.0 + 0.5 * (1.0 - _chord(30)) ** 2) / 2, abs=1e-9)


# --- Smooth-AP ---------------------------------------------------------------------------------


def _true_ap(sim: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """AP of each row against the others, by sorting (no ties in the cases used)."""
    aps = []
    for q in range(len(labels)):
        others = [j for j in range(len(labels)) if j != q]
        order = sorted(others, key=lambda j: -float(sim[q, j]))
        hits = [bool(labels[j] == labels[q]) for j in order]
        precisions = [sum(hits[: i + 1]) / (i + 1) for i, h in enumerate(hits) if h]
        aps.append(sum(precisions) / len(precisions))
    return torch.tensor(aps, dtype=torch.float64)


def test_smooth_ap_hand_case():
    # query 0 ranks its neighbours 1 (pos), 2 (neg), 3 (pos): AP = (1/1 + 2/3) / 2
    sim = torch.tensor(
        [[1.0, 0.9, 0.5, 0.1], [0.9, 1.0, 0.3, 0.2], [0.5, 0.3, 1.0, 0.4], [0.1, 0.2, 0.4, 1.0]], dtype=torch.float64
    )
    ap, _ = smooth_ap(sim, torch.tensor([0, 0, 1, 0]), temperature=1e-4)
    assert ap[0].item() == pytest.approx((1 + 2 / 3) / 2, abs=1e-6)


def test_smooth_ap_approaches_true_ap_as_temperature_falls():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(24, 8, generator=g, dtype=torch.float64)
    labels = torch.arange(6).repeat_interleave(4)
    unit = torch.nn.functional.normalize(emb, dim=1)
    sim = unit @ unit.T
    truth = _true_ap(sim, labels)
    taus = (0.1, 0.01, 1e-3, 1e-4, 1e-8)  # the closest two similarities here are ~4e-6 apart
    errors = [(smooth_ap(sim, labels, tau)[0] - truth).abs().max().item() for tau in taus]
    assert errors[0] > 0.05  # a warm sigmoid is far from the step: the comparison can fail
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 1e-9


# --- configs -----------------------------------------------------------------------------------


def test_configs_are_validated():
    with pytest.raises(ConfigError, match="miner"):
        create_method("triplet", {"miner": "hardest"}, source="t", key="k")
    with pytest.raises(ConfigError, match="temperature"):
        create_method("smooth_ap", {"temperature": 0.0}, source="t", key="k")
    with pytest.raises(ConfigError, match="samples_per_class"):
        create_method("contrastive", {"samples_per_class": 1}, source="t", key="k")


# --- 1 worker vs 2 workers ---------------------------------------------------------------------

# GroupNorm encoder: no batch statistics, so the two runs see the same function of the inputs.
_ENCODER = {"widths": [4, 8], "blocks": [1, 1], "norm": "group"}
_CASES = {
    "batch_hard": ("triplet", {"miner": "batch_hard", "margin": 0.5}),
    "semi_hard": ("triplet", {"miner": "semi_hard", "margin": 0.5}),
    "hard_negatives": ("triplet", {"miner": "hard_negatives"}),
    "contrastive": ("contrastive", {"margin": 1.2}),
    "smooth_ap": ("smooth_ap", {"temperature": 0.05}),
}
_INFO = DatasetInfo("t", Path("."), tuple("0123456789"), 3, (8, 8), "", {})


def _losses_and_gradients(images: torch.Tensor, labels: torch.Tensor, wrap=None) -> dict[str, tuple]:
    """For every case: the summed loss of ``training_step`` on (images, labels) and the gradient
    of every parameter, the model wrapped by ``wrap`` (DDP under Ray Train)."""
    out = {}
    for case, (name, cfg) in _CASES.items():
        method = create_method(name, {**cfg, "encoder": _ENCODER, "embedding_dim": 8}, source="t", key=case)
        torch.manual_seed(0)
        model = method.build(_INFO).double()
        core = model
        if wrap is not None:
            model = wrap(model)
        loss = sum(method.training_step(model, (images, labels)).values())
        loss.backward()
        out[case] = (loss.item(), [p.grad.clone() for p in core.parameters()])
    return out


def _two_worker_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch

    torch.set_num_threads(1)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    images, labels = config["images"], config["labels"]
    part = len(labels) // world
    mine = slice(rank * part, (rank + 1) * part)
    result = _losses_and_gradients(images[mine], labels[mine], wrap=ray.train.torch.prepare_model)
    if rank == 0:
        torch.save(result, config["out"])


def test_gathered_losses_and_gradients_do_not_depend_on_the_worker_count(ray_session, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    g = torch.Generator().manual_seed(0)
    images = torch.rand(16, 3, 8, 8, generator=g, dtype=torch.float64)
    # Each worker's half holds 2 classes x 4 (as the m-per-class sampler composes it), class 1 on
    # both workers, so mining crosses the split.
    labels = torch.tensor([0] * 4 + [1] * 4 + [1] * 4 + [2] * 4)
    single = _losses_and_gradients(images, labels)

    out = tmp_path / "two_workers.pt"
    TorchTrainer(
        _two_worker_loop,
        train_loop_config={"images": images, "labels": labels, "out": str(out)},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="metric_gather", storage_path=str(tmp_path / "ray")),
    ).fit()
    double = torch.load(out, weights_only=False)

    for case, (loss, grads) in single.items():
        loss_2, grads_2 = double[case]
        assert loss > 0 and loss_2 == pytest.approx(loss, rel=1e-9), case
        assert any(g.abs().max() > 0 for g in grads), case
        for g1, g2 in zip(grads, grads_2, strict=True):
            torch.testing.assert_close(g2, g1, rtol=1e-7, atol=1e-10, msg=case)


# --- smoke runs on the tiny dataset ------------------------------------------------------------


@pytest.mark.parametrize(
    "name,cfg",
    [
        ("triplet", {"miner": "batch_hard"}),
        ("triplet", {"miner": "semi_hard"}),
        ("triplet", {"miner": "hard_negatives"}),
        ("contrastive", {}),
        ("smooth_ap", {}),
    ],
)
def test_method_trains_on_tiny_data(tiny_dataset, name, cfg):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tiny = TINY_MODELS.get(name, {"encoder": {"widths": [8, 16], "blocks": [1, 1]}, "embedding_dim": 16})
    method = create_method(name, {**cfg, **tiny}, source="t", key="k")
    assert method.task == "retrieval"
    task = get_task("retrieval")
    info = DatasetInfo("digits", tiny_dataset, tuple(str(i) for i in range(10)), 3, (16, 16), "", {})
    model = method.build(info)
    train = task.dataset(tiny_dataset, "train", train=True)
    sampler = task.train_batch_sampler(train, 8, 0, 1, 0, method.cfg)
    collate = task.collate() or torch.utils.data.default_collate
    batch = collate([train[i] for i in next(iter(sampler))])
    assert sorted(batch[1].bincount().tolist())[-2:] == [4, 4]  # 2 classes x samples_per_class
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):  # one fixed batch: the loss must fall
        loss = sum(method.training_step(model, batch).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert min(losses[-3:]) < 0.8 * losses[0], losses
    model.eval()
    val = task.dataset(tiny_dataset, "val", train=False)
    images = torch.stack([val[i][0] for i in range(len(val))])
    with torch.no_grad():
        embeddings = method.predict(model, (images, None))
    assert embeddings.shape == (len(val), method.cfg.embedding_dim)
    assert torch.isfinite(embeddings).all()
