"""Fused-linear Triton kernel: divergence statistics straight from final hidden states.

Why: a 7B teacher's logits for one batch of long sequences take 4-10 GiB ([N, V] in fp32 for
each teacher). Here logits only ever exist as a [ROWS, BLOCK_V] block in registers: for each
vocabulary block the program computes hidden [ROWS, d] @ unembedding[BLOCK_V, d].T (+ bias)
with `tl.dot` over d in BLOCK_D steps, then folds the block into the same online statistics
as the logits kernel (block-level helpers from `_block_steps`). The factual block is computed
once per vocabulary block and reused for all K counterfactual teachers, whose unembedding may
be shared ([V, d]) or per teacher ([K, V, d]).

Jensen-Shannon needs both log-sum-exps first, so it recomputes the logits in a second pass
(twice the matmul work; memory stays O(N * K)). Unlike the logits kernel the teacher loop is a
runtime loop: unrolling it made ptxas spill heavily for K = 3..12 and took 90 s to compile.

Under TRITON_INTERPRET (CPU tests) bf16 operands are upcast to fp32 before `tl.dot`: the
Triton 3.9 interpreter returns garbage for a bf16 dot (a 16x16 integer-valued product is off
by 1e10); on CUDA the dot runs in bf16 with fp32 accumulation.

Token logits: the data token's logit for the log-probs is captured from the streamed blocks,
so it is exactly the value that entered the log-sum-exp. The rank needs it before the stream,
so the rank compares against an elementwise dot product (same inputs, possibly a different
summation order) and never counts the data token itself; only ids within rounding of an exact
tie with the data token could be ranked differently from the materialised-logits answer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._block_steps import _col, _counterfactual_step, _factual_step, _js_step, _put, _store_results
from ._checks import Shapes, finish, raise_if_flagged
from .divergence_triton import alloc_outputs, check_runnable
from .reference import check_linear_inputs


@triton.jit
def _logits_block(h_ptr, stride_hn, w_ptr, stride_wv, b_ptr, rows, row_ok, ids, v_ok, D,
                  HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
                  BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """hidden[rows] @ weight[ids].T (+ bias[ids]) as an fp32 [ROWS, BLOCK_V] block; -inf outside
    the valid rows / ids so padding never carries probability mass."""
    acc = tl.zeros((ROWS, BLOCK_V), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        h = tl.load(h_ptr + rows[:, None] * stride_hn + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_ptr + ids.to(tl.int64)[:, None] * stride_wv + dd[None, :], mask=v_ok[:, None] & d_ok[None, :],
                    other=0.0)
        if UPCAST:
            acc = tl.dot(h.to(tl.float32), tl.trans(w.to(tl.float32)), acc=acc, input_precision="ieee")
        elif IEEE:
            acc = tl.dot(h, tl.trans(w), acc=acc, input_precision="ieee")
        else:
            acc = tl.dot(h, tl.trans(w), acc=acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + ids, mask=v_ok, other=0.0).to(tl.float32)[None, :]
    return tl.where(row_ok[:, None] & v_ok[None, :], acc, float("-inf"))


@triton.jit
def _token_logit(h_ptr, stride_hn, w_ptr, stride_wv, b_ptr, rows, row_ok, tok, D,
                 HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """hidden[rows] . weight[tok[rows]] (+ bias[tok]) elementwise, fp32 [ROWS]."""
    acc = tl.zeros((ROWS,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        m = row_ok[:, None] & (dd < D)[None, :]
        h = tl.load(h_ptr + rows[:, None] * stride_hn + dd[None, :], mask=m, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + tok[:, None] * stride_wv + dd[None, :], mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(h * w, axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + tok, mask=row_ok, other=0.0).to(tl.float32)
    return acc


@triton.jit
def _fused_linear_kernel(
    hf_ptr, wf_ptr, bf_ptr, hc_ptr, wc_ptr, bc_ptr, tok_ptr,
    stride_hf_n, stride_wf_v, stride_hc_k, stride_hc_n, stride_wc_k, stride_wc_v, stride_bc_k,
    am_f_ptr, lp_f_ptr, margin_ptr, status_f_ptr,
    am_c_ptr, lp_c_ptr, kl_ptr, js_ptr, rank_ptr, status_c_ptr,
    N, V, D, K,
    K_PAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BF: tl.constexpr, HAS_BC: tl.constexpr, F_IEEE: tl.constexpr, C_IEEE: tl.constexpr,
    WITH_JS: tl.constexpr, UPCAST: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    row_ok = rows < N
    ks = tl.arange(0, K_PAD)
    k_ok = ks < K
    offs = tl.arange(0, BLOCK_V)
    tok = tl.load(tok_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    tok32 = tok.to(tl.int32)

    # counterfactual token logits (for the rank), teacher by teacher
    lc_tok_rank = tl.zeros((ROWS, K_PAD), tl.float32)
    hk, wk, bk = hc_ptr, wc_ptr, bc_ptr
    for k in range(0, K):
        sel = (ks == k)[None, :]
        t = _token_logit(hk, stride_hc_n, wk, stride_wc_v, bk, rows, row_ok, tok, D, HAS_BC, ROWS, BLOCK_D)
        lc_tok_rank = _put(lc_tok_rank, sel, t)
        hk += stride_hc_k
        wk += stride_wc_k
        bk += stride_bc_k

    m_f = tl.full((ROWS,), float("-inf"), tl.float32)
    s_f = tl.zeros((ROWS,), tl.float32)
    top2 = tl.full((ROWS,), float("-inf"), tl.float32)
    am_f = tl.zeros((ROWS,), tl.int32)
    lf_tok = tl.zeros((ROWS,), tl.float32)
    m_c = tl.full((ROWS, K_PAD), float("-inf"), tl.float32)
    s_c = tl.zeros((ROWS, K_PAD), tl.float32)
    am_c = tl.zeros((ROWS, K_PAD), tl.int32)
    akl = tl.zeros((ROWS, K_PAD), tl.float32)
    viol = tl.zeros((ROWS, K_PAD), tl.int32)
    rank = tl.zeros((ROWS, K_PAD), tl.int32)
    lc_tok = tl.zeros((ROWS, K_PAD), tl.float32)

    for start in range(0, V, BLOCK_V):
        ids = start + offs
        v_ok = ids < V
        fmask = row_ok[:, None] & v_ok[None, :]
        is_tok = ids[None, :] == tok32[:, None]
        lf = _logits_block(hf_ptr, stride_hf_n, wf_ptr, stride_wf_v, bf_ptr, rows, row_ok, ids, v_ok, D,
                           HAS_BF, F_IEEE, ROWS, BLOCK_V, BLOCK_D, UPCAST)
        lf_tok += tl.sum(tl.where(is_tok & fmask, lf, 0.0), axis=1)
        m_f, s_f, top2, am_f, alpha, e_f = _factual_step(lf, ids, m_f, s_f, top2, am_f)
        hk, wk, bk = hc_ptr, wc_ptr, bc_ptr
        for k in range(0, K):
            sel = (ks == k)[None, :]
            lc = _logits_block(hk, stride_hc_n, wk, stride_wc_v, bk, rows, row_ok, ids, v_ok, D,
                               HAS_BC, C_IEEE, ROWS, BLOCK_V, BLOCK_D, UPCAST)
            lc_tok = _put(lc_tok, sel, _col(lc_tok, sel) + tl.sum(tl.where(is_tok & fmask, lc, 0.0), axis=1))
            m1, s1, a1, kl1, v1, r1 = _counterfactual_step(
                lc, lf, e_f, alpha, ids, tok32, _col(lc_tok_rank, sel), _col(m_c, sel), _col(s_c, sel),
                _col(am_c, sel), _col(akl, sel), _col(viol, sel), _col(rank, sel), True)
            m_c = _put(m_c, sel, m1)
            s_c = _put(s_c, sel, s1)
            am_c = _put(am_c, sel, a1)
            akl = _put(akl, sel, kl1)
            viol = _put(viol, sel, v1)
            rank = _put(rank, sel, r1)
            hk += stride_hc_k
            wk += stride_wc_k
            bk += stride_bc_k

    js = tl.zeros((ROWS, K_PAD), tl.float32)
    if WITH_JS:  # second pass recomputes the logit blocks
        lse_f = m_f + tl.log(s_f)
        lse_c = m_c + tl.log(s_c)
        for start in range(0, V, BLOCK_V):
            ids = start + offs
            v_ok = ids < V
            lf = _logits_block(hf_ptr, stride_hf_n, wf_ptr, stride_wf_v, bf_ptr, rows, row_ok, ids, v_ok, D,
                               HAS_BF, F_IEEE, ROWS, BLOCK_V, BLOCK_D, UPCAST)
            lpf = lf - lse_f[:, None]
            hk, wk, bk = hc_ptr, wc_ptr, bc_ptr
            for k in range(0, K):
                sel = (ks == k)[None, :]
                lc = _logits_block(hk, stride_hc_n, wk, stride_wc_v, bk, rows, row_ok, ids, v_ok, D,
                                   HAS_BC, C_IEEE, ROWS, BLOCK_V, BLOCK_D, UPCAST)
                js = _put(js, sel, _col(js, sel) + _js_step(lpf, lc, _col(lse_c, sel)))
                hk += stride_hc_k
                wk += stride_wc_k
                bk += stride_bc_k

    _store_results(rows, row_ok, ks, k_ok, N, lf_tok, lc_tok, m_f, s_f, top2, am_f,
                   m_c, s_c, am_c, akl, viol, rank, js,
                   am_f_ptr, lp_f_ptr, margin_ptr, status_f_ptr,
                   am_c_ptr, lp_c_ptr, kl_ptr, js_ptr, rank_ptr, status_c_ptr, WITH_JS)


def _dot_operands(h: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Make a (hidden, weight) pair valid tl.dot operands: same dtype, bf16/fp16/fp32, unit last
    stride. Returns them and whether the dot must run in full fp32 ("ieee", not tf32)."""
    if h.dtype != w.dtype or h.dtype == torch.float64:
        h, w = h.float(), w.float()
    h = h if h.stride(-1) == 1 else h.contiguous()
    w = w if w.stride(-1) == 1 else w.contiguous()
    return h, w, h.dtype == torch.float32


