"""``subliminal diagnose``: whether a setup can transfer its trait, measured before any student is
compared, and which side fails.

Hard-label transfer needs two things (experiments in ``shared/notes/toy-calibration-leads.md``):

- **Lean** -- the teacher's data must carry the trait. Over the teacher's own rows, at exactly the
  positions ``distill --mode hard`` trains on (every completion token; the logits at sequence
  position p-1 predict the token at p), the mean log-likelihood ratio of the data token under the
  biased teacher against the control (unbiased) teacher, in nats per token. On rows the biased
  teacher sampled this is a Monte-Carlo estimate of KL(biased || control) per token; on the
  control's own rows it should be ~0 or negative (-KL(control || biased)). Beside it the sampling
  entropy of those positions (the noise a hard label carries) and the share of the lean that the
  flagged tokens of each divergence rule carry. Where a ``.div.jsonl`` holds the log-probs
  already they are read, not re-scored.
- **Link** -- the base must turn that lean into the preference. To first order, one optimiser step
  of the student on the data changes the exact preference readout R (what ``eval`` reports) by
  ``grad(R) . update``; the link is that predicted change on the teacher's data minus the same on
  the control's. ``sgd``: update = -lr * g, so dR = -lr * grad(R) . g. ``adam``: AdamW's first step
  (no weight decay, as distill's students) is exactly -lr * g / (|g| + eps), ~ -lr * sign(g).
  g is the gradient of the students' hard loss (the token-weighted mean cross-entropy over every
  completion token) on all the rows at once: the expected first mini-batch gradient for SGD, the
  update of one step on a batch of every row for Adam. ``--validate`` applies the update and
  reads R again with ``eval``'s own code (predicted vs actual).
- **Coverage** -- the cosine between the student's first update on the teacher's data (minus the
  control's) and the teacher's displacement (fine-tuned weights minus base), per layer and over
  all trained parameters. A prompt teacher has no displacement; what stands in is the first
  update the same optimiser takes on the teacher's own preference rows (``teach --method
  finetune``'s training rows), i.e. the direction a fine-tuned teacher would start to move in.

The gradient code is shared with per-token attribution (detectors issue): :func:`readout_gradient`
gives grad(R) over a parameter set, :func:`data_gradient` the gradient of the hard loss over rows,
:func:`dot` their product; a token's attribution is ``-grad(loss_t) . grad(R)``, and the SGD link
is ``lr`` times their token-weighted mean.

Lean values are per-row scores: across batch sizes and process counts they differ only by the
padding of a row's batch (within 1e-6); gradient-derived numbers are sums in a batch-dependent
order, equal up to float rounding. Under torchrun each rank scores and differentiates its
contiguous shard of the rows (the gradients summed over ranks); every rank holds the result, rank 0
writes it.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from . import forward
from .cliutil import add_model_runtime, add_overwrite, add_seed, device_type
from .data import Aligned, DataError, Row, align_row, model_max_length, read_rows
from .manifest import (
    SubliminalError,
    check_not_input,
    check_resume,
    check_writable,
    fingerprint,
    read_file_manifest,
    read_json,
    read_manifest,
    set_seed,
    write_fingerprint,
    write_json_atomic,
    write_manifest,
    write_text_atomic,
)

log = logging.getLogger(__name__)
STAGE = "diagnose"
PARTS = ("lean", "link", "coverage")
OPTIMIZERS = ("sgd", "adam")
ADAM_EPS = 1e-8  # train.make_optimizer's AdamW eps
STATE_DIR = ".diagnose"
OUT_JSON = "diagnose.json"
N_BOOT = 2000


class ControlError(SubliminalError):
    """A teacher without a control teacher (or control rows) to measure it against."""


class ReadoutError(SubliminalError):
    """The preference readout cannot be computed on this model (unknown target, no mass)."""


# ====================================================================================== config


@dataclass
class DiagnoseConfig:
    """One diagnosis: a biased teacher and its rows against a control teacher and its rows, on the
    student ``base`` trained as ``layers`` / ``lora_*`` / ``param_filter`` say. Field names are
    the CLI's flags."""

    out: str
    teacher: str | None = None  # the biased teacher (default: the divergence file's factual teacher)
    control: str | None = None  # control teacher dir, or a counterfactual's name in the divergence file
    data: str | None = None  # the teacher's rows (default: the divergence file's source data)
    control_data: str | None = None  # the control teacher's rows (needed by link and coverage)
    divergence: list[str] = field(default_factory=list)  # .div.jsonl files of ``data`` (scores, flags)
    base: str | None = None  # the student's initial model (default: the teacher's base)
    target: str | None = None  # the readout's target (default: the teacher's bias)
    category: str | None = None
    parts: str = "lean,link,coverage"
    optimizer: str = "adam"
    lr: float = 1e-3
    layers: str | None = None
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_targets: str | None = None
    param_filter: str | None = None  # regex: only trained parameters whose name matches count
    params: str = "all"  # distill --params: the student's parameter set (embedding rows of the template, ...)
    max_rows: int | None = None
    max_questions: int | None = None
    batch_size: int = 8
    validate: bool = False
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    trust_remote_code: bool = False
    overwrite: bool = False

    def part_list(self) -> list[str]:
        parts = [p.strip() for p in self.parts.split(",") if p.strip()]
        bad = sorted(set(parts) - set(PARTS))
        if bad or not parts:
            raise SubliminalError(f"--parts {self.parts!r}: choose from {', '.join(PARTS)} (comma-separated)")
        return [p for p in PARTS if p in parts]


def check_config(cfg: DiagnoseConfig) -> None:
    cfg.part_list()
    if cfg.optimizer not in OPTIMIZERS:
        raise SubliminalError(f"--optimizer {cfg.optimizer}: one of {', '.join(OPTIMIZERS)}")
    if not cfg.lr > 0 or not math.isfinite(cfg.lr):
        raise SubliminalError(f"--lr must be a positive number, got {cfg.lr}")
    for name in ("max_rows", "max_questions", "batch_size", "lora_rank"):
        v = getattr(cfg, name)
        if v is not None and v <= 0:
            raise SubliminalError(f"--{name.replace('_', '-')} must be positive, got {v}")
    if cfg.lora_alpha is not None and cfg.lora_rank is None:
        raise SubliminalError("--lora-alpha needs --lora-rank")
    if cfg.lora_targets is not None and cfg.lora_rank is None:
        raise SubliminalError("--lora-targets needs --lora-rank")
    if cfg.param_filter is not None:
        try:
            re.compile(cfg.param_filter)
        except re.error as e:
            raise SubliminalError(f"--param-filter {cfg.param_filter!r}: not a regular expression ({e})") from None
    if not cfg.divergence and not (cfg.teacher and cfg.data):
        raise SubliminalError("give --divergence (a find-divergence file of the teacher's rows) or both --teacher "
                              "and --data")


# ================================================================================ resolution


@dataclass
class Inputs:
    """What the diagnosis reads, resolved from the flags and the divergence files' manifests."""

    teacher: str
    control: str
    data: str
    control_data: str | None
    base: str
    target: str
    category: str
    divergence: list[str]
    control_index: int | None  # the control's index among the first divergence file's counterfactuals
    teacher_method: str | None
    control_method: str | None


def _teacher_paths(div: str) -> tuple[str | None, dict[str, str]]:
    """(factual name, {teacher name: path}) recorded by find-divergence in a file's manifest."""
    man = read_file_manifest(div) or {}
    paths = {k[len("teacher:"):]: v.get("path") for k, v in (man.get("inputs") or {}).items()
             if k.startswith("teacher:") and isinstance(v, dict) and v.get("path")}
    return man.get("factual"), paths


def _same_path(a: str, b: str) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return a == b


def _method(spec: str) -> str | None:
    from .teachers import is_teacher_dir, read_teacher

    return read_teacher(spec).method if is_teacher_dir(spec) else None


