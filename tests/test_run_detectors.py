"""`subliminal run` with the detectors' conditions (issue 26): asking for one condition of a detector
scores the target's rows with it (`score-tokens`, through the driver's resume rule), flags them at
the paper rule's share, trains the condition on those flags and reports the detector beside the
divergence rules; the likelihood shift's student is an all-tokens student of a seed the run does
not evaluate; the gradient runs over the students' own parameter set."""

from __future__ import annotations

import csv
import json

import pytest
from run_configs import tiny_run_config

from subliminal import pipeline
from subliminal.cli import main
from subliminal.data import write_jsonl
from subliminal.divergence import DETECTOR_RULES, load_divergence
from subliminal.run import load_config


def _file_manifest(path):
    return json.loads(path.with_name(path.name + ".manifest.json").read_text())


def _flags_at_the_paper_share(div, rule) -> int:
    """The detector's file flags exactly its scores at or above its threshold, as many as the paper
    rule's file flags unless values tie at the threshold (a tie group is flagged as a whole)."""
    _, flagged = pipeline.detector_paths(div, rule)
    rows = load_divergence(flagged)
    scores = [s for r in rows for s in r["scores"][DETECTOR_RULES[rule]]]
    flags = [f for r in rows for f in r["divergence"]]
    threshold = float(_file_manifest(flagged)["rule"]["min_ratio"])
    assert flags == [s >= threshold for s in scores]
    n, paper = sum(flags), pipeline.rule_stats(div)["flagged_tokens"]
    assert n == paper or abs(n - paper) < sum(s == threshold for s in scores), (rule, n, paper)
    return n


