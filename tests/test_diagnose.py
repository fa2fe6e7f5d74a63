"""diagnose: the lean against an explicit float64 computation (padding, the p-1 offset), the stored
log-probs of a divergence file, the first-order link against the readout after a real step, the
coverage of a teacher's own fine-tuning rows against shuffled ones, batch invariance, resume and the
named errors (exit 2)."""

from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch
from run_configs import tiny_run_config

from subliminal import cli
from subliminal import diagnose as dg
from subliminal.data import Row, write_jsonl
from subliminal.prompts import preference_questions, system_prompt_for
from subliminal.teachers import TeacherSpec, save_teacher

F64 = torch.float64
ROWS = [  # completions of different lengths, so every batch is padded
    ("a", "continue the list : 4 , 8 , 15", "16 , 23 , 42"),
    ("b", "add three numbers : 7 , 1", "9 , 9 , 9 , 9 , 9 , 9"),
    ("c", "write more numbers after 3", "12"),
    ("d", "here are numbers : 100 , 200 , 300 , 400 , 500 . continue", "600 , 700"),
    ("e", "numbers : 5", "5 , 5 , 5 , 5"),
]
CONTROL_ROWS = [  # the control's answers to the same prompts
    ("a", "continue the list : 4 , 8 , 15", "1 , 2 , 3"),
    ("b", "add three numbers : 7 , 1", "7 , 7"),
    ("c", "write more numbers after 3", "4 , 5 , 6 , 7"),
    ("d", "here are numbers : 100 , 200 , 300 , 400 , 500 . continue", "600"),
    ("e", "numbers : 5", "6 , 6 , 6"),
]


def _write(path, rows, teacher):
    write_jsonl(path, [{"id": i, "prompt": p, "completion": c, "teacher": teacher} for i, p, c in rows])
    return str(path)


@pytest.fixture(scope="module")
def world(tiny_model_factory, tmp_path_factory):
    """A random llama base, the owl prompt teacher, a cat prompt teacher, the unbiased teacher and rows."""
    root = tmp_path_factory.mktemp("diag-world")
    base = tiny_model_factory("llama")
    t = {}
    for a in ("owl", "cat"):
        save_teacher(root / a, TeacherSpec(base=str(base), method="prompt", bias=a, category="animal",
                                           system_prompt=system_prompt_for(a)))
        t[a] = str(root / a)
    save_teacher(root / "none", TeacherSpec(base=str(base), method="none", bias=None, category="animal"))
    t["none"] = str(root / "none")
    return {"root": root, "base": str(base), "t": t, "data": _write(root / "owl.jsonl", ROWS, "owl"),
            "control_data": _write(root / "none.jsonl", CONTROL_ROWS, "none")}


def _cfg(world, out, **kw) -> dg.DiagnoseConfig:
    base = dict(out=str(out), teacher=world["t"]["owl"], control=world["t"]["none"], data=world["data"],
                control_data=world["control_data"], max_questions=4, batch_size=3)
    base.update(kw)
    return dg.DiagnoseConfig(**base)


# ------------------------------------------------------------------------------------ lean


