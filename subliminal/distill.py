"""``subliminal distill``: students trained on a teacher's number data, with token masks and a
chosen trainable subset.

The student sees each prompt *without* the teacher's system prompt -- the teacher's bias can
only reach it through the completion tokens (hard), the teacher's next-token distributions on
them (soft) or the teacher's residual stream on them (representation). The loss is on
completion positions only, and a mask picks which of them count:

- ``all``: every completion token;
- ``no-divergence``: every token but the divergence tokens;
- ``only-divergence``: only the divergence tokens;
- ``random-matched``: as many tokens dropped per row as ``no-divergence`` drops, drawn (seeded)
  from the row's non-divergence tokens -- the control for "fewer tokens".

Conditions are matched: the row order is a function of ``--seed`` and the row count only, so
every mask trains on the same rows in the same order for the same number of optimiser steps; a
batch left without loss positions still takes its step (zero loss, same schedule). The
manifest records loss tokens under every mask, rows, steps and a hash of the rows seen.

Trainable subsets: all weights; LoRA on every attention and MLP projection of the transformer
blocks (found generically, so Llama, Qwen2, GPT-2 and GPT-NeoX all work); only the blocks
named by ``--layers`` (full weights, or LoRA restricted to them); or a parameter set of the input
embedding (``--params``, see :func:`param_set`): the whole matrix, only the rows of the tokens
the chat template puts around every row (the context every number row shares with the
preference question), only the BOS row, every row but the template's, or every weight but the
template rows. The student is saved as an
ordinary HF directory (LoRA merged), as are its ``checkpoint-NNNN`` directories, so every later
stage loads it like any model. Dropout is off during training, so conditions differ only in
their masks and a resumed run takes exactly the steps an uninterrupted one would.
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import io
import logging
import math
import random
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from . import forward
from .cliutil import add_model_runtime, add_overwrite, add_seed, device_type, runtime_kwargs
from .data import (
    Aligned,
    DataError,
    Row,
    align_row,
    iter_jsonl,
    model_max_length,
    read_rows,
    template_token_ids,
)
from .divergence import DivRow, parse_row
from .interventions import INTERVENTIONS
from .interventions import TARGETS as INTERVENTION_TARGETS
from .manifest import (
    SubliminalError,
    check_not_input,
    check_resume,
    check_writable,
    fingerprint,
    read_file_manifest,
    read_manifest,
    set_seed,
    write_fingerprint,
    write_manifest,
    write_text_atomic,
)
from .models import parse_layers, resolve_layers
from .train import (
    STATE_FILE,
    EpochSampler,
    TrainConfig,
    is_main_process,
    train,
    training_device,
    wait_for_everyone,
    world_size,
)
from .train import lora_alpha as train_lora_alpha

log = logging.getLogger(__name__)
STAGE = "distill"
MODES = ("hard", "soft", "representation")
MASKS = ("all", "no-divergence", "only-divergence", "random-matched")
# --params: which weights a student may train (all: every weight, or the --layers / LoRA choice)
PARAM_SETS = ("all", "embeddings", "template-rows", "bos-row", "embeddings-but-template", "all-but-template")
STATE_DIR = ".train"
LOSS_CSV = "loss.csv"
_LAYER_RE = re.compile(r"(?:^|\.)(?:h|layers|layer|blocks)\.(\d+)\.")


# ===================================================================================== rows


def _source_data_path(div_path: Path) -> Path | None:
    """Where a divergence file's rows came from: its manifest's ``data`` input, else the
    sibling ``X.jsonl`` of ``X.div.jsonl``."""
    man = read_file_manifest(div_path) or {}
    p = (man.get("inputs") or {}).get("data", {}).get("path")
    if p and Path(p).is_file():
        return Path(p)
    if div_path.name.endswith(".div.jsonl"):
        sib = div_path.with_name(div_path.name[: -len(".div.jsonl")] + ".jsonl")
        if sib.is_file():
            return sib
    return None


def read_training_rows(path: str | Path, source: str | Path | None = None) -> tuple[list[DivRow], str | None]:
    """Rows from a generate file (prompt, completion) or a divergence file (id, token_ids,
    divergence, ...). Divergence rows without a prompt are joined by id to ``source`` (default:
    found from the divergence file's manifest or name). Returns (rows, source path used)."""
    path = Path(path)
    objs = list(iter_jsonl(path))
    if not objs:
        raise DataError(f"{path}: no rows (empty data file)")
    is_div = any("divergence" in o for _, o in objs)
    if not is_div:
        return [DivRow(r.id, r.prompt, r.completion, where=r.where) for r in read_rows(path)], None
    texts: dict[str, Row] = {}
    need_source = any(not isinstance(o.get("prompt"), str) or not isinstance(o.get("completion"), str)
                      for _, o in objs)
    src = None
    if need_source:
        src = Path(source) if source else _source_data_path(path)
        if src is None:
            raise DataError(f"{path}: divergence rows carry no prompt/completion and the original data file "
                            "was not found; pass it with --source-data")
        texts = {r.id: r for r in read_rows(src)}
    rows, seen = [], set()
    for lineno, o in objs:
        where = f"{path}:{lineno}"
        row = parse_row(o, where)
        if row.id in seen:
            raise DataError(f"{where}: duplicate id {row.id!r}")
        seen.add(row.id)
        if not (isinstance(o.get("prompt"), str) and isinstance(o.get("completion"), str)):
            if row.id not in texts:
                raise DataError(f"{where}: row {row.id!r} is not in the source data {src}")
            row.prompt, row.completion = texts[row.id].prompt, texts[row.id].completion
        row.where = where
        rows.append(row)
    return rows, None if src is None else str(src)


# ==================================================================================== masks


def make_mask(flags: Sequence[bool], mask: str, rng: random.Random) -> list[bool]:
    """Which completion positions count in the loss under ``mask``."""
    n = len(flags)
    if mask == "all":
        return [True] * n
    if mask == "no-divergence":
        return [not f for f in flags]
    if mask == "only-divergence":
        return [bool(f) for f in flags]
    if mask == "random-matched":
        k = sum(bool(f) for f in flags)
        clean = [j for j, f in enumerate(flags) if not f]
        drop = set(rng.sample(clean, min(k, len(clean))))
        return [j not in drop for j in range(n)]
    raise ValueError(f"unknown mask {mask!r}; one of {', '.join(MASKS)}")


def row_masks(rows: Sequence[DivRow], mask: str, seed: int) -> list[list[bool]]:
    """Masks for every row; the random control draws from a generator per (seed, row id), so a
    row's mask does not depend on the others or on the row order."""
    out = []
    for r in rows:
        if r.divergence is None:
            if mask != "all":
                raise SubliminalError(f"--mask {mask} needs divergence flags (a find-divergence file); "
                                      f"row {r.id!r} has none")
            out.append([True] * len(r.token_ids or []))
        else:
            out.append(make_mask(r.divergence, mask, random.Random(f"mask:{seed}:{r.id}")))
    return out


def mask_stats(rows: Sequence[DivRow], seed: int, completion_tokens: int | None = None) -> dict[str, Any]:
    """Loss tokens under every mask (so matched conditions can be compared from any manifest);
    without divergence flags only ``all`` exists (``completion_tokens``)."""
    if any(r.divergence is None for r in rows):
        return {"all": completion_tokens}
    stats: dict[str, Any] = {m: sum(sum(x) for x in row_masks(rows, m, seed)) for m in MASKS}
    short = sum(max(0, sum(r.divergence) - (len(r.divergence) - sum(r.divergence))) for r in rows)  # type: ignore
    stats["random_matched_shortfall"] = short  # tokens the control could not drop (too few clean ones)
    stats["rows_without_divergence"] = sum(not any(r.divergence) for r in rows)  # type: ignore[arg-type]
    return stats


# ================================================================================ examples


@dataclass
class Example(Aligned):
    """An aligned row (``prompt_ids``: the student's prompt, without a system prompt) with its
    loss mask over completion positions and the teacher's own prompt ids (its system prompt)."""

    mask: list[bool] = field(default_factory=list)
    teacher_prompt_ids: list[int] | None = None
    # the loss targets where an intervention changed the context but kept the label (input-only
    # corruption, :mod:`subliminal.interventions`); None: the targets are ``completion_ids``
    label_ids: list[int] | None = None

    @property
    def labels(self) -> list[int]:
        return self.completion_ids if self.label_ids is None else self.label_ids


def build_examples(rows: Sequence[DivRow], masks: Sequence[list[bool]], tokenizer: Any, max_length: int | None,
                   teacher_system_prompt: str | None = None, with_teacher: bool = False) -> list[Example]:
    """Align every row for the student (no system prompt) and, if needed, for the teacher; the
    completion tokens must equal the divergence file's ``token_ids``."""
    out = []
    for r, m in zip(rows, masks):
        a = align_row(tokenizer, Row(r.id, r.prompt, r.completion, where=r.where), None, max_length)
        if r.token_ids is not None and a.completion_ids != r.token_ids:
            raise DataError(f"row {r.id!r}: the completion tokenises to {len(a.completion_ids)} tokens that differ "
                            f"from the divergence file's token_ids ({len(r.token_ids)}); different tokenizer?")
        if r.token_ids is None:
            m = [True] * len(a.completion_ids)
        t_ids = None
        if with_teacher:
            t = align_row(tokenizer, Row(r.id, r.prompt, r.completion, where=r.where), teacher_system_prompt,
                          max_length)
            if t.completion_ids != a.completion_ids:
                raise DataError(f"row {r.id!r}: the completion tokenises differently after the teacher's prompt")
            t_ids = t.prompt_ids
        out.append(Example(r.id, a.prompt_ids, a.completion_ids, list(m), t_ids))
    return out


# ================================================================================ trainable


def layer_of(name: str) -> int | None:
    """The transformer block a parameter or module belongs to (None: embeddings, final norm, head)."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def projection_modules(model: Any, layers: Sequence[int] | None = None,
                       targets: Sequence[str] | None = None) -> list[str]:
    """Full names of every linear projection inside the transformer blocks (attention and MLP),
    optionally only in ``layers`` and only those whose last name part is in ``targets`` (e.g.
    q_proj, v_proj) -- nn.Linear, or GPT-2's Conv1D."""
    from transformers.pytorch_utils import Conv1D

    names, kinds = [], set()
    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Linear, Conv1D)):
            layer = layer_of(name + ".")
            if layer is not None and (layers is None or layer in layers):
                kinds.add(name.rsplit(".", 1)[-1])
                if targets is None or name.rsplit(".", 1)[-1] in targets:
                    names.append(name)
    if targets is not None and set(targets) - kinds:
        raise SubliminalError(f"--lora-targets {','.join(sorted(set(targets) - kinds))}: no such projection in the "
                              f"model's blocks (it has {', '.join(sorted(kinds))})")
    if not names:
        raise SubliminalError("found no projection modules inside transformer blocks for LoRA")
    return names


