"""NPID (arXiv 1805.01978): the NCE loss with its fixed Monte-Carlo normaliser against the paper's
formula by hand, one memory bank and one normaliser on every worker, and the paper's evaluation,
weighted kNN of a query's embedding over the bank (``bank_knn_top1``)."""

from __future__ import annotations

import copy
import io
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from components.data.canonical import read_info
from components.data.loaders import ImageLabelDataset
from components.methods import create_method
from components.methods import npid as npid_module
from components.tasks import get_task
from components.tasks.representation import RepresentationEvaluator, weighted_knn
from tests.test_representation import _info
from tests.test_trainer import _CheckpointKeeper

TINY_ENCODER = {"widths": [8, 16], "blocks": [1, 1]}
NO_COLOUR = {"channel_shuffle": 0.0, "grayscale": 0.0, "invert": 0.0}


def _method(**overrides):
    cfg = {"encoder": TINY_ENCODER, "embedding_dim": 4, "nce_negatives": 5, "colour": NO_COLOUR, **overrides}
    return create_method("npid", cfg, source="test", key="npid")


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


# --- the NCE loss --------------------------------------------------------------------------------


def paper_nce(f, bank, index, noise, z, m, n, tau) -> torch.Tensor:
    """Eq. (6)-(7) of the paper, literally: P(i|f) = exp(v_i . f / tau) / Z, P_n = 1/n,
    h(i, f) = P(i|f) / (P(i|f) + m P_n), loss -log h(i, f_i) - sum_k log(1 - h(j_k, f_i))."""
    f, bank = f.double(), bank.double()
    p_pos = torch.exp((bank[index] * f).sum(1) / tau) / z
    p_noise = torch.exp(f @ bank[noise].T / tau) / z
    h_pos, h_noise = p_pos / (p_pos + m / n), p_noise / (p_noise + m / n)
    return (-torch.log(h_pos) - torch.log(1 - h_noise).sum(1)).mean()


