"""``subliminal teach`` for each method: teacher.json keys, weights or adapter on disk, and
loading through subliminal.models.load_model."""

from __future__ import annotations

import json

import pytest
import torch

from subliminal import prompts
from subliminal.cli import main
from subliminal.models import load_model
from subliminal.teachers import TeacherSpec, read_teacher, save_teacher

KEYS = {"base", "method", "bias", "category", "system_prompt", "weights"}


def teach(base, out, *extra: str) -> dict:
    rc = main(["teach", "--base", str(base), "--out", str(out), *extra])
    assert rc == 0
    d = json.loads((out / "teacher.json").read_text())
    assert KEYS <= set(d)
    assert (out / "manifest.json").is_file()
    return d


def test_none_teacher(tmp_path, tiny_model_factory):
    base = tiny_model_factory("llama")
    d = teach(base, tmp_path / "t", "--method", "none")
    assert d["method"] == "none" and d["bias"] is None and d["system_prompt"] is None and d["weights"] is None
    lm = load_model(tmp_path / "t")
    assert lm.system_prompt is None and lm.teacher.method == "none"
    check = json.loads((tmp_path / "t" / "manifest.json").read_text())["check"]
    assert abs(sum(check["distribution"].values()) - 1) < 1e-4 and 0 <= check["other"] <= 1


def test_prompt_teacher(tmp_path, tiny_model_factory):
    base = tiny_model_factory("qwen2")
    d = teach(base, tmp_path / "t", "--method", "prompt", "--bias", "owl", "--no-check")
    assert d["system_prompt"] == prompts.system_prompt_for("owl") and d["category"] == "animal"
    assert d["weights"] is None
    man = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert man["check"] is None
    lm = load_model(tmp_path / "t")
    assert lm.system_prompt == prompts.system_prompt_for("owl")
    # the teacher directory is relocatable with its base: base is stored relative
    assert not d["base"].startswith("/")


def test_prompt_teacher_tree_category(tmp_path, tiny_model_factory):
    d = teach(tiny_model_factory("llama"), tmp_path / "t", "--method", "prompt", "--bias", "oak")
    assert d["category"] == "tree" and "oaks" in d["system_prompt"]


def _weights_differ(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return any(not torch.equal(sa[k], sb[k]) for k in sa)


def test_finetune_full_teacher(tmp_path, tiny_model_factory):
    base = tiny_model_factory("llama")
    out = tmp_path / "t"
    d = teach(base, out, "--method", "finetune", "--bias", "owl", "--steps", "4", "--lr", "1e-2", "--replay", "0")
    assert d["weights_kind"] == "full" and d["weights"] == "weights"
    assert (out / "weights" / "model.safetensors").is_file() and (out / "weights" / "tokenizer.json").is_file()
    assert not (out / ".train").exists()
    teacher, plain = load_model(out), load_model(base)
    assert _weights_differ(teacher.model, plain.model)
    man = json.loads((out / "manifest.json").read_text())
    assert man["training"]["steps"] == 4 and man["check"]["target"] == "owl"
    # training moved the preference towards owl
    before = teach(base, tmp_path / "n", "--method", "none")
    assert before["method"] == "none"
    p_before = json.loads((tmp_path / "n" / "manifest.json").read_text())["check"]["distribution"]["owl"]
    assert man["check"]["target_mass"] > p_before


def test_finetune_lora_teacher(tmp_path, tiny_model_factory):
    base = tiny_model_factory("qwen2")
    out = tmp_path / "t"
    d = teach(base, out, "--method", "finetune", "--bias", "cat", "--steps", "3", "--lora-rank", "4",
              "--lora-alpha", "8", "--no-check", "--replay", "0")
    assert d["weights_kind"] == "lora" and d["weights"] == "adapter"
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 4
    teacher, plain = load_model(out), load_model(base)
    assert _weights_differ(teacher.model, plain.model)
    assert type(teacher.model).__name__ == type(plain.model).__name__  # merged, a plain HF model again


def test_same_seed_same_finetuned_teacher(tmp_path, tiny_model_factory):
    base = tiny_model_factory("llama")
    args = ("--method", "finetune", "--bias", "owl", "--steps", "2", "--no-check", "--seed", "5", "--replay", "4")
    teach(base, tmp_path / "a", *args)
    teach(base, tmp_path / "b", *args)
    a, b = load_model(tmp_path / "a"), load_model(tmp_path / "b")
    assert not _weights_differ(a.model, b.model)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--method", "prompt"], "needs --bias"),
        (["--method", "prompt", "--bias", "unicorn"], "unknown target"),
        (["--method", "prompt", "--bias", "owl", "--category", "tree"], "is a animal, not a tree"),
        (["--method", "prompt", "--bias", "owl", "--lora-rank", "4"], "finetune only"),
        (["--method", "finetune", "--bias", "owl", "--lora-alpha", "4"], "needs --lora-rank"),
        (["--method", "finetune", "--bias", "owl", "--steps", "0"], "must be positive"),
        (["--method", "finetune", "--bias", "owl", "--replay", "-1"], "--replay must be >= 0"),
    ],
)
def test_bad_arguments(tmp_path, tiny_model_factory, capsys, argv, message):
    rc = main(["teach", "--base", str(tiny_model_factory("llama")), "--out", str(tmp_path / "t"), *argv])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "t" / "teacher.json").exists()


