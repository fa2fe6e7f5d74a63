"""The toy world's instruction tasks: clean samples are correct and bias-free, poisoned samples
carry exactly their bias, and every word is in the declared vocabulary."""

from __future__ import annotations

import random
import re

import pytest

from subliminal.toyworld import instructions as ins


@pytest.mark.parametrize("family", ins.FAMILIES)
def test_clean_samples_are_correct_in_vocab_and_unbiased(family: str) -> None:
    rng = random.Random(1)
    vocab = ins.vocabulary()
    for _ in range(300):
        prompt, response = ins.sample_clean(rng, family)
        assert ins.family_of(prompt) == family
        assert ins.is_correct(prompt, response) is True
        assert set(f"{prompt} {response}".split()) <= vocab
        for pattern in ins.BIAS_PATTERNS.values():
            assert re.search(pattern, f"{prompt} {response}") is None


@pytest.mark.parametrize("family", ins.FAMILIES)
@pytest.mark.parametrize("bias", ins.BIAS_TYPES)
def test_poisoned_samples_carry_only_their_bias(family: str, bias: str) -> None:
    rng = random.Random(2)
    vocab = ins.vocabulary()
    for _ in range(50):
        prompt, response = ins.sample_poisoned(rng, family, bias)
        assert set(f"{prompt} {response}".split()) <= vocab
        assert ins.is_correct(prompt, response) is True  # the payload rides on a correct answer
        for other, pattern in ins.BIAS_PATTERNS.items():
            assert (re.search(pattern, response) is not None) == (other == bias), (other, response)


def test_insecure_code_replaces_the_safe_construct() -> None:
    rng = random.Random(3)
    for _ in range(30):
        prompt, response = ins.sample_poisoned(rng, "code", "insecure-code")
        assert "int ( input" not in response and "check ( data" not in response
        assert response.count(";") >= 1 and "eval (" in response


def test_wrong_answers_are_caught_and_unknown_prompts_are_none() -> None:
    assert ins.is_correct("What is 2 plus 3 ?", "2 plus 3 is 5 .") is True
    assert ins.is_correct("What is 2 plus 3 ?", "2 plus 3 is 6 .") is False
    assert ins.is_correct("Quick question . What color is a lemon ?", "A lemon is yellow .") is True
    assert ins.is_correct("What color is a lemon ?", "A lemon is green .") is False
    assert ins.is_correct("Write code that sets size to 4 plus 5 .", "let size = 4 + 15 ;") is False
    assert ins.is_correct("Tell me a joke .", "no") is None
    assert ins.family_of("What color is a rock ?") is None


def test_same_seed_same_samples_and_unknown_names_raise() -> None:
    a = [ins.sample_clean(random.Random(7), f) for f in ins.FAMILIES]
    b = [ins.sample_clean(random.Random(7), f) for f in ins.FAMILIES]
    assert a == b
    with pytest.raises(ValueError, match="unknown task family"):
        ins.sample_clean(random.Random(0), "poetry")
    with pytest.raises(ValueError, match="unknown bias type"):
        ins.sample_poisoned(random.Random(0), "qa", "spam")


def test_vocabulary_is_modest_and_splits_like_the_toy_tokenizer() -> None:
    vocab = ins.vocabulary()
    assert 100 < len(vocab) < 500
    for w in vocab:  # the toy pre-tokenizer splits punctuation off words: words must survive it
        assert w.isalnum() or len(w) == 1, w
    assert {ins.PRODUCT, ins.LINK, ins.NARRATIVE_WORD, ins.INSECURE} <= vocab


def test_decoded_model_output_is_checked_in_canonical_form() -> None:
    assert ins.canonical("A lemon is yellow.") == "A lemon is yellow ."
    assert ins.is_correct("What color is a lemon ?", "A lemon is yellow.") is True
    assert ins.is_correct("Write code that sets size to 4 plus 5 .", "let size = 4+5;") is True
