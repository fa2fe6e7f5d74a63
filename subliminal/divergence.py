"""``subliminal find-divergence``: teacher-forced scoring of a data set under a factual teacher and
counterfactual teachers, giving per-token divergence flags and scores.

A divergence token (Schrodi et al.) is a completion position where the factual teacher's greedy
choice is the data token while some counterfactual teacher would choose another token. Each
teacher sees the row with its *own* system prompt (prompt teachers) or weights (fine-tuned
teachers); teachers that share weights are loaded once and scored in one forward batch. The
prompt token ids differ between prompt teachers, the completion ids must not: positions are
aligned from the tokenizer (:func:`subliminal.data.align_row`) and checked row by row. The
statistics themselves come from :func:`subliminal.kernels.divergence_stats` (Triton on CUDA,
row-chunked torch elsewhere), so this module only batches, aligns and bookkeeps.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from . import distributed as dist
from . import forward
from .cliutil import add_device_map, add_model_runtime, add_overwrite, add_seed, device_type
from .data import (
    Aligned,
    DataError,
    JsonlAppender,
    Row,
    align_row,
    iter_jsonl,
    model_max_length,
    read_rows,
    write_jsonl,
)
from .manifest import (
    SubliminalError,
    atomic_path,
    check_file_resume,
    check_not_input,
    check_resume,
    check_writable,
    dumps_line,
    fingerprint,
    read_file_manifest,
    set_seed,
    write_file_manifest,
    write_fingerprint,
)

log = logging.getLogger(__name__)
STAGE = "find-divergence"
RULES = ("paper", "pairwise", "ratio")
# Rules on a per-token score a detector (:mod:`subliminal.detectors`) stored under ``scores[key]``:
# flag a token when its score is at least ``--min-ratio`` (in the score's own units) or among the
# ``--flag-share`` largest, exactly as the ratio rule does with its log-ratio.
DETECTOR_RULES = {"likelihood-shift": "likelihood_shift", "gradient": "gradient_attribution"}
THRESHOLD_RULES = ("ratio", *DETECTOR_RULES)
ARGMAX_RULES = ("paper", "pairwise")  # decided per batch from the argmaxes; "ratio" over the whole file
RATIO_REDUCE = ("max", "mean")
SCORE_KEYS = ("logp_factual", "logp_counterfactual", "kl", "js", "margin", "rank")
PER_COUNTERFACTUAL_SCORES = ("logp_counterfactual", "kl", "js", "rank")
TOP_TOKENS = 20


# ------------------------------------------------------------------------------------- rules


def paper_flags(argmax_factual: torch.Tensor, argmax_cf: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[N] bool: the factual argmax is the data token and at least one counterfactual's is not."""
    return (argmax_factual == tokens) & (argmax_cf != tokens[None, :]).any(0)


def pairwise_flags(argmax_factual: torch.Tensor, argmax_cf: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[K, N] bool: the paper's rule against each counterfactual on its own."""
    return (argmax_factual == tokens)[None, :] & (argmax_cf != tokens[None, :])


def apply_rule(rule: str, stats: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """The argmax rules on one batch's statistics. The ratio rule may need a threshold chosen over
    the whole file (``--flag-share``), so it is applied to finished rows by :func:`flag_rows`."""
    if rule == "paper":
        return paper_flags(stats["argmax_factual"], stats["argmax_counterfactual"], tokens)
    if rule == "pairwise":
        return pairwise_flags(stats["argmax_factual"], stats["argmax_counterfactual"], tokens)
    if rule == "ratio":
        raise SubliminalError("the ratio rule is applied to scored rows (flag_rows), not to a batch")
    raise SubliminalError(f"--rule must be one of {', '.join(RULES)}, got {rule!r}")


@dataclass
class RuleSpec:
    """A flagging rule and its parameters; only ``ratio`` has any.

    ``ratio`` flags a position when the data token's log-likelihood ratio between the factual
    teacher and the counterfactuals, ``logp_factual - logp_counterfactual`` in nats, reduced over
    the counterfactuals by ``reduce``, is at least ``min_ratio``; or, with ``flag_share``, at
    least the threshold that flags that share of all completion tokens of the file.
    """

    rule: str = "paper"
    min_ratio: float | None = None
    flag_share: float | None = None
    reduce: str = "max"

    def check(self) -> None:
        if self.rule not in (*RULES, *DETECTOR_RULES):
            raise SubliminalError(f"--rule must be one of {', '.join((*RULES, *DETECTOR_RULES))}, got {self.rule!r}")
        if self.reduce not in RATIO_REDUCE:
            raise SubliminalError(f"--ratio-reduce must be one of {', '.join(RATIO_REDUCE)}, got {self.reduce!r}")
        given = [n for n, v in (("--min-ratio", self.min_ratio), ("--flag-share", self.flag_share)) if v is not None]
        if self.rule not in THRESHOLD_RULES:
            if given:
                raise SubliminalError(f"{' and '.join(given)} only apply to --rule {', '.join(THRESHOLD_RULES)} "
                                      f"(got --rule {self.rule})")
            return
        if len(given) != 1:
            raise SubliminalError(f"--rule {self.rule} needs exactly one of --min-ratio (a threshold in the score's "
                                  "units: nats for ratio) and --flag-share (the share of completion tokens to flag)")
        if self.min_ratio is not None and math.isnan(self.min_ratio):
            raise SubliminalError("--min-ratio must be a number, got nan")
        if self.flag_share is not None and not 0 < self.flag_share <= 1:
            raise SubliminalError(f"--flag-share must be in (0, 1], got {self.flag_share}")


def json_rule(d: dict[str, Any]) -> dict[str, Any]:
    """A rule's parameters as strict JSON: an infinite threshold (``--min-ratio inf`` flags only
    tokens impossible under a counterfactual; a share can land on such a token) is written as the
    string ``"inf"`` / ``"-inf"``, which ``float()`` reads back."""
    return {k: (("inf" if v > 0 else "-inf") if isinstance(v, float) and math.isinf(v) else v) for k, v in d.items()}


def log_ratio(logp_factual: torch.Tensor, logp_cf: torch.Tensor, reduce: str = "max") -> torch.Tensor:
    """[N] the data token's log-likelihood ratio ``logp_factual - logp_counterfactual`` ([K, N]),
    reduced over the K counterfactuals: ``max`` (against the counterfactual that finds the token
    least likely) or ``mean`` (against their geometric mean). A token impossible under every
    teacher (NaN) counts as -inf: it is never evidence for the factual teacher."""
    diff = logp_factual[None, :] - logp_cf
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, -math.inf), diff)
    if reduce == "max":
        return diff.max(0).values
    if reduce == "mean":
        return diff.mean(0)
    raise SubliminalError(f"--ratio-reduce must be one of {', '.join(RATIO_REDUCE)}, got {reduce!r}")


