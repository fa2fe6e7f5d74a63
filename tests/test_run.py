"""``subliminal run``: configs, overrides, the plan, and the protocol end to end on a real tokenizer."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
from run_configs import tiny_run_config

from subliminal import pipeline
from subliminal.cli import main
from subliminal.manifest import SubliminalError
from subliminal.pipeline import RunConfig
from subliminal.run import CONFIG_DIR, load_config, parse_set, plan, render_plan


def test_the_demo_is_the_toy_config():
    """The toy config is the RunConfig defaults but for the organism's students (template rows, their
    lr and epochs, the core six conditions) and the readout under the world's second template."""
    toy, defaults = asdict(load_config("toy").cfg), asdict(RunConfig())
    differ = {k for k in toy if toy[k] != defaults[k]}
    assert differ == {"conditions", "student_params", "student_mode_lr", "epochs", "other_template", "counterfactuals",
                      "n_prompts", "seeds"}
    assert toy["conditions"] == pipeline.CORE_CONDITIONS and toy["student_params"] == "template-rows"


def test_toy_stage_commands_add_no_new_flags(tmp_path):
    cfg = load_config("toy").cfg
    files = {"none": tmp_path / "none.jsonl", "div": tmp_path / "owl.div.jsonl"}
    plan_ = pipeline.student_plan(cfg, 4, files, tmp_path / "teachers")
    dcfg = pipeline.distill_config(cfg, Path("b"), Path("s"), plan_["all"], 1)
    assert pipeline.StageCall("distill", dcfg).argv() == [
        "distill", "--base", "b", "--data", str(files["div"]), "--out", "s", "--teacher", str(tmp_path / "teachers/owl"),
        "--params", "template-rows", "--epochs", "3", "--lr", "0.003", "--seed", "1"]
    # the command line a launcher gets parses back to the same config
    from subliminal.cli import build_parser
    from subliminal.distill import DistillConfig

    args = build_parser().parse_args(pipeline.StageCall("distill", dcfg).argv())
    assert DistillConfig(**{f: getattr(args, f) for f in DistillConfig.__dataclass_fields__}) == dcfg
    assert pipeline.StageCall("eval", pipeline.eval_config(cfg, "m", Path("e.json"), 0)).argv() == [
        "eval", "--model", "m", "--target", "owl", "--out", "e.json"]
    assert pipeline.StageCall("eval", pipeline.eval_config(cfg, "m", Path("e.json"), 0, "toy-alt")).argv()[-2:] == [
        "--chat-template", "toy-alt"]
    assert pipeline.StageCall("teach", pipeline.teacher_config(cfg, Path("b"), "owl", Path("t"), 0)).argv() == [
        "teach", "--base", "b", "--method", "prompt", "--out", "t", "--bias", "owl"]


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.toml")), ids=lambda p: p.stem)
def test_every_shipped_config_loads_and_plans(path):
    loaded = load_config(str(path))
    text = render_plan(loaded.cfg, Path("runs/x"), str(path))
    assert "distill" in text and "eval" in text
    names = [s.name for s in plan(loaded.cfg)]
    assert names.index("generate") < names.index("find-divergence") < names.index("distill") < names.index("eval")


def test_plan_counts_the_detectors_scoring_and_the_shift_student():
    base = load_config("smollm2-135m-cpu", ['students.conditions=["control","all"]']).cfg
    both = load_config("smollm2-135m-cpu", ['students.conditions=["control","all","shift-no-divergence",'
                                            '"gradient-random-matched"]']).cfg
    grad = load_config("smollm2-135m-cpu", ['students.conditions=["control","all","gradient-random-matched"]']).cfg
    by = {"base": {s.name: s for s in plan(base)}, "both": {s.name: s for s in plan(both)},
          "grad": {s.name: s for s in plan(grad)}}
    assert "score-tokens" not in by["base"]
    assert by["both"]["score-tokens"].commands == 2 and by["grad"]["score-tokens"].commands == 1
    assert 0 < by["grad"]["score-tokens"].flops < by["both"]["score-tokens"].flops
    # the shift's student is trained (one more distill command) and never evaluated
    assert by["both"]["distill"].commands == 4 * base.seeds + 1 and by["grad"]["distill"].commands == 3 * base.seeds
    assert by["both"]["eval"].commands == by["base"]["eval"].commands + 2 * base.seeds
    assert "likelihood shift student" in by["both"]["distill"].what


def test_paper_config_is_the_paper_protocol():
    cfg = load_config("qwen2.5-7b-paper").cfg
    assert len(cfg.counterfactuals) == 12 and not cfg.neutral_counterfactual
    assert (cfg.n_prompts, cfg.keep_rows, cfg.student_lora_rank, cfg.epochs, cfg.student_mode_lr) == (30000, 10000, 8,
                                                                                                     10, 2e-4)
    assert (cfg.metric, cfg.eval_samples, cfg.eval_temperature, cfg.device) == ("sampled", 200, 1.0, "cuda")
    assert cfg.batch_size == 60 and cfg.grad_accum > 1 and cfg.schedule == "linear"


