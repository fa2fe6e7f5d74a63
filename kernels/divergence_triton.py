"""Streaming Triton kernel for the divergence statistics (definitions: `reference`).

Layout: one program per block of ROWS positions (ROWS = 1 for large vocabularies). The
program walks the vocabulary in tiles of LANES x VEC ids: lane l of a tile holds the VEC
consecutive ids start + l * VEC + [0, VEC), one 16-byte load for bf16 rows that start
16-byte aligned, and each thread owns whole lanes. Every running statistic is kept *per lane*
([ROWS, LANES] registers) and reduced across lanes once, after the last tile. Why: the
statistics are cheap per logit (the target is the memory-bandwidth floor), and reducing every
tile across the program costs shuffles and barriers per tile. On sm_90 the earlier
block-reduction version compiled to 579 SASS instructions (18 barriers, 48 shuffles) per
2,048 ids of one teacher pair; this one to 183, with no shuffle (`benchmarks/kernel_sass.py`).

Each tile loads the factual block once and then, teacher by teacher, the K counterfactual
blocks (the factual row is read once for all K). K is a compile-time constant: the teacher
loop is unrolled, per-teacher state is a tuple of tensors, and the vocabulary loop is the
innermost runtime loop, where `tl.range(num_stages=...)` may software-pipeline its loads.
Only the last, partial tile is masked. Per logit the kernel does what the statistics need and
little else:
- log-sum-exps: running max and rescaled sum of 2^(x log2 e - max log2 e) per lane;
- argmax: per lane only the tile where its max first appeared (strict >, so earlier tiles
  keep ties); after the loop the lowest such block among the lanes reaching the row max is
  re-read (VEC values) to find the lowest id;
- margin: the runner-up is the largest of the other lanes' maxima and of the argmax lane's
  own values across all tiles, re-read after the loop (~0.5% of a 150k-id row);
- KL: A = sum_v exp(lf_v - m_f) (lf_v - lc_v), KL = A / S_f + lse_c - lse_f; a support
  violation (lf finite, lc = -inf: KL = +inf) makes a term +inf or NaN, so A stays
  non-finite, which is tested once per row instead of once per logit;
- rank: a count of ids at or above a per-lane threshold, the token's logit for lanes wholly
  below the token id and the next float above it otherwise (ties go to lower ids without a
  second comparison); the one lane holding the token re-reads its ids below the token for
  exact ties.
Nothing of size [N, V] is written: the extra memory is the O(N * K) outputs.

Jensen-Shannon needs both normalised log-probs inside its sum, so it takes a second pass over
the row once both log-sum-exps are known; the re-read rows may still be in L2. KL always
comes from the one-pass identity (same value with and without JS).

Bad rows (NaN, +inf, all -inf) are not tested element by element: NaN or +inf make the row's
sum of exponentials NaN (or its max +inf), all -inf leaves its max at -inf, and the kernel
flags those rows. The wrapper then inspects the first flagged row in torch and raises the same
message as the torch reference. Outside the kernel's exact domain (not met by real logits): a
finite difference lf - lc beyond the float32 range (logits near 1e38) counts as a violation,
and when the data token's logit is exactly zero, positive subnormal logits at higher ids
count as ties (not above it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

from ._block_steps import _bad
from ._checks import Shapes, check_logit_inputs, finish, raise_if_flagged

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
HALF_LN2 = tl.constexpr(0.34657359027997264)
# Finite stand-in for -inf where a log-probability meets a zero weight (0 * -inf would be NaN).
CLAMP = tl.constexpr(1e30)
SMALLEST_NORMAL_BITS = tl.constexpr(0x00800000)
INT_MAX = tl.constexpr(2147483647)


@triton.jit
def _load_tile(ptrs, ids, V, MASKED: tl.constexpr):
    """fp32 logits of a tile; MASKED (the last, partial tile): -inf past the vocabulary (a select
    after a zero-filled load: fewer registers on sm_90 than other=-inf)."""
    if MASKED:
        x = tl.where(ids < V, tl.load(ptrs, mask=ids < V, other=0.0).to(tl.float32), float("-inf"))
    else:
        x = tl.load(ptrs).to(tl.float32)
    return x


@triton.jit
def _set(t, k: tl.constexpr, value):
    """Tuple t with element k replaced (per-teacher state; k is a compile-time index)."""
    return t[:k] + (value,) + t[k + 1:]


@triton.jit
def _next_up(t):
    """The smallest float above t (finite t or -inf; zero maps to the smallest normal so a
    flush-to-zero comparison cannot count an exact zero): x >= next_up(t) is x > t."""
    bits = t.to(tl.int32, bitcast=True)
    up = tl.where(t > 0.0, bits + 1, tl.where(t < 0.0, bits - 1, SMALLEST_NORMAL_BITS))
    return up.to(tl.float32, bitcast=True)


@triton.jit
def _rescale(m_old, m_new):
    """Factor for a sum of 2^(x log2e - m_old log2e) to move to the new max, and the new base-2
    shift. A lane that has seen only -inf keeps shift 0 and sum 0."""
    m2 = tl.where(m_new == float("-inf"), 0.0, m_new * LOG2E)
    return tl.math.exp2(m_old * LOG2E - m2), m2


@triton.jit
def _factual_tile(lf, start, state):
    """Fold a factual tile lf [R, L, VEC] (-inf outside valid ids) into the per-lane state: max
    m, sum s and `best`, the tile where the lane's max first appeared (the id itself, and the
    runner-up for the margin, are found after the loop: `_lane_first`, `_runner_up`). Also
    returns the rescale factor alpha of sums taken relative to the old max and e = exp(lf - max)."""
    m, s, best = state
    b1 = tl.max(lf, axis=2)
    best = tl.where(b1 > m, start, best)  # strict: an earlier tile keeps ties
    m_new = tl.maximum(m, b1)
    alpha, m2 = _rescale(m, m_new)
    e = tl.math.exp2(lf * LOG2E - m2[:, :, None])
    return (m_new, s * alpha + tl.sum(e, axis=2), best), alpha, e


@triton.jit
def _counterfactual_tile(lc, lf, e_f, alpha_f, start, thr, state):
    """Fold teacher k's tile lc [R, L, VEC] into its per-lane state (max, sum, best tile, KL sum,
    rank count). e_f/alpha_f come from `_factual_tile`; the rank counts ids at or above the
    lane's threshold thr [R, L].

    KL terms e_f * (lf - lc): lf - lc is NaN where both are -inf and -inf where only lf is;
    there e_f = 0 and the clamp (maximum ignores NaN) makes the term 0. It is +inf exactly where
    lf is finite and lc is -inf, a support violation, and then the term is +inf or NaN: the
    KL sum stays non-finite through every rescale, which is how the end of the kernel detects
    violations without a test per logit."""
    m, s, best, akl, rank = state
    b1 = tl.max(lc, axis=2)
    best = tl.where(b1 > m, start, best)
    m_new = tl.maximum(m, b1)
    alpha, m2 = _rescale(m, m_new)
    s = s * alpha + tl.sum(tl.math.exp2(lc * LOG2E - m2[:, :, None]), axis=2)
    akl = akl * alpha_f + tl.sum(e_f * tl.maximum(lf - lc, -CLAMP), axis=2)
    rank += tl.sum((lc >= thr[:, :, None]).to(tl.int32), axis=2)
    return m_new, s, best, akl, rank


@triton.jit
def _first_pass_tile(f_rows, c_rows, ck, start, offs, lane_end, V, tok, lc_tok, lc_up, fstate, cstate,
                     K: tl.constexpr, MASKED: tl.constexpr):
    """One tile of the first pass: the factual block once, then each teacher's block. Only the
    last, partial tile is masked (masking every tile cost a select per logit)."""
    ids = start + offs
    lf = _load_tile(f_rows + ids, ids, V, MASKED)
    fstate, alpha_f, e_f = _factual_tile(lf, start, fstate)
    below = start + lane_end <= tok  # [R, L]: the whole lane lies below the data token
    for k in tl.static_range(K):
        lc = _load_tile(c_rows + k * ck + ids, ids, V, MASKED)
        thr = tl.where(below, lc_tok[k][:, None], lc_up[k][:, None])
        cstate = _set(cstate, k, _counterfactual_tile(lc, lf, e_f, alpha_f, start, thr, cstate[k]))
    return fstate, cstate


@triton.jit
def _js_tile(lpf2, pf, lc, lse2_c, FAST_LOG: tl.constexpr):
    """Per-lane Jensen-Shannon sum (base 2, halves not applied) of one teacher's tile, given the
    factual log2-probs lpf2 (clamped) and probs pf. Clamps keep 0 * log 0 terms at 0.
    FAST_LOG (CUDA): the hardware lg2.approx (~1e-7 relative error) instead of the accurate
    software log2, which took ~20 instructions per logit on sm_90; the interpreter has no
    libdevice and uses tl.log2."""
    lpc2 = tl.maximum(lc * LOG2E - lse2_c, -CLAMP)
    pc = tl.math.exp2(lpc2)
    if FAST_LOG:
        lm2 = tl.maximum(libdevice.fast_log2f(pf + pc) - 1.0, -CLAMP)
    else:
        lm2 = tl.maximum(tl.log2(pf + pc) - 1.0, -CLAMP)
    return tl.sum(pf * (lpf2 - lm2) + pc * (lpc2 - lm2), axis=2)


@triton.jit
def _js_pass_tile(f_rows, c_rows, ck, start, offs, V, lse2_f, lse2_c, js, K: tl.constexpr, MASKED: tl.constexpr,
                  FAST_LOG: tl.constexpr):
    ids = start + offs
    lf = _load_tile(f_rows + ids, ids, V, MASKED)
    lpf2 = tl.maximum(lf * LOG2E - lse2_f[:, None, None], -CLAMP)
    pf = tl.math.exp2(lpf2)
    for k in tl.static_range(K):
        lc = _load_tile(c_rows + k * ck + ids, ids, V, MASKED)
        js = _set(js, k, js[k] + _js_tile(lpf2, pf, lc, lse2_c[k][:, None, None], FAST_LOG))
    return js


@triton.jit
def _lanes_lse(m, s):
    """Across lanes: the row max M [R], each lane's factor to it [R, L], the row's sum of
    exponentials relative to M (0 for an all -inf row) and its log-sum-exp in base 2 [R]."""
    big = tl.max(m, axis=1)
    big2 = tl.where(big == float("-inf"), 0.0, big * LOG2E)
    scale = tl.math.exp2(m * LOG2E - big2[:, None])
    total = tl.sum(s * scale, axis=1)
    return big, scale, total, big2 + tl.math.log2(total)


@triton.jit
def _lane_first(row_ptr, m, best, lane_off, big, V, VEC: tl.constexpr):
    """The lowest id holding the row max `big`, the first id of its VEC block and the mask of
    the one lane that block belongs to.

    Each lane knows the tile `best` where its max first appeared; among the lanes that reach
    `big` the lowest id is in the lane whose VEC block starts lowest (best + lane offset), and
    re-reading that one block (VEC values per row) gives the position inside it."""
    vstart = tl.where(m == big[:, None], best + lane_off, V)  # [R, L]; V: no lane (masked re-read)
    first = tl.min(vstart, axis=1)  # [R]
    ids = first[:, None] + tl.arange(0, VEC)[None, :]  # [R, VEC]
    x = tl.load(row_ptr[:, None] + ids, mask=ids < V, other=float("-inf")).to(tl.float32)
    pos = tl.min(tl.where(x == big[:, None], ids, INT_MAX), axis=1)
    return pos, first, vstart == first[:, None]


@triton.jit
def _ties_below(row_ptr, tok, t, VEC: tl.constexpr):
    """Ids below the data token with exactly its logit t, inside the token's own lane (the lane
    straddling the token was counted with the strict threshold, which misses these)."""
    j = tl.arange(0, VEC)[None, :]
    off = (tok % VEC)[:, None]
    x = tl.load(row_ptr[:, None] + (tok - tok % VEC)[:, None] + j, mask=j < off, other=float("-inf")).to(tl.float32)
    return tl.sum(((x == t[:, None]) & (j < off)).to(tl.int32), axis=1)  # masked -inf may equal t


@triton.jit
def _runner_up(row_ptr, first, pos, holder, m, V, BLOCK_V: tl.constexpr, VEC: tl.constexpr,
               N_TILES: tl.constexpr):
    """The second largest logit of the row, counting a repeated maximum twice: the largest of
    the other lanes' maxima and of the max's own lane without the argmax position `pos`. That
    lane is re-read across all tiles (N_TILES x VEC values per row, ~0.5% of the row for a
    150k vocabulary): cheaper than a running top-2 per logit. first = the first id of the
    argmax's VEC block (`_lane_first`)."""
    lane0 = first % BLOCK_V  # [R]
    ids = (tl.arange(0, N_TILES) * BLOCK_V)[None, :, None] + lane0[:, None, None] + tl.arange(0, VEC)[None, None, :]
    x = tl.load(row_ptr[:, None, None] + ids, mask=ids < V, other=float("-inf")).to(tl.float32)
    x = tl.where(ids == pos[:, None, None], float("-inf"), x)
    own = tl.max(tl.max(x, axis=2), axis=1)
    return tl.maximum(own, tl.max(tl.where(holder, float("-inf"), m), axis=1))


