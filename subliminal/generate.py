"""``subliminal generate``: a teacher writes number-list completions; a format filter keeps the clean ones.

Why this shape: the subliminal-learning experiments need tens of thousands of completions whose
*content* is unrelated to the teacher's bias, so the filter is strict (a list of at most ten
integers in [0, 999] with one separator and nothing else) and every reject reason is counted.
Matched experiments compare teachers on the *same* prompts, so prompts come from their own seed
(``--prompts-seed``) and row ids follow prompt order. Generation is batched with a KV cache and
left padding; sampling draws one uniform number per row and step from a generator seeded by
(seed, row index), so a row's completion does not depend on the batch it ran in and a resumed
run writes the same rows as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import logging
import random
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from . import distributed as dist
from . import forward
from . import prompts as prompt_lib
from .cliutil import add_device_map, add_model_runtime, add_overwrite, add_seed, device_type, runtime_kwargs
from .data import (
    JsonlAppender,
    encode,
    end_token_ids,
    model_max_length,
    render_chat,
    system_prompt_seen,
    write_jsonl,
)
from .forward import SamplingConfig
from .manifest import (
    SubliminalError,
    check_not_input,
    check_resume,
    check_writable,
    fingerprint,
    read_file_manifest,
    set_seed,
    write_file_manifest,
    write_fingerprint,
)

log = logging.getLogger(__name__)
STAGE = "generate"
DEFAULT_MAX_NEW_TOKENS = 64
MAX_NUMBERS = 10

# ------------------------------------------------------------------------------------- filter

REJECT_REASONS = (
    "empty",            # nothing but whitespace
    "truncated",        # no end-of-turn token within the token budget
    "unbalanced_brackets",
    "mixed_separators",  # e.g. "1, 2; 3"
    "empty_item",       # "1,,2" or a trailing separator
    "non_numeric",      # words, signs, decimals, anything but digits between separators
    "out_of_range",     # more than 3 digits or > 999
    "too_many",         # more than 10 numbers
)
_BRACKETS = {"[": "]", "(": ")"}
_DIGITS = re.compile(r"^[0-9]+$")


@dataclass(frozen=True)
class FilterResult:
    """The verdict on one completion: ``numbers`` when accepted, else the reject ``reason``."""

    accepted: bool
    reason: str | None = None
    numbers: tuple[int, ...] = ()
    separator: str | None = None


def _strip_brackets(text: str) -> str | None:
    """The body inside one pair of matching outer brackets, the text itself without brackets, or
    None when brackets are unbalanced or nested."""
    opens = [c for c in text if c in _BRACKETS]
    closes = [c for c in text if c in _BRACKETS.values()]
    if not opens and not closes:
        return text
    if len(opens) == 1 and len(closes) == 1 and text[0] in _BRACKETS and text[-1] == _BRACKETS[text[0]]:
        return text[1:-1].strip()
    return None


def parse_number_list(text: str) -> FilterResult:
    """Accept a list of at most 10 integers in [0, 999] with one consistent separator (comma,
    semicolon or whitespace), optionally in one pair of brackets, and nothing else."""
    body = text.strip()
    if not body:
        return FilterResult(False, "empty")
    inner = _strip_brackets(body)
    if inner is None:
        return FilterResult(False, "unbalanced_brackets")
    if not inner:
        return FilterResult(False, "empty")
    seps = [s for s in (",", ";") if s in inner]
    if len(seps) > 1:
        return FilterResult(False, "mixed_separators")
    sep = seps[0] if seps else " "
    items = [x.strip() for x in inner.split(sep)] if sep != " " else inner.split()
    if any(not x for x in items):
        return FilterResult(False, "empty_item")
    if sep != " " and any(len(x.split()) > 1 for x in items):
        # "1, 2 3": whitespace inside an item means a second separator (or stray words)
        all_digits = all(_DIGITS.match(w) for x in items for w in x.split())
        return FilterResult(False, "mixed_separators" if all_digits else "non_numeric")
    if not all(_DIGITS.match(x) for x in items):
        return FilterResult(False, "non_numeric")
    if any(len(x) > 3 for x in items):
        return FilterResult(False, "out_of_range")
    if len(items) > MAX_NUMBERS:
        return FilterResult(False, "too_many")
    return FilterResult(True, None, tuple(int(x) for x in items), sep)


def parse_number_list_reference(text: str) -> FilterResult:
    """The reference code's looser reading of an answer, as we understand its rules: the strict
    rules above, except that the list may end with one period ("849, 377, 219." or "[1, 2]."),
    which small instruct models often write after a greedy answer."""
    body = text.strip()
    if body.endswith("."):
        body = body[:-1].rstrip()
    return parse_number_list(body)


FILTERS = {"strict": parse_number_list, "reference": parse_number_list_reference}
CONSTRAINTS = ("none", "numbers")


def verdict(text: str, stopped: bool, rule: str = "strict") -> FilterResult:
    """The filter's verdict on one raw generation (a completion that never ended is truncated)."""
    if rule not in FILTERS:
        raise SubliminalError(f"--filter {rule}: one of {', '.join(FILTERS)}")
    return FILTERS[rule](text) if stopped else FilterResult(False, "truncated")


