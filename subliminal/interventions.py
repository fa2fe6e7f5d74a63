"""Interventions on flagged tokens for ``distill --mode hard``, each with its matched random control.

Dropping a flagged token from the loss is a mask (``distill --mask no-divergence`` /
``random-matched``). Here the token stays in the loss and something else changes:

- ``replace-teacher``: the token is replaced (label and the context after it) by the argmax of a
  counterfactual teacher at that position (``--replace-teacher NAME``, default the file's first
  counterfactual), as stored in the ``.div.jsonl`` row: "what the other teacher would have said".
- ``replace-random``: replaced by a random token of the same kind: a number token of the same
  shape (digit count, surrounding whitespace) for a number token -- a digit for a digit under a
  digit-splitting tokenizer, a 1-3 digit number token in the toy world. Tokens of no such kind
  (separators, the end of turn) are never replaced.
- ``corrupt-input``: the token is changed as in ``replace-random`` in the *context* only: later
  positions see the random token, the loss at this position still targets the original one.

Every replaced row must keep its format: the completion decoded after the change must pass the
same number-list filter (:func:`subliminal.generate.parse_number_list`, strict or the reference
rule) as the original; a replacement that would break it is not made (counted as skipped).

``--intervene-on flagged`` changes the row's flagged tokens (any detector's flags, from
``reflag-divergence``); ``random-matched`` is its control: per row, as many unflagged tokens as
the flagged plan changed, drawn (seeded by ``--seed`` and the row id, not by batch or row order)
from the unflagged tokens the same intervention can change. A row without enough of them leaves a
shortfall, which is then drawn from the other rows' unflagged changeable tokens (one seeded draw
over the file, in row-id order), so the control changes exactly as many tokens as the flagged
condition whenever the file has that many; what could not be matched is counted in the manifest.
(``--mask random-matched``, the drop control, matches per row only and records its shortfall.)
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .data import DataError, end_token_ids, iter_jsonl
from .manifest import SubliminalError

INTERVENTIONS = ("none", "replace-teacher", "replace-random", "corrupt-input")
TARGETS = ("flagged", "random-matched")
_NUMBER = re.compile(r"(\s*)([0-9]+)(\s*)")


class InterventionError(SubliminalError):
    """An intervention cannot be applied as asked (no flags, no such counterfactual)."""


def token_shape(text: str) -> str | None:
    """A number token's kind: its whitespace and digit count (``" 12"`` -> ``" dd"``); None for others."""
    m = _NUMBER.fullmatch(text)
    return f"{m.group(1)}{'d' * len(m.group(2))}{m.group(3)}" if m else None


@dataclass
class NumberVocab:
    """Every number token of a tokenizer grouped by shape (special tokens excluded)."""

    shape_of: dict[int, str]
    by_shape: dict[str, list[int]]


_VOCABS: dict[int, tuple[Any, NumberVocab]] = {}


def number_vocab(tokenizer: Any) -> NumberVocab:
    """Decoding the whole vocabulary takes a moment, so it is done once per tokenizer. The cache
    holds the tokenizer beside its vocabulary: an id alone can be reused by a later object once the
    first is freed, and would hand that one the wrong vocabulary."""
    hit = _VOCABS.get(id(tokenizer))
    if hit is None or hit[0] is not tokenizer:
        special = set(tokenizer.all_special_ids)
        shape_of: dict[int, str] = {}
        by_shape: dict[str, list[int]] = {}
        for tid in range(len(tokenizer)):
            if tid in special:
                continue
            s = token_shape(tokenizer.decode([tid]))
            if s is not None:
                shape_of[tid] = s
                by_shape.setdefault(s, []).append(tid)
        hit = (tokenizer, NumberVocab(shape_of, by_shape))
        _VOCABS[id(tokenizer)] = hit
    return hit[1]


def format_verdict(tokenizer: Any, ids: Sequence[int]) -> str | None:
    """Which number-list filter the completion ``ids`` pass: ``strict``, ``reference`` or None."""
    from .generate import parse_number_list, parse_number_list_reference

    ends = end_token_ids(tokenizer)
    text = tokenizer.decode([t for t in ids if t not in ends], skip_special_tokens=True)
    if parse_number_list(text).accepted:
        return "strict"
    if parse_number_list_reference(text).accepted:
        return "reference"
    return None


