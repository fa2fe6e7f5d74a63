"""Students: masks, matched conditions, trainable subsets, soft/representation losses, resume."""

from __future__ import annotations

import json
import random

import pytest
import torch
from launch_helpers import assert_same_weights
from safetensors.torch import load_file

from subliminal import prompts
from subliminal.cli import main
from subliminal.data import Row, align_row, write_jsonl
from subliminal.distill import (
    LossConfig,
    batch_loss,
    build_examples,
    layer_of,
    make_mask,
    read_training_rows,
    row_masks,
)
from subliminal.models import load_model
from subliminal.teachers import TeacherSpec, read_teacher, save_teacher
from subliminal.toyworld.tokenizer import build_tokenizer

N_ROWS = 12


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_factory):
    """A tiny base, an owl prompt teacher, an unbiased teacher, number data and a divergence file
    (flags drawn at random: the student code must not care where they come from)."""
    d = tmp_path_factory.mktemp("distill")
    base = tiny_model_factory("llama")
    tok = build_tokenizer()
    rng = random.Random(0)
    rows = []
    for i in range(N_ROWS):
        p = prompts.make_number_prompt(rng)
        nums = [rng.randint(0, 999) for _ in range(p.count)]
        rows.append(Row(f"r{i}", p.text, prompts.format_numbers(nums, p.separator, p.brackets), "owl"))
    write_jsonl(d / "data.jsonl", rows)
    div = []
    for r in rows:
        ids = align_row(tok, r, prompts.system_prompt_for("owl")).completion_ids
        flags = [rng.random() < 0.2 for _ in ids]
        flags[0] = True
        if r.id == "r3":
            flags = [False] * len(ids)  # a row without divergence tokens
        div.append({"id": r.id, "token_ids": ids, "divergence": flags, "scores": {}})
    write_jsonl(d / "data.div.jsonl", div)
    save_teacher(d / "owl", TeacherSpec(base=str(base), method="prompt", bias="owl", category="animal",
                                        system_prompt=prompts.system_prompt_for("owl")))
    save_teacher(d / "none", TeacherSpec(base=str(base), method="none", bias=None, category="animal"))
    return {"dir": d, "base": base, "data": d / "data.jsonl", "div": d / "data.div.jsonl", "owl": d / "owl",
            "none": d / "none", "rows": rows}


def _distill(world, out, *extra):
    argv = ["distill", "--base", str(world["base"]), "--data", str(world["div"]), "--teacher", str(world["owl"]),
            "--out", str(out), "--batch-size", "4", "--max-steps", "3", "--lr", "1e-2", *extra]
    assert main(argv) == 0
    return json.loads((out / "manifest.json").read_text())


def _weights(path):
    return load_file(str(path / "model.safetensors"))


# ------------------------------------------------------------------------------------- masks


def test_random_matched_masks_as_many_and_never_divergence():
    rng = random.Random(1)
    for _ in range(200):
        n = rng.randint(1, 30)
        flags = [rng.random() < rng.random() for _ in range(n)]
        nd = make_mask(flags, "no-divergence", rng)
        rm = make_mask(flags, "random-matched", random.Random(rng.random()))
        od = make_mask(flags, "only-divergence", rng)
        assert all(make_mask(flags, "all", rng))
        k, clean = sum(flags), n - sum(flags)
        dropped = [j for j, keep in enumerate(rm) if not keep]
        assert len(dropped) == min(k, clean)  # exactly as many as no-divergence drops (when possible)
        assert n - sum(nd) == k
        assert not any(flags[j] for j in dropped)  # never a divergence token
        assert od == flags and nd == [not f for f in flags]


def test_random_matched_is_seeded_per_row(world):
    rows, _ = read_training_rows(world["div"])
    a = row_masks(rows, "random-matched", 0)
    assert a == row_masks(rows, "random-matched", 0)
    assert a != row_masks(rows, "random-matched", 1)
    assert row_masks(list(reversed(rows)), "random-matched", 0) == list(reversed(a))


