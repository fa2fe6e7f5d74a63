"""Divergence rules on stored scores: the likelihood-ratio rule (thresholds, ties, several
counterfactuals, max vs mean), the share-based threshold, re-flagging a file and reading it back
through distill, probes and plots, and the ratio rule end to end through find-divergence."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from subliminal import cli, distill
from subliminal import divergence as dv
from subliminal.data import write_jsonl
from subliminal.manifest import SubliminalError
from subliminal.prompts import system_prompt_for
from subliminal.teachers import TeacherSpec, save_teacher

INF = math.inf


# ----------------------------------------------------------------------------- the rule itself


def test_log_ratio_max_and_mean_over_several_counterfactuals():
    lf = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
    cf = torch.tensor([[-3.0, -2.0, -0.5],   # ratios 2, 0, 0
                       [-1.5, -2.5, -4.5]],  # ratios 0.5, 0.5, 4
                      dtype=torch.float64)
    assert dv.log_ratio(lf, cf, "max").tolist() == [2.0, 0.5, 4.0]
    assert dv.log_ratio(lf, cf, "mean").tolist() == [1.25, 0.25, 2.0]
    # the threshold is inclusive; max and mean flag different tokens at the same threshold
    assert dv.ratio_flags(lf, cf, 2.0, "max").tolist() == [True, False, True]
    assert dv.ratio_flags(lf, cf, 2.0, "mean").tolist() == [False, False, True]
    assert dv.ratio_flags(lf, cf, 2.0000001, "max").tolist() == [False, False, True]
    # a negative threshold flags tokens the factual teacher finds less likely, as asked
    assert dv.ratio_flags(lf, cf, -10.0, "max").all()
    with pytest.raises(SubliminalError, match="ratio-reduce"):
        dv.log_ratio(lf, cf, "median")


def test_log_ratio_non_finite_log_probs():
    # impossible under a counterfactual only: +inf (strongest evidence); under the factual teacher: -inf;
    # under both: -inf, never flagged, with max and with mean
    lf = torch.tensor([-1.0, -INF, -INF], dtype=torch.float64)
    cf = torch.tensor([[-INF, -1.0, -INF], [-2.0, -2.0, -INF]], dtype=torch.float64)
    for reduce in ("max", "mean"):
        r = dv.log_ratio(lf, cf, reduce)
        assert r[0] == INF and r[1] == -INF and r[2] == -INF
        assert dv.ratio_flags(lf, cf, 0.0, reduce).tolist() == [True, False, False]


def test_share_threshold_exact_without_ties():
    gen = torch.Generator().manual_seed(0)
    r = torch.randn(1000, generator=gen, dtype=torch.float64)
    for share in (0.01, 0.02, 0.05, 0.1, 0.2, 0.123, 1.0):
        t = dv.share_threshold(r, share)
        assert int((r >= t).sum()) == round(share * 1000)
    with pytest.raises(SubliminalError, match="flags none"):
        dv.share_threshold(r, 0.0004)
    with pytest.raises(SubliminalError, match="flag-share"):
        dv.share_threshold(r, 1.5)


def test_share_threshold_ties_go_in_or_out_together_whichever_is_closer():
    r = torch.tensor([5.0, 4.0, 3.0, 3.0, 3.0, 1.0, 0.0, 0.0, -1.0, -2.0], dtype=torch.float64)
    # 3 wanted: {5, 4} (2) or {5, 4, 3, 3, 3} (5): 2 is closer
    assert int((r >= dv.share_threshold(r, 0.3)).sum()) == 2
    # 4 wanted: 2 or 5, 5 is closer
    assert int((r >= dv.share_threshold(r, 0.4)).sum()) == 5
    # 7 wanted: {.. 1} (6) or {.. 0, 0} (8), equally close: the larger count
    assert int((r >= dv.share_threshold(r, 0.7)).sum()) == 8
    # the boundary value tied with the very top: nothing above it to fall back to, all of them
    r2 = torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64)
    assert int((r2 >= dv.share_threshold(r2, 0.25)).sum()) == 3


def test_rule_spec_checks_its_parameters():
    dv.RuleSpec("ratio", min_ratio=1.0).check()
    dv.RuleSpec("ratio", flag_share=0.1, reduce="mean").check()
    for bad, msg in [(dv.RuleSpec("ratio"), "exactly one"),
                     (dv.RuleSpec("ratio", min_ratio=1.0, flag_share=0.1), "exactly one"),
                     (dv.RuleSpec("paper", min_ratio=1.0), "only apply"),
                     (dv.RuleSpec("ratio", flag_share=0.0), "flag-share"),
                     (dv.RuleSpec("ratio", min_ratio=1.0, reduce="sum"), "ratio-reduce"),
                     (dv.RuleSpec("nope"), "--rule")]:
        with pytest.raises(SubliminalError, match=msg):
            bad.check()


# ------------------------------------------------------------------------- hand-built rows


def _row(i: int, n: int, rng: random.Random, k: int = 3) -> dict:
    """A find-divergence row with random scores; the factual argmax is the data token half the time."""
    ids = [rng.randrange(50) for _ in range(n)]
    af = [t if rng.random() < 0.5 else (t + 1) % 50 for t in ids]
    acf = [[t if rng.random() < 0.7 else (t + 2) % 50 for t in ids] for _ in range(k)]
    lf = [round(-rng.random() * 3, 4) for _ in range(n)]
    lcf = [[round(-rng.random() * 3, 4) for _ in range(n)] for _ in range(k)]
    obj = {"id": f"r{i}", "prompt": f"prompt {i}", "completion": " ".join(map(str, ids)), "teacher": "owl",
           "token_ids": ids, "tokens": [str(t) for t in ids], "rule": "paper",
           "counterfactuals": [f"cf{c}" for c in range(k)], "argmax_factual": af,
           "argmax_counterfactual": acf,
           "scores": {"logp_factual": lf, "logp_counterfactual": lcf, "kl": [[0.1] * n] * k,
                      "js": [[0.05] * n] * k, "margin": [0.2] * n, "rank": [[0] * n] * k}}
    obj["divergence"] = dv._argmax_row_flags(obj, "paper")
    return obj


@pytest.fixture
def div_file(tmp_path):
    rng = random.Random(0)
    objs = [_row(i, rng.randrange(4, 12), rng) for i in range(40)]
    path = tmp_path / "owl.div.jsonl"
    write_jsonl(path, objs)
    return path, objs


def test_flag_rows_threshold_is_global_and_recorded_in_every_row(div_file):
    _, objs = div_file
    flagged, info = dv.flag_rows(objs, dv.RuleSpec("ratio", flag_share=0.15))
    n_tok = sum(len(o["token_ids"]) for o in objs)
    assert info["n_tokens"] == n_tok and info["n_flagged"] == sum(sum(o["divergence"]) for o in flagged)
    assert abs(info["n_flagged"] - round(0.15 * n_tok)) <= 1  # rounded scores may tie at the boundary
    assert info["realised_share"] == info["n_flagged"] / n_tok
    for o, src in zip(flagged, objs):
        ratio = dv.row_log_ratio(src, "max")
        assert o["divergence"] == (ratio >= info["min_ratio"]).tolist()
        assert o["rule"] == "ratio" and o["rule_params"] == info
    assert objs[0]["rule"] == "paper" and "rule_params" not in objs[0]  # the inputs are left alone
    # a fixed threshold equal to the chosen one gives the same flags
    again, info2 = dv.flag_rows(objs, dv.RuleSpec("ratio", min_ratio=info["min_ratio"]))
    assert [o["divergence"] for o in again] == [o["divergence"] for o in flagged]
    assert info2["flag_share"] is None and info2["n_flagged"] == info["n_flagged"]
    # the paper rule recomputed from the stored argmaxes gives back the paper flags
    paper, _ = dv.flag_rows(flagged, dv.RuleSpec("paper"))
    assert [o["divergence"] for o in paper] == [o["divergence"] for o in objs]
    assert all("rule_params" not in o for o in paper)


def test_reflag_round_trips_through_distill_probes_and_plots(div_file, tmp_path, capsys):
    from subliminal.probes.plots import _flags_of

    path, objs = div_file
    n_tok = sum(len(o["token_ids"]) for o in objs)
    n_paper = sum(sum(o["divergence"]) for o in objs)
    out = tmp_path / "owl.ratio.div.jsonl"
    argv = ["reflag-divergence", str(path), "--out", str(out), "--rule", "ratio", "--flag-share",
            repr(n_paper / n_tok)]
    assert cli.main(argv) == 0
    assert "rule ratio (max over counterfactuals)" in capsys.readouterr().out
    man = json.loads((tmp_path / "owl.ratio.div.jsonl.manifest.json").read_text())
    assert man["rule"]["rule"] == "ratio" and man["rule"]["flag_share"] == n_paper / n_tok
    assert man["summary"]["n_divergence_tokens"] == man["rule"]["n_flagged"]
    back = dv.load_divergence(out)
    rows, _ = distill.read_training_rows(out)
    assert [r.divergence for r in rows] == [o["divergence"] for o in back] == [dv.any_flags(o) for o in back]
    for o in back:
        n = len(o["token_ids"])
        assert dv.row_flags(o, "x") == o["divergence"] == _flags_of(o, n, "x")
    # masks: no-divergence drops exactly the flagged tokens, the random control as many per row
    ratio_masked = n_tok - sum(map(sum, distill.row_masks(rows, "no-divergence", 1)))
    assert ratio_masked == man["rule"]["n_flagged"]
    assert sum(map(sum, distill.row_masks(rows, "only-divergence", 1))) == ratio_masked
    for r, nd, rm in zip(rows, distill.row_masks(rows, "no-divergence", 1), distill.row_masks(rows, "random-matched", 1)):
        clean = len(r.divergence) - sum(r.divergence)
        assert len(nd) - sum(rm) == min(len(nd) - sum(nd), clean)
        assert not any(f and not keep for f, keep in zip(r.divergence, rm))  # drawn from unflagged tokens
    # at the paper rule's share, both rules mask the same number of tokens (up to boundary ties)
    paper_rows, _ = distill.read_training_rows(path)
    paper_masked = n_tok - sum(map(sum, distill.row_masks(paper_rows, "no-divergence", 1)))
    assert paper_masked == n_paper and abs(ratio_masked - paper_masked) <= 1
    # never over the input; the input untouched
    before = path.read_text()
    assert cli.main(["reflag-divergence", str(path), "--out", str(path), "--rule", "ratio", "--min-ratio", "1"]) == 2
    assert "never writes over its input" in capsys.readouterr().err
    assert path.read_text() == before
    assert cli.main(["reflag-divergence", str(path), "--out", str(tmp_path / "x.jsonl"), "--rule", "ratio"]) == 2
    assert "exactly one" in capsys.readouterr().err
    # the same command again does nothing; another rule into the same file is refused unless --overwrite
    mtime = out.stat().st_mtime_ns
    assert cli.main(argv) == 0 and "nothing to do" in capsys.readouterr().out
    assert out.stat().st_mtime_ns == mtime
    other = ["reflag-divergence", str(path), "--out", str(out), "--rule", "ratio", "--min-ratio", "0.5"]
    assert cli.main(other) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main([*other, "--overwrite"]) == 0
    assert json.loads((tmp_path / "owl.ratio.div.jsonl.manifest.json").read_text())["rule"]["min_ratio"] == 0.5


# -------------------------------------------------------------------- through find-divergence


@pytest.fixture(scope="module")
def world(tiny_model_factory, tmp_path_factory):
    from subliminal.generate import SamplingConfig, generate_rows, make_prompts
    from subliminal.models import load_model

    root = tmp_path_factory.mktemp("rules-world")
    base = tiny_model_factory("llama")
    t = {}
    for a in ("owl", "cat", "dog"):
        save_teacher(root / a, TeacherSpec(base=str(base), method="prompt", bias=a, category="animal",
                                           system_prompt=system_prompt_for(a)))
        t[a] = str(root / a)
    lm = load_model(t["owl"], dtype=torch.float64)
    rows = [{k: r[k] for k in ("id", "prompt", "completion", "teacher")}
            for r in generate_rows(lm, make_prompts(6, 0), sampling=SamplingConfig(1.0), batch_size=6,
                                   max_new_tokens=6, progress=False)]
    write_jsonl(root / "owl.jsonl", rows)
    return {"teachers": t, "data": root / "owl.jsonl"}


def test_find_divergence_ratio_rule_equals_reflag_and_resumes(world, tmp_path, monkeypatch, capsys):
    t = world["teachers"]
    common = ["find-divergence", "--data", str(world["data"]), "--teacher", t["owl"], "--counterfactual", t["cat"],
              t["dog"], "--batch-size", "2", "--backend", "torch"]
    paper = tmp_path / "paper.div.jsonl"
    assert cli.main([*common, "--out", str(paper)]) == 0
    ratio_args = ["--rule", "ratio", "--flag-share", "0.2", "--ratio-reduce", "mean"]
    ratio = tmp_path / "ratio.div.jsonl"
    assert cli.main([*common, "--out", str(ratio), *ratio_args]) == 0
    assert "rule ratio (mean over counterfactuals)" in capsys.readouterr().out
    reflagged = tmp_path / "reflagged.div.jsonl"
    assert cli.main(["reflag-divergence", str(paper), "--out", str(reflagged), *ratio_args]) == 0
    a, b = dv.load_divergence(ratio), dv.load_divergence(reflagged)
    assert [o["divergence"] for o in a] == [o["divergence"] for o in b]
    assert a[0]["rule_params"] == b[0]["rule_params"]
    n_tok = sum(len(o["token_ids"]) for o in a)
    assert abs(a[0]["rule_params"]["n_flagged"] - round(0.2 * n_tok)) <= 1
    man = json.loads((tmp_path / "ratio.div.jsonl.manifest.json").read_text())
    assert man["rule"] == a[0]["rule_params"] and man["config"]["flag_share"] == 0.2
    # interrupted after the first batch, resumed: the threshold is still chosen over every row
    real, calls = dv.score_batch, []

    def interrupted(rows, *args, **kw):
        calls.append(len(rows))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(rows, *args, **kw)

    monkeypatch.setattr(dv, "score_batch", interrupted)
    res = tmp_path / "res.div.jsonl"
    assert cli.main([*common, "--out", str(res), *ratio_args]) == 130
    monkeypatch.setattr(dv, "score_batch", real)
    assert cli.main([*common, "--out", str(res), *ratio_args]) == 0
    assert res.read_text() == ratio.read_text()
    # bad rule arguments are exit 2 before any model loads
    assert cli.main([*common, "--out", str(tmp_path / "bad.jsonl"), "--min-ratio", "1"]) == 2
    assert "only apply to --rule ratio" in capsys.readouterr().err


# ------------------------------------------------------------------------------ the sweep script


def _fake_demo(root, div_objs, seeds=(1, 2, 3)):
    """A finished demo's files as the sweep reads them: manifest, results, base config, matched rows
    and the evaluations of its control, all-tokens and paper-rule students."""
    from subliminal import pipeline
    from subliminal.manifest import write_manifest

    (root / "base").mkdir(parents=True)
    (root / "base" / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    matched = root / "data" / "matched"
    matched.mkdir(parents=True)
    write_jsonl(matched / "owl.div.jsonl", div_objs)
    write_manifest(root, stage="demo", config=pipeline.DemoConfig(seeds=len(seeds)), seed=0,
                   inputs={"base": root / "base"})
    (root / "results.json").write_text(json.dumps({"steps": 7}))
    evals = {"control": 0.10, "all": 0.20, "no-divergence": 0.17, "only-divergence": 0.12}
    (root / "eval").mkdir()
    for cond, v in evals.items():
        for s in seeds:
            (root / "eval" / f"{cond}-s{s}.json").write_text(json.dumps({"exact": {"mean": v + 0.01 * s}}))


def _load_sweep():
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "experiments" / "divergence_rule_sweep.py"
    spec = importlib.util.spec_from_file_location("divergence_rule_sweep", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sweep_reflags_trains_matched_students_and_writes_curves(div_file, tmp_path, monkeypatch, caplog):
    import logging
    from pathlib import Path

    from subliminal import pipeline

    _, objs = div_file
    root = tmp_path / "demo"
    _fake_demo(root, objs)
    mod = _load_sweep()
    with caplog.at_level(logging.INFO, logger="divergence_rule_sweep"):
        assert mod.main(["--demo", str(root), "--shares", "0.05", "0.2", "--seeds", "1", "2", "--dry-run"]) == 0
    cmds = [r.getMessage() for r in caplog.records if "subliminal distill" in r.getMessage()]
    assert len(cmds) == 2 * 2 * 2  # shares x masks x seeds
    # no step count passed: distill derives the demo's own from the same rows (distill.student_steps)
    # (and hard mode, distill's default, is not spelled out in the command line made from the config)
    assert all("--max-steps" not in c and "--mode" not in c for c in cmds)
    assert sum("--mask only-divergence" in c for c in cmds) == 4
    n_tok = sum(len(o["token_ids"]) for o in objs)
    for share in (0.05, 0.2):
        st = pipeline.rule_stats(root / "rule_sweep" / "div" / f"owl.ratio-{share * 100:g}pct.div.jsonl")
        assert abs(st["flagged_tokens"] - round(share * n_tok)) <= 1

    def fake_parallel(self, tasks, workers):  # evaluations as if trained: more kept with more tokens flagged
        for name, chain in tasks:
            share = 0.05 if "-5pct-" in name else 0.2
            v = 0.10 + (share if "only" in name else 0.1 - share / 2) + 0.01 * int(name.rsplit("-s", 1)[1])
            ev = Path(chain[1][1][chain[1][1].index("--out") + 1])
            ev.parent.mkdir(parents=True, exist_ok=True)
            ev.write_text(json.dumps({"exact": {"mean": v}}))

    monkeypatch.setattr(pipeline.Runner, "parallel", fake_parallel)
    assert mod.main(["--demo", str(root), "--shares", "0.05", "0.2", "--seeds", "1", "2"]) == 0
    import csv

    rows = list(csv.DictReader(open(root / "rule_sweep" / "rule_sweep.csv")))
    paper = [r for r in rows if r["rule"] == "paper"]
    assert {r["mask"] for r in paper} == {"no-divergence", "only-divergence"}
    assert float(next(r for r in paper if r["mask"] == "no-divergence")["share_kept"]) == pytest.approx(0.7)
    ratio = {(r["share_target"], r["mask"]): r for r in rows if r["rule"] == "ratio"}
    assert float(ratio[("0.2", "only-divergence")]["share_kept"]) == pytest.approx(2.0)
    assert float(ratio[("0.05", "no-divergence")]["share_kept"]) == pytest.approx(0.75)
    assert (root / "rule_sweep" / "rule_sweep.png").stat().st_size > 1000
    table = json.loads((root / "rule_sweep" / "rule_sweep.json").read_text())
    assert table["seeds"] == [1, 2] and len(table["rows"]) == 6
    # seeds the demo has no control for are a clear error
    assert mod.main(["--demo", str(root), "--seeds", "9"]) == 2


def test_reflag_with_an_infinite_threshold_writes_strict_json(div_file, tmp_path):
    """--min-ratio inf (what the demo uses when the paper rule flags nothing) flags only tokens
    impossible under a counterfactual and stores the threshold as "inf", not a JSON error."""
    path, _ = div_file
    out = tmp_path / "none.div.jsonl"
    argv = ["reflag-divergence", str(path), "--out", str(out), "--rule", "ratio", "--min-ratio", "inf"]
    assert cli.main(argv) == 0
    man = json.loads((tmp_path / "none.div.jsonl.manifest.json").read_text())
    assert man["rule"]["min_ratio"] == "inf" and man["config"]["min_ratio"] == "inf"
    assert float(man["rule"]["min_ratio"]) == float("inf")
    assert cli.main(argv) == 0  # the same command again: finished, nothing to do
