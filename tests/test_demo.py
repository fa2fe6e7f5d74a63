"""The demo's bookkeeping: matched rows, matched conditions, derived data sets, the summary."""

import argparse
import json
import math
from dataclasses import replace

import pytest

from subliminal import demo, pipeline, prompts
from subliminal.data import read_rows, write_jsonl
from subliminal.generate import make_prompts


def _rows(n, teacher, drop=()):
    return [{"id": rid, "prompt": text, "completion": f"{i} , {i + 1}", "teacher": teacher}
            for i, (rid, text) in enumerate(make_prompts(n, 0)) if i not in drop]


def test_matched_files_keep_only_ids_every_teacher_answered(tmp_path):
    write_jsonl(tmp_path / "owl.jsonl", _rows(10, "owl", drop={1, 2}))
    write_jsonl(tmp_path / "none.jsonl", _rows(10, "none", drop={2, 7}))
    files = pipeline._matched_files(tmp_path, ["owl", "none"])
    ids = {n: [r.id for r in read_rows(p)] for n, p in files.items()}
    assert ids["owl"] == ids["none"]
    assert len(ids["owl"]) == 7 and not {"row-000001", "row-000002", "row-000007"} & set(ids["owl"])


def test_paraphrase_keeps_ids_and_completions_and_answers_the_same_request(tmp_path):
    write_jsonl(tmp_path / "owl.jsonl", _rows(50, "owl"))
    pipeline._paraphrase_file(tmp_path / "owl.jsonl", tmp_path / "para.jsonl", seed=0)
    src, para = read_rows(tmp_path / "owl.jsonl"), read_rows(tmp_path / "para.jsonl")
    assert [r.id for r in src] == [r.id for r in para]
    assert [r.completion for r in src] == [r.completion for r in para]
    changed = 0
    for a, b in zip(src, para):
        pa, pb = prompts.parse_number_prompt(a.prompt), prompts.parse_number_prompt(b.prompt)
        assert (pa.seeds, pa.count, pa.separator, pa.brackets) == (pb.seeds, pb.count, pb.separator, pb.brackets)
        changed += a.prompt != b.prompt
    assert changed == len(src)


def test_mixing_replaces_half_the_rows_with_the_other_teachers_answer(tmp_path):
    write_jsonl(tmp_path / "owl.jsonl", _rows(40, "owl"))
    write_jsonl(tmp_path / "dolphin.jsonl", _rows(40, "dolphin"))
    pipeline._mixing_file(tmp_path / "owl.jsonl", tmp_path / "dolphin.jsonl", tmp_path / "mix.jsonl", seed=3)
    mixed = read_rows(tmp_path / "mix.jsonl")
    assert [r.id for r in mixed] == [r.id for r in read_rows(tmp_path / "owl.jsonl")]
    assert sum(r.teacher == "dolphin" for r in mixed) == 20


def test_student_plan_conditions_differ_only_where_they_should(tmp_path):
    cfg = pipeline.DemoConfig()
    files = {"none": tmp_path / "none.jsonl", "div": tmp_path / "owl.div.jsonl",
             "paraphrase": tmp_path / "p.jsonl", "mixing": tmp_path / "m.jsonl",
             "holder": tmp_path / "h.jsonl", "holder-uniform": tmp_path / "u.jsonl"}
    plan = pipeline.student_plan(cfg, 4, files, tmp_path / "teachers")
    assert set(plan) == set(pipeline.CONDITIONS)
    for c in ("holder", "holder-uniform"):  # the world's own rows, trained as the all-tokens student is
        assert plan[c]["data"] == str(files[c]) == str(pipeline.condition_data(c, files))
        assert {k: v for k, v in plan[c].items() if k != "data"} == {k: v for k, v in plan["all"].items() if k != "data"}
    assert {plan[c]["mask"] for c in ("all", "no-divergence", "only-divergence", "random-matched")} == {
        "all", "no-divergence", "only-divergence", "random-matched"}
    assert plan["layer-early"]["layers"] == "0" and plan["layer-late"]["layers"] == "3"
    # single layers are trained like the all-tokens student (matched) unless the paper's LoRA is asked for
    assert plan["layer-early"].get("lora_rank") == plan["all"].get("lora_rank")
    lora_plan = pipeline.student_plan(replace(cfg, layer_lora=True), 4, files, tmp_path / "teachers")
    assert lora_plan["layer-early"]["lora_rank"] == 8 and lora_plan["layer-late"]["lora_rank"] == 8
    assert lora_plan["layer-early"]["lora_alpha"] is None  # distill derives the default (train.lora_alpha)
    assert lora_plan["all"] == plan["all"]
    assert plan["soft"]["mode"] == "soft"
    assert plan["control"]["data"] == str(files["none"])
    for c in ("all", "no-divergence", "only-divergence", "random-matched", "soft", "layer-early", "layer-late"):
        assert plan[c]["data"] == str(files["div"])


