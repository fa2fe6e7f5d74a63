"""``subliminal score-tokens``: per-token detectors of the tokens that carry a trait, written as one
more score into the ``.div.jsonl`` row so ``reflag-divergence --rule NAME --flag-share S`` flags
their top share and every later stage (distill's masks and interventions, probes) reads them.

Two detectors beside the divergence rules (paper, ratio) that find-divergence has:

- ``likelihood-shift``: log p_student(x_t) - log p_base(x_t), the data token under a student
  trained on the data (any distill student) against its base. It needs no counterfactual
  teacher: the tokens the training moved most are the candidates.
- ``gradient``: a_t = -grad(loss_t) . grad(R), R the exact preference readout ``eval`` reports
  (:func:`subliminal.diagnose.readout_gradient`), over the parameters the student trains
  (every weight, ``--layers``, LoRA, ``--params``). To first order one SGD step of size lr on
  token t's loss alone changes R by lr * a_t, so a large a_t is a token whose label pushes the
  student towards the trait. There is no backward per token: one backward for grad(R), then
  every token's directional derivative d loss_t / d theta . grad(R) at once by forward-mode AD
  (``torch.func.jvp`` through the student's own forward, :func:`subliminal.distill.hard_token_losses`)
  or, with ``--method central``, a central difference of two forwards along grad(R).
  Attention runs on torch's math SDPA kernel inside the jvp (the fused CPU/CUDA kernels have no
  forward-mode formula).

Positions are exactly those ``distill --mode hard`` trains on: every completion token of the row
as the student sees it (no system prompt), its loss read from the logits at sequence position
p-1 (one helper, :func:`subliminal.distill._position_logits`, indexes both). Scores are per row,
so a row's scores do not depend on the batch it ran in (up to float rounding: the rows padded
with it change the last bits of a forward, and a gradient score is a sum over parameters).

Under ``torchrun --nproc-per-node N`` every rank scores its shard of the rows and rank 0 writes
the one file. The shards are made of whole batches, the batches one process makes
(:func:`subliminal.distributed.batch_shard`), every rank computes grad(R) whole (the same
questions in the same chunks as one process), so each row is scored in exactly the forward one process scores
it in: the file is bit-identical whatever the number of processes (on one kind of device, at one
thread count). Sharding the readout's questions and summing grad(R) over ranks would save each
rank part of that backward but change its summation order, i.e. the scores' last bits.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from .cliutil import add_model_runtime, add_overwrite, add_seed, device_type
from .manifest import (
    SubliminalError,
    check_file_resume,
    check_not_input,
    check_writable,
    fingerprint,
    read_file_manifest,
    read_manifest,
    set_seed,
    write_file_manifest,
)

log = logging.getLogger(__name__)
STAGE = "score-tokens"
DETECTORS = ("likelihood-shift", "gradient")
METHODS = ("jvp", "central")
DEFAULT_EPS = 1e-2  # float32 on the toy base: 4e-4 of the largest score at 1e-2, 3e-3 at 1e-3


class DetectorError(SubliminalError):
    """A detector cannot run on these inputs (a missing student, target or readout)."""


# ================================================================================= the scores


def _batches(n: int, size: int) -> list[range]:
    return [range(s, min(s + size, n)) for s in range(0, n, size)]


def _split(flat: torch.Tensor, lengths: Sequence[int]) -> list[torch.Tensor]:
    return list(torch.split(flat, list(lengths)))


@torch.no_grad()
def likelihood_shift(student: Any, base: Any, examples: Sequence[Any], pad_id: int, batch_size: int = 8
                     ) -> list[torch.Tensor]:
    """Per row [n] log p_student(x_t) - log p_base(x_t) (float32) at every completion token, from
    :func:`subliminal.forward.completion_scores` (the same logits and positions as every stage)."""
    from . import forward

    s = forward.completion_scores(student, examples, pad_id, batch_size)
    b = forward.completion_scores(base, examples, pad_id, batch_size)
    return [ls - lb for (ls, _), (lb, _) in zip(s, b)]


class _Bound:
    """``model`` called with some of its parameters replaced (``torch.func.functional_call``), in
    the shape :mod:`subliminal.forward` calls a model: so the jvp runs the training forward."""

    def __init__(self, model: Any, values: dict[str, torch.Tensor]):
        self.model, self.values = model, values

    def parameters(self) -> Any:
        return self.model.parameters()

    def __call__(self, **kwargs: Any) -> Any:
        return torch.func.functional_call(self.model, self.values, (), kwargs, strict=False)


def _math_attention() -> Any:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def _examples_all(examples: Sequence[Any]) -> list[Any]:
    """The rows with every completion token in the loss (the detectors score all of them)."""
    from dataclasses import replace

    return [replace(e, mask=[True] * len(e.completion_ids)) for e in examples]


def gradient_attribution(model: Any, params: Sequence[tuple[str, torch.nn.Parameter]],
                         direction: Sequence[torch.Tensor], examples: Sequence[Any], pad_id: int, *,
                         batch_size: int = 8, method: str = "jvp", eps: float = DEFAULT_EPS,
                         progress: bool = False) -> list[torch.Tensor]:
    """Per row [n] a_t = -grad(loss_t) . direction over ``params`` at every completion token, where
    loss_t is the token's cross-entropy in the hard loss (:func:`subliminal.distill.hard_token_losses`).

    ``jvp``: forward-mode AD, one forward (with tangents) per batch, exact up to float rounding.
    ``central``: (L(theta + h d) - L(theta - h d)) / 2h with h = eps / |d|, two plain forwards per
    batch; its truncation error is O(h^2) and its rounding error O(ulp(loss) / h)."""
    from tqdm.auto import tqdm

    from .distill import hard_token_losses

    if method not in METHODS:
        raise DetectorError(f"--method {method!r}: one of {', '.join(METHODS)}")
    examples = _examples_all(examples)
    names = [n for n, _ in params]
    primals = tuple(p.detach() for _, p in params)
    tangents = tuple(d.to(device=p.device, dtype=p.dtype) for d, p in zip(direction, primals))
    norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in tangents))
    out: list[torch.Tensor] = []
    for br in tqdm(_batches(len(examples), batch_size), desc="gradient attribution", unit="batch",
                   disable=not progress):
        batch = [examples[i] for i in br]
        lengths = [len(e.completion_ids) for e in batch]
        if norm == 0.0:
            out.extend(torch.zeros(n, dtype=torch.float64) for n in lengths)
            continue

        def losses(*vals: torch.Tensor, batch: list[Any] = batch) -> torch.Tensor:
            return hard_token_losses(_Bound(model, dict(zip(names, vals))), batch, pad_id)

        with _math_attention():
            if method == "jvp":
                _, d = torch.func.jvp(losses, primals, tangents)
            else:
                h = eps / norm
                with torch.no_grad():
                    plus = losses(*(p + h * t for p, t in zip(primals, tangents)))
                    minus = losses(*(p - h * t for p, t in zip(primals, tangents)))
                d = (plus.double() - minus.double()) / (2 * h)
        out.extend(x.double().cpu() for x in _split(-d.detach(), lengths))
    return out


# ==================================================================================== config


@dataclass
class ScoreTokensConfig:
    """One detector over one ``.div.jsonl``: ``likelihood-shift`` needs ``student`` (and its base:
    default, the one its distill manifest records); ``gradient`` needs the student's ``base``
    (default: the factual teacher's base), the readout ``target`` (default: the teacher's bias)
    and the student's parameter set (``layers`` / ``lora_*`` / ``params``, as distill's)."""

    detector: str
    divergence: str
    out: str
    source_data: str | None = None
    student: str | None = None
    base: str | None = None
    target: str | None = None
    category: str | None = None
    layers: str | None = None
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_targets: str | None = None
    params: str = "all"
    method: str = "jvp"
    eps: float = DEFAULT_EPS
    max_questions: int | None = None
    flag_share: float | None = None
    batch_size: int = 8
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    trust_remote_code: bool = False
    overwrite: bool = False


# The distill settings that choose which parameters a student trains (DistillConfig's names, which
# ScoreTokensConfig shares): the gradient detector's dot product runs over exactly that set.
TRAINABLE_FIELDS = ("layers", "lora_rank", "lora_alpha", "lora_targets", "params")


def student_trainable(distill: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`ScoreTokensConfig` fields that give ``gradient`` the parameter set of a student
    with these distill settings (a DistillConfig's fields: its manifest's ``config``, or a run's plan
    of a condition): every weight, some blocks, LoRA with its rank, alpha and targets, or a
    ``--params`` set. One function, so a run and the experiment scripts cannot score over a set
    their students do not train."""
    out = {k: distill[k] for k in TRAINABLE_FIELDS if distill.get(k) is not None}
    if out.get("params") == "all":
        del out["params"]
    return out


