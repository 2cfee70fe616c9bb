"""Trunk weights from a ``pretrain`` entry of params.yaml.

``pretrain@<name>`` trains a classifier whose network is a detection trunk (``body``) with a
pooled linear head and writes ``pretrained/<name>/model.pt`` with the resolved ``config.yaml``
beside it. A run whose ``config.backbone.pretrained`` is ``<name>`` starts from that trunk: the
driver reads it here, checks the architecture matches, and the workers load it into the fresh
model before training. Only the trunk is taken; heads stay randomly initialised.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import torch
import yaml

from components.config import ConfigError, from_dict
from components.models.fpn import BackboneConfig

PRETRAINED_ROOT = Path("pretrained")
MODEL_FILE = "model.pt"
CONFIG_FILE = "config.yaml"
TRUNK_PREFIX = "body."


def load_trunk(
    root: str | Path, backbone: BackboneConfig, *, source: str, key: str
) -> tuple[dict[str, torch.Tensor], str]:
    """The trunk state dict of pretrain entry ``backbone.pretrained`` and a checksum of its file.

    Errors are ``ConfigError``s naming ``source`` and ``key`` (the ``pretrained`` field).
    """
    name = backbone.pretrained
    folder = Path(root) / str(name)
    model_path, config_path = folder / MODEL_FILE, folder / CONFIG_FILE
    if not model_path.is_file() or not config_path.is_file():
        raise ConfigError(
            source, key, f"no pretrained model at {model_path}; train it first with `dvc repro pretrain@{name}`"
        )
    trained = (yaml.safe_load(config_path.read_text()) or {}).get("config", {}).get("backbone")
    if trained is None:
        raise ConfigError(source, key, f"{config_path} has no config.backbone: {name!r} did not train a trunk")
    theirs = from_dict(BackboneConfig, trained, source=str(config_path), key="config.backbone").architecture()
    mine = backbone.architecture()
    if theirs != mine:
        raise ConfigError(source, key, f"this backbone {mine} differs from the one {name!r} was trained with {theirs}")
    blob = model_path.read_bytes()  # read once: checksummed and loaded
    state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    trunk = {k[len(TRUNK_PREFIX) :]: v for k, v in state.items() if k.startswith(TRUNK_PREFIX)}
    if not trunk:
        raise ConfigError(source, key, f"{model_path} holds no {TRUNK_PREFIX}* weights")
    return trunk, hashlib.sha256(blob).hexdigest()[:16]
