"""params.yaml validation: every error names the file and the offending key."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest

from components.config import ConfigError, from_dict, load_yaml
from components.methods import RegistryError
from components.training.driver import load_platform
from components.training.spec import load_run_spec


def test_real_params_validate(params):
    for run in params["runs"]:
        spec = load_run_spec(params, run)
        spec.create_method()  # the method's config validates too
        assert spec.training.epochs >= 0  # 0: a baseline row of the untrained model
    for name in params["pretrain"]:
        assert load_run_spec(params, name, kind="pretrain").training.epochs >= 1
    load_platform(params)


def test_unknown_method_lists_available(params):
    p = copy.deepcopy(params)
    p["runs"]["classifier"]["method"] = "clasifier"
    with pytest.raises(RegistryError) as err:
        load_run_spec(p, "classifier").create_method()
    assert "'clasifier'" in str(err.value) and "classifier" in str(err.value).split("available")[1]


def test_unknown_key_in_method_config_names_key_and_file(params):
    p = copy.deepcopy(params)
    p["runs"]["classifier"]["config"]["widthz"] = [8]
    with pytest.raises(ConfigError) as err:
        load_run_spec(p, "classifier", "params.yaml")
    assert "params.yaml: runs.classifier.config.widthz: unknown key" in str(err.value)


def test_unknown_key_in_training_override(params):
    p = copy.deepcopy(params)
    p["runs"]["classifier_gc"]["training"]["optimizer"]["gradient_centralisation"] = True
    with pytest.raises(ConfigError, match=r"runs\.classifier_gc\.training\.optimizer\.gradient_centralisation"):
        load_run_spec(p, "classifier_gc")


def test_bad_type_names_key(params):
    p = copy.deepcopy(params)
    p["training"]["epochs"] = "ten"
    with pytest.raises(ConfigError) as err:
        load_run_spec(p, "classifier")
    assert err.value.key == "training.epochs" and "expected int" in str(err.value)

    p = copy.deepcopy(params)
    p["runs"]["classifier"]["config"]["widths"] = [16, "32", 64]
    with pytest.raises(ConfigError, match=r"runs\.classifier\.config\.widths\[1\]: expected int"):
        load_run_spec(p, "classifier")

    p = copy.deepcopy(params)
    p["training"]["optimizer"]["gradient_centralization"] = "yes"
    with pytest.raises(ConfigError, match=r"training\.optimizer\.gradient_centralization: expected bool"):
        load_run_spec(p, "classifier")


def test_literal_and_validate_errors(params):
    p = copy.deepcopy(params)
    p["training"]["optimizer"]["name"] = "adam"
    with pytest.raises(ConfigError, match=r"training\.optimizer\.name: expected one of \['sgd', 'adamw'\]"):
        load_run_spec(p, "classifier")
    p = copy.deepcopy(params)
    p["training"]["batch_size"] = 65
    p["training"]["scaling"]["num_workers"] = 2
    with pytest.raises(ConfigError, match="not divisible by scaling.num_workers"):
        load_run_spec(p, "classifier")
    p = copy.deepcopy(params)
    p["runs"]["classifier"]["seeds"] = [0, 1, 0]
    with pytest.raises(ConfigError, match=r"runs\.classifier: seeds must be distinct, got \[0, 1, 0\]"):
        load_run_spec(p, "classifier")
    p["runs"]["classifier"]["seeds"] = []
    with pytest.raises(ConfigError, match=r"runs\.classifier: seeds must list at least one seed"):
        load_run_spec(p, "classifier")
    p["runs"]["classifier"]["seeds"] = ["a"]
    with pytest.raises(ConfigError, match=r"runs\.classifier\.seeds"):
        load_run_spec(p, "classifier")
    p = copy.deepcopy(params)
    p["training"]["epochs"] = -1
    with pytest.raises(ConfigError, match=r"epochs must be >= 0"):
        load_run_spec(p, "classifier")
    p["training"].update(epochs=2, eval_every=0)
    with pytest.raises(ConfigError, match=r"eval_every must be >= 1"):
        load_run_spec(p, "classifier")


def test_unknown_run_and_unknown_top_key_in_run(params):
    with pytest.raises(ConfigError, match=r"runs\.nope: no such run"):
        load_run_spec(params, "nope")
    p = copy.deepcopy(params)
    p["runs"]["classifier"]["epochs"] = 3
    with pytest.raises(ConfigError, match=r"runs\.classifier\.epochs: unknown key"):
        load_run_spec(p, "classifier")


def test_platform_unknown_key(params):
    p = copy.deepcopy(params)
    p["mlflow"]["tracking_url"] = "http://x"
    with pytest.raises(ConfigError, match=r"params\.yaml: mlflow\.tracking_url: unknown key"):
        load_platform(p)


def test_yaml_file_errors_name_file(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("runs: [unclosed\n")
    with pytest.raises(ConfigError, match=r"p\.yaml: malformed YAML"):
        load_yaml(bad)
    bad.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_yaml(bad)
    with pytest.raises(ConfigError, match="file not found"):
        load_yaml(tmp_path / "missing.yaml")


@dataclass
class _Inner:
    x: float = 1.0


@dataclass
class _Outer:
    name: str
    inner: _Inner = field(default_factory=_Inner)
    maybe: int | None = None


def test_from_dict_types():
    obj = from_dict(_Outer, {"name": "a", "inner": {"x": 2}, "maybe": None}, source="s")
    assert obj.inner.x == 2.0 and isinstance(obj.inner.x, float)
    assert from_dict(_Inner, {"x": "1e-3"}, source="s").x == 1e-3
    with pytest.raises(ConfigError, match="s: name: missing required key"):
        from_dict(_Outer, {}, source="s")
    with pytest.raises(ConfigError, match=r"maybe: expected int or NoneType, got 1\.5"):
        from_dict(_Outer, {"name": "a", "maybe": 1.5}, source="s")
    with pytest.raises(ConfigError, match=r"inner\.x: expected float, got True"):
        from_dict(_Outer, {"name": "a", "inner": {"x": True}}, source="s")


def test_seeds_make_one_run_each_and_a_group_of_them(params):
    p = copy.deepcopy(params)
    p["runs"]["classifier"]["seeds"] = [0, 1, 2]
    spec = load_run_spec(p, "classifier")
    assert spec.seed_list == [0, 1, 2] and [spec.for_seed(s).training.seed for s in (0, 1, 2)] == [0, 1, 2]
    assert spec.training.seed == params["training"]["seed"]  # for_seed copies, it does not edit
    fps = {spec.for_seed(s).fingerprint("data") for s in (0, 1, 2)}
    assert len(fps) == 3  # each seed resumes its own run
    one = copy.deepcopy(params)
    one["runs"]["classifier"].pop("seeds", None)
    single = load_run_spec(one, "classifier")
    assert single.seed_list == [single.training.seed]
    # a seed's run is the run it was before seeds existed: unfinished runs still resume
    assert single.for_seed(single.training.seed).fingerprint("data") == single.fingerprint("data")
    assert spec.for_seed(0).fingerprint("data") == single.fingerprint("data")
    # the group is its seeds: another list is another group
    assert spec.group_fingerprint("data") != single.group_fingerprint("data")
    assert spec.group_fingerprint("data") == load_run_spec(p, "classifier").group_fingerprint("data")