@triton.jit
def _divergence_kernel(
    f_ptr, c_ptr, tok_ptr,
    stride_fn, stride_ck, stride_cn,
    am_f_ptr, lp_f_ptr, margin_ptr, status_f_ptr,
    am_c_ptr, lp_c_ptr, kl_ptr, js_ptr, rank_ptr, status_c_ptr,
    N, V, V_FULL,
    K: tl.constexpr, ROWS: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr, N_TILES: tl.constexpr,
    WITH_JS: tl.constexpr, NUM_STAGES: tl.constexpr, FAST_LOG: tl.constexpr,
):
    BLOCK_V: tl.constexpr = LANES * VEC
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    row_ok = rows < N
    rows_ld = tl.minimum(rows, N - 1)  # rows past N read row N - 1 (never stored): no load masks
    lane_off = (tl.arange(0, LANES) * VEC)[None, :]  # [1, L]
    offs = (lane_off[:, :, None] + tl.arange(0, VEC)[None, None, :])  # [1, L, VEC]
    f_row = f_ptr + rows_ld * stride_fn  # [R]
    ck = stride_ck.to(tl.int64)
    c_row = c_ptr + rows_ld * stride_cn  # teacher k: + k * ck (64-bit)
    f_rows = f_row[:, None, None]
    c_rows = c_row[:, None, None]

    tok = tl.load(tok_ptr + rows_ld).to(tl.int32)  # [R]; ids are int32 (V < 2**31)
    lf_tok = tl.load(f_row + tok).to(tl.float32)
    zero = tl.zeros((ROWS,), tl.float32)
    lc_tok, lc_up = (zero,) * K, (zero,) * K
    for k in tl.static_range(K):
        t = tl.load(c_row + k * ck + tok).to(tl.float32)
        lc_tok = _set(lc_tok, k, t)
        lc_up = _set(lc_up, k, _next_up(t))

    neg = tl.full((ROWS, LANES), float("-inf"), tl.float32)
    fzero = tl.zeros((ROWS, LANES), tl.float32)
    izero = tl.zeros((ROWS, LANES), tl.int32)
    fstate = (neg, fzero, izero)  # m, s, best
    cstate = ((neg, fzero, izero, fzero, izero),) * K  # per teacher: m, s, best, akl, rank
    tok2 = tok[:, None]
    lane_end = lane_off + VEC

    # The teacher loop inside is unrolled (K is constexpr), so the vocabulary loop is the
    # innermost runtime loop and tl.range can software-pipeline its loads.
    for start in tl.range(0, V_FULL, BLOCK_V, num_stages=NUM_STAGES):  # V_FULL: ids in whole tiles
        fstate, cstate = _first_pass_tile(f_rows, c_rows, ck, start, offs, lane_end, V, tok2, lc_tok, lc_up,
                                          fstate, cstate, K, False)
    for start in range(V_FULL, V, BLOCK_V):  # the partial tile, if any
        fstate, cstate = _first_pass_tile(f_rows, c_rows, ck, start, offs, lane_end, V, tok2, lc_tok, lc_up,
                                          fstate, cstate, K, True)

    m_f, s_f, best_f = fstate
    big_f, scale_f, sum_f, lse2_f = _lanes_lse(m_f, s_f)
    am_f, first, holder = _lane_first(f_row, m_f, best_f, lane_off, big_f, V, VEC)
    second = _runner_up(f_row, first, am_f, holder, m_f, V, BLOCK_V, VEC, N_TILES)
    tl.store(am_f_ptr + rows, am_f.to(tl.int64), mask=row_ok)
    tl.store(lp_f_ptr + rows, lf_tok - lse2_f * LN2, mask=row_ok)
    tl.store(margin_ptr + rows, tl.where(second == float("-inf"), float("inf"), big_f - second), mask=row_ok)
    tl.store(status_f_ptr + rows, _bad(big_f, sum_f), mask=row_ok)
    lse2_c = (zero,) * K
    for k in tl.static_range(K):
        m_c, s_c, best_c, akl, rank = cstate[k]
        big_c, scale_c, sum_c, lse2 = _lanes_lse(m_c, s_c)
        lse2_c = _set(lse2_c, k, lse2)
        am_c, _, _ = _lane_first(c_row + k * ck, m_c, best_c, lane_off, big_c, V, VEC)
        a = tl.sum(akl * scale_f, axis=1)
        kl = tl.where(tl.abs(a) < float("inf"), a / sum_f + (lse2 - lse2_f) * LN2, float("inf"))  # NaN: not < inf
        t = lc_tok[k]
        rank_k = tl.sum(rank, axis=1) + _ties_below(c_row + k * ck, tok, t, VEC)
        out = k * N + rows
        tl.store(am_c_ptr + out, am_c.to(tl.int64), mask=row_ok)
        tl.store(lp_c_ptr + out, t - lse2 * LN2, mask=row_ok)
        tl.store(kl_ptr + out, kl, mask=row_ok)
        tl.store(rank_ptr + out, rank_k.to(tl.int64), mask=row_ok)
        tl.store(status_c_ptr + out, _bad(big_c, sum_c), mask=row_ok)

    if WITH_JS:  # second pass: needs both log-sum-exps inside the sum
        js = (fzero,) * K
        for start in tl.range(0, V_FULL, BLOCK_V, num_stages=NUM_STAGES):
            js = _js_pass_tile(f_rows, c_rows, ck, start, offs, V, lse2_f, lse2_c, js, K, False, FAST_LOG)
        for start in range(V_FULL, V, BLOCK_V):
            js = _js_pass_tile(f_rows, c_rows, ck, start, offs, V, lse2_f, lse2_c, js, K, True, FAST_LOG)
        for k in tl.static_range(K):
            tl.store(js_ptr + k * N + rows, tl.sum(js[k], axis=1) * HALF_LN2, mask=row_ok)