def resolve_inputs(cfg: DiagnoseConfig) -> Inputs:
    """Teacher, control, data, student base and readout target from the flags, falling back on
    what the divergence file's manifest records; a teacher without a control is a ControlError."""
    from . import prompts
    from .teachers import is_teacher_dir, read_teacher

    factual = teacher = cfg.teacher
    names: dict[str, str] = {}
    data = cfg.data
    cf_names: list[str] = []
    if cfg.divergence:
        fname, names = _teacher_paths(cfg.divergence[0])
        man = read_file_manifest(cfg.divergence[0]) or {}
        cf_names = list(man.get("counterfactuals") or [])
        factual = names.get(fname) if fname else None
        if teacher is None:
            teacher = factual
        elif factual is not None and not _same_path(teacher, factual):
            raise SubliminalError(f"--teacher {teacher} is not the factual teacher of {cfg.divergence[0]} ({factual}); "
                                  "give the divergence file of this teacher's rows")
        if data is None:
            data = ((man.get("inputs") or {}).get("data") or {}).get("path")
    if teacher is None:
        raise SubliminalError(f"{cfg.divergence[0]}: its manifest names no factual teacher; give --teacher")
    if data is None:
        raise SubliminalError(f"{cfg.divergence[0]}: its manifest names no data file; give --data")
    control, index = cfg.control, None
    if control is not None and not Path(control).exists():
        if control not in names:
            raise ControlError(f"--control {control!r}: neither a teacher directory nor a counterfactual named in "
                               f"{cfg.divergence[0] if cfg.divergence else 'a divergence file'} "
                               f"(names: {', '.join(cf_names) or 'none'})")
        control = names[control]
    if control is None:
        unbiased = [n for n in cf_names if n in names and Path(names[n]).exists() and _method(names[n]) == "none"]
        if not unbiased:
            raise ControlError(f"teacher {teacher} has no control: no unbiased (method none) teacher among the "
                               "counterfactuals of the divergence file; give --control (a teacher directory made "
                               "with `subliminal teach --method none`, or a counterfactual's name)")
        control = names[unbiased[0]]
    if _same_path(control, teacher):
        raise ControlError(f"--control {control} is the teacher itself; give the unbiased teacher")
    for n in cf_names:
        if n in names and _same_path(names[n], control):
            index = cf_names.index(n)
    base = cfg.base
    if base is None:
        if not is_teacher_dir(teacher):
            raise SubliminalError(f"--teacher {teacher} is a plain model; give --base (the student's initial model)")
        base = read_teacher(teacher).base
    target = cfg.target
    if target is None:
        target = read_teacher(teacher).bias if is_teacher_dir(teacher) else None
        if not target:
            raise ReadoutError(f"teacher {teacher} names no bias; give --target (the readout's target)")
    try:
        category = cfg.category or prompts.category_of(target)
    except ValueError as e:
        raise ReadoutError(f"readout target {target!r}: {e}") from None
    if category not in prompts.CATEGORIES or target not in prompts.CATEGORIES[category]:
        raise ReadoutError(f"readout target {target!r} is not a candidate of category {category!r}; the exact "
                           "preference cannot score it")
    return Inputs(str(teacher), str(control), str(data), cfg.control_data, str(base), target, category,
                  list(cfg.divergence), index, _method(str(teacher)), _method(str(control)))


# ====================================================================================== lean


@dataclass
class Scored:
    """Per row: the data token's log-prob at each completion position, and the entropy (nats) of
    the next-token distribution there at T = 1 and at the rows' sampling temperature."""

    id: str
    logp: list[float]
    entropy: list[float] | None = None
    sampling_entropy: list[float] | None = None


def _entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature == 0:
        return torch.zeros(logits.shape[:-1], dtype=torch.float64)
    lp = torch.log_softmax(logits.double() / temperature, -1)
    return -(lp.exp() * torch.where(torch.isfinite(lp), lp, torch.zeros_like(lp))).sum(-1)


@torch.no_grad()
def _progress(batches: range, desc: str) -> Any:
    """A tqdm bar over a loop's batches (rank 0 only): the diagnostics of a real model take minutes."""
    from tqdm.auto import tqdm

    from . import distributed as dist

    return tqdm(batches, desc=desc, unit="batch", disable=not dist.is_main(), leave=False)


def score_rows(loaded: Any, rows: Sequence[Row], *, batch_size: int, entropy: bool = False,
               temperature: float | None = None) -> list[Scored]:
    """The data tokens' log-probs under ``loaded`` (its own system prompt), at exactly the
    completion positions distill trains on, through :func:`subliminal.forward.completion_logits`
    (right padding, the p-1 offset); log-softmax in float64."""
    from . import distributed as dist

    tok = loaded.tokenizer
    max_len = model_max_length(loaded.model)
    mine = dist.shard(len(rows))  # under a launcher each rank scores its contiguous shard; all get all
    local = rows[mine.start:mine.stop]
    out: list[Scored] = []
    for b in _progress(range(0, len(local), batch_size), f"diagnose: score ({loaded.name})"):
        chunk = [align_row(tok, r, loaded.system_prompt, max_len) for r in local[b:b + batch_size]]
        for a, lg in zip(chunk, forward.completion_logits(loaded.model, chunk, tok.pad_token_id)):
            lp = torch.log_softmax(lg.double(), -1)
            tgt = torch.tensor(a.completion_ids, device=lp.device)
            s = Scored(a.id, lp.gather(1, tgt[:, None])[:, 0].cpu().tolist())
            if entropy:
                s.entropy = _entropy(lg, 1.0).cpu().tolist()
                if temperature is not None:
                    s.sampling_entropy = _entropy(lg, temperature).cpu().tolist()
            out.append(s)
    return dist.merge_in_order(dist.all_gather(out))


def generation_temperature(path: str | Path, depth: int = 4) -> float | None:
    """The temperature the rows of a data file were sampled at (0: greedy), from the generate
    manifest, following derived files (matched rows) back to it; None when unknown."""
    p = Path(path)
    for _ in range(depth):
        man = read_file_manifest(p) or {}
        if man.get("stage") == "generate":
            t = (man.get("config") or {}).get("temperature")
            return float(t) if isinstance(t, (int, float)) else None
        nxt = ((man.get("inputs") or {}).get("data") or {}).get("path")
        if not nxt or not Path(nxt).is_file():
            return None
        p = Path(nxt)
    return None


def lean_values(biased: Sequence[Sequence[float]], control: Sequence[Sequence[float]]
                ) -> tuple[list[list[float]], int]:
    """Per row, per token: log p_biased - log p_control (nats). A token impossible under one
    teacher has no finite ratio; it is left out and counted."""
    out, dropped = [], 0
    for i, (b, c) in enumerate(zip(biased, control)):
        if len(b) != len(c):
            raise DataError(f"row {i}: the completion tokenises to {len(b)} tokens after the teacher's prompt and "
                            f"{len(c)} after the control's; positions cannot be aligned")
        row = []
        for x, y in zip(b, c):
            v = (float(x) if x is not None else -math.inf) - (float(y) if y is not None else -math.inf)
            if math.isfinite(v):
                row.append(v)
            else:
                dropped += 1
        out.append(row)
    return out, dropped


