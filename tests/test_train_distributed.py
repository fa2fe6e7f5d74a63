"""Data-parallel training under real launchers (torchrun, 2 processes, gloo on the CPU): the
student equals the one-process student within float tolerance (full weights with an odd global
batch, LoRA), an interrupted 2-process run resumes to the same student, one rank's error fails
the whole job with that error and leaves no output, and toy pretraining matches one process."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
import textwrap

import pytest
from launch_helpers import assert_same_weights, launch_env, run_cli_sequence
from safetensors.torch import load_file

from subliminal import prompts
from subliminal.cli import main
from subliminal.data import Row, align_row, write_jsonl
from subliminal.toyworld.tokenizer import build_tokenizer
from subliminal.train import rank_slice

N_ROWS = 10
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_factory):
    """A tiny random Llama and number rows with a divergence file (random flags, some rows without any)."""
    d = tmp_path_factory.mktemp("dtrain")
    base = tiny_model_factory("llama")
    tok = build_tokenizer()
    rng = random.Random(1)
    rows, div = [], []
    for i in range(N_ROWS):
        p = prompts.make_number_prompt(rng)
        nums = [rng.randint(0, 999) for _ in range(p.count)]
        rows.append(Row(f"r{i}", p.text, prompts.format_numbers(nums, p.separator, p.brackets), "owl"))
    for r in rows:
        ids = align_row(tok, r, None).completion_ids
        flags = [rng.random() < 0.3 for _ in ids] if r.id not in ("r2", "r5") else [False] * len(ids)
        div.append({"id": r.id, "token_ids": ids, "divergence": flags, "scores": {}})
    write_jsonl(d / "data.jsonl", rows)
    write_jsonl(d / "data.div.jsonl", div)
    return {"base": base, "div": d / "data.div.jsonl"}


def _argv(world, out, *extra):
    return ["distill", "--base", str(world["base"]), "--data", str(world["div"]), "--out", str(out),
            "--lr", "1e-2", "--seed", "3", *extra]


STUDENT = ["--mask", "only-divergence", "--batch-size", "5", "--epochs", "2", "--checkpoint-every", "2"]
LORA = ["--lora-rank", "4", "--batch-size", "4", "--max-steps", "3"]
TEMPLATE_ROWS = ["--params", "template-rows", "--mask", "only-divergence", "--batch-size", "5", "--max-steps", "3"]
PRETRAIN = ["toy", "pretrain", "--steps", "3", "--batch-size", "3", "--lr", "1e-3", "--eval-rows", "4",
            "--checkpoint-every", "2", "--device", "cpu", "--threads", "1", "--quiet"]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc-per-node 2 ARGS`` (ARGS: ``-m subliminal.cli ...``)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=launch_env(), timeout=TIMEOUT_S)


def weights(path):
    return load_file(str(path / "model.safetensors"))


def max_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def losses(path):
    """The logged loss of every step (distill's loss.csv: step, loss, lr, loss_tokens)."""
    with open(path / "loss.csv") as f:
        return list(csv.DictReader(f))


def assert_same_losses(a, b, tol=1e-5):
    assert len(a) == len(b) > 0
    assert [(e["step"], e["loss_tokens"], e["lr"]) for e in a] == [(e["step"], e["loss_tokens"], e["lr"]) for e in b]
    assert max(abs(float(x["loss"]) - float(y["loss"])) for x, y in zip(a, b)) < tol


def test_rank_slices_cover_the_batch_in_order():
    for n in range(1, 12):
        for w in (1, 2, 3, 4):
            got = [i for r in range(w) for i in range(n)[rank_slice(n, r, w)]]
            assert got == list(range(n))
            sizes = [len(range(n)[rank_slice(n, r, w)]) for r in range(w)]
            assert max(sizes) - min(sizes) <= 1


def test_two_processes_equal_one_with_an_odd_batch(world, two_procs, tmp_path):
    out2 = two_procs["student"]
    out1 = tmp_path / "one"
    assert main(_argv(world, out1, *STUDENT)) == 0
    man1, man2 = (json.loads((o / "manifest.json").read_text()) for o in (out1, out2))
    assert man2["world_size"] == 2 and man1["world_size"] == 1 and man2["steps"] == man1["steps"] == 4
    assert man2["rows_digest"] == man1["rows_digest"]
    assert_same_weights(weights(out1), weights(out2))
    assert max_diff(weights(out1), load_file(str(world["base"] / "model.safetensors"))) > 1e-3  # it trained
    assert_same_losses(losses(out1), losses(out2))
    assert_same_weights(weights(out1 / "checkpoint-0002"), weights(out2 / "checkpoint-0002"))
    assert not (out2 / ".train").exists() and not list(out2.parent.glob(".*.tmp"))


def test_two_process_lora_student_equals_one(world, two_procs, tmp_path):
    assert main(_argv(world, tmp_path / "one", *LORA)) == 0
    assert_same_weights(weights(tmp_path / "one"), weights(two_procs["lora"]))
    assert_same_losses(losses(tmp_path / "one"), losses(two_procs["lora"]))


HOOK = textwrap.dedent("""
    import os, sys
    import subliminal.distill as distill
    from subliminal.manifest import SubliminalError

    real, calls = distill.batch_loss, {"n": 0}
    mode, at = os.environ["HOOK_MODE"], int(os.environ["HOOK_AT"])

    def hooked(*a, **k):
        calls["n"] += 1
        if calls["n"] == at:
            if mode == "interrupt":
                raise KeyboardInterrupt
            if os.environ["RANK"] == "1":
                raise SubliminalError("rank 1 broke on purpose at its step " + str(at))
        return real(*a, **k)

    distill.batch_loss = hooked
    from subliminal.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _hooked(tmp_path, mode: str, at: int, argv) -> subprocess.CompletedProcess:
    script = tmp_path / "hooked.py"
    script.write_text(HOOK)
    os.environ["HOOK_MODE"], os.environ["HOOK_AT"] = mode, str(at)
    try:
        return torchrun(str(script), *map(str, argv))
    finally:
        del os.environ["HOOK_MODE"], os.environ["HOOK_AT"]


@pytest.fixture(scope="module")
def two_procs(world, tmp_path_factory) -> dict:
    """Every successful two-process run the tests compare with one process, in one launch (its
    start-up paid once, not five times), after the launch that interrupts a run of STUDENT during
    step 4 of 4, after step 2's checkpoint (its result and what it left are recorded here before
    the shared launch resumes it): the full-weights student (a global batch of 5 rows, 3 + 2,
    masked loss with rows without divergence tokens, a checkpoint at step 2), the LoRA student,
    the template-rows student, toy pretraining and the resumed run. Returns the output paths."""
    root = tmp_path_factory.mktemp("ddp")
    out = {name: root / name for name in ("student", "lora", "template-rows", "pretrain", "part")}
    interrupted = _hooked(root, "interrupt", 4, _argv(world, out["part"], *STUDENT))
    left = {"train_state": (out["part"] / ".train" / "train_state.pt").exists(),
            "checkpoint": (out["part"] / "checkpoint-0002").is_dir(),
            "manifest": (out["part"] / "manifest.json").exists(),
            "model": (out["part"] / "model.safetensors").exists()}
    run_cli_sequence([_argv(world, out["student"], *STUDENT), _argv(world, out["lora"], *LORA),
                      _argv(world, out["template-rows"], *TEMPLATE_ROWS), [*PRETRAIN, "--out", out["pretrain"]],
                      _argv(world, out["part"], *STUDENT)], timeout=TIMEOUT_S * 3)
    return {**out, "interrupted": interrupted, "left": left}


def test_interrupted_two_process_run_resumes_to_the_same_student(two_procs):
    full, part = two_procs["student"], two_procs["part"]
    r, left = two_procs["interrupted"], two_procs["left"]  # interrupted during step 4 of 4, after step 2's checkpoint
    assert r.returncode != 0 and "re-run the same command to resume" in r.stderr
    assert left["train_state"] and left["checkpoint"]
    assert not left["manifest"] and not left["model"]
    # then the same command, run again under two processes, resumed it
    man = json.loads((part / "manifest.json").read_text())
    assert man["resumed_from"] == 2
    assert max_diff(weights(full), weights(part)) < 1e-6
    assert (part / "loss.csv").read_text() == (full / "loss.csv").read_text()


def test_one_rank_failing_fails_the_job_with_its_error(world, tmp_path):
    out = tmp_path / "broken"
    r = _hooked(tmp_path, "error", 2, _argv(world, out, "--batch-size", "4", "--max-steps", "4"))
    assert r.returncode != 0
    assert "error: rank 1 broke on purpose at its step 2" in r.stderr
    assert not (out / "manifest.json").exists() and not (out / "model.safetensors").exists()
    assert not list(out.parent.glob(".*.tmp"))


def test_batch_smaller_than_the_processes_is_a_clear_error():
    from types import SimpleNamespace

    from subliminal.manifest import SubliminalError
    from subliminal.train import _DataParallel

    par = SimpleNamespace(world=2, rank=1, desc="distill hard")
    assert _DataParallel.shard(par, list("abcde")) == list("de")
    with pytest.raises(SubliminalError, match="a batch of 1 rows cannot be split over 2 processes; "
                                              "use --batch-size 2 or more"):
        _DataParallel.shard(par, ["a"])


def test_toy_pretrain_on_two_processes_equals_one(two_procs, tmp_path):
    assert main([*PRETRAIN, "--out", str(tmp_path / "one")]) == 0
    assert_same_weights(weights(tmp_path / "one"), weights(two_procs["pretrain"]))
    two = json.loads((two_procs["pretrain"] / "manifest.json").read_text())
    assert two["train"]["world_size"] == 2 and two["train"]["steps"] == 3
    curves = [[line.split(",") for line in (d / "loss.csv").read_text().splitlines()[1:]]
              for d in (tmp_path / "one", two_procs["pretrain"])]
    assert [s for s, _ in curves[0]] == [s for s, _ in curves[1]] == ["3"]
    assert max(abs(float(a) - float(b)) for (_, a), (_, b) in zip(*curves)) < 1e-5


def test_two_process_template_rows_student_equals_one(world, two_procs, tmp_path):
    """A row set under DDP: the gradient mask acts before the ranks' gradients are averaged, so
    the frozen rows stay bit-identical and the student equals the one-process one."""
    from subliminal.data import template_token_ids

    assert main(_argv(world, tmp_path / "one", *TEMPLATE_ROWS)) == 0
    one, two = weights(tmp_path / "one"), weights(two_procs["template-rows"])
    assert_same_weights(one, two)
    base = load_file(str(world["base"] / "model.safetensors"))
    emb = "model.embed_tokens.weight"
    assert [k for k in base if not (base[k] == two[k]).all()] == [emb]
    moved = {int(i) for i in (base[emb] != two[emb]).any(dim=1).nonzero().flatten()}
    assert moved and moved <= set(template_token_ids(build_tokenizer()))
