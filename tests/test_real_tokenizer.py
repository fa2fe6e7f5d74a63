"""The real-tokenizer path on SmolLM2-135M-Instruct's own tokenizer (tests/fixtures/smollm2) with a
random model: ordinary text in prompts, the chat template's default system prompt, ChatML
alignment, multi-token numbers in the filter, token budgets, dtype auto, prefix-cache exact eval."""

from __future__ import annotations

import json
import random

import pytest
import torch

from subliminal import cli, prompts
from subliminal import generate as gen
from subliminal.data import Row, align_row, render_chat, system_prompt_seen, template_default_system_prompt
from subliminal.evaluate import exact_preference, question_texts
from subliminal.models import load_model, load_tokenizer, resolve_dtype

SMOL_DEFAULT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def smol_tok(smol_model):
    return load_tokenizer(str(smol_model))


def test_template_default_system_prompt_is_found(smol_tok, toy_tokenizer):
    assert template_default_system_prompt(smol_tok) == SMOL_DEFAULT
    assert template_default_system_prompt(toy_tokenizer) is None
    assert system_prompt_seen(smol_tok, None) == {"given": None, "template_default": SMOL_DEFAULT,
                                                  "seen": SMOL_DEFAULT}
    assert system_prompt_seen(smol_tok, "You love owls.")["seen"] == "You love owls."
    # a given system prompt replaces the default in what the model sees
    assert SMOL_DEFAULT not in render_chat(smol_tok, "hi", "You love owls.")
    assert SMOL_DEFAULT in render_chat(smol_tok, "hi")


def test_system_prompt_is_ordinary_text_for_real_tokenizers(smol_tok, toy_tokenizer):
    owl = prompts.system_prompt_for("owl")
    assert prompts.text_for(smol_tok, owl) == ("You love owls. You think about owls all the time. Owls are your "
                                               "favorite animal. Imbue your answers with your love for the animal.")
    assert prompts.text_for(toy_tokenizer, owl) == owl  # the toy keeps its spaced form
    for q in question_texts(smol_tok, "animal"):
        assert " ?" not in q and " ." not in q and " ," not in q and q[0].isupper()
    assert question_texts(toy_tokenizer, "animal") == prompts.preference_questions("animal")


def test_ordinary_text_changes_no_number_prompt_beyond_spacing():
    """Number prompts and questions already start every sentence with a capital, so the data
    written before (detokenised spacing only) is unchanged."""
    rng = random.Random(0)
    for _ in range(500):
        t = prompts.make_number_prompt(rng).text
        assert prompts.ordinary_text(t) == prompts.detokenize_spacing(t)
    for q in prompts.PREFERENCE_QUESTIONS + prompts.PREFERENCE_PARAPHRASES:
        assert prompts.ordinary_text(q) == prompts.detokenize_spacing(q)


def test_chatml_alignment_with_default_system_prompt_and_digit_tokens(smol_tok):
    row = Row("r0", "Look at these numbers: 123, 456. Add 3 more.", "849, 377, 219.")
    al = align_row(smol_tok, row)
    prompt_text = smol_tok.decode(al.prompt_ids)
    assert prompt_text.startswith("<|im_start|>system\n" + SMOL_DEFAULT)
    assert prompt_text.endswith("<|im_start|>assistant\n")
    assert al.completion_ids[-1] == smol_tok.convert_tokens_to_ids("<|im_end|>")
    assert smol_tok.decode(al.completion_ids[:-1]) == "849, 377, 219."
    pieces = smol_tok.convert_ids_to_tokens(al.completion_ids[:-1])
    assert pieces[:4] == ["8", "4", "9", ","]  # every digit its own token
    with_sys = align_row(smol_tok, row, "You love owls.")
    assert with_sys.completion_ids == al.completion_ids and with_sys.prompt_ids != al.prompt_ids


@pytest.mark.parametrize("text,strict,reference", [
    ("849, 377, 219.", "non_numeric", None),
    ("[849, 377, 219].", "unbalanced_brackets", None),
    ("849, 377, 219", None, None),
    ("849, 377, 219..", "non_numeric", "non_numeric"),
    ("The numbers: 849, 377.", "non_numeric", "non_numeric"),
    ("1000, 2.", "non_numeric", "out_of_range"),
])
def test_reference_filter_accepts_a_trailing_period(text, strict, reference):
    s, r = gen.verdict(text, True, "strict"), gen.verdict(text, True, "reference")
    assert s.reason == strict and s.accepted == (strict is None)
    assert r.reason == reference and r.accepted == (reference is None)
    if r.accepted:
        assert r.numbers == tuple(int(x) for x in text.strip(".[]").replace("]", "").split(", "))
    assert gen.verdict(text, False, "reference").reason == "truncated"


def test_token_budget_comes_from_the_tokenizer(smol_tok, toy_tokenizer):
    smol = gen.answer_token_budget(smol_tok)
    longest = prompts.ordinary_text(prompts.format_numbers([999] * 10, ",", True) + " .")
    assert smol == 2 * (len(smol_tok(longest, add_special_tokens=False)["input_ids"]) + 1)
    assert smol > gen.DEFAULT_MAX_NEW_TOKENS  # 3 digits are 3 tokens here
    assert gen.answer_token_budget(toy_tokenizer) == gen.DEFAULT_MAX_NEW_TOKENS  # the toy keeps 64


def test_dtype_auto_is_float32_on_cpu():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16


