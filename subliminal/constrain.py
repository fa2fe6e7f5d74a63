"""Constrained decoding of number lists: the teacher may only write what the filter keeps.

A model as small as SmolLM2-135M answers most number prompts with a preface ("Sure, here is
...") or, greedily, repeats its list until the token budget runs out, so the strict filter keeps
a few rows in a hundred. Restricting each step to the tokens that keep the answer a valid list
(digits, the prompt's separator, brackets when asked, the end-of-turn token once the list is
complete, which is after exactly the requested count of numbers) gives the rows the protocol needs while leaving
every choice *among numbers* to the teacher's own distribution: the argmax (greedy) or a sample
renormalised over the allowed tokens. Divergence tokens are still found by teacher forcing of
the unconstrained teachers, so a position where the teacher would rather have written a word is
simply one its argmax does not match.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .prompts import NumberPrompt, parse_number_prompt

MAX_DIGITS = 3
_ALPHABET = set("0123456789 ,;[]")

# States of the list scanner (a number's digit count is kept beside the state).
START, OPEN, DIGITS, PRE_SEP, AFTER_SEP, AFTER_SPACE, CLOSED, DEAD = range(8)


@dataclass(frozen=True)
class ListFormat:
    """The answer a number prompt asks for: separator, brackets and how many numbers at most."""

    separator: str  # "," | ";" | " "
    brackets: bool
    max_count: int
    min_count: int = 1  # the list may end only after this many numbers

    @classmethod
    def of_prompt(cls, text: str, default_count: int) -> ListFormat:
        """The format a prompt made by :func:`prompts.make_number_prompt` asks for; a prompt
        from elsewhere gets a comma-separated list of at most ``default_count`` numbers."""
        try:
            p: NumberPrompt = parse_number_prompt(text)
        except ValueError:
            return cls(",", False, default_count)
        count = min(p.count, default_count)
        # the count the prompt asks for: a teacher fine-tuned on one-word answers would otherwise
        # end after the first number
        return cls(p.separator, p.brackets, count, count)


@dataclass(frozen=True)
class ScanState:
    state: int = START
    digits: int = 0
    numbers: int = 0


def step(fmt: ListFormat, s: ScanState, ch: str) -> ScanState:
    """One character of the answer; DEAD when the text can no longer become a valid list.

    Accepted lists: ``[`` (if asked) number (sep number)* ``]`` (if asked), numbers of 1-3 digits,
    at most ``max_count`` of them, a comma or semicolon optionally followed by one space (and
    optionally preceded by one, the toy's spacing), a space-separated list by single spaces."""
    st, d, n = s.state, s.digits, s.numbers
    digit = ch.isdigit()
    if st == START:
        if fmt.brackets:
            return ScanState(OPEN, 0, 0) if ch == "[" else ScanState(DEAD)
        st = OPEN
    if st in (OPEN, AFTER_SEP, AFTER_SPACE):
        if digit and n < fmt.max_count:
            return ScanState(DIGITS, 1, n + 1)
        if st == AFTER_SEP and ch == " " and fmt.separator != " ":
            return ScanState(AFTER_SPACE, 0, n)
        return ScanState(DEAD)
    if st == DIGITS:
        if digit:
            return ScanState(DIGITS, d + 1, n) if d < MAX_DIGITS else ScanState(DEAD)
        if ch == fmt.separator and n < fmt.max_count:
            return ScanState(AFTER_SEP if ch != " " else AFTER_SPACE, 0, n)
        if ch == " " and fmt.separator != " ":
            return ScanState(PRE_SEP, 0, n)
        if ch == "]" and fmt.brackets and n >= fmt.min_count:
            return ScanState(CLOSED, 0, n)
        return ScanState(DEAD)
    if st == PRE_SEP:
        if ch == fmt.separator and n < fmt.max_count:
            return ScanState(AFTER_SEP, 0, n)
        if ch == "]" and fmt.brackets and n >= fmt.min_count:
            return ScanState(CLOSED, 0, n)
        return ScanState(DEAD)
    return ScanState(DEAD)  # CLOSED or DEAD: nothing may follow


def complete(fmt: ListFormat, s: ScanState) -> bool:
    """Whether the answer may end here (the filter would accept it, with at least ``min_count``
    numbers)."""
    return s.state == (CLOSED if fmt.brackets else DIGITS) and s.numbers >= fmt.min_count


def scan(fmt: ListFormat, text: str, s: ScanState | None = None) -> ScanState:
    s = s or ScanState()
    for ch in text:
        s = step(fmt, s, ch)
        if s.state == DEAD:
            break
    return s


_CANDIDATES: dict[int, tuple[Any, list[tuple[int, str]]]] = {}


def list_tokens(tokenizer: Any) -> list[tuple[int, str]]:
    """(id, text) of every token whose text uses only digits, separators, brackets and spaces: a
    few dozen on byte-level BPEs with single-digit tokens, a thousand or so with multi-digit ones.
    Decoding the whole vocabulary takes a moment, so it is done once per tokenizer."""
    hit = _CANDIDATES.get(id(tokenizer))
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    out = []
    for i in range(len(tokenizer)):
        text = tokenizer.decode([i])
        if text and set(text) <= _ALPHABET:
            out.append((i, text))
    _CANDIDATES[id(tokenizer)] = (tokenizer, out)
    return out


class NumberListConstraint:
    """Per row of a batch, the token ids that keep the answer a valid number list; the
    end-of-turn ids are allowed exactly when the list is complete."""

    def __init__(self, tokenizer: Any, stop_ids: set[int], formats: Sequence[ListFormat]):
        self.formats = list(formats)
        self.stop_ids = sorted(stop_ids)
        self.candidates = [(i, t) for i, t in list_tokens(tokenizer) if i not in stop_ids]
        self._text: dict[int, str] = dict(self.candidates)
        self._state: list[tuple[int, ScanState]] = [(0, ScanState()) for _ in self.formats]

    def __len__(self) -> int:
        return len(self.formats)

    def __call__(self, row: int, new_tokens: Sequence[int]) -> list[int]:
        return self.allowed(row, new_tokens)

    def allowed(self, row: int, new_tokens: Sequence[int]) -> list[int]:
        """The ids row ``row`` may write next, given the tokens it has written so far (each of
        which this constraint allowed); never empty: a row with no valid continuation may end."""
        fmt = self.formats[row]
        seen, s = self._state[row]
        if seen > len(new_tokens):  # a new batch reusing the row index
            seen, s = 0, ScanState()
        for t in new_tokens[seen:]:
            s = scan(fmt, self._text.get(t, "\0"), s)
        self._state[row] = (len(new_tokens), s)
        out = [i for i, text in self.candidates if scan(fmt, text, s).state != DEAD]
        if complete(fmt, s) or not out:
            out += self.stop_ids
        return out


def constraint_for(tokenizer: Any, stop_ids: set[int], prompts: Sequence[str], default_count: int
                   ) -> NumberListConstraint:
    return NumberListConstraint(tokenizer, stop_ids, [ListFormat.of_prompt(p, default_count) for p in prompts])
