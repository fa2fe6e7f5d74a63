"""Batched divergence scoring between a factual teacher and K counterfactual teachers.

`divergence_stats` is the one entry point `find-divergence` calls: per position it returns
both teachers' argmax, the data token's log-prob under each, KL(factual || counterfactual),
Jensen-Shannon, the factual top-1 margin and the data token's rank under each counterfactual.
On CUDA it runs a streaming Triton kernel (no [N, V] intermediates); elsewhere a row-chunked
torch reference. `fused_linear_divergence_stats` does the same from final hidden states and
unembedding matrices without ever materialising the logits. Definitions: see `reference`.

The Triton modules are imported lazily: `triton.jit` decides between compiled and interpreted
mode when the module is imported, so tests must be able to set TRITON_INTERPRET=1 first.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .reference import divergence_stats_torch, fused_linear_stats_torch

__all__ = ["divergence_stats", "fused_linear_divergence_stats", "resolve_backend", "BACKENDS"]

BACKENDS = ("auto", "triton", "torch")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _have_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' -> 'triton' on CUDA tensors (when triton is installed), 'torch' otherwise;
    'triton' off CUDA only when interpreting."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _have_triton() else "torch"
    if backend == "triton" and not _have_triton():
        raise ValueError("backend 'triton' needs the triton package (pip install triton); use backend 'torch'")
    if backend == "triton" and device.type != "cuda" and not _interpreting():
        raise ValueError(f"backend 'triton' needs CUDA tensors (got {device}); on the CPU set TRITON_INTERPRET=1 "
                         "before importing triton (slow, for tests) or use backend 'torch'")
    return backend


def divergence_stats(factual: torch.Tensor, counterfactual: torch.Tensor, tokens: torch.Tensor,
                     backend: str = "auto", with_js: bool = True,
                     chunk_size: int | None = None) -> dict[str, torch.Tensor]:
    """Per-position divergence statistics between a factual and K counterfactual teachers.

    factual [N, V]; counterfactual [N, V] or [K, N, V]; tokens [N] int64 (the data tokens).
    Returns argmax_factual, logp_factual, margin ([N]) and argmax_counterfactual,
    logp_counterfactual, kl, js (only when with_js), rank ([K, N], or [N] for a 2-D
    counterfactual). Floats are fp32 (fp64 for fp64 input on the torch backend); ids and ranks
    int64. chunk_size = rows per block on the torch backend (ignored by Triton).
    Raises ValueError for NaN / +inf / all -inf rows, naming the first bad row.
    """
    which = resolve_backend(backend, factual.device)
    if which == "torch":
        return divergence_stats_torch(factual, counterfactual, tokens, with_js=with_js, chunk_size=chunk_size)
    from .divergence_triton import divergence_stats_triton

    return divergence_stats_triton(factual, counterfactual, tokens, with_js=with_js)


def fused_linear_divergence_stats(hidden_f: torch.Tensor, weight_f: torch.Tensor, hidden_c: torch.Tensor,
                                  weight_c: torch.Tensor, tokens: torch.Tensor, bias_f: torch.Tensor | None = None,
                                  bias_c: torch.Tensor | None = None, backend: str = "auto",
                                  with_js: bool = True, chunk_size: int | None = None) -> dict[str, torch.Tensor]:
    """`divergence_stats` of logits = hidden @ weight.T + bias, without materialising them.

    hidden_f [N, d], weight_f [V, d], bias_f [V]; hidden_c [N, d] or [K, N, d]; weight_c shared
    [V, d] or per-teacher [K, V, d]; bias_c [V] or [K, V]. Same outputs as divergence_stats.
    """
    which = resolve_backend(backend, hidden_f.device)
    if which == "torch":
        return fused_linear_stats_torch(hidden_f, weight_f, bias_f, hidden_c, weight_c, bias_c, tokens,
                                        with_js=with_js, chunk_size=chunk_size)
    from .fused_linear import fused_linear_stats_triton

    return fused_linear_stats_triton(hidden_f, weight_f, bias_f, hidden_c, weight_c, bias_c, tokens,
                                     with_js=with_js)
