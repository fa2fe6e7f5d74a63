"""The launcher facts in one place: rank, world size, shards of rows, and how ranks agree.

Why this module: every inference stage (generate, find-divergence, eval, activation capture,
poison scoring) runs data-parallel under ``torchrun --nproc-per-node N subliminal ...`` or
``accelerate launch -m subliminal.cli ...`` without a scheduler of our own. Both launchers set
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; that is all this module reads. Without a launcher
(no ``WORLD_SIZE``, or ``WORLD_SIZE=1``) every function here is a no-op that returns what a
single process would, and no process group is ever created, so a one-process run is the code
path it always was.

Shards are **contiguous** row ranges (rank r takes rows ``[start_r, stop_r)``, the first
``n % world`` ranks one row more). Contiguous rather than strided because the merged output is
then the plain concatenation of the shards in rank order, a shard is described by two numbers
in the manifest (``"shards": [[start, stop], ...]``) and a part file names its range; strided
shards would balance a file sorted by length better, but our rows are in prompt order, whose
lengths do not trend.

Failure: each phase of a sharded stage runs inside :func:`agree`, which catches the rank's own
exception and then exchanges one small status object between all ranks; if any rank failed,
the failing rank re-raises its own error and every other rank raises :class:`RankFailedError`
naming that rank and its message, so no rank is left waiting in a collective for a peer that
has already given up, and nothing is merged or written. A rank that dies outright (killed,
out of memory) is the launcher's to handle: torchrun stops the other workers. As a last guard
the process group has a timeout (``SUBLIMINAL_DIST_TIMEOUT`` seconds, default 4 hours: a
resumed run's ranks may wait at the status exchange for a peer whose shard had more rows left).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .manifest import ResumeError, SubliminalError, read_json, write_json_atomic

log = logging.getLogger(__name__)
DEFAULT_TIMEOUT_S = 4 * 3600
TIMEOUT_ENV = "SUBLIMINAL_DIST_TIMEOUT"
FAIL_ENV = "SUBLIMINAL_TEST_FAIL_RANK"  # tests: "RANK:PHASE" makes that rank raise in that phase


class RankFailedError(SubliminalError):
    """Another rank of this job failed; its rank and message are in this error's text."""


@dataclass(frozen=True)
class Launch:
    """What the launcher told this process (``world_size == 1`` without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError:
        raise SubliminalError(f"environment variable {name}={raw!r} is not an integer; the launcher (torchrun / "
                              "accelerate launch) sets it, unset it to run one process") from None


def launch() -> Launch:
    """Rank, world size and local rank from the environment torchrun and accelerate set."""
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return Launch()
    rank = _env_int("RANK", 0)
    if not 0 <= rank < world:
        raise SubliminalError(f"RANK={rank} is outside WORLD_SIZE={world}; start the job through torchrun or "
                              "accelerate launch")
    return Launch(rank, world, _env_int("LOCAL_RANK", rank))


def world_size() -> int:
    return launch().world_size


def rank() -> int:
    return launch().rank


def is_distributed() -> bool:
    """True under a launcher with more than one process."""
    return launch().world_size > 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that merges, writes outputs and prints."""
    return launch().rank == 0


def timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw in (None, ""):
        return float(DEFAULT_TIMEOUT_S)
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise SubliminalError(f"{TIMEOUT_ENV}={raw!r}: give the process-group timeout in seconds (> 0)")
    return value


def rank_device(device: Any) -> Any:
    """Under a launcher on CUDA, ``cuda`` (or ``auto``) means this rank's GPU, ``cuda:LOCAL_RANK``;
    an explicit ``cuda:N`` and every other device are kept as given."""
    import torch

    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if dev.type == "cuda" and dev.index is None and is_distributed():
        return torch.device("cuda", launch().local_rank)
    return dev


def init(device: Any = "cpu") -> None:
    """Create the process group once, when first needed (gloo on CPU, nccl on CUDA, with the
    timeout above); a no-op without a launcher or when one exists already."""
    if not is_distributed():
        return
    import torch
    import torch.distributed as td

    if td.is_initialized():
        return
    try:
        dev = rank_device(device if device not in (None, "auto")
                          else ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError):  # a bad --device: the stage names it; the group still forms
        dev = torch.device("cpu")
    backend = "nccl" if dev.type == "cuda" and torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(dev)
    td.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s()))
    atexit.register(_shutdown)


def finish() -> None:
    """A command that succeeded on every rank: meet once more, then destroy the process group
    while every rank is alive. Left to interpreter exit, gloo's threads can abort a rank
    ("terminate called without an active exception") after its output is written, failing the
    job. Not called after an error: a rank waiting here for a peer that crashed would hang."""
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        with contextlib.suppress(Exception):
            td.barrier()
        with contextlib.suppress(Exception):
            td.destroy_process_group()