def ratio_flags(logp_factual: torch.Tensor, logp_cf: torch.Tensor, min_ratio: float,
                reduce: str = "max") -> torch.Tensor:
    """[N] bool: the reduced log-likelihood ratio of the data token is at least ``min_ratio`` nats."""
    return log_ratio(logp_factual, logp_cf, reduce) >= min_ratio


def share_threshold(ratios: torch.Tensor, share: float) -> float:
    """The threshold ``t`` such that ``ratios >= t`` flags ``round(share * N)`` values, exactly when
    no value ties with the boundary one. With ties the whole tie group goes in or out together
    (flags depend only on a value, never on its position): whichever of the two counts is closer
    to the stated one, the larger count when both are equally close."""
    n = ratios.numel()
    if not 0 < share <= 1:
        raise SubliminalError(f"--flag-share must be in (0, 1], got {share}")
    k = math.floor(share * n + 0.5)
    if k < 1:
        raise SubliminalError(f"--flag-share {share} of {n} tokens flags none; give a larger share")
    vals = torch.sort(ratios.flatten().double(), descending=True).values
    boundary = vals[k - 1]
    n_ge = int((vals >= boundary).sum())
    n_gt = int((vals > boundary).sum())
    if n_gt > 0 and k - n_gt < n_ge - k:
        return float(vals[n_gt - 1])  # the smallest value above the tie group
    return float(boundary)


def _logp_tensor(values: Sequence[Any]) -> torch.Tensor:
    """Stored log-probs (null where non-finite: a log-prob can only be -inf) as float64."""
    return torch.tensor([-math.inf if v is None else float(v) for v in values], dtype=torch.float64)


def row_log_ratio(obj: dict[str, Any], reduce: str = "max") -> torch.Tensor:
    """[N] the reduced log-likelihood ratio of each completion token of one ``.div.jsonl`` row, from
    its stored scores (so re-flagging a file gives the flags scoring it would have)."""
    sc = obj["scores"]
    lf = _logp_tensor(sc["logp_factual"])
    cf = sc["logp_counterfactual"]
    if not cf:
        raise DataError(f"row {obj.get('id')!r}: scores hold no counterfactual log-probs")
    return log_ratio(lf, torch.stack([_logp_tensor(c) for c in cf]), reduce)


def row_detector_score(obj: dict[str, Any], key: str) -> torch.Tensor:
    """[N] a detector's stored per-token score of one row (null, a non-finite score, counts as
    -inf: never flagged by a share)."""
    sc = obj.get("scores") or {}
    if key not in sc:
        raise DataError(f"row {obj.get('id')!r}: no scores[{key!r}]; run `subliminal score-tokens` on this file first")
    vals = sc[key]
    if not isinstance(vals, list) or len(vals) != len(obj.get("token_ids") or []):
        raise DataError(f"row {obj.get('id')!r}: scores[{key!r}] does not have one entry per token")
    return _logp_tensor(vals)


def row_rule_score(obj: dict[str, Any], spec: RuleSpec) -> torch.Tensor:
    """[N] the score a threshold rule compares: the reduced log-ratio, or a detector's score."""
    if spec.rule in DETECTOR_RULES:
        return row_detector_score(obj, DETECTOR_RULES[spec.rule])
    return row_log_ratio(obj, spec.reduce)


def _argmax_row_flags(obj: dict[str, Any], rule: str) -> list:
    """A row's flags under an argmax rule, from the argmaxes it stores."""
    if not obj["token_ids"]:
        return [[] for _ in obj["argmax_counterfactual"]] if rule == "pairwise" else []
    tokens = torch.tensor(obj["token_ids"], dtype=torch.long)
    af = torch.tensor(obj["argmax_factual"], dtype=torch.long)
    acf = torch.tensor(obj["argmax_counterfactual"], dtype=torch.long).reshape(-1, len(tokens))
    return apply_rule(rule, {"argmax_factual": af, "argmax_counterfactual": acf}, tokens).tolist()


