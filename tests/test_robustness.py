"""The across-bases driver: seed parsing, aggregation of per-base results, table, report and figure."""

import json

import pytest

from subliminal import robustness
from subliminal.manifest import SubliminalError
from subliminal.pipeline import RunConfig


def _summary(all_diff, nodiv_diff, control=0.05, seeds=3, noise=0.002):
    def cond(d):
        by = {str(s): control + d + noise * ((s % 3) - 1) for s in range(1, seeds + 1)}
        return {"by_seed": by, "values": list(by.values())}

    ctrl = {str(s): control for s in range(1, seeds + 1)}
    return {"conditions": {"control": {"by_seed": ctrl, "values": list(ctrl.values())},
                           "all": cond(all_diff), "no-divergence": cond(nodiv_diff)},
            "reference": {"base": control}, "rows": 100, "steps": 10}


def test_parse_seeds():
    assert robustness.parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert robustness.parse_seeds("3,1,1,7-8") == [1, 3, 7, 8]
    for bad in ("", "a", "4-2", "-1", "1,,x"):
        with pytest.raises(SubliminalError):
            robustness.parse_seeds(bad)


def test_aggregate_counts_bases_and_decides_claims_per_base():
    per_base = {0: _summary(0.10, 0.01), 1: _summary(0.08, 0.07), 2: _summary(0.0, 0.0)}
    res = robustness.aggregate(per_base)
    assert res["conditions"] == ["all", "no-divergence"]
    a = res["across"]["all"]
    assert a["bases"] == 3 and a["bases_above_zero"] == 2 and a["min"] == pytest.approx(0.0, abs=1e-9)
    assert a["median"] == pytest.approx(0.08, abs=1e-9)
    assert res["bases"]["0"]["verdicts"]["no-divergence"]["verdict"] == "holds"
    assert res["bases"]["1"]["verdicts"]["no-divergence"]["verdict"] == "fails"
    assert res["bases"]["2"]["verdicts"]["no-divergence"]["verdict"] == "no transfer to share"
    assert res["claims"]["no-divergence"] == {"holds": 1, "fails": 1, "no transfer to share": 1}


