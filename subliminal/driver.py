"""How ``subliminal run`` decides what to do with each stage's output: one resume rule for all.

A stage's output is reused only when the fingerprint recorded with it (the stage's own
fingerprint of its inputs' contents and its settings, :mod:`subliminal.manifest`) equals the one
the stage would compute now; the driver never decides by whether a file exists. It asks each
stage by calling it under :func:`subliminal.manifest.planning`, where the stage stops at its
resume check and says what it would do (:class:`~subliminal.manifest.Planned`), so the driver
and a user running the stage by hand take the same decision.

A stage downstream of one that is (or will be) redone is decided after that one has run (its
inputs change, so does its fingerprint); a dry run lists it as "after" its upstream stage.
Replacing a finished output needs ``--overwrite``, as for the stages themselves: a first pass
over the whole run (:attr:`Runner.dry`) collects every replacement before anything runs.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Union

from .manifest import MANIFEST, Planned, SubliminalError, planning

log = logging.getLogger(__name__)

# The stages the driver calls as functions: sub-command -> "module:function" taking the stage's
# config dataclass (whose field names are the sub-command's flags).
STAGE_RUNS = {"distill": "subliminal.distill:run_distill", "generate": "subliminal.generate:run_generate",
              "find-divergence": "subliminal.divergence:find_divergence", "eval": "subliminal.evaluate:run_eval",
              "teach": "subliminal.teachers_cli:run_teach", "project": "subliminal.project:run",
              "score-tokens": "subliminal.detectors:run"}


def config_argv(command: str, cfg: Any) -> list[str]:
    """The one place a command line is made from a stage config: only where a launcher needs one
    (torchrun for ``nproc`` > 1). Every field that differs from its default becomes its flag
    (``lora_rank`` -> ``--lora-rank``, or the config's own ``FLAGS`` entry: generate's ``n`` is
    ``--num-prompts``, which torchrun's parser leaves alone); ``overwrite`` is the caller's."""
    names = getattr(type(cfg), "FLAGS", {})
    argv = [command]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if f.name == "overwrite" or (has_default and value == default) or value is None:
            continue
        flag = names.get(f.name, "--" + f.name.replace("_", "-"))
        if isinstance(value, bool):
            if value:
                argv.append(flag)
            continue
        argv += [flag, *(str(v) for v in value)] if isinstance(value, (list, tuple)) else [flag, str(value)]
    return argv


@dataclass
class StageCall:
    """A stage called as a function with its typed config: ``call(overwrite)`` runs it (returns
    its exit status); :meth:`argv` is its command line, for a launcher."""

    command: str
    cfg: Any

    def __call__(self, overwrite: bool) -> int:
        module, fn = STAGE_RUNS[self.command].split(":")
        rv = getattr(importlib.import_module(module), fn)(replace(self.cfg, overwrite=overwrite))
        return rv if isinstance(rv, int) else 0  # a stage that returns its summary has succeeded

    def argv(self) -> list[str]:
        return config_argv(self.command, self.cfg)

    def __str__(self) -> str:
        return " ".join(self.argv())


# A stage as the driver calls it: a stage config (StageCall), a sub-command's argv (the stages not
# yet called as functions), or a function of ``overwrite`` (the driver's own derived files)
# that makes its output through the same resume check.
Call = Union[StageCall, list[str], Callable[[bool], Any]]

# Sub-commands that run data-parallel under torchrun (rows sharded, or the global batch split).
DISTRIBUTED = {"toy", "teach", "generate", "find-divergence", "diagnose", "distill", "eval", "probe", "patch",
               "score-tokens"}


def launch_argv(argv: list[str], nproc: int) -> list[str]:
    """The command that runs ``subliminal ARGV`` on ``nproc`` processes (torchrun, one node)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "subliminal.cli", *argv]


def plan_call(call: Call) -> Planned:
    """The stage's own resume decision for ``call``, without running it."""
    with planning():
        try:
            if callable(call):  # a StageCall too: the stage run as a function
                call(False)
            else:
                from .cli import build_parser

                args = build_parser().parse_args(call)
                args.func(args)
        except Planned as p:
            return p
    what = call if not callable(call) else getattr(call, "__name__", "a derived file")
    raise SubliminalError(f"stage {what}: did not reach its resume check (a bug: every stage has one)")