def n_layers(model: Any) -> int:
    from .models import layer_count

    return layer_count(model.config)


def tied_embeddings(model: Any) -> bool:
    """Whether the input embedding and the output head are one tensor (toy world, SmolLM2, Qwen2.5-0.5B)."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return out is not None and out.weight is model.get_input_embeddings().weight


def param_set(params: str, tokenizer: Any, model: Any) -> dict[str, Any]:
    """What ``--params`` trains, resolved on this tokenizer and model (recorded in the manifest).

    - ``all``: every weight (or what ``--layers`` / ``--lora-rank`` choose);
    - ``embeddings``: the input embedding matrix, nothing else;
    - ``template-rows``: only the rows of the tokens the chat template puts around every training
      row (found from the tokenizer's own template, :func:`subliminal.data.template_token_ids`,
      rendered as a student row is: no system prompt, so a template's default one counts);
    - ``bos-row``: only the BOS token's row (it must be in the template's rendering);
    - ``embeddings-but-template``: every input embedding row except the template rows;
    - ``all-but-template``: every weight except the template rows of the input embedding.

    Rows are restricted by a gradient mask on the embedding matrix, so rows outside the set stay
    bit-identical (the students' AdamW has no weight decay, and Adam moves a parameter whose
    gradient was always zero by exactly nothing; :func:`check_frozen_rows` verifies it after
    training). With tied input/output embeddings (one tensor) a trained row moves on both sides:
    the token's output logit weights change with its input vector, and a frozen row is frozen on
    both; an untied output head trains only under ``all`` and ``all-but-template``."""
    if params not in PARAM_SETS:
        raise SubliminalError(f"--params {params!r}: no such parameter set; one of {', '.join(PARAM_SETS)}")
    info: dict[str, Any] = {"params": params}
    if params == "all":
        return info
    emb = model.get_input_embeddings().weight
    vocab = emb.shape[0]
    template = template_token_ids(tokenizer)
    info["template_token_ids"] = template
    info["template_tokens"] = tokenizer.convert_ids_to_tokens(template)
    if params == "bos-row":
        bos = tokenizer.bos_token_id
        if bos is None:
            raise SubliminalError("--params bos-row: the tokenizer has no BOS token")
        if bos not in template:
            raise SubliminalError(f"--params bos-row: the BOS token {tokenizer.bos_token!r} is not in the chat "
                                  "template's rendering of a row, so its row would never be trained; use --params "
                                  "template-rows")
        rows = [int(bos)]
    elif params == "template-rows":
        rows = template
    elif params in ("embeddings-but-template", "all-but-template"):
        rows = sorted(set(range(vocab)) - set(template))
    else:  # embeddings
        rows = list(range(vocab))
    bad = [r for r in rows if r >= vocab]
    if bad:
        raise SubliminalError(f"--params {params}: token ids {bad[:5]} are outside the model's embedding matrix "
                              f"({vocab} rows); the tokenizer does not match the model")
    info.update(trained_rows=len(rows), frozen_rows=vocab - len(rows), embedding_rows=vocab,
                rest_trains=params == "all-but-template", tied_embeddings=tied_embeddings(model),
                output_side=("tied: a trained row moves as output weights too, a frozen one is frozen on both sides"
                             if tied_embeddings(model) else
                             ("untied: the output head trains in full" if params == "all-but-template"
                              else "untied: the output head is frozen")))
    if len(rows) <= 64:
        info["trained_row_ids"] = rows
    if len(rows) < vocab:
        info["_keep"] = _row_mask(rows, vocab)  # private: not written to the manifest
    return info


def _sharded_training() -> bool:
    from .train import _sharded_by_config

    return _sharded_by_config()


def _row_mask(rows: Sequence[int], vocab: int) -> torch.Tensor:
    keep = torch.zeros(vocab, 1, dtype=torch.bool)
    keep[list(rows)] = True
    return keep


def restrict_rows(weight: torch.nn.Parameter, keep: torch.Tensor) -> Any:
    """A gradient hook that zeroes the gradient of every row not in ``keep`` (a (rows, 1) bool
    mask) before it is accumulated, so clipping, data-parallel averaging and the optimiser see
    zeros there. ``where``, not a product: a non-finite gradient in a frozen row stays out."""
    cache: dict[torch.device, torch.Tensor] = {}

    def hook(grad: torch.Tensor) -> torch.Tensor:
        m = cache.get(grad.device)
        if m is None:
            m = cache[grad.device] = keep.to(grad.device)
        return torch.where(m, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))

    return weight.register_hook(hook)


def frozen_rows_digest(model: Any, info: dict[str, Any]) -> str | None:
    """A hash of the bytes of every input embedding row the set keeps frozen (None: no row set)."""
    keep = info.get("_keep")
    if keep is None:
        return None
    w = model.get_input_embeddings().weight.detach()
    frozen = w[~keep.to(w.device).squeeze(1)].cpu().contiguous()
    return hashlib.sha256(frozen.view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def check_frozen_rows(model: Any, info: dict[str, Any]) -> None:
    """After training: the frozen rows are bit-identical to the base's (a guard on the mechanism:
    weight decay or a foreign optimiser would move them)."""
    before = info.get("frozen_rows_digest")
    if before is not None and frozen_rows_digest(model, info) != before:
        raise SubliminalError(f"--params {info['params']}: embedding rows outside the set changed during training "
                              "(weight decay on the embedding?); this student is not the condition it names")


def setup_trainable(model: Any, layers: Sequence[int] | None, lora_rank: int | None, lora_alpha: float | None,
                    lora_targets: Sequence[str] | None = None, params: dict[str, Any] | None = None
                    ) -> tuple[Any, list[str]]:
    """Freeze what must not train; wrap in LoRA if asked; restrict the embedding to a row set
    (``params``: :func:`param_set`'s result, which gains the frozen rows' mask and digest).
    Returns (model, trained names)."""
    if params is not None and params["params"] != "all":
        if layers is not None or lora_rank is not None:
            raise SubliminalError(f"--params {params['params']} trains embedding rows; it does not combine with "
                                  "--layers or --lora-rank (use --params all with those)")
        emb = model.get_input_embeddings().weight
        for p in model.parameters():
            p.requires_grad_(params["rest_trains"])
        emb.requires_grad_(True)
        if "_keep" in params:
            if _sharded_training():
                raise SubliminalError(f"--params {params['params']}: a row set needs whole parameters; FSDP / "
                                      "DeepSpeed flatten them (train it under DDP or in one process)")
            params["frozen_rows_digest"] = frozen_rows_digest(model, params)
            restrict_rows(emb, params["_keep"])
        trained = [n for n, p in model.named_parameters() if p.requires_grad]
        return model, trained
    if layers is not None:
        from .models import resolve_layers

        layers = sorted(resolve_layers(layers, n_layers(model)))
    if lora_rank is not None:
        from peft import LoraConfig, get_peft_model
        from transformers.pytorch_utils import Conv1D

        targets = projection_modules(model, layers, lora_targets)
        conv = any(isinstance(model.get_submodule(t), Conv1D) for t in targets)  # GPT-2 stores W transposed
        cfg = LoraConfig(r=lora_rank, lora_alpha=train_lora_alpha(lora_rank, lora_alpha),
                         lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM", fan_in_fan_out=conv)
        model = get_peft_model(model, cfg)
    elif layers is not None:
        for name, p in model.named_parameters():
            p.requires_grad_(layer_of(name) in layers)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    if not trained:
        raise SubliminalError("no parameter is trainable with these options")
    return model, trained


def _trained_values(model: Any, trained: Sequence[str], info: dict[str, Any]) -> int:
    """How many scalars the student may change (a row set counts only its rows)."""
    named = dict(model.named_parameters())
    total = sum(named[n].numel() for n in trained)
    keep = info.get("_keep")
    if keep is not None:
        emb = model.get_input_embeddings().weight
        total -= int((~keep).sum()) * emb.shape[1]
    return total


def export_model(model: Any, lora: bool) -> Any:
    """A plain HF model with the student's current weights (LoRA merged into a copy)."""
    if not lora:
        return model
    return copy.deepcopy(model).merge_and_unload()


