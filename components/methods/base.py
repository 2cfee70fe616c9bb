"""The method contract and registry.

A method is one module in ``components/methods``: a typed config dataclass and a
:class:`Method` subclass registered by name. The generic training loop only talks to this
interface, so it never imports a specific method::

    method = create_method("classifier", params_section, source="params.yaml", key="runs.x.config")
    model = method.build(dataset_info)
    losses = method.training_step(model, batch)      # dict of named loss tensors, summed by the loop
    predictions = method.predict(model, batch)        # the task family's prediction format
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

from components.config import from_dict
from components.data.canonical import DatasetInfo

_METHODS: dict[str, type[Method]] = {}


class RegistryError(KeyError):
    """Unknown or duplicate method name."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


class Method(ABC):
    """Base class of every method; subclasses set ``name``, ``task``, ``paper`` and ``Config``."""

    name: ClassVar[str]
    task: ClassVar[str]  # task family name, e.g. "classification"
    paper: ClassVar[str]  # arXiv id of the paper the method follows
    Config: ClassVar[type]

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    @abstractmethod
    def build(self, info: DatasetInfo) -> nn.Module:
        """The model, randomly initialised. State that must survive restarts lives in buffers."""

    @abstractmethod
    def training_step(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """Named loss tensors for one batch; the loop back-propagates their sum."""

    @abstractmethod
    def predict(self, model: nn.Module, batch: Any) -> Any:
        """Predictions in the task family's format (for its evaluator)."""

    def example_input(self, info: DatasetInfo) -> torch.Tensor:
        """An input batch of one, used for the logged model's signature."""
        h, w = info.image_size
        return torch.zeros(1, info.in_channels, h, w)

    def pretrained_trunk(self) -> Any | None:
        """The ``BackboneConfig`` whose ``pretrained`` entry initialises this model's trunk, or
        None (random init). Methods with a ``backbone`` config field get this for free."""
        backbone = getattr(self.cfg, "backbone", None)
        return backbone if getattr(backbone, "pretrained", None) else None

    def trunk(self, model: nn.Module) -> nn.Module:
        """The module a pretrained trunk's state dict loads into."""
        raise NotImplementedError(f"method {self.name!r} has no pretrainable trunk")

    def param_groups(self, model: nn.Module) -> list[tuple[list[nn.Parameter], float]]:
        """Trainable parameters in groups, each with its learning-rate multiplier."""
        return [([p for p in model.parameters() if p.requires_grad], 1.0)]

    def search_space(self) -> dict[str, Any]:
        """Default Tune search space over this method's config keys (empty: nothing to tune)."""
        return {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: register ``cls`` under ``cls.name``; a duplicate name raises."""
    for attr in ("name", "task", "paper", "Config"):
        if not hasattr(cls, attr):
            raise TypeError(f"method class {cls.__qualname__} must define {attr!r}")
    if cls.name in _METHODS:
        other = _METHODS[cls.name]
        raise RegistryError(
            f"method name {cls.name!r} is already registered by {other.__module__}.{other.__qualname__}"
        )
    _METHODS[cls.name] = cls
    return cls


def unregister_method(name: str) -> None:
    _METHODS.pop(name, None)


def _import_method_module(name: str) -> None:
    from components.methods import METHOD_MODULES

    if name in METHOD_MODULES:
        importlib.import_module(f"components.methods.{METHOD_MODULES[name]}")


def get_method_class(name: str) -> type[Method]:
    """The class registered under ``name``, importing its module on first use."""
    if name not in _METHODS:
        _import_method_module(name)
    try:
        return _METHODS[name]
    except KeyError:
        raise RegistryError(f"unknown method {name!r}; available methods: {', '.join(available_methods())}") from None


def available_methods() -> list[str]:
    """Every method: those in ``components.methods.METHOD_MODULES`` and any registered since."""
    from components.methods import METHOD_MODULES

    for name in METHOD_MODULES:
        _import_method_module(name)
    return sorted(_METHODS)


def create_method(name: str, config: dict[str, Any] | None, *, source: str, key: str) -> Method:
    """Look up ``name`` and build it with its config validated from ``config``."""
    cls = get_method_class(name)
    cfg = from_dict(cls.Config, config or {}, source=source, key=key)
    return cls(cfg)