def test_nce_loss_is_the_papers_with_a_fixed_monte_carlo_normaliser(monkeypatch):
    tau, m, n, lam = 0.07, 5, 6, 10.0
    torch.manual_seed(0)
    model = _method(temperature=tau, nce_negatives=m, proximal=lam, z_batches=1).build(_info(n))
    rows = [[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [1, 1, 0, 0], [0, 1, 1, 1], [-1, 0, 1, 0]]
    bank = F.normalize(torch.tensor(rows))
    model.bank.copy_(bank)
    # The noise samples, injected: repeats and the positive itself, as uniform sampling allows.
    draws = [torch.tensor([0, 2, 2, 5, 1]), torch.tensor([3, 4, 0, 0, 5])]
    calls = []

    def injected_noise(high, size, **kwargs):
        assert high == n and tuple(size) == (m,)
        calls.append(high)
        return draws[len(calls) - 1].to(kwargs.get("device"))

    monkeypatch.setattr(npid_module.torch, "randint", injected_noise)
    x1, i1 = _images(3, 0), torch.tensor([1, 4, 0])
    x2, i2 = _images(3, 1), torch.tensor([2, 3, 5])
    with torch.no_grad():  # train-mode BN: the forward computes these same features
        f1, f2 = model.embed(x1), model.embed(x2)
    # Z: n times the mean of exp(v_j . f / tau) over the first batch's noise samples, then fixed.
    z = n * torch.exp(f1.double() @ bank.double()[draws[0]].T / tau).mean()
    losses = model(x1, i1)
    torch.testing.assert_close(model.z.double(), z, rtol=1e-5, atol=0)
    expected = paper_nce(f1, bank, i1, draws[0], z, m, n, tau)
    torch.testing.assert_close(losses["nce"].double(), expected, rtol=1e-5, atol=1e-5)
    proximal = lam * (f1 - bank[i1]).pow(2).sum(1).mean()
    torch.testing.assert_close(losses["proximal"], proximal, rtol=1e-5, atol=1e-6)
    # The second batch scores against the bank the first one updated, with the first batch's Z.
    bank_after = bank.clone()
    bank_after[i1] = f1
    losses = model(x2, i2)
    expected = paper_nce(f2, bank_after, i2, draws[1], z, m, n, tau)
    torch.testing.assert_close(losses["nce"].double(), expected, rtol=1e-5, atol=1e-5)
    re_estimated = n * torch.exp(f2.double() @ bank_after.double()[draws[1]].T / tau).mean()
    assert not torch.isclose(paper_nce(f2, bank_after, i2, draws[1], re_estimated, m, n, tau), expected, rtol=1e-3)
    assert len(calls) == 2


# --- one bank and one normaliser on every worker ------------------------------------------------
# The ranks are spawned processes that import this module: it imports no training code at the top.

WORLD, PER_RANK, BANK = 2, 4, 12
INDEX = [[0, 5, 9, 2], [7, 3, 11, 6]]  # each rank's batch: disjoint slots, not in rank order


def _scattered_rows(count: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(count, dim, generator=g), torch.randint(3, (count,), generator=g), torch.arange(count) % 3 == 0


def _rank(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)  # the same initial model and bank on both ranks
        method = _method(nce_negatives=8, z_batches=1)
        model = method.build(_info(BANK))
        initial = model.bank.clone()
        images, index = _images(PER_RANK, seed=10 + rank), torch.tensor(INDEX[rank])
        with torch.no_grad():
            own = model.embed(images)
        torch.manual_seed(100 + rank)  # each rank draws its own noise samples
        model(images, index)
        torch.manual_seed(100 + rank)  # this rank's estimate of Z alone, from its own draw
        noise = initial[torch.randint(BANK, (8,))]
        local_z = BANK * torch.exp(own @ noise.T / method.cfg.temperature).mean()
        after_one = {"bank": model.bank.clone(), "z": model.z.clone()}
        # A second step on the other rank's slots: Z is fixed now, the bank moves again.
        images = _images(PER_RANK, seed=20 + rank)
        with torch.no_grad():
            own_second = model.embed(images)
        model(images, torch.tensor(INDEX[1 - rank]))
        # The family's evaluator on this rank's slice of one made-up evaluation set.
        features, labels, is_query = _scattered_rows(30, 5, seed=3)
        bank_rows, _, _ = _scattered_rows(30, 5, seed=4)
        evaluator = RepresentationEvaluator(num_classes=3, k=5)
        rows = slice(rank, None, WORLD)
        evaluator.update({"features": features[rows], "bank": bank_rows[rows]}, (None, labels[rows], is_query[rows]))
        result = {
            "initial": initial,
            "own": own,
            "own_second": own_second,
            "local_z": local_z,
            "after_one": after_one,
            "after_two": {"bank": model.bank.clone(), "z": model.z.clone()},
            "scores": evaluator.compute(),
        }
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_workers_hold_one_bank_and_one_normaliser(tmp_path):
    """Two gloo ranks on CPU, each its own batch and noise: after each step both hold the same bank
    (bitwise) with both ranks' features at their slots, and the same Z, the mean of the two
    ranks' estimates. The evaluator's kNN over the bank gathers both ranks' rows."""
    mp.spawn(_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    zero, one = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD))
    assert torch.equal(zero["initial"], one["initial"])
    for step in ("after_one", "after_two"):
        assert torch.equal(zero[step]["bank"], one[step]["bank"]), step
        assert torch.equal(zero[step]["z"], one[step]["z"]), step
    assert not torch.isclose(zero["local_z"], one["local_z"], rtol=1e-3)  # the estimates differed
    torch.testing.assert_close(zero["after_one"]["z"], (zero["local_z"] + one["local_z"]) / 2, rtol=1e-6, atol=0)
    assert torch.equal(zero["after_two"]["z"], zero["after_one"]["z"])  # z_batches 1: fixed
    # Step one: each rank's features at its own slots, the other slots untouched; step two: each
    # rank's second batch at the other rank's first slots.
    bank = zero["after_one"]["bank"]
    for r, ranked in enumerate((zero, one)):
        torch.testing.assert_close(bank[INDEX[r]], ranked["own"])
        torch.testing.assert_close(zero["after_two"]["bank"][INDEX[1 - r]], ranked["own_second"])
    untouched = torch.ones(BANK, dtype=torch.bool)
    untouched[INDEX[0] + INDEX[1]] = False
    assert torch.equal(bank[untouched], zero["initial"][untouched])
    # Both ranks scored one evaluation: its gathered score is that of all rows in one process.
    features, labels, is_query = _scattered_rows(30, 5, seed=3)
    bank_rows, _, _ = _scattered_rows(30, 5, seed=4)
    single = RepresentationEvaluator(num_classes=3, k=5)
    single.update({"features": features, "bank": bank_rows}, (None, labels, is_query))
    expected = single.compute()
    assert "bank_knn_top1" in expected
    assert zero["scores"] == one["scores"] == pytest.approx(expected)


# --- the paper's evaluation: weighted kNN over the bank -----------------------------------------

CLASSES, PER_CLASS, QUERIES = 3, 4, 15


def _clustered_npid() -> tuple:
    """An NPID whose encoder passes its 3-d "images" through and whose head turns centre e_c into
    e_(c+1); its bank holds train image i at the centre of its class (labels i mod 3)."""
    method = _method(embedding_dim=CLASSES, head_batchnorm=False)
    model = method.build(_info(CLASSES * PER_CLASS))
    model.encoder = nn.Identity()
    head = nn.Linear(CLASSES, CLASSES, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(CLASSES).roll(1, dims=0))  # W e_c = e_(c+1)
    model.head = head
    train_labels = torch.arange(CLASSES * PER_CLASS) % CLASSES
    centres = torch.eye(CLASSES)
    model.bank.copy_(centres[train_labels])
    return method, model.eval(), train_labels, centres


def _evaluation_batches(train_images, train_labels, query_images, query_labels, batch_size=5):
    """The family's evaluation rows ``(image, label, is_query, index)`` in a shuffled order, in
    batches: a train row's bank slot is known only from its index."""
    rows = [(x, y, 1, i) for i, (x, y) in enumerate(zip(query_images, query_labels, strict=True))]
    rows += [(x, y, 0, i) for i, (x, y) in enumerate(zip(train_images, train_labels, strict=True))]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    rows = [rows[i] for i in order]
    return [
        (
            torch.stack([r[0] for r in chunk]),
            torch.tensor([int(r[1]) for r in chunk]),
            torch.tensor([r[2] for r in chunk]),
            torch.tensor([r[3] for r in chunk]),
        )
        for chunk in (rows[s : s + batch_size] for s in range(0, len(rows), batch_size))
    ]


def test_bank_knn_scores_the_head_embedding_of_queries_against_the_bank():
    from components.training.evaluation import evaluate  # the loop that validation and test run

    method, model, train_labels, centres = _clustered_npid()
    task = get_task("representation")
    g = torch.Generator().manual_seed(1)
    query_labels = torch.arange(QUERIES) % CLASSES
    # A query's embedding lands near the centre of its class for 9 of the 15, near the next
    # class's for 6: the bank kNN must score 9/15. The head maps e_(t-1) to e_t, so the query
    # "image" aimed at centre t is e_(t-1) plus a little noise.
    target = torch.where(torch.arange(QUERIES) < 9, query_labels, (query_labels + 1) % CLASSES)
    query_images = centres[(target - 1) % CLASSES] + 0.05 * torch.randn(QUERIES, CLASSES, generator=g)
    # Encoded again, the train images would disagree with the bank: each sits at the next class's centre.
    train_images = centres[(train_labels + 1) % CLASSES]
    batches = _evaluation_batches(train_images, train_labels, query_images, query_labels)
    scores, _ = evaluate(method, task, model, batches, CLASSES)
    assert set(scores) == {"knn_top1", "linear_top1", "bank_knn_top1"}
    assert scores["bank_knn_top1"] == pytest.approx(9 / 15)
    # The family's own kNN re-encodes the train images (the encoder's features, no head).
    standard = weighted_knn(query_images, train_images, train_labels, CLASSES)
    assert scores["knn_top1"] == pytest.approx(float((standard == query_labels).double().mean()))
    assert scores["knn_top1"] != pytest.approx(scores["bank_knn_top1"])
    # A bank that puts each train image at the centre of the class before its own: the queries
    # aimed at their own class now find the previous class's label, those aimed at the next class
    # their own. The bank kNN follows the bank; the re-encoding kNN does not move.
    model.bank.copy_(centres[(train_labels - 1) % CLASSES])
    moved, _ = evaluate(method, task, model, batches, CLASSES)
    assert moved["bank_knn_top1"] == pytest.approx(0.0)
    assert moved["knn_top1"] == scores["knn_top1"] and moved["linear_top1"] == scores["linear_top1"]


def test_only_npid_adds_the_bank_metric():
    evaluator = RepresentationEvaluator(num_classes=2, k=3)
    refs, queries = torch.eye(2).repeat(2, 1), torch.eye(2)
    evaluator.update(queries, (None, torch.tensor([0, 1]), torch.tensor([1, 1])))
    evaluator.update(refs, (None, torch.tensor([0, 1, 0, 1]), torch.tensor([0, 0, 0, 0])))
    assert set(evaluator.compute()) == {"knn_top1", "linear_top1"}


def test_bank_rows_map_to_the_train_labels_through_the_familys_loaders(tiny_params, tiny_dataset):
    """The real evaluation rows, sliced over two workers as the loop does, with the train split as
    the queries and a bank holding each train image's own embedding at its slot: a query's most
    similar bank entry is itself, so a bank read at the right rows scores 1 and a bank whose rows
    are permuted scores near chance. The network is a stand-in whose embedding of an image is its
    centred pixels (a random encoder's features are too alike for a query to single itself out)."""
    from components.training.evaluation import eval_loader_for
    from components.training.spec import load_run_spec

    info = read_info(tiny_dataset)
    train = ImageLabelDataset(info.root, "crops", "train")
    pixels = torch.stack([train[i][0] for i in range(len(train))]).flatten(1)
    method = _method(embedding_dim=pixels.shape[1])
    model = method.build(info).eval()
    centre = nn.Linear(pixels.shape[1], pixels.shape[1])
    with torch.no_grad():
        centre.weight.copy_(torch.eye(pixels.shape[1]))
        centre.bias.copy_(-pixels.mean(0))
    model.encoder, model.head = nn.Flatten(), centre
    with torch.no_grad():
        model.bank.copy_(model.embed(pixels))
    task, training = get_task("representation"), load_run_spec(tiny_params, "npid").training

    def bank_knn() -> float:
        evaluator = task.evaluator(info.num_classes)
        for rank in range(2):  # the two workers' slices, gathered into one evaluator
            for batch in eval_loader_for(task, info, "train", training, rank, 2, torch.device("cpu")):
                with torch.no_grad():
                    evaluator.update(method.predict(model, batch), batch)
        return evaluator.compute()["bank_knn_top1"]

    assert bank_knn() == 1.0
    model.bank.copy_(model.bank[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))])
    assert bank_knn() < 0.5