# Ids of one [ROWS, BLOCK_V] tile. Large vocabularies get one row per program and BLOCK_V-wide
# steps; small ones pack several rows into a program so lanes are not wasted. A lane holds one
# 16-byte vector (VEC = 8 ids in bf16/fp16, 4 in fp32) when every row starts 16-byte aligned;
# otherwise (e.g. GPT-2's odd 50257-id rows) the compiler cannot vectorise the loads and
# spreads a lane's ids over threads, so lanes shrink to one id (VEC = 1). The defaults (one
# lane per thread, 2048 ids and 8 warps; 1024 ids and 4 warps for VEC = 1 or many teachers)
# were chosen without a GPU from sm_90 instruction, register and spill counts
# (`benchmarks/kernel_sass.py`); `benchmarks/bench_divergence.py --sweep` times alternatives.
TILE_ELEMENTS = 2048
SMALL_TILE_ELEMENTS = 1024  # VEC = 1, or K > 4 teachers (registers: per-teacher state per lane)
MAX_ROWS = 128
MULTI_ROW_TILE_ELEMENTS = 1024  # bf16 vocabularies under 1024 ids: several rows per program, 4 warps
VECTOR_BYTES = 16
PIPELINE_SHARED_BYTES = 64 << 10
# Under the CPU interpreter the cost is per tile step, not per register: larger tiles.
INTERPRET_TILE_ELEMENTS = 8192