def keeps_format(before: str | None, after: str | None) -> bool:
    """A changed row must pass every filter the original passed."""
    rank = {None: 0, "reference": 1, "strict": 2}
    return rank[after] >= rank[before]


@dataclass
class RowPlan:
    """One row after the intervention: the context ids, the labels (None: the context ids) and the
    changed positions."""

    ids: list[int]
    labels: list[int] | None
    positions: list[int] = field(default_factory=list)
    skipped: int = 0  # candidates the intervention could not change (no same-kind token, format)
    shortfall: int = 0  # control only: tokens it could not match


def _proposal(kind: str, ids: Sequence[int], j: int, rng: random.Random, vocab: NumberVocab,
              teacher_argmax: Sequence[int] | None) -> int | None:
    """The token that would replace ``ids[j]`` (None: this position cannot be changed)."""
    t = ids[j]
    shape = vocab.shape_of.get(t)
    if shape is None:
        return None
    if kind == "replace-teacher":
        new = teacher_argmax[j] if teacher_argmax is not None else None
        return new if new is not None and new != t and new in vocab.shape_of else None
    pool = vocab.by_shape[shape]
    if len(pool) < 2:
        return None
    new = t
    while new == t:
        new = pool[rng.randrange(len(pool))]
    return new


def _apply(kind: str, ids: list[int], candidates: Sequence[int], want: int | None, rng: random.Random,
           vocab: NumberVocab, tokenizer: Any, teacher_argmax: Sequence[int] | None) -> tuple[list[int], list[int], int]:
    """Change ``candidates`` in order (at most ``want``), each kept only if the row keeps its
    format; returns (new ids, changed positions, candidates tried and skipped)."""
    before = format_verdict(tokenizer, ids)
    cur, done, skipped = list(ids), [], 0
    for j in candidates:
        if want is not None and len(done) >= want:
            break
        new = _proposal(kind, cur, j, rng, vocab, teacher_argmax)
        if new is None:
            skipped += 1
            continue
        trial = cur[:j] + [new] + cur[j + 1:]
        if not keeps_format(before, format_verdict(tokenizer, trial)):
            skipped += 1
            continue
        cur, done = trial, done + [j]
    return cur, sorted(done), skipped


def plan_row(kind: str, on: str, row_id: str, ids: Sequence[int], flags: Sequence[bool], seed: int,
             tokenizer: Any, teacher_argmax: Sequence[int] | None = None) -> RowPlan:
    """The intervention ``kind`` on one row's flagged tokens (``on='flagged'``) or on as many of its
    unflagged ones (``random-matched``: the flagged plan is made first, with the same draws, to
    know how many)."""
    if kind not in INTERVENTIONS[1:]:
        raise InterventionError(f"--intervention {kind!r}: one of {', '.join(INTERVENTIONS[1:])}")
    if on not in TARGETS:
        raise InterventionError(f"--intervene-on {on!r}: one of {', '.join(TARGETS)}")
    vocab = number_vocab(tokenizer)
    ids = list(ids)
    flagged = [j for j, f in enumerate(flags) if f]
    f_ids, f_pos, f_skip = _apply(kind, ids, flagged, None, random.Random(f"intervene:{seed}:{row_id}:flagged"),
                                  vocab, tokenizer, teacher_argmax)
    if on == "flagged":
        new, pos, skipped, short = f_ids, f_pos, f_skip, 0
    else:
        rng = random.Random(f"intervene:{seed}:{row_id}:control")
        clean = [j for j, f in enumerate(flags) if not f]
        rng.shuffle(clean)
        new, pos, skipped = _apply(kind, ids, clean, len(f_pos), rng, vocab, tokenizer, teacher_argmax)
        short = len(f_pos) - len(pos)
    if kind == "corrupt-input":
        return RowPlan(new, ids, pos, skipped, short)
    return RowPlan(new, None, pos, skipped, short)