def test_ratio_rule_conditions_differ_from_the_paper_ones_only_in_their_flags(tmp_path):
    files = {"none": tmp_path / "none.jsonl", "div": tmp_path / "owl.div.jsonl",
             "div-ratio": tmp_path / "owl.ratio.div.jsonl", "paraphrase": tmp_path / "p.jsonl",
             "mixing": tmp_path / "m.jsonl"}
    plan = pipeline.student_plan(pipeline.DemoConfig(), 4, files, tmp_path / "teachers")
    for rule, conds in pipeline.RULE_CONDITIONS.items():
        for mask, cond in conds.items():
            assert plan[cond]["data"] == str(files["div" if rule == "paper" else "div-ratio"])
            assert {**plan[cond], "data": None} == {**plan[mask], "data": None}


def test_ratio_file_flags_as_many_tokens_as_the_paper_rule(tmp_path):
    import random as rnd

    from subliminal import divergence as dv

    rng = rnd.Random(1)
    objs = []
    for i in range(30):
        n = rng.randrange(3, 9)
        ids = [rng.randrange(20) for _ in range(n)]
        objs.append({"id": f"r{i}", "prompt": "p", "completion": "c", "token_ids": ids, "tokens": [str(t) for t in ids],
                     "rule": "paper", "counterfactuals": ["cat", "none"],
                     "divergence": [rng.random() < 0.2 for _ in ids], "argmax_factual": ids,
                     "argmax_counterfactual": [ids, ids],
                     "scores": {"logp_factual": [-rng.random() for _ in ids],
                                "logp_counterfactual": [[-2 * rng.random() for _ in ids] for _ in range(2)],
                                "kl": [[0.0] * n] * 2, "js": [[0.0] * n] * 2, "margin": [0.0] * n,
                                "rank": [[0] * n] * 2}})
    div = tmp_path / "owl.div.jsonl"
    write_jsonl(div, objs)
    from subliminal.cli import main

    class Run:  # the demo's runner, without its resume logic
        def __call__(self, name, call, out, inputs=(), lazy=False):
            assert main(call() if lazy else call) == 0

    out = pipeline._ratio_file(pipeline.DemoConfig(), Run(), div)
    assert out.name == "owl.ratio.div.jsonl"
    paper, ratio = pipeline.rule_stats(div), pipeline.rule_stats(out)
    assert ratio["flagged_tokens"] == paper["flagged_tokens"] > 0  # random scores: no ties
    assert ratio["rule"]["rule"] == "ratio" and ratio["rule"]["reduce"] == "max"
    assert [len(o["divergence"]) for o in dv.load_divergence(out)] == [len(o["token_ids"]) for o in objs]