def has_output(out: str | Path) -> bool:
    """Whether ``out`` holds a finished stage output (a manifest of its own), which redoing the
    stage would replace: asked only to know whether ``--overwrite`` is needed, never to reuse."""
    p = Path(out)
    return (p / MANIFEST).is_file() if p.is_dir() else (p.parent / (p.name + ".manifest.json")).is_file()


@dataclass
class Decision:
    """What the driver does with one stage's output, and why (printed, and listed by --dry-run)."""

    name: str
    out: str
    action: str  # reuse | run | resume | replace | after
    why: str
    replaces: bool = False  # a finished output would be replaced (needs --overwrite)

    def line(self) -> str:
        verb = {"reuse": "reuse", "run": "run", "resume": "resume", "replace": "redo", "after": "after"}[self.action]
        return f"{verb:<6} {self.name}: {self.why}"


def decide(name: str, call: Call, out: str | Path, upstream: str | None) -> Decision:
    """The decision for one stage: after ``upstream`` when that stage is redone (in a dry run its
    output is not there yet to fingerprint), else the stage's own answer."""
    if upstream is not None:
        return Decision(name, str(out), "after", f"decided once {upstream} has run (its input is remade; "
                        "redone if that changes its fingerprint)", replaces=has_output(out))
    p = plan_call(call)
    return Decision(name, str(out), p.action, p.why(), replaces=p.action == "replace")


class Runner:
    """Runs the stages of a run, each only when its fingerprint says so: in-process, or with
    ``nproc`` > 1 each data-parallel stage under torchrun (rank 0 writes, the output is the
    one-process output).

    With ``dry``, nothing runs: every decision is recorded (``decisions``) and a stage whose input
    comes from a stage that would run is listed after it. ``overwrite`` allows replacing finished
    outputs; a stage marked ``derived`` (the report) is always remade when its inputs changed."""

    def __init__(self, out: Path, verbose: bool = False, nproc: int = 1, *, overwrite: bool = False,
                 dry: bool = False, quiet: bool = False):
        self.out = out
        self.timings: dict[str, float] = {}
        self.verbose = verbose
        self.nproc = nproc
        self.overwrite = overwrite
        self.dry = dry
        self.quiet = quiet  # decisions logged at debug level only (the check pass before a run)
        self.decisions: list[Decision] = []
        self.pending: dict[str, str] = {}  # output path -> the stage that (re)makes it in this run

    def upstream(self, inputs: Sequence[str | Path]) -> str | None:
        """The stage of this run that remakes one of ``inputs``, if any (dry runs only: a real run
        has made it by then, and the stage's fingerprint sees the new content)."""
        if not self.dry:
            return None
        for p in inputs:
            if str(Path(p)) in self.pending:
                return self.pending[str(Path(p))]
        return None

    def _note(self, d: Decision, derived: bool = False, also: Sequence[str | Path] = ()) -> Decision:
        self.decisions.append(d)
        if d.action != "reuse":
            for p in [d.out, *also]:
                self.pending[str(Path(p))] = d.name
        if derived:
            d.replaces = False
        log.log(logging.DEBUG if d.action == "reuse" or self.quiet else logging.INFO, "[run] %s", d.line())
        return d

    def __call__(self, name: str, call: Call | Callable[[], Call], out: str | Path,
                 inputs: Sequence[str | Path] = (), *, derived: bool = False, lazy: bool = False,
                 also: Sequence[str | Path] = ()) -> bool:
        """Decide the stage ``name`` writing ``out`` (and ``also``, written with it) from ``inputs``
        and run it unless its output is reused; True when it (would have) run. ``lazy``: ``call``
        is a function that builds the call, for calls that read an upstream output (built only
        once that output is there)."""
        up = self.upstream(inputs)
        built = None if up is not None else (call() if lazy else call)
        d = self._note(decide(name, built, out, up), derived, also)
        if d.action == "reuse" or self.dry:
            return d.action != "reuse"
        overwrite = d.action == "replace"
        if overwrite and not (self.overwrite or derived):
            raise SubliminalError(f"{out}: {d.why}; pass --overwrite to replace it")
        t0 = time.time()
        if isinstance(built, StageCall) and not (self.nproc > 1 and built.command in DISTRIBUTED):
            rc = built(overwrite)
        elif callable(built) and not isinstance(built, StageCall):
            built(overwrite)
            rc = 0
        else:
            argv = built.argv() if isinstance(built, StageCall) else built
            rc = self._invoke([*argv, *(["--overwrite"] if overwrite else [])])
        self.timings[name] = self.timings.get(name, 0.0) + time.time() - t0
        if rc != 0:
            shown = str(built) if isinstance(built, StageCall) else " ".join(built)
            raise SubliminalError(f"stage {name!r} failed (exit {rc}): subliminal {shown}; fix the cause and "
                                  "re-run the same command (finished stages are kept)")
        return True

    def _invoke(self, argv: list[str]) -> int:
        from .cli import main as cli_main

        if self.nproc > 1 and argv[0] in DISTRIBUTED:
            import subprocess

            return subprocess.run(launch_argv(argv, self.nproc)).returncode
        return cli_main(argv)

    def parallel(self, tasks: list[tuple[str, list[tuple[str, Call, str]]]], workers: int) -> None:
        """Independent chains of stages (a student and its evaluation) on ``workers`` processes;
        each chain is ``(name, [(stage name, argv, out), ...])``, every stage the input of the
        next; every chain is seeded on its own, so the results do not depend on ``workers``.
        Under ``nproc`` > 1 (or in a dry run) the chains run one after the other in this process."""
        from tqdm.auto import tqdm

        if self.nproc > 1 or self.dry:
            for _, chain in tasks:
                prev: list[str] = []
                for stage, argv, out in chain:
                    self(stage, argv, out, inputs=prev)
                    prev = [out]
            return
        todo = []
        for name, chain in tasks:  # the first stage decided here; the rest after it, in the worker
            first, argv, out = chain[0]
            d = self._note(decide(first, argv, out, None))
            if d.action != "reuse":
                todo.append((name, chain))
                continue
            rest = chain[1:]
            while rest:
                d = self._note(decide(rest[0][0], rest[0][1], rest[0][2], None))
                if d.action != "reuse":
                    todo.append((name, rest))
                    break
                rest = rest[1:]
        log.info("[run] %d evaluation and student jobs to run (%d reused), %d worker(s)", len(todo), len(tasks) - len(todo),
                 workers)
        if not todo:
            return
        plain = [(name, [(stage, argv) for stage, argv, _ in chain]) for name, chain in todo]
        bar = tqdm(total=len(plain), desc="students", unit="job")
        if workers <= 1:
            results = ((name, run_chain(chain, _default_threads(), self.overwrite)) for name, chain in plain)
            for name, (rc, dt, argv, msg) in results:
                self._record(name, rc, dt, argv, msg)
                bar.update(1)
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor, as_completed

            with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
                futures = {ex.submit(run_chain, chain, 1, self.overwrite): name for name, chain in plain}
                for fut in as_completed(futures):
                    rc, dt, argv, msg = fut.result()
                    self._record(futures[fut], rc, dt, argv, msg)
                    bar.update(1)
        bar.close()

    def _record(self, name: str, rc: int, dt: float, argv: str, msg: str) -> None:
        self.timings[name] = self.timings.get(name, 0.0) + dt
        if msg:
            raise SubliminalError(msg)
        if rc != 0:
            raise SubliminalError(f"stage {name!r} failed (exit {rc}): subliminal {argv}")