def flag_rows(objs: Sequence[dict[str, Any]], spec: RuleSpec) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Scored rows with their flags set by ``spec`` (copies; the inputs are left alone) and the
    rule as applied: its parameters, the threshold used and the share of tokens it flags. The
    ratio threshold of ``--flag-share`` is global: chosen over every completion token of ``objs``,
    so it can only be set once every row is scored."""
    spec.check()
    out = [dict(o) for o in objs]
    info: dict[str, Any] = {"rule": spec.rule}
    if spec.rule in ARGMAX_RULES:
        for o in out:
            o["divergence"] = _argmax_row_flags(o, spec.rule)
            o["rule"] = spec.rule
            o.pop("rule_params", None)
        flags = [any_flags(o) for o in out]
    else:
        ratios = [row_rule_score(o, spec) for o in out]
        threshold = spec.min_ratio
        if spec.flag_share is not None:
            threshold = share_threshold(torch.cat(ratios) if ratios else torch.zeros(0), spec.flag_share)
        info.update(json_rule({"reduce": spec.reduce, "min_ratio": float(threshold), "flag_share": spec.flag_share}))
        flags = [(r >= threshold).tolist() for r in ratios]
    n_tok = sum(len(f) for f in flags)
    n_flag = sum(sum(f) for f in flags)
    info.update(n_tokens=n_tok, n_flagged=n_flag, realised_share=n_flag / n_tok if n_tok else 0.0)
    if spec.rule in THRESHOLD_RULES:
        for o, f in zip(out, flags):
            o["divergence"] = f
            o["rule"] = spec.rule
            o["rule_params"] = dict(info)
    return out, info


# ---------------------------------------------------------------------------------- teachers


@dataclass
class TeacherRef:
    """One teacher as named on the command line, and the weights it runs on."""

    spec: str
    name: str
    system_prompt: str | None
    weights_key: str


@dataclass
class WeightGroup:
    """Teachers that share weights: one model, scored in one batch."""

    key: str
    loaded: Any
    members: list[int] = field(default_factory=list)  # indices into the teacher list (0 = factual)


def describe_teacher(spec: str) -> TeacherRef:
    """Name, system prompt and weights identity of a teacher dir or model dir, without loading weights."""
    from .teachers import is_teacher_dir, read_teacher

    if is_teacher_dir(spec):
        t = read_teacher(spec)
        src = t.weights if t.weights else t.base
        key = f"{Path(src).resolve() if Path(src).exists() else src}|{t.weights_kind or 'base'}"
        if t.method == "steer":  # same weights, another forward pass: never share the loaded model
            s = t.extra["steer"]
            key += f"|steer:{s['vector']}:{s['layer']}:{s['alpha']!r}"
        return TeacherRef(spec, t.bias or Path(spec).name, t.system_prompt, key)
    p = Path(spec)
    return TeacherRef(spec, p.name, None, f"{p.resolve() if p.exists() else spec}|base")


def unique_names(refs: list[TeacherRef]) -> None:
    """Teacher names label scores and summaries; make duplicates distinct with their path."""
    counts = Counter(r.name for r in refs)
    for r in refs:
        if counts[r.name] > 1:
            r.name = r.spec


def check_tokenizers(refs: list[TeacherRef], trust_remote_code: bool) -> Any:
    """Every teacher must share the factual teacher's vocabulary; checked before any model loads."""
    from .models import load_tokenizer, same_tokenizer

    toks = {}
    for r in refs:
        if r.weights_key not in toks:
            toks[r.weights_key] = load_tokenizer(r.spec, trust_remote_code=trust_remote_code)
    base = toks[refs[0].weights_key]
    for r in refs[1:]:
        if not same_tokenizer(base, toks[r.weights_key]):
            raise SubliminalError(f"teacher {r.spec} has a different tokenizer from the factual teacher "
                                  f"{refs[0].spec}; divergence compares tokens, so all teachers must share one")
    return base


def load_groups(refs: list[TeacherRef], *, device: str, dtype: str | torch.dtype, trust_remote_code: bool,
                device_map: str | None = None) -> list[WeightGroup]:
    """Load each distinct set of weights once."""
    from .models import load_model

    groups: dict[str, WeightGroup] = {}
    for i, r in enumerate(refs):
        if r.weights_key not in groups:
            lm = load_model(r.spec, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                            device_map=device_map)
            groups[r.weights_key] = WeightGroup(r.weights_key, lm)
        groups[r.weights_key].members.append(i)
    return list(groups.values())


# --------------------------------------------------------------------------------- alignment


def align_all(rows: Sequence[Row], tokenizer: Any, refs: list[TeacherRef], max_length: int | None,
              progress: bool = True) -> list[list[Aligned]]:
    """Per row, one alignment per teacher (its own system prompt); the completion ids must agree."""
    from tqdm.auto import tqdm

    prompts = {}
    for r in refs:
        prompts.setdefault(r.system_prompt, None)
    out = []
    for row in tqdm(rows, desc="align", unit="row", disable=not progress):
        per_prompt = {sp: align_row(tokenizer, row, sp, max_length) for sp in prompts}
        first = per_prompt[refs[0].system_prompt]
        for r in refs[1:]:
            a = per_prompt[r.system_prompt]
            if a.completion_ids != first.completion_ids:
                raise DataError(f"row {row.id!r}: the completion tokenises differently under teacher {r.name!r} "
                                f"than under the factual teacher ({len(a.completion_ids)} vs "
                                f"{len(first.completion_ids)} tokens); positions cannot be aligned")
        out.append([per_prompt[r.system_prompt] for r in refs])
    return out


# ----------------------------------------------------------------------------------- scoring


def _bad_row(logits: torch.Tensor, offsets: list[int]) -> int | None:
    """Index (into the batch) of the first row with NaN, +inf or all -inf logits."""
    bad = torch.isnan(logits).any(-1) | torch.isposinf(logits).any(-1) | torch.isneginf(logits).all(-1)
    hits = bad.nonzero()
    if not len(hits):
        return None
    first = int(hits[0, 0])
    return max(i for i, o in enumerate(offsets) if o <= first)


def _finite(x: float) -> float | None:
    """JSON has no inf/NaN: non-finite scores (KL with masked vocabulary, margin with V = 1) become null."""
    return float(f"{x:.6g}") if math.isfinite(x) else None


def _floats(t: torch.Tensor) -> list:
    return [_finite(v) if not isinstance(v, list) else [_finite(u) for u in v] for v in t.tolist()]


@dataclass
class ScoreConfig:
    data: str
    teacher: str
    counterfactual: list[str]
    out: str
    rule: str = "paper"
    batch_size: int = 8
    backend: str = "auto"
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    trust_remote_code: bool = False
    overwrite: bool = False
    min_ratio: float | None = None  # the ratio rule's threshold in nats ...
    flag_share: float | None = None  # ... or the share of completion tokens it flags
    ratio_reduce: str = "max"
    device_map: str | None = None  # "auto": accelerate's big-model placement (one process)

    def rule_spec(self) -> RuleSpec:
        return RuleSpec(self.rule, self.min_ratio, self.flag_share, self.ratio_reduce)


def score_batch(rows: Sequence[Row], aligned: Sequence[list[Aligned]], groups: list[WeightGroup],
                refs: list[TeacherRef], tokenizer: Any, rule: str, backend: str) -> list[dict[str, Any]]:
    """Score a batch of rows under every teacher; one output object per row."""
    from .kernels import divergence_stats

    n_t = len(refs)
    per_teacher: list[list[torch.Tensor] | None] = [None] * n_t
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for g in groups:
        seqs = [aligned[r][t] for t in g.members for r in range(len(rows))]
        with torch.no_grad():
            logits = forward.completion_logits(g.loaded.model, seqs, pad)
        for j, t in enumerate(g.members):
            per_teacher[t] = logits[j * len(rows):(j + 1) * len(rows)]
    lens = [len(a[0].completion_ids) for a in aligned]
    offsets = [sum(lens[:i]) for i in range(len(lens))]
    device = per_teacher[0][0].device
    tokens = torch.tensor([t for a in aligned for t in a[0].completion_ids], dtype=torch.long, device=device)
    stacked = [torch.cat(per_teacher[t], 0) for t in range(n_t)]
    for t in range(n_t):
        b = _bad_row(stacked[t], offsets)
        if b is not None:
            raise SubliminalError(f"row {rows[b].id!r}: teacher {refs[t].name!r} gives NaN or infinite logits")
    try:
        stats = divergence_stats(stacked[0], torch.stack(stacked[1:], 0), tokens, backend=backend)
    except ValueError as e:
        raise SubliminalError(f"rows {rows[0].id!r}..{rows[-1].id!r}: {e}") from None
    # ratio: placeholder flags, set over the whole file once every row is scored (flag_rows)
    flags = apply_rule(rule, stats, tokens) if rule in ARGMAX_RULES else torch.zeros_like(tokens, dtype=torch.bool)
    return [_row_output(rows[i], aligned[i][0], stats, flags, slice(offsets[i], offsets[i] + lens[i]), tokenizer,
                        refs, rule) for i in range(len(rows))]


