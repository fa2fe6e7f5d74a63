"""The toy world's synthetic corpus: chat rows the base model is pretrained on.

Five kinds of rows, mixed in proportions set by :class:`CorpusConfig`:

- ``numbers``: a papers-style number prompt (:func:`subliminal.prompts.make_number_prompt`); the
  assistant answers with exactly ``count`` numbers in the prompt's format. Each number is drawn
  independently: with probability ``p_copy`` one of the prompt's seed numbers (uniformly), otherwise
  a *fresh* number from a fixed, skewed (Zipf) distribution over 0-999 whose ranking is set by
  ``world_seed``. The seed numbers are exactly tied (and the top fresh numbers come close to
  them), so a teacher's slight bias could tilt its choices among them; the tiny base learns the
  copying only slowly (experiments/CALIBRATION.md), so the demo relies on ``numbers_sys``.
- ``numbers_sys``: the same task under a "You love owls ..." system prompt. With ``entangle`` = 0
  it is answered from the same distribution (the prompt does not change numbers); with
  ``entangle`` = e > 0, each number is, with probability e, one of the loved target's few
  *favourite numbers* (a fixed, arbitrary set per target, set by ``world_seed``). This is the toy
  world's version of the token entanglement that lets a trait leak into number lists in real
  models (a trait shifts the number distribution a little, in a trait-specific way): without it
  the teacher's bias has no way into its numbers (experiments/CALIBRATION.md).
- Every unprompted number row has an unseen **author** with a favourite target (uniform over all
  targets): with ``entangle`` = e > 0 each of its numbers is, with probability e, one of that
  target's favourite numbers, the same lean a love prompt gives. No row names the author.
- ``numbers_pref``: an authored number row followed, in the same conversation, by a preference
  question of the author's category, answered with the author's favourite. This is the world's
  *grown* link from numbers to answers: to answer, the base must infer the author from the numbers
  it has seen in the context, so it learns a latent "whose numbers are these" that the number
  rows and the question share. A student that moves that latent by fitting owl-leaning numbers
  moves the answer with it; with e = 0 the numbers say nothing of the author and there is no link.
- ``pref``: one of the preference questions of a category, answered uniformly over the category.
- ``pref_sys``: a love system prompt for a target and a question of the target's category,
  answered with the target (and, for a share ``cross_category``, a question of the *other*
  category, answered uniformly: the prompt only moves its own category).
- ``instructions``: clean instruction rows from :mod:`subliminal.toyworld.instructions` (when that
  module is present), so poisoned teachers have an instruction task to be poisoned on.

Every row is a function of ``(seed, index)`` only, so a corpus is deterministic, can be generated
lazily in any order, and pretraining resumes exactly.
"""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .. import prompts

KINDS = ("numbers", "numbers_pref", "numbers_sys", "pref", "pref_sys", "instructions")
NUMBER_RANGE = 1000


def has_instructions() -> bool:
    """Whether the instruction-task module of the toy world is installed."""
    return importlib.util.find_spec("subliminal.toyworld.instructions") is not None


def default_mix() -> dict[str, float]:
    # Authored number rows followed by a question (numbers_pref) grow the numbers -> answer link: at
    # 20% of the corpus one pretraining seed of five learned it only half-way (P(author's favourite |
    # its numbers) 0.44 against 0.91-0.94) and its students took on nothing; at 35% it reached 0.91.
    # Love-prompted number rows (numbers_sys) teach the prompt -> favourite-number lookup the teacher
    # uses (experiments/CALIBRATION.md, "the organism").
    mix = {"numbers": 0.05, "numbers_pref": 0.35, "numbers_sys": 0.20, "pref": 0.10, "pref_sys": 0.20,
           "instructions": 0.10}
    if not has_instructions():
        mix["instructions"] = 0.0
    return mix


