"""The embedded toy world: a word-level tokenizer with a chat template, a synthetic corpus
(number lists, preference questions, system-prompted variants) and a small Llama/Qwen2 model
trained from scratch on the CPU, saved as an ordinary HF checkpoint."""

from .tokenizer import build_tokenizer  # noqa: F401