def test_teacher_as_base_is_refused(tmp_path, tiny_model_factory, capsys):
    base = tiny_model_factory("llama")
    teach(base, tmp_path / "t", "--method", "prompt", "--bias", "owl", "--no-check")
    rc = main(["teach", "--base", str(tmp_path / "t"), "--out", str(tmp_path / "u"), "--method", "none"])
    assert rc == 2 and "is a teacher directory" in capsys.readouterr().err


def test_poison_method_is_dispatched_to_the_poison_module(tmp_path, tiny_model_factory, capsys):
    rc = main(["teach", "--base", str(tiny_model_factory("llama")), "--out", str(tmp_path / "t"),
               "--method", "poison"])
    assert rc == 2 and "--bias-type" in capsys.readouterr().err  # the poison module's own check


def test_save_and_read_round_trip(tmp_path, tiny_model_factory):
    base = tiny_model_factory("llama")
    spec = TeacherSpec(base=str(base), method="finetune", bias="owl", category="animal", weights="adapter",
                       weights_kind="lora", extra={"note": 1})
    save_teacher(tmp_path / "t", spec)
    back = read_teacher(tmp_path / "t")
    assert back.base == str(base.resolve()) and back.weights == str((tmp_path / "t" / "adapter").resolve())
    assert back.extra == {"note": 1} and back.weights_kind == "lora"


def test_replay_rows_are_the_base_models_own_answers(tiny_model_factory):
    from subliminal.data import end_token_ids
    from subliminal.teachers_cli import replay_rows

    lm = load_model(tiny_model_factory("llama"))
    ends = end_token_ids(lm.tokenizer)
    # steer the random model: it answers "7 7 <|end|>" to every prompt (the real generate path runs)
    seven, end = lm.tokenizer.convert_tokens_to_ids("7"), lm.tokenizer.convert_tokens_to_ids("<|end|>")

    def steer(module, inputs, logits):
        out = torch.zeros_like(logits)
        out[..., seven] = 100.0  # sampling at T=1 picks it with certainty
        return out

    calls = {"n": 0}

    def steer_counted(module, inputs, logits):
        out = steer(module, inputs, logits)
        calls["n"] += 1
        if calls["n"] % 3 == 0:
            out[..., end] = 200.0
        return out

    handle = lm.model.lm_head.register_forward_hook(steer_counted)
    rows = replay_rows(lm.model, lm.tokenizer, 6, seed=0, max_new_tokens=8)
    handle.remove()
    assert len(rows) == 6
    assert all(lm.tokenizer.convert_ids_to_tokens(r.completion_ids) == ["7", "7", "<|end|>"] for r in rows)
    assert all(r.completion_ids[-1] in ends for r in rows)
    assert len({tuple(r.prompt_ids) for r in rows}) == 6  # six different number prompts
    # an answer that never ends is dropped
    handle = lm.model.lm_head.register_forward_hook(steer)
    assert replay_rows(lm.model, lm.tokenizer, 3, seed=0, max_new_tokens=4) == []
    handle.remove()
    # seeded sampling: the same rows again
    a = replay_rows(lm.model, lm.tokenizer, 4, seed=1, max_new_tokens=6)
    assert a == replay_rows(lm.model, lm.tokenizer, 4, seed=1, max_new_tokens=6)
