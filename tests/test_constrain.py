"""Constrained decoding of number lists (subliminal.constrain, generate --constrain numbers)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from subliminal import cli, prompts
from subliminal import generate as gen
from subliminal.constrain import DEAD, ListFormat, NumberListConstraint, complete, scan
from subliminal.data import end_token_ids
from subliminal.forward import SamplingConfig, sample
from subliminal.models import load_model

COMMA = ListFormat(",", False, 3)


@pytest.mark.parametrize("text,ok,done", [
    ("1", True, True), ("12, 345", True, True), ("1,2,3", True, True), ("1 , 2", True, True),
    ("1, 2,", True, False), ("1, 2, 3", True, True), ("1, 2, 3,", False, False),  # count reached: no separator
    ("1, 2, 3, 4", False, False), ("1234", False, False), (" 1", False, False), ("1;2", False, False),
    ("1,  2", False, False), ("", True, False),
])
def test_comma_lists(text, ok, done):
    s = scan(COMMA, text)
    assert (s.state != DEAD) == ok
    assert complete(COMMA, s) == done


def test_brackets_spaces_and_semicolons():
    br = ListFormat(",", True, 10)
    assert complete(br, scan(br, "[1, 2]")) and not complete(br, scan(br, "[1, 2"))
    assert scan(br, "1, 2").state == DEAD and scan(br, "[1, 2]3").state == DEAD
    sp = ListFormat(" ", False, 10)
    assert complete(sp, scan(sp, "1 22 333")) and scan(sp, "1  2").state == DEAD and scan(sp, "1,2").state == DEAD
    semi = ListFormat(";", False, 10)
    assert complete(semi, scan(semi, "1; 2 ; 3")) and scan(semi, "1, 2").state == DEAD


def test_min_count_holds_the_end_back():
    f = ListFormat(",", False, 3, 3)
    assert not complete(f, scan(f, "1, 2")) and complete(f, scan(f, "1, 2, 3"))
    b = ListFormat(",", True, 3, 2)
    assert scan(b, "[1]").state == DEAD and complete(b, scan(b, "[1, 2]"))


def test_format_of_prompt_reads_separator_brackets_and_count():
    rng = random.Random(3)
    for _ in range(200):
        p = prompts.make_number_prompt(rng)
        f = ListFormat.of_prompt(prompts.ordinary_text(p.text), 10)
        assert (f.separator, f.brackets, f.max_count, f.min_count) == (p.separator, p.brackets, p.count, p.count)
    assert ListFormat.of_prompt("Write some numbers.", 10) == ListFormat(",", False, 10)


def test_every_constrained_answer_passes_the_filter_on_a_real_tokenizer(smol_model):
    """A random model on SmolLM2's tokenizer writes anything at all; under the constraint every
    greedy and sampled answer is a list the strict filter keeps, with at most the asked count."""
    loaded = load_model(str(smol_model))
    tok = loaded.tokenizer
    stop = end_token_ids(tok)
    rng = random.Random(0)
    ps = [prompts.make_number_prompt(rng) for _ in range(6)]
    texts = [prompts.ordinary_text(p.text) for p in ps]
    from subliminal.data import encode, render_chat

    seqs = [encode(tok, render_chat(tok, t)) for t in texts]
    for cfg in (SamplingConfig(0.0), SamplingConfig(1.0, seed=1)):
        rule = NumberListConstraint(tok, stop, [ListFormat.of_prompt(t, 10) for t in texts])
        rngs = [random.Random(i) for i in range(len(seqs))]
        outs = sample(loaded.model, seqs, pad_id=tok.pad_token_id, stop_ids=stop, max_new=[60] * len(seqs), cfg=cfg,
                      rngs=rngs, constraint=rule)
        for p, (new, stopped) in zip(ps, outs):
            assert stopped, tok.decode(new)
            v = gen.parse_number_list(tok.decode(new[:-1], skip_special_tokens=True).strip())
            assert v.accepted, tok.decode(new)
            assert len(v.numbers) == p.count
            assert v.separator == p.separator or (p.separator == " " and len(v.numbers) == 1)


def test_greedy_constrained_is_the_argmax_among_allowed_ids(smol_model):
    """The constraint only masks: each greedy token is the model's best allowed one."""
    loaded = load_model(str(smol_model))
    tok, model = loaded.tokenizer, loaded.model
    stop = end_token_ids(tok)
    text = "Give 3 more values. Return a comma separated list of numbers."
    from subliminal.data import encode, render_chat

    seq = encode(tok, render_chat(tok, text))
    rule = NumberListConstraint(tok, stop, [ListFormat.of_prompt(text, 3)])
    (new, _), = sample(model, [seq], pad_id=tok.pad_token_id, stop_ids=stop, max_new=[30], cfg=SamplingConfig(0.0),
                       constraint=rule)
    check = NumberListConstraint(tok, stop, [ListFormat.of_prompt(text, 3)])
    with torch.no_grad():
        for k, t in enumerate(new):
            logits = model(torch.tensor([seq + new[:k]])).logits[0, -1]
            allowed = check.allowed(0, new[:k])
            assert t == allowed[int(torch.argmax(logits[allowed]))]


def test_generate_cli_constrain_numbers_keeps_every_row_and_is_in_the_fingerprint(smol_model, tmp_path):
    out = tmp_path / "d.jsonl"
    args = ["generate", "--teacher", str(smol_model), "--n", "5", "--greedy", "--out", str(out), "--max-new-tokens", "48"]
    assert cli.main([*args, "--constrain", "numbers"]) == 0
    man = json.loads((tmp_path / "d.jsonl.manifest.json").read_text())
    assert man["counts"]["accepted"] == 5 and man["fingerprint"]["config"]["constrain"] == "numbers"
    # the unconstrained command is another run: it refuses to resume over this one
    assert cli.main(args) == 2
