"""Process invariance of ``probe`` and ``patch``: under ``torchrun --nproc-per-node 2`` (gloo, one
thread per process) the activations, probe accuracies, patched sites and their summaries equal
what one process writes; a rank's error stops the job, names the rank and leaves no output."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest
from launch_helpers import assert_close, run_cli, run_cli_sequence

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


PROBE = ["probe", "--task", "identity", "--bootstrap", "20", "--backend", "nnsight", "--batch-size", "2", "--seed", "2"]
PATCH = ["patch", "--rule", "all", "--max-sites", "7", "--attr-steps", "2", "--bootstrap", "20", "--layers", "0,2"]


def _inputs(teachers, rows) -> list[str]:
    _, owl, dolphin = teachers
    return ["--models", str(owl), str(dolphin), "--data", str(rows)]


@pytest.fixture(scope="module")
def two_procs(teachers, rows, tmp_path_factory) -> dict:
    """The two-process runs, in two launches (start-up paid twice, not three times): patch with
    rank 1 failing (its result and what it left are recorded before the next launch), then in one
    launch probe and the same patch again. Returns the failure and the output directories."""
    root = tmp_path_factory.mktemp("dist-probe")
    patch = [*PATCH, *_inputs(teachers, rows), "--out", str(root / "patch")]
    failed = _torchrun(patch, root, **{dist.FAIL_ENV: "1:patch"})
    left = [(root / "patch" / f).exists() for f in ("patching.json", "sites.jsonl")]
    run_cli_sequence([[*PROBE, *_inputs(teachers, rows), "--out", str(root / "probe")], patch], cwd=root, timeout=360)
    return {"failed": failed, "left": left, "probe": root / "probe", "patch": root / "patch"}


def test_probe_on_two_processes_equals_one(teachers, rows, two_procs, tmp_path):
    from safetensors.torch import load_file

    assert main([*PROBE, *_inputs(teachers, rows), "--out", str(tmp_path / "one")]) == 0
    dirs = {"one": tmp_path / "one", "two": two_procs["probe"]}
    one, two = (json.loads((dirs[d] / "probe.json").read_text()) for d in ("one", "two"))
    assert [r["accuracy"] for r in one["layers"]] == [r["accuracy"] for r in two["layers"]]
    assert_close(one, two)
    for sub in ("0-owl", "1-dolphin"):
        a, b = (dirs[d] / "activations" / sub for d in ("one", "two"))
        assert (a / "sites.json").read_text() == (b / "sites.json").read_text()
        ta, tb = load_file(str(a / "activations.safetensors")), load_file(str(b / "activations.safetensors"))
        assert ta.keys() == tb.keys() and all((ta[k] - tb[k]).abs().max() <= 1e-5 for k in ta)
        m = json.loads((b / "manifest.json").read_text())
        assert (m["world_size"], m["shards"]) == (2, [[0, 5], [5, ROWS]])
    assert json.loads((dirs["two"] / "manifest.json").read_text())["world_size"] == 2


def test_patch_on_two_processes_fails_together_and_equals_one(teachers, rows, two_procs, tmp_path):
    assert main([*PATCH, *_inputs(teachers, rows), "--out", str(tmp_path / "one")]) == 0

    p = two_procs["failed"]
    assert p.returncode != 0 and "rank 1 of 2 failed in patch: injected failure" in p.stderr
    assert two_procs["left"] == [False, False]  # no patching.json, no sites.jsonl

    dirs = {"one": tmp_path / "one", "two": two_procs["patch"]}  # the same command, run again: it succeeds
    recs = [[json.loads(x) for x in (dirs[d] / "sites.jsonl").read_text().splitlines()] for d in ("one", "two")]
    assert [r["row"] for r in recs[0]] == [r["row"] for r in recs[1]]
    assert sum(len(r["sites"]) for r in recs[1]) == 7 and len(recs[1]) < ROWS  # the budget, spent as one process does
    assert_close(recs[0], recs[1])
    one, two = (json.loads((dirs[d] / "patching.json").read_text()) for d in ("one", "two"))
    assert_close(one, two)
    m = json.loads((dirs["two"] / "manifest.json").read_text())
    assert m["complete"] and (m["world_size"], m["shards"], m["n_sites"]) == (2, [[0, 4], [4, 7]], 7)
