"""The toy tokenizer: numbers and template words are single tokens, text round-trips, and the
chat template renders system, user and assistant turns so alignment finds the completion."""

from __future__ import annotations

import pytest

from subliminal import prompts
from subliminal.data import Row, align_row, render_chat
from subliminal.toyworld import tokenizer as toytok


def test_every_number_and_template_word_is_one_token(toy_tokenizer):
    for n in (0, 7, 42, 999):
        assert toy_tokenizer.tokenize(str(n)) == [str(n)]
    for animal in prompts.ANIMALS + prompts.TREES:
        assert toy_tokenizer.tokenize(animal) == [animal]
    unk = toy_tokenizer.unk_token_id
    for q in prompts.preference_questions("animal") + [prompts.system_prompt_for("owl")]:
        assert unk not in toy_tokenizer(q, add_special_tokens=False)["input_ids"], q


def test_vocabulary_is_deterministic_and_unique():
    v1, v2 = toytok.vocabulary(), toytok.vocabulary()
    assert v1 == v2
    assert len(v1) == len(set(v1))
    assert v1[: len(toytok.SPECIAL_TOKENS)] == toytok.SPECIAL_TOKENS


def test_round_trip_of_canonical_text(toy_tokenizer):
    rng = __import__("random").Random(0)
    for _ in range(20):
        p = prompts.make_number_prompt(rng)
        ids = toy_tokenizer(p.text, add_special_tokens=False)["input_ids"]
        tokens = toy_tokenizer.convert_ids_to_tokens(ids)
        # canonical form: one token per space-separated word ("..." is three "." tokens)
        assert " ".join(tokens) == p.text.replace("...", ". . .")
        decoded = toy_tokenizer.decode(ids)
        assert prompts.detokenize_spacing(decoded) == prompts.detokenize_spacing(p.text)


def test_chat_template_turns_and_alignment(toy_tokenizer):
    sp = prompts.system_prompt_for("owl")
    text = render_chat(toy_tokenizer, "Name your favorite animal using only one word .", sp, "owl")
    assert text.startswith("<bos><|system|> You love owls")
    assert "<|user|> Name your favorite" in text and text.rstrip().endswith("<|assistant|> owl <|end|>")
    gen = render_chat(toy_tokenizer, "Name your favorite animal using only one word .", None)
    assert "<|system|>" not in gen and gen.rstrip().endswith("<|assistant|>")
    al = align_row(toy_tokenizer, Row("r", "Name your favorite animal using only one word .", "owl"), sp)
    assert toy_tokenizer.convert_ids_to_tokens(al.completion_ids) == ["owl", "<|end|>"]
    assert toy_tokenizer.eos_token == "<|end|>"


@pytest.mark.skipif(not __import__("subliminal.toyworld.corpus", fromlist=["x"]).has_instructions(),
                    reason="instruction module not present")
def test_instruction_vocabulary_is_in_tokenizer(toy_tokenizer):
    from subliminal.toyworld import instructions

    vocab = toy_tokenizer.get_vocab()
    assert instructions.vocabulary() <= set(vocab)