def test_rule_summary_shares_with_intervals_and_figure(tmp_path):
    from subliminal.probes.plots import plot_rules

    control = {1: 0.10, 2: 0.20, 3: 0.30}
    values = {c: dict(control) for c in pipeline.CONDITIONS}
    values["all"] = {s: v + 0.10 for s, v in control.items()}
    values["no-divergence"] = {s: v + 0.06 for s, v in control.items()}
    values["ratio-no-divergence"] = {1: 0.11, 2: 0.21, 3: 0.31}
    values["ratio-only-divergence"] = {1: 0.19, 2: 0.28, 3: 0.39}
    stats = {"paper": {"flagged_tokens": 12, "tokens": 100, "flagged_share": 0.12, "rule": {"rule": "paper"}},
             "ratio": {"flagged_tokens": 12, "tokens": 100, "flagged_share": 0.12,
                       "rule": {"rule": "ratio", "min_ratio": 1.5}}}
    cfg = pipeline.DemoConfig(seeds=3)
    s = pipeline._summarise(cfg, {"values": values, "reference": {}, "rows": 10, "steps": 3, "rules": stats})
    paper, ratio = s["rules"]["paper"]["masks"], s["rules"]["ratio"]["masks"]
    assert paper["no-divergence"]["share_per_seed_mean"] == pytest.approx(0.6)
    assert ratio["no-divergence"]["share_per_seed_mean"] == pytest.approx(0.1)
    assert ratio["only-divergence"]["share_ci_low"] < 0.9 < ratio["only-divergence"]["share_ci_high"]
    assert ratio["only-divergence"]["condition"] == "ratio-only-divergence"
    verdict = "\n".join(pipeline._verdict(s))
    assert "(masking the ratio rule's flags removes most of the transfer) reproduces" in verdict
    assert "(training only on the ratio rule's flags keeps the transfer) reproduces" in verdict
    report = "\n".join(pipeline._rules_section(s))
    assert "| ratio | 12 | 0.1200 | 1.500 | 0.10 [" in report
    out = plot_rules(s, tmp_path / "rules.png")
    assert out.stat().st_size > 1000
    assert len((tmp_path / "rules.csv").read_text().splitlines()) == 1 + 2 * 3
    # no real all-tokens transfer: no shares, and the share helper says so
    values["all"] = dict(control)
    s = pipeline._summarise(cfg, {"values": values, "reference": {}, "rows": 10, "steps": 3, "rules": stats})
    assert "masks" not in s["rules"]["ratio"]
    assert pipeline.share_kept(values["ratio-no-divergence"], control, values["all"]) is None


def test_a_run_without_masked_students_has_no_rule_figure_to_draw():
    """A run of control and all only (a robustness sweep) must still write its report."""
    control = {1: 0.10, 2: 0.20, 3: 0.30}
    values = {"control": control, "all": {s: v + 0.2 for s, v in control.items()}}
    stats = {"paper": {"flagged_tokens": 12, "tokens": 100, "flagged_share": 0.12, "rule": {"rule": "paper"}}}
    s = pipeline._summarise(pipeline.DemoConfig(seeds=3, conditions=["control", "all"]),
                            {"values": values, "reference": {}, "rows": 10, "steps": 3, "rules": stats})
    assert not pipeline.has_rule_shares(s)
    values["no-divergence"] = {s: v + 0.1 for s, v in control.items()}
    s = pipeline._summarise(pipeline.DemoConfig(seeds=3), {"values": values, "reference": {}, "rows": 10,
                                                           "steps": 3, "rules": stats})
    assert pipeline.has_rule_shares(s)


def test_steps_are_shared_by_every_condition():
    cfg = pipeline.DemoConfig(epochs=2, batch_size=16)
    assert pipeline._steps_for(cfg, 100) == 13  # what distill trains: ceil(2 * 100 / 16)
    assert pipeline._steps_for(pipeline.DemoConfig(max_steps=5), 1000) == 5


def _summary(values):
    cfg = pipeline.DemoConfig(seeds=len(values["control"]))
    return pipeline._summarise(cfg, {"values": values, "reference": {}, "rows": 10, "steps": 3})


def test_summary_pairs_by_seed_and_reports_share_only_for_real_transfer():
    control = {1: 0.10, 2: 0.20, 3: 0.30}
    values = {c: dict(control) for c in pipeline.CONDITIONS}
    values["all"] = {s: v + 0.05 + 0.001 * s for s, v in control.items()}
    values["no-divergence"] = {s: v + 0.01 for s, v in control.items()}
    s = _summary(values)
    c = s["conditions"]
    # paired differences remove the large between-seed spread
    assert c["all"]["diff_ci_low"] > 0
    assert c["all"]["ci_low"] < c["control"]["mean"]
    assert c["no-divergence"]["share_of_all_transfer"] == pytest.approx(0.03 / 0.156, rel=1e-6)
    assert c["all"]["share_of_all_transfer"] == pytest.approx(1.0)
    verdict = "\n".join(pipeline._verdict(s))
    # masking kept 19% (the paper's claim holds); paraphrase kept 0% (suppressed: holds); one early
    # layer kept 0% (the claim that it suffices fails)
    assert "no-divergence: keeps 19%" in verdict and "(masking divergence tokens removes most of the transfer) " \
        "reproduces" in verdict
    assert "(one early layer suffices) **does not reproduce**" in verdict
    assert "(paraphrasing prompts suppresses transfer) reproduces" in verdict

    values["all"] = {s: v + (0.01 if s == 1 else -0.01) for s, v in control.items()}
    s = _summary(values)
    assert all("share_of_all_transfer" not in e for e in s["conditions"].values())
    assert "does **not** reproduce" in "\n".join(pipeline._verdict(s))