def _check(cfg: ScoreTokensConfig) -> None:
    if cfg.detector not in DETECTORS:
        raise DetectorError(f"--detector {cfg.detector!r}: one of {', '.join(DETECTORS)}")
    if cfg.method not in METHODS:
        raise DetectorError(f"--method {cfg.method!r}: one of {', '.join(METHODS)}")
    if cfg.batch_size < 1:
        raise SubliminalError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if not (cfg.eps > 0 and math.isfinite(cfg.eps)):
        raise SubliminalError(f"--eps must be a positive number, got {cfg.eps}")
    if cfg.detector == "likelihood-shift" and not cfg.student:
        raise DetectorError("--detector likelihood-shift needs --student (a distill student trained on this data)")
    if cfg.detector == "likelihood-shift" and (cfg.layers or cfg.lora_rank or cfg.params != "all" or cfg.target):
        raise DetectorError("--layers / --lora-rank / --params / --target belong to --detector gradient")
    if cfg.flag_share is not None and not 0 < cfg.flag_share <= 1:
        raise SubliminalError(f"--flag-share must be in (0, 1], got {cfg.flag_share}")


def _resolve_base(cfg: ScoreTokensConfig) -> str:
    """The base model: --base, else the student's (likelihood shift), else the factual teacher's."""
    from .diagnose import _teacher_paths
    from .teachers import is_teacher_dir, read_teacher

    if cfg.base:
        return cfg.base
    if cfg.detector == "likelihood-shift":
        man = read_manifest(cfg.student) or {}
        base = ((man.get("inputs") or {}).get("base") or {}).get("path")
        if base:
            return str(base)
        raise DetectorError(f"--student {cfg.student}: its manifest names no base; give --base")
    factual, paths = _teacher_paths(cfg.divergence)
    t = paths.get(factual) if factual else None
    if t and is_teacher_dir(t):
        return read_teacher(t).base
    raise DetectorError(f"{cfg.divergence}: its manifest names no factual teacher directory; give --base")