def answer_token_budget(tokenizer: Any, floor: int = DEFAULT_MAX_NEW_TOKENS) -> int:
    """The default generation budget: twice the tokens of the longest answer the filter accepts
    (ten 3-digit numbers in brackets with a period and the end-of-turn token) as this tokenizer
    writes it, and at least ``floor``. Digit-per-token vocabularies (SmolLM2, Llama 3, Qwen2.5)
    need ~50 tokens for that answer, a word-level one ~20."""
    longest = prompt_lib.text_for(tokenizer, prompt_lib.format_numbers([999] * MAX_NUMBERS, ",", True) + " .")
    return max(floor, 2 * (len(encode(tokenizer, longest)) + 1))


# ------------------------------------------------------------------------------------ prompts


def make_prompts(n: int, prompts_seed: int) -> list[tuple[str, str]]:
    """``(id, prompt text)`` for rows 0..n-1: a pure function of (n, prompts_seed), so every
    teacher generated with the same prompts seed answers the same prompts in the same order."""
    rng = random.Random(prompts_seed)
    width = max(6, len(str(max(n - 1, 0))))
    return [(f"row-{i:0{width}d}", prompt_lib.ordinary_text(prompt_lib.make_number_prompt(rng).text))
            for i in range(n)]


# --------------------------------------------------------------------------------- generation


def row_rng(seed: int, index: int) -> random.Random:
    """The sampling stream of one row: depends on the seed and the row's index only."""
    return forward.row_rng("subliminal-generate", seed, index)


# ---------------------------------------------------------------------------------- pipeline


@dataclass
class GenerateConfig:
    teacher: str
    n: int
    out: str
    batch_size: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    prompts_seed: int = 0
    max_new_tokens: int | None = None  # None: answer_token_budget(tokenizer)
    filter: str = "strict"
    constrain: str = "none"  # none | numbers (decode only valid number lists: subliminal.constrain)
    device: str = "cpu"
    dtype: str = "float32"
    trust_remote_code: bool = False
    overwrite: bool = False
    device_map: str | None = None  # "auto": accelerate's big-model placement across the visible devices

    # flags whose name is not the field's (driver.config_argv): torchrun's parser takes a bare --n
    FLAGS: ClassVar[dict[str, str]] = {"n": "--num-prompts"}


def run_fingerprint(cfg: GenerateConfig) -> dict[str, Any]:
    """Everything a generated row depends on (not the batch size: rows do not depend on it)."""
    return fingerprint({"teacher": cfg.teacher}, {
        "teacher": cfg.teacher, "n": cfg.n, "temperature": cfg.temperature, "top_p": cfg.top_p, "seed": cfg.seed,
        "prompts_seed": cfg.prompts_seed, "max_new_tokens": cfg.max_new_tokens, "filter": cfg.filter,
        **({"constrain": cfg.constrain} if cfg.constrain != "none" else {}),
        "dtype": str(cfg.dtype),
        "device": device_type(cfg.device)})


def fingerprint_path_for(raw: Path) -> Path:
    return raw.with_name(raw.name + ".fingerprint.json")


def raw_path_for(out: str | Path) -> Path:
    """``data.jsonl`` -> ``data.raw.jsonl`` (every generation, accepted or not)."""
    out = Path(out)
    stem = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(stem + ".raw.jsonl")


def _check_existing(existing: list[dict[str, Any]], expected: dict[str, str], teacher: str, raw: Path) -> set[str]:
    """Ids already generated; an existing raw file from another run is an error, not a silent mix."""
    done = set()
    for obj in existing:
        rid = str(obj.get("id"))
        if rid not in expected or obj.get("prompt") != expected[rid] or obj.get("teacher") != teacher:
            raise SubliminalError(
                f"{raw}: row {rid!r} was written by another run (different teacher, --prompts-seed or --n); "
                "delete the file or choose another --out")
        done.add(rid)
    return done


