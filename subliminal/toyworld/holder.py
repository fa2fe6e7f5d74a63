"""Rows written by the toy world's own authors: the true-trait-holder link of issue 31.

A teacher can pass on at most what the base links from its numbers to its answer. In the toy world
that link can be measured directly, because the world knows how a trait-holder writes numbers
(:func:`subliminal.toyworld.corpus.sample_numbers` with the favourite's numbers): students trained
on rows an owl author wrote, against students trained on rows authors of a uniformly drawn
favourite wrote (the corpus's own mixture), for the same prompts. Their paired difference is the
transfer a perfectly leaning teacher would reach on this base; a teacher's transfer far below it
says the teacher fails, a link near zero says the base does.

The completions follow the world's number rule exactly, drawn from a stream of their own per row id
(so a row's numbers do not depend on the file's order or on which other rows are kept).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np

from .. import prompts
from ..data import DataError, Row
from ..manifest import SubliminalError, read_manifest
from .corpus import CorpusConfig, all_targets, favourite_numbers, fresh_distribution, sample_numbers
from .pretrain import STAGE

UNIFORM = "uniform"  # the author of each row drawn uniformly over every target, as in the corpus


def world_of(base: str | Path) -> CorpusConfig:
    """The corpus config a toy base was pretrained on (its manifest); an error for any other base."""
    m = read_manifest(base)
    if not m or m.get("stage") != STAGE or "corpus" not in m.get("config", {}):
        raise SubliminalError(f"{base}: not a base pretrained by `subliminal toy pretrain` (no toy-world manifest); "
                              "rows from the world's own trait-holder exist only in the toy world")
    return CorpusConfig(**m["config"]["corpus"])


def author_rows(rows: list[Row], world: CorpusConfig, author: str, seed: int) -> list[Row]:
    """The same ids and prompts, each answered as the world's ``author`` would answer it (``uniform``:
    a favourite drawn per row over every target). A prompt that is not a number prompt of the world's
    templates is an error naming the row."""
    if author != UNIFORM and author not in all_targets():
        raise SubliminalError(f"author {author!r}: not a target of the toy world ({', '.join(all_targets())}) "
                              f"or {UNIFORM!r}")
    cdf = np.cumsum(fresh_distribution(world))
    favourites = favourite_numbers(world)
    out = []
    for row in rows:
        try:
            p = prompts.parse_number_prompt(row.prompt)
        except ValueError as e:
            raise DataError(f"{row.where or row.id}: row {row.id!r} is not a number prompt of the toy world ({e})") \
                from None
        rng = random.Random(f"holder:{seed}:{author}:{row.id}")
        favourite = rng.choice(all_targets()) if author == UNIFORM else author
        numbers = sample_numbers(rng, p.seeds, p.count, world, cdf, favourites[favourite] if world.entangle > 0 else None)
        text = prompts.format_numbers(numbers, p.separator, p.brackets)
        # keep the data's own spacing convention (generate writes ordinary spacing)
        if prompts.canonical_spacing(row.prompt) != row.prompt:
            text = prompts.detokenize_spacing(text)
        extra: dict[str, Any] = {"author": favourite}
        out.append(Row(row.id, row.prompt, text, f"toy-world author ({author})", extra))
    return out
