"""Evaluation: exact preference against a manual forward pass, word-boundary matching, CIs,
main-task accuracy, transfer curves and the comparison table."""

from __future__ import annotations

import json
import math

import pytest
import torch

from subliminal import prompts
from subliminal.cli import main
from subliminal.data import encode, render_chat
from subliminal.evaluate import exact_preference, mean_ci, t_quantile
from subliminal.models import load_model


def test_exact_preference_sums_to_one_and_matches_manual_pass(tiny_model_factory):
    loaded = load_model(tiny_model_factory("llama"))
    qs = prompts.preference_questions("animal")[:3]
    res = exact_preference(loaded, "owl", questions=qs, batch_size=5)
    assert res["target"] == "owl"
    assert sum(res["distribution"].values()) == pytest.approx(1.0, abs=1e-9)
    assert len(res["per_question"]) == 3
    assert res["mean"] == pytest.approx(sum(res["per_question"]) / 3)
    # Manual, unbatched: log p(candidate tokens + end | question), softmax over candidates.
    tok, model = loaded.tokenizer, loaded.model
    q = qs[1]
    lps = []
    for c in prompts.ANIMALS:
        p_ids = encode(tok, render_chat(tok, q))
        f_ids = encode(tok, render_chat(tok, q, None, c))
        c_ids = f_ids[len(p_ids):]
        c_ids = c_ids[: c_ids.index(tok.eos_token_id) + 1]
        ids = torch.tensor([p_ids + c_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        lps.append(sum(float(logp[len(p_ids) + j - 1, t]) for j, t in enumerate(c_ids)))
    probs = torch.softmax(torch.tensor(lps), 0)
    assert res["per_question"][1] == pytest.approx(float(probs[0]), rel=1e-4)


def test_exact_preference_uses_system_prompt(tiny_model_factory, tmp_path):
    from subliminal.teachers import TeacherSpec, save_teacher

    base = tiny_model_factory("gpt2")
    save_teacher(tmp_path / "t", TeacherSpec(base=str(base), method="prompt", bias="owl", category="animal",
                                             system_prompt=prompts.system_prompt_for("owl")))
    qs = prompts.preference_questions("animal")[:2]
    a = exact_preference(load_model(base), "owl", questions=qs)
    b = exact_preference(load_model(tmp_path / "t"), "owl", questions=qs)
    assert b["system_prompt"] and a["system_prompt"] is None
    assert a["per_question"] != b["per_question"]


def test_mean_ci_t_interval():
    assert t_quantile(0.975, 2) == pytest.approx(4.3027, abs=1e-3)
    assert t_quantile(0.975, 30) == pytest.approx(2.0423, abs=1e-3)
    m, lo, hi = mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and lo == pytest.approx(2 - 4.3027 / math.sqrt(3), abs=1e-3) and hi == pytest.approx(4 - lo)
    m, lo, hi = mean_ci([0.5])
    assert m == 0.5 and math.isnan(lo)


def test_aggregate_seeds(tmp_path):
    from subliminal.evaluate import aggregate_seeds

    files = []
    for i, v in enumerate([0.2, 0.3, 0.4]):
        files.append(tmp_path / f"s{i}.json")
        files[-1].write_text(json.dumps({"exact": {"mean": v}}))
    agg = aggregate_seeds(files)
    m, lo, hi = mean_ci([0.2, 0.3, 0.4])
    assert agg["mean"] == pytest.approx(0.3) and agg["ci"] == pytest.approx([lo, hi]) and agg["n_seeds"] == 3
    with pytest.raises(Exception, match="sampled"):
        aggregate_seeds(files, "sampled")


def test_eval_cli_exact_sampled_heldout(tiny_model_factory, tmp_path):
    from subliminal.data import Row, write_jsonl

    write_jsonl(tmp_path / "h.jsonl", [Row("a", "Give me numbers .", "1 2 3"), Row("b", "More .", "4 5")])
    out = tmp_path / "e" / "eval.json"
    rc = main(["eval", "--model", str(tiny_model_factory("gpt_neox")), "--target", "owl", "--out", str(out),
               "--samples", "1", "--max-new-tokens", "2", "--batch-size", "64", "--heldout",
               str(tmp_path / "h.jsonl"), "--heldout-rows", "1"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert len(res["sampled"]["per_question"]) == 50 and res["main_task"]["rows"] == 1
    assert res["target"] == "owl"
    assert len(res["exact"]["per_question"]) == 50
    assert 0 < res["exact"]["mean"] < 1
    assert (tmp_path / "e" / "eval.json.manifest.json").exists()


def test_eval_cli_errors(tiny_model_factory, tmp_path, capsys):
    assert main(["eval", "--model", str(tiny_model_factory("llama")), "--target", "bowl"]) == 2
    assert "unknown target" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "nope"), "--target", "owl"]) == 2
    assert "no such local model directory: " in capsys.readouterr().err


# ------------------------------------------------------------------------------ sampled


@pytest.mark.parametrize("text,target,hit", [
    ("owl", "owl", True), ("Owls!", "owl", True), ("the owl.", "owl", True), ("bowl", "owl", False),
    ("howl", "owl", False), ("owlish", "owl", False), ("million", "lion", False), ("lions", "lion", True),
    ("cattle", "cat", False), ("cat", "cat", True), ("Cats , surely", "cat", True), ("wolves", "wolf", True),
    ("dog-like", "dog", True), ("", "owl", False), ("scowl", "owl", False), ("owl2", "owl", False),
])
def test_word_boundary_matching(text, target, hit):
    from subliminal.evaluate import names_target

    assert names_target(text, target) is hit


def test_sampled_preference_seeded_and_independent_of_batch(tiny_model_factory):
    from subliminal.evaluate import sampled_preference

    loaded = load_model(tiny_model_factory("llama"))
    qs = prompts.preference_questions("animal")[:3]
    a = sampled_preference(loaded, "owl", samples=4, batch_size=5, seed=3, questions=qs, max_new_tokens=3)
    b = sampled_preference(loaded, "owl", samples=4, batch_size=12, seed=3, questions=qs, max_new_tokens=3)
    assert a["per_question"] == b["per_question"] and a["examples"] == b["examples"]
    assert len(a["per_question"]) == 3 and a["samples"] == 4
    assert sum(a["answer_counts"].values()) == 12
    assert a["ci_method"].startswith("t-interval")


# ---------------------------------------------------------------------------- main task


def test_main_task_accuracy_matches_manual(tiny_model_factory, tmp_path):
    from subliminal.data import Row, align_row, write_jsonl
    from subliminal.evaluate import main_task_accuracy

    loaded = load_model(tiny_model_factory("gpt2"))
    rows = [Row("a", "Give me 3 more numbers .", "1 , 2 , 3"), Row("b", "List numbers .", "[ 7 8 ]")]
    write_jsonl(tmp_path / "h.jsonl", rows)
    res = main_task_accuracy(loaded, tmp_path / "h.jsonl", batch_size=1)
    hit = n = 0
    for r in rows:
        a = align_row(loaded.tokenizer, r)
        with torch.no_grad():
            lg = loaded.model(input_ids=torch.tensor([a.input_ids])).logits[0]
        pred = lg[a.n_prompt - 1 : a.n_prompt - 1 + len(a.completion_ids)].argmax(-1).tolist()
        hit += sum(p == t for p, t in zip(pred, a.completion_ids))
        n += len(a.completion_ids)
    assert res["tokens"] == n and res["token_accuracy"] == pytest.approx(hit / n)
    assert res["number_tokens"] == 5


# ---------------------------------------------------------------------- curves, compare, CLI


def _fake_student(base, d):
    """A student directory as distill writes it: final weights, checkpoint dirs, manifest."""
    import shutil

    from subliminal.manifest import write_manifest

    for sub in (d, d / "checkpoint-0010"):
        sub.mkdir(parents=True, exist_ok=True)
        for f in base.iterdir():
            shutil.copy(f, sub / f.name)
    write_manifest(d, stage="distill", config={}, seed=0, inputs={"base": base}, extra={"steps": 12})
    return d


def test_all_checkpoints_curve(tiny_model_factory, tmp_path, capsys):
    from subliminal.data import Row, write_jsonl

    base = tiny_model_factory("gpt_neox")
    student = _fake_student(base, tmp_path / "s")
    write_jsonl(tmp_path / "h.jsonl", [Row("a", "Give me numbers .", "1 2 3")])
    rc = main(["eval", "--model", str(student), "--target", "cat", "--all-checkpoints", "--max-questions", "4", "--heldout",
               str(tmp_path / "h.jsonl")])
    assert rc == 0
    curve = json.loads((student / "transfer_curve.json").read_text())
    assert [p["step"] for p in curve["points"]] == [0, 10, 12]
    assert len(curve["points"][0]["exact"]["per_question"]) == 4
    assert [p["label"] for p in curve["points"]] == ["base", "checkpoint-0010", "final"]
    assert len({round(p["exact"]["mean"], 9) for p in curve["points"]}) == 1  # same weights everywhere
    assert "main_task" in curve["points"][0]
    assert (student / "transfer_curve.png").stat().st_size > 0
    assert len((student / "transfer_curve.csv").read_text().splitlines()) == 4
    assert main(["eval", "--model", str(base), "--target", "cat", "--all-checkpoints"]) == 2
    assert "no checkpoint-* directories" in capsys.readouterr().err


def test_compare_table_paired_differences(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"model": "A", "target": "owl", "exact": {"mean": 0.2, "ci": [0.1, 0.3],
                                                                       "per_question": [0.1, 0.2, 0.3]}}))
    b.write_text(json.dumps({"model": "B", "target": "owl",
                             "exact": {"mean": 0.4, "ci": [0.2, 0.6], "per_question": [0.2, 0.5, 0.5]},
                             "sampled": {"mean": 0.5, "ci": [0.4, 0.6], "per_question": [0.5, 0.5, 0.5]},
                             "main_task": {"token_accuracy": 0.9}}))
    assert main(["eval", "--compare", str(a), str(b), "--out", str(tmp_path / "cmp.json")]) == 0
    table = capsys.readouterr().out.strip()
    assert table.count("\n") == 3 and "diff to first" in table and "| B |" in table
    cmp = json.loads((tmp_path / "cmp.json").read_text())["compare"]
    assert cmp[1]["exact_diff"] == pytest.approx(0.2)
    m, lo, hi = mean_ci([0.1, 0.3, 0.2])
    assert cmp[1]["exact_diff_ci"] == pytest.approx([lo, hi])
    assert cmp[1]["sampled_diff"] is None and cmp[1]["main_task_accuracy"] == 0.9
    assert main(["eval", "--compare", str(tmp_path / "missing.json")]) == 2
    assert "missing.json: no such file" in capsys.readouterr().err
    c = tmp_path / "c.json"
    c.write_text(json.dumps({"target": "cat", "exact": {"mean": 0.1}}))
    assert main(["eval", "--compare", str(a), str(c)]) == 2
    err = capsys.readouterr().err
    assert "eval files measure different targets" in err and "cat" in err and "owl" in err


def test_bias_type_dispatches_to_poison(monkeypatch, tmp_path):
    import subliminal.poison as poison

    seen = {}

    def fake(args):
        seen["bias_type"] = args.bias_type
        return 0

    monkeypatch.setattr(poison, "run_bias_eval", fake)
    bias = poison.toy.BIAS_TYPES[0]
    assert main(["eval", "--model", str(tmp_path), "--bias-type", bias]) == 0
    assert seen["bias_type"] == bias