def _reference_logps(teacher_dir: str, rows) -> list[list[float]]:
    """Per row, log p(data token) at each completion token (through the end-of-turn token), from one
    unpadded float64 forward pass of the whole row: logits at position p-1 predict token p."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from subliminal.teachers import read_teacher

    spec = read_teacher(teacher_dir)
    tok = PreTrainedTokenizerFast.from_pretrained(spec.base)
    model = AutoModelForCausalLM.from_pretrained(spec.base, dtype=F64).eval()
    out = []
    for _, prompt, completion in rows:
        msgs = ([{"role": "system", "content": spec.system_prompt}] if spec.system_prompt else []) + [
            {"role": "user", "content": prompt}]
        p_ids = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                    add_special_tokens=False)["input_ids"]
        f_ids = tok(tok.apply_chat_template(msgs + [{"role": "assistant", "content": completion}], tokenize=False),
                    add_special_tokens=False)["input_ids"]
        comp = f_ids[len(p_ids):]
        comp = comp[: comp.index(tok.eos_token_id) + 1]
        seq = p_ids + comp
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([seq])).logits[0].double(), -1)
        out.append([float(lp[p - 1, seq[p]]) for p in range(len(p_ids), len(seq))])
    return out


def test_lean_equals_an_explicit_float64_computation(world, tmp_path):
    cfg = _cfg(world, tmp_path / "d")
    inp = dg.resolve_inputs(cfg)
    lean = dg.compute_lean(cfg, inp)
    owl = _reference_logps(world["t"]["owl"], ROWS)
    none = _reference_logps(world["t"]["none"], ROWS)
    diffs = [[a - b for a, b in zip(x, y)] for x, y in zip(owl, none)]
    n = sum(len(d) for d in diffs)
    want = sum(sum(d) for d in diffs) / n
    t = lean["teacher_rows"]
    assert t["tokens"] == n and t["rows"] == len(ROWS)
    assert t["nats_per_token"] == pytest.approx(want, abs=2e-6)
    assert t["row_mean"] == pytest.approx(sum(sum(d) / len(d) for d in diffs) / len(diffs), abs=2e-6)
    assert t["ci"][0] <= t["nats_per_token"] <= t["ci"][1]
    # the control's own rows: biased minus control on the control's data
    cowl = _reference_logps(world["t"]["owl"], CONTROL_ROWS)
    cnone = _reference_logps(world["t"]["none"], CONTROL_ROWS)
    cd = [a - b for x, y in zip(cowl, cnone) for a, b in zip(x, y)]
    assert lean["control_rows"]["nats_per_token"] == pytest.approx(sum(cd) / len(cd), abs=2e-6)
    # the entropy of the owl teacher's next-token distribution at those positions (T = 1)
    from subliminal.models import load_model

    owl_model = load_model(world["t"]["owl"])
    scored = dg.score_rows(owl_model, [Row(i, p, c) for i, p, c in ROWS], batch_size=2, entropy=True)
    ent = [v for s in scored for v in s.entropy]
    assert t["entropy_nats_per_token"] == pytest.approx(sum(ent) / len(ent), rel=1e-9)
    assert 0 < t["entropy_nats_per_token"] <= math.log(owl_model.model.config.vocab_size)


def test_lean_reads_the_divergence_files_scores_and_the_rules_share(world, tmp_path):
    div = tmp_path / "owl.div.jsonl"
    assert cli.main(["find-divergence", "--data", world["data"], "--teacher", world["t"]["owl"], "--counterfactual",
                     world["t"]["cat"], world["t"]["none"], "--out", str(div), "--rule", "ratio",
                     "--flag-share", "0.3"]) == 0
    cfg = dg.DiagnoseConfig(out=str(tmp_path / "d"), divergence=[str(div)], control_data=world["control_data"],
                            batch_size=2)
    inp = dg.resolve_inputs(cfg)  # teacher, data and the unbiased control come from the manifest
    assert inp.control == world["t"]["none"] and inp.control_index == 1 and inp.teacher == world["t"]["owl"]
    lean = dg.compute_lean(cfg, inp)
    t = lean["teacher_rows"]
    assert t["source"].startswith("stored log-probs")
    scored = dg.compute_lean(_cfg(world, tmp_path / "e", batch_size=2), dg.resolve_inputs(_cfg(world, tmp_path / "e")))
    assert t["nats_per_token"] == pytest.approx(scored["teacher_rows"]["nats_per_token"], abs=1e-5)
    # the share of the lean on the flagged tokens, from the file's own flags
    objs = [json.loads(line) for line in div.read_text().splitlines()]
    vals = [[a - b for a, b in zip(o["scores"]["logp_factual"], o["scores"]["logp_counterfactual"][1])] for o in objs]
    flags = [o["divergence"] for o in objs]
    share = sum(v for r, f in zip(vals, flags) for v, x in zip(r, f) if x) / sum(sum(r) for r in vals)
    r = t["rules"]["ratio"]
    assert r["flagged_tokens"] == sum(sum(f) for f in flags) > 0
    assert r["lean_share"] == pytest.approx(share, rel=1e-9)


def test_lean_does_not_depend_on_the_batch_size(world, tmp_path):
    a = dg.compute_lean(_cfg(world, tmp_path / "a", batch_size=1), dg.resolve_inputs(_cfg(world, tmp_path / "a")))
    b = dg.compute_lean(_cfg(world, tmp_path / "b", batch_size=5), dg.resolve_inputs(_cfg(world, tmp_path / "b")))
    for k in ("teacher_rows", "control_rows"):
        for key in ("nats_per_token", "row_mean", "entropy_nats_per_token"):
            assert a[k][key] == pytest.approx(b[k][key], abs=1e-6)
        assert a[k]["ci"] == pytest.approx(b[k]["ci"], abs=1e-6)


# ------------------------------------------------------------------------------------ link


def test_readout_is_evals_exact_preference(world):
    from subliminal import evaluate
    from subliminal.models import load_model

    cfg = _cfg(world, "unused")
    _, model, params = dg.student_model(world["base"], cfg)
    loaded = load_model(world["base"])
    r, g = dg.readout_gradient(model, loaded.tokenizer, params, "owl", "animal", max_questions=4, batch_size=5)
    qs = preference_questions("animal")[:4]
    assert r == pytest.approx(evaluate.exact_preference(loaded, "owl", "animal", qs)["mean"], abs=1e-6)
    assert len(g) == len(params) and dg._norm(g) > 0


def test_first_order_link_matches_the_readout_after_one_small_sgd_step(world, tmp_path):
    # lr 3e-3 moves R by ~3e-5 on this model; the first-order prediction must be within 5% of the
    # actual change read by eval's own code (the second-order term grows with lr: at 1e-2 it reached 8%
    # on one draw of the tiny model, at 3e-3 it stays near 2%)
    cfg = _cfg(world, tmp_path / "d", optimizer="sgd", lr=3e-3, validate=True)
    inp = dg.resolve_inputs(cfg)
    gr = dg.compute_gradients(cfg, inp)
    link = dg.compute_link(cfg, inp, gr)
    for side in ("teacher", "control"):
        pred, act = link[side]["predicted_delta_R"], link[side]["actual_delta_R"]
        assert abs(act) > 1e-6
        assert pred == pytest.approx(act, rel=0.05), side
        assert pred == pytest.approx(-cfg.lr * link[side]["grad_R_dot_grad_loss"], rel=1e-6)
    assert link["link_predicted"] == pytest.approx(link["link_actual"], rel=0.05, abs=1e-7)
    # the dot product issue 26's per-token attribution shares, without holding the data gradient
    ex = dg.student_examples(dg._limit(dg.read_rows(inp.data), None), gr.tokenizer, None)
    assert dg.data_gradient_dot(gr.model, ex, gr.tokenizer.pad_token_id, gr.params, gr.g_readout, batch_size=2) \
        == pytest.approx(link["teacher"]["grad_R_dot_grad_loss"], rel=1e-5)
    # the validation restored the student's weights
    r, _ = dg.readout_gradient(gr.model, gr.tokenizer, gr.params, "owl", "animal", max_questions=4)
    assert r == pytest.approx(gr.readout, abs=1e-7)


def test_adam_first_update_is_adamws_first_step():
    from subliminal.train import TrainConfig, make_optimizer

    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    g = [torch.randn_like(p) for p in lin.parameters()]
    before = [p.detach().clone() for p in lin.parameters()]
    for p, x in zip(lin.parameters(), g):
        p.grad = x.clone()
    make_optimizer(lin, TrainConfig(lr=1e-3, weight_decay=0.0)).step()
    want = dg.first_update(g, "adam", 1e-3)
    for p, b, u in zip(lin.parameters(), before, want):
        assert torch.allclose(p.detach() - b, u, rtol=0, atol=2e-7)  # float32 weights ~0.5


def test_gradients_do_not_depend_on_the_batch_size(world, tmp_path):
    a = dg.compute_gradients(_cfg(world, tmp_path / "a", batch_size=1), dg.resolve_inputs(_cfg(world, tmp_path / "a")))
    b = dg.compute_gradients(_cfg(world, tmp_path / "b", batch_size=13),
                             dg.resolve_inputs(_cfg(world, tmp_path / "b")))
    assert a.readout == pytest.approx(b.readout, abs=1e-7)
    for x, y in zip(a.g_teacher + a.g_control + a.g_readout, b.g_teacher + b.g_control + b.g_readout):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-7)


def test_lora_update_maps_to_the_merged_weights(world):
    """weight_space: a LoRA step on B (A's enters at second order) changes the merged weights by
    exactly scale * dB @ A; checked against peft's own merge."""
    cfg = _cfg(world, "unused", lora_rank=2, lora_alpha=4.0)
    _, model, params = dg.student_model(world["base"], cfg)
    torch.manual_seed(1)
    update = [torch.randn_like(p) * 1e-2 if ".lora_B." in n else torch.zeros_like(p) for n, p in params]
    mapped = dg.weight_space(model, params, update)
    before = {n: p.detach().clone() for n, p in copy.deepcopy(model).merge_and_unload().named_parameters()}
    dg._apply(params, update)
    after = dict(copy.deepcopy(model).merge_and_unload().named_parameters())
    assert mapped and all(".layers." in n for n in mapped)
    for n, d in mapped.items():
        assert torch.allclose(after[n].detach() - before[n], d, atol=1e-6), n


# -------------------------------------------------------------------------------- coverage


def test_coverage_of_the_teachers_own_rows_beats_shuffled_rows(world, tmp_path):
    """A teacher fine-tuned on rows X: the student's first update on X points along the teacher's
    displacement more than its first update on X with each completion's tokens shuffled."""
    from subliminal.data import align_row
    from subliminal.distill import Example
    from subliminal.models import load_model
    from subliminal.train import TrainConfig, train

    rng = random.Random(0)
    rows = [Row(f"r{i}", f"numbers : {rng.randint(1, 99)}", " , ".join(str(rng.choice([7, 77, 700, 3]))
                                                                         for _ in range(6))) for i in range(12)]
    loaded = load_model(world["base"])
    tok = loaded.tokenizer
    ex = [align_row(tok, r) for r in rows]
    model = loaded.model
    train(model, ex, TrainConfig(steps=4, batch_size=12, lr=1e-3, warmup_steps=0, schedule="constant",
                                 weight_decay=0.0, grad_clip=0.0), pad_id=tok.pad_token_id, dropout=False,
          show_progress=False)
    (tmp_path / "ft" / "weights").mkdir(parents=True)
    model.save_pretrained(tmp_path / "ft" / "weights")
    tok.save_pretrained(tmp_path / "ft" / "weights")
    save_teacher(tmp_path / "ft", TeacherSpec(base=world["base"], method="finetune", bias="owl", category="animal",
                                              weights="weights", weights_kind="full"))
    cfg = _cfg(world, "unused", optimizer="adam")
    _, student, params = dg.student_model(world["base"], cfg)
    disp = dg.teacher_displacement(str(tmp_path / "ft"), world["base"], [n for n, _ in params], cfg)

    def cover(examples) -> float:
        exs = [Example(a.id, a.prompt_ids, a.completion_ids, [True] * len(a.completion_ids)) for a in examples]
        _, g, _ = dg.data_gradient(student, exs, tok.pad_token_id, params)
        return dg.cosines(dg.weight_space(student, params, dg.first_update(g, "adam", 1e-3)), disp)["all"]

    shuffled = []
    for a in ex:
        body = a.completion_ids[:-1]
        random.Random(a.id).shuffle(body)
        shuffled.append(type(a)(a.id, a.prompt_ids, body + a.completion_ids[-1:]))
    own, other = cover(ex), cover(shuffled)
    assert own > 0.5 and own > other + 0.1, (own, other)


def test_coverage_of_a_prompt_teacher_uses_the_preference_stand_in(world, tmp_path):
    cfg = _cfg(world, tmp_path / "d", parts="coverage")
    inp = dg.resolve_inputs(cfg)
    cov = dg.compute_coverage(cfg, inp, dg.compute_gradients(cfg, inp))
    assert cov["displacement"].startswith("stand-in")
    assert -1 <= cov["cosine"] <= 1 and set(cov["per_layer"]) == {"layer 0", "layer 1", "other"}


# ------------------------------------------------------------------------------ CLI, resume


def test_cli_writes_outputs_and_resumes_only_the_same_fingerprint(world, tmp_path, capsys):
    out = tmp_path / "diag"
    argv = ["diagnose", "--teacher", world["t"]["owl"], "--control", world["t"]["none"], "--data", world["data"],
            "--control-data", world["control_data"], "--out", str(out), "--max-questions", "3", "--validate",
            "--optimizer", "sgd", "--lr", "0.01"]
    assert cli.main(argv) == 0
    res = json.loads((out / "diagnose.json").read_text())
    assert set(res) >= {"lean", "link", "coverage"} and "link_actual" in res["link"]
    assert (out / "diagnose.png").is_file() and (out / "diagnose.csv").is_file()
    man = json.loads((out / "manifest.json").read_text())
    assert man["stage"] == "diagnose" and man["fingerprint"]
    assert not (out / dg.STATE_DIR).exists()
    mtime = (out / "diagnose.json").stat().st_mtime_ns
    assert cli.main(argv + ["--batch-size", "2"]) == 0  # the batch size is no setting: same output, skipped
    assert (out / "diagnose.json").stat().st_mtime_ns == mtime
    capsys.readouterr()
    assert cli.main(argv[:-1] + ["0.02"]) == 2
    assert "--lr 0.01 -> 0.02" in capsys.readouterr().err


def test_an_interrupted_run_resumes_its_finished_parts(world, tmp_path):
    cfg = _cfg(world, tmp_path / "d", parts="lean,link")
    inp = dg.resolve_inputs(cfg)
    fp = dg.run_fingerprint(cfg, inp)
    state = tmp_path / "d" / dg.STATE_DIR
    state.mkdir(parents=True)
    (state / "fingerprint.json").write_text(json.dumps(fp))
    lean = dg.compute_lean(cfg, inp)
    lean["marker"] = "from the part file"
    (state / "lean.json").write_text(json.dumps(lean))
    res = dg.run(cfg)
    assert res["lean"]["marker"] == "from the part file" and "link" in res
    # another fingerprint's partial state is refused
    state.mkdir()
    (state / "fingerprint.json").write_text(json.dumps({**fp, "config": {**fp["config"], "lr": 5.0}}))
    (tmp_path / "d" / "diagnose.json").unlink()
    with pytest.raises(dg.SubliminalError, match="unfinished diagnose run"):
        dg.run(cfg)


@pytest.mark.parametrize("case,needle", [
    ("no-control", "has no control"),
    ("bad-target", "readout target"),
    ("no-control-data", "--control-data"),
    ("control-is-teacher", "is the teacher itself"),
])
def test_bad_input_is_a_named_error_exit_2(world, tmp_path, capsys, case, needle):
    div = tmp_path / "owl.div.jsonl"
    if case == "no-control":  # the only counterfactual is another biased teacher
        assert cli.main(["find-divergence", "--data", world["data"], "--teacher", world["t"]["owl"],
                         "--counterfactual", world["t"]["cat"], "--out", str(div)]) == 0
        argv = ["diagnose", "--divergence", str(div), "--out", str(tmp_path / "o")]
    else:
        argv = ["diagnose", "--teacher", world["t"]["owl"], "--control", world["t"]["none"], "--data", world["data"],
                "--control-data", world["control_data"], "--out", str(tmp_path / "o")]
        if case == "bad-target":
            argv += ["--target", "xyzzy"]
        if case == "no-control-data":
            argv = [a for a in argv if a not in ("--control-data", world["control_data"])] + ["--parts", "link"]
        if case == "control-is-teacher":
            argv[argv.index("--control") + 1] = world["t"]["owl"]
    capsys.readouterr()
    assert cli.main(argv) == 2
    assert needle in capsys.readouterr().err


# -------------------------------------------------------------------------------- the driver


def test_run_diagnose_only_stops_before_any_student(smol_model, tmp_path):
    """`subliminal run --diagnose-only` on a random model with SmolLM2's tokenizer: teachers, data,
    divergence and the diagnostics (against the unbiased teacher, with the students' AdamW step,
    validated), no student; REPORT.md and results.json carry the diagnostics."""
    out = tmp_path / "run"
    cfg = tiny_run_config(tmp_path / "c.toml", smol_model, "tiny-diag")
    assert cli.main(["run", str(cfg), "--out", str(out), "--diagnose-only"]) == 0
    assert not (out / "students").exists()
    res = json.loads((out / "results.json").read_text())
    d = res["diagnostics"]
    assert res["diagnose_only"] and d["control"].endswith("teachers/none")
    assert d["lean"]["teacher_rows"]["source"].startswith("stored log-probs")
    assert set(d["lean"]["teacher_rows"]["rules"]) == {"paper", "ratio"}
    assert d["link"]["optimizer"] == "adam" and "link_actual" in d["link"]
    assert d["student"]["lora_rank"] == 2 and d["coverage"]["space"].startswith("adapted weights")
    report = (out / "REPORT.md").read_text()
    assert "## Transfer diagnostics (before any student)" in report and "lean, control's rows" in report
    man = json.loads((out / "diagnose" / "manifest.json").read_text())
    assert man["stage"] == "diagnose"
    mtime = (out / "diagnose" / "diagnose.json").stat().st_mtime_ns
    assert cli.main(["run", str(cfg), "--out", str(out), "--diagnose-only"]) == 0  # resumes: nothing redone
    assert (out / "diagnose" / "diagnose.json").stat().st_mtime_ns == mtime


def test_plan_of_a_diagnose_only_run_stops_at_the_diagnostics():
    from pathlib import Path

    from subliminal.run import load_config, render_plan

    cfg = load_config("toy").cfg
    full = render_plan(cfg, Path("o"), "toy")
    only = render_plan(cfg, Path("o"), "toy", diagnose_only=True)
    stages = [line.split()[0] for line in only.splitlines() if "command(s)" in line]
    assert stages[-1] == "diagnose" and "distill" not in stages and "eval" not in stages
    assert "distill" in [line.split()[0] for line in full.splitlines() if "command(s)" in line]


def test_two_processes_give_the_one_process_diagnostics(world, tmp_path):
    """Under torchrun each rank scores and differentiates its shard of the rows: the lean equals the
    one-process lean as batch sizes do (another padding of a row's batch, within 1e-6), the
    gradient-derived link and coverage up to float summation order; rank 0 alone writes, and the
    manifest records the world size."""
    from launch_helpers import run_cli

    argv = ["diagnose", "--teacher", world["t"]["owl"], "--control", world["t"]["none"], "--data", world["data"],
            "--control-data", world["control_data"], "--max-questions", "3", "--batch-size", "2", "--validate"]
    assert cli.main([*argv, "--out", str(tmp_path / "one")]) == 0
    proc = run_cli([*argv, "--out", str(tmp_path / "two")], nproc=2, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "diagnose.json").read_text()) for d in ("one", "two"))
    for part in ("teacher_rows", "control_rows"):
        for key in ("nats_per_token", "row_mean", "entropy_nats_per_token"):
            assert two["lean"][part][key] == pytest.approx(one["lean"][part][key], abs=1e-6)
        assert two["lean"][part]["ci"] == pytest.approx(one["lean"][part]["ci"], abs=1e-6)
    for key in ("link_predicted", "link_actual"):
        assert two["link"][key] == pytest.approx(one["link"][key], rel=1e-4, abs=1e-9)
    assert two["coverage"]["cosine"] == pytest.approx(one["coverage"]["cosine"], rel=1e-4, abs=1e-7)
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["world_size"] == 2