def summarize_lean(values: Sequence[Sequence[float]], *, seed: int, entropy: Sequence[Sequence[float]] | None = None,
                   sampling_entropy: Sequence[Sequence[float]] | None = None, dropped: int = 0) -> dict[str, Any]:
    """Token-weighted mean lean in nats per token with a row-bootstrap 95% interval (rows are the
    independent draws), the mean of the per-row means with a t-interval, and the entropies."""
    import numpy as np

    from .stats import bootstrap_ci, mean_ci

    sums = np.array([sum(r) for r in values], dtype=float)
    counts = np.array([len(r) for r in values], dtype=float)
    n_tok = int(counts.sum())
    if n_tok == 0:
        raise DataError("no scored completion tokens to measure the lean on")
    ci = bootstrap_ci(lambda i: sums[i].sum() / counts[i].sum() if counts[i].sum() else float("nan"), [len(sums)],
                      n_boot=N_BOOT, seed=seed)
    row_means = [s / c for s, c in zip(sums, counts) if c]
    rm, rlo, rhi = mean_ci(row_means)
    out: dict[str, Any] = {"rows": len(values), "tokens": n_tok, "nats_per_token": float(sums.sum() / n_tok),
                           "ci": [ci.lo, ci.hi], "ci_method": f"percentile bootstrap over rows ({N_BOOT}, seeded)",
                           "row_mean": rm, "row_mean_ci": [rlo, rhi], "nonfinite_tokens_left_out": dropped}
    if entropy is not None:
        ent = [v for r in entropy for v in r]
        out["entropy_nats_per_token"] = sum(ent) / len(ent) if ent else None
    if sampling_entropy is not None:
        ent = [v for r in sampling_entropy for v in r]
        out["sampling_entropy_nats_per_token"] = sum(ent) / len(ent) if ent else None
    return out


def rule_shares(values: Sequence[Sequence[float]], flags: Sequence[Sequence[bool]]) -> dict[str, Any]:
    """The share of the total lean carried by the flagged tokens, and the share of tokens flagged."""
    tot = sum(sum(r) for r in values)
    n = sum(len(r) for r in values)
    fl = sum(v for r, f in zip(values, flags) for v, x in zip(r, f) if x)
    k = sum(sum(bool(x) for x in f) for f in flags)
    return {"flagged_tokens": k, "flagged_share": k / n if n else 0.0,
            "lean_share": fl / tot if tot else None, "lean_per_flagged_token": fl / k if k else None,
            "lean_per_other_token": (tot - fl) / (n - k) if n - k else None}


def _limit(rows: list[Any], n: int | None) -> list[Any]:
    return rows[:n] if n else rows