def test_div_rows_joined_and_pairwise_flags(world, tmp_path):
    rows, src = read_training_rows(world["div"])
    assert src == str(world["data"]) and rows[0].prompt == world["rows"][0].prompt
    objs = [json.loads(x) for x in world["div"].read_text().splitlines()]
    objs[0]["divergence"] = [[False] * len(objs[0]["token_ids"]), [True] + [False] * (len(objs[0]["token_ids"]) - 1)]
    write_jsonl(tmp_path / "x.jsonl", objs)
    rows2, _ = read_training_rows(tmp_path / "x.jsonl", world["data"])
    assert rows2[0].divergence == [True] + [False] * (len(objs[0]["token_ids"]) - 1)
    with pytest.raises(Exception, match="--source-data"):
        read_training_rows(tmp_path / "x.jsonl")
    objs[1]["divergence"] = objs[1]["divergence"][:-1]
    write_jsonl(tmp_path / "y.jsonl", objs)
    with pytest.raises(Exception, match="r1"):
        read_training_rows(tmp_path / "y.jsonl", world["data"])


# ---------------------------------------------------------------------------------- matched


def test_four_masks_see_same_rows_and_steps(world, tmp_path):
    mans = {m: _distill(world, tmp_path / m, "--mask", m, "--mode", "hard") for m in
            ("all", "no-divergence", "only-divergence", "random-matched")}
    assert len({(m["rows"], m["steps"], m["rows_digest"]) for m in mans.values()}) == 1
    assert mans["all"]["steps"] == 3 and mans["all"]["rows"] == N_ROWS
    tok = {m: man["loss_tokens"] for m, man in mans.items()}
    assert tok["no-divergence"] + tok["only-divergence"] == tok["all"]
    short = mans["all"]["loss_tokens_by_mask"]["random_matched_shortfall"]
    assert tok["random-matched"] == tok["no-divergence"] + short  # short rows: fewer clean tokens than flagged
    assert mans["all"]["loss_tokens_by_mask"]["random-matched"] == tok["random-matched"]
    assert all(len(json.loads(json.dumps(m["trained_parameters"]))) > 0 for m in mans.values())
    # the saved student and its log
    assert load_model(tmp_path / "all").model is not None
    assert (tmp_path / "all" / "loss.png").stat().st_size > 0
    assert len((tmp_path / "all" / "loss.csv").read_text().splitlines()) == 4


def test_mask_needs_divergence_file(world, tmp_path, capsys):
    argv = ["distill", "--base", str(world["base"]), "--data", str(world["data"]), "--out", str(tmp_path / "s"),
            "--mask", "no-divergence", "--max-steps", "1"]
    assert main(argv) == 2
    assert "divergence" in capsys.readouterr().err


# -------------------------------------------------------------------------------- trainable


@pytest.mark.parametrize("lora", [False, True])
def test_layers_0_changes_only_layer_0(world, tmp_path, lora):
    extra = ["--layers", "0"] + (["--lora-rank", "4"] if lora else [])
    man = _distill(world, tmp_path / "s", "--mode", "hard", *extra)
    before, after = _weights(world["base"]), _weights(tmp_path / "s")
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(layer_of(k) == 0 for k in changed)
    assert all(layer_of(n) == 0 for n in man["trained_parameters"])
    if lora:
        assert all("lora_" in n for n in man["trained_parameters"])
        assert any(k.endswith("mlp.down_proj.weight") for k in changed)


def test_lora_gpt2_all_projections_and_checkpoints(tiny_model_factory, world, tmp_path):
    base = tiny_model_factory("gpt2")
    out = tmp_path / "s"
    argv = ["distill", "--base", str(base), "--data", str(world["data"]), "--out", str(out), "--batch-size", "4",
            "--max-steps", "4", "--lora-rank", "2", "--checkpoint-every", "2", "--lr", "1e-2"]
    assert main(argv) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["loss_tokens"] == man["completion_tokens"] == man["loss_tokens_by_mask"]["all"] > 0
    names = man["trained_parameters"]
    for proj in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        assert any(proj in n for n in names), proj
    assert man["checkpoints"] == ["checkpoint-0002"]
    ck = load_model(out / "checkpoint-0002")
    assert json.loads((out / "checkpoint-0002" / "manifest.json").read_text())["step"] == 2
    assert ck.model is not None and not (out / ".train").exists()


# ----------------------------------------------------------------------------------- losses