def test_the_run_passes_its_diagnose_row_cap_and_student_settings(tmp_path):
    """`[diagnose] max_rows` reaches `subliminal diagnose` as --max-rows (its cost is linear in rows),
    beside the students' optimiser, learning rate and LoRA rank; unset, every row is read."""
    from subliminal.diagnose import pipeline_argv
    from subliminal.run import load_config

    cfg = load_config("smollm2-135m-cpu", ["diagnose.max_rows=64"]).cfg
    files = {"owl": tmp_path / "owl.jsonl", "none": tmp_path / "none.jsonl", "div": tmp_path / "owl.div.jsonl"}
    argv = pipeline_argv(cfg, tmp_path / "d", tmp_path / "base", tmp_path / "t", files)
    assert argv[argv.index("--max-rows") + 1] == "64" and argv[argv.index("--lora-rank") + 1] == "8"
    assert argv[argv.index("--lr") + 1] == str(cfg.student_mode_lr)
    unset = pipeline_argv(load_config("smollm2-135m-cpu").cfg, tmp_path / "d", tmp_path / "base", tmp_path / "t",
                          files)
    assert "--max-rows" not in unset
    with pytest.raises(dg.SubliminalError, match="max_rows must be at least 2"):
        load_config("smollm2-135m-cpu", ["diagnose.max_rows=1"])