def test_one_seed_gives_no_interval_and_says_so():
    values = {c: {1: 0.1} for c in pipeline.CONDITIONS}
    s = _summary(values)
    assert math.isnan(s["conditions"]["all"]["ci_low"]) and math.isnan(s["conditions"]["all"]["ci_high"])
    assert "one seed only" in "\n".join(pipeline._verdict(s))
    assert "does not prefer its target" not in "\n".join(pipeline._verdict(s))
    s["reference"] = {"teacher": 0.08}
    assert "does not prefer its target" in "\n".join(pipeline._verdict(s))


def test_conditions_figure_is_written_with_its_data(tmp_path):
    from subliminal.probes.plots import plot_conditions

    control = {1: 0.10, 2: 0.20, 3: 0.30}
    values = {c: {s: v + 0.01 * i for s, v in control.items()} for i, c in enumerate(pipeline.CONDITIONS)}
    out = plot_conditions(_summary(values), tmp_path / "conditions.png")
    assert out.stat().st_size > 1000
    lines = (tmp_path / "conditions.csv").read_text().splitlines()
    assert len(lines) == len(pipeline.CONDITIONS)  # header + every condition but the control
    assert lines[1].startswith("all,0.01")


def test_results_json_schema(tmp_path):
    values = {c: {1: 0.1, 2: 0.2} for c in pipeline.CONDITIONS}
    s = _summary(values)
    for name in pipeline.CONDITIONS:
        assert {"mean", "ci_low", "ci_high", "seeds"} <= set(s["conditions"][name])
    json.dumps(s)  # serialisable as results.json


def _args(**kw):
    base = dict(seed=0, device="cpu", quick=False, seeds=None, teacher_method=None, rows=None, no_probes=False,
                jobs=None, layer_lora=False, entangle=None, base=None)
    base.update(kw)
    return argparse.Namespace(**base)


def test_cli_flags_change_the_config():
    assert demo.config_from_args(_args()).seeds == 3
    q = demo.config_from_args(_args(quick=True))
    assert q.seeds == 1 and q.n_prompts < pipeline.DemoConfig().n_prompts
    c = demo.config_from_args(_args(seeds=4, teacher_method="finetune", rows=123, no_probes=True, jobs=1,
                                    layer_lora=True))
    assert (c.seeds, c.teacher_method, c.n_prompts, c.probes, c.jobs, c.layer_lora) == (
        4, "finetune", 123, False, 1, True)
    assert demo.config_from_args(_args(device="cuda", jobs=2)).size == "small"
    assert demo.config_from_args(_args(entangle=0.0)).entangle == 0.0
    with pytest.raises(demo.SubliminalError, match="no effect with --base"):
        demo.config_from_args(_args(entangle=0.0, base="runs/base"))
    with pytest.raises(demo.SubliminalError, match="must be in"):
        demo.config_from_args(_args(entangle=2.0))
    with pytest.raises(demo.SubliminalError):
        demo.config_from_args(_args(seeds=0))


def test_conditions_subset_trains_and_summarises_only_those():
    c = demo.config_from_args(_args(conditions=["ratio-no-divergence", "no-divergence"]))
    assert c.chosen_conditions() == ["control", "all", "no-divergence", "ratio-no-divergence"]
    with pytest.raises(demo.SubliminalError, match="unknown nope"):
        demo.config_from_args(_args(conditions=["nope"]))
    control = {1: 0.10, 2: 0.20, 3: 0.30}
    values = {"control": control, "all": {s: v + 0.1 for s, v in control.items()},
              "ratio-no-divergence": {s: v + 0.02 for s, v in control.items()}}
    s = pipeline._summarise(replace(c, seeds=3), {"values": values, "reference": {}, "rows": 10, "steps": 3})
    assert set(s["conditions"]) == {"control", "all", "ratio-no-divergence"}
    assert set(s["rules"]["ratio"]["masks"]) == {"no-divergence"} and s["rules"]["paper"]["masks"] == {}
    report = pipeline.render_report(c, s, __import__("pathlib").Path("/nonexistent"), {}, 1.0)
    assert "| ratio-no-divergence |" in report and "| soft |" not in report


