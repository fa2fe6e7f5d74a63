"""Running ``subliminal`` under a real launcher in tests: one place for the environment a
child process gets (no inherited rank variables, one thread, offline), for running several
commands in one launch, and for comparing outputs the way DESIGN.md states process invariance
(exact, floats within 1e-5).

Run as a script (by :func:`run_cli_sequence`, under torchrun) it is that sequence's worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from subliminal import distributed as dist


def launch_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", dist.FAIL_ENV)}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", **extra)
    return env


def run_cli(argv: list[str], *, nproc: int = 2, cwd: Path | None = None, timeout: float = 240,
            **env: str) -> subprocess.CompletedProcess:
    """``subliminal ARGV`` as a child process: plain for ``nproc`` 1, else under torchrun."""
    launcher = [sys.executable, "-m", "subliminal.cli"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "-m", "subliminal.cli"]
    return subprocess.run(launcher + [str(a) for a in argv], cwd=cwd, env=launch_env(**env), capture_output=True,
                          text=True, timeout=timeout)


SEQUENCE_MARK = "=== launch_helpers: command "


def run_cli_sequence(argvs: list[list[Any]], *, nproc: int = 2, cwd: Path | None = None, timeout: float = 600,
                     **env: str) -> list[str]:
    """``subliminal ARGV`` for each of ``argvs``, in order, in one torchrun launch of ``nproc``
    processes; every command must succeed. Returns each command's stderr.

    Why: a launch costs seconds of start-up (the agent and every rank import torch and
    transformers) whatever it runs, so tests whose two-process commands share their inputs pay it
    once. Each rank runs the commands one after another as the CLI would (``main``: its own
    process group, formed when first needed, met and destroyed at the end by ``finish``); a
    destroyed group cannot form again from the launcher's ``env://`` keys, so the commands after
    the first get a fresh group (gloo: these tests run on the CPU) from the launcher's store under a
    key prefix of their own."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump([[str(a) for a in argv] for argv in argvs], f)
    try:
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc-per-node={nproc}", __file__, f.name], cwd=cwd, env=launch_env(**env),
                           capture_output=True, text=True, timeout=timeout)
    finally:
        os.unlink(f.name)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    chunks = p.stderr.split(SEQUENCE_MARK)[1:]
    assert len(chunks) == len(argvs), p.stderr[-3000:]
    return chunks


def _run_sequence(path: str) -> int:
    """The worker of :func:`run_cli_sequence` on one rank."""
    import datetime

    import torch.distributed as td

    from subliminal.cli import main

    for i, argv in enumerate(json.loads(Path(path).read_text())):
        if i:
            store = td.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                timeout=datetime.timedelta(seconds=dist.timeout_s()))
            td.init_process_group("gloo", store=td.PrefixStore(f"command-{i}", store), rank=dist.rank(),
                                  world_size=dist.world_size(), timeout=datetime.timedelta(seconds=dist.timeout_s()))
        if dist.is_main():
            print(f"{SEQUENCE_MARK}{i}: {' '.join(argv[:1])}", file=sys.stderr, flush=True)
        rc = main(argv)
        if rc:
            return rc
    return 0


def assert_close(a: Any, b: Any, path: str = "") -> None:
    """Equal, except floats within 1e-5 (process invariance as DESIGN.md states it)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            assert_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (path, a, b)
    else:
        assert a == b, (path, a, b)


def assert_same_weights(a: dict[str, Any], b: dict[str, Any], *, max_abs: float = 1e-4) -> None:
    """Two students' weights equal within float rounding: another summation order of a batch's
    gradients (ranks, micro-batches) can move a weight whose gradient is near zero a little further,
    since Adam divides by sqrt(v) (one weight by 1.3e-5 / 2.9e-4 on one machine); a wrong split or
    weighting of the batch would move most weights (the median update is ~1e-2 of the lr)."""
    import torch

    assert a.keys() == b.keys()
    d = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert (d > 1e-5).float().mean().item() < 1e-3 and d.max().item() < max_abs, \
        (d.max().item(), (d > 1e-5).sum().item())


if __name__ == "__main__":
    sys.exit(_run_sequence(sys.argv[1]))