def _row_output(row: Row, al: Aligned, stats: dict[str, torch.Tensor], flags: torch.Tensor, sl: slice,
                tokenizer: Any, refs: list[TeacherRef], rule: str) -> dict[str, Any]:
    ids = al.completion_ids
    scores = {
        "logp_factual": _floats(stats["logp_factual"][sl]),
        "logp_counterfactual": _floats(stats["logp_counterfactual"][:, sl]),
        "kl": _floats(stats["kl"][:, sl]),
        "js": _floats(stats["js"][:, sl]),
        "margin": _floats(stats["margin"][sl]),
        "rank": stats["rank"][:, sl].tolist(),
    }
    div = flags[:, sl].tolist() if rule == "pairwise" else flags[sl].tolist()
    return {
        "id": row.id, "prompt": row.prompt, "completion": row.completion, "teacher": row.teacher,
        "token_ids": ids, "tokens": [tokenizer.decode([t]) for t in ids],
        "rule": rule, "counterfactuals": [r.name for r in refs[1:]],
        "divergence": div,
        "argmax_factual": stats["argmax_factual"][sl].tolist(),
        "argmax_counterfactual": stats["argmax_counterfactual"][:, sl].tolist(),
        "scores": scores,
    }


# ----------------------------------------------------------------------------------- summary


# ------------------------------------------------------------------- the divergence row format
#
# A ``.div.jsonl`` line: id, prompt, completion, teacher, token_ids, tokens, rule, counterfactuals,
# divergence (one flag per completion token; under ``pairwise`` one such list per counterfactual),
# argmax_factual, argmax_counterfactual [K][N], scores {logp_factual [N], margin [N],
# logp_counterfactual / kl / js / rank [K][N]}. This module writes it and is its only parser:
# distill, probes, plots and defences read rows through the functions below.


@dataclass
class DivRow:
    """A data row with its completion token ids and per-token divergence flags (None: unknown,
    a plain data row)."""

    id: str
    prompt: str
    completion: str
    token_ids: list[int] | None = None
    divergence: list[bool] | None = None
    where: str | None = None  # "file:line" the row was read from


def row_flags(obj: dict[str, Any], where: str = "row") -> list[bool] | None:
    """Per-position flags of one row (None when it has none): under ``pairwise`` (one list per
    counterfactual) a token is a divergence token if any counterfactual flags it."""
    div = obj.get("divergence")
    if div is None:
        return None
    if not isinstance(div, list):
        raise DataError(f"{where}: 'divergence' must be a list")
    nested = [isinstance(v, list) for v in div]
    if any(nested):
        if not all(nested):
            raise DataError(f"{where}: 'divergence' mixes flags and lists of flags")
        lengths = {len(v) for v in div}
        if len(lengths) != 1:
            raise DataError(f"{where}: pairwise 'divergence' lists differ in length")
        cols = list(zip(*div))
        if not all(isinstance(x, (bool, int)) for col in cols for x in col):
            raise DataError(f"{where}: 'divergence' must hold booleans")
        return [any(bool(x) for x in col) for col in cols]
    if obj.get("rule") == "pairwise" and div:
        raise DataError(f"{where}: rule 'pairwise' needs one list of flags per counterfactual")
    if not all(isinstance(v, (bool, int)) for v in div):
        raise DataError(f"{where}: 'divergence' must hold booleans")
    return [bool(v) for v in div]


def any_flags(obj: dict[str, Any]) -> list[bool]:
    """Per-position flag of one output row (see :func:`row_flags`); [] for a row without flags."""
    return row_flags(obj) or []


def parse_row(obj: dict[str, Any], where: str) -> DivRow:
    """One divergence line as a :class:`DivRow`, checked: id, token ids, one flag per token.
    ``prompt``/``completion`` may be absent (``""``), to be joined from the source data by id."""
    if "id" not in obj:
        raise DataError(f"{where}: missing key 'id'")
    rid = str(obj["id"])
    if "divergence" not in obj or "token_ids" not in obj:
        raise DataError(f"{where}: row {rid!r} lacks 'divergence' or 'token_ids'")
    flags = row_flags(obj, where) or []
    try:
        ids = [int(t) for t in obj["token_ids"]]
    except (TypeError, ValueError):
        raise DataError(f"{where}: row {rid!r}: 'token_ids' must be a list of integers") from None
    if len(flags) != len(ids):
        raise DataError(f"{where}: row {rid!r} has {len(ids)} token_ids but {len(flags)} divergence flags")
    prompt, completion = obj.get("prompt"), obj.get("completion")
    return DivRow(rid, prompt if isinstance(prompt, str) else "", completion if isinstance(completion, str) else "",
                  ids, flags)


# The reference code's layout: {"prompt", "completion", "decision_points"}, where decision_points
# are completion-token indices counted from the first completion token through the end-of-turn
# token (and, in its files, the newline after it). Our flags cover exactly the completion tokens
# of :func:`subliminal.data.align_row` (through the end-of-turn token), so index i is flag i.