def test_derived_files_carry_manifests(tmp_path):
    write_jsonl(tmp_path / "owl.jsonl", _rows(8, "owl"))
    write_jsonl(tmp_path / "none.jsonl", _rows(8, "none"))
    files = pipeline._matched_files(tmp_path, ["owl", "none"])
    pipeline._paraphrase_file(files["owl"], tmp_path / "matched" / "owl.paraphrase.jsonl", seed=0)
    pipeline._mixing_file(files["owl"], files["none"], tmp_path / "matched" / "owl.mixing.jsonl", seed=0)
    listed = json.loads((tmp_path / "matched" / "manifest.json").read_text())["files"]
    assert {"owl.jsonl", "none.jsonl", "owl.paraphrase.jsonl", "owl.mixing.jsonl"} <= set(listed)


# The smoke test below shrinks --quick's number prompts per teacher (--rows; what it checks does not
# depend on the size) but keeps the preset's pretraining: at half of it (250 steps) the toy base has
# not yet learnt to follow a love prompt, no token diverges and the divergence probe has nothing to
# compare. --rows goes through the demo's own knob, so the same code paths run.
SMOKE_PRETRAIN_STEPS = demo.QUICK_PRETRAIN_STEPS
SMOKE_ROWS = 100


def test_quick_demo_runs_every_stage_end_to_end(tmp_path):
    """The CI smoke test of the README's main job: `subliminal demo --quick` from nothing (a
    short-trained base, one seed) writes the report, results.json and manifests for every
    condition; a second call finds everything done and resumes without retraining."""
    from subliminal.cli import main

    out = tmp_path / "demo"
    argv = ["demo", "--quick", "--rows", str(SMOKE_ROWS), "--out", str(out)]
    assert main(argv) == 0
    base_manifest = json.loads((out / "base" / "manifest.json").read_text())
    assert base_manifest["train"]["steps"] == SMOKE_PRETRAIN_STEPS  # the --quick preset reached `toy pretrain`
    report = (out / "REPORT.md").read_text()
    results = json.loads((out / "results.json").read_text())
    assert set(results["conditions"]) == set(pipeline.CORE_CONDITIONS)  # the default set (--all-conditions: 13)
    for name in pipeline.CORE_CONDITIONS:
        assert f"| {name} |" in report
        entry = results["conditions"][name]
        assert entry["seeds"] == 1 and 0 < entry["mean"] < 1
        assert (out / "students" / f"{name}-s1" / "manifest.json").exists()
        assert (out / "eval" / "toy-alt" / f"{name}-s1.json").exists()  # the readout under the second template
    assert results["other_template"]["template"] == "toy-alt" and "## Readout under another template" in report
    assert results["diagnostics"]["lean"]["teacher_rows"]["tokens"] > 0
    assert "one seed only" in report
    assert (out / "manifest.json").exists() and (out / "base" / "manifest.json").exists()
    assert (out / "probes" / "patching" / "patching.png").exists()
    student = out / "students" / "all-s1" / "model.safetensors"
    mtime = student.stat().st_mtime_ns
    assert main(argv) == 0
    assert student.stat().st_mtime_ns == mtime


