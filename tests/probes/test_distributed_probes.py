"""Process invariance of ``probe`` and ``patch``: under ``torchrun --nproc-per-node 2`` (gloo, one
thread per process) the activations, probe accuracies, patched sites and their summaries equal
what one process writes; a rank's error stops the job, names the rank and leaves no output."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest
from launch_helpers import assert_close, run_cli

from subliminal import distributed as dist
from subliminal.cli import main
from subliminal.prompts import format_numbers, make_number_prompt

ROWS = 9


def _torchrun(argv: list[str], cwd: Path, **extra: str) -> subprocess.CompletedProcess:
    return run_cli(argv, nproc=2, cwd=cwd, timeout=180, **extra)


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> Path:
    rng = random.Random(5)
    path = tmp_path_factory.mktemp("dist-probe-data") / "owl.jsonl"
    lines = []
    for i in range(ROWS):
        nums = [rng.randint(0, 999) for _ in range(rng.randint(3, 6))]
        lines.append({"id": f"r{i}", "prompt": make_number_prompt(rng).text,
                      "completion": format_numbers(nums, ",", False), "teacher": "owl"})
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def test_probe_on_two_processes_equals_one(teachers, rows, tmp_path):
    from safetensors.torch import load_file

    _, owl, dolphin = teachers
    argv = ["probe", "--models", str(owl), str(dolphin), "--data", str(rows), "--task", "identity",
            "--bootstrap", "20", "--backend", "nnsight", "--batch-size", "2", "--seed", "2"]
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    p = _torchrun([*argv, "--out", str(tmp_path / "two")], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "probe.json").read_text()) for d in ("one", "two"))
    assert [r["accuracy"] for r in one["layers"]] == [r["accuracy"] for r in two["layers"]]
    assert_close(one, two)
    for sub in ("0-owl", "1-dolphin"):
        a, b = (tmp_path / d / "activations" / sub for d in ("one", "two"))
        assert (a / "sites.json").read_text() == (b / "sites.json").read_text()
        ta, tb = load_file(str(a / "activations.safetensors")), load_file(str(b / "activations.safetensors"))
        assert ta.keys() == tb.keys() and all((ta[k] - tb[k]).abs().max() <= 1e-5 for k in ta)
        m = json.loads((b / "manifest.json").read_text())
        assert (m["world_size"], m["shards"]) == (2, [[0, 5], [5, ROWS]])
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["world_size"] == 2


def test_patch_on_two_processes_fails_together_and_equals_one(teachers, rows, tmp_path):
    _, owl, dolphin = teachers
    argv = ["patch", "--models", str(owl), str(dolphin), "--data", str(rows), "--rule", "all",
            "--max-sites", "7", "--attr-steps", "2", "--bootstrap", "20", "--layers", "0,2"]
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0

    p = _torchrun([*argv, "--out", str(tmp_path / "two")], tmp_path, **{dist.FAIL_ENV: "1:patch"})
    assert p.returncode != 0 and "rank 1 of 2 failed in patch: injected failure" in p.stderr
    assert not (tmp_path / "two" / "patching.json").exists() and not (tmp_path / "two" / "sites.jsonl").exists()

    p = _torchrun([*argv, "--out", str(tmp_path / "two")], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    recs = [[json.loads(x) for x in (tmp_path / d / "sites.jsonl").read_text().splitlines()] for d in ("one", "two")]
    assert [r["row"] for r in recs[0]] == [r["row"] for r in recs[1]]
    assert sum(len(r["sites"]) for r in recs[1]) == 7 and len(recs[1]) < ROWS  # the budget, spent as one process does
    assert_close(recs[0], recs[1])
    one, two = (json.loads((tmp_path / d / "patching.json").read_text()) for d in ("one", "two"))
    assert_close(one, two)
    m = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert m["complete"] and (m["world_size"], m["shards"], m["n_sites"]) == (2, [[0, 4], [4, 7]], 7)