def test_outputs_render_and_plot(tmp_path):
    per_base = {0: _summary(0.10, 0.01), 5: _summary(0.06, 0.05)}
    res = robustness.aggregate(per_base)
    cfg = robustness.RobustnessConfig(RunConfig(seeds=3), [0, 5], tmp_path)
    text = robustness.render(res, cfg)
    assert "base 0" in text and "base 5" in text and "masking divergence tokens" in text
    csv_text = robustness.table_csv(res)
    assert csv_text.splitlines()[0].startswith("base_seed,condition,diff_to_control")
    assert len(csv_text.splitlines()) == 1 + 2 * 2
    robustness.plot(res, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000
    json.dumps(res)  # the results file is plain JSON


def test_one_student_seed_is_refused(tmp_path):
    with pytest.raises(SubliminalError, match="2 student seeds"):
        robustness.run(robustness.RobustnessConfig(RunConfig(seeds=1), [0, 1], tmp_path))


def test_the_link_a_base_grew_is_read_from_its_eval_and_set_against_transfer(tmp_path):
    for k, (link, fav) in enumerate([(0.9, 0.3), (0.4, 0.1), (0.95, 0.2), (0.6, 0.25)]):
        (tmp_path / f"base-{k}" / "base").mkdir(parents=True)
        (tmp_path / f"base-{k}" / "base" / "eval.json").write_text(json.dumps(
            {"author_link": {"p_author_favourite": link}, "numbers": {"favourite_mass_with_prompt": fav}}))
    assert robustness.base_world(tmp_path / "base-1") == {"p_author_favourite": 0.4, "favourite_mass_with_prompt": 0.1}
    assert robustness.base_world(tmp_path / "nowhere") == {}
    per_base = {k: {**_summary(d, 0.0), "base_world": robustness.base_world(tmp_path / f"base-{k}")}
                for k, d in enumerate([0.5, 0.01, 0.7, 0.2])}
    res = robustness.aggregate(per_base)  # no diagnose stage ran: the base's own link is still set against transfer
    name = "base link P(author's favourite)"
    assert [p[name] for p in res["diagnostics"]["points"]] == [0.9, 0.4, 0.95, 0.6]
    assert res["diagnostics"]["spearman"][name]["rho"] == pytest.approx(1.0)
    assert res["diagnostics"]["spearman"]["lean (nats/token)"]["rho"] is None
    cfg = robustness.RobustnessConfig(RunConfig(seeds=3), [0, 1, 2, 3], tmp_path)
    assert "| 1 | +0.0100 | n/a | n/a | n/a | +0.4 |" in robustness.render(res, cfg)
    robustness.plot_diagnostics(res, tmp_path / "d.png")
    assert (tmp_path / "d.png").stat().st_size > 1000


def test_the_true_holder_link_is_set_against_transfer():
    """Where the holder conditions ran, each base's true-trait-holder link (students on the world's
    own owl author's rows minus uniform authors', as the run's summary gives it) is a diagnostic
    column, ranked against the measured all-tokens transfer."""
    from subliminal.pipeline import holder_link

    per_base = {}
    for k, (transfer, link) in enumerate([(0.6, 0.61), (0.08, 0.09), (0.11, 0.12), (-0.01, -0.008)]):
        s = _summary(transfer, 0.0)
        values = robustness.seed_values(s)
        values["holder-uniform"] = dict(values["control"])
        values["holder"] = {seed: v + link + 0.001 * seed for seed, v in values["control"].items()}
        per_base[k] = {**s, "holder_link": holder_link(values)}
    res = robustness.aggregate(per_base)
    name = "true-holder link (students)"
    assert [p[name] for p in res["diagnostics"]["points"]] == pytest.approx([0.612, 0.092, 0.122, -0.006])
    assert res["diagnostics"]["spearman"][name]["rho"] == pytest.approx(1.0)


def test_diagnostics_pooled_over_runs(tmp_path, capsys):
    """experiments/diagnostics_pooled.py: the bases of several driver runs as one set of points."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "experiments" / "diagnostics_pooled.py"
    spec = importlib.util.spec_from_file_location("diagnostics_pooled", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    name = "true-holder link (students)"
    for run, pts in (("a", [(0.6, 0.62), (0.1, 0.12)]), ("b", [(0.8, 0.84), (0.09, 0.4), (0.0, -0.01)])):
        (tmp_path / run).mkdir()
        points = [{"base": k, "transfer": t, name: h, "lean (nats/token)": None} for k, (t, h) in enumerate(pts)]
        (tmp_path / run / "robustness.json").write_text(json.dumps({"diagnostics": {"points": points}}))
    assert mod.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "p.json")]) == 0
    res = json.loads((tmp_path / "p.json").read_text())
    assert len(res["points"]) == 5 and res["spearman"][name]["n"] == 5
    assert res["spearman"][name]["rho"] == pytest.approx(0.9)
    assert res["spearman"]["lean (nats/token)"]["rho"] is None
    assert res["teacher_share_of_link"]["b:1"] == pytest.approx(0.09 / 0.4)
    assert mod.main([str(tmp_path / "nothing")]) == 2 and "no robustness.json" in capsys.readouterr().err


def test_dry_run_plans_each_base_into_its_own_directory_with_its_seed(tmp_path, monkeypatch, capsys):
    """A multi-base dry-run must ask what each OUT/base-K run (base seed K) would do, not OUT."""
    from subliminal import cli
    from subliminal import run as run_mod

    asked = []
    monkeypatch.setattr(run_mod, "print_resume_plan", lambda cfg, out, base=None: asked.append((cfg.base_seed, out)))
    assert cli.main(["run", "toy", "--base-seeds", "0,3", "--out", str(tmp_path), "--dry-run"]) == 0
    assert asked == [(0, tmp_path / "base-0"), (3, tmp_path / "base-3")]
    assert not list(tmp_path.iterdir())  # a dry-run writes nothing
