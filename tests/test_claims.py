"""Verdicts of the paper's claims: never a share of a transfer indistinguishable from zero."""

from subliminal import claims


def _values(all_diffs, cond_diffs, cond="no-divergence"):
    control = {s: 0.05 for s in range(1, len(all_diffs) + 1)}
    return {"control": control,
            "all": {s: 0.05 + d for s, d in zip(control, all_diffs)},
            cond: {s: 0.05 + d for s, d in zip(control, cond_diffs)}}


def test_null_transfer_gives_no_share_and_says_so():
    v = _values([0.01, -0.02, 0.015, -0.01, 0.005], [0.03, 0.01, -0.02, 0.0, 0.02])
    assert not claims.transfer_is_real(v)
    assert claims.paired_share(v, "no-divergence") is None
    out = claims.all_verdicts(v)["no-divergence"]
    assert out["verdict"] == claims.NO_TRANSFER and out["share"] is None
    assert "not distinguishable from zero" in claims.share_text(out)


def test_masking_that_removes_the_transfer_holds_and_keeping_it_fails():
    real = [0.10, 0.12, 0.09, 0.11, 0.10]
    removed = claims.all_verdicts(_values(real, [0.0, 0.01, -0.01, 0.005, 0.0]))["no-divergence"]
    assert removed["verdict"] == claims.HOLDS and removed["hi"] < 0.5
    kept = claims.all_verdicts(_values(real, [0.10, 0.11, 0.09, 0.12, 0.10]))["no-divergence"]
    assert kept["verdict"] == claims.FAILS and kept["lo"] > 0.5
    only = claims.all_verdicts(_values(real, [0.10, 0.11, 0.09, 0.12, 0.10], "only-divergence"))["only-divergence"]
    assert only["verdict"] == claims.HOLDS


def test_a_share_straddling_one_half_is_inconclusive():
    v = _values([0.10, 0.12, 0.09, 0.11, 0.10], [0.0, 0.12, 0.02, 0.11, 0.05])
    out = claims.all_verdicts(v)["no-divergence"]
    assert out["verdict"] == claims.UNCLEAR and out["lo"] < 0.5 < out["hi"]


def test_pairing_is_by_seed_and_missing_conditions_are_skipped():
    v = _values([0.1, 0.1, 0.1], [0.05, 0.05, 0.05])
    v["no-divergence"] = {3: v["no-divergence"][3], 1: v["no-divergence"][1], 2: v["no-divergence"][2]}
    assert abs(claims.paired_share(v, "no-divergence")["share"] - 0.5) < 1e-9
    assert "layer-early" not in claims.all_verdicts(v)
    assert claims.soft_vs_hard(v) is None


def test_every_detector_and_intervention_condition_has_a_claim_in_the_right_direction():
    from subliminal.pipeline import DETECTOR_CONDITIONS, RULE_CONDITIONS

    real = [0.10, 0.12, 0.09, 0.11, 0.10]
    removes = [0.0, 0.01, -0.01, 0.005, 0.0]
    masks = [c for rules in (RULE_CONDITIONS, DETECTOR_CONDITIONS) for conds in rules.values() for c in conds.values()]
    interventions = ["replace-divergence", "replace-random-matched", "corrupt-divergence", "corrupt-random-matched"]
    for cond in masks + interventions:
        v = claims.all_verdicts(_values(real, removes, cond)).get(cond)
        assert v is not None, cond
        # a claim that the flagged tokens carry the transfer holds when they remove it; every other fails
        expected = claims.HOLDS if cond.endswith("no-divergence") or cond == "replace-divergence" else claims.FAILS
        assert v["verdict"] == expected, (cond, v)
