"""Prompt/completion alignment (data.align_row) on the toy word-level tokenizer and on a byte-level
BPE tokenizer with a ChatML template, and its errors."""

from __future__ import annotations

import pytest

from subliminal.data import DataError, Row, align_row, encode, encode_prompt, render_chat
from subliminal.prompts import system_prompt_for

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A small byte-level BPE (GPT-2 / Qwen style: merges can cross word boundaries) with ChatML."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from subliminal.generate import make_prompts

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [p for _, p in make_prompts(200, 0)] + ["12, 345, 6", "[1, 2, 3]", system_prompt_for("owl")] * 20
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


ROW = Row("r7", "Continue: 145, 267, 389. Add 5 more numbers.", "412, 58, 903")


def test_toy_alignment_completion_and_end_token(toy_tokenizer):
    a = align_row(toy_tokenizer, ROW, system_prompt_for("owl"))
    assert a.prompt_ids == encode(toy_tokenizer, render_chat(toy_tokenizer, ROW.prompt, system_prompt_for("owl")))
    end = toy_tokenizer.convert_tokens_to_ids("<|end|>")
    assert a.completion_ids == encode(toy_tokenizer, "412 , 58 , 903") + [end]
    assert a.input_ids == a.prompt_ids + a.completion_ids and a.n_prompt == len(a.prompt_ids)


def test_system_prompt_changes_prompt_ids_not_completion_ids(toy_tokenizer, bpe_tokenizer):
    for tok in (toy_tokenizer, bpe_tokenizer):
        plain = align_row(tok, ROW)
        owl = align_row(tok, ROW, system_prompt_for("owl"))
        cat = align_row(tok, ROW, system_prompt_for("cat"))
        assert plain.completion_ids == owl.completion_ids == cat.completion_ids
        assert len({tuple(plain.prompt_ids), tuple(owl.prompt_ids), tuple(cat.prompt_ids)}) == 3


def test_bpe_alignment_stops_at_end_of_turn(bpe_tokenizer):
    a = align_row(bpe_tokenizer, ROW, system_prompt_for("owl"))
    im_end = bpe_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert a.completion_ids[-1] == im_end and im_end not in a.completion_ids[:-1]  # the trailing "\n" is cut
    assert bpe_tokenizer.decode(a.completion_ids[:-1]) == ROW.completion
    assert bpe_tokenizer.decode(a.prompt_ids).endswith("<|im_start|>assistant\n")


def test_given_prompt_ids_align_as_the_rendered_prompt(toy_tokenizer, bpe_tokenizer):
    """The exact preference encodes each question once for all its candidate answers: the rows
    equal the ones aligned from scratch, and a prompt that is not the completion's prefix is still
    refused."""
    for tok in (toy_tokenizer, bpe_tokenizer):
        for sp in (None, system_prompt_for("owl")):
            p_ids = encode_prompt(tok, ROW.prompt, sp)
            for completion in (ROW.completion, "owl", "7 , 8"):
                row = Row("r7", ROW.prompt, completion)
                assert align_row(tok, row, sp, prompt_token_ids=p_ids) == align_row(tok, row, sp)
    with pytest.raises(DataError, match="row 'r7'.*not a prefix"):
        align_row(toy_tokenizer, ROW, prompt_token_ids=encode_prompt(toy_tokenizer, "another prompt"))


def test_prefix_failure_names_the_row(toy_tokenizer):
    tok = toy_tokenizer
    # the generation prompt says something the rendered conversation does not: no prefix property
    tok.chat_template = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' <|end|> ' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|> yes ' }}{% endif %}")
    with pytest.raises(DataError, match="row 'r7'.*not a prefix"):
        align_row(tok, ROW)


def test_too_long_and_empty_completion_errors(toy_tokenizer):
    n = len(align_row(toy_tokenizer, ROW).input_ids)
    assert len(align_row(toy_tokenizer, ROW, max_length=n).input_ids) == n
    with pytest.raises(DataError, match="row 'r7'.*context length"):
        align_row(toy_tokenizer, ROW, max_length=n - 1)
    with pytest.raises(DataError, match="row 'e'.*empty completion"):
        align_row(toy_tokenizer, Row("e", "Hi", "<|end|>"))


def test_pad_batch_left_and_right():
    import pytest as _pytest

    from subliminal.data import pad_batch

    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    with _pytest.raises(ValueError):
        pad_batch([[1]], 0, side="middle")