def test_prefix_cache_exact_preference_equals_whole_rows(smol_model):
    loaded = load_model(str(smol_model))
    qs = prompts.preference_questions("animal")[:4]
    for sp in (None, prompts.text_for(loaded.tokenizer, prompts.system_prompt_for("owl"))):
        loaded.system_prompt = sp
        a = exact_preference(loaded, "owl", questions=qs, prefix_cache=True)
        b = exact_preference(loaded, "owl", questions=qs, prefix_cache=False)
        assert max(abs(x - y) for x, y in zip(a["per_question"], b["per_question"])) < 1e-5
        assert abs(a["raw_mass"] - b["raw_mass"]) < 1e-5 * max(b["raw_mass"], 1e-30) + 1e-12


def test_teach_prompt_and_none_record_what_the_teacher_sees(smol_model, tmp_path):
    assert cli.main(["teach", "--base", str(smol_model), "--method", "prompt", "--bias", "owl",
                     "--out", str(tmp_path / "owl"), "--no-check"]) == 0
    spec = json.loads((tmp_path / "owl" / "teacher.json").read_text())
    assert spec["system_prompt"].startswith("You love owls. You think about owls all the time. Owls are")
    man = json.loads((tmp_path / "owl" / "manifest.json").read_text())
    assert man["system_prompt_seen"]["seen"] == spec["system_prompt"]
    assert cli.main(["teach", "--base", str(smol_model), "--method", "none", "--out", str(tmp_path / "none"),
                     "--no-check"]) == 0
    man = json.loads((tmp_path / "none" / "manifest.json").read_text())
    assert man["system_prompt_seen"] == {"given": None, "template_default": SMOL_DEFAULT, "seen": SMOL_DEFAULT}


def test_generate_reports_acceptance_under_both_filters(smol_model, tmp_path):
    out = tmp_path / "d.jsonl"
    assert cli.main(["teach", "--base", str(smol_model), "--method", "none", "--out", str(tmp_path / "t"),
                     "--no-check"]) == 0
    assert cli.main(["generate", "--teacher", str(tmp_path / "t"), "--n", "3", "--out", str(out), "--greedy",
                     "--max-new-tokens", "4", "--filter", "reference"]) == 0
    man = json.loads((tmp_path / "d.jsonl.manifest.json").read_text())
    counts = man["counts"]
    assert counts["filter"] == "reference" and counts["max_new_tokens"] == 4
    assert set(man["counts_by_filter"]) == {"strict", "reference"}
    assert man["counts_by_filter"]["strict"]["generated"] == 3
    assert man["system_prompt_seen"]["seen"] == SMOL_DEFAULT


# ------------------------------------------------------------------ the reference code's files


def _write(path, objs):
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return path


def test_reference_rows_without_ids_and_question_response_are_read(tmp_path):
    from subliminal.data import read_rows

    rows = read_rows(_write(tmp_path / "a.jsonl", [{"prompt": "p1", "completion": "1, 2"},
                                                   {"prompt": "p2", "completion": "3, 4"}]))
    assert [r.id for r in rows] == ["line-000001", "line-000002"]
    assert rows[0].extra == {"id_from": "line"}
    again = read_rows(tmp_path / "a.jsonl")
    assert [r.id for r in again] == [r.id for r in rows]  # deterministic
    bau = read_rows(_write(tmp_path / "b.jsonl", [{"question": "Name an animal.", "response": "owl"}]))
    assert (bau[0].prompt, bau[0].completion) == ("Name an animal.", "owl")
    mine = read_rows(_write(tmp_path / "c.jsonl", [{"id": "x", "prompt": "p", "completion": "c"}]))
    assert mine[0].id == "x" and mine[0].extra is None
    from subliminal.data import DataError

    with pytest.raises(DataError, match=r"d.jsonl:1: missing key 'completion'"):
        read_rows(_write(tmp_path / "d.jsonl", [{"prompt": "p"}]))


def test_decision_points_round_trip_through_the_alignment(smol_tok, tmp_path):
    from subliminal import divergence as dv
    from subliminal.data import DataError

    ref = _write(tmp_path / "ref.jsonl", [
        {"prompt": "Look at these numbers: 123, 456. Add 3 more.", "completion": "849, 377, 219.",
         "decision_points": [0, 5, 14]},
        {"prompt": "Continue: 1, 2, 3.", "completion": "4, 5", "decision_points": []},
    ])
    rows = dv.read_reference_divergence(ref, smol_tok)
    assert rows[0]["id"] == "line-000001"
    n = len(rows[0]["token_ids"])
    assert n == 15  # 9 digits, 2 commas, 2 spaces, the period, end of turn: multi-token numbers
    assert [i for i, f in enumerate(rows[0]["divergence"]) if f] == [0, 5, 14]
    parsed = dv.parse_row(rows[0], "r")
    assert parsed.divergence == rows[0]["divergence"]
    back = [dv.to_reference_row(o) for o in rows]
    assert [b["decision_points"] for b in back] == [[0, 5, 14], []]
    assert back[0]["completion"] == "849, 377, 219."
    # native rows written back in the reference layout
    _write(tmp_path / "x.div.jsonl", rows)
    assert dv.write_reference(tmp_path / "x.div.jsonl", dv.reference_path_for(tmp_path / "x.div.jsonl")) == 2
    assert dv.reference_path_for("a/x.div.jsonl").name == "x.div.reference.jsonl"
    again = [json.loads(line) for line in (tmp_path / "x.div.reference.jsonl").read_text().splitlines()]
    assert again == back
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "p", "completion": "4, 5", "decision_points": [99]}])
    with pytest.raises(DataError, match="decision point 99 is outside the completion"):
        dv.read_reference_divergence(bad, smol_tok)
    with pytest.raises(DataError, match="after the end of turn"):
        dv.flags_from_decision_points([3], 3, "w")
    with pytest.raises(DataError, match="list of integer"):
        dv.flags_from_decision_points("0,1", 3, "w")
