"""Block-level online statistics for kernels whose logit blocks come out of `tl.dot`.

The fused-linear kernel computes each [ROWS, BLOCK_V] logit block with a matmul, whose
(tensor-core) layout spreads a row over many threads; these helpers fold such a block into
per-row running state with block-wide reductions. The streaming logits kernel does not use
them: it loads its blocks itself and keeps running state per thread (`divergence_triton`).
Definitions of the statistics: `reference`.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _col(state, sel):
    """Column k of a [R, K_PAD] state (sel = one-hot [1, K_PAD] mask of k)."""
    return tl.sum(tl.where(sel, state, tl.zeros_like(state)), axis=1)


@triton.jit
def _put(state, sel, value):
    return tl.where(sel, value[:, None], state)


@triton.jit
def _factual_step(lf, ids, m_f, s_f, top2, am_f):
    """Fold one factual block lf [R, BV] (-inf outside the valid ids/rows) into the running state.

    m_f is the running max (= top-1); returns the new state plus alpha (rescale factor of sums
    taken relative to the old max) and e_f = exp(lf - new max) for the counterfactual steps.
    NaN / +inf are not tested per element: they turn s_f into NaN (or m_f into +inf), which
    the end of the kernel flags.
    """
    b1 = tl.max(lf, axis=1)
    i1 = tl.min(tl.where(lf == b1[:, None], ids[None, :], 2147483647), axis=1)
    b2 = tl.max(tl.where(ids[None, :] == i1[:, None], float("-inf"), lf), axis=1)
    am_f = tl.where(b1 > m_f, i1, am_f)  # strict: an earlier block keeps ties
    top2 = tl.maximum(tl.minimum(m_f, b1), tl.maximum(top2, b2))
    m_new = tl.maximum(m_f, b1)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.where(m_new == float("-inf"), 1.0, tl.exp(m_f - m_use))
    e_f = tl.exp(lf - m_use[:, None])  # 0 where lf is -inf (masked ids and padding)
    s_f = s_f * alpha + tl.sum(e_f, axis=1)
    return m_new, s_f, top2, am_f, alpha, e_f


@triton.jit
def _counterfactual_step(lc, lf, e_f, alpha, ids, tok, lc_tok, m_c, s_c, am_c, akl, viol, rank,
                         SKIP_TOKEN: tl.constexpr):
    """Fold one counterfactual block lc [R, BV] (teacher k; -inf outside the valid ids/rows) into
    its running state ([R] each; ids, argmaxes, ranks and tok are int32).

    akl accumulates sum exp(lf - m_f) (lf - lc) over ids where both are finite, rescaled with the
    factual max like s_f; viol counts factual mass on a counterfactual -inf (KL = +inf). The rank
    counts ids above the data token (ties: lower ids); SKIP_TOKEN never counts the token itself
    (needed when lc_tok was computed apart from lc). Rank and violations share one integer
    reduction (rank in the low 16 bits, violations above: BLOCK_V <= 16384 keeps the sum < 2**31).
    """
    cb1 = tl.max(lc, axis=1)
    ci1 = tl.min(tl.where(lc == cb1[:, None], ids[None, :], 2147483647), axis=1)
    am_c = tl.where(cb1 > m_c, ci1, am_c)
    mc_new = tl.maximum(m_c, cb1)
    mc_use = tl.where(mc_new == float("-inf"), 0.0, mc_new)
    alpha_c = tl.where(mc_new == float("-inf"), 1.0, tl.exp(m_c - mc_use))
    s_c = s_c * alpha_c + tl.sum(tl.exp(lc - mc_use[:, None]), axis=1)
    has_f = lf > float("-inf")
    has_c = lc > float("-inf")
    akl = akl * alpha + tl.sum(tl.where(has_f & has_c, e_f * (lf - lc), 0.0), axis=1)
    t = lc_tok[:, None]
    above = tl.where(ids[None, :] < tok[:, None], lc >= t, lc > t)
    if SKIP_TOKEN:
        above = above & (ids[None, :] != tok[:, None])
    packed = tl.sum(above.to(tl.int32) + ((has_f & (~has_c)).to(tl.int32) << 16), axis=1)
    rank = rank + (packed & 65535)
    viol = viol | (packed >> 16)
    return mc_new, s_c, am_c, akl, viol, rank


@triton.jit
def _js_step(lpf, lc, lse_c):
    """Jensen-Shannon contribution ([R]) of one block, given normalised factual log-probs
    lpf [R, BV] and raw counterfactual logits lc [R, BV] with their lse_c [R]. Where p > 0 the
    mixture (p + q) / 2 > 0, so log m is finite wherever its term counts."""
    lpc = lc - lse_c[:, None]
    pf = tl.exp(lpf)
    pc = tl.exp(lpc)
    lm = tl.log(0.5 * (pf + pc))
    tf = tl.where(pf > 0.0, pf * (lpf - lm), 0.0)
    tc = tl.where(pc > 0.0, pc * (lpc - lm), 0.0)
    return 0.5 * tl.sum(tf + tc, axis=1)


@triton.jit
def _bad(m, s):
    """1 where a row had NaN (s is NaN), +inf (m = +inf) or only -inf (m = -inf)."""
    return tl.where((s != s) | (m == float("inf")) | (m == float("-inf")), 1, 0)


@triton.jit
def _store_results(rows, row_ok, ks, k_ok, N, lf_tok, lc_tok, m_f, s_f, top2, am_f,
                   m_c, s_c, am_c, akl, viol, rank, js,
                   am_f_ptr, lp_f_ptr, margin_ptr, status_f_ptr,
                   am_c_ptr, lp_c_ptr, kl_ptr, js_ptr, rank_ptr, status_c_ptr, WITH_JS: tl.constexpr):
    """Finish the online statistics and write every output element of this row block.

    KL = A / S_f + lse_c - lse_f (see the module docstring), +inf on a support violation."""
    lse_f = m_f + tl.log(s_f)
    lse_c = m_c + tl.log(s_c)
    kl = akl / s_f[:, None] + lse_c - lse_f[:, None]
    kl = tl.where(viol != 0, float("inf"), kl)
    tl.store(am_f_ptr + rows, am_f.to(tl.int64), mask=row_ok)
    tl.store(lp_f_ptr + rows, lf_tok - lse_f, mask=row_ok)
    tl.store(margin_ptr + rows, tl.where(top2 == float("-inf"), float("inf"), m_f - top2), mask=row_ok)
    tl.store(status_f_ptr + rows, _bad(m_f, s_f), mask=row_ok)
    out_c = ks.to(tl.int64)[None, :] * N + rows[:, None]
    cmask = row_ok[:, None] & k_ok[None, :]
    tl.store(am_c_ptr + out_c, am_c.to(tl.int64), mask=cmask)
    tl.store(lp_c_ptr + out_c, lc_tok - lse_c, mask=cmask)
    tl.store(kl_ptr + out_c, kl, mask=cmask)
    tl.store(rank_ptr + out_c, rank.to(tl.int64), mask=cmask)
    tl.store(status_c_ptr + out_c, _bad(m_c, s_c), mask=cmask)
    if WITH_JS:
        tl.store(js_ptr + out_c, js, mask=cmask)