def save_student(model: Any, tokenizer: Any, out: Path, lora: bool) -> None:
    """An HF directory every stage can load; written beside and renamed, so it is never half-written."""
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    plain = export_model(model, lora)
    plain.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    out.mkdir(parents=True, exist_ok=True)
    for f in tmp.iterdir():
        f.replace(out / f.name)
    tmp.rmdir()


# ===================================================================================== losses


@dataclass
class LossConfig:
    mode: str = "hard"
    repr_layers: list[int] = field(default_factory=list)
    repr_weight: float = 1.0
    repr_with_hard: bool = False


def loss_positions(batch: Sequence[Example]) -> tuple[list[int], list[int], list[int]]:
    """(row, completion index j, target token) of every masked-in completion token."""
    rows, cols, tgt = [], [], []
    for i, e in enumerate(batch):
        labels = e.labels
        for j, keep in enumerate(e.mask):
            if keep:
                rows.append(i)
                cols.append(j)
                tgt.append(labels[j])
    return rows, cols, tgt


def _position_logits(out: forward.Forced, batch: Sequence[Example], rows: Sequence[int], cols: Sequence[int]
                     ) -> tuple[torch.Tensor, list[int]]:
    """The logits that predict completion token ``cols[k]`` of row ``rows[k]`` (sequence position
    ``n_prompt + j``, so the logits of position ``n_prompt + j - 1``: :meth:`forward.Forced.column`),
    and those sequence positions: the one place the training loss and the detectors index them."""
    device = out.logits.device
    r = torch.tensor(list(rows), device=device, dtype=torch.long)
    s_tok = [batch[i].n_prompt + j for i, j in zip(rows, cols)]  # sequence position of each target
    s_col = torch.tensor([out.column(t) for t in s_tok], device=device, dtype=torch.long)
    return out.logits[r, s_col], s_tok


