"""Atomic writes, seeds and the ``manifest.json`` every output directory carries.

Every stage writes its outputs through these helpers so an interrupted run never leaves a
half-written file behind, and so any output can be traced back to the command, config, seed,
code version and inputs that made it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n")


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


def git_commit() -> str | None:
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
    from importlib import metadata

    names = ["subliminal-lens", "torch", "transformers", "peft", "triton", "numpy", "transformer-lens", "nnsight"]
    out = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            pass
    return out


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
    if not path.exists():
        return None
    return json.loads(path.read_text())


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