@dataclass(frozen=True)
class LaunchConfig:
    rows: int
    block_v: int
    vec: int
    num_warps: int
    num_stages: int

    @property
    def lanes(self) -> int:
        return self.block_v // self.vec


def launch_config(n: int, v: int, k: int, block_v: int | None = None, num_warps: int | None = None,
                  rows: int | None = None, num_stages: int | None = None, vec: int | None = None,
                  interpret: bool = False, elem_bytes: int = 2, aligned: bool = True) -> LaunchConfig:
    """Tile sizes for a call; the keyword arguments override the defaults (for tuning).
    aligned: every teacher row starts on a 16-byte boundary (`rows_aligned`)."""
    if vec is None:
        vec = max(1, VECTOR_BYTES // elem_bytes) if aligned else 1
    if interpret:
        tile = INTERPRET_TILE_ELEMENTS
    else:
        tile = SMALL_TILE_ELEMENTS if vec == 1 or k > 4 else TILE_ELEMENTS
    bv = block_v if block_v is not None else tile
    if bv < 16 or bv > 16384 or bv & (bv - 1):
        raise ValueError(f"block_v must be a power of two in [16, 16384], got {bv}")
    bv = min(bv, max(16, triton.next_power_of_2(v)))
    if vec < 1 or vec & (vec - 1) or vec > bv:
        raise ValueError(f"vec must be a power of two no larger than block_v ({bv}), got {vec}")
    if rows is None:
        # packed rows: about one lane per thread (VEC = 1 lanes are single ids: fewer ids)
        packed = tile if interpret else MULTI_ROW_TILE_ELEMENTS * vec // VECTOR_BYTES * 2
        rows = max(1, min(MAX_ROWS, packed // bv, triton.next_power_of_2(max(n, 1))))
    if num_warps is None:
        num_warps = 8 if rows * bv >= 2048 else 4
    if num_stages is None:
        # software pipelining keeps the next tiles' loads in flight, at (1 + K) tiles of shared
        # memory per stage (for K = 12, one stage also made ptxas cap registers at 128 and spill)
        num_stages = 2 if (1 + k) * rows * bv * elem_bytes * 2 <= PIPELINE_SHARED_BYTES else 1
    return LaunchConfig(rows=rows, block_v=bv, vec=vec, num_warps=num_warps, num_stages=num_stages)


def n_tiles(v: int, block_v: int) -> int:
    """Tiles per row, rounded up to a power of two (the runner-up re-read's constexpr extent)."""
    return triton.next_power_of_2(triton.cdiv(v, block_v))


def rows_aligned(*tensors: torch.Tensor) -> bool:
    """Whether every row of these row-major tensors starts on a 16-byte boundary."""
    for t in tensors:
        size = t.element_size()
        if t.data_ptr() % VECTOR_BYTES or any((st * size) % VECTOR_BYTES for st in t.stride()[:-1]):
            return False
    return True


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
                            rows: int | None = None, num_stages: int | None = None,
                            vec: int | None = None) -> dict[str, torch.Tensor]:
    """Triton backend of `divergence_stats` (fp32 outputs). `out` = buffers from `alloc_outputs`
    to reuse (tests poison them to prove every element is written)."""
    check_runnable(_divergence_kernel, factual.device)
    cf3, shapes = check_logit_inputs(factual, counterfactual, tokens)
    factual, cf3 = _row_major(factual), _row_major(cf3)
    buf = out if out is not None else alloc_outputs(shapes, factual.device)
    if shapes.n > 0:
        cfg = launch_config(shapes.n, shapes.v, shapes.k, block_v, num_warps, rows, num_stages, vec,
                            interpret=factual.device.type != "cuda", elem_bytes=factual.element_size(),
                            aligned=factual.dtype == cf3.dtype and rows_aligned(factual, cf3))
        _divergence_kernel[(triton.cdiv(shapes.n, cfg.rows),)](
            factual, cf3, tokens.contiguous(),
            factual.stride(0), cf3.stride(0), cf3.stride(1),
            buf["argmax_factual"], buf["logp_factual"], buf["margin"], buf["status_factual"],
            buf["argmax_counterfactual"], buf["logp_counterfactual"], buf["kl"], buf["js"], buf["rank"],
            buf["status_counterfactual"],
            shapes.n, shapes.v, shapes.v // cfg.block_v * cfg.block_v,
            K=shapes.k, ROWS=cfg.rows, LANES=cfg.lanes, VEC=cfg.vec,
            N_TILES=n_tiles(shapes.v, cfg.block_v), WITH_JS=with_js,
            NUM_STAGES=cfg.num_stages, FAST_LOG=factual.device.type == "cuda", num_warps=cfg.num_warps,
        )
        raise_if_flagged(buf["status_factual"], buf["status_counterfactual"],
                         lambda k, r: factual[r] if k is None else cf3[k, r])
    result = {key: buf[key] for key in ("argmax_factual", "argmax_counterfactual", "logp_factual",
                                         "logp_counterfactual", "kl", "js", "margin", "rank")}
    return finish(result, shapes, with_js)


__all__ = ["divergence_stats_triton", "alloc_outputs", "launch_config", "check_runnable", "LaunchConfig"]
