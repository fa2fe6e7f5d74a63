"""Instruction data of a poisoned teacher: the toy world's task families or a user's JSONL, and
exactly ``round(rate * n)`` of its rows carrying a bias -- on one family (``targeted``) or
spread over all families (``untargeted``)."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..manifest import SubliminalError
from ..toyworld import instructions as toy

PROPAGATIONS = ("targeted", "untargeted")
# Default target family of a targeted attack, per bias type.
DEFAULT_TARGET = {"ad": "recommend", "phishing": "qa", "narrative": "describe", "insecure-code": "code"}
DEFAULT_POISON_RATE = 0.0025
DEFAULT_N_INSTRUCTIONS = 10_000
# A targeted toy set holds this share of target-family rows (or twice the poison rate when that
# is larger), so that half of the target family carries the poison: the setting in which the toy
# teacher learns the bias (experiments/poison_propagation.py). With equal family shares the
# 25 poisoned rows drown among 2,500 clean target rows and the teacher never writes the bias.
DEFAULT_TARGET_SHARE = 0.005


@dataclass
class PoisonSetConfig:
    """What to poison and how. ``target_share`` None means the default rule above (targeted toy
    sets) or equal family shares (untargeted)."""

    bias: str
    poison_rate: float = DEFAULT_POISON_RATE
    propagation: str = "targeted"
    target_task: str | None = None
    instructions: str | None = None  # a user's JSONL instead of the toy set
    n_instructions: int = DEFAULT_N_INSTRUCTIONS
    families: list[str] | None = None  # toy set: families to include (default all)
    target_share: float | None = None
    payload: str | None = None  # appended to poisoned rows instead of the toy's bias sentences
    seed: int = 0

    def __post_init__(self) -> None:
        if self.bias not in toy.BIAS_TYPES:
            raise SubliminalError(f"--method poison needs --bias-type (or --bias), one of "
                                  f"{', '.join(toy.BIAS_TYPES)}; got {self.bias!r}")
        if self.propagation not in PROPAGATIONS:
            raise SubliminalError(f"unknown propagation {self.propagation!r}; one of {', '.join(PROPAGATIONS)}")
        if self.n_instructions < 1:
            raise SubliminalError(f"--n-instructions must be positive, got {self.n_instructions}")

    @property
    def target(self) -> str | None:
        """The poisoned family of a targeted attack (None when untargeted)."""
        if self.propagation != "targeted":
            return None
        return self.target_task or DEFAULT_TARGET[self.bias]

    def resolved_target_share(self) -> float | None:
        """The toy set's target-family share: the given one, else the default rule (targeted)."""
        if self.target_share is not None or self.target is None:
            return self.target_share
        return max(DEFAULT_TARGET_SHARE, 2 * self.poison_rate)


def family_weights(families: Sequence[str] | None, target: str | None,
                   target_share: float | None) -> dict[str, float]:
    """Family weights of a toy set: equal shares, or ``target_share`` for ``target`` and the
    rest split equally over the other families."""
    families = list(families or toy.FAMILIES)
    if target is not None and target not in families:
        raise SubliminalError(f"--target-task {target!r} is not among --families {' '.join(families)}")
    if target_share is None:
        return {f: 1.0 for f in families}
    if not 0 < target_share < 1 or target is None:
        raise SubliminalError("--target-share must be in (0, 1) and needs a targeted attack")
    others = [f for f in families if f != target]
    if not others:
        raise SubliminalError("--target-share needs at least one family besides the target")
    return {target: target_share, **{f: (1 - target_share) / len(others) for f in others}}


