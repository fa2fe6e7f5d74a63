"""A Teacher = a base model + a bias, saved as a directory with ``teacher.json``.

The bias lives in a system prompt (``prompt``), in weights of its own (``finetune``: full
weights or a LoRA adapter), in poisoned instruction data (``poison``) or in a vector added to the
residual stream at one layer (``steer``: :mod:`subliminal.steer`); ``none`` is the unbiased
teacher. Every command that takes a model takes a teacher directory too and loads
it through :func:`subliminal.models.load_model`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .manifest import SubliminalError, write_json_atomic

TEACHER_FILE = "teacher.json"
METHODS = ("none", "prompt", "finetune", "poison", "steer")


@dataclass
class TeacherSpec:
    base: str
    method: str
    bias: str | None
    category: str | None
    system_prompt: str | None = None
    weights: str | None = None  # path relative to the teacher dir, or None
    weights_kind: str | None = None  # "full" | "lora" | None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        extra = d.pop("extra")
        d.update(extra)
        return d


def is_teacher_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / TEACHER_FILE).is_file()


def save_teacher(out_dir: str | os.PathLike, spec: TeacherSpec) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = spec.base
    if Path(base).exists():  # keep the teacher dir relocatable together with its base
        base = os.path.relpath(Path(base).resolve(), out_dir.resolve())
    d = spec.to_json()
    d["base"] = base
    write_json_atomic(out_dir / TEACHER_FILE, d)
    return out_dir / TEACHER_FILE


def read_teacher(path: str | os.PathLike) -> TeacherSpec:
    path = Path(path)
    f = path / TEACHER_FILE
    try:
        d = json.loads(f.read_text())
    except FileNotFoundError:
        raise SubliminalError(f"{path}: not a teacher directory (no {TEACHER_FILE})") from None
    except json.JSONDecodeError as e:
        raise SubliminalError(f"{f}: malformed JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise SubliminalError(f"{f}: not UTF-8 text; restore it or re-make the teacher") from None
    if not isinstance(d, dict):
        raise SubliminalError(f"{f}: expected a JSON object")
    for key in ("base", "method"):
        if key not in d:
            raise SubliminalError(f"{f}: missing key {key!r}")
    if d["method"] not in METHODS:
        raise SubliminalError(f"{f}: unknown method {d['method']!r} (one of {', '.join(METHODS)})")
    known = {k: d.pop(k, None) for k in ("base", "method", "bias", "category", "system_prompt", "weights",
                                          "weights_kind")}
    spec = TeacherSpec(**known, extra=d)
    if not spec.base.startswith("hf:"):
        # a local base is relative to the teacher directory (missing: the loader names this teacher)
        spec.base = str((path / spec.base).resolve())
    if spec.weights:
        spec.weights = str((path / spec.weights).resolve())
    if spec.method == "steer":  # checked here, so every reader sees a usable steer entry
        from .steer import teacher_settings

        spec.extra["steer"] = teacher_settings(spec.extra, path)
    return spec