def _resolve_target(cfg: ScoreTokensConfig) -> tuple[str, str]:
    from . import prompts
    from .diagnose import _teacher_paths
    from .teachers import is_teacher_dir, read_teacher

    target = cfg.target
    if target is None:
        factual, paths = _teacher_paths(cfg.divergence)
        t = paths.get(factual) if factual else None
        target = read_teacher(t).bias if t and is_teacher_dir(t) else None
    if not target:
        raise DetectorError(f"{cfg.divergence}: no factual teacher with a bias in its manifest; give --target")
    try:
        category = cfg.category or prompts.category_of(target)
    except ValueError as e:
        raise DetectorError(f"--target {target!r}: {e}") from None
    if target not in prompts.CATEGORIES.get(category, []):
        raise DetectorError(f"--target {target!r} is not a candidate of category {category!r}")
    return target, category


def _examples(cfg: ScoreTokensConfig, tokenizer: Any, model: Any) -> tuple[list[dict[str, Any]], list[Any]]:
    """The file's rows (as stored) and the same rows as distill's hard student sees them."""
    from .data import model_max_length
    from .distill import build_examples, read_training_rows
    from .divergence import load_divergence

    objs = load_divergence(cfg.divergence)
    rows, _ = read_training_rows(cfg.divergence, cfg.source_data)
    ex = build_examples(rows, [[True] * len(r.token_ids or []) for r in rows], tokenizer, model_max_length(model))
    return objs, ex


