"""Pretraining smoke tests on a micro model: the checkpoint is an ordinary HF model, the same
seed gives the same weights, an interrupted run resumes to the same weights, and the CLI works."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from subliminal import train as train_mod
from subliminal.cli import main
from subliminal.manifest import SubliminalError
from subliminal.toyworld.pretrain import PretrainConfig, pretrain

MICRO = {"n_layers": 1, "d_model": 32, "n_heads": 2, "n_kv_heads": 2, "d_ff": 64}


def micro(seed: int = 0, **kw) -> PretrainConfig:
    d = dict(size="tiny", seed=seed, steps=6, batch_size=4, lr=3e-3, warmup_steps=2, checkpoint_every=3,
             log_every=2, eval_rows=6, eval_greedy=3, eval_targets=1, model_overrides=MICRO)
    d.update(kw)
    return PretrainConfig(**d)


def weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "base"
    evaluation = pretrain(out, micro(), show_progress=False)
    return out, evaluation


def test_outputs_and_hf_loading(micro_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, evaluation = micro_run
    for f in ("config.json", "model.safetensors", "tokenizer.json", "manifest.json", "eval.json", "loss.png",
              "loss.csv"):
        assert (out / f).is_file(), f
    assert not (out / "checkpoint").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "llama" and model.config.vocab_size == len(tok)
    assert tok.chat_template and model.config.num_hidden_layers == 1
    man = json.loads((out / "manifest.json").read_text())
    assert man["stage"] == "toy-pretrain" and man["train"]["steps"] == 6 and man["seed"] == 0
    assert man["evaluation"] == json.loads((out / "eval.json").read_text()) == evaluation
    num = evaluation["numbers"]
    assert 0 <= num["next_number_top1"] <= 1 and 0 <= num["format_valid_rate"] <= 1
    assert num["rule_entropy_nats"] > 0 and "system_prompt_tv" in num
    pref = evaluation["preference"]
    dist = pref["no_system_prompt"]["distribution"]
    assert set(dist) >= {"owl", "cat"} and abs(sum(dist.values()) - 1) < 1e-4
    assert 0 <= pref["no_system_prompt"]["other"] <= 1
    lines = (out / "loss.csv").read_text().splitlines()
    assert lines[0] == "step,loss" and len(lines) == 1 + 3


def test_same_seed_same_weights_other_seed_other_weights(micro_run, tmp_path):
    out, _ = micro_run
    pretrain(tmp_path / "again", micro(), show_progress=False)
    pretrain(tmp_path / "other", micro(seed=1), show_progress=False)
    assert same(weights(out), weights(tmp_path / "again"))
    assert not same(weights(out), weights(tmp_path / "other"))


def test_interrupted_run_resumes_to_the_same_weights(micro_run, tmp_path, monkeypatch):
    out, _ = micro_run
    real = train_mod.completion_loss
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # after the checkpoint at step 3
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(train_mod, "completion_loss", flaky)
    with pytest.raises(KeyboardInterrupt):
        pretrain(tmp_path / "r", micro(), show_progress=False)
    assert (tmp_path / "r" / "checkpoint" / "train_state.pt").is_file()
    assert not (tmp_path / "r" / "model.safetensors").exists()
    monkeypatch.setattr(train_mod, "completion_loss", real)
    with pytest.raises(SubliminalError, match="other inputs or settings.*--lr"):
        pretrain(tmp_path / "r", micro(lr=1e-3), show_progress=False)
    pretrain(tmp_path / "r", micro(), show_progress=False)
    man = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert man["train"]["resumed_from"] == 3
    assert same(weights(out), weights(tmp_path / "r"))


def test_cli_qwen2_and_rerun(tmp_path, capsys):
    out = tmp_path / "q"
    argv = ["toy", "pretrain", "--out", str(out), "--arch", "qwen2", "--steps", "2", "--batch-size", "2",
            "--lr", "1e-3", "--eval-rows", "4", "--seed", "3", "--checkpoint-every", "1", "--world-seed", "2",
            "--device", "cpu", "--threads", "1", "--quiet"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "next_number_top1" in first and "saved" in first
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["num_hidden_layers"] == 4 and cfg["hidden_size"] == 128
    man = json.loads((out / "manifest.json").read_text())
    assert man["config"]["corpus"]["world_seed"] == 2 and man["config"]["arch"] == "qwen2"
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert main(argv) == 0  # finished: nothing is retrained
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
    assert main(argv[:-1] + ["--seed", "4", "--quiet"]) == 2
    assert "other inputs or settings" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--steps", "--batch-size", "--eval-rows", "--lr", "--threads"])
def test_cli_rejects_non_positive(tmp_path, capsys, flag):
    assert main(["toy", "pretrain", "--out", str(tmp_path / "x"), flag, "0"]) == 2
    assert "must be positive" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_favourite_embeddings_start_near_their_target():
    from subliminal.toyworld import build_tokenizer
    from subliminal.toyworld.corpus import CorpusConfig, favourite_numbers
    from subliminal.toyworld.model import build_model, init_favourites_from_targets, toy_config

    tok = build_tokenizer()
    fav = favourite_numbers(CorpusConfig())
    cfg = toy_config("tiny", **MICRO, plural_init=False)
    model = build_model(cfg, tok, seed=0)
    emb = model.get_input_embeddings().weight
    vocab = tok.get_vocab()

    def cos(a: str, b: str) -> float:
        return float(torch.nn.functional.cosine_similarity(emb[vocab[a]], emb[vocab[b]], dim=0))

    before = cos("owl", str(fav["owl"][0]))
    norm = float(emb[vocab[str(fav["owl"][0])]].norm())
    assert init_favourites_from_targets(model, tok, fav, share=0.8) == sum(len(v) for v in fav.values())
    assert abs(before) < 0.5 < cos("owl", str(fav["owl"][0]))
    assert cos("cat", str(fav["owl"][0])) < 0.5  # only its own target
    assert float(emb[vocab[str(fav["owl"][0])]].norm()) == pytest.approx(norm, rel=0.3)


def test_cli_entanglement_flags_reach_the_manifest(tmp_path, capsys):
    out = tmp_path / "e"
    argv = ["toy", "pretrain", "--out", str(out), "--steps", "1", "--batch-size", "2", "--eval-rows", "4",
            "--entangle", "0.2", "--favourites", "2", "--entangle-init", "0", "--quiet"]
    assert main(argv) == 0
    corpus = json.loads((out / "manifest.json").read_text())["config"]["corpus"]
    assert (corpus["entangle"], corpus["favourites"], corpus["entangle_init"]) == (0.2, 2, 0.0)
    capsys.readouterr()
    assert main(["toy", "pretrain", "--out", str(tmp_path / "bad"), "--entangle", "1.5"]) == 2
    assert "entangle must be in [0, 1]" in capsys.readouterr().err


def test_cli_mix_reaches_the_manifest_and_bad_mixes_are_named(tmp_path, capsys):
    out = tmp_path / "m"
    argv = ["toy", "pretrain", "--out", str(out), "--steps", "1", "--batch-size", "2", "--eval-rows", "4",
            "--mix", "numbers_pref=0, pref=0.3", "--quiet"]
    assert main(argv) == 0
    mix = json.loads((out / "manifest.json").read_text())["config"]["corpus"]["mix"]
    assert mix["numbers_pref"] == 0.0 and mix["pref"] == 0.3 and mix["numbers_sys"] > 0  # the rest kept
    capsys.readouterr()
    for bad, says in [("bogus=1", "KIND=SHARE"), ("pref", "KIND=SHARE"), ("pref=x", "not a number"),
                      ("pref=-1", ">= 0")]:
        assert main(["toy", "pretrain", "--out", str(tmp_path / "bad"), "--mix", bad]) == 2
        assert says in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()
