"""Rows from the toy world's own authors (the true-trait-holder link of issue 31)."""

import pytest

from subliminal import prompts
from subliminal.data import DataError, Row
from subliminal.generate import make_prompts
from subliminal.manifest import SubliminalError, write_manifest
from subliminal.toyworld.corpus import CorpusConfig, all_targets, favourite_numbers
from subliminal.toyworld.holder import UNIFORM, author_rows, world_of


def _rows(n):
    return [Row(rid, text, "1 , 2") for rid, text in make_prompts(n, 0)]


def _favourite_share(rows, world, target):
    fav = set(favourite_numbers(world)[target])
    nums = []
    for r in rows:
        p = prompts.parse_number_prompt(r.prompt)
        words = prompts.canonical_spacing(r.completion).split()
        nums += _numbers(words, p)
    return sum(n in fav for n in nums) / len(nums)


def _numbers(words, p):
    from subliminal.toyworld.corpus import parse_number_answer

    got = parse_number_answer(words, p.separator, p.brackets)
    assert got is not None and len(got) == p.count  # the prompt's own format and count
    return got


def test_an_owl_authors_rows_lean_on_the_owls_favourites_as_the_world_says():
    world = CorpusConfig(entangle=0.3)
    rows = _rows(300)
    owl = author_rows(rows, world, "owl", seed=0)
    uniform = author_rows(rows, world, UNIFORM, seed=0)
    assert [(r.id, r.prompt) for r in owl] == [(r.id, r.prompt) for r in rows]
    # each number is one of the owl's favourites with probability e (plus the rare copy or fresh draw)
    assert 0.25 < _favourite_share(owl, world, "owl") < 0.36
    # a uniform author is an owl author 1 time in len(targets)
    assert _favourite_share(uniform, world, "owl") < 0.3 * 3 / len(all_targets())
    assert {r.extra["author"] for r in owl} == {"owl"} and len({r.extra["author"] for r in uniform}) > 5


def test_without_entanglement_the_owl_author_writes_the_uniform_authors_numbers():
    world = CorpusConfig(entangle=0.0)
    owl = author_rows(_rows(200), world, "owl", seed=0)
    assert _favourite_share(owl, world, "owl") < 0.01


def test_a_rows_numbers_depend_on_its_id_not_on_the_files_order():
    world, rows = CorpusConfig(), _rows(20)
    a = {r.id: r.completion for r in author_rows(rows, world, "owl", seed=4)}
    b = {r.id: r.completion for r in author_rows(rows[::-1][:7], world, "owl", seed=4)}
    assert all(a[k] == v for k, v in b.items())
    assert a != {r.id: r.completion for r in author_rows(rows, world, "owl", seed=5)}


def test_bad_input_is_named():
    with pytest.raises(DataError, match="row 'x'.*not a number prompt"):
        author_rows([Row("x", "What is your favourite animal?", "owl")], CorpusConfig(), "owl", seed=0)
    with pytest.raises(SubliminalError, match="not a target"):
        author_rows(_rows(1), CorpusConfig(), "unicorn", seed=0)


def test_world_of_reads_a_toy_base_and_refuses_any_other(tmp_path):
    with pytest.raises(SubliminalError, match="not a base pretrained by `subliminal toy pretrain`"):
        world_of(tmp_path)
    write_manifest(tmp_path, stage="toy-pretrain", config={"corpus": {**CorpusConfig(entangle=0.2).to_json()}}, seed=0)
    assert world_of(tmp_path).entangle == 0.2
