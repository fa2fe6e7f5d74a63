"""Fixtures for the probes tests: prompt teachers over one tiny random model, and data rows."""

from __future__ import annotations

import pytest

from subliminal.prompts import system_prompt_for
from subliminal.teachers import TeacherSpec, save_teacher


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
