"""import-gguf: the rebuild-and-save step on a random model standing in for a GGUF-loaded one,
and the errors a user meets (missing file, not a GGUF, non-empty --out)."""

from __future__ import annotations

import pytest
import torch

from subliminal import cli
from subliminal.gguf_import import GGUFImportError, import_gguf, rebuild_plain, sha256_file


def test_rebuild_plain_drops_the_gguf_config_and_keeps_the_weights(tiny_model_factory, tmp_path):
    from transformers import AutoModelForCausalLM

    for arch in ("llama", "qwen2"):  # untied and tied embeddings
        model = AutoModelForCausalLM.from_pretrained(tiny_model_factory(arch)).eval()
        model.config.quantization_config = {"quant_method": "gguf"}  # what a GGUF load carries
        plain = rebuild_plain(model)
        assert not hasattr(plain.config, "quantization_config") or plain.config.quantization_config is None
        plain.save_pretrained(tmp_path / arch, safe_serialization=True)
        again = AutoModelForCausalLM.from_pretrained(tmp_path / arch).eval()
        ids = torch.tensor([[3, 5, 7, 11, 13]])
        with torch.no_grad():
            assert torch.equal(again(ids).logits, model(ids).logits)


def test_import_errors_are_clear(tmp_path):
    with pytest.raises(GGUFImportError, match="no such GGUF file"):
        import_gguf(tmp_path / "nope.gguf", tmp_path / "out")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(GGUFImportError, match="not a GGUF file"):
        import_gguf(fake, tmp_path / "out")
    real_magic = tmp_path / "m.gguf"
    real_magic.write_bytes(b"GGUF" + b"\x00" * 8)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(GGUFImportError, match="--overwrite"):
        import_gguf(real_magic, tmp_path / "full")
    assert cli.main(["import-gguf", str(fake), "--out", str(tmp_path / "o")]) == 2
    assert len(sha256_file(fake)) == 64