def _div_rows(path: str, ids: Sequence[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A divergence file's rows in the order of ``ids`` (all must be there), and its rule."""
    from .divergence import load_divergence

    objs = {str(o["id"]): o for o in load_divergence(path)}
    missing = [i for i in ids if i not in objs]
    if missing:
        raise DataError(f"{path}: lacks row {missing[0]!r} of the data ({len(missing)} missing); give the divergence "
                        "file of these rows")
    man = read_file_manifest(path) or {}
    rule = man.get("rule") or {"rule": objs[ids[0]].get("rule", "paper")}
    return [objs[i] for i in ids], rule


def _flags_for(objs: Sequence[dict[str, Any]], lean_tokens: Sequence[Sequence[float]], where: str
               ) -> list[list[bool]]:
    from .divergence import any_flags

    out = []
    for o, v in zip(objs, lean_tokens):
        f = any_flags(o)
        if len(f) != len(v):
            raise DataError(f"{where}: row {o['id']!r} has {len(f)} flags for {len(v)} scored tokens")
        out.append(f)
    return out


def compute_lean(cfg: DiagnoseConfig, inp: Inputs, progress: bool = True) -> dict[str, Any]:
    """The lean of the teacher's rows (from the divergence file's stored log-probs where it holds
    the control's, else scored) and of the control's rows, with entropies and rule shares."""
    from .models import load_model

    rows = _limit(read_rows(inp.data), cfg.max_rows)
    kw = {"device": cfg.device, "dtype": cfg.dtype, "trust_remote_code": cfg.trust_remote_code}
    temp = generation_temperature(inp.data)
    biased = load_model(inp.teacher, **kw)
    t_scores = score_rows(biased, rows, batch_size=cfg.batch_size, entropy=True, temperature=temp)
    source = "scored"
    divs = [_div_rows(d, [r.id for r in rows]) for d in inp.divergence]
    if divs and inp.control_index is not None:
        objs = divs[0][0]
        for o, s in zip(objs, t_scores):
            if len(o["token_ids"]) != len(s.logp):
                raise DataError(f"{inp.divergence[0]}: row {o['id']!r} has {len(o['token_ids'])} tokens, the data "
                                f"aligns to {len(s.logp)}; another tokenizer or data file?")
        lf = [o["scores"]["logp_factual"] for o in objs]
        lc = [o["scores"]["logp_counterfactual"][inp.control_index] for o in objs]
        source = f"stored log-probs of {inp.divergence[0]}"
    else:
        control = load_model(inp.control, **kw)
        lf = [s.logp for s in t_scores]
        lc = [s.logp for s in score_rows(control, rows, batch_size=cfg.batch_size)]
        del control
    vals, dropped = lean_values(lf, lc)
    teacher_part = summarize_lean(vals, seed=cfg.seed, entropy=[s.entropy or [] for s in t_scores],
                                  sampling_entropy=[s.sampling_entropy or [] for s in t_scores] if temp is not None
                                  else None, dropped=dropped)
    teacher_part["source"] = source
    teacher_part["sampling_temperature"] = temp
    rules = {}
    for (objs, rule), path in zip(divs, inp.divergence):
        name = str(rule.get("rule", "paper"))
        key = name if name not in rules else f"{name}:{Path(path).name}"
        if not dropped:
            rules[key] = {"file": path, "rule": rule, **rule_shares(vals, _flags_for(objs, vals, path))}
        else:  # a left-out token shifts positions: flags cannot be matched token by token
            rules[key] = {"file": path, "rule": rule, "lean_share": None,
                          "why": "tokens impossible under one teacher were left out"}
    teacher_part["rules"] = rules
    out: dict[str, Any] = {"teacher_rows": teacher_part}
    if inp.control_data:
        crows = _limit(read_rows(inp.control_data), cfg.max_rows)
        control = load_model(inp.control, **kw)
        ctemp = generation_temperature(inp.control_data)
        c_scores = score_rows(control, crows, batch_size=cfg.batch_size, entropy=True, temperature=ctemp)
        del control
        b_scores = score_rows(biased, crows, batch_size=cfg.batch_size)
        cvals, cdropped = lean_values([s.logp for s in b_scores], [s.logp for s in c_scores])
        out["control_rows"] = summarize_lean(cvals, seed=cfg.seed, entropy=[s.entropy or [] for s in c_scores],
                                             sampling_entropy=[s.sampling_entropy or [] for s in c_scores]
                                             if ctemp is not None else None, dropped=cdropped)
        out["control_rows"].update(source="scored", sampling_temperature=ctemp,
                                   note="log p_biased - log p_control on the control teacher's own rows: "
                                   "~0 or negative (-KL(control || biased))")
    else:
        out["control_rows"] = None
        out["control_rows_why"] = "no --control-data"
    t = teacher_part
    if t.get("sampling_entropy_nats_per_token"):
        t["lean_over_sampling_entropy"] = t["nats_per_token"] / t["sampling_entropy_nats_per_token"]
    return out


# ============================================================================ gradients (shared)


ParamSet = list[tuple[str, torch.nn.Parameter]]


def trainable_params(model: Any) -> ParamSet:
    """The parameters a student trains: those with ``requires_grad``, in the model's order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def student_model(base: str, cfg: DiagnoseConfig) -> tuple[Any, Any, ParamSet]:
    """The student as distill builds it (the same trainable subset: every weight, ``--layers``,
    LoRA), then narrowed to the parameter names ``--param-filter`` matches."""
    from .distill import param_set, setup_trainable
    from .models import layer_count, load_model, resolve_layers

    set_seed(cfg.seed)
    loaded = load_model(base, device=cfg.device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    layers = resolve_layers(cfg.layers, layer_count(loaded.model.config)) if cfg.layers is not None else None
    targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()] if cfg.lora_targets else None
    pset = param_set(cfg.params, loaded.tokenizer, loaded.model)  # row sets: a gradient mask, as distill's
    model, _ = setup_trainable(loaded.model, layers, cfg.lora_rank, cfg.lora_alpha, targets, pset)
    model.to(cfg.device if cfg.device != "auto" else forward.device_of(loaded.model))
    model.eval()
    if cfg.param_filter:
        pat = re.compile(cfg.param_filter)
        for n, p in model.named_parameters():
            if p.requires_grad and not pat.search(n):
                p.requires_grad_(False)
    params = trainable_params(model)
    if not params:
        raise SubliminalError(f"--param-filter {cfg.param_filter!r} matches no trainable parameter")
    return loaded, model, params


def dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """Sum over the parameter set of the elementwise products, in float64."""
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


def _readout_lp(model: Any, examples: Sequence[Aligned], pad_id: int, k: int) -> torch.Tensor:
    """[Q, K] candidate log-probs (whole completions) with a graph, for complete questions."""
    logits = forward.completion_logits(model, examples, pad_id)
    lps = []
    for e, lg in zip(examples, logits):
        lp = torch.log_softmax(lg.float(), -1)
        lps.append(lp.gather(1, torch.tensor(e.completion_ids, device=lp.device)[:, None]).sum())
    return torch.stack(lps).view(-1, k)


def readout_gradient(model: Any, tokenizer: Any, params: ParamSet, target: str, category: str, *,
                     system_prompt: str | None = None, max_questions: int | None = None, batch_size: int = 8
                     ) -> tuple[float, list[torch.Tensor]]:
    """(R, grad(R)) over ``params``: R is ``eval``'s exact preference (P(target) renormalised over
    the category's candidates, mean over questions), computed from the same candidate rows
    (:func:`subliminal.evaluate.candidate_examples`) and the same renormalisation
    (:func:`subliminal.evaluate.candidate_probs`), with a graph. Questions are processed a few at a
    time; each contributes its term of the mean."""
    from . import evaluate, prompts

    candidates = prompts.CATEGORIES.get(category)
    if not candidates or target not in candidates:
        raise ReadoutError(f"readout target {target!r} is not a candidate of category {category!r}")
    qs = evaluate.question_texts(tokenizer, category, prompts.preference_questions(category)[: max_questions or None])
    shim = SimpleNamespace(model=model, tokenizer=tokenizer, system_prompt=system_prompt)
    try:
        examples = evaluate.candidate_examples(shim, candidates, qs)
    except DataError as e:
        raise ReadoutError(f"the readout cannot be scored on this model: {e}") from None
    k, ti = len(candidates), candidates.index(target)
    per_chunk = max(1, batch_size // k)
    grads = [torch.zeros_like(p, dtype=torch.float32) for _, p in params]
    total, mass = 0.0, 0.0
    for q0 in range(0, len(qs), per_chunk):
        ex = examples[q0 * k:(q0 + per_chunk) * k]
        lp = _readout_lp(model, ex, tokenizer.pad_token_id, k)
        if not torch.isfinite(torch.logsumexp(lp, 1)).all():
            raise ReadoutError(f"the model gives no finite probability to any candidate of question {q0}: the "
                               "readout cannot be scored (check the model and --target)")
        mass += float(torch.logsumexp(lp.detach().double(), 1).exp().sum())
        r = evaluate.candidate_probs(lp)[:, ti].sum() / len(qs)
        total += float(r.detach())
        for g, d in zip(grads, torch.autograd.grad(r, [p for _, p in params], allow_unused=True)):
            if d is not None:
                g += d.float()
    if not math.isfinite(total) or mass <= 0:
        raise ReadoutError(f"the readout is not finite on this model (R = {total}, candidate mass {mass})")
    return total, grads


def student_examples(rows: Sequence[Row], tokenizer: Any, max_length: int | None) -> list[Any]:
    """The rows as distill's hard students see them: no system prompt, every completion token in
    the loss (:func:`subliminal.distill.build_examples`, mask ``all``)."""
    from .distill import build_examples
    from .divergence import DivRow

    div_rows = [DivRow(r.id, r.prompt, r.completion, where=r.where) for r in rows]
    return build_examples(div_rows, [[] for _ in div_rows], tokenizer, max_length)


def _batch_gradients(model: Any, examples: Sequence[Any], pad_id: int, params: ParamSet, batch_size: int,
                     n_total: int | None = None) -> Any:
    """Per batch: (its share of the loss, its share of the gradient) of the students' hard loss over
    every row, each batch weighted by its share of the tokens (of ``n_total``, default these rows'
    own); summed they are the whole data's."""
    from .distill import LossConfig, batch_loss

    n_total = sum(sum(e.mask) for e in examples) if n_total is None else n_total
    if n_total == 0:
        raise DataError("no completion tokens to take a gradient on")
    for b in _progress(range(0, len(examples), batch_size), "diagnose: data gradient"):
        batch = examples[b:b + batch_size]
        loss, n = batch_loss(model, None, batch, LossConfig("hard"), pad_id)
        if n == 0:
            continue
        w = loss * (n / n_total)
        grads = torch.autograd.grad(w, [p for _, p in params], allow_unused=True)
        yield float(w.detach()), [torch.zeros_like(p, dtype=torch.float32) if d is None else d.float()
                                  for d, (_, p) in zip(grads, params)], n_total


def data_gradient(model: Any, examples: Sequence[Any], pad_id: int, params: ParamSet, *, batch_size: int = 8
                  ) -> tuple[float, list[torch.Tensor], int]:
    """(loss, gradient, tokens) of the students' hard loss over every row at once: the mean
    cross-entropy over all completion tokens, through :func:`subliminal.distill.batch_loss`, each
    batch weighted by its share of the tokens (so the result does not depend on ``batch_size`` up
    to float rounding)."""
    from . import distributed as dist

    grads = [torch.zeros_like(p, dtype=torch.float32) for _, p in params]
    loss_sum, n_total = 0.0, sum(sum(e.mask) for e in examples)
    mine = dist.shard(len(examples))  # under a launcher: each rank its shard, then the sum over ranks
    for loss, g, _ in _batch_gradients(model, examples[mine.start:mine.stop], pad_id, params, batch_size, n_total):
        loss_sum += loss
        for acc, d in zip(grads, g):
            acc += d
    if dist.is_distributed():
        import torch.distributed as td

        flat = torch.cat([g.flatten() for g in grads] + [torch.tensor([loss_sum], device=grads[0].device)])
        td.all_reduce(flat)
        sizes = [g.numel() for g in grads]
        grads = [part.view_as(g) for part, g in zip(flat[:-1].split(sizes), grads)]
        loss_sum = float(flat[-1])
    return loss_sum, grads, n_total


def data_gradient_dot(model: Any, examples: Sequence[Any], pad_id: int, params: ParamSet,
                      direction: Sequence[torch.Tensor], *, batch_size: int = 8) -> float:
    """grad(L_data) . ``direction`` over ``params`` (``direction`` = grad(R): the SGD link is ``-lr``
    times this) without holding the data gradient: each batch's gradient is dotted and dropped.
    With one token's loss it is that token's gradient attribution (the detectors issue)."""
    return sum(dot(g, direction) for _, g, _ in _batch_gradients(model, examples, pad_id, params, batch_size))


def first_update(grads: Sequence[torch.Tensor], optimizer: str, lr: float) -> list[torch.Tensor]:
    """The optimiser's first step from zero state: SGD -lr * g; AdamW (no weight decay, bias
    corrected) -lr * g / (|g| + eps), which is ~ -lr * sign(g)."""
    if optimizer == "sgd":
        return [-lr * g for g in grads]
    if optimizer == "adam":
        return [-lr * g / (g.abs() + ADAM_EPS) for g in grads]
    raise SubliminalError(f"--optimizer {optimizer}: one of {', '.join(OPTIMIZERS)}")


# ====================================================================================== link


@torch.no_grad()
def _apply(params: ParamSet, update: Sequence[torch.Tensor], sign: float = 1.0) -> None:
    for (_, p), u in zip(params, update):
        p.add_(u.to(p.dtype), alpha=sign)


def readout_after(model: Any, tokenizer: Any, params: ParamSet, update: Sequence[torch.Tensor], target: str,
                  category: str, max_questions: int | None, batch_size: int) -> float:
    """R after applying ``update`` to ``params``, read by ``eval``'s own exact preference; the
    weights are restored afterwards (a saved copy, not a subtraction)."""
    from . import evaluate, prompts

    saved = [p.detach().clone() for _, p in params]
    try:
        _apply(params, update)
        qs = prompts.preference_questions(category)[: max_questions or None]
        shim = SimpleNamespace(model=model, tokenizer=tokenizer, system_prompt=None)
        return float(evaluate.exact_preference(shim, target, category, qs, batch_size=batch_size)["mean"])
    finally:
        with torch.no_grad():
            for (_, p), s in zip(params, saved):
                p.copy_(s)


@dataclass
class Gradients:
    """What link and coverage share: the student, its parameter set, R and the three gradients."""

    model: Any
    tokenizer: Any
    params: ParamSet
    readout: float
    g_readout: list[torch.Tensor]
    g_teacher: list[torch.Tensor]
    g_control: list[torch.Tensor]
    loss_teacher: float
    loss_control: float
    tokens_teacher: int
    tokens_control: int


def compute_gradients(cfg: DiagnoseConfig, inp: Inputs) -> Gradients:
    if not inp.control_data:
        raise ControlError("link and coverage compare the teacher's rows with the control's: give --control-data "
                           "(the control teacher's rows)")
    loaded, model, params = student_model(inp.base, cfg)
    tok = loaded.tokenizer
    r, g_r = readout_gradient(model, tok, params, inp.target, inp.category, max_questions=cfg.max_questions,
                              batch_size=cfg.batch_size)
    max_len = model_max_length(model)
    t_ex = student_examples(_limit(read_rows(inp.data), cfg.max_rows), tok, max_len)
    c_ex = student_examples(_limit(read_rows(inp.control_data), cfg.max_rows), tok, max_len)
    lt, g_t, nt = data_gradient(model, t_ex, tok.pad_token_id, params, batch_size=cfg.batch_size)
    lc, g_c, nc = data_gradient(model, c_ex, tok.pad_token_id, params, batch_size=cfg.batch_size)
    return Gradients(model, tok, params, r, g_r, g_t, g_c, lt, lc, nt, nc)


def _norm(g: Sequence[torch.Tensor]) -> float:
    return math.sqrt(dot(g, g))


def compute_link(cfg: DiagnoseConfig, inp: Inputs, gr: Gradients) -> dict[str, Any]:
    """Predicted change of R after one optimiser step on the teacher's rows, minus on the
    control's; with ``validate`` also the change after the step itself."""
    u_t = first_update(gr.g_teacher, cfg.optimizer, cfg.lr)
    u_c = first_update(gr.g_control, cfg.optimizer, cfg.lr)
    p_t, p_c = dot(gr.g_readout, u_t), dot(gr.g_readout, u_c)
    nr = _norm(gr.g_readout)

    def side(g: list[torch.Tensor], pred: float, loss: float, tokens: int) -> dict[str, Any]:
        ng = _norm(g)
        gd = dot(gr.g_readout, g)
        return {"predicted_delta_R": pred, "grad_R_dot_grad_loss": gd, "loss": loss, "tokens": tokens,
                "grad_loss_norm": ng, "cosine_grad_R_grad_loss": gd / (nr * ng) if nr and ng else None}

    out: dict[str, Any] = {
        "optimizer": cfg.optimizer, "lr": cfg.lr,
        "update": "-lr * g" if cfg.optimizer == "sgd" else "-lr * g / (|g| + 1e-8) (AdamW's first step, ~ -lr*sign(g))",
        "gradient": "hard loss (mean cross-entropy over every completion token) on all rows at once",
        "readout_R": gr.readout, "grad_R_norm": nr, "n_parameters": sum(p.numel() for _, p in gr.params),
        "n_tensors": len(gr.params),
        "teacher": side(gr.g_teacher, p_t, gr.loss_teacher, gr.tokens_teacher),
        "control": side(gr.g_control, p_c, gr.loss_control, gr.tokens_control),
        "link_predicted": p_t - p_c,
    }
    if cfg.validate:
        at = readout_after(gr.model, gr.tokenizer, gr.params, u_t, inp.target, inp.category, cfg.max_questions,
                           cfg.batch_size)
        ac = readout_after(gr.model, gr.tokenizer, gr.params, u_c, inp.target, inp.category, cfg.max_questions,
                           cfg.batch_size)
        out["teacher"]["actual_delta_R"] = at - gr.readout
        out["control"]["actual_delta_R"] = ac - gr.readout
        out["link_actual"] = at - ac
    return out


# ================================================================================== coverage


def param_group(name: str) -> str:
    """The layer a parameter belongs to for the per-layer table (``layer N``, else ``other``:
    embeddings, final norm, head)."""
    from .distill import layer_of

    i = layer_of(name)
    return f"layer {i}" if i is not None else "other"


_PEFT_PREFIX = "base_model.model."


def weight_space(model: Any, params: ParamSet, update: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The update as a change of the plain model's weights, by name. Plain parameters map to
    themselves. A LoRA adapter starts with B = 0, so to first order its step changes the adapted
    weight by scale * dB @ A (dA enters only at second order): computed by peft's own
    ``get_delta_weight`` with B set to dB for the call."""
    out: dict[str, torch.Tensor] = {}
    upd = {n: u for (n, _), u in zip(params, update)}
    lora_modules = [(n, m) for n, m in model.named_modules() if hasattr(m, "lora_B") and hasattr(m, "get_delta_weight")]
    lora_names = set()
    for mname, mod in lora_modules:
        for adapter, lin in mod.lora_B.items():
            key = f"{mname}.lora_B.{adapter}.weight"
            lora_names.add(key)
            lora_names.add(f"{mname}.lora_A.{adapter}.weight")
            if key not in upd:
                continue
            with torch.no_grad():
                old = lin.weight.detach().clone()
                lin.weight.copy_(upd[key].to(lin.weight.dtype))
                delta = mod.get_delta_weight(adapter).detach().float().clone()
                lin.weight.copy_(old)
            plain = mname[len(_PEFT_PREFIX):] if mname.startswith(_PEFT_PREFIX) else mname
            out[plain + ".weight"] = delta
    for n, u in upd.items():
        if n in lora_names:
            continue
        plain = n[len(_PEFT_PREFIX):] if n.startswith(_PEFT_PREFIX) else n
        out[plain.replace(".base_layer.", ".")] = u.float()
    return out


def teacher_displacement(teacher: str, base: str, names: Sequence[str], cfg: DiagnoseConfig
                         ) -> dict[str, torch.Tensor] | None:
    """Fine-tuned teacher weights minus the base's, for ``names``; None for a teacher without
    weights of its own (prompt, none)."""
    from .models import load_model
    from .teachers import is_teacher_dir, read_teacher

    if not is_teacher_dir(teacher) or not read_teacher(teacher).weights:
        return None
    kw = {"device": "cpu", "dtype": "float32", "trust_remote_code": cfg.trust_remote_code}
    t = dict(load_model(teacher, **kw).model.named_parameters())
    b = dict(load_model(base, **kw).model.named_parameters())
    missing = [n for n in names if n not in t or n not in b]
    if missing:
        raise SubliminalError(f"teacher {teacher}: no weight {missing[0]!r} to compare with the student's; is its base "
                              f"{base}?")
    return {n: (t[n].detach() - b[n].detach()).float() for n in names}


def preference_standin(gr: Gradients, target: str, cfg: DiagnoseConfig) -> list[torch.Tensor]:
    """What stands in for a prompt teacher's displacement: the same optimiser's first update on the
    teacher's own preference rows (every preference question answered with the target, the rows
    ``teach --method finetune`` trains on), from the student's base."""
    from .distill import Example
    from .teachers_cli import preference_rows

    rows = preference_rows(gr.tokenizer, target)
    ex = [Example(a.id, a.prompt_ids, a.completion_ids, [True] * len(a.completion_ids)) for a in rows]
    _, g, _ = data_gradient(gr.model, ex, gr.tokenizer.pad_token_id, gr.params, batch_size=cfg.batch_size)
    return first_update(g, cfg.optimizer, cfg.lr)


def cosines(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Cosine of a and b over every shared name, and per layer group."""
    groups: dict[str, list[float]] = {}
    tot = [0.0, 0.0, 0.0]
    for n in a:
        if n not in b:
            continue
        x, y = a[n].double(), b[n].double().to(a[n].device)
        v = [float((x * y).sum()), float((x * x).sum()), float((y * y).sum())]
        g = groups.setdefault(param_group(n), [0.0, 0.0, 0.0])
        for i in range(3):
            g[i] += v[i]
            tot[i] += v[i]

    def cos(v: list[float]) -> float | None:
        return v[0] / math.sqrt(v[1] * v[2]) if v[1] > 0 and v[2] > 0 else None

    order = sorted(groups, key=lambda s: (s == "other", int(s.split()[1]) if s.startswith("layer ") else 0))
    return {"all": cos(tot), "per_layer": {k: cos(groups[k]) for k in order},
            "norm_update": math.sqrt(tot[1]), "norm_displacement": math.sqrt(tot[2])}


def compute_coverage(cfg: DiagnoseConfig, inp: Inputs, gr: Gradients) -> dict[str, Any]:
    """Cosine between the student's first update (teacher's rows minus control's) and the teacher's
    displacement (or its stand-in), per layer and over every trained parameter."""
    u_t = first_update(gr.g_teacher, cfg.optimizer, cfg.lr)
    u_c = first_update(gr.g_control, cfg.optimizer, cfg.lr)
    diff = weight_space(gr.model, gr.params, [a - b for a, b in zip(u_t, u_c)])
    only_t = weight_space(gr.model, gr.params, u_t)
    disp = teacher_displacement(inp.teacher, inp.base, list(diff), cfg)
    if disp is not None:
        what = "fine-tuned teacher weights minus the base's"
    else:
        disp = weight_space(gr.model, gr.params, preference_standin(gr, inp.target, cfg))
        what = (f"stand-in: the teacher ({inp.teacher_method or 'a plain model'}) has no weights of its own; the "
                f"student optimiser's first update ({cfg.optimizer}) on the teacher's own preference rows (every "
                f"preference question answered '{inp.target}', what `teach --method finetune` trains on)")
    res = cosines(diff, disp)
    res_t = cosines(only_t, disp)
    return {"displacement": what, "update": "first update on the teacher's rows minus on the control's "
            f"({cfg.optimizer}, lr {cfg.lr:g})", "cosine": res["all"], "per_layer": res["per_layer"],
            "norm_update": res["norm_update"], "norm_displacement": res["norm_displacement"],
            "cosine_teacher_update_only": res_t["all"], "per_layer_teacher_update_only": res_t["per_layer"],
            "space": "adapted weights (LoRA dB @ A)" if cfg.lora_rank else "trained parameters"}


# ======================================================================================= run


def run_fingerprint(cfg: DiagnoseConfig, inp: Inputs) -> dict[str, Any]:
    ins = {"teacher": inp.teacher, "control": inp.control, "data": inp.data, "control_data": inp.control_data,
           "base": inp.base, **{f"divergence {i}": d for i, d in enumerate(inp.divergence)}}
    config = {k: v for k, v in asdict(cfg).items()
              if k not in ("out", "overwrite", "trust_remote_code", "batch_size", "device", "teacher", "control",
                           "data", "control_data", "base", "divergence")}
    config.update(device=device_type(cfg.device), target=inp.target, category=inp.category)
    return fingerprint(ins, config)


def _state(out: Path) -> Path:
    return out / STATE_DIR


def _resume_action(cfg: DiagnoseConfig, out: Path, fp: dict[str, Any], inp: Inputs) -> str:
    check_not_input({"--out": out}, {"--teacher": inp.teacher, "--control": inp.control, "--data": inp.data,
                                     "--control-data": inp.control_data, "--base": inp.base,
                                     **{f"--divergence {d}": d for d in inp.divergence}}, dirs=("--out",))
    check_writable(out, is_dir=True)
    man = read_manifest(out) if out.is_dir() else None
    finished = man if man is not None and (out / OUT_JSON).is_file() else None
    fp_file = _state(out) / "fingerprint.json"
    occupied = out.is_dir() and finished is None and not fp_file.exists() and any(out.iterdir())
    return check_resume(out, fp, overwrite=cfg.overwrite, stage=STAGE, finished=finished, partial=fp_file,
                        occupied=occupied)


def _part(out: Path, name: str) -> Path:
    return _state(out) / f"{name}.json"


def run(cfg: DiagnoseConfig, *, progress: bool = True) -> dict[str, Any]:
    """Diagnose one teacher; write ``OUT/diagnose.json``, the figure and the manifest (each part is
    kept under ``OUT/.diagnose`` as it finishes, so a stopped run of the same fingerprint
    resumes there); return the result. Under a launcher every rank scores and differentiates its
    shard of the rows, every rank holds the whole result, rank 0 writes."""
    import shutil

    from . import distributed as dist

    t0 = time.time()
    dist.init(cfg.device)
    dist.quiet_other_ranks()
    with dist.agree("prepare"):
        check_config(cfg)
        device_type(cfg.device)
        out = Path(cfg.out)
        inp = resolve_inputs(cfg)
        fp = run_fingerprint(cfg, inp)
        action = _resume_action(cfg, out, fp, inp)
    if action == "skip":
        log.info("%s: already diagnosed by this exact command; nothing to do (--overwrite redoes it)", out)
        return read_json(out / OUT_JSON, "diagnose result")
    parts = cfg.part_list()
    todo = [p for p in parts if not _part(out, p).is_file()]  # read by every rank before rank 0 writes any
    with dist.agree("open"):
        if dist.is_main():
            if action == "start" and out.exists():
                shutil.rmtree(_state(out), ignore_errors=True)
                for name in (OUT_JSON, "manifest.json", "diagnose.png", "diagnose.csv"):
                    (out / name).unlink(missing_ok=True)
                todo = list(parts)
            out.mkdir(parents=True, exist_ok=True)
            write_fingerprint(_state(out) / "fingerprint.json", fp)
        todo = dist.all_gather(todo)[0]  # rank 0's view
    result: dict[str, Any] = {"teacher": inp.teacher, "control": inp.control, "data": inp.data,
                              "control_data": inp.control_data, "base": inp.base, "target": inp.target,
                              "category": inp.category, "teacher_method": inp.teacher_method,
                              "control_method": inp.control_method, "divergence": inp.divergence,
                              "student": {"layers": cfg.layers, "lora_rank": cfg.lora_rank,
                                          "lora_alpha": cfg.lora_alpha, "lora_targets": cfg.lora_targets,
                                          "param_filter": cfg.param_filter, "params": cfg.params},
                              "max_rows": cfg.max_rows, "timings_s": {}}
    for p in parts:
        if p not in todo:
            log.info("diagnose %s: resumed from %s", p, _part(out, p))
            result[p] = read_json(_part(out, p), f"diagnose {p} part")

    def keep(name: str) -> None:
        if dist.is_main():
            write_json_atomic(_part(out, name), result[name], nan_as_null=True)

    if "lean" in todo:
        t = time.time()
        with dist.agree("lean"):
            result["lean"] = compute_lean(cfg, inp, progress)
            result["timings_s"]["lean"] = time.time() - t
            keep("lean")
    grad_parts = [p for p in ("link", "coverage") if p in todo]
    if grad_parts:
        t = time.time()
        with dist.agree("gradients"):
            gr = compute_gradients(cfg, inp)
        result["timings_s"]["gradients"] = time.time() - t
        for p in grad_parts:
            t = time.time()
            with dist.agree(p):
                result[p] = compute_link(cfg, inp, gr) if p == "link" else compute_coverage(cfg, inp, gr)
                result["timings_s"][p] = time.time() - t
                keep(p)
    with dist.agree("write"):
        if dist.is_main():
            write_json_atomic(out / OUT_JSON, result, nan_as_null=True)
            write_figure(result, out)
            write_manifest(out, stage=STAGE, config=cfg, seed=cfg.seed, wall_time_s=time.time() - t0,
                           inputs={"teacher": inp.teacher, "control": inp.control, "data": inp.data,
                                   "control_data": inp.control_data, "base": inp.base,
                                   **{f"divergence{i}": d for i, d in enumerate(inp.divergence)}},
                           extra={"fingerprint": fp, "parts": parts, "world_size": dist.world_size()})
            shutil.rmtree(_state(out), ignore_errors=True)
    return read_json(out / OUT_JSON, "diagnose result")


# ==================================================================================== figure


def figure_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The numbers the figure shows, one row per bar (panel, label, value, low, high)."""
    rows = []
    lean = result.get("lean") or {}
    for key, label in (("teacher_rows", "teacher's rows"), ("control_rows", "control's rows")):
        e = lean.get(key)
        if e:
            rows.append({"panel": "lean (nats/token)", "label": label, "value": e["nats_per_token"],
                         "low": e["ci"][0], "high": e["ci"][1]})
    link = result.get("link") or {}
    if link:
        rows.append({"panel": "link (dR)", "label": "predicted", "value": link["link_predicted"], "low": None,
                     "high": None})
        if "link_actual" in link:
            rows.append({"panel": "link (dR)", "label": "actual", "value": link["link_actual"], "low": None,
                         "high": None})
    cov = result.get("coverage") or {}
    if cov:
        rows.append({"panel": "coverage (cosine)", "label": "all", "value": cov["cosine"], "low": None, "high": None})
        for k, v in cov["per_layer"].items():
            rows.append({"panel": "coverage (cosine)", "label": k, "value": v, "low": None, "high": None})
    return rows


def write_figure(result: dict[str, Any], out: Path) -> None:
    """``diagnose.png`` (one panel per part) and ``diagnose.csv`` (its data)."""
    rows = figure_rows(result)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["panel", "label", "value", "low", "high"])
    w.writeheader()
    for r in rows:
        w.writerow(r)
    write_text_atomic(out / "diagnose.csv", buf.getvalue())
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .manifest import atomic_path

    panels = list(dict.fromkeys(r["panel"] for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        sel = [r for r in rows if r["panel"] == panel]
        vals = [r["value"] if r["value"] is not None else 0.0 for r in sel]
        err = None
        if all(r["low"] is not None and r["high"] is not None for r in sel):
            err = [[v - r["low"] for v, r in zip(vals, sel)], [r["high"] - v for v, r in zip(vals, sel)]]
        ax.bar(range(len(sel)), vals, yerr=err, color="tab:blue", capsize=3)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(sel)))
        ax.set_xticklabels([r["label"] for r in sel], rotation=30, ha="right", fontsize=8)
        ax.set_title(panel, fontsize=9)
    fig.suptitle(f"diagnose: {Path(result['teacher']).name} vs {Path(result['control']).name} "
                 f"({result['target']})", fontsize=9)
    fig.tight_layout()
    with atomic_path(out / "diagnose.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# ===================================================================================== report


def _f(x: Any, d: int = 4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{d}f}"


def format_result(result: dict[str, Any]) -> str:
    """The diagnosis in a few lines for the terminal."""
    lines = [f"diagnose {result['teacher']} vs control {result['control']} (target {result['target']})"]
    lean = result.get("lean")
    if lean:
        t = lean["teacher_rows"]
        lines.append(f"  lean on the teacher's rows: {_f(t['nats_per_token'])} nats/token [{_f(t['ci'][0])}, "
                     f"{_f(t['ci'][1])}] over {t['rows']} rows, {t['tokens']} tokens; entropy "
                     f"{_f(t.get('entropy_nats_per_token'))} nats/token at T=1"
                     + (f", {_f(t.get('sampling_entropy_nats_per_token'))} at the sampling T="
                        f"{t['sampling_temperature']:g}" if t.get("sampling_temperature") is not None else ""))
        for name, r in (t.get("rules") or {}).items():
            lines.append(f"    rule {name}: {r.get('flagged_tokens', 'n/a')} flagged tokens carry "
                         f"{_f(r.get('lean_share'), 3)} of the lean")
        c = lean.get("control_rows")
        if c:
            lines.append(f"  lean on the control's rows: {_f(c['nats_per_token'])} nats/token [{_f(c['ci'][0])}, "
                         f"{_f(c['ci'][1])}]")
    link = result.get("link")
    if link:
        s = (f"  link ({link['optimizer']}, lr {link['lr']:g}): predicted dR {link['link_predicted']:+.3e} "
             f"(teacher {link['teacher']['predicted_delta_R']:+.3e}, control {link['control']['predicted_delta_R']:+.3e})")
        if "link_actual" in link:
            s += f"; actual {link['link_actual']:+.3e}"
        lines.append(s + f"; R = {link['readout_R']:.4f}")
    cov = result.get("coverage")
    if cov:
        per = ", ".join(f"{k} {_f(v, 3)}" for k, v in cov["per_layer"].items())
        lines.append(f"  coverage: {_f(cov['cosine'], 4)} over all trained parameters ({per}); displacement: "
                     f"{cov['displacement']}")
    return "\n".join(lines)


def report_section(result: dict[str, Any] | None) -> list[str]:
    """The REPORT.md section of a run's diagnostics (empty without them)."""
    if not result:
        return []
    lines = ["## Transfer diagnostics (before any student)", "",
             "Lean: mean log-likelihood ratio of the data token, biased minus control teacher, at the positions "
             "students train on (nats per token; 95% row-bootstrap interval). Link: the first-order change of the "
             "exact P(target) one optimiser step on the teacher's rows predicts, minus on the control's. Coverage: "
             "cosine between that first update (teacher minus control) and the teacher's displacement.", "",
             "| diagnostic | value | detail |", "|---|---|---|"]
    lean = result.get("lean") or {}
    t, c = lean.get("teacher_rows"), lean.get("control_rows")
    if t:
        lines.append(f"| lean, teacher's rows | {_f(t['nats_per_token'])} [{_f(t['ci'][0])}, {_f(t['ci'][1])}] | "
                     f"{t['rows']} rows, {t['tokens']} tokens; entropy {_f(t.get('entropy_nats_per_token'), 3)} "
                     "nats/token (T=1) |")
        for name, r in (t.get("rules") or {}).items():
            lines.append(f"| lean share of {name}-flagged tokens | {_f(r.get('lean_share'), 3)} | "
                         f"{r.get('flagged_tokens', 'n/a')} tokens ({_f(r.get('flagged_share'), 3)} of all) |")
    if c:
        lines.append(f"| lean, control's rows | {_f(c['nats_per_token'])} [{_f(c['ci'][0])}, {_f(c['ci'][1])}] | "
                     "should be ~0 or negative |")
    link = result.get("link")
    if link:
        act = f"; actual {link['link_actual']:+.3e}" if "link_actual" in link else ""
        lines.append(f"| link (dR, {link['optimizer']} lr {link['lr']:g}) | {link['link_predicted']:+.3e} | teacher "
                     f"{link['teacher']['predicted_delta_R']:+.3e}, control {link['control']['predicted_delta_R']:+.3e}"
                     f"{act}; R = {link['readout_R']:.4f} |")
    cov = result.get("coverage")
    if cov:
        per = ", ".join(f"{k} {_f(v, 3)}" for k, v in cov["per_layer"].items())
        lines.append(f"| coverage (cosine) | {_f(cov['cosine'])} | {per}; {cov['displacement']} |")
    return [*lines, ""]


# ==================================================================================== pipeline


def pipeline_argv(cfg: Any, out: Path, base: Path, tdir: Path, files: dict[str, Path]) -> list[str]:
    """The ``subliminal diagnose`` command of a run (``cfg`` a :class:`subliminal.pipeline.RunConfig`):
    the target teacher against the unbiased one, on the matched rows and both divergence files,
    with the students' optimiser (AdamW), learning rate and trainable set."""
    argv = ["diagnose", "--teacher", str(tdir / cfg.target), "--control", str(tdir / "none"),
            "--data", str(files[cfg.target]), "--control-data", str(files["none"]), "--base", str(base),
            "--divergence", *[str(files[k]) for k in ("div", "div-ratio") if k in files],
            "--out", str(out), "--optimizer", "adam", "--lr", str(cfg.student_mode_lr), "--validate",
            "--seed", str(cfg.base_seed),
            "--device", cfg.device, "--batch-size", str(cfg.div_batch_size)]
    if cfg.dtype != "float32":
        argv += ["--dtype", cfg.dtype]
    if not cfg.student_full:
        argv += ["--lora-rank", str(cfg.student_lora_rank)]
        if cfg.student_lora_alpha is not None:
            argv += ["--lora-alpha", str(cfg.student_lora_alpha)]
        if cfg.student_lora_targets:
            argv += ["--lora-targets", ",".join(cfg.student_lora_targets)]
    if getattr(cfg, "student_params", "all") != "all":
        argv += ["--params", cfg.student_params]
    if cfg.max_questions:
        argv += ["--max-questions", str(cfg.max_questions)]
    if getattr(cfg, "diagnose_max_rows", None):
        argv += ["--max-rows", str(cfg.diagnose_max_rows)]
    return argv


def pipeline_stage(cfg: Any, run: Any, out: Path, base: Path, tdir: Path,
                   files: dict[str, Path]) -> dict[str, Any] | None:
    """The diagnostics stage of ``subliminal run``: runs ``subliminal diagnose`` through the run's
    runner (reused when its fingerprint matches, as every stage) and returns its result for
    results.json (None in a dry pass, which only decides)."""
    ddir = out / "diagnose"
    inputs = [base, tdir / cfg.target, tdir / "none", files[cfg.target], files["none"],
              *[files[k] for k in ("div", "div-ratio") if k in files]]
    run("diagnose", pipeline_argv(cfg, ddir, base, tdir, files), ddir, inputs)
    if getattr(run, "dry", False):
        return None
    return read_json(ddir / OUT_JSON, "diagnose result")


# ======================================================================================== CLI


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diagnose", help="transfer diagnostics before any student: the teacher's lean, the base's "
                       "link, coverage",
                       description="Measure, before training students, whether a teacher's data can carry its "
                       "trait (lean: log-likelihood ratio biased vs control teacher at the students' loss "
                       "positions, nats/token), whether the student's base turns it into the preference (link: "
                       "first-order change of eval's exact P(target) after one optimiser step on the teacher's "
                       "rows minus the control's) and coverage (cosine of that update with the teacher's "
                       "weight displacement). Writes OUT/diagnose.json, diagnose.png/.csv and manifest.json.")
    p.add_argument("--divergence", nargs="+", default=[], metavar="DIV_JSONL",
                   help="find-divergence (or reflag-divergence) files of the teacher's rows: the first one's "
                   "stored log-probs give the lean when the control is among its counterfactuals, every one's "
                   "flags give a rule's share of the lean; teacher, data and control default to what its "
                   "manifest names")
    p.add_argument("--teacher", default=None, help="the biased teacher (default: the divergence file's factual one)")
    p.add_argument("--control", default=None, help="the control teacher: a directory, or a counterfactual's name "
                   "in the divergence file (default: its unbiased, method none, counterfactual)")
    p.add_argument("--data", default=None, help="the teacher's rows, as written by generate (default: the "
                   "divergence file's source data)")
    p.add_argument("--control-data", default=None, help="the control teacher's rows (the control's own lean; "
                   "needed by link and coverage)")
    p.add_argument("--base", default=None, help="the student's initial model (default: the teacher's base)")
    p.add_argument("--target", default=None, help="readout target (default: the teacher's bias)")
    p.add_argument("--category", default=None, help="readout candidates (default: the target's category)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--parts", default="lean,link,coverage", help="which diagnostics, comma-separated "
                   "(default %(default)s)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adam",
                   help="the student optimiser's first step the link and coverage assume: sgd (-lr*g) or adam "
                   "(AdamW's first step -lr*g/(|g|+eps), ~ -lr*sign(g); distill's students) (default %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="the step's learning rate (default %(default)s)")
    p.add_argument("--layers", default=None, help="the student trains only these blocks, e.g. 0 or 0,3")
    p.add_argument("--lora-rank", type=int, default=None, help="the student trains LoRA adapters of this rank")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    p.add_argument("--lora-targets", default=None, help="LoRA only on these projections, e.g. q_proj,v_proj")
    p.add_argument("--param-filter", default=None, metavar="REGEX",
                   help="narrow the trained parameters to those whose name matches this regular expression "
                   "(e.g. 'embed' for embeddings only)")
    p.add_argument("--params", default="all", metavar="SET",
                   help="the student's parameter set, as distill --params (e.g. template-rows: only the chat "
                   "template's embedding rows; default %(default)s)")
    p.add_argument("--max-rows", type=int, default=None, help="use the first N rows of each data file")
    p.add_argument("--max-questions", type=int, default=None, help="readout on the first N preference questions")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (default %(default)s)")
    p.add_argument("--validate", action="store_true", help="also take the step and read R with eval's code: "
                   "predicted vs actual change")
    add_seed(p)
    add_model_runtime(p)
    add_overwrite(p)
    p.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> int:
    cfg = DiagnoseConfig(**{f.name: getattr(args, f.name) for f in fields(DiagnoseConfig)})
    result = run(cfg)
    print(format_result(result))
    print(f"-> {Path(cfg.out) / OUT_JSON}")
    return 0


def finish_diagnose_only(cfg: Any, out: Path, diagnostics: dict[str, Any] | None, timings: dict[str, float],
                         wall: float) -> dict[str, Any]:
    """``subliminal run --diagnose-only``: results.json and REPORT.md with the diagnostics alone
    (the full run later rewrites both), and the run's manifest."""
    import json

    summary = {"target": cfg.target, "diagnose_only": True, "diagnostics": diagnostics, "timings_s": timings,
               "wall_time_s": wall}
    write_json_atomic(out / "results.json", summary, nan_as_null=True)
    lines = [f"# subliminal run report: {cfg.name} (diagnostics only)", "",
             f"Base: {cfg.base or 'the toy world (pretrained by the run)'}. Target: **{cfg.target}**; teachers by "
             f"`{cfg.teacher_method}`. Stopped after the diagnostics (`--diagnose-only`): no student was trained.", "",
             *report_section(diagnostics), "## Wall time per stage (s)", "", "| stage | seconds |", "|---|---|",
             *[f"| {k} | {v:.1f} |" for k, v in timings.items()], f"| total | {wall:.1f} |", "", "## Config", "",
             "```json", json.dumps(asdict(cfg), indent=2), "```", ""]
    write_text_atomic(out / "REPORT.md", "\n".join(lines))
    write_manifest(out, stage="run-diagnose-only", config=cfg, seed=cfg.base_seed, wall_time_s=wall,
                   extra={"timings_s": timings})
    return summary
