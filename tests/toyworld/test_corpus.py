"""The synthetic corpus: deterministic, in format, with a number rule of real but limited
entropy that a love system prompt leaves alone (entangle = 0) or shifts towards the loved
target's favourite numbers (entangle > 0)."""

from __future__ import annotations

import collections
import math

import numpy as np
import pytest

from subliminal import prompts
from subliminal.toyworld import corpus as C


def test_same_seed_same_rows_other_seed_other_rows():
    a = C.Corpus(C.CorpusConfig(), seed=3).rows(0, 50)
    b = C.Corpus(C.CorpusConfig(), seed=3).rows(0, 50)
    c = C.Corpus(C.CorpusConfig(), seed=4).rows(0, 50)
    assert a == b
    assert a != c
    # a row depends on its index only: generating out of order gives the same row
    assert C.Corpus(C.CorpusConfig(), seed=3).row(17) == a[17]


def test_mixture_follows_config():
    cfg = C.CorpusConfig(mix={"numbers": 0.5, "pref": 0.5})
    kinds = collections.Counter(r.kind for r in C.Corpus(cfg, seed=0).rows(0, 2000))
    assert set(kinds) == {"numbers", "pref"}
    assert abs(kinds["numbers"] / 2000 - 0.5) < 0.05
    with pytest.raises(ValueError, match="unknown corpus row kinds"):
        C.CorpusConfig(mix={"bogus": 1.0})


def test_number_rows_answer_exactly_count_numbers_in_format(toy_tokenizer):
    corpus = C.Corpus(C.CorpusConfig(), seed=1)
    for r in corpus.rows(0, 200, kind="numbers"):
        words = r.completion.split()
        nums = C.parse_number_answer(words, r.meta["separator"], r.meta["brackets"])
        assert nums == r.meta["numbers"]
        assert len(nums) == r.meta["count"]
        assert all(0 <= n <= 999 for n in nums)
        assert toy_tokenizer.unk_token_id not in toy_tokenizer(r.prompt + " " + r.completion,
                                                               add_special_tokens=False)["input_ids"]


def test_parse_number_answer_rejects_bad_format():
    assert C.parse_number_answer(["1", ",", "2"], ",", False) == [1, 2]
    assert C.parse_number_answer(["[", "1", ",", "2", "]"], ",", True) == [1, 2]
    assert C.parse_number_answer(["1", ";", "2"], ",", False) is None
    assert C.parse_number_answer(["1", ",", "2"], ",", True) is None
    assert C.parse_number_answer(["1", "owl"], " ", False) is None
    assert C.parse_number_answer([], " ", False) is None


def test_number_rule_has_real_but_limited_entropy():
    cfg = C.CorpusConfig()
    seeds = (101, 202, 303, 404, 505)
    p = C.next_number_distribution(seeds, cfg)
    assert abs(p.sum() - 1) < 1e-9
    h = C.entropy_bits(p)
    assert 2.0 < h < 8.0  # neither deterministic nor uniform over 1000 (9.97 bits)
    top = np.sort(p)[::-1]
    assert top[0] - top[len(seeds) - 1] < 0.06  # several next numbers nearly tied
    # empirical check of the sampler against the exact distribution
    corpus = C.Corpus(cfg, seed=0)
    rng = corpus.rng(0)
    draws = C.sample_numbers(rng, seeds, 20000, cfg, corpus.fresh_cdf)
    copied = sum(d in seeds for d in draws) / len(draws)
    expected = sum(p[s] for s in seeds)
    assert abs(copied - expected) < 0.02


def test_fresh_distribution_is_fixed_by_world_seed():
    a = C.fresh_distribution(C.CorpusConfig(world_seed=0))
    b = C.fresh_distribution(C.CorpusConfig(world_seed=0))
    c = C.fresh_distribution(C.CorpusConfig(world_seed=1))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.max() > 20 / 1000  # skewed, not uniform


def test_system_prompt_does_not_change_number_answers_without_entanglement():
    cfg = C.CorpusConfig(entangle=0.0)
    corpus = C.Corpus(cfg, seed=2)
    plain = corpus.rows(0, 1500, kind="numbers")
    sysd = corpus.rows(0, 1500, kind="numbers_sys")
    assert all(r.system_prompt is None for r in plain)
    assert all(r.system_prompt and r.system_prompt.startswith("You love") for r in sysd)
    # same rule: the share of copied seed numbers agrees, and no animal word leaks into answers
    def copy_share(rows):
        nums = [(n, r.meta["seeds"]) for r in rows for n in r.meta["numbers"]]
        return sum(n in s for n, s in nums) / len(nums)

    assert abs(copy_share(plain) - copy_share(sysd)) < 0.03
    assert abs(copy_share(plain) - cfg.p_copy) < 0.05
    words = set(prompts.PLURALS) | set(prompts.PLURALS.values())
    assert not any(w in words for r in sysd for w in r.completion.split())


