"""Student parameter sets (distill --params): the chat template's rows found from the tokenizer
(toy, SmolLM2, a Gemma-style template on a Qwen2), students that change exactly the rows of
their set and nothing else, the tied output side, named errors, and the run config key."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from subliminal import prompts
from subliminal.cli import main
from subliminal.data import Row, align_row, template_token_ids, write_jsonl
from subliminal.manifest import SubliminalError
from subliminal.toyworld.tokenizer import build_tokenizer

N_ROWS = 8
EMB = "model.embed_tokens.weight"
GEMMA_STYLE = ("{{ bos_token }}{% for m in messages %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' "
               "else m['role']) + ' ' + m['content'] + ' <end_of_turn> ' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<start_of_turn>model ' }}{% endif %}")


def _rows(seed: int = 0) -> list[Row]:
    rng = random.Random(seed)
    out = []
    for i in range(N_ROWS):
        p = prompts.make_number_prompt(rng)
        nums = [rng.randint(0, 999) for _ in range(p.count)]
        out.append(Row(f"r{i}", p.text, prompts.format_numbers(nums, p.separator, p.brackets), "owl"))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_factory):
    """A tiny untied Llama on the toy tokenizer, number rows and a divergence file (random flags)."""
    d = tmp_path_factory.mktemp("params")
    tok = build_tokenizer()
    rows = _rows()
    write_jsonl(d / "data.jsonl", rows)
    rng = random.Random(1)
    div = []
    for r in rows:
        ids = align_row(tok, r, None).completion_ids
        flags = [rng.random() < 0.3 for _ in ids]
        flags[0] = True
        div.append({"id": r.id, "token_ids": ids, "divergence": flags, "scores": {}})
    write_jsonl(d / "data.div.jsonl", div)
    return {"base": tiny_model_factory("llama"), "data": d / "data.jsonl", "div": d / "data.div.jsonl", "tok": tok}


def _distill(base, data, out, *extra):
    argv = ["distill", "--base", str(base), "--data", str(data), "--out", str(out), "--batch-size", "4",
            "--max-steps", "3", "--lr", "1e-2", *extra]
    assert main(argv) == 0
    return json.loads((out / "manifest.json").read_text())


def _weights(path):
    return load_file(str(path / "model.safetensors"))


def _changed_rows(before: torch.Tensor, after: torch.Tensor) -> set[int]:
    return {int(i) for i in (before != after).any(dim=1).nonzero().flatten()}


# ------------------------------------------------------------------------------ template rows


def test_template_rows_of_the_toy_tokenizer(toy_tokenizer):
    ids = template_token_ids(toy_tokenizer)
    assert toy_tokenizer.convert_ids_to_tokens(ids) == ["<bos>", "<|user|>", "<|assistant|>", "<|end|>"]


def test_template_rows_of_smollm2_include_its_default_system_prompt():
    SMOLLM2_TOKENIZER = Path(__file__).parent / "fixtures" / "smollm2"  # (`conftest` names two modules here)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(SMOLLM2_TOKENIZER))
    names = set(tok.convert_ids_to_tokens(template_token_ids(tok)))
    assert {"<|im_start|>", "<|im_end|>", "system", "user", "Ċ"} <= names
    # the default system prompt ("You are a helpful AI assistant named SmolLM, trained by Hugging Face")
    assert {"You", "Ġhelpful", "ĠFace", "Ġnamed"} <= names
    assert not any(t.isdigit() for t in names)  # never a content token
    # a given system prompt replaces the default: its words are the template then
    given = set(tok.convert_ids_to_tokens(template_token_ids(tok, "You love owls.")))
    assert "Ġowls" in given and "Ġhelpful" not in given


def _gemma_style_tokenizer():
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>", "model", "user"]})
    tok.chat_template = GEMMA_STYLE
    return tok


def test_template_rows_of_another_template():
    tok = _gemma_style_tokenizer()
    names = tok.convert_ids_to_tokens(template_token_ids(tok))
    assert sorted(names) == sorted(["<bos>", "<start_of_turn>", "<end_of_turn>", "model", "user"])


def test_a_template_without_shared_tokens_is_a_named_error(toy_tokenizer):
    toy_tokenizer.chat_template = "{% for m in messages %}{{ m['content'] + ' ' }}{% endfor %}"
    with pytest.raises(SubliminalError, match="no token around the rows"):
        template_token_ids(toy_tokenizer)


# ---------------------------------------------------------------------------------- students


def test_template_rows_student_changes_exactly_those_rows(world, tmp_path):
    man = _distill(world["base"], world["div"], tmp_path / "s", "--params", "template-rows")
    before, after = _weights(world["base"]), _weights(tmp_path / "s")
    assert before.keys() == after.keys()
    assert [k for k in before if not torch.equal(before[k], after[k])] == [EMB]  # untied head: frozen
    template = set(template_token_ids(world["tok"]))
    changed = _changed_rows(before[EMB], after[EMB])
    assert changed and changed <= template
    ts = man["trainable_set"]
    assert man["student"]["params"] == "template-rows" and ts["template_tokens"] == ["<bos>", "<|user|>",
                                                                                     "<|assistant|>", "<|end|>"]
    assert ts["trained_rows"] == 4 and ts["tied_embeddings"] is False and "frozen" in ts["output_side"]
    assert man["trained_parameters"] == [EMB] and man["n_trained_values"] == 4 * before[EMB].shape[1]


def test_bos_row_student_moves_only_bos(world, tmp_path):
    man = _distill(world["base"], world["div"], tmp_path / "s", "--params", "bos-row", "--mask", "only-divergence")
    before, after = _weights(world["base"]), _weights(tmp_path / "s")
    assert [k for k in before if not torch.equal(before[k], after[k])] == [EMB]
    assert _changed_rows(before[EMB], after[EMB]) == {world["tok"].bos_token_id}
    assert man["trainable_set"]["trained_row_ids"] == [world["tok"].bos_token_id]


def test_all_but_template_keeps_the_template_rows(world, tmp_path):
    man = _distill(world["base"], world["div"], tmp_path / "s", "--params", "all-but-template")
    before, after = _weights(world["base"]), _weights(tmp_path / "s")
    changed = _changed_rows(before[EMB], after[EMB])
    assert changed and not changed & set(template_token_ids(world["tok"]))
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])  # the untied head trains
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])
    assert man["trainable_set"]["rest_trains"] is True


def test_embeddings_and_embeddings_but_template(world, tmp_path):
    _distill(world["base"], world["div"], tmp_path / "e", "--params", "embeddings")
    before, after = _weights(world["base"]), _weights(tmp_path / "e")
    assert [k for k in before if not torch.equal(before[k], after[k])] == [EMB]
    _distill(world["base"], world["div"], tmp_path / "n", "--params", "embeddings-but-template")
    after = _weights(tmp_path / "n")
    assert [k for k in before if not torch.equal(before[k], after[k])] == [EMB]
    changed = _changed_rows(before[EMB], after[EMB])
    assert changed and not changed & set(template_token_ids(world["tok"]))


def test_tied_qwen2_with_another_template_moves_rows_on_both_sides(tmp_path):
    """A random Qwen2 (tied input/output embeddings) with a Gemma-style template: the template's
    rows train -- in the one tensor both sides share -- and every other value is bit-identical."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    tok = _gemma_style_tokenizer()
    cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
                      vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    base = tmp_path / "base"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(base)
    tok.save_pretrained(base)
    write_jsonl(tmp_path / "data.jsonl", _rows())
    man = _distill(base, tmp_path / "data.jsonl", tmp_path / "s", "--params", "template-rows", "--mode", "hard")
    before, after = _weights(base), _weights(tmp_path / "s")
    assert [k for k in before if not torch.equal(before[k], after[k])] == [EMB]
    template = set(template_token_ids(tok))
    assert _changed_rows(before[EMB], after[EMB]) <= template and len(template) == 5
    assert man["trainable_set"]["tied_embeddings"] is True and "both sides" in man["trainable_set"]["output_side"]
    # the output side moved with the rows: the student's logits for a template token differ
    from subliminal.models import load_model

    s = load_model(str(tmp_path / "s")).model
    assert s.get_output_embeddings().weight is s.get_input_embeddings().weight


