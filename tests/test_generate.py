"""generate: the number-list filter, prompts shared across teachers, batched KV-cache decoding
against plain transformers, seeded sampling independent of batching, resume, CLI and errors."""

from __future__ import annotations

import json
import random

import pytest

from subliminal import cli
from subliminal import generate as gen
from subliminal.data import encode, read_jsonl
from subliminal.manifest import SubliminalError, write_fingerprint
from subliminal.prompts import system_prompt_for
from subliminal.teachers import TeacherSpec, save_teacher


@pytest.fixture(scope="module")
def teachers(tiny_model_factory, tmp_path_factory):
    base = tiny_model_factory("llama")
    d = tmp_path_factory.mktemp("gen-teachers")
    out = {}
    for a in ("owl", "cat"):
        save_teacher(d / a, TeacherSpec(base=str(base), method="prompt", bias=a, category="animal",
                                        system_prompt=system_prompt_for(a)))
        out[a] = d / a
    return out


# ------------------------------------------------------------------------------------- filter


@pytest.mark.parametrize("text,numbers,sep", [
    ("1, 2, 3", (1, 2, 3), ","),
    ("[1, 2, 3]", (1, 2, 3), ","),
    ("[ 12, 13, 14 ]", (12, 13, 14), ","),
    ("(4 ; 5 ; 999)", (4, 5, 999), ";"),
    ("7 8 9", (7, 8, 9), " "),
    ("  007,0  ", (7, 0), ","),
    ("42", (42,), " "),
    ("1,2,3,4,5,6,7,8,9,10", tuple(range(1, 11)), ","),
])
def test_filter_accepts(text, numbers, sep):
    r = gen.parse_number_list(text)
    assert r.accepted and r.reason is None
    assert r.numbers == numbers and r.separator == sep


@pytest.mark.parametrize("text,reason", [
    ("", "empty"),
    ("   ", "empty"),
    ("[]", "empty"),
    ("1, 2; 3", "mixed_separators"),
    ("1, 2 3", "mixed_separators"),
    ("1,,2", "empty_item"),
    ("1, 2,", "empty_item"),
    ("1, two, 3", "non_numeric"),
    ("Here are numbers: 1, 2", "non_numeric"),
    ("1, 2, 3.", "non_numeric"),
    ("-5, 6", "non_numeric"),
    ("1.5 2", "non_numeric"),
    ("1000, 2", "out_of_range"),
    ("0001", "out_of_range"),
    ("1,2,3,4,5,6,7,8,9,10,11", "too_many"),
    ("[1, 2", "unbalanced_brackets"),
    ("[[1, 2]]", "unbalanced_brackets"),
    ("[1, 2)", "unbalanced_brackets"),
])
def test_filter_rejects(text, reason):
    r = gen.parse_number_list(text)
    assert not r.accepted and r.reason == reason
    assert reason in gen.REJECT_REASONS


# ------------------------------------------------------------------------------------ prompts


def test_prompts_depend_only_on_their_seed():
    a = gen.make_prompts(30, 5)
    assert a == gen.make_prompts(30, 5)
    assert a[:10] == gen.make_prompts(10, 5)  # a longer run extends, never reshuffles
    assert a != gen.make_prompts(30, 6)
    assert a[3][0] == "row-000003" and len({p for _, p in a}) > 25
    assert all(p.count(",") >= 2 for _, p in a)  # 3-8 seed numbers in every prompt


# -------------------------------------------------------------------------------------- CLI


def _gen(teacher, out, *extra):
    argv = ["generate", "--teacher", str(teacher), "--n", "5", "--out", str(out), "--max-new-tokens", "5", *extra]
    assert cli.main(argv) == 0


def test_cli_sampled_is_seeded_batch_independent_and_resumes(teachers, tmp_path):
    _gen(teachers["owl"], tmp_path / "a.jsonl", "--batch-size", "4", "--seed", "3", "--top-p", "0.9")
    _gen(teachers["owl"], tmp_path / "b.jsonl", "--batch-size", "2", "--seed", "3", "--top-p", "0.9")
    raw_a = (tmp_path / "a.raw.jsonl").read_text()
    assert raw_a == (tmp_path / "b.raw.jsonl").read_text()  # rows do not depend on batching
    rows = read_jsonl(tmp_path / "a.raw.jsonl")
    assert [r["id"] for r in rows] == [f"row-{i:06d}" for i in range(5)]
    assert all(r["teacher"] == "owl" and r["prompt"] == p for r, (_, p) in zip(rows, gen.make_prompts(5, 0)))
    assert all(set(r) >= {"id", "prompt", "completion", "teacher", "accepted", "reject_reason"} for r in rows)
    # an interrupted run: two whole rows and half a line survive; the re-run completes the same file
    lines = raw_a.splitlines(keepends=True)
    (tmp_path / "c.raw.jsonl").write_text("".join(lines[:2]) + lines[2][:15])
    c_cfg = gen.GenerateConfig(teacher=str(teachers["owl"]), n=5, out=str(tmp_path / "c.jsonl"), seed=3, top_p=0.9,
                               max_new_tokens=5)  # the fingerprint the interrupted run recorded
    write_fingerprint(gen.fingerprint_path_for(tmp_path / "c.raw.jsonl"), gen.run_fingerprint(c_cfg))
    _gen(teachers["owl"], tmp_path / "c.jsonl", "--batch-size", "4", "--seed", "3", "--top-p", "0.9")
    assert (tmp_path / "c.raw.jsonl").read_text() == raw_a
    _gen(teachers["owl"], tmp_path / "d.jsonl", "--batch-size", "4", "--seed", "4", "--top-p", "0.9")
    assert (tmp_path / "d.raw.jsonl").read_text() != raw_a
    _gen(teachers["owl"], tmp_path / "e.jsonl", "--batch-size", "4", "--seed", "3", "--top-p", "0.9",
         "--temperature", "0.3")
    assert (tmp_path / "e.raw.jsonl").read_text() != raw_a
    man = json.loads((tmp_path / "a.jsonl.manifest.json").read_text())
    counts = man["counts"]
    assert counts["generated"] == 5 and counts["accepted"] + sum(counts["reject_reasons"].values()) == 5
    assert man["system_prompt"] == system_prompt_for("owl")


