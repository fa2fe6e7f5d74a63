"""Atomic writes, seeds and the ``manifest.json`` every output directory carries.

Every stage writes its outputs through these helpers so an interrupted run never leaves a
half-written file behind, and so any output can be traced back to the command, config, seed,
code version and inputs that made it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


class SubliminalError(Exception):
    """An error the user can act on: the CLI prints its message and exits non-zero."""


class ResumeError(SubliminalError):
    """An output (finished or partial) made with other inputs or settings than this run's."""


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only on success.

    The file gets the mode ``open`` would give it (0666 less the umask): ``mkstemp`` makes its
    files 0600, which would hide every output from the rest of a group sharing a directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_figure_atomic(fig: Any, path: str | os.PathLike, *, dpi: int = 120) -> None:
    """A matplotlib figure laid out, written as a PNG atomically (a reader never sees half an image,
    an interrupted write never replaces a finished one) and closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)


def write_json_atomic(path: str | os.PathLike, obj: Any, *, nan_as_null: bool = False) -> None:
    """Strict JSON (no bare ``NaN``/``Infinity``): see :func:`strict_json`. ``nan_as_null`` is for
    outputs where an undefined number is expected (a probe's AUC on one class): it is written as
    ``null`` everywhere in ``obj``."""
    write_text_atomic(path, json.dumps(strict_json(to_jsonable(obj), str(path), _ci=nan_as_null), indent=2,
                                       sort_keys=False, allow_nan=False) + "\n")


def dumps_line(obj: Any, where: str = "a JSONL row") -> str:
    """One strict JSONL line (the JSONL writers' only serialiser)."""
    return json.dumps(strict_json(obj, where), ensure_ascii=False, allow_nan=False)


def _is_ci_key(key: str) -> bool:
    return key == "ci" or key.endswith(("_ci", "ci_low", "ci_high", "ci_lo", "ci_hi"))


def strict_json(obj: Any, where: str, _key: str = "", _ci: bool = False) -> Any:
    """``obj`` with every float finite, for a JSON file other tools can read.

    The one place a non-finite number is written on purpose is a confidence interval that
    cannot be claimed (one seed, one question: ``mean_ci`` gives NaN): under a key ``ci``,
    ``*_ci``, ``*ci_low`` or ``*ci_high`` it becomes ``null``. Any other NaN/inf is a fault upstream and stops the write
    with the key that holds it, rather than leaving a file no JSON parser accepts."""
    if isinstance(obj, float) and not math.isfinite(obj):
        if _ci:
            return None
        raise SubliminalError(f"{where}: refusing to write the non-finite number {obj} at {_key or 'top level'} "
                              "(JSON has no NaN/inf); the model or data that produced it is broken")
    if isinstance(obj, dict):
        return {k: strict_json(v, where, f"{_key}.{k}" if _key else str(k), _ci or _is_ci_key(str(k)))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [strict_json(v, where, f"{_key}[{i}]", _ci) for i, v in enumerate(obj)]
    return obj


def to_jsonable(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return obj


def set_seed(seed: int) -> None:
    """Seed every generator a stage may touch, and make CPU kernels deterministic."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def file_sha256(path: str | os.PathLike, limit_bytes: int = 1 << 30) -> str:
    """Hash of a file's first ``limit_bytes`` (weights can be huge; the prefix identifies them)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = limit_bytes
        while remaining > 0:
            chunk = f.read(min(1 << 20, remaining))
            if not chunk:
                break
            h.update(chunk)
            remaining -= len(chunk)
    return h.hexdigest()


def input_hash(path: str | os.PathLike) -> str | None:
    """A short fingerprint of an input file or directory (for directories: its small files)."""
    p = Path(path)
    if p.is_file():
        return file_sha256(p)[:16]
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(p.iterdir()):
            if f.is_file() and f.stat().st_size < (64 << 20) and not f.name.startswith("."):
                h.update(f.name.encode())
                h.update(file_sha256(f).encode())
        return h.hexdigest()[:16]
    return None


@functools.cache
def git_commit() -> str | None:
    """The checkout's commit, asked once per process (a ``git`` child process for every manifest
    cost ~5 ms each): the code a process runs is what it imported, whatever is committed later."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str]:
    """The versions of Python and of the packages that make the numbers (a new dict each call)."""
    return dict(_package_versions())


@functools.cache
def _package_versions() -> tuple[tuple[str, str], ...]:
    """Looked up once per process: each lookup scans every installed distribution (~5 ms for
    the eight), and every manifest and every stage fingerprint (a run plans each of its stages
    by one) asks; the packages a running process has imported do not change under it."""
    from importlib import metadata

    names = ["subliminal-lens", "torch", "transformers", "peft", "triton", "numpy", "transformer-lens", "nnsight"]
    out = [("python", platform.python_version())]
    for n in names:
        try:
            out.append((n, metadata.version(n)))
        except metadata.PackageNotFoundError:
            pass
    return tuple(out)


def write_manifest(
    out_dir: str | os.PathLike,
    *,
    stage: str,
    config: Any,
    seed: int | None,
    inputs: dict[str, str | os.PathLike | None] | None = None,
    wall_time_s: float | None = None,
    extra: dict[str, Any] | None = None,
    filename: str = MANIFEST,
) -> Path:
    """Write ``manifest.json`` into ``out_dir`` (atomically) and return its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = {
        "stage": stage,
        "command": " ".join(sys.argv),
        "config": to_jsonable(config),
        "seed": seed,
        "versions": package_versions(),
        "git_commit": git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_time_s": None if wall_time_s is None else round(wall_time_s, 3),
        "inputs": {k: {"path": str(v), "hash": input_hash(v)} for k, v in (inputs or {}).items() if v},
    }
    if extra:
        manifest.update(to_jsonable(extra))
    path = out_dir / filename
    write_json_atomic(path, manifest)
    return path


def read_manifest(out_dir: str | os.PathLike, filename: str = MANIFEST) -> dict[str, Any] | None:
    path = Path(out_dir) / filename
    if not path.is_file():
        return None
    return read_json(path, "manifest")


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """A JSON file the stages wrote; a damaged one is an error naming it, not a traceback."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise SubliminalError(f"{path}: {what} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                              f"{e.start}); restore or delete it") from None
    except json.JSONDecodeError as e:
        raise SubliminalError(f"{path}: {what} is not valid JSON ({e.msg}, line {e.lineno}); restore or "
                              "delete it") from None


def write_file_manifest(path: str | os.PathLike, **kwargs: Any) -> Path:
    """Manifest for a single-file output such as ``data/owl.jsonl``.

    Writes ``owl.jsonl.manifest.json`` beside the file and records the same entry under
    ``files`` in the directory's ``manifest.json``, so several outputs can share a directory and
    the directory still has its one manifest.
    """
    path = Path(path)
    own = write_manifest(path.parent, filename=path.name + ".manifest.json", **kwargs)
    entry = json.loads(own.read_text())
    dir_manifest = read_manifest(path.parent) or {"stage": "directory", "files": {}}
    dir_manifest.setdefault("files", {})[path.name] = entry
    write_json_atomic(path.parent / MANIFEST, dir_manifest)
    return own


def read_file_manifest(path: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(path)
    return read_manifest(path.parent, filename=path.name + ".manifest.json")


# ------------------------------------------------------------------------------ fingerprints
#
# A stage resumes, or skips a finished output, only when the fingerprint of this run equals the
# one recorded with the output: the inputs' content hashes, the settings that shape the output,
# and the versions of the packages that change numerics. Anything else is refused, naming what
# differs, so two experiments never mix in one output and a finished one is never silently
# replaced (``--overwrite`` replaces it on purpose).

NUMERIC_PACKAGES = ("torch", "transformers", "peft")
HUB_PREFIX = "hf:"
_MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt",
                "merges.txt", "chat_template.jinja", "chat_template.json", "adapter_config.json", "teacher.json")
_PARTIAL_BYTES = 4 << 20
_FULL_HASH_BYTES = 64 << 20


def numeric_versions() -> dict[str, str]:
    """The package versions whose change can change a stage's numbers."""
    v = package_versions()
    return {k: v[k] for k in NUMERIC_PACKAGES if k in v}


def _file_digest(path: Path, h: Any) -> None:
    """Full content for files up to 64 MiB; size, head and tail of larger ones (weights: a
    changed tensor changes the header's offsets or the bytes at either end in practice, and
    hashing 15 GB on every resume would cost minutes)."""
    size = path.stat().st_size
    h.update(f"{path.name}:{size}:".encode())
    if size <= _FULL_HASH_BYTES:
        h.update(file_sha256(path).encode())
        return
    with open(path, "rb") as f:
        h.update(f.read(_PARTIAL_BYTES))
        f.seek(size - _PARTIAL_BYTES)
        h.update(f.read(_PARTIAL_BYTES))


def _model_files(d: Path) -> list[Path]:
    return sorted(f for f in d.iterdir() if f.is_file() and not f.name.startswith(".")
                  and (f.name in _MODEL_FILES or f.name.endswith((".safetensors", ".safetensors.index.json", ".bin"))))


def input_fingerprint(spec: str | os.PathLike) -> str:
    """Content hash of one input: a file; a model or teacher directory (the files that define
    the model, and a teacher's base and weights, wherever they live); another directory (its
    top-level files); ``hf:ORG/NAME`` stays as written (the hub pins nothing locally)."""
    spec = str(spec)
    if spec.startswith(HUB_PREFIX):
        return spec
    p = Path(spec)
    h = hashlib.sha256()
    if p.is_file():
        _file_digest(p, h)
    elif p.is_dir():
        teacher = p / "teacher.json"
        files = _model_files(p) if (p / "config.json").is_file() or teacher.is_file() else sorted(
            f for f in p.iterdir() if f.is_file() and not f.name.startswith(".") and not f.name.endswith(MANIFEST))
        for f in files:
            _file_digest(f, h)
        if teacher.is_file():
            from .teachers import read_teacher

            t = read_teacher(p)
            h.update(input_fingerprint(t.base).encode())
            if t.weights:
                h.update(input_fingerprint(t.weights).encode())
    else:
        return f"missing:{spec}"
    return h.hexdigest()[:16]


def fingerprint(inputs: dict[str, str | os.PathLike | None], config: dict[str, Any],
                versions: dict[str, str] | None = None) -> dict[str, Any]:
    """Everything that determines a stage's output, as plain JSON (so it compares equal to
    the copy read back from disk)."""
    fp = {"inputs": {k: input_fingerprint(v) for k, v in inputs.items() if v is not None},
          "config": to_jsonable(config),
          "versions": numeric_versions() if versions is None else versions}
    return json.loads(json.dumps(strict_json(fp, "fingerprint"), allow_nan=False))


def _show(v: Any) -> str:
    if v is None:
        return "unset"
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, list):
        return ",".join(map(str, v)) or "[]"
    text = str(v)
    return text if len(text) <= 60 else text[:57] + "..."


def fingerprint_diff(have: Any, want: dict[str, Any]) -> list[str]:
    """Human-readable differences between a recorded fingerprint and this run's."""
    if not isinstance(have, dict) or "config" not in have:
        return ["it records no fingerprint (written by an older version or by hand)"]
    out = []
    hc, wc = have.get("config") or {}, want["config"]
    for k in sorted(set(hc) | set(wc), key=lambda k: (k not in wc, k)):
        if hc.get(k) != wc.get(k):
            out.append(f"--{k.replace('_', '-')} {_show(hc.get(k))} -> {_show(wc.get(k))}")
    hi, wi = have.get("inputs") or {}, want["inputs"]
    for k in sorted(set(hi) | set(wi)):
        if hi.get(k) != wi.get(k):
            out.append(f"input {k} " + ("changed" if k in hi and k in wi else "added" if k in wi else "removed"))
    hv, wv = have.get("versions") or {}, want["versions"]
    for k in sorted(set(hv) | set(wv)):
        if hv.get(k) != wv.get(k):
            out.append(f"{k} {hv.get(k, 'absent')} -> {wv.get(k, 'absent')}")
    return out


def _ways_on(out: str | os.PathLike) -> str:
    return f"pass --overwrite to replace it, or choose another --out than {out}"


class Planned(BaseException):  # noqa: N818 -- not an error: the answer to a question, carried out of a stage
    """Raised by :func:`check_resume` inside :func:`planning`: the stage's own resume decision,
    asked without running the stage (the driver's one way to decide what to reuse). A
    BaseException, so no stage's error handling takes it for a fault."""

    def __init__(self, out: str, fp: dict[str, Any], finished: Any, partial: Any, occupied: bool, stage: str):
        super().__init__(f"{stage} {out}")
        self.out, self.fp, self.finished, self.partial, self.occupied, self.stage = (
            out, fp, finished, partial, occupied, stage)

    @property
    def action(self) -> str:
        """``reuse`` (finished with this fingerprint), ``resume`` (unfinished, this fingerprint),
        ``run`` (nothing there) or ``replace`` (something else there: needs ``--overwrite``)."""
        if self.finished is not None:
            return "reuse" if self.finished == self.fp else "replace"
        if self.partial is not None:
            return "resume" if self.partial == self.fp else "replace"
        return "replace" if self.occupied else "run"

    def why(self) -> str:
        """What differs between what is there and what the stage would make now."""
        if self.action == "reuse":
            return "same inputs and settings"
        if self.action == "resume":
            return "an unfinished run with the same inputs and settings"
        if self.action == "run":
            return "no output yet"
        if self.finished is None and self.partial is None:
            return "holds something this stage cannot check (no fingerprint)"
        what = "finished output" if self.finished is not None else "unfinished run"
        have = self.finished if self.finished is not None else self.partial
        return f"its {what} differs: " + "; ".join(fingerprint_diff(have, self.fp))


_planning: list[bool] = []


@contextlib.contextmanager
def planning() -> Iterator[None]:
    """Inside this block :func:`check_resume` raises :class:`Planned` instead of deciding: a
    stage called here stops at its resume check (before it loads a model or writes anything)
    and says what it would do with its output."""
    _planning.append(True)
    try:
        yield
    finally:
        _planning.pop()


def check_resume(out: str | os.PathLike, fp: dict[str, Any], *, overwrite: bool, stage: str,
                 finished: dict[str, Any] | None = None, partial: str | os.PathLike | None = None,
                 occupied: bool = False) -> str:
    """What to do with ``out``: ``"skip"`` (a finished output of this exact fingerprint),
    ``"resume"`` (partial state of this exact fingerprint, recorded in the file ``partial``) or
    ``"start"`` (nothing there, or ``overwrite``: the caller clears what is there).

    ``finished`` is the manifest of a finished output (None: none); ``occupied`` says ``out``
    holds something that is neither (a file or directory this stage did not write). Any
    mismatch raises :class:`ResumeError` naming the differences and the two ways on. Under
    :func:`planning` it raises :class:`Planned` with the same facts instead."""
    if _planning:
        part = read_json(partial, "resume fingerprint") if partial is not None and Path(partial).is_file() else None
        raise Planned(str(out), fp, None if finished is None else finished.get("fingerprint", {}), part,
                      occupied, stage)
    if finished is not None:
        have = finished.get("fingerprint")
        if have == fp and not overwrite:
            return "skip"
        if overwrite:
            return "start"
        raise ResumeError(f"{out}: holds a finished {stage} output made with other inputs or settings "
                          f"({'; '.join(fingerprint_diff(have, fp))}); {_ways_on(out)}")
    if partial is not None and Path(partial).is_file():
        have = read_json(partial, "resume fingerprint")
        if overwrite:
            return "start"
        if have == fp:
            return "resume"
        raise ResumeError(f"{out}: holds an unfinished {stage} run made with other inputs or settings "
                          f"({'; '.join(fingerprint_diff(have, fp))}); resuming would mix two runs; "
                          f"{_ways_on(out)}")
    if occupied and not overwrite:
        raise ResumeError(f"{out}: already exists and is not a {stage} output this version can check "
                          f"(no fingerprint); {_ways_on(out)}")
    return "start"


def check_file_resume(out: str | os.PathLike, fp: dict[str, Any], *, overwrite: bool, stage: str) -> str:
    """:func:`check_resume` for a stage whose output is one file with a manifest beside it (no
    partial state): ``"skip"`` for this exact run, ``"start"`` otherwise or with ``overwrite``."""
    out = Path(out)
    finished = read_file_manifest(out) if out.is_file() else None
    return check_resume(out, fp, overwrite=overwrite, stage=stage, finished=finished,
                        occupied=out.exists() and finished is None)


def write_fingerprint(path: str | os.PathLike, fp: dict[str, Any]) -> None:
    """Record the fingerprint of a run in progress (checked by :func:`check_resume`)."""
    write_json_atomic(path, fp)


# ------------------------------------------------------------------------- output checks


def _resolved(p: str | os.PathLike) -> Path:
    return Path(p).expanduser().resolve()


def _expand_inputs(inputs: dict[str, str | os.PathLike | None]) -> list[tuple[str, Path]]:
    """Local inputs as resolved paths; a teacher directory brings its base and weights along."""
    out = []
    for name, spec in inputs.items():
        if spec is None or str(spec).startswith(HUB_PREFIX):
            continue
        p = _resolved(spec)
        out.append((name, p))
        if (p / "teacher.json").is_file():
            from .teachers import read_teacher

            try:
                t = read_teacher(p)
            except SubliminalError:
                continue
            if not t.base.startswith(HUB_PREFIX):
                out.append((f"{name} (its base)", _resolved(t.base)))
            if t.weights:
                out.append((f"{name} (its weights)", _resolved(t.weights)))
    return out


def check_not_input(outputs: dict[str, str | os.PathLike], inputs: dict[str, str | os.PathLike | None],
                    *, dirs: tuple[str, ...] = ()) -> None:
    """Refuse outputs that are, or would overwrite, an input of the stage (resolved paths).

    ``outputs`` maps a label (``--out``) to each path the stage writes; those in ``dirs`` are
    directories, which must not be or contain an input. A file output inside an input
    directory is refused when it would replace a file already there that is not a stage output
    with its own manifest (``MODEL/transfer_curve.json`` is fine, ``MODEL/config.json`` is not)."""
    ins = _expand_inputs(inputs)
    for label, o in outputs.items():
        op = _resolved(o)
        for name, ip in ins:
            clash = None
            if op == ip:
                clash = f"is the input {name} ({ip})"
            elif label in dirs and ip.is_relative_to(op):
                clash = f"is a directory that holds the input {name} ({ip})"
            elif (label not in dirs and ip.is_dir() and op.is_relative_to(ip) and op.exists()
                  and not (op.parent / (op.name + ".manifest.json")).is_file()):
                clash = f"would overwrite {op}, a file of the input {name} ({ip})"
            if clash:
                raise SubliminalError(f"{label} {o} {clash}; writing it would destroy the input. "
                                      "Choose another --out")


def check_writable(out: str | os.PathLike, *, is_dir: bool = False, flag: str = "--out") -> None:
    """Fail before any work when ``out`` cannot be written: its nearest existing ancestor must be
    a directory this process can create files in (tried, so it holds for root and for read-only
    file systems alike), and an existing ``out`` must be of the right kind."""
    p = Path(out).expanduser()
    if p.exists():
        if is_dir and not p.is_dir():
            raise SubliminalError(f"{flag} {out}: is a file; this stage writes a directory there. Choose another "
                                  f"{flag}")
        if not is_dir and p.is_dir():
            raise SubliminalError(f"{flag} {out}: is a directory; this stage writes a file there. Choose another "
                                  f"{flag}")
    anc = p if (is_dir and p.is_dir()) else p.parent
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise SubliminalError(f"{flag} {out}: cannot be created, {anc} is a file, not a directory. Choose "
                              f"another {flag}")
    try:
        with tempfile.TemporaryFile(dir=anc, prefix=".write-test-"):
            pass
    except OSError as e:
        raise SubliminalError(f"{flag} {out}: cannot write in {anc} ({e.strerror}); choose a writable "
                              f"{flag} or fix the directory's permissions") from None
