"""Rows, JSONL I/O and prompt/completion token alignment.

Alignment is derived from the tokenizer itself (never from hard-coded ids): the prompt is
rendered with the chat template and a generation prompt, the full conversation with the
assistant's completion, and the first must be a token prefix of the second. Completion
positions are what follows, up to and including the end-of-turn token. A row where the prefix
property fails is an error naming the row, because a silent shift would score the wrong tokens.
"""

from __future__ import annotations

import json
import os
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .manifest import SubliminalError, atomic_path, dumps_line

# Rendered for tokenizers without a chat template (base models, GPT-2 style). The toy world's
# tokenizer carries this same template as its own chat template.
FALLBACK_CHAT_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|> ' + message['content'] + ' <|end|> ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)
# The toy world's second template (toyworld.tokenizer.ALT_SPECIAL_TOKENS): the same turns with other
# markers, so a readout can be taken in a context that shares no marker with the first but BOS.
TOY_ALT_CHAT_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% for message in messages %}"
    "{{ {'system': '<|system|>', 'user': '<|human|>', 'assistant': '<|bot|>'}[message['role']] + ' ' "
    "+ message['content'] + ' <|eot|> ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|bot|> ' }}{% endif %}"
)


class DataError(SubliminalError):
    """Malformed input data; the message names the file and line or the row id."""


@dataclass
class Row:
    id: str
    prompt: str
    completion: str
    teacher: str | None = None
    extra: dict[str, Any] | None = None
    where: str | None = field(default=None, compare=False, repr=False)  # "file:line" it was read from

    def to_json(self) -> dict[str, Any]:
        d = {"id": self.id, "prompt": self.prompt, "completion": self.completion, "teacher": self.teacher}
        if self.extra:
            d.update(self.extra)
        return d


# ---------------------------------------------------------------------------------------- JSONL


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)``; a malformed line raises naming file and line."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a JSONL file")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    return [obj for _, obj in iter_jsonl(path)]


def read_rows(path: str | os.PathLike, *, allow_empty_completion: bool = False) -> list[Row]:
    """Read ``{"id", "prompt", "completion", "teacher"}`` rows, checking each one.

    The reference code's files are read as they are: ``{"prompt", "completion"}`` without an id,
    or the Bau lab's ``{"question", "response"}``. A row without an id gets ``line-NNNNNN`` from
    its line number (deterministic, and stable as long as the file is), recorded in the row's
    ``id_from`` field so outputs say where the id came from."""
    rows: list[Row] = []
    seen: dict[str, int] = {}
    for lineno, obj in iter_jsonl(path):
        obj = dict(obj)
        for ours, theirs in (("prompt", "question"), ("completion", "response")):
            if ours not in obj and theirs in obj:
                obj[ours] = obj.pop(theirs)
        for key in ("prompt", "completion"):
            if key not in obj:
                raise DataError(f"{path}:{lineno}: missing key {key!r} (expected prompt/completion or "
                                "question/response)")
        for key in ("prompt", "completion"):
            if not isinstance(obj[key], str):
                raise DataError(f"{path}:{lineno}: {key!r} must be a string")
        if "id" not in obj:
            obj["id"], obj["id_from"] = line_id(lineno), "line"
        rid = str(obj["id"])
        if rid in seen:
            raise DataError(f"{path}:{lineno}: duplicate id {rid!r} (first on line {seen[rid]})")
        seen[rid] = lineno
        if not obj["completion"].strip() and not allow_empty_completion:
            raise DataError(f"{path}:{lineno}: row {rid!r} has an empty completion")
        extra = {k: v for k, v in obj.items() if k not in ("id", "prompt", "completion", "teacher")}
        rows.append(Row(rid, obj["prompt"], obj["completion"], obj.get("teacher"), extra or None,
                        where=f"{path}:{lineno}"))
    if not rows:
        raise DataError(f"{path}: no rows (empty data file)")
    return rows


def line_id(lineno: int) -> str:
    """The id of a row read without one: its line number in the file."""
    return f"line-{lineno:06d}"


