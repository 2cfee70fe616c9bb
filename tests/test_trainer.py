"""The trainer and its hooks, in this process (no Ray): the order hooks run in, the progress
line, one evaluation loop, and the one TorchTrainer builder that runs and Tune trials share."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import pytest
import torch

from components.data.canonical import read_info
from components.tasks import get_task
from components.training import hooks as H
from components.training.evaluation import evaluate, split_loader
from components.training.hooks import Evaluation, Hook, Progress, default_hooks, progress_line
from components.training.loop import assemble
from components.training.sessions import LocalSession
from components.training.spec import load_run_spec


class _Recorder(Hook):
    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def before_train(self, t):
        self.log.append(f"{self.name}.before_train")

    def before_epoch(self, t):
        self.log.append(f"{self.name}.before_epoch:{t.epoch}")

    @contextlib.contextmanager
    def _step(self):
        self.log.append(f"{self.name}.step")
        yield

    def step_context(self, t):
        return self._step()

    def after_epoch(self, t):
        self.log.append(f"{self.name}.after_epoch:{t.epoch}")

    def after_train(self, t):
        self.log.append(f"{self.name}.after_train")


def _trainer(tiny_params, tiny_dataset, hooks, run="classifier", **training):
    p = copy.deepcopy(tiny_params)
    p["runs"][run].setdefault("training", {}).update(training)
    spec = load_run_spec(p, run)
    return assemble(spec.key, spec.create_method(), read_info(tiny_dataset), spec.training, LocalSession(), hooks)


def test_hooks_run_in_list_order_at_every_event(tiny_params, tiny_dataset):
    log: list[str] = []
    trainer = _trainer(tiny_params, tiny_dataset, [_Recorder("a", log), _Recorder("b", log)], epochs=2)
    trainer.train()
    steps = len(trainer.train_loader)
    expected = ["a.before_train", "b.before_train"]
    for epoch in range(2):
        expected += [f"a.before_epoch:{epoch}", f"b.before_epoch:{epoch}"]
        expected += ["a.step", "b.step"] * steps
        expected += [f"a.after_epoch:{epoch}", f"b.after_epoch:{epoch}"]
    assert log == [*expected, "a.after_train", "b.after_train"]


def test_default_hook_order_is_the_documented_one():
    names = [type(h).__name__ for h in default_hooks("r", None, 0, None, 1, score_test=True)]
    assert names == [
        "Resume",
        "PolicyLineage",
        "FaultDrill",
        "Evaluation",
        "ComputeLedger",
        "Checkpoint",
        "MlflowLogger",
        "Figures",
        "Progress",
        "TestScore",
    ]
    doc = H.__doc__
    positions = [doc.index(f":class:`{name}`") for name in names]
    assert positions == sorted(positions), "the module docstring lists the hooks in another order"


def test_epochs_zero_runs_no_step_but_the_hooks_score_the_initial_weights(tiny_params, tiny_dataset):
    trainer = _trainer(tiny_params, tiny_dataset, [Evaluation()], epochs=0)
    before = {k: v.clone() for k, v in trainer.core.state_dict().items()}
    trainer.train()
    assert trainer.steps == 0 and "val/top1" in trainer.metrics and "train/loss" not in trainer.metrics
    after = trainer.core.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_progress_prints_one_plain_line_per_epoch(tiny_params, tiny_dataset):
    out = io.StringIO()
    trainer = _trainer(tiny_params, tiny_dataset, [Evaluation(), Progress("classifier", out)], epochs=2)
    trainer.train()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in out.getvalue()
    assert lines[0].startswith("classifier epoch 1/2 | loss ") and lines[1].startswith("classifier epoch 2/2 | ")
    assert "| val/top1 " in lines[0] and " s/epoch | ETA " in lines[0]
    assert lines[1].endswith("ETA 0m00s")


def test_progress_is_one_line_under_ray_trains_print(tiny_params, tiny_dataset, monkeypatch, capsys, caplog):
    """Ray Train's workers replace ``print`` with one that logs the message and also prints it
    when stdout is wrapped: a printed progress line would show twice in the job's log."""
    import builtins
    import logging

    from ray.train.v2._internal.logging.patch_print import redirected_print

    monkeypatch.setattr(builtins, "print", redirected_print)
    caplog.set_level(logging.INFO)
    _trainer(tiny_params, tiny_dataset, [Progress("classifier")], epochs=2).train()
    monkeypatch.undo()
    lines = [line for line in capsys.readouterr().out.splitlines() if " epoch " in line]
    assert [line.split(" | ")[0] for line in lines] == ["classifier epoch 1/2", "classifier epoch 2/2"]
    assert not [r for r in caplog.records if " epoch " in r.getMessage()]


