"""Pretrained trunks: a classifier trains a detection trunk, a detector starts from it."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml

from components.config import ConfigError, to_dict
from components.data.canonical import read_info
from components.methods import create_method
from components.models.pretrained import load_trunk
from components.training.optim import OptimizerConfig, SchedulerConfig, build_optimizer, build_scheduler
from components.training.spec import load_run_spec

TRUNK = {"name": "small", "widths": [8, 16], "blocks": [1, 1], "levels": 1}


def _save_pretrained(root, name, info, backbone=TRUNK):
    """What pretrain@<name> writes: the classifier's state dict and its resolved config."""
    torch.manual_seed(1)
    method = create_method("classifier", {"backbone": backbone}, source="test", key="pretrain.x.config")
    model = method.build(info)
    folder = root / name
    folder.mkdir(parents=True)
    torch.save(model.state_dict(), folder / "model.pt")
    resolved = {"run": name, "method": "classifier", "config": to_dict(method.cfg)}
    (folder / "config.yaml").write_text(yaml.safe_dump(resolved))
    return model


def test_trunk_classifier_trains_every_parameter(tiny_dataset):
    info = read_info(tiny_dataset)
    method = create_method("classifier", {"backbone": TRUNK}, source="test", key="c")
    model = method.build(info)
    images = torch.rand(4, info.in_channels, *info.image_size)
    losses = method.training_step(model, (images, torch.tensor([0, 1, 2, 3])))
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert method.predict(model, (images, None)).shape == (4, info.num_classes)
    trunk_keys = {k[len("body.") :] for k in model.state_dict() if k.startswith("body.")}
    assert set(method.trunk(model).state_dict()) == trunk_keys


def test_trunk_classifier_sees_its_images_at_input_size(tiny_dataset):
    """``input_size`` resizes the crops before the trunk: a stride-8 trunk's map is input_size / 8."""
    info = read_info(tiny_dataset)
    method = create_method("classifier", {"backbone": TRUNK, "input_size": 64}, source="test", key="c")
    model = method.build(info)
    seen = []
    model.body.register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape[-2:])))
    logits = model(torch.rand(2, info.in_channels, 16, 16))
    assert seen == [(8, 8)] and logits.shape == (2, info.num_classes)
    plain = create_method("classifier", {"backbone": TRUNK}, source="test", key="c").build(info)
    plain.body.register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape[-2:])))
    plain(torch.rand(2, info.in_channels, 16, 16))
    assert seen[-1] == (2, 2)


def test_input_size_without_a_trunk_is_refused():
    # refused when params are read, before any model is built
    with pytest.raises(ValueError, match="input_size"):
        create_method("classifier", {"input_size": 64}, source="test", key="c")


@pytest.mark.parametrize("name", ["detr", "retinanet"])
def test_detector_trunk_loads_the_pretrained_weights_and_only_those(name, tiny_dataset, tmp_path):
    info = read_info(tiny_dataset)
    classifier = _save_pretrained(tmp_path, "trunk", info)
    backbone = {**TRUNK, "pretrained": "trunk", "fpn_channels": 16}
    if name == "detr":
        cfg = {"backbone": backbone, "hidden_dim": 32, "nheads": 4, "enc_layers": 1, "dec_layers": 1}
    else:
        cfg = {"backbone": {**backbone, "levels": 2}, "anchor_sizes": [16, 32]}
    method = create_method(name, cfg, source="test", key=f"runs.{name}.config")
    state, checksum = load_trunk(tmp_path, method.pretrained_trunk(), source="test", key="k")
    assert len(checksum) == 16
    torch.manual_seed(0)
    fresh = method.build(info)
    torch.manual_seed(0)
    model = method.build(info)
    method.trunk(model).load_state_dict(state)
    for key, value in method.trunk(model).state_dict().items():
        assert torch.equal(value, classifier.body.state_dict()[key]), key
    trunk_ids = {id(p) for p in method.trunk(model).parameters()}
    for (pname, p), q in zip(model.named_parameters(), fresh.parameters(), strict=True):
        if id(p) not in trunk_ids:  # heads, neck and transformer keep their own initialisation
            assert torch.equal(p, q), pname


def test_architecture_mismatch_is_a_config_error_naming_the_field(tiny_dataset, tmp_path):
    _save_pretrained(tmp_path, "trunk", read_info(tiny_dataset))
    method = create_method(
        "detr", {"backbone": {**TRUNK, "widths": [8, 32], "pretrained": "trunk"}}, source="p.yaml", key="runs.d.config"
    )
    with pytest.raises(ConfigError, match=r"runs\.d\.config\.backbone\.pretrained.*\[8, 32\].*\[8, 16\]"):
        load_trunk(tmp_path, method.pretrained_trunk(), source="p.yaml", key="runs.d.config.backbone.pretrained")


def test_missing_pretrained_model_says_which_stage_makes_it(tmp_path):
    method = create_method("detr", {"backbone": {**TRUNK, "pretrained": "trunk"}}, source="p", key="k")
    with pytest.raises(ConfigError, match=r"no pretrained model at .*trunk/model\.pt.*dvc repro pretrain@trunk"):
        load_trunk(tmp_path, method.pretrained_trunk(), source="p", key="runs.d.config.backbone.pretrained")


def test_run_naming_an_unknown_pretrain_entry_is_rejected_at_load(params):
    p = copy.deepcopy(params)
    p["runs"]["detr"]["config"]["backbone"]["pretrained"] = "nope"
    with pytest.raises(ConfigError, match=r"runs\.detr\.config\.backbone\.pretrained: no pretrain entry 'nope'"):
        load_run_spec(p, "detr")


def test_pretrain_entries_cannot_chain(params):
    p = copy.deepcopy(params)
    (name, entry), *_ = p["pretrain"].items()
    entry["config"]["backbone"]["pretrained"] = name
    with pytest.raises(ConfigError, match=rf"pretrain\.{name}\.config\.backbone\.pretrained: .*another"):
        load_run_spec(p, name, kind="pretrain")


def test_backbone_lr_ratio_scales_only_the_trunk(tiny_dataset):
    method = create_method(
        "detr", {"backbone": TRUNK, "hidden_dim": 32, "nheads": 4, "backbone_lr_ratio": 0.1}, source="t", key="k"
    )
    model = method.build(read_info(tiny_dataset))
    opt = build_optimizer(model, OptimizerConfig(name="adamw", lr=1e-3), method.param_groups(model))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 1e-4])
    assert {id(p) for p in opt.param_groups[1]["params"]} == {id(p) for p in method.trunk(model).parameters()}
    sched = build_scheduler(opt, SchedulerConfig(name="cosine"), epochs=2, steps_per_epoch=2)
    opt.step()
    sched.step()
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs[1] / lrs[0] == pytest.approx(0.1)  # the schedule keeps the ratio


def test_parameter_groups_must_cover_every_parameter_once():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    first, second = list(model[0].parameters()), list(model[1].parameters())
    with pytest.raises(ValueError, match="exactly once"):
        build_optimizer(model, OptimizerConfig(), [(first, 1.0)])
    with pytest.raises(ValueError, match="exactly once"):
        build_optimizer(model, OptimizerConfig(), [(first + second, 1.0), (first, 0.1)])
