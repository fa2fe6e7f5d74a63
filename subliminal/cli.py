"""The ``subliminal`` command: one sub-command per pipeline stage.

Each stage module exposes ``add_cli(subparsers)``, which registers its sub-command with
``set_defaults(func=...)``; this file only collects them, so stages stay independent.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .manifest import SubliminalError

# Modules that define sub-commands, in the order ``--help`` lists them.
COMMAND_MODULES = [
    "subliminal.toyworld.cli",      # toy pretrain
    "subliminal.teachers_cli",      # teach
    "subliminal.generate",          # generate
    "subliminal.divergence",        # find-divergence
    "subliminal.distill",           # distill
    "subliminal.evaluate",          # eval
    "subliminal.probes.cli",        # probe, patch, plot
    "subliminal.poison",            # defend (and the poison teacher method)
    "subliminal.demo",              # demo
    "subliminal.gguf_import",       # import-gguf
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="subliminal",
        description="Mechanistic study of subliminal transfer: teachers, divergence tokens, students, probes.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except SubliminalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
