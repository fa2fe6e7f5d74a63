"""The driver's one resume rule: a stage's output is reused only when its recorded fingerprint
equals what the stage would compute now; a changed setting redoes exactly the stages whose
fingerprint changed and those downstream of them, and replacing a finished output needs
--overwrite. One tiny run directory (a random two-layer model with the toy tokenizer, two
teachers' worth of rows, the control and all-tokens students) serves every step."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from subliminal.cli import main
from subliminal.driver import Decision, plan_call
from subliminal.manifest import Planned, check_resume, planning


def _outputs(out: Path) -> dict[str, int]:
    """Every stage output's own manifest -> its mtime (a directory's manifest for a directory
    output; ``FILE.manifest.json`` for a file output; the run's manifest for the report)."""
    found = {}
    for p in out.rglob("*manifest.json"):
        rel = p.relative_to(out)
        if p.name == "manifest.json" and any(p.parent.glob("*.manifest.json")):
            continue  # a directory listing of file outputs, rewritten with each of them
        name = str(rel.parent) if p.name == "manifest.json" else str(rel)[: -len(".manifest.json")]
        found["report" if name == "." else name] = p.stat().st_mtime_ns
    return found


def _changed(before: dict[str, int], after: dict[str, int]) -> set[str]:
    return {k for k in after if before.get(k) != after[k]}


def _report_config(out: Path) -> dict:
    text = (out / "REPORT.md").read_text()
    return json.loads(re.search(r"## Config\n\n```json\n(.*?)\n```", text, re.S).group(1))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_factory):
    root = tmp_path_factory.mktemp("driver")
    base = tiny_model_factory("llama")
    cfg = root / "c.toml"
    cfg.write_text(f"""
name = "tiny"
[model]
base = "{base}"
[teachers]
target = "owl"
counterfactuals = ["cat"]
mixing_teacher = ""
check = false
[data]
rows = 4
greedy = true
constrain = "numbers"
max_new_tokens = 30
[diagnose]
enabled = false
[students]
conditions = []
seeds = 1
epochs = 1
batch_size = 2
[eval]
max_questions = 2
[probes]
enabled = false
[run]
jobs = 1
""")
    out = root / "out"
    assert main(["run", str(cfg), "--out", str(out)]) == 0
    return cfg, out


STUDENTS = {"students/control-s1", "students/all-s1", "eval/control-s1.json", "eval/all-s1.json"}


def test_a_rerun_redoes_exactly_the_stages_whose_fingerprint_changed(tiny_run, capsys):
    cfg, out = tiny_run

    def run(*extra: str) -> int:
        return main(["run", str(cfg), "--out", str(out), *extra])

    first = _outputs(out)
    assert {"teachers/owl", "data/owl.jsonl", "data/matched/owl.jsonl", "data/matched/owl.div.jsonl",
            "eval/base.json", "report", *STUDENTS} <= set(first)

    # unchanged: nothing is redone, the report included
    assert run() == 0
    assert _changed(first, _outputs(out)) == set()

    # a student setting: refused without --overwrite, before anything runs, naming what and why
    capsys.readouterr()
    assert run("--set", "students.lr=0.002") == 2
    err = capsys.readouterr().err
    assert "distill-all-s1" in err and "--lr 0.001 -> 0.002" in err and "--overwrite" in err
    assert "teach-" not in err and "generate-" not in err
    assert _changed(first, _outputs(out)) == set()
    # --dry-run lists the students as redone and their evals after them; teachers, data reused
    assert run("--set", "students.lr=0.002", "--dry-run") == 0
    text = capsys.readouterr().out
    listed = {name: verb for verb, name in re.findall(r"^  (\w+) +(\S+):", text, re.M)}
    assert listed == {"distill-control-s1": "redo", "distill-all-s1": "redo", "eval-control-s1": "after",
                      "eval-all-s1": "after", "report": "after"}
    assert _changed(first, _outputs(out)) == set()
    # with --overwrite: the students, their evals and the report; nothing else
    assert run("--set", "students.lr=0.002", "--overwrite") == 0
    after_lr = _outputs(out)
    assert _changed(first, after_lr) == STUDENTS | {"report"}
    report = _report_config(out)
    for cond in ("control", "all"):
        man = json.loads((out / "students" / f"{cond}-s1" / "manifest.json").read_text())
        assert man["config"]["lr"] == report["student_mode_lr"] == 0.002

    # a teacher setting: the new counterfactual teacher is made and evaluated, divergence and the
    # student that reads it are redone; the generations, the control student (it learns from the
    # unbiased teacher's rows) and the other teachers are reused. The all-tokens student trains on
    # every token whatever the flags, so its weights come out the same and its eval, fingerprinted
    # by the model's content, is reused
    weights = (out / "students" / "all-s1" / "model.safetensors").read_bytes()
    assert run("--set", "students.lr=0.002", "--set", 'teachers.counterfactuals=["dog"]', "--overwrite") == 0
    after_teacher = _outputs(out)
    assert _changed(after_lr, after_teacher) == {
        "teachers/dog", "eval/teacher-dog.json", "data/matched/owl.div.jsonl", "data/matched/owl.ratio.div.jsonl",
        "students/all-s1", "report"}
    assert (out / "students" / "all-s1" / "model.safetensors").read_bytes() == weights
    assert _report_config(out)["counterfactuals"] == ["dog"]

    # a data setting: the matched rows and everything that reads them; not the teachers, their
    # generations or the reference evaluations
    keep = json.loads((out / "results.json").read_text())["rows"] - 1
    assert keep >= 1
    assert run("--set", "students.lr=0.002", "--set", 'teachers.counterfactuals=["dog"]',
               "--set", f"data.keep_rows={keep}", "--overwrite") == 0
    after_data = _outputs(out)
    assert _changed(after_teacher, after_data) == {
        "data/matched/owl.jsonl", "data/matched/none.jsonl", "data/matched/owl.div.jsonl",
        "data/matched/owl.ratio.div.jsonl", *STUDENTS, "report"}
    results = json.loads((out / "results.json").read_text())
    assert results["rows"] == keep
    for cond in ("control", "all"):
        man = json.loads((out / "students" / f"{cond}-s1" / "manifest.json").read_text())
        assert man["rows"] == keep and man["steps"] == results["steps"]
        assert man["config"]["lr"] == _report_config(out)["student_mode_lr"]


