"""Statistics of a comparison over seeds, in the form of Agarwal et al., "Deep Reinforcement
Learning at the Edge of the Statistical Precipice" (NeurIPS 2021, arXiv:2108.13264; `rliable`):

- the mean with a 95% percentile-bootstrap interval over seeds (with one task per row the
  stratified bootstrap is the plain one), by ``scipy.stats.bootstrap``;
- the interquartile mean (IQM, the mean of the middle 50%) once there are 4 seeds or more;
- the probability of improvement P(X > Y) + P(X = Y) / 2, the Mann-Whitney U statistic over the
  n·m pairs of seeds (``scipy.stats.mannwhitneyu``);
- a sentence that claims only what the intervals support.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 2000
IQM_MIN_N = 4


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int
    iqm: float | None = None  # n >= IQM_MIN_N only

    def disjoint_from(self, other: Interval) -> bool:
        return self.high < other.low or other.high < self.low


def interval(values, confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """Mean of ``values`` (one per seed) and its bootstrap confidence interval. One value, or
    values all equal, give a point: nothing to resample."""
    from scipy import stats

    x = np.asarray([float(v) for v in values], dtype=float)
    if x.size == 0:
        raise ValueError("no values: a mean needs at least one seed")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"values must be finite numbers, got {x.tolist()}")
    mean = float(x.mean())
    iqm = float(stats.trim_mean(x, 0.25)) if x.size >= IQM_MIN_N else None
    if np.all(x == x[0]):  # one seed, or all alike: the value itself, exactly
        point = float(x[0])
        return Interval(point, point, point, int(x.size), point if iqm is not None else None)
    result = stats.bootstrap(
        (x,),
        np.mean,
        confidence_level=confidence,
        n_resamples=resamples,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    ci = result.confidence_interval
    return Interval(mean, float(ci.low), float(ci.high), int(x.size), iqm)


def probability_of_improvement(x, y, higher_is_better: bool = True) -> float:
    """P(a seed of X beats a seed of Y), ties counting half: U / (n·m), Mann-Whitney's U of X."""
    from scipy import stats

    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.size == 0 or b.size == 0:
        raise ValueError("both sides need at least one seed")
    if not higher_is_better:
        a, b = -a, -b
    u = stats.mannwhitneyu(a, b, alternative="two-sided").statistic
    return float(u) / (a.size * b.size)


def claim(a_name: str, a: Interval, b_name: str, b: Interval, higher_is_better: bool = True) -> str:
    """The claim the two intervals support, and no more."""
    if min(a.n, b.n) < 2:
        n = min(a.n, b.n)
        return f"no claim: n = {n} ({a_name if a.n == n else b_name})"
    if not a.disjoint_from(b):
        return f"no claim: {a_name} and {b_name} overlap"
    a_better = (a.mean > b.mean) == higher_is_better
    best, rest = (a_name, b_name) if a_better else (b_name, a_name)
    return f"{best} > {rest}, intervals disjoint"


def fmt(iv: Interval, digits: int = 3) -> str:
    """``0.812 [0.801, 0.823]`` (a point shows no interval)."""
    if math.isclose(iv.low, iv.high):
        return f"{iv.mean:.{digits}f}"
    return f"{iv.mean:.{digits}f} [{iv.low:.{digits}f}, {iv.high:.{digits}f}]"
