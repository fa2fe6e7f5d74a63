"""eval under another context (--system-prompt, --chat-template): a template-rows student reads
out exactly as its base under a template that shares none of its trained rows, and differently
under the training one; the context is recorded and fingerprinted; bad contexts are named errors."""

from __future__ import annotations

import json
import random

import pytest

from subliminal import prompts
from subliminal.cli import main
from subliminal.data import Row, write_jsonl

# A second template for the toy tokenizer made only of tokens the toy template never uses.
ALT_TEMPLATE = ("{% for m in messages %}{{ '<|system|> ' + m['content'] + ' <eos> ' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|system|> ' }}{% endif %}")


@pytest.fixture(scope="module")
def student(tmp_path_factory, tiny_model_factory):
    """A tiny untied Llama and a student that trained only its template rows."""
    d = tmp_path_factory.mktemp("ctx")
    rng = random.Random(0)
    rows = []
    for i in range(8):
        p = prompts.make_number_prompt(rng)
        rows.append(Row(f"r{i}", p.text, prompts.format_numbers([rng.randint(0, 999) for _ in range(p.count)],
                                                                p.separator, p.brackets)))
    write_jsonl(d / "data.jsonl", rows)
    base = tiny_model_factory("llama")
    argv = ["distill", "--base", str(base), "--data", str(d / "data.jsonl"), "--out", str(d / "s"), "--params",
            "template-rows", "--batch-size", "4", "--max-steps", "4", "--lr", "5e-2"]
    assert main(argv) == 0
    (d / "alt.jinja").write_text(ALT_TEMPLATE)
    return {"base": base, "student": d / "s", "alt": d / "alt.jinja", "dir": d}


def _eval(model, out, *extra):
    assert main(["eval", "--model", str(model), "--target", "owl", "--max-questions", "3", "--out", str(out),
                 *extra]) == 0
    return json.loads(out.read_text())


def test_the_readout_moves_only_in_the_context_the_student_trained(student, tmp_path):
    base_own = _eval(student["base"], tmp_path / "b.json")
    stu_own = _eval(student["student"], tmp_path / "s.json")
    assert stu_own["exact"]["per_question"] != base_own["exact"]["per_question"]
    base_alt = _eval(student["base"], tmp_path / "b-alt.json", "--chat-template", str(student["alt"]))
    stu_alt = _eval(student["student"], tmp_path / "s-alt.json", "--chat-template", str(student["alt"]))
    # none of the student's trained rows is in this context, and its head is untied: exactly the base
    assert stu_alt["exact"]["per_question"] == base_alt["exact"]["per_question"]
    assert base_alt["exact"]["per_question"] != base_own["exact"]["per_question"]
    ctx = stu_alt["context"]
    assert sorted(ctx["template_tokens"]) == ["<eos>", "<|system|>"] and ctx["chat_template"] == str(student["alt"])
    assert ctx["student_params"] == "template-rows" and ctx["trained_rows_in_context"] == []
    assert sorted(ctx["trained_rows_not_in_context"]) == sorted(["<bos>", "<|user|>", "<|assistant|>", "<|end|>"])
    assert stu_own["context"]["trained_rows_in_context"] == ["<bos>", "<|user|>", "<|assistant|>", "<|end|>"]
    # the named toy template is the toy tokenizer's own: the same readout, recorded as asked
    named = _eval(student["student"], tmp_path / "s-toy.json", "--chat-template", "toy")
    assert named["exact"]["per_question"] == stu_own["exact"]["per_question"] and named["context"]["chat_template"] == "toy"


def test_system_prompt_changes_the_readout_and_the_fingerprint(student, tmp_path, capsys):
    own = _eval(student["base"], tmp_path / "own.json")
    sp = prompts.system_prompt_for("owl")
    owl = _eval(student["base"], tmp_path / "owl.json", "--system-prompt", sp)
    assert owl["exact"]["per_question"] != own["exact"]["per_question"]
    assert owl["context"]["system_prompt"]["seen"] == sp and owl["system_prompt"] == sp
    assert {"<|system|>", "owls"} <= set(owl["context"]["template_tokens"])
    man = json.loads(next(tmp_path.glob("owl.json*manifest*")).read_text())
    assert man["fingerprint"]["config"]["system_prompt"] == sp
    assert "system_prompt" not in json.loads(next(tmp_path.glob("own.json*manifest*")).read_text())["fingerprint"]["config"]
    # the same command again is a no-op; another system prompt on the same --out is refused
    assert main(["eval", "--model", str(student["base"]), "--target", "owl", "--max-questions", "3", "--out",
                 str(tmp_path / "owl.json"), "--system-prompt", sp]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main(["eval", "--model", str(student["base"]), "--target", "owl", "--max-questions", "3", "--out",
                 str(tmp_path / "owl.json"), "--system-prompt", "You love cats ."]) == 2
    assert "system-prompt" in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (["--chat-template", "no-such-template"], "neither a file nor a named template"),
    (["--chat-template", "chatml"], "does not know"),  # the toy tokenizer has no ChatML tokens
    (["--system-prompt", "You adore axolotls"], "does not know"),
    (["--chat-template", "BROKEN"], "cannot render"),
])
def test_bad_contexts_are_named_errors(student, tmp_path, capsys, extra, message):
    if extra[-1] == "BROKEN":
        (tmp_path / "broken.jinja").write_text("{% for m in messages %}{{ m['content'] }")
        extra = ["--chat-template", str(tmp_path / "broken.jinja")]
    argv = ["eval", "--model", str(student["base"]), "--target", "owl", "--max-questions", "2", "--out",
            str(tmp_path / "e.json"), *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "e.json").exists()


def test_chatml_without_the_default_system_prompt_on_smollm2(smol_model, tmp_path):
    own = _eval(smol_model, tmp_path / "own.json")
    plain = _eval(smol_model, tmp_path / "chatml.json", "--chat-template", "chatml")
    assert own["context"]["system_prompt"]["seen"].startswith("You are a helpful AI assistant named SmolLM")
    assert plain["context"]["system_prompt"]["seen"] is None
    assert "Ġhelpful" in own["context"]["template_tokens"] and "Ġhelpful" not in plain["context"]["template_tokens"]
    assert plain["exact"]["per_question"] != own["exact"]["per_question"]