def _shutdown() -> None:
    import torch.distributed as td

    if td.is_initialized():
        with contextlib.suppress(Exception):
            td.destroy_process_group()


def _group_ready() -> bool:
    if not is_distributed():
        return False
    import torch.distributed as td

    if not td.is_initialized():
        init("auto")
    return True


def barrier() -> None:
    if _group_ready():
        import torch.distributed as td

        td.barrier()


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` without a launcher)."""
    if not _group_ready():
        return [obj]
    import torch.distributed as td

    out: list[Any] = [None] * world_size()
    td.all_gather_object(out, obj)
    return out


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on rank 0, None on the others (``[obj]`` alone)."""
    if not _group_ready():
        return [obj]
    import torch.distributed as td

    out: list[Any] | None = [None] * world_size() if is_main() else None
    td.gather_object(obj, out, dst=0)
    return out


def merge_in_order(per_rank: Sequence[Sequence[Any]]) -> list[Any]:
    """Concatenate rank-ordered shard results: with contiguous shards this is row order."""
    return [x for part in per_rank for x in part]


# ---------------------------------------------------------------------------------- shards


def shard_bounds(n_rows: int, world: int | None = None) -> list[tuple[int, int]]:
    """``[start, stop)`` of every rank's contiguous shard of ``n_rows`` rows (see the module
    docstring for why contiguous); sizes differ by at most one, earlier ranks take the extra."""
    world = world_size() if world is None else world
    if n_rows < 0 or world < 1:
        raise ValueError(f"shard_bounds({n_rows}, {world})")
    base, extra = divmod(n_rows, world)
    out, start = [], 0
    for r in range(world):
        stop = start + base + (1 if r < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def shard(n_rows: int) -> range:
    """This rank's rows of ``n_rows`` (all of them without a launcher)."""
    start, stop = shard_bounds(n_rows)[rank()]
    return range(start, stop)


def batch_shard_bounds(n_rows: int, batch_size: int, world: int | None = None) -> list[tuple[int, int]]:
    """``[start, stop)`` of every rank's rows when the shards are made of whole batches: the batches
    of ``batch_size`` rows a one-process run makes, split contiguously over the ranks (sizes differ
    by at most one batch). Why: where a row's numbers depend, in the last bits, on the rows padded
    with it in a forward (a sum over parameters, padded attention), every batch is then the batch
    one process scores, so the numbers are bit-identical whatever the number of processes."""
    if batch_size < 1:
        raise ValueError(f"batch_shard_bounds({n_rows}, {batch_size})")
    n_batches = -(-n_rows // batch_size)
    return [(min(a * batch_size, n_rows), min(b * batch_size, n_rows)) for a, b in shard_bounds(n_batches, world)]


def batch_shard(n_rows: int, batch_size: int) -> range:
    """This rank's rows of ``n_rows`` in whole batches (:func:`batch_shard_bounds`; all of them alone)."""
    start, stop = batch_shard_bounds(n_rows, batch_size)[rank()]
    return range(start, stop)


def shard_record(n_rows: int) -> dict[str, Any]:
    """What a manifest records about the split: ``world_size`` and each rank's ``[start, stop)``."""
    return {"world_size": world_size(), "shards": [list(b) for b in shard_bounds(n_rows)]}


# --------------------------------------------------------------------------- agreement


def _fail_hook(phase: str) -> None:
    """Tests make one rank fail in one phase through ``SUBLIMINAL_TEST_FAIL_RANK=RANK:PHASE``."""
    spec = os.environ.get(FAIL_ENV, "")
    if not spec:
        return
    want_rank, _, want_phase = spec.partition(":")
    if want_rank == str(rank()) and want_phase == phase:
        raise SubliminalError(f"injected failure in phase {phase!r} ({FAIL_ENV}={spec})")


def _describe(e: BaseException) -> str:
    if isinstance(e, SubliminalError):
        return str(e)
    return f"{type(e).__name__}: {e}"


@contextlib.contextmanager
def agree(phase: str) -> Iterator[None]:
    """Run one phase of a sharded stage on every rank, then make every rank agree whether it
    succeeded. Without a launcher it is transparent (errors propagate as they are)."""
    if not is_distributed():
        yield
        _fail_hook(phase)
        return
    error: Exception | None = None
    try:
        yield
        _fail_hook(phase)
    except Exception as e:  # noqa: BLE001 -- reported to every rank, then re-raised below
        error = e
    statuses = all_gather(None if error is None else _describe(error))
    if isinstance(error, SubliminalError):
        raise SubliminalError(f"rank {rank()} of {world_size()}: {error}") from error
    if error is not None:
        raise error  # a bug: its own traceback
    failed = [(r, msg) for r, msg in enumerate(statuses) if msg is not None]
    if failed:
        r, msg = failed[0]
        others = f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
        raise RankFailedError(f"rank {r} of {world_size()} failed in {phase}{others}: {msg}; the job stopped "
                              "on every rank and wrote no output (re-run the same command to resume)")


def progress_disabled(progress: bool = True) -> bool:
    """tqdm's ``disable``: bars only on rank 0, and only when asked for."""
    return (not progress) or not is_main()


def quiet_other_ranks() -> None:
    """Log and print warnings from rank 0 only (other ranks keep errors)."""
    if is_distributed() and not is_main():
        logging.getLogger().setLevel(logging.ERROR)
        for name in ("subliminal", "transformers", "accelerate"):
            logging.getLogger(name).setLevel(logging.ERROR)


# ------------------------------------------------------------------------------ part files


def read_complete_lines(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of an append-only JSONL file another process may still be appending to, or that
    a kill cut mid-line: only complete lines (up to the last newline) count; a damaged complete
    line is an error naming ``file:line``."""
    import json

    p = Path(path)
    if not p.is_file():
        return []
    data = p.read_bytes()
    data = data[: data.rfind(b"\n") + 1]
    out = []
    for n, line in enumerate(data.decode("utf-8", errors="strict").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise SubliminalError(f"{p}:{n}: not valid JSON ({e.msg}); delete the file to redo its rows") from None
    return out


def shards_dir_for(out: str | os.PathLike) -> Path:
    """``data/owl.div.jsonl`` -> ``data/.shards/owl.div.jsonl/``: where the ranks' part files of
    an unfinished sharded run live (hidden, next to the output, removed once it is written)."""
    out = Path(out)
    return out.parent / ".shards" / out.name


class ShardParts:
    """The part files of one output under :func:`shards_dir_for`, tied to the run's fingerprint.

    Two kinds of part: row parts (``rows-START-STOP.jsonl``: one JSON line per finished row,
    appended as rows finish, for stages that resume row by row) and shard parts
    (``shard-START-STOP.json``: one rank's whole result, written atomically when its shard is
    done, for stages whose unit is the shard). Only rank 0 clears or (re)writes the fingerprint;
    every rank reads all parts, so a run resumed with another number of processes still uses
    every row already done."""

    FP_FILE = "fingerprint.json"

    def __init__(self, out: str | os.PathLike, fp: dict[str, Any]):
        self.out = Path(out)
        self.dir = shards_dir_for(out)
        self.fp = fp

    def exists(self) -> bool:
        return self.dir.is_dir() and any(self.dir.iterdir())

    def check(self, *, overwrite: bool) -> None:
        """Refuse parts made by another run (unless ``overwrite``, which clears them at start)."""
        if not self.exists() or overwrite:
            return
        fp_file = self.dir / self.FP_FILE
        have = read_json(fp_file, "shard fingerprint") if fp_file.is_file() else None
        if have != self.fp:
            from .manifest import fingerprint_diff

            why = "; ".join(fingerprint_diff(have, self.fp)) if have is not None else "no fingerprint"
            raise ResumeError(f"{self.out}: {self.dir} holds part files of an unfinished run made with other inputs "
                              f"or settings ({why}); resuming would mix two runs; pass --overwrite to replace it, "
                              f"or choose another --out than {self.out}")

    def start(self, *, clear: bool) -> None:
        """Rank 0: clear old parts when starting over, and record this run's fingerprint."""
        if not is_main():
            return
        if clear and self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.dir / self.FP_FILE, self.fp)

    def row_part(self, start: int, stop: int) -> Path:
        return self.dir / f"rows-{start:09d}-{stop:09d}.jsonl"

    def done_rows(self) -> list[dict[str, Any]]:
        """Every row in every row part (a kill mid-line leaves a partial last line: skipped)."""
        out: list[dict[str, Any]] = []
        for f in sorted(self.dir.glob("rows-*.jsonl")) if self.dir.is_dir() else []:
            out.extend(read_complete_lines(f))
        return out

    def shard_part(self, start: int, stop: int, tag: str = "") -> Path:
        return self.dir / f"shard-{tag}{start:09d}-{stop:09d}.json"

    def load_shard(self, start: int, stop: int, tag: str = "") -> Any | None:
        """A finished shard's result from an earlier (interrupted) run of this fingerprint.
        ``tag`` tells apart shards of a second axis (eval: held-out rows beside questions)."""
        p = self.shard_part(start, stop, tag)
        if not p.is_file():
            return None
        obj = read_json(p, "shard part")
        return obj.get("result") if isinstance(obj, dict) and obj.get("fingerprint") == self.fp else None

    def save_shard(self, start: int, stop: int, result: Any, tag: str = "") -> None:
        write_json_atomic(self.shard_part(start, stop, tag), {"fingerprint": self.fp, "rows": [start, stop],
                                                              "result": result})

    def remove(self) -> None:
        """Rank 0, after the merged output and its manifest are written."""
        if is_main() and self.dir.exists():
            shutil.rmtree(self.dir)
            with contextlib.suppress(OSError):
                self.dir.parent.rmdir()  # .shards/ itself, when no other output uses it
