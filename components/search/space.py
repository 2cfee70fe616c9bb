"""Search spaces declared in ``params.yaml`` and what a sampled point means for a run.

A space maps a dotted key of the run (``training.<...>`` or ``config.<...>``) to one distribution::

    training.optimizer.lr: {loguniform: [1.0e-3, 0.3]}
    training.optimizer.weight_decay: {loguniform: [1.0e-5, 1.0e-3]}
    training.batch_size: {choice: [32, 64, 128]}
    config.label_smoothing: {uniform: [0.0, 0.2]}
    config.dropout: {quniform: [0.0, 0.5, 0.1]}

``training.augment`` takes a policy space instead, expanded into one parameter per decision:

- ``{policy_space: subpolicies, sub_policies: 5, ops_per_sub_policy: 2, ops: [...]}``: AutoAugment's
  space (arXiv 1805.09501): every stage picks an op, a probability and a magnitude, both on
  AutoAugment's grid of tenths;
- ``{policy_space: randaugment, n: [1, 3]}``: RandAugment's two numbers (arXiv 1909.13719), N in
  the range and M on a grid of twentieths;
- ``{policy_space: pba, ops: [...]}``: PBA's (arXiv 1905.05393), a probability and a magnitude
  per op, all starting at 0, explored by Population Based Training only.
"""

from __future__ import annotations

from typing import Any

from components.augment.ops import OPS
from components.config import ConfigError

DISTRIBUTIONS = ("uniform", "loguniform", "quniform", "randint", "choice")
POLICY_SPACES = ("subpolicies", "randaugment", "pba")
AUGMENT_KEY = "training.augment"
PREFIX = "augment."  # Tune parameter names of the expanded policy space


def tune_space(space: dict[str, Any], algorithm: str, source: str, key: str) -> dict[str, Any]:
    """The Ray Tune ``param_space`` for ``space`` (errors name ``key`` and the entry)."""
    from ray import tune

    out: dict[str, Any] = {}
    for name, spec in space.items():
        where = f"{key}.{name}"
        if name == AUGMENT_KEY:
            out.update(_policy_space(spec, algorithm, source, where))
            continue
        if not name.startswith(("training.", "config.")):
            raise ConfigError(source, where, "a searched key starts with training. or config.")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise ConfigError(source, where, f"expected one of {{{', '.join(DISTRIBUTIONS)}: [...]}}, got {spec!r}")
        kind, args = next(iter(spec.items()))
        if not isinstance(args, list) or not args:
            raise ConfigError(source, f"{where}.{kind}", f"expected a non-empty list, got {args!r}")
        if kind == "choice":
            out[name] = tune.choice(list(args))
            continue
        expected = 3 if kind == "quniform" else 2
        if len(args) != expected or not all(isinstance(a, (int, float)) for a in args):
            raise ConfigError(source, f"{where}.{kind}", f"expected {expected} numbers, got {args!r}")
        lo, hi = args[0], args[1]
        if not lo < hi or (kind == "loguniform" and lo <= 0):
            reason = f"expected low < high (and low > 0 for loguniform), got {args!r}"
            raise ConfigError(source, f"{where}.{kind}", reason)
        if kind == "uniform":
            out[name] = tune.uniform(float(lo), float(hi))
        elif kind == "loguniform":
            out[name] = tune.loguniform(float(lo), float(hi))
        elif kind == "quniform":
            out[name] = tune.quniform(float(lo), float(hi), float(args[2]))
        else:  # randint: both ends included, unlike Tune's
            out[name] = tune.randint(int(lo), int(hi) + 1)
    return out