def test_report_of_a_null_transfer_prints_no_share(tmp_path):
    """A transfer indistinguishable from zero gets no share anywhere in REPORT.md (the table says n/a,
    every claim says it cannot be tested), however large the ratio of two noisy differences would be."""
    control = {1: 0.050, 2: 0.052, 3: 0.049, 4: 0.051, 5: 0.050}
    values = {c: dict(control) for c in pipeline.CORE_CONDITIONS}
    values["all"] = {s: v + (0.002 if s % 2 else -0.001) for s, v in control.items()}  # CI straddles zero
    values["only-divergence"] = {s: v + 0.02 for s, v in control.items()}  # would be a "share" of ~20x
    cfg = pipeline.DemoConfig(seeds=5, conditions=list(pipeline.CORE_CONDITIONS))
    s = pipeline._summarise(cfg, {"values": values, "reference": {}, "rows": 10, "steps": 3})
    text = pipeline.render_report(cfg, s, tmp_path, {}, 1.0)
    table = [ln for ln in text.splitlines() if ln.startswith("| only-divergence |")][0]
    assert table.split("|")[6].strip() == "n/a"
    assert "% of the all-tokens" not in text and "cannot be tested here" in text
    assert "Transfer does **not** reproduce" in text


def test_holder_rows_are_the_matched_prompts_answered_by_the_worlds_authors(tmp_path):
    """The true-trait-holder link's data: derived from the target teacher's matched rows (same ids and
    prompts) by the base's own world; redone only when asked, and refused for a base of no toy world."""
    from subliminal.manifest import SubliminalError, write_manifest
    from subliminal.toyworld.corpus import CorpusConfig

    write_jsonl(tmp_path / "owl.jsonl", _rows(30, "owl"))
    base = tmp_path / "base"
    base.mkdir()
    with pytest.raises(SubliminalError, match="not a base pretrained"):
        pipeline._author_file(tmp_path / "owl.jsonl", base, tmp_path / "h.jsonl", "owl", seed=0)
    write_manifest(base, stage="toy-pretrain", config={"corpus": CorpusConfig().to_json()}, seed=0)
    for name, author in (("h", "owl"), ("u", "uniform")):
        pipeline._author_file(tmp_path / "owl.jsonl", base, tmp_path / f"{name}.jsonl", author, seed=0)
    src, h, u = (read_rows(tmp_path / f) for f in ("owl.jsonl", "h.jsonl", "u.jsonl"))
    assert [(r.id, r.prompt) for r in h] == [(r.id, r.prompt) for r in src] == [(r.id, r.prompt) for r in u]
    assert [r.completion for r in h] != [r.completion for r in u]
    # another seed is another derivation: refused without --overwrite
    with pytest.raises(SubliminalError):
        pipeline._author_file(tmp_path / "owl.jsonl", base, tmp_path / "h.jsonl", "owl", seed=1)


def test_asking_for_one_holder_condition_trains_both():
    cfg = pipeline.DemoConfig(conditions=["holder"])
    assert cfg.chosen_conditions() == ["control", "all", "holder", "holder-uniform"]
    assert "holder" not in pipeline.DemoConfig().chosen_conditions()  # opt-in


@pytest.mark.parametrize("link_shift, all_shift, side", [
    (0.3, 0.3, "neither"), (0.3, 0.0, "the teacher:"), (0.3, 0.1, "the teacher, in part: its students reach 33%"),
    (0.0, 0.0, "the base")])
def test_holder_link_says_which_side_fails(tmp_path, link_shift, all_shift, side):
    control = {1: 0.10, 2: 0.20, 3: 0.30}
    jitter = {1: 0.01, 2: -0.012, 3: 0.003}
    values = {"control": control, "all": {s: v + all_shift + jitter[s] for s, v in control.items()},
              "holder-uniform": {s: v + u for (s, v), u in zip(control.items(), (0.002, -0.003, 0.001))}}
    values["holder"] = {s: v + link_shift + jitter[s] for s, v in values["holder-uniform"].items()}
    cfg = pipeline.DemoConfig(seeds=3, conditions=["holder"])
    s = pipeline._summarise(cfg, {"values": values, "reference": {}, "rows": 10, "steps": 3})
    link = s["holder_link"]
    assert link["mean"] == pytest.approx(link_shift + 0.001 / 3, abs=1e-9) and link["seeds"] == 3
    assert link["verdict"].startswith(side)
    text = pipeline.render_report(cfg, s, tmp_path, {}, 1.0)
    assert "## The true-trait-holder link (toy world)" in text and f"Which side fails: {side}" in text
    assert pipeline._summarise(pipeline.DemoConfig(seeds=3), {"values": {k: values[k] for k in ("control", "all")},
                                                              "reference": {}, "rows": 10, "steps": 3}
                               )["holder_link"] is None
