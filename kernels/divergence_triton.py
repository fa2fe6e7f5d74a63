"""Streaming Triton kernel for the divergence statistics (definitions: `reference`).

Layout: one program per block of ROWS positions (ROWS = 1 for large vocabularies). The
program walks the vocabulary in blocks of BLOCK_V ids; each step loads the factual block once
([ROWS, BLOCK_V], kept in registers) and then, teacher by teacher, the K counterfactual blocks,
so the factual row is read once for all K. K is a compile-time constant (one compilation per
K), so the teacher loop is unrolled and the vocabulary loop is innermost, where
`tl.range(num_stages=...)` may software-pipeline its loads. Every statistic is an online (running) quantity:
running max and rescaled sum of exponentials for each log-sum-exp, running argmax (strict >
keeps the lowest id), running top-2 for the margin, a running count for the rank, and for KL
the rescaled sum A = sum_v exp(lf_v - m_f) (lf_v - lc_v), since KL = A / S_f + lse_c - lse_f.
Per-teacher state lives in [ROWS, K_PAD] registers. Nothing of size [N, V] is written: the
extra memory is the O(N * K) outputs.

Jensen-Shannon needs both normalised log-probs inside its sum, so it takes a second pass over
the row once both log-sum-exps are known; the re-read rows may still be in L2. KL always
comes from the one-pass identity (same value with and without JS).

Cost per logit was kept low on purpose (the target is the memory-bandwidth floor): per block
and teacher a handful of row reductions (max, lowest-id argmax, sum of exponentials, KL sum,
and one packed integer sum for rank + support violations).

Bad rows (NaN, +inf, all -inf) are not tested element by element (that would cost several
operations per logit): NaN or +inf make the row's sum of exponentials NaN (or its max +inf),
all -inf leaves its max at -inf, and the kernel flags those rows. The wrapper then inspects
the first flagged row in torch and raises the same message as the torch reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._checks import Shapes, check_logit_inputs, finish, raise_if_flagged


@triton.jit
def _load_block(ptrs, mask):
    """fp32 logits, -inf where masked. The select after a zero-filled load (rather than
    other=-inf) took ptxas from 79 to 61 registers for the K = 1 kernel on sm_90."""
    return tl.where(mask, tl.load(ptrs, mask=mask, other=0.0).to(tl.float32), float("-inf"))


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


@triton.jit
def _divergence_kernel(
    f_ptr, c_ptr, tok_ptr,
    stride_fn, stride_ck, stride_cn,
    am_f_ptr, lp_f_ptr, margin_ptr, status_f_ptr,
    am_c_ptr, lp_c_ptr, kl_ptr, js_ptr, rank_ptr, status_c_ptr,
    N, V,
    K: tl.constexpr, K_PAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr, WITH_JS: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    row_ok = rows < N
    ks = tl.arange(0, K_PAD)
    k_ok = ks < K
    offs = tl.arange(0, BLOCK_V)
    f_rows = f_ptr + rows[:, None] * stride_fn  # [R, 1]
    c_rows = c_ptr + rows[:, None] * stride_cn  # teacher 0; teacher k is c_rows + k * stride_ck

    tok = tl.load(tok_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    tok32 = tok.to(tl.int32)  # comparisons with the int32 vocabulary ids stay 32-bit
    tok_ptrs = c_ptr + ks.to(tl.int64)[None, :] * stride_ck + rows[:, None] * stride_cn + tok[:, None]
    lc_tok = tl.load(tok_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
    lf_tok = tl.load(f_ptr + rows * stride_fn + tok, mask=row_ok, other=0.0).to(tl.float32)

    m_f = tl.full((ROWS,), float("-inf"), tl.float32)
    s_f = tl.zeros((ROWS,), tl.float32)
    top2 = tl.full((ROWS,), float("-inf"), tl.float32)
    am_f = tl.zeros((ROWS,), tl.int32)
    m_c = tl.full((ROWS, K_PAD), float("-inf"), tl.float32)
    s_c = tl.zeros((ROWS, K_PAD), tl.float32)
    am_c = tl.zeros((ROWS, K_PAD), tl.int32)
    akl = tl.zeros((ROWS, K_PAD), tl.float32)
    viol = tl.zeros((ROWS, K_PAD), tl.int32)
    rank = tl.zeros((ROWS, K_PAD), tl.int32)

    # K is a compile-time constant: the teacher loop is unrolled, so the vocabulary loop is the
    # innermost loop and tl.range can software-pipeline its loads (NUM_STAGES blocks in flight).
    for start in tl.range(0, V, BLOCK_V, num_stages=NUM_STAGES):
        ids = start + offs
        fmask = row_ok[:, None] & (ids < V)[None, :]
        lf = _load_block(f_rows + ids[None, :], fmask)
        m_f, s_f, top2, am_f, alpha, e_f = _factual_step(lf, ids, m_f, s_f, top2, am_f)
        ck_rows = c_rows
        for k in tl.static_range(K):
            sel = (ks == k)[None, :]
            lc = _load_block(ck_rows + ids[None, :], fmask)
            m1, s1, a1, kl1, v1, r1 = _counterfactual_step(
                lc, lf, e_f, alpha, ids, tok32, _col(lc_tok, sel), _col(m_c, sel), _col(s_c, sel),
                _col(am_c, sel), _col(akl, sel), _col(viol, sel), _col(rank, sel), False)
            m_c = _put(m_c, sel, m1)
            s_c = _put(s_c, sel, s1)
            am_c = _put(am_c, sel, a1)
            akl = _put(akl, sel, kl1)
            viol = _put(viol, sel, v1)
            rank = _put(rank, sel, r1)
            ck_rows += stride_ck

    js = tl.zeros((ROWS, K_PAD), tl.float32)
    if WITH_JS:  # second pass: needs both log-sum-exps inside the sum
        lse_f = m_f + tl.log(s_f)
        lse_c = m_c + tl.log(s_c)
        for start in tl.range(0, V, BLOCK_V, num_stages=NUM_STAGES):
            ids = start + offs
            fmask = row_ok[:, None] & (ids < V)[None, :]
            lf = _load_block(f_rows + ids[None, :], fmask)
            lpf = lf - lse_f[:, None]
            ck_rows = c_rows
            for k in tl.static_range(K):
                sel = (ks == k)[None, :]
                lc = _load_block(ck_rows + ids[None, :], fmask)
                js = _put(js, sel, _col(js, sel) + _js_step(lpf, lc, _col(lse_c, sel)))
                ck_rows += stride_ck

    _store_results(rows, row_ok, ks, k_ok, N, lf_tok, lc_tok, m_f, s_f, top2, am_f,
                   m_c, s_c, am_c, akl, viol, rank, js,
                   am_f_ptr, lp_f_ptr, margin_ptr, status_f_ptr,
                   am_c_ptr, lp_c_ptr, kl_ptr, js_ptr, rank_ptr, status_c_ptr, WITH_JS)


# Elements of one [ROWS, BLOCK_V] block. Large vocabularies get one row per program and
# BLOCK_V-wide steps; small ones pack several rows into a program so lanes are not wasted.
# Defaults chosen without a GPU from ptxas register counts for sm_90 (2048 ids x 8 warps: 8
# logits per thread; K = 1: 61-64 registers, no spills, up to four programs per SM);
# `benchmarks/bench_divergence.py --sweep` measures the alternatives on a real GPU.
TILE_ELEMENTS = 2048
MAX_ROWS = 128
MULTI_ROW_TILE_ELEMENTS = 1024  # vocabularies under 1024 ids: several rows per program, 4 warps
# Under the CPU interpreter the cost is per block step, not per register: larger blocks.
INTERPRET_TILE_ELEMENTS = 8192


@dataclass(frozen=True)
class LaunchConfig:
    k_pad: int
    rows: int
    block_v: int
    num_warps: int
    num_stages: int


def launch_config(n: int, v: int, k: int, block_v: int | None = None, num_warps: int | None = None,
                  rows: int | None = None, num_stages: int | None = None, interpret: bool = False) -> LaunchConfig:
    """Block sizes for a call; the keyword arguments override the defaults (for tuning)."""
    tile = INTERPRET_TILE_ELEMENTS if interpret else TILE_ELEMENTS
    bv = block_v if block_v is not None else tile
    if bv < 16 or bv > 16384 or bv & (bv - 1):
        raise ValueError(f"block_v must be a power of two in [16, 16384], got {bv}")  # packed rank sum
    bv = min(bv, max(16, triton.next_power_of_2(v)))
    if rows is None:
        # packed rows cost registers out of proportion (ptxas), so packed blocks are smaller
        packed = tile if interpret else MULTI_ROW_TILE_ELEMENTS
        rows = max(1, min(MAX_ROWS, packed // bv, triton.next_power_of_2(max(n, 1))))
    if num_warps is None:
        num_warps = 8 if rows * bv >= 2048 else 4
    if num_stages is None:
        # software pipelining keeps the next blocks' loads in flight (shared memory per stage:
        # (1 + K) blocks); with many teachers the unrolled loads already overlap
        num_stages = 2 if k <= 4 else 1
    return LaunchConfig(k_pad=triton.next_power_of_2(k), rows=rows, block_v=bv, num_warps=num_warps,
                        num_stages=num_stages)


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


def check_runnable(kernel: object, device: torch.device) -> None:
    """Off CUDA a kernel runs only if it was defined under TRITON_INTERPRET=1 (decided at import)."""
    if device.type == "cuda":
        return
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(kernel, InterpretedFunction):
        raise ValueError(f"the Triton kernels need CUDA tensors (got {device}); for CPU tests set TRITON_INTERPRET=1 "
                         "before subliminal.kernels' Triton modules are first imported, or use backend 'torch'")


def _row_major(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def divergence_stats_triton(factual: torch.Tensor, counterfactual: torch.Tensor, tokens: torch.Tensor,
                            with_js: bool = True, out: dict[str, torch.Tensor] | None = None,
                            block_v: int | None = None, num_warps: int | None = None,
                            rows: int | None = None, num_stages: int | None = None) -> dict[str, torch.Tensor]:
    """Triton backend of `divergence_stats` (fp32 outputs). `out` = buffers from `alloc_outputs`
    to reuse (tests poison them to prove every element is written)."""
    check_runnable(_divergence_kernel, factual.device)
    cf3, shapes = check_logit_inputs(factual, counterfactual, tokens)
    factual, cf3 = _row_major(factual), _row_major(cf3)
    buf = out if out is not None else alloc_outputs(shapes, factual.device)
    if shapes.n > 0:
        cfg = launch_config(shapes.n, shapes.v, shapes.k, block_v, num_warps, rows, num_stages,
                            interpret=factual.device.type != "cuda")
        _divergence_kernel[(triton.cdiv(shapes.n, cfg.rows),)](
            factual, cf3, tokens.contiguous(),
            factual.stride(0), cf3.stride(0), cf3.stride(1),
            buf["argmax_factual"], buf["logp_factual"], buf["margin"], buf["status_factual"],
            buf["argmax_counterfactual"], buf["logp_counterfactual"], buf["kl"], buf["js"], buf["rank"],
            buf["status_counterfactual"],
            shapes.n, shapes.v,
            K=shapes.k, K_PAD=cfg.k_pad, ROWS=cfg.rows, BLOCK_V=cfg.block_v, WITH_JS=with_js,
            NUM_STAGES=cfg.num_stages, num_warps=cfg.num_warps,
        )
        raise_if_flagged(buf["status_factual"], buf["status_counterfactual"],
                         lambda k, r: factual[r] if k is None else cf3[k, r])
    result = {key: buf[key] for key in ("argmax_factual", "argmax_counterfactual", "logp_factual",
                                         "logp_counterfactual", "kl", "js", "margin", "rank")}
    return finish(result, shapes, with_js)


__all__ = ["divergence_stats_triton", "alloc_outputs", "launch_config", "check_runnable", "LaunchConfig"]