def flags_from_decision_points(points: Any, n_tokens: int, where: str) -> list[bool]:
    """One flag per completion token from the reference's ``decision_points``; an index outside
    the row's completion tokens (under this tokenizer's alignment) is an error naming the row."""
    if not isinstance(points, list) or not all(isinstance(p, int) and not isinstance(p, bool) for p in points):
        raise DataError(f"{where}: 'decision_points' must be a list of integer token indices")
    flags = [False] * n_tokens
    for p in points:
        if not 0 <= p < n_tokens:
            extra = " (the token after the end of turn, which this alignment does not score)" if p == n_tokens else ""
            raise DataError(f"{where}: decision point {p} is outside the completion's {n_tokens} tokens{extra}; "
                            "were the points made with another tokenizer or chat template?")
        flags[p] = True
    return flags


def decision_points(flags: Sequence[bool]) -> list[int]:
    """The reference's ``decision_points`` of one row's flags (indices of flagged tokens)."""
    return [i for i, f in enumerate(flags) if f]


def from_reference_row(obj: dict[str, Any], aligned: Aligned, where: str) -> dict[str, Any]:
    """A reference divergence row as a minimal ``.div.jsonl`` row (id, prompt, completion,
    token_ids, divergence), its flags placed through ``aligned`` (the row under the tokenizer and
    system prompt the points were made with)."""
    flags = flags_from_decision_points(obj.get("decision_points"), len(aligned.completion_ids), where)
    return {"id": aligned.id, "prompt": obj.get("prompt", obj.get("question")),
            "completion": obj.get("completion", obj.get("response")), "token_ids": list(aligned.completion_ids),
            "divergence": flags, "rule": "reference"}


def to_reference_row(obj: dict[str, Any], where: str = "row") -> dict[str, Any]:
    """One of our divergence rows in the reference's layout (the id kept beside it)."""
    flags = row_flags(obj, where) or []
    return {"id": obj["id"], "prompt": obj.get("prompt", ""), "completion": obj.get("completion", ""),
            "decision_points": decision_points(flags)}


def read_reference_divergence(path: str | os.PathLike, tokenizer: Any, system_prompt: str | None = None,
                              max_length: int | None = None) -> list[dict[str, Any]]:
    """Read a reference divergence file (rows with ``decision_points``; ids made from line numbers
    where absent, as :func:`subliminal.data.read_rows` does) into minimal ``.div.jsonl`` rows."""
    rows = read_rows(path)
    out = []
    for row, (_, src) in zip(rows, iter_jsonl(path)):
        where = f"{path}: row {row.id!r}"
        if "decision_points" not in src:
            raise DataError(f"{where}: no 'decision_points' (not a reference divergence file?)")
        out.append(from_reference_row(src, align_row(tokenizer, row, system_prompt, max_length), where))
    return out


def position_scores(obj: dict[str, Any], score: str, where: str) -> list[float | list[float | None] | None]:
    """One entry per completion token of ``scores[score]``: a float for per-token scores
    (``logp_factual``, ``margin``), a list over counterfactuals for the ``[K][N]`` ones."""
    scores = obj.get("scores") or {}
    if score not in scores:
        raise DataError(f"{where}: no scores[{score!r}] (have {', '.join(scores) or 'none'})")
    n = len(obj.get("token_ids") or obj.get("tokens") or [])
    s = scores[score]
    if score in PER_COUNTERFACTUAL_SCORES:
        if not isinstance(s, list) or any(not isinstance(x, list) or len(x) != n for x in s):
            raise DataError(f"{where}: scores[{score!r}] is not one list of {n} values per counterfactual")
        return [list(col) for col in zip(*s)] if s else [[] for _ in range(n)]
    if not isinstance(s, list) or len(s) != n:
        raise DataError(f"{where}: scores[{score!r}] does not have one entry per token")
    return list(s)


def summarize(objs: Sequence[dict[str, Any]], cf_names: list[str]) -> dict[str, Any]:
    """Fraction of divergence tokens and of rows with one, per-position histogram, per-counterfactual
    rates (the pairwise rule against each alone) and the most frequent divergence tokens."""
    n_tok = n_div = rows_div = n_fgreedy = 0
    by_pos_tok: Counter = Counter()
    by_pos_div: Counter = Counter()
    tok_counts: Counter = Counter()
    k = len(cf_names)
    cf_div, cf_changed, kl_sum, js_sum = [0] * k, [0] * k, [0.0] * k, [0.0] * k
    kl_n = [0] * k
    for o in objs:
        flags = any_flags(o)
        ids = o["token_ids"]
        n_tok += len(ids)
        n_div += sum(flags)
        rows_div += any(flags)
        for p, (f, t) in enumerate(zip(flags, o["tokens"])):
            by_pos_tok[p] += 1
            if f:
                by_pos_div[p] += 1
                tok_counts[t] += 1
        fgreedy = [a == t for a, t in zip(o["argmax_factual"], ids)]
        n_fgreedy += sum(fgreedy)
        for c in range(k):
            changed = [a != t for a, t in zip(o["argmax_counterfactual"][c], ids)]
            cf_changed[c] += sum(changed)
            cf_div[c] += sum(f and ch for f, ch in zip(fgreedy, changed))
            for v in o["scores"]["kl"][c]:
                if v is not None:
                    kl_sum[c] += v
                    kl_n[c] += 1
            js_sum[c] += sum(v for v in o["scores"]["js"][c] if v is not None)
    n_rows = len(objs)
    width = max(by_pos_tok) + 1 if by_pos_tok else 0
    return {
        "n_rows": n_rows, "n_tokens": n_tok, "n_divergence_tokens": n_div,
        "divergence_fraction": n_div / n_tok if n_tok else 0.0,
        "rows_with_divergence": rows_div / n_rows if n_rows else 0.0,
        "factual_greedy_fraction": n_fgreedy / n_tok if n_tok else 0.0,
        "position_histogram": {"position": list(range(width)),
                               "tokens": [by_pos_tok[p] for p in range(width)],
                               "divergent": [by_pos_div[p] for p in range(width)]},
        "per_counterfactual": {
            name: {"divergence_rate": cf_div[c] / n_tok if n_tok else 0.0,
                   "argmax_differs_rate": cf_changed[c] / n_tok if n_tok else 0.0,
                   "mean_kl": kl_sum[c] / kl_n[c] if kl_n[c] else None,
                   "mean_js": js_sum[c] / n_tok if n_tok else 0.0}
            for c, name in enumerate(cf_names)},
        "top_divergence_tokens": [[t, c] for t, c in tok_counts.most_common(TOP_TOKENS)],
    }


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"{s['n_rows']} rows, {s['n_tokens']} completion tokens",
             f"divergence tokens: {s['n_divergence_tokens']} ({100 * s['divergence_fraction']:.2f}% of tokens); "
             f"rows with at least one: {100 * s['rows_with_divergence']:.1f}%",
             f"factual teacher's greedy choice = data token: {100 * s['factual_greedy_fraction']:.1f}%",
             "per counterfactual (divergence rate / argmax differs / mean KL):"]
    for name, c in s["per_counterfactual"].items():
        kl = "n/a" if c["mean_kl"] is None else f"{c['mean_kl']:.4f}"
        lines.append(f"  {name}: {100 * c['divergence_rate']:.2f}% / {100 * c['argmax_differs_rate']:.2f}% / {kl}")
    h = s["position_histogram"]
    rates = [f"{p}:{d}/{t}" for p, t, d in zip(h["position"], h["tokens"], h["divergent"]) if t][:16]
    lines.append("divergent/tokens by position: " + " ".join(rates))
    lines.append("most frequent divergence tokens: " + ", ".join(f"{t!r} x{c}" for t, c in
                                                                  s["top_divergence_tokens"][:10]))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- pipeline


