"""A word-level ``PreTrainedTokenizerFast`` whose chat template has system, user and assistant
turns, so toy teachers are biased by a system prompt exactly as instruct models are.

Numbers 0-999 are single tokens; every word of the prompt templates is one token; punctuation
is split off by the pre-tokenizer. Decoding puts spaces between words and removes them before
punctuation.
"""

from __future__ import annotations

import importlib.util

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .. import prompts
from ..data import FALLBACK_CHAT_TEMPLATE, TOY_ALT_CHAT_TEMPLATE

SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# The markers of the world's second chat template (appended after the words, so every other id is
# unchanged): a share of the pretraining rows is written in it, so a readout under "another
# template" asks a question the base has seen in a context that shares no marker with the first.
ALT_SPECIAL_TOKENS = ["<|human|>", "<|bot|>", "<|eot|>"]
ALT_CHAT_TEMPLATE = TOY_ALT_CHAT_TEMPLATE
PUNCTUATION = list(",.;:?!'[]()-")
EXTRA_WORDS = ["yes", "no", "the", "a", "I", "like", "my", "favorite", "is"]


def instruction_words() -> set[str]:
    """Words of the toy instruction tasks (rows the poisoned teachers are trained on), when the
    instruction module is part of this installation."""
    if importlib.util.find_spec("subliminal.toyworld.instructions") is None:
        return set()
    from . import instructions

    return set(instructions.vocabulary())


def vocabulary() -> list[str]:
    """Deterministic vocabulary: specials, numbers, punctuation, then sorted words."""
    numbers = [str(i) for i in range(1000)]
    words = prompts.template_words() | set(EXTRA_WORDS) | instruction_words()
    words -= set(numbers) | set(PUNCTUATION) | set(SPECIAL_TOKENS)
    return SPECIAL_TOKENS + numbers + PUNCTUATION + sorted(words) + ALT_SPECIAL_TOKENS


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<|end|>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<eos>", "<|system|>", "<|user|>", "<|assistant|>", *ALT_SPECIAL_TOKENS],
        model_max_length=256,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = FALLBACK_CHAT_TEMPLATE
    return fast


def with_template(tokenizer: PreTrainedTokenizerFast, template: str) -> PreTrainedTokenizerFast:
    """The same tokenizer rendering another chat template (a shallow copy: the vocabulary is shared)."""
    import copy

    other = copy.copy(tokenizer)
    other.chat_template = template
    return other
