"""Linear probes find a planted direction at its layer only; AUC, splits and the bias direction."""

from __future__ import annotations

import pytest
import torch
from subliminal.probes import linear as L

from subliminal.manifest import SubliminalError


def planted(n=600, d=16, layers=4, at=2, strength=0.6, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    direction = torch.randn(d, generator=g)
    acts = {layer: torch.randn(n, d, generator=g) for layer in range(layers)}
    acts[at] = acts[at] + (2 * y[:, None] - 1) * strength * direction
    return acts, y, [f"row{i // 3}" for i in range(n)]


def test_probe_finds_planted_direction_at_its_layer_only():
    acts, y, groups = planted()
    res = {r.layer: r for r in L.probe_layers(acts, y, groups, n_boot=200, seed=0)}
    assert res[2].accuracy > 0.9 and res[2].auc > 0.95 and res[2].accuracy_ci[0] > 0.85
    for layer in (0, 1, 3):
        assert res[layer].auc_ci[0] < 0.5 < res[layer].auc_ci[1] or abs(res[layer].auc - 0.5) < 0.1
        assert res[layer].accuracy < 0.65
    assert res[2].accuracy_ci[0] <= res[2].accuracy <= res[2].accuracy_ci[1]


def test_same_seed_same_result_and_rows_never_straddle_split():
    acts, y, groups = planted()
    a = L.probe_layer(acts[2], y, groups, layer=2, n_boot=50, seed=3)
    b = L.probe_layer(acts[2], y, groups, layer=2, n_boot=50, seed=3)
    assert a == b
    train, test = L.split_groups(groups, 0.3, seed=3)
    assert not ({g for g, t in zip(groups, train.tolist()) if t} & {g for g, t in zip(groups, test.tolist()) if t})


def test_auc_score():
    assert L.auc_score(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.75)
    assert L.auc_score(torch.tensor([1.0, 1, 1, 1]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.5)
    assert L.auc_score(torch.tensor([3.0, 2, 1]), torch.tensor([1, 1, 0])) == pytest.approx(1.0)


def test_rare_labels_with_balanced_weights():
    g = torch.Generator().manual_seed(1)
    y = (torch.rand(900, generator=g) < 0.08).long()
    x = torch.randn(900, 16, generator=g) + y[:, None] * 1.5 * torch.randn(16, generator=g)
    r = L.probe_layer(x, y, [f"row{i // 3}" for i in range(900)], layer=2, n_boot=0, balanced=True)
    assert r.majority_baseline > 0.85 and r.balanced_accuracy > 0.8 and r.auc > 0.9


def test_one_class_in_training_is_an_error():
    acts, y, groups = planted()
    with pytest.raises(SubliminalError, match="one class"):
        L.probe_layer(acts[0], torch.zeros_like(y), groups, layer=0, n_boot=0)


def test_projection_fraction_halfway():
    g = torch.Generator().manual_seed(0)
    unb = {0: torch.randn(50, 8, generator=g)}
    shift = torch.randn(8, generator=g)
    bia = {0: unb[0] + shift}
    half = {0: unb[0] + 0.5 * shift}
    out = L.projection_fraction(half, bia, unb)
    assert out[0]["fraction"] == pytest.approx(0.5, abs=1e-6)
    assert out[0]["direction_norm"] == pytest.approx(shift.norm().item(), rel=1e-6)