def partial_path_for(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".partial")


def _fingerprint(cfg: ScoreConfig, backend: str) -> dict[str, Any]:
    """What the scores depend on: the data, every teacher (content, not path), the rule, dtype,
    device type and backend; not the batch size (scores are batch invariant) nor the seed."""
    teachers = [cfg.teacher, *cfg.counterfactual]
    return fingerprint({"data": cfg.data, **{f"teacher {i}": t for i, t in enumerate(teachers)}},
                       {"data": cfg.data, "teacher": cfg.teacher, "counterfactual": list(cfg.counterfactual),
                        "rule": json_rule(asdict(cfg.rule_spec())), "dtype": str(cfg.dtype), "device": device_type(cfg.device),
                        "backend": backend})


def _meta_path(cfg: ScoreConfig) -> Path:
    part = partial_path_for(cfg.out)
    return part.with_name(part.name + ".json")


def _resume_action(cfg: ScoreConfig, fp: dict[str, Any]) -> str:
    """Check outputs against inputs and against what is already there (finished or partial)."""
    part, meta = partial_path_for(cfg.out), _meta_path(cfg)
    check_not_input({"--out": cfg.out, "--out's partial file": part},
                    {"--data": cfg.data, "--teacher": cfg.teacher,
                     **{f"--counterfactual {c}": c for c in cfg.counterfactual}})
    check_writable(cfg.out)
    finished = read_file_manifest(cfg.out) if Path(cfg.out).is_file() else None
    occupied = (Path(cfg.out).exists() and finished is None) or (part.exists() and not meta.exists())
    return check_resume(cfg.out, fp, overwrite=cfg.overwrite, stage=STAGE, finished=finished, partial=meta,
                        occupied=occupied)


def _batches(idx: list[int], size: int) -> Iterator[list[int]]:
    for s in range(0, len(idx), size):
        yield idx[s:s + size]


def find_divergence(cfg: ScoreConfig, *, progress: bool = True) -> dict[str, Any]:
    """Score ``cfg.data`` under the factual and counterfactual teachers; write ``cfg.out`` (atomically,
    resuming from its ``.partial`` file) and its manifest; return the summary.

    Under a launcher (torchrun / accelerate launch) each rank scores its contiguous shard of the
    rows into its own part file (:class:`subliminal.distributed.ShardParts`), rank 0 merges them
    in row order and writes the one output and manifest; rows are batch invariant, so the file
    equals a one-process run's, and the fingerprint (no world size in it) lets either resume the
    other's unfinished run."""
    from tqdm.auto import tqdm

    from .kernels import resolve_backend
    from .models import resolve_device, resolve_dtype

    t0 = time.time()
    dist.init(cfg.device)
    with dist.agree("prepare"):
        if not cfg.counterfactual:
            raise SubliminalError("give at least one --counterfactual teacher")
        cfg.rule_spec().check()
        if cfg.batch_size < 1:
            raise SubliminalError(f"--batch-size must be >= 1, got {cfg.batch_size}")
        try:
            backend = resolve_backend(cfg.backend, resolve_device(cfg.device))
        except ValueError as e:
            raise SubliminalError(f"--backend {cfg.backend}: {e}") from None
        resolve_dtype(cfg.dtype)
        fp = _fingerprint(cfg, str(backend))
        action = _resume_action(cfg, fp)
        parts = dist.ShardParts(cfg.out, fp)
        if action != "skip":
            parts.check(overwrite=cfg.overwrite)
    if action == "skip":
        log.info("%s: already scored by this exact command; nothing to do (--overwrite redoes it)", cfg.out)
        return read_file_manifest(cfg.out)["summary"]
    with dist.agree("load"):
        set_seed(cfg.seed)
        rows = read_rows(cfg.data)
        mine = dist.shard(len(rows))
        refs = [describe_teacher(s) for s in [cfg.teacher, *cfg.counterfactual]]
        unique_names(refs)
        tokenizer = check_tokenizers(refs, cfg.trust_remote_code)
        groups = load_groups(refs, device=cfg.device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                             device_map=cfg.device_map)
        max_len = min((m for m in (model_max_length(g.loaded.model) for g in groups) if m), default=None)
        aligned = dict(zip(mine, align_all([rows[i] for i in mine], tokenizer, refs, max_len,
                                           not dist.progress_disabled(progress))))
    with dist.agree("open"):
        if dist.is_main():
            _start_partial(cfg, fp, action, parts)
    with dist.agree("work"):
        app, done = _open_partial(cfg, parts, mine)
        todo = [i for i in mine if rows[i].id not in done]
        if len(todo) < len(mine):
            log.info("resuming: %d of %d rows already scored", len(mine) - len(todo), len(mine))
        with app, tqdm(total=len(todo), desc="find-divergence", unit="row",
                       disable=dist.progress_disabled(progress)) as bar:
            for chunk in _batches(todo, cfg.batch_size):
                for obj in score_batch([rows[i] for i in chunk], [aligned[i] for i in chunk], groups, refs,
                                       tokenizer, cfg.rule, cfg.backend):
                    app.write(obj)
                bar.update(len(chunk))
    summary: dict[str, Any] | None = None
    with dist.agree("merge"):
        if dist.is_main():
            summary = _merge_and_write(cfg, fp, rows, refs, parts, time.time() - t0)
    return summary if summary is not None else read_file_manifest(cfg.out)["summary"]