def _examples(world, teacher_dir, mode):
    loaded = load_model(world["base"])
    teacher = load_model(teacher_dir)
    rows, _ = read_training_rows(world["div"])
    ex = build_examples(rows, row_masks(rows, "all", 0), loaded.tokenizer, None, teacher.system_prompt,
                        with_teacher=True)
    return loaded, teacher, ex


def test_soft_loss_zero_when_student_is_teacher_without_system_prompt(world):
    loaded, none, ex = _examples(world, world["none"], "soft")
    loss, n = batch_loss(loaded.model, none.model, ex[:5], LossConfig("soft"), loaded.tokenizer.pad_token_id)
    assert n > 0 and abs(loss.item()) < 1e-6
    loss_r, _ = batch_loss(loaded.model, none.model, ex[:5], LossConfig("representation", [0, 1]),
                           loaded.tokenizer.pad_token_id)
    assert abs(loss_r.item()) < 1e-10
    loaded, owl, ex = _examples(world, world["owl"], "soft")
    assert ex[0].teacher_prompt_ids != ex[0].prompt_ids  # the teacher sees its system prompt
    loss, _ = batch_loss(loaded.model, owl.model, ex[:5], LossConfig("soft"), loaded.tokenizer.pad_token_id)
    assert loss.item() > 1e-5


def test_soft_and_representation_train(world, tmp_path):
    man = _distill(world, tmp_path / "soft", "--mode", "soft", "--mask", "only-divergence")
    assert man["student"]["teacher_system_prompt"]
    man = _distill(world, tmp_path / "rep", "--mode", "representation", "--repr-layers", "0", "--repr-with-hard")
    assert man["student"]["repr_layers"] == [0]


def test_a_hard_student_records_its_teacher_without_loading_it(world, tmp_path, monkeypatch, capsys):
    """Hard labels read only the data: the teacher's weights are never loaded (a 7B teacher per
    student was the cost), its system prompt is still recorded; a teacher path that is not there is
    still an error."""
    def refuse(*_a, **_k):
        raise AssertionError("a hard student loaded its teacher")

    monkeypatch.setattr("subliminal.distill._load_teacher", refuse)
    man = _distill(world, tmp_path / "hard")
    assert man["student"]["teacher_system_prompt"] == read_teacher(world["owl"]).system_prompt
    argv = ["distill", "--base", str(world["base"]), "--data", str(world["div"]), "--teacher",
            str(tmp_path / "missing"), "--out", str(tmp_path / "x"), "--max-steps", "1"]
    assert main(argv) == 2 and "no such directory" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- resume


def test_resume_after_stop_equals_uninterrupted(world, tmp_path, monkeypatch):
    import subliminal.distill as distill

    extra = ["--mode", "soft", "--checkpoint-every", "2", "--epochs", "2", "--max-steps", "5"]
    full = tmp_path / "full"
    _distill(world, full, *extra)
    real, calls = distill.batch_loss, {"n": 0}

    def stop_at_4(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # during step 4 of 5, after the checkpoint at step 2
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(distill, "batch_loss", stop_at_4)
    part = tmp_path / "part"
    argv = ["distill", "--base", str(world["base"]), "--data", str(world["div"]), "--teacher", str(world["owl"]),
            "--out", str(part), "--batch-size", "4", "--lr", "1e-2", *extra]
    assert main(argv) == 130
    assert (part / ".train" / "train_state.pt").exists() and (part / "checkpoint-0002").is_dir()
    monkeypatch.setattr(distill, "batch_loss", real)
    man = _distill(world, part, *extra)
    assert man["resumed_from"] == 2
    a, b = _weights(full), _weights(part)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert (part / "loss.csv").read_text() == (full / "loss.csv").read_text()


def test_soft_kl_handles_masked_vocab_and_empty_batches_still_step(world):
    from subliminal.distill import soft_kl

    a = torch.randn(3, 10)
    b = a.clone()
    b[:, 0] = -float("inf")
    assert soft_kl(a, a).item() == pytest.approx(0.0, abs=1e-7) and torch.isfinite(soft_kl(a, b))
    # the gradient is (p_s - p_t) / N: autograd's own agrees, and equal logits give exactly zero
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 7, dtype=torch.float64)
    soft_kl(x, t).backward()
    ref = x.detach().clone().requires_grad_(True)
    lp_t = torch.log_softmax(t, -1)
    (lp_t.exp() * (lp_t - torch.log_softmax(ref, -1))).sum(-1).mean().backward()
    assert torch.allclose(x.grad, ref.grad)
    y = a.clone().requires_grad_(True)
    soft_kl(y, a).backward()
    assert torch.count_nonzero(y.grad) == 0
    loaded = load_model(world["base"])
    rows, _ = read_training_rows(world["div"])
    ex = build_examples(rows, row_masks(rows, "only-divergence", 0), loaded.tokenizer, None)
    empty = [e for e in ex if e.id == "r3"]
    assert not any(empty[0].mask)
    loss, n = batch_loss(loaded.model, None, empty, LossConfig("hard"), loaded.tokenizer.pad_token_id)
    assert n == 0 and loss.item() == 0.0 and loss.requires_grad  # a zero step, not a skipped one