def _policy_space(spec: Any, algorithm: str, source: str, where: str) -> dict[str, Any]:
    from ray import tune

    if not isinstance(spec, dict) or spec.get("policy_space") not in POLICY_SPACES:
        raise ConfigError(source, f"{where}.policy_space", f"expected one of {list(POLICY_SPACES)}, got {spec!r}")
    kind = spec["policy_space"]
    allowed = {"policy_space", "ops", *{"subpolicies": ("sub_policies", "ops_per_sub_policy"),
                                        "randaugment": ("n",), "pba": ()}[kind]}  # fmt: skip
    unknown = sorted(set(spec) - allowed)
    if unknown:
        reason = f"unknown key for {kind} (known: {', '.join(sorted(allowed))})"
        raise ConfigError(source, f"{where}.{unknown[0]}", reason)
    ops = spec.get("ops", list(OPS))
    bad = [op for op in ops if op not in OPS] if isinstance(ops, list) else [ops]
    if bad or not ops:
        raise ConfigError(source, f"{where}.ops", f"unknown op {bad[0] if bad else None!r}; known: {', '.join(OPS)}")
    if (kind == "pba") != (algorithm == "pbt"):
        raise ConfigError(source, f"{where}.policy_space", "the pba policy space is searched by algorithm pbt only")
    grid = tune.quniform(0.0, 1.0, 0.1)
    if kind == "subpolicies":
        count, stages = spec.get("sub_policies", 5), spec.get("ops_per_sub_policy", 2)
        for field, value in (("sub_policies", count), ("ops_per_sub_policy", stages)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(source, f"{where}.{field}", f"expected an int >= 1, got {value!r}")
        out: dict[str, Any] = {f"{PREFIX}kind": kind}
        for i in range(count):
            for j in range(stages):
                out[f"{PREFIX}{i}.{j}.op"] = tune.choice(list(ops))
                out[f"{PREFIX}{i}.{j}.prob"] = grid
                out[f"{PREFIX}{i}.{j}.magnitude"] = grid
        return out
    if kind == "randaugment":
        n = spec.get("n", [1, 3])
        if not (isinstance(n, list) and len(n) == 2 and all(isinstance(v, int) for v in n) and 0 <= n[0] <= n[1]):
            raise ConfigError(source, f"{where}.n", f"expected [low, high] ints, 0 <= low <= high, got {n!r}")
        m = tune.quniform(0.0, 1.0, 0.05)
        return {f"{PREFIX}kind": kind, f"{PREFIX}n": tune.randint(n[0], n[1] + 1), f"{PREFIX}m": m}
    # PBA: everything starts at zero (no augmentation); PBT's exploration moves it.
    out = {f"{PREFIX}kind": kind}
    for op in ops:
        out[f"{PREFIX}{op}.prob"] = 0.0
        out[f"{PREFIX}{op}.magnitude"] = 0.0
    return out


def overrides(config: dict[str, Any]) -> dict[str, Any]:
    """A sampled point (Tune's ``config``) as run overrides ``{"config": ..., "training": ...}``."""
    out: dict[str, Any] = {}
    for name, value in config.items():
        if name.startswith(PREFIX):
            continue
        node = out
        *parents, leaf = name.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    if f"{PREFIX}kind" in config:
        out.setdefault("training", {})["augment"] = assemble_policy(config)
    return out


def assemble_policy(config: dict[str, Any]) -> dict[str, Any]:
    """The ``training.augment`` dict a sampled point of a policy space stands for."""
    kind = config[f"{PREFIX}kind"]
    if kind == "randaugment":
        return {"kind": "randaugment", "n": int(config[f"{PREFIX}n"]), "m": float(config[f"{PREFIX}m"])}
    if kind == "pba":
        ops = [k[len(PREFIX) : -len(".prob")] for k in config if k.startswith(PREFIX) and k.endswith(".prob")]
        step = [
            {
                "op": op,
                "prob": float(config[f"{PREFIX}{op}.prob"]),
                "magnitude": float(config[f"{PREFIX}{op}.magnitude"]),
            }
            for op in ops
        ]
        return {"kind": "pba", "schedule": [{"from_fraction": 0.0, "ops": step}]}
    stages: dict[int, dict[int, dict[str, Any]]] = {}
    for name, value in config.items():
        parts = name[len(PREFIX) :].split(".")
        if name.startswith(PREFIX) and len(parts) == 3:
            i, j, field = int(parts[0]), int(parts[1]), parts[2]
            stages.setdefault(i, {}).setdefault(j, {})[field] = value if field == "op" else round(float(value), 6)
    return {"kind": "subpolicies", "sub_policies": [[stages[i][j] for j in sorted(stages[i])] for i in sorted(stages)]}


def first_point(param_space: dict[str, Any]) -> dict[str, Any]:
    """A point of the space (lower bounds, first choices) to validate the keys before any trial."""
    from ray.tune.search.sample import Categorical, Domain

    point = {}
    for name, domain in param_space.items():
        if isinstance(domain, Categorical):
            point[name] = domain.categories[0]
        elif isinstance(domain, Domain):
            point[name] = domain.lower
        else:
            point[name] = domain
    return point


def method_space(method_space: dict[str, Any]) -> dict[str, Any]:
    """A method's default space (``Method.search_space()``: ``{key: {"type": "uniform", "low": a,
    "high": b}}`` over its config keys; ``choice`` takes ``values``) in the params syntax above."""
    out: dict[str, Any] = {}
    for key, spec in method_space.items():
        kind = spec["type"]
        out[f"config.{key}"] = {kind: list(spec["values"]) if kind == "choice" else [spec["low"], spec["high"]]}
    return out