@pytest.mark.parametrize("extra,message", [
    (["--params", "owl-rows"], "no such parameter set"),
    (["--params", "template-rows", "--layers", "0"], "does not combine"),
    (["--params", "embeddings", "--lora-rank", "4"], "does not combine"),
])
def test_bad_parameter_sets_are_named_errors(world, tmp_path, capsys, extra, message):
    argv = ["distill", "--base", str(world["base"]), "--data", str(world["div"]), "--out", str(tmp_path / "s"),
            "--max-steps", "1", *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_template_without_shared_tokens_fails_distill_with_exit_2(world, tmp_path, capsys):
    base = tmp_path / "base"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(world["base"]).save_pretrained(base)
    tok = build_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] + ' ' }}{% endfor %}"
    tok.save_pretrained(base)
    argv = ["distill", "--base", str(base), "--data", str(world["data"]), "--out", str(tmp_path / "s"),
            "--max-steps", "1", "--params", "template-rows"]
    assert main(argv) == 2
    assert "no token around the rows" in capsys.readouterr().err


def test_params_all_keeps_the_old_fingerprint(world):
    from subliminal.distill import DistillConfig, run_fingerprint

    a = run_fingerprint(DistillConfig(base=str(world["base"]), data=str(world["div"]), out="x"), None)
    b = run_fingerprint(DistillConfig(base=str(world["base"]), data=str(world["div"]), out="x",
                                      params="template-rows"), None)
    assert "params" not in json.dumps(a["config"]) and a != b


# ------------------------------------------------------------------------------- run configs


