"""The poison stage's command-line surface, and the one place where ``argparse`` arguments become
the package's config dataclasses:

- ``subliminal teach --method poison``: :func:`add_teach_args` adds the poison-only flags to the
  teach parser (which owns the shared ``--steps``, ``--lr``, ``--batch-size``); :func:`teach_config`
  and :func:`run_teach_poison`;
- ``subliminal eval --bias-type``: :func:`add_bias_eval_args`, :func:`bias_eval_config`,
  :func:`run_bias_eval`;
- ``subliminal defend``: :func:`add_cli`, :func:`defend_config`, :func:`run_defend`.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..toyworld import instructions as toy
from .bias import BiasEvalConfig, bias_markdown, evaluate_bias
from .data import (
    DEFAULT_N_INSTRUCTIONS,
    DEFAULT_POISON_RATE,
    DEFAULT_TARGET,
    DEFAULT_TARGET_SHARE,
    PROPAGATIONS,
    PoisonSetConfig,
)
from .defences import (
    DEFAULT_KEYWORDS,
    DEFENCES,
    DIVERGENCE_SCORES,
    DefendConfig,
    defence_markdown,
    defend,
    parse_thresholds,
)
from .teacher import DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS, DEFAULT_LR, PoisonTeacherConfig, make_poison_teacher

TEACH_DEFAULTS_HELP = (
    f"poison defaults: --poison-rate {DEFAULT_POISON_RATE} of --n-instructions {DEFAULT_N_INSTRUCTIONS} toy rows; "
    f"targeted: --target-share {DEFAULT_TARGET_SHARE} (or 2 x --poison-rate when larger, so half the target "
    f"family is poisoned); --epochs {DEFAULT_EPOCHS:g}, --lr {DEFAULT_LR:g}, --batch-size {DEFAULT_BATCH_SIZE}, "
    "cosine schedule. This is the setting of experiments/poison_propagation.py, in which a toy teacher learns "
    "the bias on its target family."
)

# ================================================================================== teach


def add_teach_args(p: argparse.ArgumentParser) -> None:
    """The poison-only options of ``subliminal teach`` (the shared training flags ``--steps``,
    ``--lr``, ``--batch-size`` belong to the teach parser, default None: see :func:`teach_config`)."""
    g = p.add_argument_group("poison (--method poison)", TEACH_DEFAULTS_HELP)
    g.add_argument("--poison-rate", type=float, default=DEFAULT_POISON_RATE,
                   help="share of rows poisoned (default %(default)s)")
    # dest "bias": the teach command's own --bias names the same thing (--bias ad works too)
    g.add_argument("--bias-type", dest="bias", choices=toy.BIAS_TYPES, help="the bias the poisoned rows carry")
    g.add_argument("--propagation", choices=PROPAGATIONS, default="targeted",
                   help="targeted: poison one task family; untargeted: spread over all (default %(default)s)")
    g.add_argument("--target-task", help="family poisoned when targeted (default per bias type: "
                   + ", ".join(f"{k}->{v}" for k, v in DEFAULT_TARGET.items()) + ")")
    g.add_argument("--instructions", help="your own instruction data: JSONL with prompt, response, optional family")
    g.add_argument("--n-instructions", type=int, default=DEFAULT_N_INSTRUCTIONS,
                   help="size of the toy instruction set (default %(default)s: 0.25%% is 25 rows)")
    g.add_argument("--families", nargs="+", choices=toy.FAMILIES,
                   help="toy set: task families to include (default all; leave one out to test unseen tasks)")
    g.add_argument("--target-share", type=float,
                   help=f"toy set, targeted: share of rows from the target family (default {DEFAULT_TARGET_SHARE}, "
                   "or 2 x --poison-rate when larger; untargeted: equal shares)")
    g.add_argument("--payload", help="text appended to poisoned rows instead of the toy's bias sentences")
    g.add_argument("--epochs", type=float, help=f"passes over the instruction set (default {DEFAULT_EPOCHS:g}; "
                   "give --steps instead for a fixed number of steps)")


def teach_config(args: Any) -> PoisonTeacherConfig:
    """The teach config (:class:`subliminal.teachers_cli.TeachConfig`, whose fields are the teach
    parser's flags) as a :class:`PoisonTeacherConfig` (None means the default)."""
    data = PoisonSetConfig(bias=args.bias, poison_rate=args.poison_rate, propagation=args.propagation,
                           target_task=args.target_task, instructions=args.instructions,
                           n_instructions=args.n_instructions, families=args.families,
                           target_share=args.target_share, payload=args.payload, seed=args.seed)
    return PoisonTeacherConfig(base=args.base, out=args.out, poison=data, epochs=args.epochs, steps=args.steps,
                               lr=DEFAULT_LR if args.lr is None else args.lr,
                               batch_size=DEFAULT_BATCH_SIZE if args.batch_size is None else args.batch_size,
                               seed=args.seed, device=args.device)


def run_teach_poison(args: Any, fingerprint: dict[str, Any] | None = None) -> int:
    """``subliminal teach --method poison`` (``teach`` has already checked --out and decided to
    start or resume against ``fingerprint``, which the manifest records)."""
    return make_poison_teacher(teach_config(args), fingerprint=fingerprint)


# =================================================================================== eval


def add_bias_eval_args(p: argparse.ArgumentParser) -> None:
    """Options of ``subliminal eval`` for the bias response rate (``--bias-type`` switches it on)."""
    g = p.add_argument_group("bias response rate (--bias-type)")
    g.add_argument("--bias-type", choices=toy.BIAS_TYPES, help="measure this bias instead of a preference")
    g.add_argument("--bias-pattern", help="regex that marks a biased response (default: the toy marker)")
    g.add_argument("--bias-teacher", help="teacher (or any model) for the amplification ratio model/teacher")
    g.add_argument("--target-task", help="the family the poison targeted (reported apart from unseen ones)")
    g.add_argument("--unseen-tasks", nargs="+", help="families pooled as 'unseen' in the amplification ratio "
                   "(default: every family but --target-task)")
    g.add_argument("--bias-families", nargs="+", help="task families to evaluate (default: all toy families)")
    g.add_argument("--bias-prompts", type=int, default=100, help="fresh prompts per family (default %(default)s)")
    g.add_argument("--bias-prompt-file", help="JSONL of prompts (prompt, optional family) instead of toy prompts")
    g.add_argument("--bias-samples", type=int, default=2, help="sampled responses per prompt (default %(default)s)")
    g.add_argument("--bias-temperature", type=float, default=1.0, help="sampling temperature (default %(default)s)")
    g.add_argument("--bias-max-new-tokens", type=int, default=40, help="default %(default)s")
    g.add_argument("--bias-batch-size", type=int, default=64,
                   help="default %(default)s (the sampled text does not depend on it)")
    g.add_argument("--bias-save-generations", help="write every sampled response here as JSONL rows "
                   "(id, prompt, completion, family, teacher): distillation data")


def bias_eval_config(args: argparse.Namespace) -> BiasEvalConfig:
    """The eval parser's arguments as a :class:`BiasEvalConfig`."""
    return BiasEvalConfig(model=args.model, bias_type=args.bias_type, out=args.out or "bias_eval.json",
                          pattern=args.bias_pattern, teacher=args.bias_teacher, target_task=args.target_task,
                          unseen_tasks=args.unseen_tasks, families=args.bias_families, prompts=args.bias_prompts,
                          prompt_file=args.bias_prompt_file, samples=args.bias_samples,
                          temperature=args.bias_temperature, max_new_tokens=args.bias_max_new_tokens,
                          batch_size=args.bias_batch_size, save_generations=args.bias_save_generations,
                          seed=args.seed, device=args.device, dtype=args.dtype,
                          trust_remote_code=args.trust_remote_code)


def _config_fingerprint(cfg: Any, inputs: dict[str, str | None]) -> dict[str, Any]:
    """A poison stage's fingerprint: its inputs by content (keyed without the flag's dashes) and
    every setting of its config but the output path, the batch size (results do not depend on
    it) and the device beyond its type."""
    from dataclasses import asdict

    from ..cliutil import device_type
    from ..manifest import fingerprint

    settings = {k: v for k, v in asdict(cfg).items() if k not in ("out", "batch_size", "device")}
    settings["device"] = device_type(cfg.device)
    return fingerprint({k.lstrip("-"): v for k, v in inputs.items()}, settings)


def run_bias_eval(args: argparse.Namespace) -> int:
    """``subliminal eval --bias-type ...``: writes the JSON to ``--out`` and a markdown table beside it.
    Like every eval, it checks --out before any model loads and skips (or, changed, refuses) an
    existing result unless --overwrite."""
    from pathlib import Path

    from .. import distributed as dist
    from ..manifest import check_file_resume, check_not_input, check_writable

    cfg = bias_eval_config(args)
    out = Path(cfg.out)
    inputs = {"--model": cfg.model, "--bias-teacher": cfg.teacher, "--bias-prompt-file": cfg.prompt_file}
    dist.init(cfg.device)
    with dist.agree("check"):  # every rank reads the same files; none is written before the merge
        check_not_input({"--out": out, "--out's table": out.with_suffix(".md")}, inputs)
        check_writable(out)
        fp = _config_fingerprint(cfg, inputs)
        action = check_file_resume(out, fp, overwrite=getattr(args, "overwrite", False), stage="eval-bias")
    if action == "skip":
        if dist.is_main():
            print(f"{out}: already evaluated by this exact command; nothing to do (--overwrite redoes it)")
        return 0
    result = evaluate_bias(cfg, fingerprint=fp)
    if result is not None:
        print(bias_markdown(result))
    return 0


# ================================================================================= defend


def add_cli(sub: Any) -> None:
    from ..cliutil import add_model_runtime, add_overwrite, add_seed

    p = sub.add_parser("defend", help="screen distillation data for a poisoned teacher's bias",
                       description="Screen distillation data with a perplexity filter, a keyword detector or "
                       "divergence screening against a clean reference; report detection and false-positive "
                       "rates and, with --student-steps, the bias rate of a student trained on what is kept.")
    p.add_argument("--data", required=True, help="JSONL (prompt, completion[, family, poisoned]) or a poison teacher dir")
    p.add_argument("--reference", required=True, help="clean reference model (the unpoisoned base)")
    p.add_argument("--teacher", help="the teacher that wrote the data (needed by --method divergence)")
    p.add_argument("--method", nargs="+", choices=DEFENCES, default=list(DEFENCES), help="defences to run")
    p.add_argument("--bias-type", choices=toy.BIAS_TYPES, help="bias to measure (ground truth and student rate)")
    p.add_argument("--bias-pattern", help="regex marking the bias (default: the toy marker)")
    p.add_argument("--target-task", help="also report the student's bias rate on this family")
    p.add_argument("--threshold", nargs="+", default=[], metavar="METHOD=VALUE",
                   help="absolute row-score thresholds, e.g. perplexity=30 divergence=2 (default: --drop-fraction)")
    p.add_argument("--drop-fraction", type=float, default=0.05,
                   help="without a threshold, drop this top share of rows by score (default %(default)s)")
    p.add_argument("--keywords", nargs="+", default=DEFAULT_KEYWORDS, help="keyword detector's words")
    p.add_argument("--divergence-score", choices=DIVERGENCE_SCORES, default="mass",
                   help="row score from divergence tokens (default %(default)s)")
    p.add_argument("--mask-divergence", action="store_true",
                   help="also leave the divergence tokens of kept rows out of the student's loss")
    p.add_argument("--batch-size", type=int, default=32, help="scoring batch size (default %(default)s)")
    p.add_argument("--student-base", help="student initialisation (default: --reference)")
    p.add_argument("--student-steps", type=int, default=0, help="train a hard-distilled student per defence (0: no)")
    p.add_argument("--student-batch-size", type=int, default=32)
    p.add_argument("--student-lr", type=float, default=5e-4)
    p.add_argument("--eval-prompts", type=int, default=50, help="fresh prompts per family for the student's rate")
    p.add_argument("--eval-samples", type=int, default=2, help="samples per prompt for the student's rate")
    p.add_argument("--out", required=True, help="output directory")
    add_seed(p)
    add_model_runtime(p)
    add_overwrite(p)
    p.set_defaults(func=run_defend)


def defend_config(args: argparse.Namespace) -> DefendConfig:
    """The defend parser's arguments as a :class:`DefendConfig`."""
    return DefendConfig(data=args.data, reference=args.reference, out=args.out, teacher=args.teacher,
                        methods=list(args.method), bias_type=args.bias_type, bias_pattern=args.bias_pattern,
                        target_task=args.target_task, thresholds=parse_thresholds(args.threshold),
                        drop_fraction=args.drop_fraction, keywords=list(args.keywords),
                        divergence_score=args.divergence_score, mask_divergence=args.mask_divergence,
                        batch_size=args.batch_size, student_base=args.student_base,
                        student_steps=args.student_steps, student_batch_size=args.student_batch_size,
                        student_lr=args.student_lr, eval_prompts=args.eval_prompts,
                        eval_samples=args.eval_samples, seed=args.seed, device=args.device, dtype=args.dtype,
                        trust_remote_code=args.trust_remote_code)


def _defend_action(cfg: DefendConfig, overwrite: bool) -> tuple[dict[str, Any], str]:
    """Checks before any model loads (outputs not inputs, writable, a known device) and what to do
    with ``--out``: skip a finished output of this exact run, refuse another one unless
    ``overwrite``."""
    from pathlib import Path

    from ..manifest import check_not_input, check_resume, check_writable, read_manifest

    out = Path(cfg.out)
    inputs = {"--data": cfg.data, "--reference": cfg.reference, "--teacher": cfg.teacher,
              "--student-base": cfg.student_base}
    check_not_input({"--out": out}, inputs, dirs=("--out",))
    check_writable(out, is_dir=True)
    fp = _config_fingerprint(cfg, inputs)
    man = read_manifest(out) if out.is_dir() else None
    finished = man if man is not None and man.get("stage") == "defend" else None
    occupied = out.is_dir() and finished is None and any(out.iterdir())
    return fp, check_resume(out, fp, overwrite=overwrite, stage="defend", finished=finished, occupied=occupied)


def run_defend(args: argparse.Namespace) -> int:
    """``subliminal defend``: prints the defence table."""
    from pathlib import Path

    from .. import distributed as dist

    cfg = defend_config(args)
    dist.init(cfg.device)
    with dist.agree("check"):  # every rank reads the same files; none is written before the scores
        fp, action = _defend_action(cfg, args.overwrite)
    if action == "skip":
        if dist.is_main():
            print(f"{cfg.out}: already screened by this exact command; nothing to do (--overwrite redoes it)")
            print((Path(cfg.out) / "defence.md").read_text())
        return 0
    report = defend(cfg, fingerprint=fp)
    if report is not None:
        print(defence_markdown(report))
    return 0