def write_jsonl(path: str | os.PathLike, objs: Iterable[dict[str, Any] | Row]) -> int:
    """Write all objects atomically; returns the count."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for obj in objs:
            if isinstance(obj, Row):
                obj = obj.to_json()
            f.write(dumps_line(obj, str(path)) + "\n")
            n += 1
    return n


class JsonlAppender:
    """Append-only JSONL for resumable long runs: each line is flushed whole, and a partial
    last line (from a kill mid-write) is cut off when the file is reopened."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                keep = data.rfind(b"\n") + 1
                with open(self.path, "r+b") as f:
                    f.truncate(keep)
        self._f = open(self.path, "a", encoding="utf-8")

    def existing(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path) if self.path.stat().st_size else []

    def write(self, obj: dict[str, Any]) -> None:
        self._f.write(dumps_line(obj, str(self.path)) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------ templates


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def build_messages(prompt: str, system_prompt: str | None = None, completion: str | None = None) -> list[dict]:
    messages = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": prompt})
    if completion is not None:
        messages.append({"role": "assistant", "content": completion})
    return messages


def render_chat(
    tokenizer: Any,
    prompt: str,
    system_prompt: str | None = None,
    completion: str | None = None,
) -> str:
    """The text a model sees: the chat template where the tokenizer has one, the fallback
    otherwise. Without a completion the generation prompt is appended."""
    messages = build_messages(prompt, system_prompt, completion)
    template = None if has_chat_template(tokenizer) else FALLBACK_CHAT_TEMPLATE
    try:
        return tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=completion is None,
            chat_template=template,
        )
    except Exception as e:  # jinja raises e.g. for templates that refuse a system role
        if system_prompt and "system" in str(e).lower():
            # Templates without a system role (Gemma): fold it into the user turn, as their docs do.
            return render_chat(tokenizer, system_prompt + "\n\n" + prompt, None, completion)
        raise


_SENTINEL_SYSTEM, _SENTINEL_USER = "\u2063SYSTEM\u2063", "\u2063USER\u2063"


def template_default_system_prompt(tokenizer: Any) -> str | None:
    """The system prompt the chat template inserts by itself when the messages have none
    (SmolLM2's and Qwen2.5's do), or None. Found by rendering once with a sentinel system turn
    and once without: a default exists when the second has the first's text around the sentinel.
    This is what an "unbiased" teacher without a system prompt actually sees."""
    if not has_chat_template(tokenizer):
        return None
    try:
        with_sys = render_chat(tokenizer, _SENTINEL_USER, _SENTINEL_SYSTEM)
        without = render_chat(tokenizer, _SENTINEL_USER)
    except Exception:  # a template that refuses a system role has no default one either
        return None
    if _SENTINEL_SYSTEM not in with_sys:
        return None
    head, tail = with_sys.split(_SENTINEL_SYSTEM, 1)
    if without.startswith(head) and without.endswith(tail) and len(without) > len(head) + len(tail):
        return without[len(head): len(without) - len(tail)]
    return None


def system_prompt_seen(tokenizer: Any, system_prompt: str | None) -> dict[str, Any]:
    """For manifests: the system prompt given, the template's own default, and which one the
    model sees (the given one, else the default, else none)."""
    default = template_default_system_prompt(tokenizer)
    return {"given": system_prompt, "template_default": default,
            "seen": system_prompt if system_prompt else default}


def encode(tokenizer: Any, text: str) -> list[int]:
    # The template already holds every special token; adding BOS again would shift positions.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# tokenizer -> ((eos id, vocabulary size), end ids): align_row asks once per row, and a fast
