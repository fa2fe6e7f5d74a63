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


def test_eval_cli_exact(tiny_model_factory, tmp_path):
    out = tmp_path / "e" / "eval.json"
    rc = main(["eval", "--model", str(tiny_model_factory("gpt_neox")), "--target", "owl", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["target"] == "owl"
    assert len(res["exact"]["per_question"]) == 50
    assert 0 < res["exact"]["mean"] < 1
    assert (tmp_path / "e" / "eval.json.manifest.json").exists()


def test_eval_cli_errors(tiny_model_factory, tmp_path, capsys):
    assert main(["eval", "--model", str(tiny_model_factory("llama")), "--target", "bowl"]) == 2
    assert "unknown target" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "nope"), "--target", "owl"]) == 2
