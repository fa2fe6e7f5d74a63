"""Per-layer linear probes and the bias direction.

A probe is an L2-regularised logistic regression fitted in torch (full-batch L-BFGS on
standardised features). The split is by *row*, never by site, so two positions of one row never
sit on both sides (they share context and would leak). The 95% intervals are a percentile
bootstrap over held-out rows (a cluster bootstrap: sites of a row are resampled together), for
accuracy and AUC alike.

The bias direction of a layer is the mean biased-teacher activation minus the mean unbiased
one. A student's position along it is reported as a fraction: 0 where the unbiased teacher
sits, 1 where the biased one sits, so checkpoints of a student can be read as "how far along
the teacher's bias direction has it moved, at which layer".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from subliminal import stats
from subliminal.manifest import SubliminalError


@dataclass
class ProbeResult:
    layer: int
    n_train: int
    n_test: int
    accuracy: float
    accuracy_ci: tuple[float, float]
    auc: float
    auc_ci: tuple[float, float]
    balanced_accuracy: float
    balanced_accuracy_ci: tuple[float, float]
    majority_baseline: float

    def to_json(self) -> dict:
        return asdict(self)


def split_groups(groups: Sequence[str], test_frac: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean train/test masks over sites, splitting the distinct groups (rows) at random."""
    if not 0 < test_frac < 1:
        raise SubliminalError(f"--test-frac {test_frac}: must be between 0 and 1")
    uniq = sorted(set(groups))
    if len(uniq) < 2:
        raise SubliminalError("a held-out split needs at least 2 rows")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(uniq), generator=g).tolist()
    n_test = min(len(uniq) - 1, max(1, round(test_frac * len(uniq))))
    test_ids = {uniq[i] for i in perm[:n_test]}
    test = torch.tensor([x in test_ids for x in groups])
    return ~test, test


def fit_logistic(x: torch.Tensor, y: torch.Tensor, *, l2: float = 1e-3, max_iter: int = 200,
                 balanced: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit ``p(y=1|x) = sigmoid(w . (x - mu) / sd + b)``; returns ``(w, b, mu, sd)``.

    ``balanced`` weights the classes equally (for rare labels such as divergence tokens)."""
    x = x.double()
    y = y.double()
    mu = x.mean(0)
    sd = x.std(0).clamp_min(1e-6) if len(x) > 1 else torch.ones_like(mu)
    z = (x - mu) / sd
    weights = torch.ones_like(y)
    if balanced:
        pos = y.sum().clamp_min(1)
        neg = (1 - y).sum().clamp_min(1)
        weights = torch.where(y > 0.5, len(y) / (2 * pos), len(y) / (2 * neg))
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = z @ w + b
        loss = (weights * torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")).mean()
        loss = loss + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach(), mu, sd


def predict_logit(params: tuple[torch.Tensor, ...], x: torch.Tensor) -> torch.Tensor:
    w, b, mu, sd = params
    return ((x.double() - mu) / sd) @ w + b


def auc_score(scores: torch.Tensor, y: torch.Tensor) -> float:
    """Area under the ROC curve, ties counted half; NaN with one class (:func:`subliminal.stats.auc`)."""
    return stats.auc(scores.detach().double().cpu().numpy(), y.bool().cpu().numpy())


def bootstrap_ci(groups: Sequence[str], fn, n_boot: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of ``fn(site_indices)`` (a torch index tensor) over resamples of
    whole groups: :func:`subliminal.stats.group_bootstrap_ci`, undefined resamples dropped."""
    ci = stats.group_bootstrap_ci(groups, lambda ix: fn(torch.from_numpy(ix)), n_boot=n_boot, seed=seed)
    return (ci.lo, ci.hi)


def probe_layer(
    x: torch.Tensor,
    y: torch.Tensor,
    groups: Sequence[str],
    *,
    layer: int,
    test_frac: float = 0.3,
    l2: float = 1e-3,
    seed: int = 0,
    n_boot: int = 500,
    balanced: bool = False,
) -> ProbeResult:
    """Fit on the training rows, score on the held-out rows, bootstrap the held-out rows."""
    train, test = split_groups(groups, test_frac, seed)
    if len(set(y[train].tolist())) < 2:
        raise SubliminalError(f"layer {layer}: the training split holds one class only; use more rows")
    params = fit_logistic(x[train], y[train], l2=l2, balanced=balanced)
    logit = predict_logit(params, x[test])
    yt = y[test].bool()
    pred = logit > 0
    correct = (pred == yt).double()
    tgroups = [gname for gname, t in zip(groups, test.tolist()) if t]

    def acc(ix: torch.Tensor) -> float:
        return correct[ix].mean().item()

    def auc(ix: torch.Tensor) -> float:
        return auc_score(logit[ix], yt[ix])

    def bacc(ix: torch.Tensor) -> float:
        c, t = correct[ix], yt[ix]
        if t.all() or not t.any():
            return float("nan")
        return (c[t].mean().item() + c[~t].mean().item()) / 2

    pos_rate = yt.double().mean().item()
    return ProbeResult(
        layer=layer, n_train=int(train.sum()), n_test=int(test.sum()),
        accuracy=correct.mean().item(), accuracy_ci=bootstrap_ci(tgroups, acc, n_boot, seed + 1),
        auc=auc_score(logit, yt), auc_ci=bootstrap_ci(tgroups, auc, n_boot, seed + 2),
        balanced_accuracy=bacc(torch.arange(len(yt))),
        balanced_accuracy_ci=bootstrap_ci(tgroups, bacc, n_boot, seed + 3),
        majority_baseline=max(pos_rate, 1 - pos_rate),
    )


def probe_layers(
    acts: dict[int, torch.Tensor],
    y: torch.Tensor,
    groups: Sequence[str],
    **kw,
) -> list[ProbeResult]:
    """One probe per layer on ``acts[layer]`` (sites x d_model); same split for every layer."""
    return [probe_layer(acts[layer], y, groups, layer=layer, **kw) for layer in sorted(acts)]


# -------------------------------------------------------------------------------- bias direction


def bias_directions(biased: dict[int, torch.Tensor], unbiased: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Per layer: mean(biased) - mean(unbiased) over sites (the same sites for both)."""
    return {layer: biased[layer].double().mean(0) - unbiased[layer].double().mean(0) for layer in biased}


def projection_fraction(
    acts: dict[int, torch.Tensor],
    biased: dict[int, torch.Tensor],
    unbiased: dict[int, torch.Tensor],
) -> dict[int, dict[str, float]]:
    """Mean projection of ``acts`` on each layer's unit bias direction, raw and as a fraction of
    the way from the unbiased (0) to the biased teacher (1)."""
    dirs = bias_directions(biased, unbiased)
    out = {}
    for layer, d in dirs.items():
        norm = d.norm().item()
        u = d / max(norm, 1e-12)
        p = (acts[layer].double() @ u).mean().item()
        p0 = (unbiased[layer].double() @ u).mean().item()
        p1 = (biased[layer].double() @ u).mean().item()
        out[layer] = {"projection": p, "unbiased": p0, "biased": p1, "direction_norm": norm,
                      "fraction": (p - p0) / (p1 - p0) if abs(p1 - p0) > 1e-12 else float("nan")}
    return out