def _row_logits(hf: torch.Tensor, wf: torch.Tensor, bf: torch.Tensor | None, hc: torch.Tensor, wc: torch.Tensor,
                bc: torch.Tensor | None, k: int | None, r: int) -> torch.Tensor:
    """One row of logits in fp32 (only on the error path, to name what is wrong with it)."""
    if k is None:
        h, w, b = hf[r], wf, bf
    else:
        h, w = hc[k, r], wc[k % wc.shape[0]]
        b = None if bc is None else bc[k % bc.shape[0]]
    out = w.float() @ h.float()
    return out + b.float() if b is not None else out


def fused_block_sizes(n: int, v: int, d: int, rows: int | None = None, block_v: int | None = None,
                      block_d: int | None = None, num_warps: int | None = None,
                      interpret: bool = False) -> tuple[int, int, int, int]:
    """(ROWS, BLOCK_V, BLOCK_D, num_warps); block sizes are powers of two >= 16 (tl.dot's minimum).

    CUDA defaults 64 x 64 x 32 with 8 warps were chosen without a GPU from sm_90 ptxas output:
    wgmma is used, and unlike 64 x 128 x 64 or 64 x 64 x 64 nothing spills for K = 1 (a few
    bytes for K = 16 with JS). Under the interpreter larger blocks only save Python overhead."""
    rows = rows if rows is not None else min(64, max(16, triton.next_power_of_2(max(n, 1))))
    block_v = block_v if block_v is not None else min(128 if interpret else 64, max(16, triton.next_power_of_2(v)))
    block_d = block_d if block_d is not None else min(64 if interpret else 32, max(16, triton.next_power_of_2(d)))
    num_warps = num_warps if num_warps is not None else (8 if rows * block_v >= 4096 else 4)
    return rows, block_v, block_d, num_warps


