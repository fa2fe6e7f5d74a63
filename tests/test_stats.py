"""subliminal.stats against known values: textbook t quantiles, a Wilson interval from its
formula, the rank-sum AUC, and the seeded percentile bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest

from subliminal import stats

# Two-sided 95% critical values of Student's t (upper 2.5% point), as printed in t tables.
T_TABLE_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 10: 2.228, 20: 2.086, 30: 2.042, 100: 1.984}


@pytest.mark.parametrize("df,value", sorted(T_TABLE_975.items()))
def test_t_quantile_matches_the_table(df: int, value: float) -> None:
    assert stats.t_quantile(0.975, df) == pytest.approx(value, abs=5e-4)
    assert stats.t_quantile(0.025, df) == pytest.approx(-value, abs=5e-4)


def test_t_quantile_rejects_p_outside_the_unit_interval() -> None:
    with pytest.raises(ValueError, match="p must be in"):
        stats.t_quantile(1.0, 3)


def test_mean_ci_is_the_t_interval() -> None:
    m, lo, hi = stats.mean_ci([1.0, 2.0, 3.0])  # sd 1, n 3, t(0.975, 2) = 4.302653
    half = 4.302652729749464 / math.sqrt(3)
    assert (m, lo, hi) == pytest.approx((2.0, 2.0 - half, 2.0 + half), abs=1e-9)
    m, lo, hi = stats.mean_ci([0.5])
    assert m == 0.5 and math.isnan(lo) and math.isnan(hi)
    m, lo, hi = stats.mean_ci([0.2, 0.2, 0.2])
    assert (lo, hi) == pytest.approx((0.2, 0.2))
    with pytest.raises(ValueError, match="no values"):
        stats.mean_ci([])


def test_wilson_matches_its_formula() -> None:
    k, n, z = 7, 20, 1.959963984540054  # z: the 97.5% point of the standard normal
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    assert stats.wilson(k, n) == pytest.approx((mid - half, mid + half), abs=1e-12)
    assert stats.wilson(k, n) == pytest.approx((0.1812, 0.5671), abs=1e-4)  # 7/20 = 0.35


def test_wilson_at_the_edges() -> None:
    lo, hi = stats.wilson(0, 50)
    assert lo == 0.0 and hi == pytest.approx(0.0713, abs=1e-4)  # z^2 / (n + z^2)
    lo, hi = stats.wilson(50, 50)
    assert hi == 1.0 and lo == pytest.approx(1 - 0.0713, abs=1e-4)
    assert stats.wilson(0, 0) == (0.0, 1.0)


def test_auc_rank_sum() -> None:
    assert stats.auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert stats.auc([1.0, 1.0, 1.0, 1.0], [0, 0, 1, 1]) == pytest.approx(0.5)  # ties count half
    assert stats.auc([3.0, 2.0, 1.0], [1, 1, 0]) == pytest.approx(1.0)
    assert stats.auc([0.2, 0.9, 0.5], [True, False, True]) == pytest.approx(0.0)
    assert math.isnan(stats.auc([0.1, 0.2], [1, 1]))


def test_bootstrap_is_a_function_of_the_seed() -> None:
    x = np.random.default_rng(0).normal(size=40)

    def mean(ix: np.ndarray) -> float:
        return float(x[ix].mean())

    a = stats.bootstrap_ci(mean, [len(x)], n_boot=300, seed=3)
    b = stats.bootstrap_ci(mean, [len(x)], n_boot=300, seed=3)
    c = stats.bootstrap_ci(mean, [len(x)], n_boot=300, seed=4)
    assert a == b and a != c
    assert a.lo < x.mean() < a.hi and a.n_valid == 300
    assert math.isnan(stats.bootstrap_ci(mean, [len(x)], n_boot=0, seed=0).lo)


def test_bootstrap_drops_undefined_resamples() -> None:
    y = np.array([1, 0, 0, 0, 0, 0])  # many resamples hold no positive

    def rate_of_positives(ix: np.ndarray) -> float:
        return 1.0 if y[ix].any() else float("nan")

    ci = stats.bootstrap_ci(rate_of_positives, [len(y)], n_boot=500, seed=0)
    # P(no positive in 6 draws) = (5/6)^6 = 0.335: about a third are dropped
    assert 0.55 * 500 < ci.n_valid < 0.78 * 500 and ci.lo == ci.hi == 1.0


def test_group_bootstrap_resamples_whole_groups() -> None:
    groups = ["a", "a", "b", "b", "c", "c"]
    vals = np.array([0.0, 0.0, 1.0, 1.0, 2.0, 2.0])
    seen: list[np.ndarray] = []

    def mean(ix: np.ndarray) -> float:
        seen.append(np.sort(ix))
        return float(vals[ix].mean())

    stats.group_bootstrap_ci(groups, mean, n_boot=200, seed=0)
    assert len(seen) == 200
    for ix in seen:  # a row's two sites always come together
        assert len(ix) == 6 and all((ix[k] // 2) == (ix[k + 1] // 2) for k in range(0, 6, 2))


def test_ratio_of_means_ci() -> None:
    r = stats.ratio_of_means_ci([1.0] * 30 + [0.0] * 10, [1.0] * 10 + [0.0] * 30, seed=0)
    # the numbers of the poison stage's earlier bootstrap (same draws, same percentile rule)
    assert r == {"ratio": 3.0, "lo": pytest.approx(1.8823529411764708), "hi": pytest.approx(6.2), "n_boot": 2000}
    assert stats.ratio_of_means_ci([1.0], [0.0, 0.0])["ratio"] is None
    zero = stats.ratio_of_means_ci([1.0] * 5, [0.0] * 3, seed=0)  # no resample has a positive denominator
    assert zero == {"ratio": None, "lo": None, "hi": None, "n_boot": 0}
    sparse = stats.ratio_of_means_ci([1.0] * 5, [1.0] + [0.0] * 39, seed=0)  # (39/40)^40: a third undefined
    assert sparse["ratio"] == 40.0 and sparse["lo"] is not None and 1100 < sparse["n_boot"] < 1450
    assert stats.ratio_of_means_ci([], [1.0])["n_boot"] == 0