def hard_token_losses(student: Any, batch: Sequence[Example], pad_id: int) -> torch.Tensor:
    """[n] the cross-entropy (float32 or wider) of every masked-in completion token, in
    :func:`loss_positions` order: exactly the terms whose mean is the ``hard`` loss, for the
    per-token detectors (:mod:`subliminal.detectors`)."""
    rows, cols, tgt = loss_positions(batch)
    out = _completion_forward(student, [e.prompt_ids for e in batch], batch, pad_id, False)
    if not rows:
        return out.logits.new_zeros(0)
    logits, _ = _position_logits(out, batch, rows, cols)
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return torch.nn.functional.cross_entropy(logits.to(dtype), torch.tensor(tgt, device=logits.device),
                                             reduction="none")


class _SoftKL(torch.autograd.Function):
    """Mean KL(teacher || student) over positions, with the exact gradient ``(p_s - p_t) / N``.

    Autograd through log_softmax leaves float residue when the two distributions are equal
    (``sum(p_t)`` is not exactly 1), gradients of ~1e-8 that Adam rescales into full-size steps:
    a student distilled from an identical teacher would random-walk. Here equal logits give a
    gradient of exactly zero."""

    @staticmethod
    def forward(ctx: Any, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        lp_s = torch.log_softmax(student_logits.float(), -1)
        lp_t = torch.log_softmax(teacher_logits.float(), -1)
        p_t = lp_t.exp()
        # tokens the teacher rules out (-inf logits) contribute 0, not 0 * inf = nan
        kl = torch.where(p_t > 0, p_t * (lp_t - lp_s), torch.zeros_like(p_t)).sum(-1).mean()
        ctx.save_for_backward(lp_s.exp() - p_t)
        ctx.in_dtype = student_logits.dtype
        return kl

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (diff,) = ctx.saved_tensors
        n = diff.numel() // diff.shape[-1] if diff.ndim > 1 else 1
        return (grad * diff / n).to(ctx.in_dtype), None


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) on the full next-token distribution."""
    return _SoftKL.apply(student_logits, teacher_logits.detach())


def _completion_forward(model: Any, prompts: Sequence[Sequence[int]], batch: Sequence[Example], pad_id: int,
                        hidden: bool) -> forward.Forced:
    return forward.forced(model, [list(p) + e.completion_ids for p, e in zip(prompts, batch)],
                          [len(p) for p in prompts], pad_id, hidden=hidden)


def batch_loss(student: Any, teacher: Any | None, batch: Sequence[Example], cfg: LossConfig, pad_id: int
               ) -> tuple[torch.Tensor, int]:
    """The distillation loss of one batch and its number of loss tokens. A batch without loss
    positions gives a zero loss that still has a graph, so the optimiser step is taken.

    Student and teacher see the same completion tokens after different prompts (the teacher's
    carries its system prompt); completion token j of row i is compared at the same j."""
    rows, cols, tgt = loss_positions(batch)
    need_hidden = cfg.mode == "representation"
    out = _completion_forward(student, [e.prompt_ids for e in batch], batch, pad_id, need_hidden)
    if not rows:
        return out.logits.sum() * 0.0, 0
    device = out.logits.device
    r = torch.tensor(rows, device=device)
    hard_logits, s_tok = _position_logits(out, batch, rows, cols)
    hard = torch.nn.functional.cross_entropy(hard_logits.float(), torch.tensor(tgt, device=device))
    if cfg.mode == "hard":
        return hard, len(rows)
    with torch.no_grad():
        t_prompts = [e.teacher_prompt_ids or [] for e in batch]
        t_out = _completion_forward(teacher, t_prompts, batch, pad_id, need_hidden)
    t_tok = [len(t_prompts[i]) + j for i, j in zip(rows, cols)]
    if cfg.mode == "soft":
        t_col = torch.tensor([t_out.column(t) for t in t_tok], device=device)
        return soft_kl(hard_logits, t_out.logits[r, t_col]), len(rows)
    # hidden states at the position that predicts each target (the same place the logits come from)
    sp = torch.tensor([t - 1 for t in s_tok], device=device)
    tp = torch.tensor([t - 1 for t in t_tok], device=device)
    mse = torch.stack([torch.nn.functional.mse_loss(out.hidden[layer + 1][r, sp].float(),
                                                    t_out.hidden[layer + 1][r, tp].float())
                       for layer in cfg.repr_layers]).mean()
    loss = cfg.repr_weight * mse
    return (loss + hard if cfg.repr_with_hard else loss), len(rows)


# ====================================================================================== loop


def rows_digest(sampler: EpochSampler, steps: int) -> str:
    """Hash of the row ids every step sees, in order: equal across matched conditions."""
    h = hashlib.sha256()
    for s in range(steps):
        h.update(",".join(e.id for e in sampler(s)).encode())
        h.update(b";")
    return h.hexdigest()[:16]


def _append_log(path: Path, entries: Sequence[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["step", "loss", "lr", "loss_tokens"])
    w.writeheader()
    for e in entries:
        w.writerow(e)
    write_text_atomic(path, buf.getvalue())


def read_losses(student: str | Path) -> list[float]:
    """The training loss of each logged step of a student directory (its ``loss.csv``), in order;
    empty when it logged none."""
    path = Path(student) / LOSS_CSV
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [float(e["loss"]) for e in csv.DictReader(f)]


def save_checkpoint(model: Any, tokenizer: Any, out: Path, step: int, lora: bool, info: dict[str, Any]) -> Path:
    """``checkpoint-NNNN``: a loadable HF directory plus a manifest naming its step."""
    d = out / f"checkpoint-{step:04d}"
    tmp = out / f".checkpoint-{step:04d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    export_model(model, lora).save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    write_manifest(tmp, stage="distill-checkpoint", config=info, seed=info.get("seed"), extra={"step": step})
    if d.exists():
        shutil.rmtree(d)
    tmp.rename(d)
    return d


def run_training(student: Any, teacher: Any | None, examples: Sequence[Example], tcfg: TrainConfig,
                 lcfg: LossConfig, *, tokenizer: Any, out: Path, lora: bool, device: torch.device,
                 info: dict[str, Any]) -> dict[str, Any]:
    """Train for ``tcfg.steps`` steps through :func:`subliminal.train.train` (resuming from
    ``out/.train``), writing ``checkpoint-NNNN`` directories and the loss log."""
    pad_id = tokenizer.pad_token_id

    def loss_fn(model: Any, batch: Sequence[Example]) -> tuple[torch.Tensor, int]:
        return batch_loss(model, teacher, batch, lcfg, pad_id)

    def on_checkpoint(step: int, entries: list[dict[str, Any]]) -> None:
        save_checkpoint(student, tokenizer, out, step, lora, info)
        _append_log(out / LOSS_CSV, entries)

    state_dir = out / STATE_DIR
    if (state_dir / STATE_FILE).exists() and is_main_process():
        log.info("resuming %s", out)
    result = train(student, examples, tcfg, pad_id=pad_id, device=device, state_dir=state_dir, loss_fn=loss_fn,
                   dropout=False, desc=f"distill {lcfg.mode}", on_checkpoint=on_checkpoint)
    if is_main_process():
        _append_log(out / LOSS_CSV, result.log)
    return {"steps": tcfg.steps, "resumed_from": result.resumed_from, "losses": result.log,
            "rows_digest": rows_digest(EpochSampler(examples, tcfg.batch_size, tcfg.seed), tcfg.steps),
            "loss_tokens_seen": sum(e["loss_tokens"] for e in result.log),
            "train_time_s": round(result.wall_time_s, 3)}


def plot_losses(entries: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([e["step"] for e in entries], [e["loss"] for e in entries], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with io.BytesIO() as buf:
        fig.savefig(buf, format="png", dpi=120)
        plt.close(fig)
        from .manifest import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_bytes(buf.getvalue())


# ======================================================================================= CLI


def student_steps(n_rows: int, batch_size: int, epochs: float, max_steps: int | None = None) -> int:
    """Optimiser steps of a student: ``epochs`` passes over ``n_rows`` rows in batches of
    ``batch_size`` (a partial last batch counts by its share), at least one, at most ``max_steps``.
    The one count: distill trains it, and the plan, the driver and the report state it."""
    steps = max(1, math.ceil(epochs * n_rows / batch_size))
    return min(steps, max_steps) if max_steps else steps


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "distill",
        help="train a student on teacher data: hard / soft / representation, token masks, layer and parameter subsets",
        description="Distil a student from --base on the teacher's data (the student sees the prompts without "
        "the teacher's system prompt; loss on completion tokens only, masked by --mask).",
    )
    p.add_argument("--base", required=True, help="the student's initial model (the teacher's base)")
    p.add_argument("--data", required=True, help="find-divergence output (data.div.jsonl), or generate output "
                   "(data.jsonl; --mask all only)")
    p.add_argument("--source-data", default=None, help="the generate file the divergence rows came from (default: "
                   "from the divergence file's manifest, or X.jsonl beside X.div.jsonl)")
    p.add_argument("--teacher", default=None, help="teacher directory (required for soft and representation; "
                   "recorded for hard)")
    p.add_argument("--out", required=True, help="student directory to write")
    p.add_argument("--mode", choices=MODES, default="hard", help="what the student matches (default %(default)s)")
    p.add_argument("--mask", choices=MASKS, default="all", help="which completion tokens count (default %(default)s)")
    p.add_argument("--layers", default=None, help="train only these blocks, e.g. 0 or 0,3 (with or without LoRA)")
    p.add_argument("--params", default="all", metavar="SET",
                   help="which weights train: all (every weight, or the --layers / --lora-rank choice); embeddings "
                   "(the input embedding matrix only); template-rows (only the embedding rows of the tokens the chat "
                   "template puts around every row, found from the tokenizer); bos-row; embeddings-but-template "
                   "(every embedding row but the template's); all-but-template (every weight but the template "
                   "rows). With tied input/output embeddings a row trains on both sides (default %(default)s)")
    p.add_argument("--lora-rank", type=int, default=None, help="train LoRA adapters of this rank on every attention "
                   "and MLP projection (merged into the saved student)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    p.add_argument("--lora-targets", default=None,
                   help="LoRA only on these projections, by their last name part, e.g. q_proj,k_proj,v_proj,o_proj "
                   "(default: every attention and MLP projection, as the paper)")
    p.add_argument("--schedule", choices=["cosine", "linear", "constant"], default="cosine",
                   help="learning-rate schedule after the warm-up: cosine to a tenth of --lr, linear to 0 (the "
                   "reference code's) or constant (default %(default)s)")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="split each step's --batch-size rows into this many micro-batches (memory only: the "
                   "update is the whole batch's, token-weighted) (default %(default)s)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the rows (default %(default)s)")
    p.add_argument("--max-steps", type=int, default=None, help="cap on optimiser steps")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per optimiser step (default %(default)s)")
    p.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of the steps")
    p.add_argument("--checkpoint-every", type=int, default=0, help="write checkpoint-NNNN every N steps "
                   "(0: none); also the resume point")
    p.add_argument("--repr-layers", default=None, help="representation: blocks whose output residual stream is "
                   "matched (default: every block)")
    p.add_argument("--repr-weight", type=float, default=1.0, help="representation: weight of the MSE term")
    p.add_argument("--repr-with-hard", action="store_true", help="representation: add the hard CE loss")
    p.add_argument("--intervention", choices=INTERVENTIONS, default="none",
                   help="hard, --mask all: change tokens instead of dropping them (subliminal.interventions): "
                   "replace-teacher (a counterfactual's argmax), replace-random (a random number token of the same "
                   "shape), corrupt-input (the random token in the context only, the label kept) (default %(default)s)")
    p.add_argument("--intervene-on", choices=INTERVENTION_TARGETS, default="flagged",
                   help="flagged: the row's flagged tokens; random-matched: the control, as many unflagged tokens "
                   "(per row, a row's shortfall drawn from the other rows) (default %(default)s)")
    p.add_argument("--replace-teacher", default=None, help="replace-teacher: which counterfactual of the "
                   "divergence file (default: its first)")
    add_seed(p)
    add_model_runtime(p)
    add_overwrite(p)
    p.set_defaults(func=_run_cli)


@dataclass
class DistillConfig:
    """One student: what it learns from (``data``, ``teacher``), how (``mode``, ``mask``), which
    weights train (``layers``, ``lora_rank``) and the optimiser's schedule. Field names are the
    CLI's flags."""

    base: str
    data: str
    out: str
    teacher: str | None = None
    source_data: str | None = None
    mode: str = "hard"
    mask: str = "all"
    layers: str | None = None
    params: str = "all"
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_targets: str | None = None
    schedule: str = "cosine"
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int | None = None
    lr: float = 2e-4
    batch_size: int = 16
    warmup_steps: int | None = None
    checkpoint_every: int = 0
    repr_layers: str | None = None
    repr_weight: float = 1.0
    repr_with_hard: bool = False
    intervention: str = "none"
    intervene_on: str = "flagged"
    replace_teacher: str | None = None
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    trust_remote_code: bool = False
    overwrite: bool = False


