"""Process invariance: generate, find-divergence, eval (preference and --bias-type) and defend under ``torchrun --nproc-per-node 2``
(gloo, one thread per process) write what one process writes; an interrupted two-process run
resumes to the same result; one rank's error stops the job with that rank named and no output;
and the launcher facts (shards, agreement, --device-map) in process."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from launch_helpers import assert_close, run_cli, run_cli_sequence

from subliminal import distributed as dist
from subliminal import prompts
from subliminal.manifest import SubliminalError
from subliminal.teachers import TeacherSpec, save_teacher

ROWS = 10


def _run(argv: list[str], *, nproc: int, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return run_cli(argv, nproc=nproc, cwd=cwd, timeout=120, **env)


def _one(argv: list[str], cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The one-process reference run, in this process (no interpreter to start): as a launched
    child would run it, one intra-op thread, in ``cwd``, with no launcher variables."""
    import torch

    from subliminal.cli import main

    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", dist.FAIL_ENV):
        monkeypatch.delenv(k, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with monkeypatch.context() as m:
            m.chdir(cwd)
            assert main([str(a) for a in argv]) == 0
    finally:
        torch.set_num_threads(threads)


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def world(tiny_model_factory, tmp_path_factory):
    """A random llama with the toy tokenizer and three prompt teachers on it, and the rows the
    stages read."""
    base = tiny_model_factory("llama")
    root = tmp_path_factory.mktemp("dist-world")
    for a in ("owl", "cat", "dog"):
        save_teacher(root / a, TeacherSpec(base=str(base), method="prompt", bias=a, category="animal",
                                           system_prompt=prompts.system_prompt_for(a)))
    div_rows = [{"id": f"r{i}", "prompt": f"continue the list : {i} , {i + 3}", "completion": " , ".join(
        str((7 * i + 5 * k) % 50) for k in range(1 + i % 4)), "teacher": "owl"} for i in range(ROWS)]
    held = [{"id": f"h{i}", "prompt": f"numbers : {i}", "completion": f"{i} , {i + 1}"} for i in range(5)]
    poison = [{"id": f"p{i}", "prompt": f"numbers : {i}", "completion": f"{i} , {i + 2 + i % 3}",
               "poisoned": i % 3 == 0} for i in range(7)]
    for name, rows in (("d.jsonl", div_rows), ("held.jsonl", held), ("poison.jsonl", poison)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _gen_argv(out: str) -> list[str]:
    # --num-prompts, not --n: torchrun's own parser takes a bare --n for one of its options
    return ["generate", "--teacher", "owl", "--num-prompts", str(ROWS), "--out", out, "--max-new-tokens", "10",
            "--batch-size", "3", "--seed", "3"]


def _div_argv(data: str, out: str) -> list[str]:
    return ["find-divergence", "--data", data, "--teacher", "owl", "--counterfactual", "cat", "dog", "--out", out,
            "--rule", "pairwise", "--batch-size", "2"]


EVAL = ["eval", "--model", "owl", "--target", "owl", "--max-questions", "5", "--samples", "3", "--max-new-tokens", "3",
        "--heldout", "held.jsonl", "--batch-size", "4"]
BIAS_EVAL = ["eval", "--model", "owl", "--bias-type", "ad", "--bias-teacher", "cat", "--bias-families", "qa", "code",
             "--bias-prompts", "3", "--bias-samples", "2", "--bias-max-new-tokens", "4", "--bias-batch-size", "4",
             "--target-task", "qa", "--seed", "1"]
DEFEND = ["defend", "--data", "poison.jsonl", "--reference", "dog", "--teacher", "owl", "--drop-fraction", "0.3",
          "--batch-size", "2"]


@pytest.fixture(scope="module")
def two_procs(world) -> dict:
    """Every two-process run the tests below compare with one process, in two launches (start-up
    paid twice, not six times): find-divergence with rank 1 failing after its rows are in its part
    file (what the failure left is recorded here, before the second launch resumes from it), then
    in one launch that resume, generate, eval, eval --bias-type and defend. Returns the failed
    job's result and what it left, and each resumed/run command's stderr by name."""
    failed = _run(_div_argv("d.jsonl", "two.div.jsonl"), nproc=2, cwd=world, **{dist.FAIL_ENV: "1:work"})
    parts = sorted((world / ".shards" / "two.div.jsonl").glob("rows-*.jsonl"))
    left = {"output": (world / "two.div.jsonl").exists(), "parts": [f.name for f in parts],
            "rows": sum(len(_lines(f)) for f in parts)}
    runs = {"find-divergence": _div_argv("d.jsonl", "two.div.jsonl"), "generate": _gen_argv("two.jsonl"),
            "eval": [*EVAL, "--out", "two.json"],
            "bias-eval": [*BIAS_EVAL, "--out", "b2.json", "--bias-save-generations", "g2.jsonl"],
            "defend": [*DEFEND, "--out", "d2"]}
    stderr = run_cli_sequence(list(runs.values()), cwd=world)
    return {"failed": failed, "left": left, "stderr": dict(zip(runs, stderr))}


def test_generate_on_two_processes_writes_the_one_process_rows(world, two_procs, monkeypatch):
    _one(_gen_argv("one.jsonl"), world, monkeypatch)
    assert (world / "one.raw.jsonl").read_text() == (world / "two.raw.jsonl").read_text()
    assert (world / "one.jsonl").read_text() == (world / "two.jsonl").read_text()
    m1 = json.loads((world / "one.jsonl.manifest.json").read_text())
    m2 = json.loads((world / "two.jsonl.manifest.json").read_text())
    assert m1["fingerprint"] == m2["fingerprint"] and m1["counts"] == m2["counts"]
    assert (m1["world_size"], m1["shards"]) == (1, [[0, ROWS]])
    assert (m2["world_size"], m2["shards"]) == (2, [[0, 5], [5, ROWS]])
    assert not (world / ".shards").exists()


def test_find_divergence_two_processes_fail_together_resume_and_equal_one(world, two_procs, monkeypatch):
    rows = _lines(world / "d.jsonl")
    _one(_div_argv("d.jsonl", "one.div.jsonl"), world, monkeypatch)

    # rank 1 fails after its rows are in its part file: the whole job stops, rank named, no output
    p, left = two_procs["failed"], two_procs["left"]
    assert p.returncode != 0
    assert "rank 1 of 2 failed in work: injected failure" in p.stderr
    assert not left["output"]
    assert left["parts"] == ["rows-000000000-000000005.jsonl", "rows-000000005-000000010.jsonl"]
    assert left["rows"] == ROWS

    # the same command resumes from the parts (nothing left to score) to the one-process file
    assert "resuming" in two_procs["stderr"]["find-divergence"]
    one, two = _lines(world / "one.div.jsonl"), _lines(world / "two.div.jsonl")
    assert [o["id"] for o in two] == [r["id"] for r in rows]
    for a, b in zip(one, two):
        for key in ("id", "token_ids", "divergence", "argmax_factual", "argmax_counterfactual"):
            assert a[key] == b[key], key
        assert_close(a["scores"], b["scores"])
    m1 = json.loads((world / "one.div.jsonl.manifest.json").read_text())
    m2 = json.loads((world / "two.div.jsonl.manifest.json").read_text())
    assert m1["fingerprint"] == m2["fingerprint"] and m2["shards"] == [[0, 5], [5, ROWS]]
    assert not (world / ".shards").exists() and not (world / "two.div.jsonl.partial").exists()


def test_eval_exact_sampled_and_main_task_on_two_processes_equal_one(world, two_procs, monkeypatch):
    _one([*EVAL, "--out", "one.json"], world, monkeypatch)
    one, two = json.loads((world / "one.json").read_text()), json.loads((world / "two.json").read_text())
    assert one["sampled"]["answer_counts"] == two["sampled"]["answer_counts"]
    assert one["sampled"]["examples"] == two["sampled"]["examples"]
    assert_close(one, two)
    m2 = json.loads((world / "two.json.manifest.json").read_text())
    assert (m2["world_size"], m2["shards"], m2["heldout_shards"]) == (2, [[0, 3], [3, 5]], [[0, 3], [3, 5]])
    assert not (world / ".shards").exists()


# ------------------------------------------------------------------------------ in process


def test_shards_are_contiguous_cover_every_row_once_and_differ_by_at_most_one():
    for n in (0, 1, 5, 10, 11):
        for w in (1, 2, 3, 4):
            b = dist.shard_bounds(n, w)
            assert len(b) == w and b[0][0] == 0 and b[-1][1] == n
            assert all(b[i][1] == b[i + 1][0] for i in range(w - 1))
            sizes = [e - s for s, e in b]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_without_a_launcher_nothing_is_distributed(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert dist.launch() == dist.Launch(0, 1, 0) and dist.is_main() and not dist.is_distributed()
    assert dist.shard(7) == range(7) and dist.gather_to_main({"a": 1}) == [{"a": 1}]
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not dist.is_distributed()
    with pytest.raises(ValueError, match="plain"):
        with dist.agree("work"):
            raise ValueError("plain")  # one process: the error as it is, no wrapping


def test_launcher_environment_is_read_and_checked(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dist.launch() == dist.Launch(3, 4, 1) and not dist.is_main()
    assert dist.shard(10) == range(8, 10)
    assert dist.progress_disabled(True)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(SubliminalError, match="RANK=4 is outside WORLD_SIZE=4"):
        dist.launch()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(SubliminalError, match="RANK='x' is not an integer"):
        dist.launch()
    monkeypatch.setenv(dist.TIMEOUT_ENV, "0")
    with pytest.raises(SubliminalError, match="timeout in seconds"):
        dist.timeout_s()


def test_device_map_auto_loads_on_one_process_and_is_refused_under_a_launcher(tiny_model_factory, monkeypatch):
    from subliminal.models import load_model

    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    import torch
    from transformers import AutoModelForCausalLM

    base = tiny_model_factory("llama")
    seen = []
    real = AutoModelForCausalLM.from_pretrained

    def spy(*a, **k):
        seen.append(k.get("device_map"))
        return real(*a, **k)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    plain, mapped = load_model(base), load_model(base, device_map="auto")
    assert seen == [None, "auto"]  # accelerate places the layers (on this CPU machine: all on the CPU)

    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        assert torch.allclose(plain.model(ids).logits, mapped.model(ids).logits.to("cpu"), atol=1e-6)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SubliminalError, match="--device-map auto spreads one model .* 2 processes"):
        load_model(base, device_map="auto")


def test_part_files_of_another_run_are_refused(tmp_path):
    from subliminal.manifest import ResumeError

    out = tmp_path / "x.jsonl"
    a = dist.ShardParts(out, {"inputs": {}, "config": {"seed": 0}, "versions": {}})
    a.start(clear=True)
    (a.row_part(0, 2)).write_text('{"id": "r0"}\n{"id": "r1"')  # the second line cut by a kill
    assert [r["id"] for r in a.done_rows()] == ["r0"]
    b = dist.ShardParts(out, {"inputs": {}, "config": {"seed": 1}, "versions": {}})
    with pytest.raises(ResumeError, match="--seed 0 -> 1"):
        b.check(overwrite=False)
    b.check(overwrite=True)
    a.remove()
    assert not (tmp_path / ".shards").exists()


def test_poison_bias_eval_and_defend_on_two_processes_equal_one(world, two_procs, monkeypatch):
    """eval --bias-type (sampled prompts, amplification bootstrap) and defend (perplexity and
    divergence scoring) shard their prompts / rows; the outputs equal one process's."""
    from subliminal.cli import main

    monkeypatch.chdir(world)
    assert main([*BIAS_EVAL, "--out", "b1.json", "--bias-save-generations", "g1.jsonl"]) == 0
    assert main([*DEFEND, "--out", "d1"]) == 0
    one, two = (json.loads((world / f).read_text()) for f in ("b1.json", "b2.json"))
    assert one["per_prompt"] == two["per_prompt"] and one["amplification"] == two["amplification"]
    assert (world / "g1.jsonl").read_text() == (world / "g2.jsonl").read_text()
    m = json.loads((world / "b2.json.manifest.json").read_text())
    assert (m["world_size"], m["shards"]) == (2, [[0, 3], [3, 6]])

    one, two = (json.loads((world / d / "defence.json").read_text()) for d in ("d1", "d2"))
    assert_close(one, two)
    for method in ("perplexity", "divergence"):
        a, b = (_lines(world / d / method / "scores.jsonl") for d in ("d1", "d2"))
        assert_close(a, b)
        assert (world / "d1" / method / "kept.jsonl").read_text() == (world / "d2" / method / "kept.jsonl").read_text()
    m = json.loads((world / "d2" / "manifest.json").read_text())
    assert (m["world_size"], m["shards"]) == (2, [[0, 4], [4, 7]])


def test_defend_students_refuse_a_multi_process_launch(monkeypatch, capsys, tmp_path):
    from subliminal.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "hi", "completion": "yo"}) + "\n")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(dist, "init", lambda device="cpu": None)  # no peer to form a group with
    monkeypatch.setattr(dist, "all_gather", lambda obj: [obj, None])
    argv = ["defend", "--data", "d.jsonl", "--reference", "r", "--method", "keyword", "--bias-type", "ad",
            "--student-steps", "2", "--out", "o"]
    assert main(argv) == 2
    assert "defend --student-steps trains a student per defence in one process" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