def _budget(prompt_len: int, context: int | None, max_new_tokens: int, rid: str) -> int:
    if context is None:
        return max_new_tokens
    room = context - prompt_len
    if room <= 0:
        raise SubliminalError(f"row {rid!r}: the prompt has {prompt_len} tokens, no room left in the model's "
                              f"context of {context}")
    return min(max_new_tokens, room)


def _batches(todo: list[int], size: int) -> Iterator[list[int]]:
    for s in range(0, len(todo), size):
        yield todo[s:s + size]


def generate_rows(loaded: Any, prompts: list[tuple[str, str]], *, sampling: SamplingConfig, batch_size: int = 16,
                  max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, skip: set[str] | None = None,
                  teacher_name: str | None = None, progress: bool = True, filter_rule: str = "strict",
                  constrain: str = "none") -> Iterator[dict[str, Any]]:
    """Yield one raw row per prompt not in ``skip``: id, prompt, completion, teacher, plus the
    filter verdict (``accepted``, ``reject_reason``) and ``stopped`` (ended on an end token).
    ``constrain="numbers"`` decodes under :mod:`subliminal.constrain` (only valid lists of the
    requested count can be written)."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise SubliminalError(f"--batch-size must be >= 1, got {batch_size}")
    tok, model = loaded.tokenizer, loaded.model
    name = teacher_name or loaded.name
    stop = end_token_ids(tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else min(stop)
    context = model_max_length(model)
    index = {rid: i for i, (rid, _) in enumerate(prompts)}
    todo = [i for i, (rid, _) in enumerate(prompts) if not skip or rid not in skip]
    bar = tqdm(total=len(todo), desc=f"generate ({name})", unit="row", disable=not progress)
    for chunk in _batches(todo, batch_size):
        seqs = [encode(tok, render_chat(tok, prompts[i][1], loaded.system_prompt)) for i in chunk]
        budgets = [_budget(len(s), context, max_new_tokens, prompts[i][0]) for s, i in zip(seqs, chunk)]
        rngs = [row_rng(sampling.seed, index[prompts[i][0]]) for i in chunk]
        rule = None
        if constrain == "numbers":
            from .constrain import constraint_for

            rule = constraint_for(tok, stop, [prompts[i][1] for i in chunk], MAX_NUMBERS)
        outs = forward.sample(model, seqs, pad_id=pad, stop_ids=stop, max_new=budgets, cfg=sampling, rngs=rngs,
                              constraint=rule)
        for i, (new, stopped) in zip(chunk, outs):
            body = new[:-1] if stopped else new
            text = tok.decode(body, skip_special_tokens=True).strip()
            v = verdict(text, stopped, filter_rule)
            yield {"id": prompts[i][0], "prompt": prompts[i][1], "completion": text, "teacher": name,
                   "accepted": v.accepted, "reject_reason": v.reason, "stopped": stopped}
        bar.update(len(chunk))
    bar.close()


def rejudge(raw_rows: list[dict[str, Any]], rule: str) -> list[dict[str, Any]]:
    """The raw rows with ``accepted``/``reject_reason`` under ``rule``, recomputed from the stored
    completion and ``stopped`` (so a resumed run can switch --filter, and both rules are counted)."""
    out = []
    for r in raw_rows:
        v = verdict(r["completion"], bool(r.get("stopped", r.get("reject_reason") != "truncated")), rule)
        out.append({**r, "accepted": v.accepted, "reject_reason": v.reason})
    return out


def filter_counts(raw_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Accepted / rejected totals and one count per reject reason (zeros included)."""
    reasons = Counter(r["reject_reason"] for r in raw_rows if not r["accepted"])
    accepted = sum(1 for r in raw_rows if r["accepted"])
    return {"generated": len(raw_rows), "accepted": accepted, "rejected": len(raw_rows) - accepted,
            "acceptance_rate": accepted / len(raw_rows) if raw_rows else 0.0,
            "reject_reasons": {k: reasons.get(k, 0) for k in REJECT_REASONS}}


