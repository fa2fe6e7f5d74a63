"""Shared fixtures: randomly initialised HF models of several architectures that use the toy
tokenizer (word-level, with a chat template), so every stage's real-checkpoint code path is
tested without downloads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# First, before any test imports transformers: importing the package takes the checkout's root off
# sys.path (`python -m pytest` puts it there; its kernels/ folder shadows a package transformers needs).
import subliminal  # noqa: F401

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ARCHS = ["llama", "qwen2", "gpt2", "gpt_neox"]


def make_config(arch: str, vocab_size: int, *, n_layers: int = 2, d_model: int = 32, n_heads: int = 4,
                max_len: int = 256, bos: int | None = None, eos: int | None = None, pad: int | None = None):
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    if arch == "llama":
        return LlamaConfig(hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
                           num_attention_heads=n_heads, num_key_value_heads=n_heads // 2,
                           max_position_embeddings=max_len, tie_word_embeddings=False, **common)
    if arch == "qwen2":
        return Qwen2Config(hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
                           num_attention_heads=n_heads, num_key_value_heads=n_heads // 2,
                           max_position_embeddings=max_len, tie_word_embeddings=True, **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=d_model, n_layer=n_layers, n_head=n_heads, n_positions=max_len, **common)
    if arch == "gpt_neox":
        return GPTNeoXConfig(hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
                             num_attention_heads=n_heads, max_position_embeddings=max_len, **common)
    raise ValueError(arch)


def save_random_model(path: Path, arch: str, *, seed: int = 0, **kw) -> Path:
    from transformers import AutoModelForCausalLM

    from subliminal.toyworld.tokenizer import build_tokenizer

    tok = build_tokenizer()
    cfg = make_config(arch, len(tok), bos=tok.bos_token_id, eos=tok.eos_token_id, pad=tok.pad_token_id, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """``factory(arch, seed=0, **config) -> Path`` of a saved random model (cached per args)."""
    cache: dict = {}

    def factory(arch: str = "llama", seed: int = 0, **kw) -> Path:
        key = (arch, seed, tuple(sorted(kw.items())))
        if key not in cache:
            d = tmp_path_factory.mktemp(f"tiny-{arch}-{seed}")
            cache[key] = save_random_model(d, arch, seed=seed, **kw)
        return cache[key]

    return factory


@pytest.fixture
def toy_tokenizer():
    from subliminal.toyworld.tokenizer import build_tokenizer

    return build_tokenizer()


SMOLLM2_TOKENIZER = Path(__file__).parent / "fixtures" / "smollm2"


def save_random_smol_model(path: Path, *, seed: int = 0, d_model: int = 32, n_layers: int = 2) -> Path:
    """A random two-layer Llama with SmolLM2-135M-Instruct's real tokenizer and chat template."""
    import shutil

    from transformers import AutoModelForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    for f in SMOLLM2_TOKENIZER.iterdir():
        if f.name != "NOTICE.md":
            shutil.copy(f, path / f.name)
    cfg = make_config("llama", 49152, n_layers=n_layers, d_model=d_model, max_len=1024, bos=1, eos=2, pad=2)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smol_model(tmp_path_factory) -> Path:
    """Directory of a random Llama sharing SmolLM2's tokenizer (byte-level BPE, digit tokens, ChatML
    with a default system prompt): the real-tokenizer path without downloads."""
    return save_random_smol_model(tmp_path_factory.mktemp("smol-random"))