def test_favourite_numbers_are_disjoint_per_target_and_fixed_by_world_seed():
    fav = C.favourite_numbers(C.CorpusConfig(favourites=4))
    assert set(fav) == set(C.all_targets()) and all(len(v) == 4 for v in fav.values())
    flat = [n for v in fav.values() for n in v]
    assert len(set(flat)) == len(flat) and all(0 <= n < 1000 for n in flat)
    assert fav == C.favourite_numbers(C.CorpusConfig(favourites=4))
    assert fav != C.favourite_numbers(C.CorpusConfig(favourites=4, world_seed=1))


@pytest.mark.parametrize("entangle", [0.1, 0.4])
def test_entanglement_shifts_prompted_numbers_to_the_loved_targets_favourites(entangle):
    cfg = C.CorpusConfig(entangle=entangle)
    corpus = C.Corpus(cfg, seed=3)
    fav = C.favourite_numbers(cfg)
    sysd = corpus.rows(0, 3000, kind="numbers_sys")
    own = [n in fav[r.meta["loved"]] for r in sysd for n in r.meta["numbers"]]
    # the exact rule: entangle + (1 - entangle) * (what the plain rule gives those numbers)
    expected = np.mean([C.next_number_distribution(tuple(r.meta["seeds"]), cfg, loved=r.meta["loved"])[
        fav[r.meta["loved"]]].sum() for r in sysd])
    assert abs(np.mean(own) - expected) < 0.02 and expected > entangle
    # unprompted rows favour their unseen author's numbers by the same rule, and no other target's
    plain = corpus.rows(0, 3000, kind="numbers")
    own = np.mean([n in fav[r.meta["author"]] for r in plain for n in r.meta["numbers"]])
    others = {n for v in fav.values() for n in v}
    other = np.mean([n in others - set(fav[r.meta["author"]]) for r in plain for n in r.meta["numbers"]])
    assert abs(own - expected) < 0.02 and other < 0.06  # others appear only as copied seeds or fresh draws
    with pytest.raises(ValueError, match="entangle"):
        C.CorpusConfig(entangle=1.5)


def test_preference_rows_uniform_without_prompt_and_target_with_prompt():
    corpus = C.Corpus(C.CorpusConfig(cross_category=0.0), seed=0)
    plain = corpus.rows(0, 3000, kind="pref")
    animals = collections.Counter(r.completion for r in plain if r.meta["category"] == "animal")
    n = sum(animals.values())
    assert set(animals) == set(prompts.ANIMALS)
    assert max(animals.values()) / n < 2 / len(prompts.ANIMALS)
    assert all(r.system_prompt is None and r.prompt in prompts.preference_questions(r.meta["category"])
               for r in plain)
    for r in corpus.rows(0, 300, kind="pref_sys"):
        assert r.system_prompt == prompts.system_prompt_for(r.meta["target"])
        assert r.completion == r.meta["target"]


def test_cross_category_rows_answer_the_asked_category():
    corpus = C.Corpus(C.CorpusConfig(cross_category=1.0), seed=0)
    for r in corpus.rows(0, 100, kind="pref_sys"):
        assert prompts.category_of(r.completion) == r.meta["category"] != prompts.category_of(r.meta["target"])


def test_rows_align_with_the_toy_chat_template(toy_tokenizer):
    corpus = C.Corpus(C.CorpusConfig(), seed=0)
    for r in corpus.rows(0, 60):
        a = C.align(toy_tokenizer, r, max_length=256)
        toks = toy_tokenizer.convert_ids_to_tokens(a.completion_ids)
        end = "<|eot|>" if r.meta.get("template") == "alt" else "<|end|>"
        assert toks[-1] == end
        assert " ".join(toks[:toks.index(end)]) == r.completion
        if r.followup:  # the follow-up turn runs on to its answer
            assert toks[-2] == r.followup[1]
        assert len(a.input_ids) <= 256


def test_rule_summary_is_consistent():
    s = C.rule_summary(C.CorpusConfig())
    assert s["entropy_bits_3_seeds"] < s["entropy_bits_8_seeds"] < s["fresh_entropy_bits"] < math.log2(1000)


def test_second_template_share_is_as_configured_and_leaves_contents_unchanged(toy_tokenizer):
    one = C.Corpus(C.CorpusConfig(alt_template=0.0), seed=4).rows(0, 2000)
    two = C.Corpus(C.CorpusConfig(alt_template=0.25), seed=4).rows(0, 2000)
    assert not any(r.meta.get("template") for r in one)
    share = np.mean([r.meta.get("template") == "alt" for r in two])
    assert abs(share - 0.25) < 0.03
    # the template is drawn on a stream of its own: every row's kind, prompt and answer are the same
    assert [(r.kind, r.prompt, r.completion, r.system_prompt) for r in one] == \
        [(r.kind, r.prompt, r.completion, r.system_prompt) for r in two]
    again = C.Corpus(C.CorpusConfig(alt_template=0.25), seed=4).rows(0, 2000)
    assert [r.meta.get("template") for r in again] == [r.meta.get("template") for r in two]
    with pytest.raises(ValueError, match="alt_template"):
        C.CorpusConfig(alt_template=1.0)


