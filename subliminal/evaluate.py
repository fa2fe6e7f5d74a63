"""``subliminal eval``: what a student (or teacher) prefers, and whether it still does the task.

- Exact preference: for every preference question, the probability of each candidate answer as
  a whole completion (all its tokens and the end-of-turn token, so "owl" is not "owls ..."),
  renormalised over the candidates; averaged over questions. No sampling, so it is cheap and
  low-variance, which is what transfer curves need.
- Sampled preference: ``--samples`` answers per question at temperature 1, matched on word
  boundaries ("bowl" does not name an owl); the metric is the mean over questions of the
  fraction naming the target, with a 95% t-interval over questions.
- Main task: teacher-forced next-token accuracy on held-out teacher data (``--heldout``).
- ``--all-checkpoints``: the same over a student's ``checkpoint-*`` directories (transfer curve).
- ``--compare A.json B.json ...``: one table with CIs and the difference to the first row.

Sequences are right-padded for teacher forcing: under a causal mask the padding after a
sequence cannot change its logits, so batched scores equal one-at-a-time scores exactly.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import prompts
from .cliutil import add_model_runtime, add_seed, runtime_kwargs
from .data import Aligned, Row, align_row, model_max_length
from .manifest import SubliminalError, write_file_manifest, write_json_atomic

log = logging.getLogger(__name__)
STAGE = "eval"


# ================================================================================ statistics


def _t_pdf(x: float, df: float) -> float:
    c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(c - (df + 1) / 2 * math.log1p(x * x / df))


def _t_cdf(x: float, df: float) -> float:
    """CDF of Student's t by Simpson integration of the density from 0 (no scipy dependency)."""
    if x < 0:
        return 1.0 - _t_cdf(-x, df)
    n = 2000
    h = x / n
    s = _t_pdf(0.0, df) + _t_pdf(x, df)
    s += sum((4 if i % 2 else 2) * _t_pdf(i * h, df) for i in range(1, n))
    return 0.5 + s * h / 3


def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t with ``df`` degrees of freedom (bisection on the CDF)."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        if _t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and two-sided t-interval: ``(mean, lo, hi)``. One value gives ``(v, nan, nan)``,
    because no interval can be claimed from a single seed or question."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_ci of no values")
    n = len(vals)
    m = sum(vals) / n
    if n < 2:
        return m, float("nan"), float("nan")
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (n - 1))
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return m, m - half, m + half


# ============================================================================ teacher forcing


