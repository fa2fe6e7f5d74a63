"""Input normalisation and error messages shared by every backend.

Kept in one place so the torch reference and the Triton kernels accept exactly the same inputs
and raise exactly the same messages: callers (find-divergence) can switch backends without
changing their error handling.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)

# Bits of the per-row status word of the torch reference (the kernels only flag rows; the
# wrapper then classifies the flagged row with these bits).
BAD_NAN = 1
BAD_POSINF = 2
BAD_ALL_NEGINF = 4

STAT_KEYS = ("argmax_factual", "argmax_counterfactual", "logp_factual", "logp_counterfactual",
             "kl", "js", "margin", "rank")
COUNTERFACTUAL_KEYS = ("argmax_counterfactual", "logp_counterfactual", "kl", "js", "rank")


@dataclass(frozen=True)
class Shapes:
    """Sizes of one call: K counterfactuals, N positions, V vocabulary ids."""

    k: int
    n: int
    v: int
    squeeze: bool  # the counterfactual came in 2-D, so its outputs go back 2-D -> [N]


def check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be bf16, fp16, fp32 or fp64, got {t.dtype}")


def normalise_counterfactual(counterfactual: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Return a [K, N, V] view and whether the input was 2-D."""
    if counterfactual.dim() == 2:
        return counterfactual.unsqueeze(0), True
    if counterfactual.dim() == 3:
        return counterfactual, False
    raise ValueError(f"counterfactual must be [N, V] or [K, N, V], got shape {tuple(counterfactual.shape)}")


def check_tokens(tokens: torch.Tensor, n: int, v: int) -> None:
    if tokens.dim() != 1 or tokens.shape[0] != n:
        raise ValueError(f"tokens must be [N] = [{n}], got shape {tuple(tokens.shape)}")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"tokens must be int64 (or int32), got {tokens.dtype}")
    if n == 0:
        return
    bad = (tokens < 0) | (tokens >= v)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"token id {int(tokens[i])} at row {i} is outside the vocabulary [0, {v})")


def check_logit_inputs(factual: torch.Tensor, counterfactual: torch.Tensor,
                       tokens: torch.Tensor) -> tuple[torch.Tensor, Shapes]:
    """Validate shapes/dtypes/devices/token range; return the [K, N, V] counterfactual and sizes."""
    check_dtype("factual", factual)
    check_dtype("counterfactual", counterfactual)
    if factual.dim() != 2:
        raise ValueError(f"factual must be [N, V], got shape {tuple(factual.shape)}")
    cf, squeeze = normalise_counterfactual(counterfactual)
    n, v = factual.shape
    if tuple(cf.shape[1:]) != (n, v):
        raise ValueError(f"counterfactual shape {tuple(counterfactual.shape)} does not match factual [N, V] = [{n}, {v}]")
    if cf.shape[0] == 0:
        raise ValueError("counterfactual has K = 0 teachers")
    if v == 0:
        raise ValueError("the vocabulary is empty (V = 0)")
    if not (factual.device == cf.device == tokens.device):
        raise ValueError(f"factual, counterfactual and tokens must be on one device, got "
                         f"{factual.device}, {cf.device}, {tokens.device}")
    check_tokens(tokens, n, v)
    return cf, Shapes(k=cf.shape[0], n=n, v=v, squeeze=squeeze)


def first_flagged(status_f: torch.Tensor, status_c: torch.Tensor) -> tuple[int, int | None] | None:
    """(row, k) of the first flagged row (k None for the factual teacher), or None.

    status_f [R] and status_c [K, R] are nonzero where a row is bad; the lowest row wins, and
    the factual teacher before the counterfactuals on the same row."""
    bad_f = status_f != 0
    bad_any = bad_f | (status_c != 0).any(0)
    if not bool(bad_any.any()):
        return None
    r = int(bad_any.nonzero()[0, 0])
    if bool(bad_f[r]):
        return r, None
    return r, int((status_c[:, r] != 0).nonzero()[0, 0])


def bad_row_message(k: int | None, row: int, bits: int) -> str:
    which = "factual" if k is None else f"counterfactual[{k}]"
    if bits & BAD_NAN:
        what = "contains NaN"
    elif bits & BAD_POSINF:
        what = "contains +inf (softmax undefined)"
    elif bits & BAD_ALL_NEGINF:
        what = "is all -inf (no token has probability mass)"
    else:
        what = "gave a non-finite log-sum-exp"
    return f"{which} logits at row {row} {what}"


def describe_bad_row(status_f: torch.Tensor, status_c: torch.Tensor, row_offset: int = 0) -> str | None:
    """Message for the first bad row given BAD_* bits (status_f [R], status_c [K, R]), or None;
    row_offset shifts the reported row so chunked callers report global row numbers."""
    hit = first_flagged(status_f, status_c)
    if hit is None:
        return None
    r, k = hit
    bits = int(status_f[r]) if k is None else int(status_c[k, r])
    return bad_row_message(k, r + row_offset, bits)


def raise_if_bad(status_f: torch.Tensor, status_c: torch.Tensor, row_offset: int = 0) -> None:
    msg = describe_bad_row(status_f, status_c, row_offset)
    if msg is not None:
        raise ValueError(msg)


def raise_if_flagged(status_f: torch.Tensor, status_c: torch.Tensor,
                     row_logits: Callable[[int | None, int], torch.Tensor]) -> None:
    """For kernels that only flag bad rows (status != 0): look at the first flagged row's logits
    (row_logits(k, row) -> [V]; k None = factual) to name the problem exactly as the reference."""
    hit = first_flagged(status_f, status_c)
    if hit is None:
        return
    r, k = hit
    bits = int(row_status(row_logits(k, r).unsqueeze(0))[0])
    raise ValueError(bad_row_message(k, r, bits))


def row_status(x: torch.Tensor) -> torch.Tensor:
    """BAD_* bits per row of x [..., V] (int32 [...])."""
    s = torch.isnan(x).any(-1).to(torch.int32) * BAD_NAN
    s |= torch.isposinf(x).any(-1).to(torch.int32) * BAD_POSINF
    s |= torch.isneginf(x).all(-1).to(torch.int32) * BAD_ALL_NEGINF
    return s


def finish(out: dict[str, torch.Tensor], shapes: Shapes, with_js: bool) -> dict[str, torch.Tensor]:
    """Drop js when not asked for and squeeze [1, N] counterfactual outputs back to [N]."""
    if not with_js:
        out.pop("js", None)
    if shapes.squeeze:
        for key in COUNTERFACTUAL_KEYS:
            if key in out:
                out[key] = out[key][0]
    return out