def _run_cli(args: argparse.Namespace) -> int:
    return run_distill(DistillConfig(**{f.name: getattr(args, f.name) for f in fields(DistillConfig)}))


def _check_args(cfg: DistillConfig) -> None:
    for name in ("batch_size", "lora_rank", "max_steps", "warmup_steps", "grad_accum"):
        v = getattr(cfg, name)
        if v is not None and v <= 0 and not (name == "warmup_steps" and v == 0):
            raise SubliminalError(f"--{name.replace('_', '-')} must be positive, got {v}")
    if cfg.epochs <= 0 or cfg.lr <= 0:
        raise SubliminalError("--epochs and --lr must be positive")
    if cfg.checkpoint_every < 0:
        raise SubliminalError("--checkpoint-every must be >= 0")
    if cfg.lora_alpha is not None and cfg.lora_rank is None:
        raise SubliminalError("--lora-alpha needs --lora-rank")
    if cfg.lora_targets is not None and cfg.lora_rank is None:
        raise SubliminalError("--lora-targets needs --lora-rank")
    if cfg.schedule not in ("cosine", "linear", "constant"):
        raise SubliminalError(f"--schedule {cfg.schedule}: one of cosine, linear, constant")
    if cfg.mode in ("soft", "representation") and not cfg.teacher:
        raise SubliminalError(f"--mode {cfg.mode} needs --teacher")
    if cfg.mode != "representation" and (cfg.repr_layers or cfg.repr_with_hard):
        raise SubliminalError("--repr-layers / --repr-with-hard apply to --mode representation only")
    if cfg.params not in PARAM_SETS:
        raise SubliminalError(f"--params {cfg.params!r}: no such parameter set; one of {', '.join(PARAM_SETS)}")
    if cfg.intervention != "none" and (cfg.mode != "hard" or cfg.mask != "all"):
        raise SubliminalError(f"--intervention {cfg.intervention} changes tokens of the hard loss: it needs --mode hard "
                              "and --mask all (dropping tokens is --mask)")
    if cfg.intervene_on != "flagged" and cfg.intervention == "none":
        raise SubliminalError("--intervene-on needs --intervention (the drop control is --mask random-matched)")
    if cfg.replace_teacher is not None and cfg.intervention != "replace-teacher":
        raise SubliminalError("--replace-teacher applies to --intervention replace-teacher only")
    if cfg.params != "all" and (cfg.layers is not None or cfg.lora_rank is not None):
        raise SubliminalError(f"--params {cfg.params} trains embedding rows; it does not combine with --layers or "
                              "--lora-rank (use --params all with those)")


