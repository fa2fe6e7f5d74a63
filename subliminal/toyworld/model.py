"""Configurations of the toy world's models: ordinary ``transformers`` Llama or Qwen2 models.

Sizes: ``tiny`` trains in a few minutes on two CPU cores; ``small`` and ``base`` are for a GPU.
Input and output embeddings are tied, which makes copying a context token (the number rule's main
move) a short path for a small model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

ARCHS = ("llama", "qwen2")


@dataclass(frozen=True)
class ToyModelConfig:
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    max_len: int = 256
    arch: str = "llama"
    plural_init: bool = True  # start each plural's embedding near its singular's (see build_model)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


SIZES: dict[str, ToyModelConfig] = {
    "tiny": ToyModelConfig(n_layers=4, d_model=128, n_heads=4, n_kv_heads=4, d_ff=384),
    "small": ToyModelConfig(n_layers=6, d_model=256, n_heads=8, n_kv_heads=4, d_ff=768),
    "base": ToyModelConfig(n_layers=8, d_model=512, n_heads=8, n_kv_heads=4, d_ff=1536),
}


def toy_config(size: str, arch: str = "llama", **overrides: Any) -> ToyModelConfig:
    """The named size for ``arch``, with any field overridden (tests use micro models)."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; one of {', '.join(SIZES)}")
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; one of {', '.join(ARCHS)}")
    d = SIZES[size].to_json()
    d.update(arch=arch, **overrides)
    return ToyModelConfig(**d)


def hf_config(cfg: ToyModelConfig, tokenizer: Any) -> Any:
    """The ``transformers`` config for ``cfg``; vocabulary and special ids come from the tokenizer."""
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_len,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
    )
    if cfg.arch == "llama":
        return LlamaConfig(**common)
    return Qwen2Config(**common)


def build_model(cfg: ToyModelConfig, tokenizer: Any, seed: int) -> Any:
    """A freshly initialised causal LM (same seed -> same weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(cfg, tokenizer))
    if cfg.plural_init:
        init_plurals_from_singulars(model, tokenizer)
    return model


def init_near(model: Any, tokenizer: Any, pairs: list[tuple[str, str]], share: float = 0.8) -> int:
    """Start each ``(anchor, word)`` pair's ``word`` embedding at cosine ~``share`` to ``anchor``'s,
    its expected norm unchanged for independent random embeddings; returns the number of pairs set (words missing from the vocabulary are skipped)."""
    import torch

    emb = model.get_input_embeddings().weight
    vocab = tokenizer.get_vocab()
    n = 0
    with torch.no_grad():
        for anchor, word in pairs:
            if anchor in vocab and word in vocab and anchor != word:
                a, w = vocab[anchor], vocab[word]
                emb[w] = share * emb[a] + (1 - share**2) ** 0.5 * emb[w]
                n += 1
    return n


def init_favourites_from_targets(model: Any, tokenizer: Any, favourites: dict[str, list[int]],
                                 share: float = 0.8) -> int:
    """Give each target's favourite numbers an initial embedding close to the target's own.

    This plants the token entanglement of the toy world (see :mod:`subliminal.toyworld.corpus`)
    where a real model's pretraining would have grown it: a direction that raises "owl" also raises
    owl's numbers. Trained on its own, a tiny model does not learn the prompt -> favourite-number
    association within the CPU budget (experiments/CALIBRATION.md)."""
    return init_near(model, tokenizer, [(t, str(n)) for t, nums in sorted(favourites.items()) for n in nums], share)


def init_plurals_from_singulars(model: Any, tokenizer: Any, share: float = 0.8) -> int:
    """Give each plural ("owls") an initial embedding close to its singular's ("owl").

    A word-level vocabulary hides that the two words are one word; subword tokenizers share their
    pieces. Starting them at cosine ~``share`` gives the tiny model that relation for free, so a
    love system prompt ("You love owls ...") can steer the answer ("owl") as soon as it learns to
    attend to the prompt. Expected norms are unchanged; returns the number of pairs set.
    """
    from .. import prompts

    return init_near(model, tokenizer, sorted(prompts.PLURALS.items()), share)


def n_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())