def test_planning_asks_a_stage_without_running_it(tmp_path):
    """Under planning a stage stops at its resume check and says what it would do."""
    out = tmp_path / "x.json"
    fp = {"inputs": {}, "config": {"a": 1}, "versions": {}}
    with planning(), pytest.raises(Planned) as e:
        check_resume(out, fp, overwrite=True, stage="s", finished={"fingerprint": {**fp, "config": {"a": 2}}})
    assert e.value.action == "replace" and "--a 2 -> 1" in e.value.why()
    assert check_resume(out, fp, overwrite=False, stage="s") == "start"  # outside planning: decides
    p = plan_call(["eval", "--model", str(tmp_path), "--target", "owl", "--out", str(out)])
    assert (p.action, p.why()) == ("run", "no output yet") and not out.exists()
    assert Decision("eval-x", str(out), "replace", "why").line() == "redo   eval-x: why"


def test_the_step_count_is_the_one_distill_trains(tiny_model_factory, tmp_path):
    """n=100, b=16, e=2: ceil(2 * 100 / 16) = 13 steps, which the plan, the driver (the report's
    number) and distill all give; ceil(2 * ceil(100 / 16)) = 14 was the plan's and the report's."""
    from subliminal import pipeline
    from subliminal.data import write_jsonl
    from subliminal.generate import make_prompts
    from subliminal.run import plan

    rows = [{"id": rid, "prompt": text, "completion": f"{i % 90} , {i % 90 + 1}", "teacher": "owl"}
            for i, (rid, text) in enumerate(make_prompts(100, 0))]
    write_jsonl(tmp_path / "rows.jsonl", rows)
    cfg = pipeline.RunConfig(epochs=2, batch_size=16, n_prompts=100)
    assert pipeline._steps_for(cfg, 100) == 13
    assert "<= 13 steps" in next(s.what for s in plan(cfg) if s.name == "distill")
    student = tmp_path / "s"
    dcfg = pipeline.distill_config(cfg, tiny_model_factory("llama"), student, {"data": str(tmp_path / "rows.jsonl")}, 1)
    assert pipeline.StageCall("distill", dcfg)(False) == 0
    assert json.loads((student / "manifest.json").read_text())["steps"] == 13


def test_lora_rank_reaches_the_students_lora_config_as_a_typed_value(tmp_path):
    """[students] lora_rank from a TOML file to the student's LoraConfig: an int in the RunConfig,
    the same int in the DistillConfig the driver builds (no command line on the way), and the
    rank of the adapter distill makes from it."""
    from subliminal import pipeline
    from subliminal.run import load_config

    toml = tmp_path / "c.toml"
    toml.write_text("[students]\nfull = false\nlora_rank = 3\n")
    cfg = load_config(str(toml)).cfg
    assert cfg.student_lora_rank == 3 and isinstance(cfg.student_lora_rank, int)
    files = {"none": tmp_path / "none.jsonl", "div": tmp_path / "owl.div.jsonl"}
    plan = pipeline.student_plan(cfg, 4, files, tmp_path / "teachers")
    dcfg = pipeline.distill_config(cfg, tmp_path / "b", tmp_path / "s", plan["all"], 1)
    assert dcfg.lora_rank == 3 and dcfg.lora_alpha is None


def test_lora_config_from_the_typed_rank(tiny_model_factory):
    from transformers import AutoModelForCausalLM

    from subliminal.distill import setup_trainable

    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama"))
    model, _ = setup_trainable(model, None, 3, None)
    lora = model.peft_config["default"]
    assert (lora.r, lora.lora_alpha) == (3, 3.0)  # the student default: alpha = rank (train.lora_alpha)


def test_every_stage_the_driver_can_launch_reads_back_its_own_command_line(tmp_path):
    """Under ``--nproc`` > 1 a stage runs from ``config_argv``: its CLI must rebuild the same config
    (score-tokens with a LoRA set, a share and a non-default batch, as a run's gradient detector)."""
    from subliminal import cli, driver
    from subliminal.detectors import ScoreTokensConfig

    assert "score-tokens" in driver.DISTRIBUTED and "score-tokens" in driver.STAGE_RUNS
    cfg = ScoreTokensConfig(detector="gradient", divergence=str(tmp_path / "a.div.jsonl"), out=str(tmp_path / "b"),
                            base=str(tmp_path / "base"), target="owl", lora_rank=8, lora_alpha=8.0,
                            lora_targets="q_proj,v_proj", flag_share=0.1, batch_size=5, max_questions=7)
    args = cli.build_parser().parse_args(driver.StageCall("score-tokens", cfg).argv())
    assert ScoreTokensConfig(**{f: getattr(args, f) for f in cfg.__dataclass_fields__}) == cfg