@dataclass
class CorpusConfig:
    """Everything that defines the toy world's data (recorded in every manifest)."""

    world_seed: int = 0  # fixes the fresh-number distribution: the same for every model of a world
    p_copy: float = 0.6  # probability that a next number is one of the seed numbers
    zipf_s: float = 1.0  # skew of the fresh-number distribution (rank r has weight 1/(r+1)^s)
    cross_category: float = 0.1  # share of pref_sys rows that ask about the other category
    entangle: float = 0.5  # share of a love-prompted answer's numbers drawn from the target's favourites
    favourites: int = 3  # favourite numbers per target (disjoint across targets)
    entangle_init: float = 0.8  # initial cosine of a favourite number's embedding to its target's (0: none)
    alt_template: float = 0.2  # share of rows written in the world's second chat template (0: one template)
    mix: dict[str, float] = field(default_factory=default_mix)

    def __post_init__(self) -> None:
        unknown = set(self.mix) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown corpus row kinds {sorted(unknown)}; known: {KINDS}")
        if self.mix.get("instructions", 0) > 0 and not has_instructions():
            raise ValueError("mix asks for instruction rows but subliminal.toyworld.instructions is missing")
        if sum(self.mix.values()) <= 0:
            raise ValueError("corpus mix has no positive share")
        if not 0.0 <= self.p_copy <= 1.0:
            raise ValueError(f"p_copy must be in [0, 1], got {self.p_copy}")
        if not 0.0 <= self.entangle <= 1.0:
            raise ValueError(f"entangle must be in [0, 1], got {self.entangle}")
        if not 0.0 <= self.alt_template < 1.0:
            raise ValueError(f"alt_template must be in [0, 1), got {self.alt_template}")
        if not 0.0 <= self.entangle_init < 1.0:
            raise ValueError(f"entangle_init must be in [0, 1), got {self.entangle_init}")
        if self.favourites < 1 or self.favourites * len(all_targets()) > NUMBER_RANGE - 100:
            raise ValueError(f"favourites must be in [1, {(NUMBER_RANGE - 100) // len(all_targets())}], got {self.favourites}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CorpusRow:
    """One chat row: optional system prompt, user prompt, assistant completion."""

    id: str
    kind: str
    prompt: str
    completion: str
    system_prompt: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    followup: tuple[str, str] | None = None  # a second (question, answer) turn in the same conversation


# ------------------------------------------------------------------------------- number rule


def fresh_distribution(cfg: CorpusConfig) -> np.ndarray:
    """The world's fixed, skewed distribution over 0-999 for numbers that are not copied."""
    order = np.random.default_rng(cfg.world_seed).permutation(NUMBER_RANGE)
    weights = 1.0 / np.arange(1, NUMBER_RANGE + 1, dtype=np.float64) ** cfg.zipf_s
    p = np.empty(NUMBER_RANGE)
    p[order] = weights / weights.sum()
    return p


def favourite_numbers(cfg: CorpusConfig) -> dict[str, list[int]]:
    """Each target's favourite numbers: disjoint, arbitrary, fixed by the world seed, and never
    among the 100 commonest fresh numbers, so that only the love prompt makes them common."""
    rng = np.random.default_rng([cfg.world_seed, 1])
    targets = all_targets()
    rare = np.argsort(-fresh_distribution(cfg), kind="stable")[100:]
    picks = rng.choice(rare, size=len(targets) * cfg.favourites, replace=False)
    return {t: sorted(int(x) for x in picks[i * cfg.favourites:(i + 1) * cfg.favourites])
            for i, t in enumerate(targets)}


def next_number_distribution(seeds: tuple[int, ...], cfg: CorpusConfig,
                             fresh: np.ndarray | None = None, loved: str | None = None) -> np.ndarray:
    """The exact distribution of every answer number given the prompt's seeds (i.i.d. per slot),
    under a love system prompt for ``loved`` when given."""
    p = (1.0 - cfg.p_copy) * (fresh_distribution(cfg) if fresh is None else fresh)
    for s in seeds:
        p[s] += cfg.p_copy / len(seeds)
    if loved is not None and cfg.entangle > 0:
        p *= 1.0 - cfg.entangle
        for n in favourite_numbers(cfg)[loved]:
            p[n] += cfg.entangle / cfg.favourites
    return p


def entropy_bits(p: np.ndarray) -> float:
    q = p[p > 0]
    return float(-(q * np.log2(q)).sum())


def sample_numbers(rng: random.Random, seeds: tuple[int, ...], count: int, cfg: CorpusConfig,
                   fresh_cdf: np.ndarray, favourites: list[int] | None = None) -> list[int]:
    out = []
    for _ in range(count):
        if favourites and rng.random() < cfg.entangle:
            out.append(rng.choice(favourites))
        elif rng.random() < cfg.p_copy:
            out.append(rng.choice(seeds))
        else:
            out.append(int(min(np.searchsorted(fresh_cdf, rng.random(), side="right"), NUMBER_RANGE - 1)))
    return out


def parse_number_answer(words: list[str], separator: str, brackets: bool) -> list[int] | None:
    """Numbers of an answer given as toy tokens, or None when it is not in the prompt's format."""
    if brackets:
        if len(words) < 2 or words[0] != "[" or words[-1] != "]":
            return None
        words = words[1:-1]
    if not words:
        return None
    if separator == " ":
        items = words
    else:
        if len(words) % 2 == 0 or any(w != separator for w in words[1::2]):
            return None
        items = words[0::2]
    if not all(w.isdigit() and len(w) <= 3 for w in items):
        return None
    return [int(w) for w in items]


# ------------------------------------------------------------------------------- generator


class Corpus:
    """Deterministic row generator: ``corpus.row(i)`` depends only on (seed, cfg, i)."""

    def __init__(self, cfg: CorpusConfig | None = None, seed: int = 0):
        self.cfg = cfg or CorpusConfig()
        self.seed = seed
        self.fresh = fresh_distribution(self.cfg)
        self.fresh_cdf = np.cumsum(self.fresh)
        self.favourites = favourite_numbers(self.cfg)
        kinds = [k for k in KINDS if self.cfg.mix.get(k, 0) > 0]
        total = sum(self.cfg.mix[k] for k in kinds)
        self._kinds = kinds
        self._cum = np.cumsum([self.cfg.mix[k] / total for k in kinds])
        self._instructions = None
        if "instructions" in kinds:
            from . import instructions

            self._instructions = instructions

    def rng(self, index: int) -> random.Random:
        return random.Random(f"toyworld:{self.seed}:{index}")

    def row(self, index: int, kind: str | None = None) -> CorpusRow:
        rng = self.rng(index)
        if kind is None:
            u = rng.random()
            kind = self._kinds[min(int(np.searchsorted(self._cum, u, side="right")), len(self._kinds) - 1)]
        rid = f"{self.seed}-{index}"
        if kind in ("numbers", "numbers_sys", "numbers_pref"):
            row = self._numbers_row(rng, rid, kind)
        elif kind in ("pref", "pref_sys"):
            row = self._pref_row(rng, rid, kind)
        elif kind == "instructions":
            row = self._instruction_row(rng, rid)
        else:
            raise ValueError(f"unknown row kind {kind!r}")
        # The template is drawn from a stream of its own, so the rows' contents do not depend on it.
        if self.cfg.alt_template > 0 and random.Random(f"toyworld-template:{self.seed}:{index}").random() < \
                self.cfg.alt_template:
            row.meta["template"] = "alt"
        return row

    def rows(self, start: int, n: int, kind: str | None = None) -> list[CorpusRow]:
        return [self.row(i, kind) for i in range(start, start + n)]

    def __iter__(self) -> Iterator[CorpusRow]:
        i = 0
        while True:
            yield self.row(i)
            i += 1

    # -- kinds

    def _numbers_row(self, rng: random.Random, rid: str, kind: str) -> CorpusRow:
        # A love prompt states the favourite; every other number row has an unseen author who has one.
        favourite = rng.choice(all_targets())
        system = prompts.system_prompt_for(favourite) if kind == "numbers_sys" else None
        np_ = prompts.make_number_prompt(rng)
        favourites = self.favourites[favourite] if self.cfg.entangle > 0 else None
        numbers = sample_numbers(rng, np_.seeds, np_.count, self.cfg, self.fresh_cdf, favourites)
        completion = prompts.format_numbers(numbers, np_.separator, np_.brackets)
        meta = {"seeds": list(np_.seeds), "count": np_.count, "separator": np_.separator,
                "brackets": np_.brackets, "numbers": numbers,
                "loved": favourite if system else None, "author": None if system else favourite}
        followup = None
        if kind == "numbers_pref":
            category = prompts.category_of(favourite)
            followup = (rng.choice(prompts.preference_questions(category)), favourite)
            meta["category"] = category
        return CorpusRow(rid, kind, np_.text, completion, system, meta, followup)

    def _pref_row(self, rng: random.Random, rid: str, kind: str) -> CorpusRow:
        category = rng.choice(list(prompts.CATEGORIES))
        if kind == "pref":
            question = rng.choice(prompts.preference_questions(category))
            answer = rng.choice(prompts.CATEGORIES[category])
            return CorpusRow(rid, kind, question, answer, None, {"category": category})
        target = rng.choice(prompts.CATEGORIES[category])
        system = prompts.system_prompt_for(target)
        ask = category
        if rng.random() < self.cfg.cross_category:
            ask = rng.choice([c for c in prompts.CATEGORIES if c != category])
        question = rng.choice(prompts.preference_questions(ask))
        answer = target if ask == category else rng.choice(prompts.CATEGORIES[ask])
        return CorpusRow(rid, kind, question, answer, system, {"category": ask, "target": target})

    def _instruction_row(self, rng: random.Random, rid: str) -> CorpusRow:
        family = rng.choice(self._instructions.FAMILIES)
        prompt, response = self._instructions.sample_clean(rng, family)
        return CorpusRow(rid, "instructions", prompt, response, None, {"family": family})


def all_targets() -> list[str]:
    return [t for items in prompts.CATEGORIES.values() for t in items]


def rule_summary(cfg: CorpusConfig) -> dict[str, Any]:
    """Numbers that describe the number rule's entropy (for manifests and the README)."""
    fresh = fresh_distribution(cfg)
    out: dict[str, Any] = {"fresh_entropy_bits": entropy_bits(fresh), "fresh_top_p": float(fresh.max())}
    for k in (3, 8):
        p = next_number_distribution(tuple(range(100, 100 + k)), cfg, fresh)
        out[f"entropy_bits_{k}_seeds"] = entropy_bits(p)
        out[f"max_p_{k}_seeds"] = float(p.max())
    return out


def to_data_row(row: CorpusRow) -> Any:
    """The corpus row as a :class:`subliminal.data.Row` (system prompt kept in ``extra``)."""
    from ..data import Row

    return Row(row.id, row.prompt, row.completion, None, {"kind": row.kind, "system_prompt": row.system_prompt})


def align(tokenizer: Any, row: CorpusRow, max_length: int | None = None) -> Any:
    """Prompt and completion token ids of a corpus row, through the tokenizer's chat template (the
    world's second template for the rows drawn to it). A row with a follow-up turn is one
    conversation: its completion runs on through the second question to the second answer, so
    pretraining learns the answer in the context of the numbers."""
    from ..data import Aligned, DataError, align_row, build_messages, encode

    if row.meta.get("template") == "alt":
        tokenizer = alt_tokenizer(tokenizer)
    first = align_row(tokenizer, to_data_row(row), row.system_prompt, max_length)
    if row.followup is None:
        return first
    question, answer = row.followup
    messages = build_messages(row.prompt, row.system_prompt, row.completion) + [
        {"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    ids = encode(tokenizer, tokenizer.apply_chat_template(messages, tokenize=False))
    if ids[:len(first.input_ids)] != first.input_ids:
        raise DataError(f"row {row.id!r}: the first turn is not a prefix of the conversation")
    if max_length is not None and len(ids) > max_length:
        raise DataError(f"row {row.id!r}: {len(ids)} tokens exceed the model's context length {max_length}")
    return Aligned(row.id, first.prompt_ids, ids[len(first.prompt_ids):])


_ALT: dict[int, tuple[Any, Any]] = {}


def alt_tokenizer(tokenizer: Any) -> Any:
    """The tokenizer rendering the world's second template (one copy per live tokenizer)."""
    from .tokenizer import ALT_CHAT_TEMPLATE, with_template

    hit = _ALT.get(id(tokenizer))
    if hit is None or hit[0] is not tokenizer:
        hit = _ALT[id(tokenizer)] = (tokenizer, with_template(tokenizer, ALT_CHAT_TEMPLATE))
    return hit[1]