def _gradient_scores(cfg: ScoreTokensConfig, base: str, progress: bool) -> tuple[list[dict], list[torch.Tensor],
                                                                                  dict[str, Any]]:
    from .diagnose import DiagnoseConfig, readout_gradient, student_model

    target, category = _resolve_target(cfg)
    dcfg = DiagnoseConfig(out="unused", layers=cfg.layers, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                          lora_targets=cfg.lora_targets, params=cfg.params, seed=cfg.seed,
                          device=cfg.device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    loaded, model, params = student_model(base, dcfg)
    tok = loaded.tokenizer
    r, g_r = readout_gradient(model, tok, params, target, category, max_questions=cfg.max_questions,
                              batch_size=cfg.batch_size)
    objs, ex = _examples(cfg, tok, model)
    scores = _my_batches(lambda part: gradient_attribution(model, params, g_r, part, tok.pad_token_id,
                                                        batch_size=cfg.batch_size, method=cfg.method, eps=cfg.eps,
                                                        progress=progress), ex, cfg.batch_size)
    info = {"target": target, "category": category, "readout": r, "method": cfg.method,
            "grad_readout_norm": math.sqrt(sum(float((g.double() ** 2).sum()) for g in g_r)),
            "n_trained_tensors": len(params), "n_trained_values": sum(p.numel() for _, p in params)}
    return objs, scores, info


def _shift_scores(cfg: ScoreTokensConfig, base: str) -> tuple[list[dict], list[torch.Tensor], dict[str, Any]]:
    from .models import load_model, same_tokenizer

    kw = {"device": cfg.device, "dtype": cfg.dtype, "trust_remote_code": cfg.trust_remote_code}
    student = load_model(cfg.student, **kw)
    base_m = load_model(base, **kw)
    if not same_tokenizer(student.tokenizer, base_m.tokenizer):
        raise DetectorError(f"--student {cfg.student} and --base {base} have different tokenizers")
    student.model.eval()
    base_m.model.eval()
    objs, ex = _examples(cfg, student.tokenizer, student.model)
    pad = student.tokenizer.pad_token_id
    scores = _my_batches(lambda part: likelihood_shift(student.model, base_m.model, part, pad, cfg.batch_size), ex,
                         cfg.batch_size)
    return objs, scores, {"student": cfg.student}


def _my_batches(score: Callable[[Sequence[Any]], list[torch.Tensor]], examples: Sequence[Any], batch_size: int
                ) -> list[torch.Tensor]:
    """``score`` over this rank's whole batches of ``examples`` (all of them without a launcher), on
    the CPU; :func:`run` gathers every rank's (see the module docstring for why whole batches)."""
    from . import distributed as dist

    mine = dist.batch_shard(len(examples), batch_size)
    return [t.detach().cpu() for t in score(list(examples[mine.start:mine.stop]))]


def score_key(detector: str) -> str:
    from .divergence import DETECTOR_RULES

    return DETECTOR_RULES[detector]


def _fingerprint(cfg: ScoreTokensConfig, base: str) -> dict[str, Any]:
    """What the scores depend on: the inputs' contents and the settings that can change a score; not
    the paths, the number of processes (the same bits) nor the batch size (the same up to float
    rounding, as find-divergence's scores)."""
    settings = {k: v for k, v in asdict(cfg).items()
                if k not in ("divergence", "out", "source_data", "student", "base", "overwrite", "trust_remote_code",
                             "device", "batch_size")}
    settings["device"] = device_type(cfg.device)
    if cfg.detector != "gradient" or cfg.method != "central":  # settings that cannot change these scores
        settings.pop("eps")
    if cfg.detector != "gradient":
        settings.pop("method")
    return fingerprint({"divergence": cfg.divergence, "source_data": cfg.source_data, "student": cfg.student,
                        "base": base}, settings)


def _prepare(cfg: ScoreTokensConfig) -> tuple[str, dict[str, Any], str]:
    """Check the config and the paths; (base, fingerprint, the resume action: ``skip`` when ``out``
    already holds this exact run)."""
    _check(cfg)
    device_type(cfg.device)
    out = Path(cfg.out)
    check_not_input({"--out": out}, {"--divergence": cfg.divergence, "--source-data": cfg.source_data,
                                     "--student": cfg.student, "--base": cfg.base})
    check_writable(out)
    base = _resolve_base(cfg)
    fp = _fingerprint(cfg, base)
    return base, fp, check_file_resume(out, fp, overwrite=cfg.overwrite, stage=STAGE)


def _scored_rows(cfg: ScoreTokensConfig, objs: Sequence[dict[str, Any]], scores: Sequence[torch.Tensor]
                 ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The file's rows with the detector's score added (and flags set, with ``flag_share``)."""
    from .divergence import RuleSpec, _floats, flag_rows

    key = score_key(cfg.detector)
    rows = []
    for o, s in zip(objs, scores, strict=True):
        if len(s) != len(o["token_ids"]):  # build_examples checks the ids; this guards the bookkeeping
            raise SubliminalError(f"row {o['id']!r}: {len(s)} scores for {len(o['token_ids'])} tokens")
        rows.append({**o, "scores": {**o["scores"], key: _floats(s)}})
    if cfg.flag_share is None:
        return rows, None
    return flag_rows(rows, RuleSpec(cfg.detector, flag_share=cfg.flag_share))


def _summary(cfg: ScoreTokensConfig, scores: Sequence[torch.Tensor], base: str, info: dict[str, Any]
             ) -> dict[str, Any]:
    flat = torch.cat([s.double() for s in scores]) if scores else torch.zeros(0, dtype=torch.float64)
    return {"detector": cfg.detector, "score_key": score_key(cfg.detector), "n_rows": len(scores),
            "n_tokens": int(flat.numel()), "score_mean": float(flat.mean()) if flat.numel() else None,
            "score_std": float(flat.std()) if flat.numel() > 1 else None,
            "score_max": float(flat.max()) if flat.numel() else None, "base": base, **info}


def _write(cfg: ScoreTokensConfig, rows: list[dict[str, Any]], summary: dict[str, Any],
           rule_info: dict[str, Any] | None, fp: dict[str, Any], t0: float) -> None:
    """The file (atomically) and its manifest: rank 0's job. The manifest records how the rows were
    split over processes (not part of the fingerprint: the scores do not depend on it)."""
    from . import distributed as dist
    from .divergence import _write_rows

    _write_rows(Path(cfg.out), rows)
    man = read_file_manifest(cfg.divergence) or {}
    inputs: dict[str, Any] = {"divergence": cfg.divergence, "base": summary["base"], "student": cfg.student}
    data = (man.get("inputs") or {}).get("data", {}).get("path") or cfg.source_data
    if data:  # distill finds the rows' source data through this entry
        inputs["data"] = data
    shards = {"world_size": dist.world_size(),
              "shards": [list(b) for b in dist.batch_shard_bounds(len(rows), cfg.batch_size)]}
    write_file_manifest(cfg.out, stage=STAGE, config=cfg, seed=cfg.seed, inputs=inputs, wall_time_s=time.time() - t0,
                        extra={"summary": summary, "rule": rule_info or man.get("rule"), "factual": man.get("factual"),
                               "counterfactuals": man.get("counterfactuals"), "fingerprint": fp, **shards})


def run(cfg: ScoreTokensConfig, *, progress: bool = True) -> dict[str, Any] | None:
    """Score every completion token of ``cfg.divergence`` with ``cfg.detector`` and write ``cfg.out``:
    the same rows with ``scores[<detector key>]`` added (flags unchanged, or set by ``flag_share``),
    atomically, with its manifest. Returns the summary (None: ``out`` already holds this exact run).

    Under a launcher every rank checks the same inputs (the same decision, or the same error),
    scores its whole batches of rows (the batches one process makes) and the scores are gathered;
    rank 0 writes. A row is scored in exactly the forward one process scores it in, so the file is
    bit-identical whatever the number of processes."""
    from . import distributed as dist

    t0 = time.time()
    dist.init(cfg.device)
    with dist.agree("prepare"):
        base, fp, action = _prepare(cfg)
    if action == "skip":
        log.info("%s: already scored by this exact command; nothing to do (--overwrite redoes it)", cfg.out)
        return None
    set_seed(cfg.seed)
    show = not dist.progress_disabled(progress)
    with dist.agree("score"):
        objs, local, info = (_gradient_scores(cfg, base, show) if cfg.detector == "gradient"
                             else _shift_scores(cfg, base))
    scores = dist.merge_in_order(dist.all_gather(local))
    with dist.agree("write"):
        rows, rule_info = _scored_rows(cfg, objs, scores)
        summary = {**_summary(cfg, scores, base, info), "wall_time_s": round(time.time() - t0, 3)}
        if dist.is_main():
            _write(cfg, rows, summary, rule_info, fp, t0)
    return {**summary, "rule": rule_info}


# ======================================================================================= CLI


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score-tokens", help="per-token detectors (likelihood shift, gradient attribution) "
                       "written into a .div.jsonl", description="Score every completion token of a find-divergence "
                       "file with a detector and write a new .div.jsonl holding the score under scores[KEY]; "
                       "`reflag-divergence --rule DETECTOR --flag-share S` then flags its top share.")
    p.add_argument("--detector", required=True, choices=DETECTORS,
                   help="likelihood-shift: log p_student - log p_base of the data token (needs --student); "
                   "gradient: -grad(loss_t) . grad(R) over the student's trainable parameters, R eval's exact "
                   "preference")
    p.add_argument("--divergence", required=True, help="a find-divergence output (.div.jsonl) of the teacher's rows")
    p.add_argument("--out", required=True, help="the scored file, e.g. data/owl.grad.div.jsonl")
    p.add_argument("--source-data", default=None, help="the generate file of the rows (default: from the "
                   "divergence file's manifest)")
    p.add_argument("--student", default=None, help="likelihood-shift: a student trained on this data")
    p.add_argument("--base", default=None, help="the student's initial model (default: the student's manifest's "
                   "base, or the factual teacher's base)")
    p.add_argument("--target", default=None, help="gradient: the readout's target (default: the teacher's bias)")
    p.add_argument("--category", default=None, help="gradient: the target's category (default: from the target)")
    p.add_argument("--layers", default=None, help="gradient: the student trains only these blocks")
    p.add_argument("--lora-rank", type=int, default=None, help="gradient: the student trains LoRA of this rank")
    p.add_argument("--lora-alpha", type=float, default=None, help="gradient: LoRA alpha (default: the rank)")
    p.add_argument("--lora-targets", default=None, help="gradient: LoRA only on these projections")
    p.add_argument("--params", default="all", help="gradient: distill's --params set (default %(default)s)")
    p.add_argument("--method", choices=METHODS, default="jvp",
                   help="gradient: jvp (forward-mode AD, exact) or central (difference of two forwards along "
                   "grad(R), step --eps in parameter norm) (default %(default)s)")
    p.add_argument("--eps", type=float, default=DEFAULT_EPS, help="central: the step's parameter-space norm "
                   "(default %(default)s)")
    p.add_argument("--max-questions", type=int, default=None, help="gradient: readout questions (default: all)")
    p.add_argument("--flag-share", type=float, default=None, help="also flag this share of tokens by the score "
                   "(as reflag-divergence --rule DETECTOR --flag-share does); default: flags unchanged")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward (default %(default)s)")
    add_seed(p)
    add_model_runtime(p)
    add_overwrite(p)
    p.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> int:
    from . import distributed as dist

    cfg = ScoreTokensConfig(**{f.name: getattr(args, f.name) for f in fields(ScoreTokensConfig)})
    s = run(cfg)
    if not dist.is_main():  # rank 0 reports
        return 0
    if s is None:
        print(f"{cfg.out}: already scored by this exact command; nothing to do (--overwrite redoes it)")
        return 0
    print(f"{s['detector']}: {s['n_tokens']} tokens of {s['n_rows']} rows scored (mean {s['score_mean']:.4g}, "
          f"max {s['score_max']:.4g})")
    if s.get("rule"):
        from .divergence import _print_rule

        _print_rule(s["rule"])
    print(f"-> {cfg.out}")
    return 0