def test_set_overrides_parse_values_as_toml():
    assert parse_set(["students.seeds=3", "model.base=/m/q", "eval.temperature=0.5", "students.full=true",
                      'students.conditions=["control","all"]']) == {
        "students": {"seeds": 3, "full": True, "conditions": ["control", "all"]}, "model": {"base": "/m/q"},
        "eval": {"temperature": 0.5}}
    cfg = load_config("toy", ["students.seeds=2", "data.rows=10"]).cfg
    assert (cfg.seeds, cfg.n_prompts) == (2, 10)


@pytest.mark.parametrize("override,message", [
    ("students.sedes=3", "unknown key 'sedes' in \\[students\\]"),
    ("studens.seeds=3", "unknown section \\[studens\\]"),
    ("students.seeds=three", "\\[students\\] seeds: expected an integer"),
    ("students.seeds=0", "seeds must be positive"),
    ("teachers.target=unicorn", "not a known target"),
    ("students.conditions=[\"nope\"]", "unknown nope"),
    ("students.grad_accum=3", "not a multiple of grad_accum"),
    ("seeds", "expected section.key=value"),
    ("project.source=logits", "\\[project\\] source 'logits': questions or numbers"),
    ("project.layer=-1", "\\[project\\] layer must be a block index"),
    ("project.baseline=zero", "\\[project\\] baseline 'zero': others or none"),
])
def test_bad_config_values_name_the_key(override, message):
    with pytest.raises(SubliminalError, match=message):
        load_config("toy", [override])


def test_bad_toml_names_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[students]\nseeds = \n")
    with pytest.raises(SubliminalError, match="bad.toml: not valid TOML"):
        load_config(str(bad))
    with pytest.raises(SubliminalError, match="no such config file"):
        load_config(str(tmp_path / "missing.toml"))
    with pytest.raises(SubliminalError, match="no shipped config 'nope'"):
        load_config("nope")


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["run", "qwen2.5-7b-paper", "--out", str(out), "--dry-run", "--nproc", "8"]) == 0
    text = capsys.readouterr().out
    assert "7,620.0M parameters" in text and "50 command(s)" in text and "x 8 process(es)" in text
    assert '"nproc": 8' in text and not out.exists()


def test_missing_base_fails_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["run", "smollm2-135m-cpu", "--out", str(out), "--set", f"model.base={tmp_path / 'nope'}"]) == 2
    assert "no such model directory" in capsys.readouterr().err and not out.exists()


