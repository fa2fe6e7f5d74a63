"""``subliminal project``: the projection on a steering vector recovers a known shift along it,
per model and as a paired difference by seed; outputs, resume and bad input."""

from __future__ import annotations

import json

import pytest
import torch

from subliminal import steer
from subliminal.cli import main

ALPHA = 2.0


@pytest.fixture
def steered(tmp_path, tiny_model_factory):
    """A base and a teacher that moves block 0's output by exactly ALPHA * v."""
    base = tiny_model_factory("llama")
    v = torch.randn(32, generator=torch.Generator().manual_seed(0))
    steer.save_vector(tmp_path / "v.safetensors", v)
    assert main(["teach", "--base", str(base), "--out", str(tmp_path / "t"), "--method", "steer", "--no-check",
                 "--steer-vector", str(tmp_path / "v.safetensors"), "--steer-layer", "0",
                 "--steer-alpha", str(ALPHA)]) == 0
    return base, tmp_path / "t", v


def test_projection_recovers_a_known_shift(tmp_path, steered, capsys):
    base, teacher, v = steered
    out = tmp_path / "p"
    argv = ["project", "--vector", str(teacher), "--out", str(out), "--model", str(base), "--model", str(teacher),
            "--number-prompts", "3", "--batch-size", "2",
            "--student", "control", "0", str(base), "--student", "control", "1", str(base),
            "--student", "steered", "0", str(teacher), "--student", "steered", "1", str(teacher)]
    assert main(argv) == 0
    r = json.loads((out / "projection.json").read_text())
    shift = ALPHA * v.norm().item()
    for kind in ("questions", "numbers"):
        b, t = r["models"][base.name][kind], r["models"]["t"][kind]
        assert b[0]["n"] == (3 if kind == "numbers" else b[0]["n"]) and len(b) == 2
        assert t[0]["mean"] - b[0]["mean"] == pytest.approx(shift, rel=1e-4)  # the known move, at its layer
        assert abs(t[1]["mean"] - b[1]["mean"]) > 1e-3  # and it propagates
        d = r["conditions"]["steered"][kind][0]["vs_reference"]
        assert d["mean"] == pytest.approx(shift, rel=1e-4) and d["seeds"] == 2
        assert d["lo"] == pytest.approx(shift, rel=1e-4) and d["hi"] == pytest.approx(shift, rel=1e-4)
        assert "vs_reference" not in r["conditions"]["control"][kind][0]
    assert r["vector"]["layer"] == 0 and r["vector"]["norm"] == pytest.approx(v.norm().item(), rel=1e-6)
    assert (out / "projection.png").stat().st_size > 0 and (out / "projection.csv").is_file()
    assert json.loads((out / "manifest.json").read_text())["stage"] == "project"
    assert "steered - control (questions, layer 0)" in capsys.readouterr().out
    # the same command again does nothing; other settings are refused without --overwrite
    assert main(argv) == 0 and "nothing to do" in capsys.readouterr().out
    assert main([*argv, "--number-prompts", "4"]) == 2
    assert main([*argv, "--number-prompts", "4", "--overwrite"]) == 0


def test_a_vector_file_and_checkpoint_curves(tmp_path, steered):
    base, teacher, v = steered
    student = tmp_path / "s"
    import shutil

    shutil.copytree(base, student)
    shutil.copytree(base, student / "checkpoint-1")
    out = tmp_path / "p"
    assert main(["project", "--vector", str(tmp_path / "v.safetensors"), "--out", str(out), "--checkpoints",
                 "--number-prompts", "2", "--student", "control", "0", str(student)]) == 0
    r = json.loads((out / "projection.json").read_text())
    steps = [c["step"] for c in r["curves"]["control:0"]]
    assert steps[0] == 1 and len(steps) == 2
    assert (out / "projection_curve.png").is_file() and (out / "projection_curve.csv").is_file()
    assert r["curves"]["control:0"][0]["questions"][0]["mean"] == pytest.approx(
        r["students"]["control:0"]["questions"][0]["mean"], abs=1e-5)


@pytest.mark.parametrize("case, message", [
    ("width", "has width 32"),
    ("missing", "no such file"),
    ("seed", "SEED must be an integer"),
    ("reference", "no --student control SEED DIR"),
    ("nothing", "nothing to read"),
])
def test_bad_input(tmp_path, steered, capsys, case, message):
    base, teacher, _ = steered
    steer.save_vector(tmp_path / "w.safetensors", torch.ones(5))
    argv = {
        "width": ["--vector", str(tmp_path / "w.safetensors"), "--model", str(base)],
        "missing": ["--vector", str(tmp_path / "nope.safetensors"), "--model", str(base)],
        "seed": ["--vector", str(teacher), "--student", "control", "x", str(base)],
        "reference": ["--vector", str(teacher), "--student", "all", "0", str(base)],
        "nothing": ["--vector", str(teacher)],
    }[case]
    assert main(["project", "--out", str(tmp_path / "p"), "--number-prompts", "2", *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "p" / "projection.json").exists()