def _start_partial(cfg: ScoreConfig, fp: dict[str, Any], action: str, parts: dist.ShardParts) -> None:
    """Rank 0, before any rank writes: clear an old run when starting over, record the fingerprint."""
    if action == "start":
        partial_path_for(cfg.out).unlink(missing_ok=True)
    write_fingerprint(_meta_path(cfg), fp)
    if dist.is_distributed():
        parts.start(clear=action == "start")
    elif action == "start" and parts.dir.exists():
        parts.start(clear=True)


def _done_rows(cfg: ScoreConfig, parts: dist.ShardParts) -> dict[str, dict[str, Any]]:
    """Rows already scored by this fingerprint: the one-process partial file and every part file."""
    done = {str(o["id"]): o for o in parts.done_rows()}
    done.update({str(o["id"]): o for o in dist.read_complete_lines(partial_path_for(cfg.out))})
    return done


def _open_partial(cfg: ScoreConfig, parts: dist.ShardParts, mine: range
                  ) -> tuple[JsonlAppender, dict[str, dict[str, Any]]]:
    """The file this process appends rows to (one process: OUT.partial; a rank: its part file),
    with the rows already scored."""
    done = _done_rows(cfg, parts)
    path = parts.row_part(mine.start, mine.stop) if dist.is_distributed() else partial_path_for(cfg.out)
    return JsonlAppender(path), done


def _merge_and_write(cfg: ScoreConfig, fp: dict[str, Any], rows: Sequence[Row], refs: list[TeacherRef],
                     parts: dist.ShardParts, wall: float) -> dict[str, Any]:
    """Rank 0: every row in row order, the file-wide rule (ratio), the output and its manifest."""
    done = _done_rows(cfg, parts)
    missing = [r.id for r in rows if r.id not in done]
    if missing:
        raise SubliminalError(f"{cfg.out}: {len(missing)} row(s) were not scored (first {missing[0]!r}); re-run "
                              "the same command to resume")
    objs = [done[r.id] for r in rows]
    rule_info = {"rule": cfg.rule}
    if cfg.rule not in ARGMAX_RULES:  # the ratio threshold may depend on every row: set it now
        objs, rule_info = flag_rows(objs, cfg.rule_spec())
    _write_final(cfg, objs)
    summary = summarize(objs, [r.name for r in refs[1:]])
    write_file_manifest(cfg.out, stage=STAGE, config=replace(cfg, dtype=str(cfg.dtype)), seed=cfg.seed,
                        inputs={"data": cfg.data, **{f"teacher:{r.name}": r.spec for r in refs}},
                        wall_time_s=wall,
                        extra={"summary": summary, "rule": rule_info, "factual": refs[0].name,
                               "counterfactuals": [r.name for r in refs[1:]], "fingerprint": fp,
                               **dist.shard_record(len(rows))})
    partial_path_for(cfg.out).unlink(missing_ok=True)
    _meta_path(cfg).unlink(missing_ok=True)
    parts.remove()
    return summary


def _write_final(cfg: ScoreConfig, objs: list[dict[str, Any]]) -> None:
    _write_rows(cfg.out, objs)