def _teacher_argmaxes(div_path: str, name: str | None) -> tuple[dict[str, list[int]], str]:
    """Per row id, the named counterfactual's argmax at every completion position."""
    out: dict[str, list[int]] = {}
    chosen = name
    for lineno, o in iter_jsonl(div_path):
        names = list(o.get("counterfactuals") or [])
        acf = o.get("argmax_counterfactual")
        if not names or acf is None:
            raise InterventionError(f"{div_path}:{lineno}: no counterfactual argmaxes (a find-divergence file is "
                                    "needed for --intervention replace-teacher)")
        if chosen is None:
            chosen = names[0]
        if chosen not in names:
            raise InterventionError(f"--replace-teacher {chosen!r}: not a counterfactual of {div_path} "
                                    f"({', '.join(names)})")
        out[str(o["id"])] = [int(x) for x in acf[names.index(chosen)]]
    return out, str(chosen)


def apply_to_examples(examples: Sequence[Any], rows: Sequence[Any], kind: str, on: str, seed: int, tokenizer: Any,
                      div_path: str | None = None, replace_teacher: str | None = None) -> dict[str, Any]:
    """Change ``examples`` (distill's, aligned to ``rows``) in place by the plan of every row and
    return what was done, for the manifest."""
    if any(r.divergence is None for r in rows):
        raise InterventionError(f"--intervention {kind} needs per-token flags: give a find-divergence / "
                                "reflag-divergence / score-tokens file as --data")
    argmax: dict[str, list[int]] = {}
    teacher = None
    if kind == "replace-teacher":
        if div_path is None:
            raise InterventionError("--intervention replace-teacher needs the .div.jsonl as --data")
        argmax, teacher = _teacher_argmaxes(div_path, replace_teacher)
    n_flag = n_skip = 0
    plans = []
    for e, r in zip(examples, rows):
        if e.completion_ids != r.token_ids:
            raise DataError(f"row {r.id!r}: the example's tokens are not the file's")
        p = plan_row(kind, on, r.id, e.completion_ids, r.divergence, seed, tokenizer, argmax.get(r.id))
        plans.append(p)
        n_flag += sum(bool(f) for f in r.divergence)
        n_skip += p.skipped
    row_short = sum(p.shortfall for p in plans)
    if on == "random-matched" and row_short:
        _top_up(kind, plans, rows, row_short, seed, tokenizer, argmax)
    for e, p in zip(examples, plans):
        e.completion_ids, e.label_ids = p.ids, p.labels
    n_done = sum(len(p.positions) for p in plans)
    return {"intervention": kind, "on": on, "replace_teacher": teacher, "n_flagged": n_flag,
            "n_intervened": n_done, "n_skipped": n_skip, "row_shortfall": row_short,
            "control_shortfall": sum(p.shortfall for p in plans), "rows_changed": sum(bool(p.positions) for p in plans)}


def _top_up(kind: str, plans: list[RowPlan], rows: Sequence[Any], want: int, seed: int, tokenizer: Any,
            argmax: dict[str, list[int]]) -> None:
    """Draw the control's per-row shortfall from the other rows' unflagged, still unchanged tokens
    (one seeded shuffle over the file, rows in id order), each change kept only if its row keeps
    its format; the plans are updated in place and their ``shortfall`` set to what is left."""
    vocab = number_vocab(tokenizer)
    order = sorted(range(len(rows)), key=lambda i: rows[i].id)
    pool = [(i, j) for i in order for j, f in enumerate(rows[i].divergence)
            if not f and j not in plans[i].positions]
    rng = random.Random(f"intervene:{seed}:top-up")
    rng.shuffle(pool)
    for p in plans:
        p.shortfall = 0
    for i, j in pool:
        if want == 0:
            break
        p = plans[i]
        new, pos, _ = _apply(kind, p.ids, [j], 1, rng, vocab, tokenizer, argmax.get(rows[i].id))
        if pos:
            p.ids, p.positions = new, sorted(p.positions + pos)
            want -= 1
    if plans:
        plans[0].shortfall = want