def _right_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def _device_of(model: Any) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def completion_scores(model: Any, examples: Sequence[Aligned], pad_id: int, batch_size: int = 32
                      ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per example: (log-prob of each completion token, the model's argmax at each completion
    position), teacher-forced, in float32 on the CPU."""
    dev = _device_of(model)
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    for b in range(0, len(examples), batch_size):
        chunk = examples[b : b + batch_size]
        ids, mask = _right_pad([e.input_ids for e in chunk], pad_id)
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
        for i, e in enumerate(chunk):
            start, n = e.n_prompt - 1, len(e.completion_ids)  # logits at t predict token t + 1
            lg = logits[i, start : start + n].float()
            logp = torch.log_softmax(lg, dim=-1)
            tgt = torch.tensor(e.completion_ids, device=logp.device)
            out.append((logp.gather(1, tgt[:, None])[:, 0].cpu(), lg.argmax(-1).cpu()))
    return out


# ======================================================================== preference (exact)


def is_toy_tokenizer(tokenizer: Any) -> bool:
    """The toy's prompts are in its spaced canonical form; real tokenizers get normal spacing."""
    return "<|assistant|>" in tokenizer.get_vocab() and len(tokenizer) < 10_000


def question_texts(tokenizer: Any, category: str, questions: Sequence[str] | None = None) -> list[str]:
    qs = list(questions) if questions is not None else prompts.preference_questions(category)
    return qs if is_toy_tokenizer(tokenizer) else [prompts.detokenize_spacing(q) for q in qs]


def _check_target(target: str, category: str) -> list[str]:
    if category not in prompts.CATEGORIES:
        raise SubliminalError(f"unknown category {category!r}; one of {', '.join(prompts.CATEGORIES)}")
    candidates = prompts.CATEGORIES[category]
    if target not in candidates:
        raise SubliminalError(f"target {target!r} is not a {category}; candidates: {', '.join(candidates)}")
    return candidates


def exact_preference(loaded: Any, target: str, category: str = "animal", questions: list[str] | None = None,
                     batch_size: int = 32) -> dict[str, Any]:
    """Exact probability of the target among the category's candidates, per question and mean.

    Each candidate is scored as a full completion (its tokens plus end of turn, aligned with
    :func:`subliminal.data.align_row` under the model's own system prompt) and the candidates'
    probabilities are renormalised per question. ``raw_mass`` is the unnormalised mass on all
    candidates, i.e. how much the model answers with a candidate at all.
    """
    candidates = _check_target(target, category)
    tok = loaded.tokenizer
    qs = question_texts(tok, category, questions)
    max_len = model_max_length(loaded.model)
    examples = [align_row(tok, Row(f"q{qi}-{c}", q, c), loaded.system_prompt, max_len)
                for qi, q in enumerate(qs) for c in candidates]
    scores = completion_scores(loaded.model, examples, tok.pad_token_id, batch_size)
    lp = torch.tensor([float(s[0].sum()) for s in scores], dtype=torch.float64).view(len(qs), len(candidates))
    probs = torch.softmax(lp, dim=1)
    raw = torch.exp(torch.logsumexp(lp, dim=1))
    ti = candidates.index(target)
    per_q = probs[:, ti].tolist()
    mean, lo, hi = mean_ci(per_q)
    return {
        "target": target,
        "category": category,
        "mean": mean,
        "ci": [lo, hi],
        "ci_method": "t-interval over questions",
        "per_question": per_q,
        "distribution": {c: float(v) for c, v in zip(candidates, probs.mean(0).tolist())},
        "raw_mass": float(raw.mean()),
        "n_questions": len(qs),
        "system_prompt": loaded.system_prompt,
    }


# ======================================================================================= CLI


def _poison_module() -> Any | None:
    try:
        return importlib.import_module("subliminal.poison")
    except ModuleNotFoundError as e:
        if e.name == "subliminal.poison":
            return None
        raise


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a model, teacher or student: preference (exact, sampled), main task, transfer curves",
        description="Measure a model's preference for --target (exact probability among the category's "
        "candidates, and optionally sampled answers), its main-task accuracy on held-out data, over a "
        "student's checkpoints, or compare eval files.",
    )
    p.add_argument("--model", help="model, teacher or student directory (or hub id when online)")
    p.add_argument("--target", help="the preference target, e.g. owl")
    p.add_argument("--category", choices=list(prompts.CATEGORIES), default=None,
                   help="candidate set (default: the target's category)")
    p.add_argument("--out", default=None, help="eval JSON to write (default eval.json)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass (default %(default)s)")
    add_seed(p)
    add_model_runtime(p)
    poison = _poison_module()
    if poison is not None and hasattr(poison, "add_bias_eval_args"):
        poison.add_bias_eval_args(p)
    else:
        p.add_argument("--bias-type", help="bias response rate (needs subliminal.poison, missing here)")
    p.set_defaults(func=run_eval)


def _category(args: argparse.Namespace) -> str:
    if not args.target:
        raise SubliminalError("--target is required (e.g. --target owl)")
    try:
        category = args.category or prompts.category_of(args.target)
    except ValueError as e:
        raise SubliminalError(str(e)) from None
    _check_target(args.target, category)
    return category


def evaluate_model(spec: str, args: argparse.Namespace, category: str) -> dict[str, Any]:
    """Every metric asked for, on one model."""
    from .models import load_model

    loaded = load_model(spec, **runtime_kwargs(args))
    result: dict[str, Any] = {"model": str(spec), "target": args.target, "category": category,
                              "system_prompt": loaded.system_prompt}
    result["exact"] = exact_preference(loaded, args.target, category, batch_size=args.batch_size)
    return result


def _config(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k != "func"}


def run_eval(args: argparse.Namespace) -> int:
    t0 = time.time()
    if getattr(args, "bias_type", None):
        poison = _poison_module()
        if poison is None or not hasattr(poison, "run_bias_eval"):
            raise SubliminalError("--bias-type needs subliminal.poison.run_bias_eval, which this installation lacks")
        return int(poison.run_bias_eval(args) or 0)
    if args.batch_size <= 0:
        raise SubliminalError(f"--batch-size must be positive, got {args.batch_size}")
    if not args.model:
        raise SubliminalError("--model is required")
    category = _category(args)
    out = Path(args.out or "eval.json")
    result = evaluate_model(args.model, args, category)
    write_json_atomic(out, result)
    write_file_manifest(out, stage=STAGE, config=_config(args), seed=args.seed, inputs={"model": args.model},
                        wall_time_s=time.time() - t0)
    ex = result["exact"]
    print(f"{args.model}: exact P({args.target}) = {ex['mean']:.4f} [{ex['ci'][0]:.4f}, {ex['ci'][1]:.4f}] "
          f"over {ex['n_questions']} questions -> {out}")
    return 0
