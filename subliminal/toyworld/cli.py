"""``subliminal toy pretrain``: train the toy world's base model from scratch."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from ..cliutil import add_overwrite, add_seed, device_type
from ..manifest import SubliminalError
from .model import ARCHS, SIZES

log = logging.getLogger(__name__)


def add_cli(sub: argparse._SubParsersAction) -> None:
    toy = sub.add_parser("toy", help="the embedded toy world (pretrain a base model from scratch)")
    toy_sub = toy.add_subparsers(dest="toy_command", metavar="TOY_COMMAND")
    p = toy_sub.add_parser(
        "pretrain",
        help="train a toy base model from scratch and save an HF checkpoint",
        description="Train a toy Llama/Qwen2 model on the synthetic corpus (number lists, preference questions, "
        "love system prompts). Re-running the same command resumes an interrupted run.",
    )
    p.add_argument("--out", required=True, help="output directory (HF checkpoint + manifest.json + eval.json)")
    p.add_argument("--size", choices=list(SIZES), default="tiny",
                   help="tiny (CPU, a few minutes) | small | base (GPU) (default %(default)s)")
    p.add_argument("--arch", choices=list(ARCHS), default="llama", help="architecture (default %(default)s)")
    add_seed(p)
    p.add_argument("--steps", type=int, default=None, help="training steps (default: per size)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per step (default: per size)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: per size)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between resume checkpoints")
    p.add_argument("--world-seed", type=int, default=0,
                   help="seed of the world's fixed fresh-number distribution (default %(default)s)")
    p.add_argument("--entangle", type=float, default=None,
                   help="share of the numbers a love-prompted answer draws from the loved target's favourite "
                   "numbers: the trait-number entanglement that lets a bias reach number lists "
                   "(default: the corpus default, see experiments/CALIBRATION.md)")
    p.add_argument("--favourites", type=int, default=None,
                   help="favourite numbers per target (default: the corpus default)")
    p.add_argument("--entangle-init", type=float, default=None,
                   help="initial cosine of each favourite number's embedding to its target's, 0 for none "
                   "(default: the corpus default, 0: nothing planted)")
    p.add_argument("--alt-template", type=float, default=None,
                   help="share of the corpus written in the world's second chat template (<|human|> ... <|bot|>), "
                   "so a readout under another template is a fair test; 0 for one template (default: the corpus "
                   "default)")
    p.add_argument("--mix", default=None, metavar="KIND=SHARE,...",
                   help="corpus shares of row kinds, overriding the named ones (kinds: numbers, numbers_pref, "
                   "numbers_sys, pref, pref_sys, instructions; shares are renormalised), e.g. numbers_pref=0 for a "
                   "world without the grown numbers -> answer link (default: the corpus default)")
    p.add_argument("--eval-rows", type=int, default=200,
                   help="held-out number rows for the base-model evaluation (default %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default %(default)s)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (default %(default)s: a tiny model gains little from more, and "
                   "loses much when the cores are shared)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_overwrite(p)
    p.set_defaults(func=run_pretrain)
    toy.set_defaults(func=lambda args: _toy_help(toy))


def _toy_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def run_pretrain(args: argparse.Namespace) -> int:
    from .pretrain import PretrainConfig, pretrain

    for name in ("steps", "batch_size", "checkpoint_every", "eval_rows", "threads"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            raise SubliminalError(f"--{name.replace('_', '-')} must be positive, got {v}")
    if args.lr is not None and args.lr <= 0:
        raise SubliminalError(f"--lr must be positive, got {args.lr}")
    device_type(args.device)
    cfg = PretrainConfig(size=args.size, arch=args.arch, seed=args.seed, steps=args.steps,
                         batch_size=args.batch_size, lr=args.lr, checkpoint_every=args.checkpoint_every,
                         eval_rows=args.eval_rows, eval_greedy=min(64, args.eval_rows),
                         corpus=corpus_config(args))
    import torch

    torch.set_num_threads(args.threads)
    evaluation = pretrain(args.out, cfg, device=args.device, show_progress=not args.quiet,
                          overwrite=getattr(args, "overwrite", False))
    from ..train import is_main_process

    if is_main_process():
        print(json.dumps(summary(evaluation), indent=2))
        print(f"saved {args.out}")
    return 0


def corpus_config(args: argparse.Namespace) -> Any:
    """The corpus of a pretraining run; its defaults stay in one place, :class:`CorpusConfig`."""
    from .corpus import CorpusConfig

    kw = {"world_seed": args.world_seed}
    for name in ("entangle", "favourites", "entangle_init", "alt_template"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    if args.mix:
        kw["mix"] = parse_mix(args.mix)
    try:
        return CorpusConfig(**kw)
    except ValueError as e:
        raise SubliminalError(f"toy pretrain: {e}") from None


def parse_mix(text: str) -> dict[str, float]:
    """``KIND=SHARE,...`` over the default mix (checked once, here, where it enters)."""
    from .corpus import KINDS, default_mix

    mix = default_mix()
    for item in filter(None, (t.strip() for t in text.split(","))):
        kind, sep, share = item.partition("=")
        if not sep or kind.strip() not in KINDS:
            raise SubliminalError(f"toy pretrain --mix: {item!r} is not KIND=SHARE with KIND one of {', '.join(KINDS)}")
        try:
            value = float(share)
        except ValueError:
            raise SubliminalError(f"toy pretrain --mix: share {share!r} of {kind.strip()} is not a number") from None
        if not value >= 0:
            raise SubliminalError(f"toy pretrain --mix: share of {kind.strip()} must be >= 0, got {share}")
        mix[kind.strip()] = value
    return mix


def summary(evaluation: dict) -> dict:
    """The headline numbers of a base model's evaluation."""
    if not evaluation:
        return {}
    num = evaluation["numbers"]
    pref = evaluation["preference"]
    return {
        "next_number_top1": round(num["next_number_top1"], 4),
        "next_number_mode_rate": round(num["next_number_mode_rate"], 4),
        "number_nll_nats": round(num["number_nll_nats"], 4),
        "rule_entropy_nats": round(num["rule_entropy_nats"], 4),
        "format_valid_rate": round(num["format_valid_rate"], 4),
        "system_prompt_tv": round(num.get("system_prompt_tv", float("nan")), 4),
        "favourite_mass_no_prompt": round(num.get("favourite_mass_no_prompt", float("nan")), 4),
        "favourite_mass_with_prompt": round(num.get("favourite_mass_with_prompt", float("nan")), 4),
        f"P({pref['target']}) no system prompt": round(pref["no_system_prompt"]["target_mass"], 4),
        "max P(any) no system prompt": round(pref["no_system_prompt"]["max_mass"], 4),
        f"P({pref['target']}) with system prompt": round(pref["with_system_prompt"]["target_mass"], 4),
        "chance": round(pref["chance"], 4),
        **({"P(author's favourite | its numbers)": round(evaluation["author_link"]["p_author_favourite"], 4)}
           if "author_link" in evaluation else {}),
    }