def test_nproc_runs_data_parallel_stages_under_torchrun(tmp_path, monkeypatch):
    from subliminal.cli import build_parser
    from subliminal.generate import GenerateConfig

    calls = []
    monkeypatch.setattr("subprocess.run", lambda argv: calls.append(argv) or type("R", (), {"returncode": 0})())
    run = pipeline.Runner(tmp_path, nproc=2)
    gen = GenerateConfig(teacher="t", n=3, out=str(tmp_path / "o.jsonl"), temperature=0.0)
    assert run._invoke(pipeline.StageCall("generate", gen).argv()) == 0
    assert calls[0][1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m"]
    # the command line made from the config: --num-prompts, which torchrun's parser leaves alone (a bare
    # --n it would take for its --nnodes), and it parses back to the same config
    argv = calls[0][calls[0].index("subliminal.cli") + 1:]
    assert argv[:5] == ["generate", "--teacher", "t", "--num-prompts", "3"] and "--n" not in argv
    args = build_parser().parse_args(argv)
    assert (args.n, args.temperature, args.out) == (3, 0.0, gen.out)
    # not data-parallel: in-process (and failing here: no such file)
    assert run._invoke(["plot", "heatmap", str(tmp_path / "missing.div.jsonl"), "--out", str(tmp_path / "h.png")]) == 2
    assert len(calls) == 1


def test_run_end_to_end_on_a_real_tokenizer(smol_model, tmp_path):
    """The protocol on a random model with SmolLM2's tokenizer: prompt teachers, constrained greedy
    data, divergence, LoRA students of three conditions (control and all always) and two seeds,
    exact eval, the projection on the love prompt's vector, the report; a second call resumes
    without redoing anything."""
    out = tmp_path / "run"
    cfg = tiny_run_config(tmp_path / "c.toml", smol_model, "tiny-real",
                          students='conditions = ["no-divergence"]\nseeds = 2')
    proj = ["--set", "project.enabled=true", "--set", "project.number_prompts=3", "--set", "project.layer=1"]
    assert main(["run", str(cfg), "--out", str(out), *proj]) == 0
    # the projection: a love-prompt vector measured on the base at the asked block, every model read
    vec = out / "vectors" / "owl-love-minus-others-numbers-block1.safetensors"
    described = json.loads(vec.with_suffix(".json").read_text())
    assert (described["layer"], described["baseline"], described["n_other_prompts"]) == (1, "others", 12)
    projection = json.loads((out / "project" / "projection.json").read_text())
    assert len(projection["students"]) == 6 and projection["vector"]["layer"] == 1
    shift = json.loads((out / "results.json").read_text())["projection"]["conditions"]["all"]["numbers"]
    assert shift["at_vector_layer"]["layer"] == 1 and shift["at_vector_layer"]["seeds"] == 2
    direct = projection["conditions"]["all"]["numbers"][1]["vs_reference"]
    assert shift["at_vector_layer"]["mean"] == pytest.approx(direct["mean"])
    assert "## Shift along the trait's direction" in (out / "REPORT.md").read_text()
    results = json.loads((out / "results.json").read_text())
    assert set(results["conditions"]) == {"control", "all", "no-divergence"}
    assert results["data"]["generations"]["owl"]["accepted"] == 4  # constrained: every answer is a list
    assert set(results["data"]["divergence"]["per_counterfactual"]) == {"cat", "none"}
    assert set(results["reference_detail"]) == {"base", "teacher", "unbiased-teacher", "teacher-cat"}
    report = (out / "REPORT.md").read_text()
    assert "# subliminal run report: tiny-real" in report and "## Divergence per counterfactual" in report
    man = json.loads((out / "students" / "all-s1" / "manifest.json").read_text())
    assert man["config"]["lora_rank"] == 2
    student = out / "students" / "all-s1" / "model.safetensors"
    mtime, ptime = student.stat().st_mtime_ns, (out / "project" / "projection.json").stat().st_mtime_ns
    assert main(["run", str(cfg), "--out", str(out), *proj]) == 0
    assert student.stat().st_mtime_ns == mtime
    assert (out / "project" / "projection.json").stat().st_mtime_ns == ptime


def test_gpu_config_is_the_scaled_protocol_within_its_budget():
    """smollm2-135m-gpu: what a public 1B reproduction needed (weights teacher, greedy constrained
    data, thousands of rows, LoRA students, 5 seeds, both rules' masks), bf16 on cuda, and a plan
    that stays inside the device session's ~4 minutes under the plan's own assumptions."""
    from subliminal.run import stage_seconds

    cfg = load_config("smollm2-135m-gpu").cfg
    assert (cfg.device, cfg.dtype, cfg.teacher_method, cfg.greedy, cfg.constrain) == (
        "cuda", "bfloat16", "finetune", True, "numbers")
    assert cfg.n_prompts >= 2000 and cfg.seeds == 5 and not cfg.student_full and cfg.metric == "exact"
    assert set(cfg.chosen_conditions()) == {"control", "all", "no-divergence", "only-divergence", "random-matched",
                                            "ratio-no-divergence", "ratio-only-divergence", "ratio-random-matched"}
    seconds = sum(stage_seconds(st, "cuda", 3.5e14) for st in plan(cfg))
    assert 30 < seconds < 240
    text = render_plan(cfg, Path("runs/x"), "gpu")
    assert "134.5M parameters" in text and "40 command(s)" in text and "assumptions, not measurements" in text


def test_gpu_config_runs_end_to_end_at_a_tiny_size_on_the_cpu(smol_model, tmp_path):
    """The shipped GPU config itself, only shrunk (rows, steps, one seed, two questions; probes
    off: four rows cannot hold both kinds of position) and moved to the CPU in float32: fine-tuned
    teachers, constrained greedy data, the students of both divergence rules, sampled references,
    the report."""
    out = tmp_path / "run"
    tiny = [f"model.base={smol_model}", "model.device=cpu", "model.dtype=float32", "teachers.steps=2",
            "data.rows=4", "data.batch_size=4", "divergence.batch_size=4", "students.seeds=1",
            "students.batch_size=2", "students.warmup_steps=0", "eval.max_questions=2", "eval.samples=2",
            "eval.batch_size=8", "probes.enabled=false", "run.jobs=1"]
    argv = ["run", "smollm2-135m-gpu", "--out", str(out), *(a for t in tiny for a in ("--set", t))]
    assert main([*argv, "--dry-run"]) == 0 and not out.exists()
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["conditions"]) == load_config("smollm2-135m-gpu").cfg.chosen_conditions()
    assert results["data"]["generations"]["owl"]["accepted"] == 4  # constrained: every answer is a list
    assert set(results["rules"]) == {"paper", "ratio"}
    assert results["reference_detail"]["teacher"]["sampled"]["mean"] is not None
    man = json.loads((out / "students" / "ratio-only-divergence-s1" / "manifest.json").read_text())
    assert man["config"]["lora_rank"] == 8 and man["config"]["mask"] == "only-divergence"
    assert "ratio.div.jsonl" in json.dumps(man["inputs"])
    report = (out / "REPORT.md").read_text()
    assert "# subliminal run report: smollm2-135m-gpu" in report and "## Divergence rules side by side" in report


def test_holder_conditions_on_a_base_of_no_toy_world_fail_before_any_teacher(smol_model, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = tiny_run_config(tmp_path / "c.toml", smol_model, "tiny-holder", students='conditions = ["holder"]')
    assert main(["run", str(cfg), "--out", str(out)]) == 2
    assert "rows from the world's own trait-holder exist only in the toy world" in capsys.readouterr().err
    assert not (out / "teachers").exists()