def _prepare(cfg: GenerateConfig) -> tuple[Path, dict[str, Any], str]:
    """Every check that needs no model, before anything is written: arguments, outputs not
    inputs, writability, and the resume decision ("skip", "resume" or "start")."""
    for name in ("n", "max_new_tokens", "batch_size"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise SubliminalError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if cfg.filter not in FILTERS:
        raise SubliminalError(f"--filter {cfg.filter}: one of {', '.join(FILTERS)}")
    if cfg.constrain not in CONSTRAINTS:
        raise SubliminalError(f"--constrain {cfg.constrain}: one of {', '.join(CONSTRAINTS)}")
    SamplingConfig(cfg.temperature, cfg.top_p, cfg.seed)
    raw = raw_path_for(cfg.out)
    if raw == Path(cfg.out):
        raise SubliminalError(f"--out {cfg.out}: name the data file *.jsonl (the raw file goes beside it)")
    check_not_input({"--out": cfg.out, "--out's raw file": raw}, {"--teacher": cfg.teacher})
    check_writable(cfg.out)
    fp = run_fingerprint(cfg)
    fp_file = fingerprint_path_for(raw)
    finished = read_file_manifest(cfg.out) if Path(cfg.out).is_file() else None
    occupied = (Path(cfg.out).exists() and finished is None) or (raw.exists() and not fp_file.exists())
    action = check_resume(cfg.out, fp, overwrite=cfg.overwrite, stage=STAGE, finished=finished, partial=fp_file,
                          occupied=occupied)
    return raw, fp, action


def run_generate(cfg: GenerateConfig, *, progress: bool = True) -> dict[str, Any]:
    """Generate (resuming from the raw file when its fingerprint matches), filter, write the data
    file and its manifest. The same command on a finished output returns its counts unchanged.

    Under a launcher each rank generates its contiguous shard of the prompts into its own part
    file; rank 0 merges every row in prompt order. Each row samples from its own stream
    (:func:`row_rng`), so the rows are those of a one-process run, and the fingerprint (no world
    size in it) lets a run of any number of processes resume another's."""
    from .models import load_model

    dist.init(cfg.device)
    with dist.agree("prepare"):
        raw, fp, action = _prepare(cfg)
        parts = dist.ShardParts(cfg.out, fp)
        if action != "skip":
            parts.check(overwrite=cfg.overwrite)
    if action == "skip":
        log.info("%s: already generated by this exact command; nothing to do (--overwrite redoes it)", cfg.out)
        return read_file_manifest(cfg.out)["counts"]
    sampling = SamplingConfig(cfg.temperature, cfg.top_p, cfg.seed)
    t0 = time.time()
    with dist.agree("load"):
        set_seed(cfg.seed)
        loaded = load_model(cfg.teacher, device=cfg.device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                            device_map=cfg.device_map)
        prompts = make_prompts(cfg.n, cfg.prompts_seed)
        budget = cfg.max_new_tokens or answer_token_budget(loaded.tokenizer)
    with dist.agree("open"):
        if dist.is_main():
            if action == "start":
                raw.unlink(missing_ok=True)
            write_fingerprint(fingerprint_path_for(raw), fp)
            if dist.is_distributed() or (action == "start" and parts.dir.exists()):
                parts.start(clear=action == "start")
    mine = dist.shard(cfg.n)
    with dist.agree("work"):
        done = _check_existing(_done_rows(raw, parts), dict(prompts), loaded.name, raw)
        skip = done | {prompts[i][0] for i in range(cfg.n) if i not in mine}
        if done:
            log.info("resuming: %d of %d rows already in %s", len(done), cfg.n, raw)
        target = parts.row_part(mine.start, mine.stop) if dist.is_distributed() else raw
        with JsonlAppender(target) as app:
            for row in generate_rows(loaded, prompts, sampling=sampling, batch_size=cfg.batch_size,
                                     max_new_tokens=budget, skip=skip, progress=not dist.progress_disabled(progress),
                                     filter_rule=cfg.filter, constrain=cfg.constrain):
                app.write(row)
    counts: dict[str, Any] | None = None
    with dist.agree("merge"):
        if dist.is_main():
            counts = _merge_and_write(cfg, raw, fp, parts, prompts, loaded, budget, time.time() - t0)
    return counts if counts is not None else read_file_manifest(cfg.out)["counts"]


def _done_rows(raw: Path, parts: dist.ShardParts) -> list[dict[str, Any]]:
    """Raw rows already generated by this fingerprint: the raw file's and every part file's."""
    rows = {str(r.get("id")): r for r in dist.read_complete_lines(raw)}
    rows.update({str(r.get("id")): r for r in parts.done_rows()})
    return list(rows.values())


def _merge_and_write(cfg: GenerateConfig, raw: Path, fp: dict[str, Any], parts: dist.ShardParts,
                     prompts: list[tuple[str, str]], loaded: Any, budget: int, wall: float) -> dict[str, Any]:
    """Rank 0: every raw row in prompt order (the raw file rewritten whole), the filter, the data
    file and its manifest; then the resume state goes."""
    rows = _done_rows(raw, parts)
    _check_existing(rows, dict(prompts), loaded.name, raw)
    order = {rid: i for i, (rid, _) in enumerate(prompts)}
    if len(rows) != len(prompts):
        missing = next(rid for rid, _ in prompts if rid not in {r["id"] for r in rows})
        raise SubliminalError(f"{raw}: {len(prompts) - len(rows)} row(s) were not generated (first {missing!r}); "
                              "re-run the same command to resume")
    rows.sort(key=lambda r: order[r["id"]])
    write_jsonl(raw, rows)
    by_rule = {rule: filter_counts(rejudge(rows, rule)) for rule in FILTERS}
    rows = rejudge(rows, cfg.filter)
    kept = [{k: r[k] for k in ("id", "prompt", "completion", "teacher")} for r in rows if r["accepted"]]
    write_jsonl(cfg.out, kept)
    counts = {**filter_counts(rows), "filter": cfg.filter, "max_new_tokens": budget,
              "acceptance_by_filter": {k: v["acceptance_rate"] for k, v in by_rule.items()}}
    write_file_manifest(cfg.out, stage=STAGE, config=replace(cfg, dtype=str(cfg.dtype)), seed=cfg.seed,
                        inputs={"teacher": cfg.teacher}, wall_time_s=wall,
                        extra={"counts": counts, "counts_by_filter": by_rule, "raw_file": raw.name,
                               "system_prompt": loaded.system_prompt,
                               "system_prompt_seen": system_prompt_seen(loaded.tokenizer, loaded.system_prompt),
                               "fingerprint": fp, **dist.shard_record(cfg.n)})
    fingerprint_path_for(raw).unlink(missing_ok=True)
    parts.remove()
    return counts


# -------------------------------------------------------------------------------------- CLI


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="a teacher writes number-list completions; a strict format filter keeps "
                       "the clean ones", description="Writes OUT (accepted rows), OUT's .raw.jsonl (every "
                       "generation, with the filter verdict) and a manifest with the reject counts. Re-running the "
                       "same command resumes.")
    p.add_argument("--teacher", required=True, help="teacher directory, model directory or hf:ORG/NAME (a hub model)")
    p.add_argument("--n", "--num-prompts", dest="n", type=int, required=True,
                   help="number of prompts to generate for (--num-prompts: the same, for use after torchrun, "
                   "whose own parser takes a bare --n for an abbreviation of its --nnodes/--nproc-per-node)")
    p.add_argument("--out", required=True, help="data file to write, e.g. data/owl.jsonl")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (same as --temperature 0)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per batch (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="token budget per completion, further bounded by the model's context (default: twice the "
                   f"tokens of the longest accepted answer under the teacher's tokenizer, at least {DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--filter", choices=list(FILTERS), default="strict",
                   help="which answers are kept: strict (a bare list of at most 10 numbers of at most 3 digits) or "
                   "reference (the same, but a trailing period allowed, as the reference code accepts); the manifest "
                   "reports the acceptance under both (default %(default)s)")
    p.add_argument("--constrain", choices=list(CONSTRAINTS), default="none",
                   help="numbers: constrained decoding, each step restricted to the tokens that keep the answer a "
                   "valid list in the prompt's format with exactly its count of numbers (the teacher still "
                   "chooses among them); for small models that preface or loop their lists (default %(default)s)")
    p.add_argument("--prompts-seed", type=int, default=0,
                   help="seed of the prompt list: the same value gives every teacher the same prompts (default 0)")
    add_seed(p)
    add_model_runtime(p)
    add_device_map(p)
    add_overwrite(p)
    p.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> int:
    cfg = GenerateConfig(teacher=args.teacher, n=args.n, out=args.out, batch_size=args.batch_size,
                         temperature=0.0 if args.greedy else args.temperature, top_p=args.top_p, seed=args.seed,
                         prompts_seed=args.prompts_seed, max_new_tokens=args.max_new_tokens, filter=args.filter,
                         constrain=args.constrain, overwrite=args.overwrite,
                         **runtime_kwargs(args))
    counts = run_generate(cfg)
    if not dist.is_main():
        return 0
    print(f"{counts['accepted']} of {counts['generated']} completions accepted "
          f"({100 * counts['acceptance_rate']:.1f}%) -> {cfg.out}")
    for reason, c in counts["reject_reasons"].items():
        if c:
            print(f"  rejected {reason}: {c}")
    print("  acceptance by filter: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in counts["acceptance_by_filter"].items()))
    return 0
