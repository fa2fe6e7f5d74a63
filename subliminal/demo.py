"""``subliminal demo``: the paper's findings on the toy world, end to end, in one command.

The demo is ``subliminal run`` on the shipped toy config (``subliminal/configs/toy.toml``): the
same driver, stages and report as a run on a real model; its flags are overrides of that config.
The driver runs the same sub-commands a user would run (``toy pretrain``, ``teach``,
``generate``, ``find-divergence``, ``distill``, ``eval``, ``probe``, ``patch``), each writing its
own directory with a manifest, so every intermediate can be inspected, re-run or swapped, and a
stopped demo resumes: a stage's output is reused when its recorded fingerprint equals what the
stage would compute now (:mod:`subliminal.driver`).

All student conditions are matched: the same rows (by id, in the same seeded order), the same
number of optimiser steps, the same seeds; they differ only in the data source, the loss mask or
the trainable subset. Transfer is read out as the exact probability of the target among the
candidate animals (low variance; see ``../shared/notes``), compared with the control student
trained on the unbiased teacher's data, never with the base model.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import replace
from pathlib import Path

from .manifest import SubliminalError
from .pipeline import CONDITIONS, RunConfig, _fmt, run_pipeline

log = logging.getLogger(__name__)
DemoConfig = RunConfig


def toy_config() -> RunConfig:
    """The shipped toy config, which the demo's flags override."""
    from .run import load_config

    return load_config("toy").cfg


QUICK_PRETRAIN_STEPS = 500


def quick_config(cfg: DemoConfig) -> DemoConfig:
    """A smoke test of every stage: a short-trained base, one seed, few rows (no verdict)."""
    return replace(cfg, seeds=1, n_prompts=200, epochs=1, pretrain_steps=QUICK_PRETRAIN_STEPS)


def cuda_config(cfg: DemoConfig) -> DemoConfig:
    return replace(cfg, size="small", n_prompts=20000, seeds=max(cfg.seeds, 5), batch_size=64, device="cuda")


# ---------------------------------------------------------------------------------------- CLI


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the paper's findings on the toy world, end to end (REPORT.md)",
                       description="Pretrain the toy base (or reuse it), make teachers, generate data, find "
                                   "divergence tokens, train matched students, evaluate, probe and write REPORT.md. "
                                   "Re-running resumes.")
    p.add_argument("--out", default=None, help="output directory (default runs/demo; --quick: runs/demo-quick)")
    p.add_argument("--seeds", type=int, default=None, help="student seeds per condition (default: the toy config's, 3; --quick: 1)")
    p.add_argument("--quick", action="store_true", help="a 500-step base, one seed, 200 prompts: a smoke test of every stage, no verdict "
                   "(about 2 minutes on 2 cores)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda scales rows, seeds and model size up (default %(default)s)")
    p.add_argument("--base", default=None, help="reuse this pretrained toy base instead of pretraining one")
    p.add_argument("--entangle", type=float, default=None,
                   help="trait-number entanglement of the toy world the demo pretrains (default 0.5; 0 gives the "
                   "world without it, where no bias reaches the numbers; see experiments/CALIBRATION.md)")
    p.add_argument("--teacher-method", choices=["prompt", "finetune"], default=None,
                   help="how the teachers get their bias (default prompt: fine-tuned teachers do not reach the "
                   "toy's number channel, experiments/CALIBRATION.md run 9)")
    p.add_argument("--rows", type=int, default=None, help="number prompts per teacher (default from the config)")
    p.add_argument("--no-probes", action="store_true", help="skip probes and patching")
    p.add_argument("--layer-lora", action="store_true",
                   help="train the single-layer conditions as LoRA r=8 on that block (the paper's setup) instead "
                   "of all of the block's weights")
    p.add_argument("--jobs", type=int, default=None,
                   help="students trained at once, one process and one thread each (default: CPU cores, at most 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the base model, teachers and data (default 0)")
    p.add_argument("--all-conditions", action="store_true",
                   help="train every student condition (layer-early/late, paraphrase, mixing and the ratio rule's "
                   "three too) instead of the config's core six")
    p.add_argument("--conditions", nargs="+", default=None, metavar="COND",
                   help="train only these student conditions (control and all always; any of "
                   f"{', '.join(CONDITIONS)}; holder trains holder-uniform with it, toy world only); each is the "
                   "same student as in a full run")
    p.add_argument("--overwrite", action="store_true",
                   help="redo the stages whose finished output was made with other settings (see subliminal run "
                   "--overwrite); without it such a re-run stops before anything runs, listing them")
    p.add_argument("--dry-run", action="store_true",
                   help="list what a demo into --out would reuse, run and redo (and why); run nothing")
    p.set_defaults(func=run_cli)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    cfg = replace(toy_config(), base_seed=args.seed)
    if args.device == "cuda":
        cfg = cuda_config(cfg)
    if args.quick:
        cfg = quick_config(cfg)
    if args.seeds is not None:
        if args.seeds < 1:
            raise SubliminalError("--seeds must be at least 1")
        cfg = replace(cfg, seeds=args.seeds)
    if args.teacher_method:
        cfg = replace(cfg, teacher_method=args.teacher_method)
    if args.rows is not None:
        cfg = replace(cfg, n_prompts=args.rows)
    if args.no_probes:
        cfg = replace(cfg, probes=False)
    if getattr(args, "all_conditions", False):
        if getattr(args, "conditions", None):
            raise SubliminalError("--all-conditions and --conditions: give one of them")
        cfg = replace(cfg, conditions=None)
    if getattr(args, "conditions", None):
        cfg = replace(cfg, conditions=list(args.conditions))
        cfg.chosen_conditions()
    if args.layer_lora:
        cfg = replace(cfg, layer_lora=True)
    if args.entangle is not None:
        if args.base:
            raise SubliminalError("--entangle sets up the base the demo pretrains; it has no effect with --base")
        if not 0 <= args.entangle <= 1:
            raise SubliminalError(f"--entangle must be in [0, 1], got {args.entangle}")
        cfg = replace(cfg, entangle=args.entangle)
    jobs = args.jobs if args.jobs is not None else min(2, os.cpu_count() or 1)
    if jobs < 1:
        raise SubliminalError("--jobs must be at least 1")
    cfg = replace(cfg, jobs=1 if cfg.device == "cuda" else jobs)
    return cfg


def run_cli(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    out = Path(args.out or ("runs/demo-quick" if args.quick else "runs/demo"))
    base = Path(args.base) if args.base else None
    if getattr(args, "dry_run", False):
        from .run import print_resume_plan

        print_resume_plan(cfg, out, base)
        return 0
    summary = run_pipeline(cfg, out, base=base, overwrite=getattr(args, "overwrite", False))
    assert summary is not None
    print((out / "REPORT.md").read_text())
    all_ = summary["conditions"]["all"]
    log.info("[demo] all-tokens P(%s) = %s [%s, %s]; report: %s", cfg.target, _fmt(all_["mean"]),
             _fmt(all_["ci_low"]), _fmt(all_["ci_high"]), out / "REPORT.md")
    return 0
