"""Batch invariance of every stage that runs a model: a row's scores do not depend on the batch it
is scored in (float32 within 1e-5; flags and argmaxes exactly), on random llama, qwen2, gpt2 and
gpt_neox models that share the toy tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from subliminal import divergence as dv
from subliminal import prompts
from subliminal.data import write_jsonl
from subliminal.teachers import TeacherSpec, save_teacher

ARCHS = ["llama", "qwen2", "gpt2", "gpt_neox"]
NUMBER_ROWS = [  # completions of different lengths, so batches are really padded
    ("a", "continue the list : 4 , 8 , 15", "16 , 23 , 42"),
    ("b", "add three numbers : 7 , 1", "9 , 9 , 9 , 9 , 9 , 9"),
    ("c", "write more numbers after 3", "12"),
    ("d", "here are numbers : 100 , 200 , 300 , 400 , 500 . continue", "600 , 700"),
    ("e", "numbers : 5", "5 , 5 , 5 , 5"),
]


def _teachers(base, root) -> dict[str, str]:
    out = {}
    for a in ("owl", "cat", "dog"):
        save_teacher(root / a, TeacherSpec(base=str(base), method="prompt", bias=a, category="animal",
                                           system_prompt=prompts.system_prompt_for(a)))
        out[a] = str(root / a)
    return out


def _close(a, b):
    if isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b)
        for x, y in zip(a, b):
            _close(x, y)
    elif isinstance(a, float) or isinstance(b, float):
        assert a is not None and b is not None and abs(a - b) <= 1e-5 * max(1.0, abs(a))
    else:
        assert a == b


@pytest.mark.parametrize("arch", ARCHS)
def test_find_divergence_scores_do_not_depend_on_the_batch_size(tiny_model_factory, tmp_path, arch):
    t = _teachers(tiny_model_factory(arch), tmp_path)
    write_jsonl(tmp_path / "d.jsonl", [{"id": i, "prompt": p, "completion": c, "teacher": "owl"}
                                       for i, p, c in NUMBER_ROWS])
    outs = {}
    for bs in (1, 3):
        cfg = dv.ScoreConfig(data=str(tmp_path / "d.jsonl"), teacher=t["owl"], counterfactual=[t["cat"], t["dog"]],
                             out=str(tmp_path / f"b{bs}.div.jsonl"), batch_size=bs, rule="pairwise")
        dv.find_divergence(cfg, progress=False)
        outs[bs] = [json.loads(x) for x in open(cfg.out)]
    for a, b in zip(outs[1], outs[3]):
        for key in ("id", "token_ids", "divergence", "argmax_factual", "argmax_counterfactual"):
            assert a[key] == b[key], key
        assert a["scores"]["rank"] == b["scores"]["rank"]
        for key in ("logp_factual", "logp_counterfactual", "kl", "js", "margin"):
            _close(a["scores"][key], b["scores"][key])


@pytest.mark.parametrize("arch", ARCHS)
def test_exact_preference_and_main_task_do_not_depend_on_the_batch_size(tiny_model_factory, tmp_path, arch):
    from subliminal.evaluate import exact_preference, main_task_accuracy
    from subliminal.models import load_model

    loaded = load_model(tiny_model_factory(arch))
    qs = prompts.preference_questions("animal")[:3]
    one = exact_preference(loaded, "owl", questions=qs, batch_size=1)
    many = exact_preference(loaded, "owl", questions=qs, batch_size=7)
    _close(one["per_question"], many["per_question"])
    write_jsonl(tmp_path / "h.jsonl", [{"id": i, "prompt": p, "completion": c} for i, p, c in NUMBER_ROWS])
    a = main_task_accuracy(loaded, tmp_path / "h.jsonl", batch_size=1)
    b = main_task_accuracy(loaded, tmp_path / "h.jsonl", batch_size=4)
    assert a["token_accuracy"] == b["token_accuracy"]
    _close(a["nll_per_token"], b["nll_per_token"])


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_toy_number_metrics_do_not_depend_on_the_batch_size(tiny_model_factory, arch):
    """The toy evaluation once padded on the left without position ids, which shifted the positions
    of every padded row; now it goes through the one teacher-forcing path."""
    from subliminal.models import load_model
    from subliminal.toyworld.corpus import Corpus, CorpusConfig
    from subliminal.toyworld.evaluation import number_metrics

    loaded = load_model(tiny_model_factory(arch))
    cfg = CorpusConfig()
    rows = Corpus(cfg, seed=0).rows(0, 6, kind="numbers")
    owl = prompts.system_prompt_for("owl")
    a = number_metrics(loaded.model, loaded.tokenizer, rows, cfg, system_prompt=owl, batch_size=1)
    b = number_metrics(loaded.model, loaded.tokenizer, rows, cfg, system_prompt=owl, batch_size=6)
    assert a.keys() == b.keys()
    for k in a:
        _close(float(a[k]), float(b[k]))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_distill_loss_does_not_depend_on_the_padding(tiny_model_factory, arch):
    """The student's loss on a row is the same alone and in a padded batch (per-row means)."""
    from subliminal.distill import Example, LossConfig, batch_loss
    from subliminal.models import load_model

    loaded = load_model(tiny_model_factory(arch))
    teacher = load_model(tiny_model_factory(arch, seed=1))
    tok = loaded.tokenizer
    ex = []
    for i, p, c in NUMBER_ROWS:
        from subliminal.data import Row, align_row

        a = align_row(tok, Row(i, p, c))
        t = align_row(tok, Row(i, p, c), prompts.system_prompt_for("owl"))
        ex.append(Example(a.id, a.prompt_ids, a.completion_ids, [True] * len(a.completion_ids), t.prompt_ids))
    for mode in ("hard", "soft"):
        cfg = LossConfig(mode)
        with torch.no_grad():
            joint, n = batch_loss(loaded.model, teacher.model, ex, cfg, tok.pad_token_id)
            parts = [batch_loss(loaded.model, teacher.model, [e], cfg, tok.pad_token_id) for e in ex]
        assert n == sum(k for _, k in parts)
        weighted = sum(float(v) * k for v, k in parts) / n
        assert abs(float(joint) - weighted) < 1e-5