def _div_rows(n_rows: int, seed: int) -> list[dict]:
    """Scored rows as find-divergence and score-tokens write them: paper flags at random, random
    detector scores (no ties)."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n_rows):
        n = rng.randrange(3, 9)
        ids = [rng.randrange(20) for _ in range(n)]
        rows.append({"id": f"r{i}", "prompt": "p", "completion": "c", "token_ids": ids, "tokens": [str(t) for t in ids],
                     "rule": "paper", "counterfactuals": ["cat"], "divergence": [rng.random() < 0.2 for _ in ids],
                     "argmax_factual": ids, "argmax_counterfactual": [ids],
                     "scores": {"logp_factual": [-rng.random() for _ in ids], "logp_counterfactual": [[-1.0] * n],
                                "kl": [[0.0] * n], "js": [[0.0] * n], "margin": [0.0] * n, "rank": [[0] * n],
                                **{key: [rng.gauss(0, 1) for _ in ids] for key in DETECTOR_RULES.values()}}})
    return rows


def test_each_detector_flags_the_paper_rules_share_after_its_scores_and_student(tmp_path):
    """The stages a detector's conditions add, in order: the shift's student (seed = seeds + 1), each
    detector's scores, then its flags at the paper rule's share (here from stored random scores, run
    for real): as many tokens as the paper rule flags, the largest scores."""
    div = tmp_path / "owl.div.jsonl"
    write_jsonl(div, _div_rows(30, 1))
    cfg = pipeline.RunConfig(seeds=3, conditions=["shift-only-divergence", "gradient-random-matched"])
    for rule in DETECTOR_RULES:  # what score-tokens would have written
        write_jsonl(pipeline.detector_paths(div, rule)[0], _div_rows(30, 1))
    done: list[tuple[str, object]] = []

    class Run:  # the driver, running only the re-flagging
        def upstream(self, inputs):
            return None

        def __call__(self, name, call, out, inputs=(), lazy=False):
            done.append((name, out))
            if name.startswith("reflag-"):
                assert main(call() if lazy else call) == 0

    files = pipeline._detector_files(cfg, Run(), tmp_path / "run", tmp_path / "base", tmp_path / "t", {"div": div})
    assert [n for n, _ in done] == ["distill-all-s4", "score-tokens-likelihood-shift", "reflag-likelihood-shift",
                                    "score-tokens-gradient", "reflag-gradient"]
    assert dict(done)["distill-all-s4"] == tmp_path / "run" / "students" / "all-s4"
    assert set(files) == {"div-likelihood-shift", "div-gradient"}
    assert pipeline.condition_data("gradient-random-matched", files) == files["div-gradient"]
    for rule in DETECTOR_RULES:
        assert files[f"div-{rule}"] == pipeline.detector_paths(div, rule)[1]
        assert _flags_at_the_paper_share(div, rule) == pipeline.rule_stats(div)["flagged_tokens"] > 0


def test_detector_conditions_score_flag_train_report_and_resume(smol_model, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_run_config(tmp_path / "c.toml", smol_model, "tiny-detectors",
                          students='conditions = ["gradient-no-divergence", "shift-random-matched"]\nseeds = 1')
    assert main(["run", str(cfg), "--out", str(out)]) == 0
    div = out / "data" / "matched" / "owl.div.jsonl"
    for rule, cond in (("gradient", "gradient-no-divergence"), ("likelihood-shift", "shift-random-matched")):
        _flags_at_the_paper_share(div, rule)  # the tiny random base's teachers may agree everywhere: see the test above
        man = json.loads((out / "students" / f"{cond}-s1" / "manifest.json").read_text())
        assert man["config"]["data"] == str(pipeline.detector_paths(div, rule)[1])  # trained on this detector's flags
    scored = {r: _file_manifest(pipeline.detector_paths(div, r)[0]) for r in ("gradient", "likelihood-shift")}
    # the gradient over the students' own parameter set (the tiny config's LoRA rank 2)
    assert scored["gradient"]["config"]["lora_rank"] == 2 and scored["gradient"]["summary"]["target"] == "owl"
    # the shift's student: trained as all-s1, a seed the run does not evaluate
    student = scored["likelihood-shift"]["summary"]["student"]
    shift_man = json.loads((out / "students" / "all-s2" / "manifest.json").read_text())
    all_man = json.loads((out / "students" / "all-s1" / "manifest.json").read_text())
    assert student == str(out / "students" / "all-s2") and shift_man["seed"] == 2
    assert {k: v for k, v in shift_man["config"].items() if k not in ("seed", "out")} == \
        {k: v for k, v in all_man["config"].items() if k not in ("seed", "out")}
    assert not (out / "eval" / "all-s2.json").exists()
    results = json.loads((out / "results.json").read_text())
    assert set(results["conditions"]) == {"control", "all", "gradient-no-divergence", "shift-random-matched"}
    assert set(results["rules"]) == {"paper", "ratio", "likelihood-shift", "gradient"}
    assert results["rules"]["likelihood-shift"]["scored_by"]["student_seed"] == 2
    assert results["rules"]["gradient"]["flagged_tokens"] == _flags_at_the_paper_share(div, "gradient")
    report = (out / "REPORT.md").read_text()
    assert "| gradient | " in report and "| likelihood-shift | " in report and "seed 2" in report
    # a second run reuses everything, the scores and flags included
    decisions = pipeline.resume_plan(load_config(str(cfg)).cfg, out)
    assert {d.name for d in decisions} >= {"distill-all-s2", "score-tokens-gradient", "score-tokens-likelihood-shift",
                                           "reflag-gradient", "reflag-likelihood-shift"}
    assert [d.line() for d in decisions if d.action != "reuse"] == []


def test_rules_summary_and_figure_show_a_detector_only_when_it_ran(tmp_path):
    """results.json `rules`, the report's table and the rules figure (with its CSV) hold a detector's
    shares of the all-tokens transfer per mask when its flags were made, and nothing of it otherwise."""
    from subliminal.probes.plots import plot_rules

    control = {1: 0.10, 2: 0.20, 3: 0.30}
    values = {c: dict(control) for c in pipeline.CONDITIONS}
    values["all"] = {s: v + 0.10 for s, v in control.items()}
    values["gradient-no-divergence"] = {s: v + 0.08 for s, v in control.items()}
    values["shift-no-divergence"] = {1: 0.11, 2: 0.21, 3: 0.32}
    flagged = {"flagged_tokens": 12, "tokens": 100, "flagged_share": 0.12}
    stats = {"paper": {**flagged, "rule": {"rule": "paper"}}, "ratio": {**flagged, "rule": {"rule": "ratio", "min_ratio": 1.5}}}
    cfg = pipeline.RunConfig(seeds=3)
    plain = pipeline._summarise(cfg, {"values": values, "reference": {}, "rows": 10, "steps": 3, "rules": stats})
    assert set(plain["rules"]) == {"paper", "ratio"}
    stats["gradient"] = {**flagged, "rule": {"rule": "gradient", "min_ratio": 2.5e-4},
                         "scored_by": {"params": {"lora_rank": 2}}}
    stats["likelihood-shift"] = {**flagged, "rule": {"rule": "likelihood-shift", "min_ratio": 0.7},
                                 "scored_by": {"student_seed": 4}}
    s = pipeline._summarise(cfg, {"values": values, "reference": {}, "rows": 10, "steps": 3, "rules": stats})
    masks = s["rules"]["gradient"]["masks"]
    assert masks["no-divergence"]["condition"] == "gradient-no-divergence"
    assert masks["no-divergence"]["share_per_seed_mean"] == pytest.approx(0.8)
    assert s["rules"]["likelihood-shift"]["masks"]["random-matched"]["condition"] == "shift-random-matched"
    report = "\n".join(pipeline._rules_section(s))
    assert "| gradient | 12 | 0.1200 | 2.50e-04 R/lr | 0.80 [" in report and "| likelihood-shift | 12 | 0.1200 | 0.700 |" in report
    assert "all-tokens student of seed 4" in report and "LoRA rank 2" in report
    plot_rules(s, tmp_path / "rules.png")
    rows = list(csv.DictReader(open(tmp_path / "rules.csv")))
    assert len(rows) == 4 * 3
    assert [float(r["share_kept"]) for r in rows if r["rule"] == "gradient"] == pytest.approx([0.8, 0.0, 0.0])


def test_detector_bases_figure_gives_shares_only_where_the_base_transfers(tmp_path, capsys):
    """experiments/detector_bases_figure.py: per base, each detector's flagged and random cells with
    the claims' paired shares; a base whose all-tokens transfer includes zero gets differences, not shares."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "experiments" / "detector_bases_figure.py"
    spec = importlib.util.spec_from_file_location("detector_bases_figure", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def write(path, all_diffs, flagged_diffs):
        seeds = range(1, len(all_diffs) + 1)
        conds = {"control": [0.1] * len(all_diffs), "all": [0.1 + d for d in all_diffs],
                 "shift-no-divergence": [0.1 + d for d in flagged_diffs],
                 "shift-random-matched": [0.1 + d for d in all_diffs]}
        path.mkdir(parents=True)
        (path / "results.json").write_text(json.dumps({
            "conditions": {c: {"by_seed": {str(s): v for s, v in zip(seeds, vs)}} for c, vs in conds.items()},
            "rules": {"likelihood-shift": {"flagged_tokens": 40, "tokens": 400}}}))

    write(tmp_path / "run" / "base-0", [0.5, 0.52, 0.48, 0.5], [0.05, 0.04, 0.06, 0.05])  # removes ~90%
    write(tmp_path / "run" / "base-1", [0.02, -0.03, 0.01, 0.0], [0.0, 0.01, -0.01, 0.0])  # no transfer
    out = tmp_path / "fig"
    assert mod.main(["--run", str(tmp_path / "run"), "--out", str(out)]) == 0
    res = json.loads((out / "detector_bases.json").read_text())
    b0, b1 = res["bases"]["0"], res["bases"]["1"]
    assert [r["pair"] for r in b0["rows"]] == ["likelihood shift: drop"] and b0["rows"][0]["flagged_tokens"] == 40
    assert b0["rows"][0]["flagged"]["share"] == pytest.approx(0.1) and b0["rows"][0]["flagged"]["verdict"] == "holds"
    assert b0["rows"][0]["random"]["share"] == pytest.approx(1.0)
    assert not b1["transfer_is_real"] and b1["rows"][0]["flagged"]["share"] is None
    assert b1["rows"][0]["flagged"]["verdict"] == "no transfer to share"
    md = (out / "detector_bases.md").read_text()
    assert "0.10 [" in md and "(+0.000)" in md and (out / "detector_bases.png").stat().st_size > 0
    (tmp_path / "bare" / "base-0").mkdir(parents=True)
    (tmp_path / "bare" / "base-0" / "results.json").write_text(json.dumps({"conditions": {
        "control": {"by_seed": {"1": 0.1, "2": 0.1}}, "all": {"by_seed": {"1": 0.2, "2": 0.3}}}}))
    assert mod.main(["--run", str(tmp_path / "bare"), "--out", str(out)]) == 2
    assert "none of the detector" in capsys.readouterr().err