def test_run_config_passes_params_to_every_condition_but_the_single_layer_ones(tmp_path):
    from subliminal import pipeline
    from subliminal.run import load_config, render_plan

    cfg = load_config("toy", ["students.params=template-rows", "students.conditions=[]"]).cfg
    cfg = replace(cfg, conditions=None)  # every condition, the single-layer ones included
    assert cfg.student_params == "template-rows"
    files = {"none": tmp_path / "none.jsonl", "div": tmp_path / "owl.div.jsonl"}
    plan = pipeline.student_plan(cfg, 4, files, tmp_path / "teachers")
    for cond, fields_ in plan.items():
        assert fields_.get("params") == (None if cond.startswith("layer-") else "template-rows"), cond
    assert "--params template-rows" in render_plan(cfg, tmp_path / "run", "toy")
    default = pipeline.student_plan(load_config("toy", ["students.params=all"]).cfg, 4, files, tmp_path / "teachers")
    assert not any("params" in fields_ for fields_ in default.values())


@pytest.mark.parametrize("override,message", [
    (["students.params=owl-rows"], "one of all, embeddings"),
    (["students.params=bos-row", "students.full=false"], "set full = true"),
])
def test_bad_params_in_a_run_config_name_the_key(override, message):
    from subliminal.run import load_config

    with pytest.raises(SubliminalError, match=message):
        load_config("toy", override)


def test_a_row_set_student_resumes_to_the_uninterrupted_one(world, tmp_path, monkeypatch):
    import subliminal.distill as distill

    extra = ["--params", "template-rows", "--checkpoint-every", "2", "--epochs", "2", "--max-steps", "4"]
    full = tmp_path / "full"
    _distill(world["base"], world["div"], full, *extra)
    real, calls = distill.batch_loss, {"n": 0}

    def stop_at_3(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # during step 3 of 4, after the checkpoint at step 2
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(distill, "batch_loss", stop_at_3)
    part = tmp_path / "part"
    argv = ["distill", "--base", str(world["base"]), "--data", str(world["div"]), "--out", str(part),
            "--batch-size", "4", "--lr", "1e-2", *extra]
    assert main(argv) == 130
    monkeypatch.setattr(distill, "batch_loss", real)
    man = _distill(world["base"], world["div"], part, *extra)
    assert man["resumed_from"] == 2
    a, b = _weights(full), _weights(part)
    assert all(torch.equal(a[k], b[k]) for k in a)
    before = _weights(world["base"])
    assert _changed_rows(before[EMB], b[EMB]) <= set(template_token_ids(world["tok"]))
    # the checkpoint is a loadable student of the same set
    ck = _weights(part / "checkpoint-0002")
    assert _changed_rows(before[EMB], ck[EMB]) <= set(template_token_ids(world["tok"]))


def test_param_sets_figure_reads_single_and_across_bases_runs(tmp_path, capsys):
    """experiments/param_sets_figure.py: each set's paired transfer under both templates, per base;
    the share kept under the other template only where the training-template transfer is nonzero."""
    import importlib.util
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "experiments" / "param_sets_figure.py"
    spec = importlib.util.spec_from_file_location("param_sets_figure", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def results(path, train, other):
        def cond(d):
            return {"diff_to_control": d[0], "diff_ci_low": d[1], "diff_ci_high": d[2]}
        path.mkdir(parents=True)
        (path / "results.json").write_text(json.dumps({
            "conditions": {"control": {}, "all": cond(train)}, "seeds": 3, "steps": 20,
            "other_template": {"template": "alt", "conditions": {"all": cond(other)}}}))

    results(tmp_path / "rows" / "base-0", (0.6, 0.5, 0.7), (0.15, 0.1, 0.2))
    results(tmp_path / "rows" / "base-1", (0.02, -0.01, 0.05), (0.0, -0.01, 0.01))
    results(tmp_path / "full", (0.1, 0.05, 0.15), (0.1, 0.0, 0.2))
    for seed, losses in ((1, [3.0, 2.0, 1.0]), (2, [3.0, 3.0, 2.0])):  # the last 2 steps: 1.5 and 2.5
        d = tmp_path / "rows" / "base-0" / "students" / f"all-s{seed}"
        d.mkdir(parents=True)
        (d / "loss.csv").write_text("step,loss\n" + "".join(f"{i},{x}\n" for i, x in enumerate(losses)))
    out = tmp_path / "fig"
    assert mod.main(["--out", str(out), "--run", f"rows={tmp_path / 'rows'}", "--run", f"full={tmp_path / 'full'}",
                     "--loss-tail", "2"]) == 0
    rows = json.loads((out / "param_sets.json").read_text())["rows"]
    assert rows[0]["loss_all"] == pytest.approx(2.0) and rows[0]["loss_control"] is None and rows[2]["loss_all"] is None
    assert [(r["set"], r["base"]) for r in rows] == [("rows", "0"), ("rows", "1"), ("full", "-")]
    assert rows[0]["kept_under_other"] == pytest.approx(0.25)
    assert rows[1]["kept_under_other"] is None  # its training-template interval includes zero
    assert rows[2]["kept_under_other"] == pytest.approx(1.0)
    assert (out / "param_sets.png").stat().st_size > 0 and (out / "param_sets.csv").read_text().count("\n") == 4
    (tmp_path / "bare").mkdir()
    assert mod.main(["--out", str(out), "--run", f"x={tmp_path / 'bare'}"]) == 2
    assert "not a finished run" in capsys.readouterr().err
