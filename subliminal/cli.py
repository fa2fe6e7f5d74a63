"""The ``subliminal`` command: one sub-command per pipeline stage.

Each stage module exposes ``add_cli(subparsers)``, which registers its sub-command with
``set_defaults(func=...)``; this file only collects them, so stages stay independent.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys
from typing import Any

from . import distributed
from .manifest import SubliminalError

# Modules that define sub-commands, in the order ``--help`` lists them.
COMMAND_MODULES = [
    "subliminal.toyworld.cli",      # toy pretrain
    "subliminal.teachers_cli",      # teach
    "subliminal.generate",          # generate
    "subliminal.divergence",        # find-divergence
    "subliminal.diagnose",          # diagnose
    "subliminal.detectors",         # score-tokens
    "subliminal.distill",           # distill
    "subliminal.evaluate",          # eval
    "subliminal.probes.cli",        # probe, patch, plot
    "subliminal.project",           # project (steering-vector readout)
    "subliminal.poison",            # defend (and the poison teacher method)
    "subliminal.run",               # run
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


def guarded(fn: Any, *args: Any) -> int:
    """``fn(*args)`` inside the one error boundary of every command (and of the experiment
    scripts): expected faults become ``error: ...`` and exit 2, an interrupt 130; a bug keeps its
    traceback."""
    try:
        rc = fn(*args)
    except distributed.RankFailedError as e:
        if distributed.is_main():  # every rank knows; rank 0 says it once (the failing rank says its own)
            print(f"error: {e}", file=sys.stderr)
        return 2
    except SubliminalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except (OSError, UnicodeDecodeError) as e:
        # The one boundary for expected faults of the machine and the files, which the stages
        # did not turn into a SubliminalError where they happened: a message, exit 2. Anything
        # else is a bug and keeps its traceback (exit 1).
        print(f"error: {describe_fault(e)}", file=sys.stderr)
        return 2
    return int(rc or 0)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    distributed.quiet_other_ranks()
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    rc = guarded(args.func, args)
    if not rc:
        from .distributed import finish

        finish()
    return int(rc or 0)


_ADVICE = {
    errno.EACCES: "check the permissions of the path, or choose another location",
    errno.EPERM: "check the permissions of the path, or choose another location",
    errno.EROFS: "the file system is read-only; choose another location",
    errno.ENOSPC: "the disk is full; free space and re-run the same command (it resumes)",
    errno.EDQUOT: "the disk quota is exhausted; free space and re-run the same command (it resumes)",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a directory; check the path",
    errno.EISDIR: "the path is a directory where a file was expected; check the path",
}


def describe_fault(e: BaseException) -> str:
    """``<what>, <where>, <what to do>`` for an OSError or a decoding error."""
    if isinstance(e, UnicodeDecodeError):
        return (f"a file is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                "save it as UTF-8 and re-run")
    what = e.strerror or str(e) or type(e).__name__
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f) or "(no path given)"
    advice = _ADVICE.get(e.errno, "check the path and the machine, then re-run the same command")
    return f"{what}, {where}, {advice}"


if __name__ == "__main__":
    code = main()
    from .distributed import is_distributed

    if is_distributed():
        # A rank of torchrun / accelerate launch (they start ranks as `python -m subliminal.cli`):
        # its outputs are written and its process group is gone (finish()), but gloo's threads can
        # still abort the interpreter's teardown ("terminate called without an active exception",
        # exit -6) and fail a job that succeeded. Leave without the C++ teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