def fused_linear_stats_triton(hidden_f: torch.Tensor, weight_f: torch.Tensor, bias_f: torch.Tensor | None,
                              hidden_c: torch.Tensor, weight_c: torch.Tensor, bias_c: torch.Tensor | None,
                              tokens: torch.Tensor, with_js: bool = True,
                              out: dict[str, torch.Tensor] | None = None, rows: int | None = None,
                              block_v: int | None = None, block_d: int | None = None,
                              num_warps: int | None = None) -> dict[str, torch.Tensor]:
    """Triton backend of `fused_linear_divergence_stats` (fp32 outputs; fp64 inputs run in fp32)."""
    check_runnable(_fused_linear_kernel, hidden_f.device)
    hc, wc, bc, shapes = check_linear_inputs(hidden_f, weight_f, bias_f, hidden_c, weight_c, bias_c, tokens)
    hf, wf, f_ieee = _dot_operands(hidden_f, weight_f)
    hc, wc, c_ieee = _dot_operands(hc, wc)
    buf = out if out is not None else alloc_outputs(Shapes(shapes.k, shapes.n, shapes.v, False), hf.device)
    if shapes.n > 0:
        d = hf.shape[1]
        r, bv, bd, warps = fused_block_sizes(shapes.n, shapes.v, d, rows, block_v, block_d, num_warps,
                                             interpret=hf.device.type != "cuda")
        dummy = torch.zeros(1, dtype=torch.float32, device=hf.device)
        bf = bias_f.contiguous() if bias_f is not None else dummy
        bcc = bc.contiguous() if bc is not None else dummy
        _fused_linear_kernel[(triton.cdiv(shapes.n, r),)](
            hf, wf, bf, hc, wc, bcc, tokens.contiguous(),
            hf.stride(0), wf.stride(0), hc.stride(0), hc.stride(1),
            wc.stride(0) if wc.shape[0] > 1 else 0, wc.stride(1),
            bcc.stride(0) if bc is not None and bc.shape[0] > 1 else 0,
            buf["argmax_factual"], buf["logp_factual"], buf["margin"], buf["status_factual"],
            buf["argmax_counterfactual"], buf["logp_counterfactual"], buf["kl"], buf["js"], buf["rank"],
            buf["status_counterfactual"],
            shapes.n, shapes.v, d, shapes.k,
            K_PAD=triton.next_power_of_2(shapes.k), ROWS=r, BLOCK_V=bv, BLOCK_D=bd,
            HAS_BF=bias_f is not None, HAS_BC=bc is not None, F_IEEE=f_ieee, C_IEEE=c_ieee,
            WITH_JS=with_js, UPCAST=hf.device.type != "cuda" and torch.bfloat16 in (hf.dtype, hc.dtype),
            num_warps=warps,
        )
        raise_if_flagged(buf["status_factual"], buf["status_counterfactual"],
                         lambda k, r: _row_logits(hf, wf, bias_f, hc, wc, bc, k, r))
    result = {key: buf[key] for key in ("argmax_factual", "argmax_counterfactual", "logp_factual",
                                         "logp_counterfactual", "kl", "js", "margin", "rank")}
    return finish(result, shapes, with_js)


__all__ = ["fused_linear_stats_triton", "fused_block_sizes"]