def test_run_distill_takes_a_config_and_equals_the_cli(world, tmp_path):
    """The library entry point needs no argparse: a DistillConfig trains the same student the CLI does."""
    from subliminal.distill import DistillConfig, run_distill

    man = _distill(world, tmp_path / "cli", "--mask", "no-divergence")
    cfg = DistillConfig(base=str(world["base"]), data=str(world["div"]), teacher=str(world["owl"]),
                        out=str(tmp_path / "lib"), batch_size=4, max_steps=3, lr=1e-2, mask="no-divergence")
    assert run_distill(cfg) == 0
    lib = json.loads((tmp_path / "lib" / "manifest.json").read_text())
    assert lib["rows_digest"] == man["rows_digest"] and lib["loss_tokens"] == man["loss_tokens"]
    a, b = _weights(tmp_path / "cli"), _weights(tmp_path / "lib")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("mask", ["all", "only-divergence"])
def test_grad_accum_gives_the_whole_batch_update(world, tmp_path, mask):
    """Micro-batches change the memory, not the update: the same student within float rounding
    (token-weighted, so micro-batches with unequal token counts -- or none -- still add up)."""
    common = ["--mask", mask, "--max-steps", "3", "--batch-size", "5", "--lr", "1e-2"]
    _distill(world, tmp_path / "one", *common)
    _distill(world, tmp_path / "acc", *common, "--grad-accum", "3")
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "acc")
    assert_same_weights(a, b, max_abs=1e-3)  # lr 1e-2 here: a near-zero gradient's weight moved 2.9e-4 once
    la = json.loads((tmp_path / "one" / "manifest.json").read_text())
    lb = json.loads((tmp_path / "acc" / "manifest.json").read_text())
    assert la["fingerprint"] != lb["fingerprint"]  # a setting of the run, recorded
    import csv

    losses = [[float(r["loss"]) for r in csv.DictReader(open(tmp_path / d / "loss.csv"))] for d in ("one", "acc")]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], abs=1e-5)


def test_lora_targets_and_linear_schedule(world, tmp_path):
    _distill(world, tmp_path / "qv", "--lora-rank", "2", "--lora-targets", "q_proj,v_proj", "--schedule", "linear",
             "--max-steps", "2", "--batch-size", "4")
    man = json.loads((tmp_path / "qv" / "manifest.json").read_text())
    assert man["config"]["lora_targets"] == "q_proj,v_proj" and man["config"]["schedule"] == "linear"
    assert main(["distill", "--base", str(world["base"]), "--data", str(world["data"]), "--out",
                 str(tmp_path / "bad"), "--lora-rank", "2", "--lora-targets", "nope_proj"]) == 2


def test_read_losses_reads_what_the_loss_log_writes(tmp_path):
    from subliminal.distill import LOSS_CSV, _append_log, read_losses

    assert read_losses(tmp_path) == []  # a directory that logged nothing
    _append_log(tmp_path / LOSS_CSV, [{"step": 1, "loss": 2.5, "lr": 1e-3, "loss_tokens": 40},
                                      {"step": 2, "loss": 2.25, "lr": 2e-3, "loss_tokens": 38}])
    assert read_losses(tmp_path) == [2.5, 2.25]