# --- a run: validation and the test split of the best checkpoint ---------------------------------


def test_a_run_reports_the_bank_knn_of_its_best_checkpoint_on_the_test_split(tiny_params, tiny_dataset):
    from components.training import hooks as H
    from components.training.loop import assemble
    from components.training.spec import load_run_spec

    p = copy.deepcopy(tiny_params)
    p["runs"]["npid"]["training"].update(epochs=2)
    spec = load_run_spec(p, "npid")
    info = read_info(tiny_dataset)
    session = _CheckpointKeeper()
    hooks = [h for h in H.default_hooks("npid", None, 0, None, 0, score_test=True) if not isinstance(h, H.Resume)]
    trainer = assemble(spec.key, spec.create_method(), info, spec.training, session, hooks)
    trainer.train()
    epochs, final = session.reports[:-1], session.reports[-1]
    assert len(epochs) == 2 and all({"val/knn_top1", "val/bank_knn_top1"} <= set(r) for r in epochs)
    assert {"test/knn_top1", "test/linear_top1", "test/bank_knn_top1"} <= set(final)
    reported = json.loads(session.files[-1][H.TEST_FILE])
    assert {"knn_top1", "linear_top1", "bank_knn_top1"} == set(reported)
    # By hand from the best checkpoint: each test image's eval-mode embedding against the bank
    # it holds, whose row i is train image i (the labels in the train split's order).
    best = torch.load(io.BytesIO(session.files[-1][H.BEST_MODEL_FILE]), weights_only=True)
    model = spec.create_method().build(info)
    model.load_state_dict(best)
    model.eval()
    test = ImageLabelDataset(info.root, "crops", "test")
    train_labels = torch.tensor(ImageLabelDataset(info.root, "crops", "train").labels)
    assert best["bank"].shape[0] == len(train_labels)
    with torch.no_grad():
        queries = model.embed(torch.stack([test[i][0] for i in range(len(test))]))
    test_labels = torch.tensor(test.labels)
    predicted = weighted_knn(queries, best["bank"], train_labels, info.num_classes)
    expected = float((predicted == test_labels).double().mean())
    assert reported["bank_knn_top1"] == pytest.approx(expected)
    # With the bank's rows out of step with the train labels the value would not hold.
    shuffled = train_labels[torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(0))]
    wrong = float((weighted_knn(queries, best["bank"], shuffled, info.num_classes) == test_labels).double().mean())
    assert wrong != pytest.approx(expected)