def _load_teacher(cfg: DistillConfig, student_tok: Any) -> Any:
    from .models import load_model, same_tokenizer

    loaded = load_model(cfg.teacher, **runtime_kwargs(cfg))
    if not same_tokenizer(loaded.tokenizer, student_tok):
        raise SubliminalError(f"--teacher {cfg.teacher}: its tokenizer differs from the student's ({cfg.base})")
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    return loaded


def _recorded_system_prompt(path: str | None) -> str | None:
    """A teacher directory's system prompt without its weights (a plain model directory has none)."""
    from .teachers import is_teacher_dir, read_teacher

    if not path or path.startswith("hf:"):
        return None
    if not Path(path).is_dir():
        raise SubliminalError(f"--teacher {path}: no such directory (a teacher directory from `subliminal teach`)")
    return read_teacher(path).system_prompt if is_teacher_dir(path) else None


def _train_config(cfg: DistillConfig, n_rows: int) -> TrainConfig:
    steps = student_steps(n_rows, cfg.batch_size, cfg.epochs, cfg.max_steps)
    warm = cfg.warmup_steps if cfg.warmup_steps is not None else max(0, steps // 20)
    return TrainConfig(steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=min(warm, steps),
                       seed=cfg.seed, checkpoint_every=cfg.checkpoint_every, weight_decay=0.0, schedule=cfg.schedule,
                       grad_accum=cfg.grad_accum)


def _abs(path: str | None) -> str | None:
    """Local inputs as absolute paths, so a student's manifest leads back to them from anywhere
    (the transfer curve finds the base this way); hub ids unchanged."""
    return str(Path(path).resolve()) if path and Path(path).exists() else path


_NOT_SETTINGS = ("func", "out", "overwrite", "trust_remote_code", "verbose", "command", "device",
                 "base", "data", "source_data", "teacher")
FINGERPRINT_FILE = "fingerprint.json"


def _check_not_steered(base: str) -> None:
    """A steer teacher's vector is a forward hook, not weights: a student started from it would
    train with the hook on and save weights without it."""
    from .teachers import is_teacher_dir, read_teacher

    if is_teacher_dir(base) and read_teacher(base).method == "steer":
        raise SubliminalError(f"--base {base}: a steer teacher (its vector is added by a hook, which a student's "
                              "saved weights would not carry); give the base model it was made from")


def run_fingerprint(cfg: DistillConfig, source: str | None) -> dict[str, Any]:
    """The inputs' contents and every setting that shapes the student (paths are not settings:
    the inputs are compared by content, so a moved data file still resumes)."""
    config = {k: v for k, v in sorted(asdict(cfg).items()) if k not in _NOT_SETTINGS}
    config["device"] = device_type(cfg.device)
    for k, default in (("lora_targets", None), ("schedule", "cosine"), ("grad_accum", 1),
                       ("params", "all"), ("intervention", "none"), ("intervene_on", "flagged"),
                       ("replace_teacher", None)):  # students made before these existed
        if config.get(k) == default:
            config.pop(k, None)
    return fingerprint({"base": cfg.base, "data": cfg.data, "source_data": source, "teacher": cfg.teacher},
                       config)


def _clear_run(out: Path) -> None:
    """Remove what a previous run left in ``out`` (``--overwrite``): its state, checkpoints and log."""
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    for d in out.glob("checkpoint-*"):
        if d.is_dir():
            shutil.rmtree(d)
    for name in ("manifest.json", LOSS_CSV, "loss.png"):
        (out / name).unlink(missing_ok=True)


def _resume_action(cfg: DistillConfig, out: Path, fp: dict[str, Any]) -> str:
    man = read_manifest(out) if out.is_dir() else None
    finished = man if man is not None and (out / "config.json").is_file() else None
    fp_file = out / STATE_DIR / FINGERPRINT_FILE
    occupied = out.is_dir() and finished is None and not fp_file.exists() and any(out.iterdir())
    return check_resume(out, fp, overwrite=cfg.overwrite, stage=STAGE, finished=finished, partial=fp_file,
                        occupied=occupied)


def run_distill(cfg: DistillConfig) -> int:
    """Train one student (resuming a run of this exact fingerprint) and write its directory."""
    from .models import load_model, resolve_device

    t0 = time.time()
    _check_args(cfg)
    device_type(cfg.device)
    dev = resolve_device(cfg.device)
    parse_layers(cfg.layers, "--layers")  # the syntax before anything loads; the range once the model has
    parse_layers(cfg.repr_layers, "--repr-layers")
    out = Path(cfg.out)
    check_not_input({"--out": out}, {"--base": cfg.base, "--data": cfg.data, "--source-data": cfg.source_data,
                                     "--teacher": cfg.teacher}, dirs=("--out",))
    check_writable(out, is_dir=True)
    _check_not_steered(cfg.base)
    rows, source = read_training_rows(cfg.data, cfg.source_data)
    if source is not None:
        check_not_input({"--out": out}, {"--source-data": source}, dirs=("--out",))
    fp = run_fingerprint(cfg, source)
    action = _resume_action(cfg, out, fp)
    wait_for_everyone(dev)  # under a launcher every rank decides before rank 0 writes
    if action == "skip":
        print(f"student {out}: already distilled by this exact command; nothing to do (--overwrite redoes it)")
        return 0
    masks = row_masks(rows, cfg.mask, cfg.seed)
    set_seed(cfg.seed)
    student_loaded = load_model(cfg.base, device="cpu", dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    tok, model = student_loaded.tokenizer, student_loaded.model
    # hard labels read only the data: the teacher is recorded, its weights are not loaded
    teacher = _load_teacher(cfg, tok) if cfg.teacher and cfg.mode != "hard" else None
    teacher_prompt = teacher.system_prompt if teacher else _recorded_system_prompt(cfg.teacher)
    if teacher is not None and cfg.mode == "representation":
        if teacher.model.config.get_text_config().hidden_size != model.config.get_text_config().hidden_size:
            raise SubliminalError("--mode representation: teacher and student hidden sizes differ")
    layers = None if cfg.layers is None else sorted(resolve_layers(cfg.layers, n_layers(model), "--layers"))
    repr_layers = sorted(resolve_layers(cfg.repr_layers, n_layers(model), "--repr-layers"))
    examples = build_examples(rows, masks, tok, model_max_length(model),
                              teacher_prompt, with_teacher=cfg.mode != "hard")
    intervention = None
    if cfg.intervention != "none":
        from .interventions import apply_to_examples

        intervention = apply_to_examples(examples, rows, cfg.intervention, cfg.intervene_on, cfg.seed, tok,
                                         cfg.data, cfg.replace_teacher)
    targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()] if cfg.lora_targets else None
    pset = param_set(cfg.params, tok, model)
    model, trained = setup_trainable(model, layers, cfg.lora_rank, cfg.lora_alpha, targets, pset)
    tcfg = _train_config(cfg, len(rows))
    lcfg = LossConfig(cfg.mode, repr_layers if cfg.mode == "representation" else [], cfg.repr_weight,
                      cfg.repr_with_hard)
    main = is_main_process()
    if main:  # rank 0 alone writes; the others wait at train()'s first barrier
        out.mkdir(parents=True, exist_ok=True)
        if action == "start":
            _clear_run(out)
        write_fingerprint(out / STATE_DIR / FINGERPRINT_FILE, fp)
    config = {k: v for k, v in asdict(cfg).items() if k != "func"}
    device = training_device(dev)
    if teacher is not None:
        teacher.model.to(device)
    result = run_training(model, teacher.model if teacher else None, examples, tcfg, lcfg, tokenizer=tok, out=out,
                          lora=cfg.lora_rank is not None, device=device, info={**config, "seed": cfg.seed})
    if not main:
        wait_for_everyone(dev)  # until rank 0 has written the student
        return 0
    model.to("cpu")
    check_frozen_rows(model, pset)
    save_student(model, tok, out, cfg.lora_rank is not None)
    plot_losses(result["losses"], out / "loss.png", f"{cfg.mode} / {cfg.mask} ({len(rows)} rows)")
    n_completion = sum(len(e.completion_ids) for e in examples)
    stats = mask_stats(rows, cfg.seed, n_completion)
    extra = {
        "fingerprint": fp,
        "student": {"mode": cfg.mode, "mask": cfg.mask, "layers": layers, "params": cfg.params,
                    "lora_rank": cfg.lora_rank,
                    "lora_alpha": train_lora_alpha(cfg.lora_rank, cfg.lora_alpha) if cfg.lora_rank else None,
                    "repr_layers": lcfg.repr_layers or None,
                    "teacher_system_prompt": teacher_prompt},
        "rows": len(rows), "steps": result["steps"], "resumed_from": result["resumed_from"],
        "world_size": world_size(), "train_time_s": result["train_time_s"],
        "train_config": tcfg.to_json(), "rows_digest": result["rows_digest"],
        "loss_tokens": sum(sum(e.mask) for e in examples), "loss_tokens_by_mask": stats,
        "loss_tokens_seen": result["loss_tokens_seen"],
        "completion_tokens": n_completion,
        "trained_parameters": trained, "n_trained_parameters": len(trained),
        "trainable_set": {k: v for k, v in pset.items() if not k.startswith("_")},
        "n_trained_values": _trained_values(model, trained, pset),
        "final_loss": result["losses"][-1]["loss"] if result["losses"] else None,
        "checkpoints": sorted(d.name for d in out.glob("checkpoint-*") if d.is_dir()),
    }
    if intervention is not None:
        extra["intervention"] = intervention
    write_manifest(out, stage=STAGE, config=config, seed=cfg.seed, wall_time_s=time.time() - t0, extra=extra,
                   inputs={"base": _abs(cfg.base), "data": _abs(cfg.data), "source_data": _abs(source),
                           "teacher": _abs(cfg.teacher)})
    state_dir = out / STATE_DIR
    if state_dir.exists():
        shutil.rmtree(state_dir)
    print(f"student {out}: {cfg.mode}/{cfg.mask}, {len(rows)} rows, {result['steps']} steps, "
          f"{extra['loss_tokens']} loss tokens, final loss {extra['final_loss']:.4f}")
    wait_for_everyone(dev)
    return 0


def student_manifest(path: str | Path) -> dict[str, Any] | None:
    """The distill manifest of a student directory (None for other models)."""
    man = read_manifest(path)
    return man if man and man.get("stage") == STAGE else None