def _default_threads() -> int:
    import torch

    return torch.get_num_threads()


def run_chain(chain: list[tuple[str, Call]], threads: int, overwrite: bool) -> tuple[int, float, str, str]:
    """Run named sub-commands one after the other in a worker process (one torch thread each, so
    workers on separate cores do not fight over them), each decided by its fingerprint once the
    one before it has run (the first was decided, and said, by the caller); stop at the first
    failure. Returns (exit code, seconds, the failed command, an error message)."""
    import torch

    from .cli import guarded
    from .cli import main as cli_main

    torch.set_num_threads(threads)
    t0 = time.time()
    for i, (name, call) in enumerate(chain):
        shown = str(call) if isinstance(call, StageCall) else " ".join(call)
        try:
            p = plan_call(call)
        except SubliminalError as e:
            return 2, time.time() - t0, shown, str(e)
        if p.action == "reuse":
            continue
        if i:
            log.info("[run] %s", Decision(name, p.out, p.action, p.why()).line())
        if p.action == "replace" and not overwrite:
            return 2, time.time() - t0, shown, f"{p.out}: {p.why()}; pass --overwrite to replace it"
        if isinstance(call, StageCall):
            rc = guarded(call, p.action == "replace")  # the stage's own error boundary, as on the command line
        else:
            rc = cli_main([*call, *(["--overwrite"] if p.action == "replace" else [])])
        if rc != 0:
            return rc, time.time() - t0, shown, ""
    return 0, time.time() - t0, "", ""