class _CheckpointKeeper(LocalSession):
    """Keeps what each report's checkpoint holds (Ray Train would persist it)."""

    def __init__(self) -> None:
        super().__init__()
        self.files: list[dict[str, bytes]] = []

    def report(self, metrics, checkpoint=None):
        super().report(metrics, checkpoint)
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                self.files.append({p.name: p.read_bytes() for p in Path(folder).iterdir()})


def test_a_run_scores_its_best_weights_on_the_test_split_where_it_trained(tiny_params, tiny_dataset):
    """TestScore: the best validated weights (not the last), scored on the test split on the
    workers' device, reported with a last checkpoint that keeps the last epoch's weights."""
    session = _CheckpointKeeper()
    p = copy.deepcopy(tiny_params)
    p["runs"]["classifier"].setdefault("training", {}).update(epochs=3)
    spec = load_run_spec(p, "classifier")
    info = read_info(tiny_dataset)
    hooks = [h for h in default_hooks("classifier", None, 0, None, 0, score_test=True) if not isinstance(h, H.Resume)]
    trainer = assemble(spec.key, spec.create_method(), info, spec.training, session, hooks)
    trainer.train()
    last = {k: v.clone() for k, v in trainer.core.state_dict().items()}
    assert len(session.files) == 4 and H.TEST_FILE in session.files[-1]  # 3 epochs, then the test
    reported = json.loads(session.files[-1][H.TEST_FILE])
    assert session.reports[-1] == {"epoch": 2.0, **{f"test/{k}": v for k, v in reported.items()}}
    best = torch.load(io.BytesIO(session.files[-1][H.BEST_MODEL_FILE]), weights_only=True)
    task = get_task(trainer.method.task)
    model = trainer.method.build(info)
    model.load_state_dict(best)
    scores, _ = evaluate(trainer.method, task, model, split_loader(task, info, "test", 64), info.num_classes)
    assert reported == pytest.approx(scores)
    assert any(not torch.equal(best[k], last[k]) for k in last)  # the best epoch was not the last
    state = torch.load(io.BytesIO(session.files[-1][H.STATE_FILE]), weights_only=True)
    assert all(torch.equal(state["model"][k], last[k]) for k in last)
    sample = torch.load(io.BytesIO(session.files[-1][H.TEST_SAMPLE_FILE]), weights_only=True)
    test_images = len(task.dataset(info.root, "test", train=False))
    assert sample[0][0].shape[0] == min(spec.training.eval_batch_size, test_images)
    assert "test_eval_s" in json.loads(session.files[-1][H.LEDGER_FILE])
    # A Tune trial's hooks do not score the test split: its last report would count as an epoch.
    assert not any(isinstance(h, H.TestScore) for h in default_hooks("c", None, 0, None, 0))


def test_progress_line_names_each_loss_term_the_metric_and_the_eta():
    metrics = {"train/loss": 0.6, "train/loss_cls": 0.4, "train/loss_box": 0.2, "val/mAP": 0.1234}
    line = progress_line("retinanet", 2, 8, metrics, "mAP", 12.34, 3725)
    assert line == (
        "retinanet epoch 3/8 | loss 0.6000 (loss_box 0.2000, loss_cls 0.4000) | val/mAP 0.1234 | 12.3 s/epoch"
        " | ETA 1h02m05s"
    )
    # an epoch that was not validated shows no metric; a single loss term is not repeated
    assert progress_line("c", 0, 2, {"train/loss": 1.0, "train/ce": 1.0}, "top1", 2.0, 2.0) == (
        "c epoch 1/2 | loss 1.0000 | 2.0 s/epoch | ETA 0m02s"
    )


def test_evaluation_runs_in_full_precision_even_inside_autocast(tiny_params, tiny_dataset):
    """Validation picks the best checkpoint: it must not run in bf16 (detectors would decode
    boxes and run NMS in bf16, and val/mAP would disagree with the fp32 test score)."""
    p = copy.deepcopy(tiny_params)
    spec = load_run_spec(p, "classifier")
    method = spec.create_method()
    info = read_info(tiny_dataset)
    task = get_task(method.task)
    model = method.build(info).eval()
    seen = []
    original = method.predict

    def predict(m, batch):
        out = original(m, batch)
        seen.append(m(batch[0]).dtype)
        return out

    method.predict = predict
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        evaluate(method, task, model, split_loader(task, info, "val", 64), info.num_classes)
    assert seen and all(d == torch.float32 for d in seen)