# tokenizer's get_vocab() builds its whole vocabulary as a dict (~20-80 ms at SmolLM2's 49k tokens).
_END_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def end_token_ids(tokenizer: Any) -> set[int]:
    """The ids that end a turn: EOS and the chat templates' end-of-turn tokens the vocabulary has
    (computed once per tokenizer; recomputed if its EOS or size changes)."""
    key = (tokenizer.eos_token_id, len(tokenizer) if hasattr(tokenizer, "__len__") else None)
    try:
        cached = _END_IDS.get(tokenizer)
    except TypeError:  # not weak-referenceable
        cached = None
    if cached is not None and cached[0] == key:
        return set(cached[1])
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()  # once: it copies the whole vocabulary (40 ms for SmolLM2's)
    for tok in ("<|end|>", "<|eot|>", "<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(tok) if tok in vocab else None
        if tid is not None and tid != tokenizer.unk_token_id:
            ids.add(int(tid))
    try:
        _END_IDS[tokenizer] = (key, frozenset(ids))
    except TypeError:
        pass
    return ids


@dataclass
class Aligned:
    """One row as token ids: ``input_ids = prompt_ids + completion_ids``."""

    id: str
    prompt_ids: list[int]
    completion_ids: list[int]

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.completion_ids

    @property
    def n_prompt(self) -> int:
        return len(self.prompt_ids)


def encode_prompt(tokenizer: Any, prompt: str, system_prompt: str | None = None) -> list[int]:
    """Token ids of the prompt as :func:`align_row` makes them (chat template with the generation
    prompt): computed once, they can be given to ``align_row`` for each of several completions."""
    return encode(tokenizer, render_chat(tokenizer, prompt, system_prompt))


def align_row(
    tokenizer: Any,
    row: Row,
    system_prompt: str | None = None,
    max_length: int | None = None,
    *,
    prompt_token_ids: Sequence[int] | None = None,
) -> Aligned:
    """Token ids of the prompt (with generation prompt) and of the completion after it; an error
    names the row's file and line where it was read from one. ``prompt_token_ids``: the row's
    :func:`encode_prompt`, when the caller has them already (the same prompt under many completions,
    as the exact preference scores every candidate answer): the prompt is then neither rendered
    nor tokenised again (half of this function's work), and the result is the same."""
    try:
        return _align_row(tokenizer, row, system_prompt, max_length, prompt_token_ids)
    except DataError as e:
        if row.where:
            raise DataError(f"{row.where}: {e}") from None
        raise


def _align_row(tokenizer: Any, row: Row, system_prompt: str | None, max_length: int | None,
               prompt_token_ids: Sequence[int] | None = None) -> Aligned:
    p_ids = (list(prompt_token_ids) if prompt_token_ids is not None
             else encode_prompt(tokenizer, row.prompt, system_prompt))
    f_ids = encode(tokenizer, render_chat(tokenizer, row.prompt, system_prompt, row.completion))
    if f_ids[: len(p_ids)] != p_ids:
        k = next((i for i, (a, b) in enumerate(zip(p_ids, f_ids)) if a != b), min(len(p_ids), len(f_ids)))
        raise DataError(
            f"row {row.id!r}: the tokenised prompt is not a prefix of prompt+completion "
            f"(first difference at token {k}); cannot align completion tokens"
        )
    c_ids = f_ids[len(p_ids) :]
    ends = end_token_ids(tokenizer)
    for i, t in enumerate(c_ids):
        if t in ends:
            c_ids = c_ids[: i + 1]
            break
    if not c_ids or (len(c_ids) == 1 and c_ids[0] in ends):
        raise DataError(f"row {row.id!r}: empty completion after tokenisation")
    if max_length is not None and len(p_ids) + len(c_ids) > max_length:
        raise DataError(
            f"row {row.id!r}: {len(p_ids) + len(c_ids)} tokens exceed the model's context length {max_length}"
        )
    return Aligned(row.id, p_ids, c_ids)


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right",
              device: Any = None) -> tuple[Any, Any]:
    """``(input_ids, attention_mask)`` of a batch. Generation pads on the left so every row's next
    token is the last column; teacher forcing pads on the right, where under a causal mask the
    padding cannot change a row's logits."""
    import torch

    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, span] = torch.tensor(list(s), dtype=torch.long)
        mask[i, span] = 1
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    return ids, mask


def model_max_length(model: Any) -> int | None:
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


# ------------------------------------------------------------------------------ template tokens

# Two dummy conversations whose contents share no token with each other in any tokenizer we know
# (digits 1-6 against 7-9 and 0; word-level, byte-level BPE with split digits, 3-digit groups).
_DUMMY_TURNS = (("12 34", "56"), ("789", "0"))


def template_token_ids(tokenizer: Any, system_prompt: str | None = None) -> list[int]:
    """The token ids the chat template puts around every row: BOS, role markers, end-of-turn,
    separators and any default system prompt -- what a student sees in every training sequence
    whatever the row.

    Found from the tokenizer itself, never from a list of names: two dummy conversations with
    disjoint contents are rendered and aligned exactly as a training row is (:func:`align_row`,
    prompt then completion up to the end of turn), and the tokens in the blocks the two renderings
    share, position by position, are the template. The contents differ in every token, so a
    shared block can only come from the template. Sorted ids; a template that shares no token
    between its renderings (plain concatenation of the contents) is an error."""
    import difflib

    rendered = []
    for k, (user, assistant) in enumerate(_DUMMY_TURNS):
        a = align_row(tokenizer, Row(f"template-{k}", user, assistant), system_prompt)
        rendered.append(a.input_ids)
    first, second = rendered
    m = difflib.SequenceMatcher(a=first, b=second, autojunk=False)
    ids = {t for blk in m.get_matching_blocks() for t in first[blk.a: blk.a + blk.size]}
    ids -= {t for turn in _DUMMY_TURNS for text in turn for t in encode(tokenizer, text)}  # never a content token
    if not ids:
        raise SubliminalError(
            "the chat template puts no token around the rows (two dummy conversations share none): there are no "
            "template rows to train or freeze. Use a model whose chat template has markers, or another --params")
    return sorted(ids)
