"""The statistics every stage reports, in one place and on ``scipy.stats``.

- :func:`mean_ci`: mean with a two-sided Student-t interval (seeds, questions, rows);
- :func:`wilson`: Wilson score interval of a proportion (sensible at 0 and 1, unlike the normal one);
- :func:`bootstrap_ci`: one seeded percentile bootstrap, over one or several independent samples,
  used by the poison stage's amplification ratio and, through :func:`group_bootstrap_ci`, by the
  probes' row-level (cluster) intervals;
- :func:`auc`: area under the ROC curve by the rank-sum (Mann-Whitney) formula.

Why a hand-written bootstrap loop rather than ``scipy.stats.bootstrap``: the statistics bootstrapped
here are undefined on some resamples (an AUC of a resample with one class, a ratio whose
denominator resampled to 0). Those resamples are dropped and counted; scipy's bootstrap would turn
the whole interval into NaN instead. The loop draws every resample up front from one
``numpy.random.default_rng(seed)``, so an interval is a pure function of the data and the seed.

scipy is imported inside the functions: the CLI imports every stage module to build its parser.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95


def t_quantile(p: float, df: float) -> float:
    """Quantile ``p`` of Student's t with ``df`` degrees of freedom."""
    from scipy.stats import t

    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    return float(t.ppf(p, df))


def mean_ci(values: Sequence[float], level: float = LEVEL) -> tuple[float, float, float]:
    """Mean and two-sided t-interval: ``(mean, lo, hi)``. One value gives ``(v, nan, nan)``,
    because no interval can be claimed from a single seed or question."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_ci of no values")
    n = len(vals)
    m = sum(vals) / n
    if n < 2:
        return m, float("nan"), float("nan")
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (n - 1))
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return m, m - half, m + half


def wilson(k: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval of ``k`` successes in ``n`` trials; ``(0, 1)`` when ``n`` is 0 (no
    trial says nothing)."""
    from scipy.stats import binomtest

    if n == 0:
        return (0.0, 1.0)
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return (max(0.0, float(ci.low)), min(1.0, float(ci.high)))


@dataclass(frozen=True)
class BootstrapCI:
    """A percentile interval and how many resamples had a defined statistic (``n_valid``)."""

    lo: float
    hi: float
    n_valid: int
    n_boot: int


def bootstrap_ci(statistic: Callable[..., float], sizes: Sequence[int], *, n_boot: int, seed: int,
                 level: float = LEVEL) -> BootstrapCI:
    """Percentile bootstrap of ``statistic`` over independent samples of the given ``sizes``.

    Each resample draws, per sample, ``size`` indices with replacement and calls
    ``statistic(idx_0, idx_1, ...)`` with those index arrays; a NaN or infinite value marks the
    resample as undefined and it is left out (``n_valid`` counts the rest). Resamples are drawn
    sample by sample, all ``n_boot`` at once, from ``default_rng(seed)``."""
    if n_boot <= 0 or not sizes or min(sizes) <= 0:
        return BootstrapCI(float("nan"), float("nan"), 0, max(0, n_boot))
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, n, (n_boot, n)) for n in sizes]
    vals = np.array([statistic(*(d[r] for d in draws)) for r in range(n_boot)], dtype=float)
    ok = vals[np.isfinite(vals)]
    if len(ok) == 0:
        return BootstrapCI(float("nan"), float("nan"), 0, n_boot)
    lo, hi = np.quantile(ok, [(1 - level) / 2, (1 + level) / 2])
    return BootstrapCI(float(lo), float(hi), int(len(ok)), n_boot)


def group_bootstrap_ci(groups: Sequence[str], statistic: Callable[[np.ndarray], float], *, n_boot: int,
                       seed: int, level: float = LEVEL) -> BootstrapCI:
    """Cluster bootstrap: resample whole groups (e.g. the sites of one row together, since they
    share context) and call ``statistic`` on the member indices of the resampled groups."""
    uniq = sorted(set(groups))
    members: dict[str, list[int]] = {u: [] for u in uniq}
    for i, g in enumerate(groups):
        members[g].append(i)
    idx_of = [np.asarray(members[u], dtype=np.int64) for u in uniq]

    def on_groups(pick: np.ndarray) -> float:
        return statistic(np.concatenate([idx_of[j] for j in pick]))

    return bootstrap_ci(on_groups, [len(uniq)], n_boot=n_boot, seed=seed, level=level)


def ratio_of_means_ci(a: Sequence[float], b: Sequence[float], *, n_boot: int = 2000, seed: int = 0,
                      level: float = LEVEL) -> dict[str, float | int | None]:
    """``mean(a) / mean(b)`` with a percentile bootstrap interval, ``a`` and ``b`` resampled
    independently. The ratio is None when ``mean(b)`` is 0; the interval is None when fewer than
    half the resamples have a positive denominator (the ratio is then not estimable)."""
    a_, b_ = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a_) == 0 or len(b_) == 0:
        return {"ratio": None, "lo": None, "hi": None, "n_boot": 0}
    point = float(a_.mean() / b_.mean()) if b_.mean() > 0 else None

    def ratio(ia: np.ndarray, ib: np.ndarray) -> float:
        den = b_[ib].mean()
        return a_[ia].mean() / den if den > 0 else float("nan")

    ci = bootstrap_ci(ratio, [len(a_), len(b_)], n_boot=n_boot, seed=seed, level=level)
    if ci.n_valid < n_boot * 0.5:
        return {"ratio": point, "lo": None, "hi": None, "n_boot": ci.n_valid}
    return {"ratio": point, "lo": ci.lo, "hi": ci.hi, "n_boot": ci.n_valid}


def auc(scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counted half
    (average ranks); NaN when one class is absent."""
    from scipy.stats import rankdata

    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r_pos = float(rankdata(s)[y].sum())
    return (r_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
