"""The paper's claims as verdicts with intervals: one place that decides, from students paired by
seed, whether a condition keeps or removes the all-tokens transfer.

A share of a transfer means something only where the transfer itself is distinguishable from zero;
a ratio over a denominator near zero is how a report ends up printing "keeps 1107%". So every
verdict first asks whether the all-tokens student beats its control (paired 95% interval above
zero); only then is a share estimated, by a paired bootstrap over seeds (the same resampled seeds
in numerator and denominator), and a claim holds or fails only when the share's interval is on one
side of one half. Everything else is "inconclusive", said as such.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .stats import mean_ci

# (condition, the paper's claim, whether the claim is that the condition keeps most of the transfer)
CLAIMS: list[tuple[str, str, bool]] = [
    ("no-divergence", "masking divergence tokens removes most of the transfer", False),
    ("only-divergence", "training only on divergence tokens keeps the transfer", True),
    ("random-matched", "masking as many random non-divergence tokens keeps the transfer", True),
    ("layer-early", "one early layer suffices", True),
    ("paraphrase", "paraphrasing prompts suppresses transfer", False),
    ("mixing", "mixing teachers suppresses transfer", False),
    ("ratio-no-divergence", "masking the ratio rule's flags removes most of the transfer", False),
    ("ratio-only-divergence", "training only on the ratio rule's flags keeps the transfer", True),
    ("ratio-random-matched", "masking as many random tokens as the ratio rule flags keeps the transfer", True),
    # The field's other detectors (issue 26), at the paper rule's share of tokens
    ("shift-no-divergence", "masking the likelihood shift's flags removes most of the transfer", False),
    ("shift-only-divergence", "training only on the likelihood shift's flags keeps the transfer", True),
    ("shift-random-matched", "masking as many random tokens as the likelihood shift flags keeps the transfer", True),
    ("gradient-no-divergence", "masking the gradient attribution's flags removes most of the transfer", False),
    ("gradient-only-divergence", "training only on the gradient attribution's flags keeps the transfer", True),
    ("gradient-random-matched", "masking as many random tokens as gradient attribution flags keeps the transfer",
     True),
    # Interventions on the paper rule's flags (a public Llama-3.2-1B reproduction: replacing removes
    # more than masking, input-only corruption does nothing)
    ("replace-divergence", "replacing the divergence tokens with random numbers removes most of the transfer", False),
    ("replace-random-matched", "replacing as many random tokens keeps the transfer", True),
    ("corrupt-divergence", "corrupting the divergence tokens in the input only (labels kept) keeps the transfer",
     True),
    ("corrupt-random-matched", "corrupting as many random tokens in the input keeps the transfer", True),
]

HOLDS, FAILS, UNCLEAR, NO_TRANSFER = "holds", "fails", "inconclusive", "no transfer to share"

Values = Mapping[str, Mapping[int, float]]


def paired_diff(values: Values, cond: str, ref: str = "control") -> dict[str, Any] | None:
    """Mean and 95% t-interval of ``cond - ref`` over the seeds both have (None below 2 seeds)."""
    seeds = [s for s in sorted(values.get(cond, {})) if s in values.get(ref, {})]
    if len(seeds) < 2:
        return None
    mean, lo, hi = mean_ci([values[cond][s] - values[ref][s] for s in seeds])
    return {"mean": mean, "lo": lo, "hi": hi, "seeds": len(seeds)}


def transfer_is_real(values: Values) -> bool:
    """Whether the all-tokens student beats the control: paired 95% interval above zero."""
    d = paired_diff(values, "all")
    return d is not None and d["lo"] > 0


def paired_share(values: Values, cond: str, *, n_boot: int = 4000, seed: int = 0) -> dict[str, Any] | None:
    """Share of the all-tokens transfer a condition keeps, ``mean(cond - control) / mean(all -
    control)`` over the seeds all three have, with a percentile interval from resampling seeds
    (jointly, so the pairing is kept). None unless the all-tokens transfer is real."""
    if not transfer_is_real(values):
        return None
    seeds = [s for s in sorted(values.get(cond, {})) if s in values["control"] and s in values["all"]]
    if len(seeds) < 2:
        return None
    num = np.array([values[cond][s] - values["control"][s] for s in seeds])
    den = np.array([values["all"][s] - values["control"][s] for s in seeds])
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(seeds), size=(n_boot, len(seeds)))
    d = den[pick].mean(axis=1)
    ok = d > 0
    boot = num[pick].mean(axis=1)[ok] / d[ok]
    point = float(num.mean() / den.mean())
    if ok.sum() < n_boot * 0.5:
        return {"share": point, "lo": None, "hi": None, "seeds": len(seeds)}
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return {"share": point, "lo": float(lo), "hi": float(hi), "seeds": len(seeds)}


def verdict(values: Values, cond: str, keeps_most: bool) -> dict[str, Any] | None:
    """The claim about ``cond`` (keeps most of the transfer, or removes most of it), decided only
    where the share's interval lies on one side of one half. None when the condition was not run."""
    if cond not in values or not values[cond]:
        return None
    if not transfer_is_real(values):
        return {"verdict": NO_TRANSFER, "share": None}
    sh = paired_share(values, cond)
    if sh is None or sh["lo"] is None:
        return {"verdict": UNCLEAR, **(sh or {"share": None})}
    if sh["lo"] > 0.5:
        keeps = True
    elif sh["hi"] < 0.5:
        keeps = False
    else:
        return {"verdict": UNCLEAR, **sh}
    return {"verdict": HOLDS if keeps == keeps_most else FAILS, **sh}


def all_verdicts(values: Values) -> dict[str, dict[str, Any]]:
    """Every claim whose condition ran, keyed by condition."""
    out = {}
    for cond, claim, keeps_most in CLAIMS:
        v = verdict(values, cond, keeps_most)
        if v is not None:
            out[cond] = {"claim": claim, **v}
    return out


def soft_vs_hard(values: Values) -> dict[str, Any] | None:
    """Soft minus all-tokens students, paired by seed: does soft distillation transfer at least as much?"""
    if "soft" not in values:
        return None
    return paired_diff(values, "soft", ref="all")


def share_text(v: dict[str, Any]) -> str:
    """A verdict's share in words: its interval, or why there is none."""
    if v["verdict"] == NO_TRANSFER:
        return "no share: the all-tokens transfer is not distinguishable from zero"
    if v.get("share") is None:
        return "share not estimable"
    if v.get("lo") is None:
        return f"keeps {v['share']:.0%} (interval not estimable)"
    return f"keeps {v['share']:.0%} [{v['lo']:.0%}, {v['hi']:.0%}]"
