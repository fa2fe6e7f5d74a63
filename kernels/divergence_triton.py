"""Streaming Triton kernel for the divergence statistics (definitions: `reference`).

Layout: one program per position n. The program walks the vocabulary in blocks of BLOCK_V ids;
each step loads the factual block once ([BLOCK_V]) and the K counterfactual blocks as one
[K_PAD, BLOCK_V] tile, so the factual row is read once for all K teachers. Every statistic is
kept as an online (running) quantity in registers: running max and rescaled sum of
exponentials for each log-sum-exp, running argmax (strict > keeps the lowest id), running
top-2 for the margin, a running count for the rank, and for KL the rescaled sum
A = sum_v exp(lf_v - m_f) (lf_v - lc_v), since KL = A / S_f + lse_c - lse_f. Nothing of size
[N, V] is written: the extra memory is the O(N * K) outputs.

Jensen-Shannon needs both normalised log-probs inside its sum, so it takes a second pass over
the row once both log-sum-exps are known (KL is then also summed directly, which is more
accurate than the one-pass identity).

Bad rows (NaN, +inf, all -inf) are flagged in a per-row status word and reported by the
wrapper with the same message as the torch reference.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._checks import BAD_ALL_NEGINF, BAD_NAN, BAD_POSINF, Shapes, check_logit_inputs, finish, raise_if_bad

LN2 = math.log(2.0)


@triton.jit
def _block_top2(x, ids, V_BIG: tl.constexpr):
    """Largest value, its lowest index, and the second largest (one occurrence of the max removed)."""
    b1 = tl.max(x, axis=0)
    i1 = tl.min(tl.where(x == b1, ids, V_BIG), axis=0)
    b2 = tl.max(tl.where(ids == i1, float("-inf"), x), axis=0)
    return b1, i1, b2


@triton.jit
def _status_bits(x, mask, axis: tl.constexpr):
    """NaN / +inf bits of a block (reduced along `axis`)."""
    nan = tl.max(tl.where(mask & (x != x), 1, 0), axis=axis)
    pinf = tl.max(tl.where(mask & (x == float("inf")), 1, 0), axis=axis)
    return nan * 1 + pinf * 2


@triton.jit
def _divergence_kernel(
    f_ptr, c_ptr, tok_ptr,
    stride_fn, stride_ck, stride_cn,
    am_f_ptr, lp_f_ptr, margin_ptr, status_f_ptr,
    am_c_ptr, lp_c_ptr, kl_ptr, js_ptr, rank_ptr, status_c_ptr,
    N, V, K,
    K_PAD: tl.constexpr, BLOCK_V: tl.constexpr, WITH_JS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    NEG_INF: tl.constexpr = float("-inf")
    ks = tl.arange(0, K_PAD)
    k_ok = ks < K
    offs = tl.arange(0, BLOCK_V)
    f_row = f_ptr + row * stride_fn
    c_rows = c_ptr + ks.to(tl.int64)[:, None] * stride_ck + row * stride_cn  # [K_PAD, 1]

    tok = tl.load(tok_ptr + row).to(tl.int64)
    lc_tok = tl.load(c_ptr + ks.to(tl.int64) * stride_ck + row * stride_cn + tok, mask=k_ok,
                     other=0.0).to(tl.float32)

    # factual running state (scalars)
    m_f = tl.full((), NEG_INF, tl.float32)
    s_f = tl.zeros((), tl.float32)
    top1 = tl.full((), NEG_INF, tl.float32)
    top2 = tl.full((), NEG_INF, tl.float32)
    am_f = tl.zeros((), tl.int64)
    bad_f = tl.zeros((), tl.int32)
    # counterfactual running state ([K_PAD])
    m_c = tl.full((K_PAD,), NEG_INF, tl.float32)
    s_c = tl.zeros((K_PAD,), tl.float32)
    mx_c = tl.full((K_PAD,), NEG_INF, tl.float32)
    am_c = tl.zeros((K_PAD,), tl.int64)
    acc_kl = tl.zeros((K_PAD,), tl.float32)
    viol = tl.zeros((K_PAD,), tl.int32)
    rank = tl.zeros((K_PAD,), tl.int64)
    bad_c = tl.zeros((K_PAD,), tl.int32)

    for start in range(0, V, BLOCK_V):
        ids = start + offs
        v_ok = ids < V
        lf = tl.load(f_row + ids, mask=v_ok, other=NEG_INF).to(tl.float32)
        tile_ok = k_ok[:, None] & v_ok[None, :]
        lc = tl.load(c_rows + ids[None, :], mask=tile_ok, other=NEG_INF).to(tl.float32)
        bad_f = bad_f | _status_bits(lf, v_ok, 0)
        bad_c = bad_c | _status_bits(lc, tile_ok, 1)

        # factual: argmax / top-2 / online log-sum-exp
        b1, i1, b2 = _block_top2(lf, ids, 2147483647)
        am_f = tl.where(b1 > top1, i1.to(tl.int64), am_f)
        top2 = tl.maximum(tl.minimum(top1, b1), tl.maximum(top2, b2))
        top1 = tl.maximum(top1, b1)
        m_new = tl.maximum(m_f, b1)
        m_use = tl.where(m_new == NEG_INF, 0.0, m_new)
        alpha = tl.where(m_new == NEG_INF, 1.0, tl.exp(m_f - m_use))
        e_f = tl.exp(lf - m_use)  # 0 where lf == -inf
        s_f = s_f * alpha + tl.sum(e_f, axis=0)
        has_f = lf > NEG_INF
        has_c = lc > NEG_INF
        both = has_f[None, :] & has_c
        diff = tl.where(both, lf[None, :] - lc, 0.0)
        acc_kl = acc_kl * alpha + tl.sum(e_f[None, :] * diff, axis=1)
        viol = viol | tl.max(tl.where(has_f[None, :] & (~has_c) & tile_ok, 1, 0), axis=1)
        m_f = m_new

        # counterfactual: argmax / online log-sum-exp / rank
        cb1 = tl.max(lc, axis=1)
        ci1 = tl.min(tl.where(lc == cb1[:, None], ids[None, :], 2147483647), axis=1)
        am_c = tl.where(cb1 > mx_c, ci1.to(tl.int64), am_c)
        mx_c = tl.maximum(mx_c, cb1)
        mc_new = tl.maximum(m_c, cb1)
        mc_use = tl.where(mc_new == NEG_INF, 0.0, mc_new)
        alpha_c = tl.where(mc_new == NEG_INF, 1.0, tl.exp(m_c - mc_use))
        s_c = s_c * alpha_c + tl.sum(tl.exp(lc - mc_use[:, None]), axis=1)
        m_c = mc_new
        above = (lc > lc_tok[:, None]) | ((lc == lc_tok[:, None]) & (ids[None, :] < tok))
        rank += tl.sum(tl.where(above & tile_ok, 1, 0), axis=1).to(tl.int64)

    lse_f = m_f + tl.log(s_f)
    lse_c = m_c + tl.log(s_c)
    bad_f = bad_f | tl.where(m_f == NEG_INF, 4, 0)
    bad_c = bad_c | tl.where(m_c == NEG_INF, 4, 0)
    kl = acc_kl / s_f + lse_c - lse_f

    if WITH_JS:
        kl_direct = tl.zeros((K_PAD,), tl.float32)
        js = tl.zeros((K_PAD,), tl.float32)
        for start in range(0, V, BLOCK_V):
            ids = start + offs
            v_ok = ids < V
            lf = tl.load(f_row + ids, mask=v_ok, other=NEG_INF).to(tl.float32)
            tile_ok = k_ok[:, None] & v_ok[None, :]
            lc = tl.load(c_rows + ids[None, :], mask=tile_ok, other=NEG_INF).to(tl.float32)
            lpf = (lf - lse_f)[None, :]
            lpc = lc - lse_c[:, None]
            has_f = lpf > NEG_INF
            has_c = lpc > NEG_INF
            hi = tl.maximum(lpf, lpc)
            lo = tl.minimum(lpf, lpc)
            hi_use = tl.where(hi == NEG_INF, 0.0, hi)
            lm = hi + tl.log(1.0 + tl.exp(lo - hi_use)) - 0.6931471805599453
            pf = tl.exp(lpf)
            pc = tl.exp(lpc)
            tf = tl.where(has_f, pf * (lpf - lm), 0.0)
            tc = tl.where(has_c, pc * (lpc - lm), 0.0)
            js += 0.5 * tl.sum(tf + tc, axis=1)
            kl_direct += tl.sum(tl.where(has_f & has_c, pf * (lpf - lpc), 0.0), axis=1)
        kl = kl_direct
        tl.store(js_ptr + ks.to(tl.int64) * N + row, js, mask=k_ok)

    kl = tl.where(viol != 0, float("inf"), kl)
    lf_tok = tl.load(f_row + tok).to(tl.float32)
    tl.store(am_f_ptr + row, am_f)
    tl.store(lp_f_ptr + row, lf_tok - lse_f)
    tl.store(margin_ptr + row, tl.where(top2 == NEG_INF, float("inf"), top1 - top2))
    tl.store(status_f_ptr + row, bad_f)
    out_c = ks.to(tl.int64) * N + row
    tl.store(am_c_ptr + out_c, am_c, mask=k_ok)
    tl.store(lp_c_ptr + out_c, lc_tok - lse_c, mask=k_ok)
    tl.store(kl_ptr + out_c, kl, mask=k_ok)
    tl.store(rank_ptr + out_c, rank, mask=k_ok)
    tl.store(status_c_ptr + out_c, bad_c, mask=k_ok)


# Elements of one [K_PAD, BLOCK_V] tile; bounded so registers are not spilled for large K.
TILE_ELEMENTS = 8192


def launch_config(v: int, k: int, block_v: int | None = None, num_warps: int | None = None) -> tuple[int, int, int]:
    """(K_PAD, BLOCK_V, num_warps) for a call; block_v / num_warps override for tuning."""
    k_pad = triton.next_power_of_2(k)
    if block_v is None:
        block_v = max(128, TILE_ELEMENTS // k_pad)
    block_v = min(block_v, max(16, triton.next_power_of_2(v)))
    if num_warps is None:
        num_warps = 8 if k_pad * block_v >= 4096 else 4
    return k_pad, block_v, num_warps


def alloc_outputs(shapes: Shapes, device: torch.device) -> dict[str, torch.Tensor]:
    """Output buffers (uninitialised: the kernel writes every element)."""
    k, n = shapes.k, shapes.n
    f32 = dict(dtype=torch.float32, device=device)
    i64 = dict(dtype=torch.int64, device=device)
    return {
        "argmax_factual": torch.empty(n, **i64), "argmax_counterfactual": torch.empty(k, n, **i64),
        "logp_factual": torch.empty(n, **f32), "logp_counterfactual": torch.empty(k, n, **f32),
        "kl": torch.empty(k, n, **f32), "js": torch.empty(k, n, **f32),
        "margin": torch.empty(n, **f32), "rank": torch.empty(k, n, **i64),
        "status_factual": torch.empty(n, dtype=torch.int32, device=device),
        "status_counterfactual": torch.empty(k, n, dtype=torch.int32, device=device),
    }


def _row_major(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def divergence_stats_triton(factual: torch.Tensor, counterfactual: torch.Tensor, tokens: torch.Tensor,
                            with_js: bool = True, out: dict[str, torch.Tensor] | None = None,
                            block_v: int | None = None, num_warps: int | None = None) -> dict[str, torch.Tensor]:
    """Triton backend of `divergence_stats` (fp32 outputs). `out` = buffers from `alloc_outputs`
    to reuse (tests poison them to prove every element is written)."""
    cf3, shapes = check_logit_inputs(factual, counterfactual, tokens)
    factual, cf3 = _row_major(factual), _row_major(cf3)
    buf = out if out is not None else alloc_outputs(shapes, factual.device)
    if shapes.n > 0:
        k_pad, bv, warps = launch_config(shapes.v, shapes.k, block_v, num_warps)
        _divergence_kernel[(shapes.n,)](
            factual, cf3, tokens.contiguous(),
            factual.stride(0), cf3.stride(0), cf3.stride(1),
            buf["argmax_factual"], buf["logp_factual"], buf["margin"], buf["status_factual"],
            buf["argmax_counterfactual"], buf["logp_counterfactual"], buf["kl"], buf["js"], buf["rank"],
            buf["status_counterfactual"],
            shapes.n, shapes.v, shapes.k,
            K_PAD=k_pad, BLOCK_V=bv, WITH_JS=with_js, num_warps=warps,
        )
        raise_if_bad(buf["status_factual"], buf["status_counterfactual"])
    result = {key: buf[key] for key in ("argmax_factual", "argmax_counterfactual", "logp_factual",
                                         "logp_counterfactual", "kl", "js", "margin", "rank")}
    return finish(result, shapes, with_js)


__all__ = ["divergence_stats_triton", "alloc_outputs", "launch_config", "BAD_NAN", "BAD_POSINF", "BAD_ALL_NEGINF"]