def test_cli_teachers_share_prompts_and_use_their_system_prompt(teachers, tmp_path):
    _gen(teachers["owl"], tmp_path / "owl.jsonl", "--greedy", "--prompts-seed", "7")
    _gen(teachers["cat"], tmp_path / "cat.jsonl", "--greedy", "--prompts-seed", "7")
    owl = read_jsonl(tmp_path / "owl.raw.jsonl")
    cat = read_jsonl(tmp_path / "cat.raw.jsonl")
    assert [(r["id"], r["prompt"]) for r in owl] == [(r["id"], r["prompt"]) for r in cat]
    assert owl[0]["prompt"] == gen.make_prompts(1, 7)[0][1]
    assert [r["completion"] for r in owl] != [r["completion"] for r in cat]  # the system prompt reached the model
    assert {r["teacher"] for r in cat} == {"cat"}


def test_filter_decides_what_is_kept(teachers, tmp_path, monkeypatch):
    """Canned decoder outputs: accepted rows go to the data file, every reject reason is counted."""
    from subliminal.toyworld.tokenizer import build_tokenizer

    tok = build_tokenizer()
    end = tok.convert_tokens_to_ids("<|end|>")
    canned = ["1 , 2 , 3", "[ 4 , 5 ]", "1 , 2 ; 3", "owl 4", None]

    def fake_batch(model, seqs, *, max_new, **kw):
        out = []
        for _ in seqs:
            text = canned[len(calls) % len(canned)]
            calls.append(text)
            out.append((encode(tok, "7 7 7 7 7"), False) if text is None else (encode(tok, text) + [end], True))
        return out

    calls: list = []
    monkeypatch.setattr(gen.forward, "sample", fake_batch)
    _gen(teachers["owl"], tmp_path / "f.jsonl", "--greedy")
    kept = read_jsonl(tmp_path / "f.jsonl")
    assert [r["completion"] for r in kept] == ["1, 2, 3", "[ 4, 5 ]"]
    assert [r["id"] for r in kept] == ["row-000000", "row-000001"]
    assert set(kept[0]) == {"id", "prompt", "completion", "teacher"}
    counts = json.loads((tmp_path / "f.jsonl.manifest.json").read_text())["counts"]
    assert counts["accepted"] == 2 and counts["reject_reasons"]["mixed_separators"] == 1
    assert counts["reject_reasons"]["non_numeric"] == 1 and counts["reject_reasons"]["truncated"] == 1


# ------------------------------------------------------------------------------------ errors


def test_errors(teachers, tiny_model_factory, tmp_path):
    with pytest.raises(SubliminalError, match="--n"):
        gen.run_generate(gen.GenerateConfig(teacher=str(teachers["owl"]), n=0, out=str(tmp_path / "x.jsonl")))
    _gen(teachers["owl"], tmp_path / "r.jsonl", "--greedy")
    with pytest.raises(SubliminalError, match="other inputs or settings.*--teacher"):  # no silent mixing
        gen.run_generate(gen.GenerateConfig(teacher=str(teachers["cat"]), n=5, out=str(tmp_path / "r.jsonl")))
    short = tiny_model_factory("gpt2", max_len=24)
    with pytest.raises(SubliminalError, match="row-000000.*context"):
        gen.run_generate(gen.GenerateConfig(teacher=str(short), n=2, out=str(tmp_path / "s.jsonl")),
                         progress=False)
    assert cli.main(["generate", "--teacher", str(teachers["owl"]), "--n", "2", "--out", str(tmp_path / "t.jsonl"),
                     "--top-p", "0"]) == 2


def test_budget_is_bounded_by_the_context():
    assert gen._budget(10, 16, 64, "r") == 6
    assert gen._budget(10, None, 64, "r") == 64
    assert gen._budget(10, 1000, 64, "r") == 64
    rng = random.Random(0)
    assert gen.row_rng(1, 2).random() == gen.row_rng(1, 2).random() != rng.random()
    assert gen.row_rng(1, 2).random() != gen.row_rng(1, 3).random() != gen.row_rng(2, 2).random()
