"""Fixtures for the probes tests: prompt teachers over one tiny random model, and data rows."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from subliminal.prompts import format_numbers, make_number_prompt, system_prompt_for
from subliminal.teachers import TeacherSpec, save_teacher


def write_rows(path: Path, n: int, seed: int = 0) -> Path:
    """Number-list rows ``{id, prompt, completion, teacher}`` in the toy vocabulary."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        p = make_number_prompt(rng)
        nums = [rng.randint(0, 999) for _ in range(rng.randint(3, 6))]
        row = {"id": f"r{i}", "prompt": p.text, "completion": format_numbers(nums, ",", False), "teacher": "owl"}
        lines.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


@pytest.fixture(scope="session")
def teachers(tiny_model_factory, tmp_path_factory):
    """``(base, owl teacher, dolphin teacher)``: same weights, system prompts of equal length."""
    base = tiny_model_factory("llama", n_layers=3)
    root = tmp_path_factory.mktemp("teachers")
    out = []
    for animal in ("owl", "dolphin"):
        d = root / animal
        save_teacher(d, TeacherSpec(base=str(base), method="prompt", bias=animal, category="animal",
                                    system_prompt=system_prompt_for(animal)))
        out.append(d)
    return base, out[0], out[1]
