"""The loader's errors: each bad model source gives a clear message, and the CLI exits non-zero
with it."""

from __future__ import annotations

import json
import shutil

import pytest

from subliminal.cli import main
from subliminal.manifest import SubliminalError
from subliminal.models import ModelLoadError, load_model, load_tokenizer


def test_missing_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="no such local model directory"):
        load_model(tmp_path / "nope")


def test_file_instead_of_directory(tmp_path):
    f = tmp_path / "model.bin"
    f.write_text("x")
    with pytest.raises(ModelLoadError, match="expected a model directory"):
        load_model(f)


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)


def test_directory_without_tokenizer(tmp_path, tiny_model_factory):
    src = tiny_model_factory("llama")
    d = tmp_path / "m"
    d.mkdir()
    for f in src.iterdir():
        if "token" not in f.name and f.name != "chat_template.jinja":
            shutil.copy(f, d / f.name)
    with pytest.raises(ModelLoadError, match="no tokenizer files"):
        load_model(d)
    with pytest.raises(ModelLoadError, match="no tokenizer files"):
        load_tokenizer(str(d))


def test_unsupported_architecture(tmp_path, tiny_model_factory):
    src = tiny_model_factory("llama")
    d = tmp_path / "m"
    shutil.copytree(src, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "not_a_real_arch"
    cfg["architectures"] = ["NotARealArchForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="unsupported"):
        load_model(d)


def test_hub_id_while_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="offline.*local model directory"):
        load_model("hf:someorg/some-model")


def test_model_load_error_is_a_subliminal_error():
    assert issubclass(ModelLoadError, SubliminalError)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_good_directory_loads(tiny_model_factory, arch):
    lm = load_model(tiny_model_factory(arch))
    assert lm.tokenizer.padding_side == "left" and lm.system_prompt is None and lm.teacher is None


def test_cli_exits_nonzero_with_the_message(tmp_path, capsys):
    rc = main(["teach", "--base", str(tmp_path / "missing"), "--method", "prompt", "--bias", "owl",
               "--out", str(tmp_path / "t")])
    assert rc != 0
    err = capsys.readouterr().err
    assert "no such local model directory" in err and str(tmp_path / "missing") in err
    assert not (tmp_path / "t").exists()


def test_cli_hub_id_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = main(["teach", "--base", "hf:someorg/some-model", "--method", "none", "--out", str(tmp_path / "t")])
    assert rc == 2
    assert "offline" in capsys.readouterr().err


def test_console_command_exits_nonzero_with_the_message(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "subliminal.cli", "teach", "--base", str(tmp_path / "missing"),
                           "--method", "none", "--out", str(tmp_path / "t")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "no such local model directory" in proc.stderr


def test_word_level_tokenizer_survives_a_qwen2_config(tiny_model_factory, toy_tokenizer):
    """transformers 5 would load the toy vocabulary as Qwen2Tokenizer for a qwen2 config and
    re-split words; the loader must keep the saved fast tokenizer."""
    from subliminal.models import load_tokenizer

    path = tiny_model_factory("qwen2")
    tok = load_tokenizer(str(path))
    text = "<|user|> owl , 12 . <|end|>"
    assert tok(text, add_special_tokens=False)["input_ids"] == toy_tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_tokenizer_is_parsed_once_and_each_caller_gets_its_own_copy(tmp_path, smol_model):
    """load_tokenizer keeps a local tokenizer per process: a second load is a shallow copy of the
    first (the same token ids), attributes one caller sets stay with it, and a changed tokenizer
    file is read again."""
    from subliminal import models

    d = tmp_path / "m"
    shutil.copytree(smol_model, d)
    a = load_tokenizer(str(d))
    b = load_tokenizer(str(d))
    assert a is not b and a._tokenizer is b._tokenizer  # one parse
    b.chat_template, b.padding_side = "{{ 'x' }}", "right"
    assert a.chat_template != b.chat_template and a.padding_side == "left"
    assert load_tokenizer(str(d)).padding_side == "left"
    assert a("hello world").input_ids == b("hello world").input_ids
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = 123
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    c = load_tokenizer(str(d))
    assert c._tokenizer is not a._tokenizer and c.model_max_length == 123
    assert len(models._TOKENIZERS) >= 2
