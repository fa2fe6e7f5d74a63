import random

import pytest

from subliminal import prompts


@pytest.mark.parametrize("spacing", ["canonical", "ordinary"])
def test_parse_recovers_what_make_number_prompt_drew(spacing):
    rng = random.Random(7)
    for _ in range(500):
        p = prompts.make_number_prompt(rng)
        text = p.text if spacing == "canonical" else prompts.detokenize_spacing(p.text)
        q = prompts.parse_number_prompt(text)
        assert (q.seeds, q.count, q.separator, q.brackets, q.template) == (
            p.seeds, p.count, p.separator, p.brackets, p.template)


def test_paraphrase_keeps_seeds_count_and_format_but_changes_words():
    rng = random.Random(3)
    for _ in range(200):
        p = prompts.make_number_prompt(rng)
        q = prompts.paraphrase_number_prompt(p, rng)
        assert (q.seeds, q.count, q.separator, q.brackets) == (p.seeds, p.count, p.separator, p.brackets)
        assert q.text != p.text
        assert prompts.parse_number_prompt(q.text).template == q.template


def test_parse_rejects_other_text():
    with pytest.raises(ValueError, match="not a number prompt"):
        prompts.parse_number_prompt("What is your favorite animal ?")