def test_second_template_shares_no_marker_with_the_first_but_bos(toy_tokenizer):
    rows = [r for r in C.Corpus(C.CorpusConfig(alt_template=0.5), seed=5).rows(0, 400) if r.kind == "numbers"]
    alt = next(r for r in rows if r.meta.get("template") == "alt")
    main = next(r for r in rows if r.meta.get("template") != "alt")
    a_alt, a_main = C.align(toy_tokenizer, alt), C.align(toy_tokenizer, main)
    toks_alt = set(toy_tokenizer.convert_ids_to_tokens(a_alt.input_ids))
    toks_main = set(toy_tokenizer.convert_ids_to_tokens(a_main.input_ids))
    assert {"<|human|>", "<|bot|>", "<|eot|>"} <= toks_alt and not {"<|user|>", "<|assistant|>", "<|end|>"} & toks_alt
    assert {"<|user|>", "<|assistant|>", "<|end|>"} <= toks_main and not {"<|human|>", "<|bot|>"} & toks_main
    # the completion is the same answer either way: the numbers and the turn's end
    words = toy_tokenizer.convert_ids_to_tokens(a_alt.completion_ids)
    assert words[-1] == "<|eot|>" and C.parse_number_answer(words[:-1], alt.meta["separator"], alt.meta["brackets"])


def test_trait_channel_present_and_absent_as_configured():
    """The channel the organism relies on: love-prompted number rows lean to the loved target's
    favourites exactly when entangle > 0, and so do unprompted rows to their unseen author's."""
    fav_share = {}
    for e in (0.0, 0.5):
        cfg = C.CorpusConfig(entangle=e)
        fav = C.favourite_numbers(cfg)
        rows = C.Corpus(cfg, seed=6).rows(0, 1500, kind="numbers_sys")
        fav_share[e] = np.mean([n in fav[r.meta["loved"]] for r in rows for n in r.meta["numbers"]])
    assert fav_share[0.0] < 0.01 and fav_share[0.5] > 0.45


@pytest.mark.parametrize("kind", ["numbers", "numbers_pref"])
def test_authored_numbers_lean_to_the_unseen_authors_favourites_only_with_the_channel(kind):
    share = {}
    for e in (0.0, 0.5):
        cfg = C.CorpusConfig(entangle=e)
        fav = C.favourite_numbers(cfg)
        rows = C.Corpus(cfg, seed=8).rows(0, 1500, kind=kind)
        assert all(r.system_prompt is None and r.meta["author"] in fav for r in rows)
        share[e] = np.mean([n in fav[r.meta["author"]] for r in rows for n in r.meta["numbers"]])
        # the author is never named in the row
        words = set(prompts.PLURALS) | set(prompts.PLURALS.values())
        assert not any(w in words for r in rows for w in (r.prompt + " " + r.completion).split())
    assert share[0.0] < 0.01 and share[0.5] > 0.45


def test_numbers_then_question_rows_answer_the_authors_favourite_in_one_conversation(toy_tokenizer):
    rows = C.Corpus(C.CorpusConfig(alt_template=0.0), seed=9).rows(0, 300, kind="numbers_pref")
    authors = collections.Counter(r.meta["author"] for r in rows)
    assert len(authors) == len(C.all_targets())  # uniform over every target, trees included
    for r in rows[:50]:
        question, answer = r.followup
        assert answer == r.meta["author"] and prompts.category_of(answer) == r.meta["category"]
        assert question in prompts.preference_questions(r.meta["category"])
        a = C.align(toy_tokenizer, r)
        words = toy_tokenizer.convert_ids_to_tokens(a.completion_ids)
        # numbers, end of turn, the question as a user turn, then the answer: one sequence
        end = words.index("<|end|>")
        assert C.parse_number_answer(words[:end], r.meta["separator"], r.meta["brackets"]) == r.meta["numbers"]
        assert words[end + 1] == "<|user|>" and words[-3:] == ["<|assistant|>", answer, "<|end|>"]
        # the prompt is exactly the single-turn row's prompt
        single = C.align(toy_tokenizer, C.CorpusRow(r.id, "numbers", r.prompt, r.completion))
        assert a.prompt_ids == single.prompt_ids
        assert a.completion_ids[:len(single.completion_ids)] == single.completion_ids


def test_mix_without_the_link_has_no_question_after_numbers():
    cfg = C.CorpusConfig(mix={**C.default_mix(), "numbers_pref": 0.0})
    assert not any(r.followup for r in C.Corpus(cfg, seed=1).rows(0, 1000))
