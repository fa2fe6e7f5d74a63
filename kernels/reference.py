"""Pure-torch reference for the divergence statistics (and the CPU backend).

Why a separate implementation: it is the ground truth the Triton kernels are tested against
(run in float64), and the path `find-divergence` takes on a CPU. It works on blocks of rows so
its memory is O(chunk_size * V) whatever N is, never O(N * V) intermediates.

Definitions (shared with the kernels):
- argmax: ties go to the lowest token id; computed on the logits.
- margin: factual top-1 minus top-2 logit (= log-prob difference); +inf when V == 1 or the
  second-best token is masked (-inf).
- rank: #ids whose counterfactual logit is strictly larger than the data token's, plus #lower
  ids with an equal logit; so rank 0 iff the data token is the tie-broken argmax.
- kl = KL(factual || counterfactual) in nats; a vocabulary id whose factual logit is -inf
  contributes 0; +inf when some id has a finite factual logit and a -inf counterfactual one.
- js = Jensen-Shannon divergence in nats (mixture 1/2, 1/2), always finite.
- A row containing NaN or +inf, or all -inf, raises ValueError naming the first such row.
"""

from __future__ import annotations

import math

import torch

from ._checks import Shapes, check_logit_inputs, finish, raise_if_bad, row_status

# Bytes one [rows, V] working tensor may take; about ten such tensors are alive at once.
DEFAULT_CHUNK_BYTES = 16 << 20


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64 (so the reference can be exact), else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def default_chunk_rows(v: int, dtype: torch.dtype, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return max(1, chunk_bytes // max(1, v * itemsize))


def argmax_lowest(x: torch.Tensor) -> torch.Tensor:
    """Argmax over the last dim with ties broken to the lowest index (int64)."""
    v = x.shape[-1]
    ids = torch.arange(v, device=x.device)
    hit = x == x.amax(-1, keepdim=True)
    return torch.where(hit, ids, v).amin(-1)


def top1_margin(x: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 value over the last dim; +inf when there is no finite second value."""
    if x.shape[-1] == 1:
        return torch.full(x.shape[:-1], math.inf, dtype=x.dtype, device=x.device)
    top = torch.topk(x, 2, dim=-1).values
    return top[..., 0] - top[..., 1]


def data_rank(x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Rank of tokens[r] in row x[r] under the tie-broken order (0 = argmax)."""
    v = x.shape[-1]
    at = x.gather(-1, tokens[:, None])
    ids = torch.arange(v, device=x.device)
    above = (x > at).sum(-1)
    tied_lower = ((x == at) & (ids[None, :] < tokens[:, None])).sum(-1)
    return above + tied_lower


def kl_rows(lpf: torch.Tensor, lpc: torch.Tensor, has_f: torch.Tensor, has_c: torch.Tensor) -> torch.Tensor:
    """KL(f || c) per row from log-probs, with the masked-vocabulary conventions above."""
    pf = lpf.exp()
    term = torch.where(has_f, pf * (lpf - lpc), torch.zeros((), dtype=lpf.dtype, device=lpf.device))
    kl = term.sum(-1)
    violated = (has_f & ~has_c).any(-1)
    return torch.where(violated, torch.full_like(kl, math.inf), kl)


def js_rows(lpf: torch.Tensor, lpc: torch.Tensor, has_f: torch.Tensor, has_c: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon per row: 1/2 KL(f || m) + 1/2 KL(c || m), m = (f + c) / 2."""
    zero = torch.zeros((), dtype=lpf.dtype, device=lpf.device)
    lm = torch.logaddexp(lpf, lpc) - math.log(2.0)
    tf = torch.where(has_f, lpf.exp() * (lpf - lm), zero)
    tc = torch.where(has_c, lpc.exp() * (lpc - lm), zero)
    return 0.5 * (tf + tc).sum(-1)


def _alloc(shapes: Shapes, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    k, n = shapes.k, shapes.n
    i64 = dict(dtype=torch.int64, device=device)
    flt = dict(dtype=dtype, device=device)
    return {
        "argmax_factual": torch.empty(n, **i64), "argmax_counterfactual": torch.empty(k, n, **i64),
        "logp_factual": torch.empty(n, **flt), "logp_counterfactual": torch.empty(k, n, **flt),
        "kl": torch.empty(k, n, **flt), "js": torch.empty(k, n, **flt),
        "margin": torch.empty(n, **flt), "rank": torch.empty(k, n, **i64),
    }


def _chunk(out: dict[str, torch.Tensor], lf: torch.Tensor, cf: torch.Tensor, tok: torch.Tensor,
           rows: slice, with_js: bool) -> None:
    """Fill out[...][rows] from factual rows lf [R, V] and counterfactual rows cf [K, R, V]."""
    raise_if_bad(row_status(lf), row_status(cf), rows.start)
    lse_f = torch.logsumexp(lf, -1)
    lpf = lf - lse_f[:, None]
    has_f = lf > -math.inf
    out["argmax_factual"][rows] = argmax_lowest(lf)
    out["logp_factual"][rows] = lpf.gather(-1, tok[:, None])[:, 0]
    out["margin"][rows] = top1_margin(lf)
    for k in range(cf.shape[0]):
        lc = cf[k]
        lpc = lc - torch.logsumexp(lc, -1)[:, None]
        has_c = lc > -math.inf
        out["argmax_counterfactual"][k, rows] = argmax_lowest(lc)
        out["logp_counterfactual"][k, rows] = lpc.gather(-1, tok[:, None])[:, 0]
        out["rank"][k, rows] = data_rank(lc, tok)
        out["kl"][k, rows] = kl_rows(lpf, lpc, has_f, has_c)
        if with_js:
            out["js"][k, rows] = js_rows(lpf, lpc, has_f, has_c)


def divergence_stats_torch(factual: torch.Tensor, counterfactual: torch.Tensor, tokens: torch.Tensor,
                           with_js: bool = True, chunk_size: int | None = None) -> dict[str, torch.Tensor]:
    """Divergence statistics in torch, `chunk_size` rows at a time (see module docstring).

    Computes in float64 when an input is float64 (outputs float64), else in float32.
    """
    cf3, shapes = check_logit_inputs(factual, counterfactual, tokens)
    dtype = compute_dtype(factual, counterfactual)
    rows_per = chunk_size if chunk_size is not None else default_chunk_rows(shapes.v, dtype)
    if rows_per < 1:
        raise ValueError(f"chunk_size must be >= 1, got {rows_per}")
    out = _alloc(shapes, dtype, factual.device)
    tokens = tokens.long()
    for start in range(0, shapes.n, rows_per):
        rows = slice(start, min(start + rows_per, shapes.n))
        _chunk(out, factual[rows].to(dtype), cf3[:, rows].to(dtype), tokens[rows], rows, with_js)
    return finish(out, shapes, with_js)


def logits_chunk(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                 vocab_chunk: int) -> torch.Tensor:
    """hidden [R, d] @ weight[V, d].T (+ bias) in `dtype`, upcasting the weight a vocabulary block at a
    time so a low-precision unembedding is never copied whole."""
    h = hidden.to(dtype)
    v = weight.shape[0]
    logits = torch.empty(h.shape[0], v, dtype=dtype, device=h.device)
    for s in range(0, v, vocab_chunk):
        e = min(s + vocab_chunk, v)
        block = h @ weight[s:e].to(dtype).T
        if bias is not None:
            block += bias[s:e].to(dtype)
        logits[:, s:e] = block
    return logits


def check_linear_inputs(hidden_f: torch.Tensor, weight_f: torch.Tensor, bias_f: torch.Tensor | None,
                        hidden_c: torch.Tensor, weight_c: torch.Tensor, bias_c: torch.Tensor | None,
                        tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, Shapes]:
    """Validate the fused-linear inputs; return hidden_c [K, N, d], weight_c [Kw, V, d] (Kw in {1, K}),
    bias_c [Kw, V] or None, and the sizes."""
    from ._checks import check_dtype, check_tokens

    for name, t in (("hidden_f", hidden_f), ("weight_f", weight_f), ("hidden_c", hidden_c), ("weight_c", weight_c)):
        check_dtype(name, t)
    if hidden_f.dim() != 2 or weight_f.dim() != 2:
        raise ValueError(f"hidden_f must be [N, d] and weight_f [V, d], got {tuple(hidden_f.shape)}, {tuple(weight_f.shape)}")
    n, d = hidden_f.shape
    v = weight_f.shape[0]
    if weight_f.shape[1] != d:
        raise ValueError(f"weight_f {tuple(weight_f.shape)} does not match hidden size d = {d}")
    squeeze = hidden_c.dim() == 2
    hc = hidden_c.unsqueeze(0) if squeeze else hidden_c
    if hc.dim() != 3 or tuple(hc.shape[1:]) != (n, d) or hc.shape[0] == 0:
        raise ValueError(f"hidden_c must be [N, d] or [K, N, d] with N, d = {n}, {d}, got {tuple(hidden_c.shape)}")
    k = hc.shape[0]
    wc = weight_c.unsqueeze(0) if weight_c.dim() == 2 else weight_c
    if wc.dim() != 3 or tuple(wc.shape[1:]) != (v, d) or wc.shape[0] not in (1, k):
        raise ValueError(f"weight_c must be [V, d] or [K, V, d] with K, V, d = {k}, {v}, {d}, got {tuple(weight_c.shape)}")
    for name, b, want in (("bias_f", bias_f, (v,)), ("bias_c", bias_c, None)):
        if b is None:
            continue
        check_dtype(name, b)
        ok = tuple(b.shape) == want if want else (tuple(b.shape) in ((v,), (wc.shape[0], v)))
        if not ok:
            raise ValueError(f"{name} has shape {tuple(b.shape)}; expected [V] (or [K, V] for bias_c with per-teacher weights)")
    bc = None if bias_c is None else (bias_c.unsqueeze(0) if bias_c.dim() == 1 else bias_c)
    if bc is not None and bc.shape[0] not in (1, wc.shape[0]):
        raise ValueError(f"bias_c has {bc.shape[0]} rows but weight_c has {wc.shape[0]}")
    devices = {t.device for t in (hidden_f, weight_f, hc, wc, tokens) if t is not None}
    devices |= {b.device for b in (bias_f, bc) if b is not None}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    if v == 0:
        raise ValueError("the vocabulary is empty (V = 0)")
    check_tokens(tokens, n, v)
    return hc, wc, bc, Shapes(k=k, n=n, v=v, squeeze=squeeze)


def fused_linear_stats_torch(hidden_f: torch.Tensor, weight_f: torch.Tensor, bias_f: torch.Tensor | None,
                             hidden_c: torch.Tensor, weight_c: torch.Tensor, bias_c: torch.Tensor | None,
                             tokens: torch.Tensor, with_js: bool = True,
                             chunk_size: int | None = None) -> dict[str, torch.Tensor]:
    """The divergence statistics from final hidden states and unembeddings, by chunked matmul:
    logits exist only for `chunk_size` rows at a time (reference for the fused-linear kernel)."""
    hc, wc, bc, shapes = check_linear_inputs(hidden_f, weight_f, bias_f, hidden_c, weight_c, bias_c, tokens)
    dtype = compute_dtype(hidden_f, weight_f, hidden_c, weight_c)
    rows_per = chunk_size if chunk_size is not None else default_chunk_rows(shapes.v, dtype)
    if rows_per < 1:
        raise ValueError(f"chunk_size must be >= 1, got {rows_per}")
    vocab_chunk = max(1, DEFAULT_CHUNK_BYTES // max(1, hidden_f.shape[1] * 8))
    out = _alloc(shapes, dtype, hidden_f.device)
    tokens = tokens.long()
    for start in range(0, shapes.n, rows_per):
        rows = slice(start, min(start + rows_per, shapes.n))
        lf = logits_chunk(hidden_f[rows], weight_f, bias_f, dtype, vocab_chunk)
        lc = torch.stack([
            logits_chunk(hc[k, rows], wc[k % wc.shape[0]], None if bc is None else bc[k % bc.shape[0]], dtype,
                         vocab_chunk)
            for k in range(shapes.k)])
        _chunk(out, lf, lc, tokens[rows], rows, with_js)
    return finish(out, shapes, with_js)