def test_one_torch_trainer_builder_for_runs_and_trials(tiny_params):
    """Runs and Tune trials get the same ScalingConfig and RunConfig, checkpoint retention and
    accelerator type included (the trial's copy used to drop both)."""
    from components.search import tuner
    from components.storage.cluster import ray_storage
    from components.training import driver, ray_trainer
    from components.training.loop import train_loop_per_worker

    assert tuner.torch_trainer is ray_trainer.torch_trainer is driver.torch_trainer
    p = copy.deepcopy(tiny_params)
    p["runs"]["classifier"]["training"] = {
        "checkpoints_to_keep": 3,
        "scaling": {"num_workers": 2, "use_gpu": True, "gpus_per_worker": 1.0, "accelerator_type": "H100"},
        "failure": {"max_failures": 4},
    }
    spec = load_run_spec(p, "classifier")
    trainer = ray_trainer.torch_trainer(train_loop_per_worker, {}, spec.training, "n", ray_storage("/tmp/x", None))
    scaling, run = trainer.scaling_config, trainer.run_config
    assert (scaling.num_workers, scaling.use_gpu, scaling.accelerator_type) == (2, True, "H100")
    assert scaling.resources_per_worker == {"CPU": 1.0, "GPU": 1.0}
    assert run.checkpoint_config.num_to_keep == 3 and run.failure_config.max_failures == 4 and run.name == "n"


@pytest.mark.parametrize("saved", ["own device", "every visible device (earlier checkpoints)"])
def test_rng_state_resumes_on_a_node_with_fewer_gpus(saved, monkeypatch):
    """A worker restores its own CUDA generator only: a checkpoint from a node with 4 GPUs must
    resume on a node with 1 (``set_rng_state_all`` with 4 states raises IndexError there)."""
    from components.training import rng

    restored = []

    def set_all(states):
        if len(states) > 1:
            raise IndexError("list index out of range")  # what torch does with more states than devices
        restored.extend(states)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_all)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device=None: restored.append(state))
    own = torch.full((16,), 7, dtype=torch.uint8)
    state = rng.get_rng(torch.device("cpu"))
    state["cuda"] = own if saved == "own device" else [own, *[torch.zeros(16, dtype=torch.uint8)] * 3]
    rng.set_rng(state, torch.device("cuda", 0))
    assert len(restored) == 1 and torch.equal(restored[0], own)


@pytest.mark.parametrize(
    ("device", "amp", "native_bf16", "expected"),
    [
        ("cuda", True, True, torch.bfloat16),
        ("cuda", True, False, torch.float16),  # V100, T4: bf16 only emulated
        ("cuda", False, True, None),
        ("cpu", True, True, None),
    ],
)
def test_amp_dtype_follows_the_device(tiny_params, tiny_dataset, monkeypatch, device, amp, native_bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native_bf16)
    trainer = _trainer(tiny_params, tiny_dataset, [], epochs=1, amp=amp)
    trainer.session.device = torch.device(device)
    assert trainer.amp_dtype() == expected


def test_the_loss_scaler_changes_no_update_and_unscales_before_clipping(tiny_params, tiny_dataset):
    """fp16's loss scaling must leave the optimiser's steps as they were: gradients unscaled
    before the norm is clipped (clipping scaled gradients would shrink every step ~1000x)."""
    plain = _trainer(tiny_params, tiny_dataset, [], epochs=1, grad_clip_norm=0.05)
    scaled = _trainer(tiny_params, tiny_dataset, [], epochs=1, grad_clip_norm=0.05)
    scaled.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)  # a power of two: exact in fp32
    for trainer in (plain, scaled):
        torch.manual_seed(0)
        trainer.train()
    a, b = plain.core.state_dict(), scaled.core.state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-7) for k in a)
    assert scaled.scaler.get_scale() == 2.0**10  # no overflow at that scale, so none was skipped


def test_the_test_sample_reads_back_with_weights_only():
    """Detection and segmentation batches hold torchvision's tv_tensors, which
    ``torch.load(weights_only=True)`` refuses: the sample is saved as plain tensors."""
    from torchvision import tv_tensors

    boxes = tv_tensors.BoundingBoxes(torch.tensor([[1.0, 2.0, 5.0, 6.0]]), format="XYXY", canvas_size=(8, 8))
    sample = ([tv_tensors.Image(torch.rand(3, 8, 8))], [{"boxes": boxes, "labels": torch.tensor([1]), "id": 3}])
    buffer = io.BytesIO()
    torch.save(H._plain(sample), buffer)
    buffer.seek(0)
    images, targets = torch.load(buffer, weights_only=True)
    assert type(images[0]) is torch.Tensor and torch.equal(images[0], sample[0][0])
    assert torch.equal(targets[0]["boxes"], boxes) and targets[0]["id"] == 3