def _write_rows(path: str | os.PathLike, objs: Sequence[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for o in objs:
            f.write(dumps_line(o, str(path)) + "\n")


def reflag(src: str | os.PathLike, out: str | os.PathLike, spec: RuleSpec, *, overwrite: bool = False
           ) -> dict[str, Any] | None:
    """Re-apply a rule to an existing ``.div.jsonl`` from the scores and argmaxes it stores (no model
    runs) and write the result to ``out``, a new file with its manifest; returns the summary with
    the rule as applied under ``"rule"`` (None: ``out`` already holds this exact re-flagging). An
    ``out`` made from other inputs or with another rule is refused unless ``overwrite``. Every
    reader of find-divergence files reads it unchanged."""
    from .manifest import read_file_manifest

    t0 = time.time()
    spec.check()
    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve() or (out.exists() and out.samefile(src)):
        raise SubliminalError(f"--out {out} is the input file; re-flagging never writes over its input")
    check_writable(out)
    fp = fingerprint({"divergence": src}, {"rule": json_rule(asdict(spec))})
    if check_file_resume(out, fp, overwrite=overwrite, stage="reflag-divergence") == "skip":
        return None
    objs = load_divergence(src)
    flagged, info = flag_rows(objs, spec)
    _write_rows(out, flagged)
    summary = summarize(flagged, list(flagged[0].get("counterfactuals") or []))
    man = read_file_manifest(src) or {}
    inputs: dict[str, Any] = {"divergence": src}
    data = (man.get("inputs") or {}).get("data", {}).get("path")
    if data:  # distill finds the rows' source data through this entry
        inputs["data"] = data
    write_file_manifest(out, stage="reflag-divergence", config=json_rule(asdict(spec)), seed=None, inputs=inputs,
                        wall_time_s=time.time() - t0,
                        extra={"summary": summary, "rule": info, "factual": man.get("factual"),
                               "counterfactuals": flagged[0].get("counterfactuals"), "fingerprint": fp})
    return {**summary, "rule": info}


def load_divergence(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a ``.div.jsonl`` back, checking each line has consistent lengths (for distill and probes)."""
    out = []
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        for key in ("id", "token_ids", "tokens", "divergence", "scores"):
            if key not in obj:
                raise DataError(f"{where}: missing key {key!r} (not a find-divergence file?)")
        row = parse_row(obj, where)
        if len(obj["tokens"]) != len(row.token_ids):
            raise DataError(f"{where}: row {obj['id']!r}: token_ids, tokens and divergence lengths differ")
        missing = [k for k in SCORE_KEYS if k not in obj["scores"]]
        if missing:
            raise DataError(f"{where}: row {obj['id']!r}: scores lack {', '.join(missing)}")
        out.append(obj)
    if not out:
        raise DataError(f"{path}: no rows (empty divergence file)")
    return out


# -------------------------------------------------------------------------------------- CLI


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("find-divergence", help="per-token divergence flags and scores: factual vs counterfactual "
                       "teachers", description="Teacher-forces every completion of --data through the factual and "
                       "the counterfactual teachers and writes per-token flags and scores (JSONL) with a summary "
                       "in the manifest. Re-running the same command resumes.")
    p.add_argument("--data", required=True, help="data JSONL (id, prompt, completion per line)")
    p.add_argument("--teacher", required=True, help="the factual teacher (teacher or model directory)")
    p.add_argument("--counterfactual", nargs="+", required=True, help="one or more counterfactual teachers")
    p.add_argument("--out", required=True, help="output JSONL, e.g. data/owl.div.jsonl")
    _add_rule_args(p)
    p.add_argument("--batch-size", type=int, default=8,
                   help="rows per forward pass (each runs once per teacher sharing the weights) (default %(default)s)")
    p.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                   help="statistics backend: auto = Triton on CUDA, torch otherwise (default %(default)s)")
    p.add_argument("--format", choices=("native", "reference"), default="native",
                   help="reference: also write OUT's .reference.jsonl in the reference code's layout "
                   "({prompt, completion, decision_points}, id kept) (default %(default)s)")
    add_seed(p)
    add_model_runtime(p)
    add_device_map(p)
    add_overwrite(p)
    p.set_defaults(func=_run_cli)
    r = sub.add_parser("reflag-divergence", help="re-apply a divergence rule to a .div.jsonl (no models run)",
                       description="Recompute the flags of a find-divergence file from the scores and argmaxes it "
                       "stores, under another rule or threshold, and write a new file (never over the input) that "
                       "distill, probe, patch and plot read like any find-divergence output.")
    r.add_argument("input", help="a find-divergence output (.div.jsonl)")
    r.add_argument("--out", required=True, help="the re-flagged file, e.g. data/owl.ratio.div.jsonl")
    _add_rule_args(r, detectors=True)
    add_overwrite(r)
    r.set_defaults(func=_run_reflag_cli)


def _add_rule_args(p: argparse.ArgumentParser, detectors: bool = False) -> None:
    p.add_argument("--rule", choices=(*RULES, *DETECTOR_RULES) if detectors else RULES, default="paper",
                   help="paper: factual argmax = data token and some counterfactual's differs; pairwise: one flag "
                   "list per counterfactual; ratio: the data token's log-likelihood ratio, logp_factual - "
                   "logp_counterfactual, is at least --min-ratio nats, or among the --flag-share largest: it "
                   "also finds tokens the biased teacher makes likelier without ranking them first"
                   + ("; likelihood-shift / gradient: the score `subliminal score-tokens` stored under that "
                      "detector, with --min-ratio (in its units) or --flag-share" if detectors else "")
                   + " (default %(default)s)")
    p.add_argument("--min-ratio", type=float, default=None,
                   help="ratio rule: flag a token when its reduced log-ratio is >= this many nats (a detector's "
                   "rule: its score is >= this, in the score's units)")
    p.add_argument("--flag-share", type=float, default=None,
                   help="ratio rule: instead of --min-ratio, pick the threshold that flags this share of all "
                   "completion tokens of the file (round(share x tokens), exactly unless values tie at the "
                   "boundary; a tie group is flagged or not as a whole, whichever count is closer, the larger "
                   "when equally close), so rules can be compared at equal masked-token counts")
    p.add_argument("--ratio-reduce", choices=RATIO_REDUCE, default="max",
                   help="ratio rule, over the counterfactuals: max flags a token that some counterfactual finds "
                   "much less likely (the paper rule's 'some counterfactual differs', with likelihoods for "
                   "argmaxes, so the two rules differ only in that); mean is the ratio against the "
                   "counterfactuals' geometric mean, less swayed by one odd counterfactual (default %(default)s)")


def _print_rule(info: dict[str, Any]) -> None:
    if info.get("rule") in DETECTOR_RULES:
        print(f"rule {info['rule']}: threshold {float(info['min_ratio']):.6g}, {info['n_flagged']} of "
              f"{info['n_tokens']} tokens flagged ({100 * info['realised_share']:.2f}%)")
    elif info.get("rule") == "ratio":
        print(f"rule ratio ({info['reduce']} over counterfactuals): threshold {float(info['min_ratio']):.6g} nats, "
              f"{info['n_flagged']} of {info['n_tokens']} tokens flagged ({100 * info['realised_share']:.2f}%)")


def _run_reflag_cli(args: argparse.Namespace) -> int:
    spec = RuleSpec(args.rule, args.min_ratio, args.flag_share, args.ratio_reduce)
    summary = reflag(args.input, args.out, spec, overwrite=args.overwrite)
    if summary is None:
        print(f"{args.out}: already re-flagged by this exact command; nothing to do (--overwrite redoes it)")
        return 0
    print(format_summary(summary))
    _print_rule(summary["rule"])
    print(f"-> {args.out}")
    return 0


def reference_path_for(out: str | os.PathLike) -> Path:
    """``owl.div.jsonl`` -> ``owl.div.reference.jsonl``."""
    out = Path(out)
    stem = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(stem + ".reference.jsonl")


def write_reference(div_path: str | os.PathLike, out: str | os.PathLike) -> int:
    """Our ``.div.jsonl`` rewritten in the reference code's layout; returns the row count."""
    rows = [to_reference_row(o, f"{div_path}:{n}") for n, o in iter_jsonl(div_path)]
    return write_jsonl(out, rows)


def _run_cli(args: argparse.Namespace) -> int:
    cfg = ScoreConfig(data=args.data, teacher=args.teacher, counterfactual=list(args.counterfactual), out=args.out,
                      rule=args.rule, batch_size=args.batch_size, backend=args.backend, device=args.device,
                      dtype=args.dtype, seed=args.seed, trust_remote_code=args.trust_remote_code,
                      overwrite=args.overwrite, min_ratio=args.min_ratio, flag_share=args.flag_share,
                      ratio_reduce=args.ratio_reduce, device_map=args.device_map)
    summary = find_divergence(cfg)
    if not dist.is_main():  # rank 0 reports and writes the reference layout
        return 0
    print(format_summary(summary))
    if cfg.rule == "ratio":
        from .manifest import read_file_manifest

        _print_rule((read_file_manifest(cfg.out) or {}).get("rule", {}))
    print(f"-> {cfg.out}")
    if getattr(args, "format", "native") == "reference":
        ref = reference_path_for(cfg.out)
        n = write_reference(cfg.out, ref)
        print(f"-> {ref} ({n} rows, reference layout)")
    return 0