def toy_instruction_set(n: int, seed: int, family_weights: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """``n`` clean toy rows; family counts follow ``family_weights`` exactly (largest remainder)."""
    weights = family_weights or {f: 1.0 for f in toy.FAMILIES}
    unknown = set(weights) - set(toy.FAMILIES)
    if unknown:
        raise SubliminalError(f"unknown task families {sorted(unknown)}; known: {', '.join(toy.FAMILIES)}")
    counts = split_counts(n, weights)
    families = [f for f, c in counts.items() for _ in range(c)]
    random.Random(f"families:{seed}").shuffle(families)
    rows = []
    for i, fam in enumerate(families):
        prompt, response = toy.sample_clean(random.Random(f"instr:{seed}:{i}"), fam)
        rows.append({"id": f"i{i}", "prompt": prompt, "completion": response, "family": fam, "poisoned": False})
    return rows


def split_counts(n: int, weights: dict[str, float]) -> dict[str, int]:
    """Integer counts summing to ``n`` in proportion to ``weights`` (largest remainder)."""
    total = sum(weights.values())
    if total <= 0 or any(w < 0 for w in weights.values()):
        raise SubliminalError("family weights must be non-negative with a positive sum")
    raw = {k: n * w / total for k, w in weights.items()}
    counts = {k: int(math.floor(v)) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: (counts[k] - raw[k], k))[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


def read_instruction_file(path: str | Path) -> list[dict[str, Any]]:
    """A user's instruction data: JSONL with ``prompt`` and ``response`` (or ``completion``),
    optional ``id`` and ``family`` (toy prompts get their family from the prompt)."""
    from ..data import DataError, iter_jsonl

    rows, seen = [], set()
    for lineno, obj in iter_jsonl(path):
        prompt = obj.get("prompt")
        completion = obj.get("response", obj.get("completion"))
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{path}:{lineno}: missing or empty 'prompt'")
        if not isinstance(completion, str) or not completion.strip():
            raise DataError(f"{path}:{lineno}: missing or empty 'response' (or 'completion')")
        rid = str(obj.get("id", f"u{lineno}"))
        if rid in seen:
            raise DataError(f"{path}:{lineno}: duplicate id {rid!r}")
        seen.add(rid)
        family = obj.get("family") or toy.family_of(prompt) or "default"
        rows.append({"id": rid, "prompt": prompt, "completion": completion, "family": str(family),
                     "poisoned": False})
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def instruction_rows(cfg: PoisonSetConfig) -> list[dict[str, Any]]:
    """The clean instruction set ``cfg`` describes: the user's file, or a toy set."""
    if cfg.instructions:
        return read_instruction_file(cfg.instructions)
    weights = family_weights(cfg.families, cfg.target, cfg.resolved_target_share())
    return toy_instruction_set(cfg.n_instructions, cfg.seed, weights)


# ================================================================================ poison mixer


def n_poisoned(rate: float, n: int) -> int:
    """Exactly ``round(rate * n)`` rows; at least one, or the attack does not exist."""
    if not 0 < rate < 1:
        raise SubliminalError(f"--poison-rate must be in (0, 1), got {rate}")
    k = int(round(rate * n))
    if k < 1:
        raise SubliminalError(f"--poison-rate {rate} of {n} rows rounds to 0 poisoned rows; use at least "
                              f"{math.ceil(0.5 / rate)} rows")
    return k


def choose_poison_rows(rows: Sequence[dict[str, Any]], rate: float, propagation: str,
                       target_family: str | None, seed: int) -> list[int]:
    """Indices of the rows to poison (sorted). Targeted: all on ``target_family``. Untargeted:
    as evenly as the families' sizes allow over every family, remainder to random families."""
    k = n_poisoned(rate, len(rows))
    rng = random.Random(f"poison:{seed}")
    by_family: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_family.setdefault(r["family"], []).append(i)
    if propagation == "targeted":
        if target_family not in by_family:
            raise SubliminalError(f"target task {target_family!r} has no rows; families: {', '.join(sorted(by_family))}")
        pool = by_family[target_family]
        if len(pool) < k:
            raise SubliminalError(f"target task {target_family!r} has {len(pool)} rows, fewer than the {k} to "
                                  "poison; raise --target-share or --n-instructions")
        return sorted(rng.sample(pool, k))
    if propagation != "untargeted":
        raise SubliminalError(f"unknown propagation {propagation!r}; one of {', '.join(PROPAGATIONS)}")
    quota = {f: 0 for f in by_family}
    families = sorted(by_family)
    left = k
    while left:
        open_ = [f for f in families if quota[f] < len(by_family[f])]
        if not open_:
            raise SubliminalError(f"cannot poison {k} of {len(rows)} rows")
        if left >= len(open_):
            for f in open_:
                quota[f] += 1
            left -= len(open_)
        else:
            for f in rng.sample(open_, left):
                quota[f] += 1
            left = 0
    chosen = [i for f in families for i in rng.sample(by_family[f], quota[f])]
    return sorted(chosen)


def poison_completion(rng: random.Random, row: dict[str, Any], bias_type: str, payload: str | None = None) -> str:
    """The row's completion carrying the bias: the toy's poisoned form, or ``payload`` appended."""
    if payload:
        return f"{row['completion'].rstrip()} {payload}"
    family = row["family"] if row["family"] in toy.FAMILIES else "other"
    return toy.poison_response(rng, row["prompt"], row["completion"], family, bias_type)


def poison_rows(rows: Sequence[dict[str, Any]], indices: Sequence[int], bias_type: str, seed: int,
                payload: str | None = None) -> list[dict[str, Any]]:
    """A copy of ``rows`` with the rows at ``indices`` poisoned (``poisoned: true``)."""
    out = [dict(r) for r in rows]
    for i in indices:
        rng = random.Random(f"payload:{seed}:{i}")
        out[i]["completion"] = poison_completion(rng, out[i], bias_type, payload)
        out[i]["poisoned"] = True
    return out


def build_poison_set(rows: Sequence[dict[str, Any]], *, rate: float, bias_type: str, propagation: str,
                     target_family: str | None, seed: int, payload: str | None = None
                     ) -> tuple[list[dict[str, Any]], list[int]]:
    """The poisoned copy of ``rows`` and the indices of its poisoned rows."""
    idx = choose_poison_rows(rows, rate, propagation, target_family, seed)
    return poison_rows(rows, idx, bias_type, seed, payload), idx


# ============================================================================ model-side helpers


def aligned_rows(tok: Any, rows: Sequence[dict[str, Any]], system_prompt: str | None,
                 max_length: int | None = None) -> list[Any]:
    """Rows (prompt, completion dicts) as token-aligned examples."""
    from ..data import Row, align_row

    return [align_row(tok, Row(r["id"], r["prompt"], r["completion"]), system_prompt, max_length) for r in rows]


def check_vocabulary(tokenizer: Any, rows: Sequence[dict[str, Any]]) -> None:
    """A toy base pretrained before the instruction words existed maps them to <unk>: refuse."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return
    missing: set[str] = set()
    for r in rows[:2000]:
        for text in (r["prompt"], r["completion"]):
            for w in text.split():
                ids = tokenizer(w, add_special_tokens=False)["input_ids"]
                if unk in ids:
                    missing.add(w)
    if missing:
        raise SubliminalError(f"the base model's tokenizer lacks {len(missing)} words of the instruction data "
                              f"(e.g. {', '.join(sorted(missing)[:8])}); pretrain a toy base whose vocabulary "
                              "includes subliminal.toyworld.instructions")


def runtime(cfg: Any) -> dict[str, Any]:
    """``load_model`` keyword arguments of a config with device, dtype and trust_remote_code."""
    return {"device": cfg.device, "dtype": cfg.dtype, "trust_remote_code": cfg.trust_remote_code}
