"""The one place where a batch of token rows becomes logits, and the one sampler.

Why one place: every stage compares numbers computed by different models on the same rows
(divergence scores, preferences, students against teachers), so a row's logits must not depend
on which stage computed them, on the batch it ran in, or on the padding around it.

Two conventions, each correct for causal LMs with rotary or learned positions:

- **Teacher forcing pads on the right** and passes explicit ``position_ids`` (0, 1, ... per
  row). Under a causal mask a real token never attends to the padding after it, so a padded row
  sees exactly what it sees alone. Only the positions that predict a wanted token are projected
  onto the vocabulary (``logits_to_keep`` as a position tensor where the model supports it), and
  ``max_logit_elements`` splits a batch into row chunks so a 150k-id vocabulary fits in memory.
- **Generation pads on the left** so every row's next token is the last column, with
  ``position_ids`` counted from each row's first real token, and a KV cache. Each row draws
  from its own ``random.Random``, so sampled text does not depend on the batch size.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .data import Aligned, pad_batch
from .manifest import SubliminalError

# Chunk teacher forcing so one forward pass holds at most this many logits (rows x kept
# positions x vocabulary): 2**28 float32 logits are 1 GiB.
DEFAULT_MAX_LOGIT_ELEMENTS = 1 << 28


def device_of(model: Any) -> torch.device:
    return next(model.parameters()).device


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token (padding gets 0)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


# ----------------------------------------------------------------------------- teacher forcing


@dataclass
class Forced:
    """Teacher-forced outputs of one right-padded batch.

    ``logits`` is ``[B, K, V]`` (the model's dtype and device): column ``c`` holds the logits at
    sequence position ``start + c``, which predict token ``start + c + 1``. ``hidden``, when
    asked for, is the model's tuple of hidden states (embeddings first), each ``[B, T, H]`` over
    all positions. Padding columns of short rows hold garbage and are never read."""

    logits: torch.Tensor
    start: int
    first: list[int]
    lengths: list[int]
    hidden: tuple[torch.Tensor, ...] | None = None

    def column(self, token_pos: int) -> int:
        """Column of the logits that predict the token at sequence position ``token_pos``."""
        return token_pos - 1 - self.start

    def row(self, i: int) -> torch.Tensor:
        """Row i's logits ``[n_i, V]`` predicting its tokens ``seq[first_i:]``."""
        return self.logits[i, self.column(self.first[i]): self.column(self.lengths[i] - 1) + 1]

    def rows(self) -> list[torch.Tensor]:
        return [self.row(i) for i in range(len(self.lengths))]


def _call(model: Any, keep: int | torch.Tensor, **inputs: Any) -> tuple[Any, bool]:
    """Forward pass projecting only the ``keep`` positions where the model's forward takes
    ``logits_to_keep``; otherwise all positions (the caller slices)."""
    try:
        return model(**inputs, logits_to_keep=keep), True
    except TypeError as e:
        if "logits_to_keep" not in str(e):
            raise
        return model(**inputs), False


# A batch whose rows open with the same tokens (the chat template's system turn: a fifth of a
# number row on SmolLM2) encodes that opening once and continues every row from its KV cache.
MIN_SHARED_PREFIX = 4


def shared_prefix(seqs: Sequence[Sequence[int]], limit: int) -> int:
    """How many leading tokens every row of ``seqs`` has in common, at most ``limit``."""
    n = min(limit, *(len(s) for s in seqs))
    head = seqs[0]
    for i in range(n):
        t = head[i]
        if any(s[i] != t for s in seqs):
            return i
    return n


def _stochastic(model: Any) -> bool:
    """Whether a forward pass draws random numbers (dropout in training mode): rows sharing one
    encoding of their common opening would then share its noise, which they must not."""
    if not getattr(model, "training", False):
        return False
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
        return True
    # attention dropout is often functional, named only in the config
    config = getattr(model, "config", None)
    rates = vars(config).items() if config is not None else ()
    return any(("dropout" in k or "pdrop" in k) and isinstance(v, float) and v > 0 for k, v in rates)


def data_parallel_wrapper(model: Any) -> bool:
    """Whether ``model`` is wrapped for data-parallel training (its forward syncs gradients)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return True
    name = type(model).__name__
    return "FullyShardedDataParallel" in name or name.startswith("FSDP") or "DeepSpeed" in name


def forced(model: Any, seqs: Sequence[Sequence[int]], first: Sequence[int], pad_id: int, *,
           hidden: bool = False, share: bool | None = None) -> Forced:
    """One teacher-forced pass over ``seqs``, keeping the logits that predict ``seqs[i][first[i]:]``.

    Runs under whatever grad mode the caller chose (training calls it with grad, scoring under
    ``torch.no_grad``). ``first[i]`` must be at least 1 (token 0 has no prediction). Where the
    kept span starts at position 0 nothing is saved, and the model projects every position.

    The tokens every row opens with (up to the first kept prediction) are encoded once and their
    KV cache repeated for the rows (:func:`shared_prefix`): the same numbers up to float rounding,
    with gradients flowing back through the repeat into that one encoding. Not when the hidden
    states are asked for (they would lack the shared positions) or the pass draws dropout noise.
    ``share`` (default: yes, except when recording gradients through a data-parallel wrapper --
    DDP, FSDP, DeepSpeed -- which expects one forward per backward: a second one would hang the
    ranks. A bare model under a process group, e.g. a sharded scoring stage, still shares, so its
    ranks compute exactly what one process computes)."""
    if not seqs:
        raise ValueError("no rows")
    for s, f in zip(seqs, first):
        if not 1 <= f <= len(s):
            raise ValueError(f"first index {f} outside 1..{len(s)}")
    device = device_of(model)
    lo = min(first) - 1
    hi = max(len(s) for s in seqs) - 1
    if share is None:
        share = not (torch.is_grad_enabled() and data_parallel_wrapper(model))
    n_shared = 0 if hidden or not share or len(seqs) < 2 else shared_prefix(seqs, lo)
    if n_shared >= MIN_SHARED_PREFIX and not _stochastic(model):
        return _forced_after_prefix(model, seqs, first, pad_id, n_shared, lo, hi)
    ids, mask = pad_batch(seqs, pad_id, "right", device)
    pos = torch.arange(ids.shape[1], device=device).expand_as(ids)
    keep: int | torch.Tensor = 0 if lo == 0 else torch.arange(lo, hi, device=device)
    out, sliced = _call(model, keep, input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                        output_hidden_states=hidden)
    logits = out.logits if sliced and lo else out.logits[:, lo:hi]
    return Forced(logits, lo, list(first), [len(s) for s in seqs], out.hidden_states if hidden else None)


def _forced_after_prefix(model: Any, seqs: Sequence[Sequence[int]], first: Sequence[int], pad_id: int,
                         n_shared: int, lo: int, hi: int) -> Forced:
    """:func:`forced` for rows opening with the same ``n_shared`` tokens (``n_shared <= lo``):
    that opening in one row, its cache repeated for every row, the rest right-padded after it."""
    device = device_of(model)
    head = torch.tensor([list(seqs[0][:n_shared])], dtype=torch.long, device=device)
    ones = torch.ones_like(head)
    pre, _ = _call(model, 1, input_ids=head, attention_mask=ones,
                   position_ids=torch.arange(n_shared, device=device)[None], use_cache=True)
    past = _repeat_rows(pre.past_key_values, len(seqs))
    ids, rest_mask = pad_batch([list(s[n_shared:]) for s in seqs], pad_id, "right", device)
    mask = torch.cat([ones.expand(len(seqs), n_shared).to(rest_mask.dtype), rest_mask], dim=1)
    pos = (n_shared + torch.arange(ids.shape[1], device=device)).expand_as(ids)
    keep = torch.arange(lo - n_shared, hi - n_shared, device=device)
    out, sliced = _call(model, keep, input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=past,
                        use_cache=True)
    logits = out.logits if sliced else out.logits[:, lo - n_shared:hi - n_shared]
    return Forced(logits, lo, list(first), [len(s) for s in seqs])


def _row_chunks(seqs: Sequence[Sequence[int]], first: Sequence[int], vocab: int,
                max_elements: int | None) -> Iterator[slice]:
    """Consecutive row ranges whose kept logits stay under ``max_elements`` (at least one row)."""
    if not max_elements:
        yield slice(0, len(seqs))
        return
    start = 0
    while start < len(seqs):
        end, lo, hi = start + 1, first[start] - 1, len(seqs[start]) - 1
        while end < len(seqs):
            lo2, hi2 = min(lo, first[end] - 1), max(hi, len(seqs[end]) - 1)
            if (end + 1 - start) * (hi2 - lo2) * vocab > max_elements:
                break
            lo, hi, end = lo2, hi2, end + 1
        yield slice(start, end)
        start = end


def forced_rows(model: Any, seqs: Sequence[Sequence[int]], first: Sequence[int], pad_id: int, *,
                max_logit_elements: int | None = DEFAULT_MAX_LOGIT_ELEMENTS) -> list[torch.Tensor]:
    """Per row, the logits ``[n_i, V]`` predicting ``seqs[i][first[i]:]``, computed in row chunks
    of at most ``max_logit_elements`` logits (for scoring; training calls :func:`forced`)."""
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 1)
    out: list[torch.Tensor] = []
    for sl in _row_chunks(seqs, first, vocab, max_logit_elements):
        out.extend(forced(model, seqs[sl], first[sl], pad_id).rows())
    return out


def completion_logits(model: Any, rows: Sequence[Aligned], pad_id: int, *,
                      max_logit_elements: int | None = DEFAULT_MAX_LOGIT_ELEMENTS) -> list[torch.Tensor]:
    """Per aligned row, the logits ``[n_completion, V]`` that predict its completion tokens."""
    return forced_rows(model, [r.input_ids for r in rows], [r.n_prompt for r in rows], pad_id,
                       max_logit_elements=max_logit_elements)


@torch.no_grad()
def completion_scores(model: Any, rows: Sequence[Aligned], pad_id: int, batch_size: int = 32
                      ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per row: (log-prob of each completion token, the argmax at each completion position),
    float32 on the CPU. Argmax ties go to the lowest token id."""
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    for b in range(0, len(rows), max(1, batch_size)):
        chunk = rows[b:b + batch_size]
        for r, lg in zip(chunk, completion_logits(model, chunk, pad_id)):
            lg = lg.float()
            logp = torch.log_softmax(lg, dim=-1)
            tgt = torch.tensor(r.completion_ids, device=logp.device)
            out.append((logp.gather(1, tgt[:, None])[:, 0].cpu(), lg.argmax(-1).cpu()))
    return out


# ---------------------------------------------------------------------------------- sampling


@dataclass
class SamplingConfig:
    """Greedy when ``temperature`` is 0; otherwise temperature + nucleus (top-p) sampling."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise SubliminalError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SubliminalError(f"--top-p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def row_rng(stream: str, seed: int, index: Any) -> random.Random:
    """The sampling stream of one row: a function of a stage's stream name, the seed and the
    row's identity only, never of the batch it runs in."""
    return random.Random(f"{stream}:{seed}:{index}")


# Candidates a sampled step reads before it falls back to sorting the whole vocabulary. A full
# stable sort of [32, 49k] probabilities costs ~60 ms a step on two CPU cores, as much as the
# decoding step itself. On SmolLM2 the top 256 answer 93% of T=1 draws exactly (64: 81%).
SAMPLE_CANDIDATES = 256


def pick_tokens(logits: torch.Tensor, cfg: SamplingConfig, uniforms: Sequence[float] | None) -> torch.Tensor:
    """Next token per row from ``logits`` [B, V]: argmax (lowest id on ties) when greedy, else
    inverse-CDF sampling of the temperature/top-p distribution with one uniform per row.

    The CDF runs over the tokens in descending probability (ties: lowest id first), so a uniform
    names the same token whatever the batch. Without top-p, each row is first tried on its
    ``SAMPLE_CANDIDATES`` most likely tokens on the CPU, which gives :func:`_pick_sorted`'s token
    exactly whenever the uniform lands inside their mass; the other rows take the full sort."""
    logits = logits.float()
    if cfg.greedy:
        return logits.argmax(-1)
    probs = torch.softmax(logits / cfg.temperature, -1)
    u = torch.tensor(uniforms, dtype=probs.dtype, device=probs.device)
    # the candidates are exact only where cumsum adds left to right (the CPU); CUDA scans in parallel
    if cfg.top_p < 1 or probs.device.type != "cpu":
        return _pick_sorted(probs, u, cfg.top_p)
    picked, exact = _pick_candidates(probs, u, SAMPLE_CANDIDATES)
    if not bool(exact.all()):
        rest = ~exact
        picked[rest] = _pick_sorted(probs[rest], u[rest], 1.0)
    return picked


def _pick_sorted(probs: torch.Tensor, u: torch.Tensor, top_p: float) -> torch.Tensor:
    """The reference sampler: sort the whole vocabulary (stable, descending), walk the CDF to
    ``u`` times the mass (the nucleus's mass under top-p, else the row's total)."""
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
    cum = sorted_p.cumsum(-1)
    if top_p < 1:
        keep = (cum - sorted_p) < top_p  # the smallest prefix whose mass reaches top_p
        sorted_p = sorted_p * keep
        cum = sorted_p.cumsum(-1)
        total = cum[:, -1]
    else:
        total = _mass(probs)
    idx = torch.searchsorted(cum, (u * total)[:, None], right=True).clamp(max=cum.shape[-1] - 1)
    # never land on a zero-probability tail entry (float rounding at the top of the CDF)
    idx = torch.minimum(idx, (sorted_p > 0).sum(-1, keepdim=True) - 1)
    return order.gather(-1, idx)[:, 0]


def _mass(probs: torch.Tensor) -> torch.Tensor:
    """Each row's total probability as the sorted CDF's last entry gives it (a float64 sum rounded
    to the row's dtype), computed without the sort. It scales the uniform, and in a 49k-token
    tail the CDF's float32 steps are finer than one ulp of the total: a total one ulp off moves
    a tail draw (u > ~0.997) to another token."""
    return probs.sum(-1, dtype=torch.float64).to(probs.dtype)


def _pick_candidates(probs: torch.Tensor, u: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_pick_sorted` (no top-p) on each row's ``k`` most likely tokens, and per row whether
    that is provably its answer: the candidates are the first ``k`` of the full stable sort (no
    tie crosses the k-th value, or every nonzero probability is among them), and the uniform
    lands inside their mass. Their cumulative sums are then the full sort's first ``k`` (the CPU
    cumsum adds left to right, so a prefix's sums do not depend on what follows), and the same
    token comes out."""
    n_vocab = probs.shape[-1]
    k = min(k, n_vocab)
    vals, ids = probs.topk(k, dim=-1, sorted=True)
    ids, by_id = ids.sort(dim=-1)  # the full sort puts equal probabilities in id order
    sorted_p, pos = vals.gather(-1, by_id).sort(dim=-1, descending=True, stable=True)
    order = ids.gather(-1, pos)
    cum = sorted_p.cumsum(-1)
    x = u * _mass(probs)
    last = sorted_p[:, -1]
    whole = (last == 0) | (k == n_vocab)  # nothing the sampler can reach lies outside
    clean_edge = (probs >= last[:, None]).sum(-1) == k
    exact = whole | (clean_edge & (x < cum[:, -1]))
    idx = torch.searchsorted(cum, x[:, None], right=True).clamp(max=k - 1)
    idx = torch.minimum(idx, (sorted_p > 0).sum(-1, keepdim=True) - 1)
    return order.gather(-1, idx)[:, 0], exact


# (row index in the batch, tokens it has written so far) -> the ids it may write next
Constraint = Callable[[int, Sequence[int]], Sequence[int]]


def _constrained(logits: torch.Tensor, allowed: Sequence[Sequence[int] | None]) -> torch.Tensor:
    """``logits`` with every id outside a row's allowed set at -inf (None: the row is free)."""
    keep = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
    for i, ids in enumerate(allowed):
        if ids is None:
            keep[i] = True
        else:
            keep[i, torch.tensor(list(ids), dtype=torch.long, device=logits.device)] = True
    return logits.masked_fill(~keep, float("-inf"))


def _last_logits(model: Any, **inputs: Any) -> Any:
    """One decoding step computing only the last position's logits where the model supports it."""
    try:
        return model(**inputs, logits_to_keep=1)
    except TypeError as e:
        if "logits_to_keep" not in str(e):
            raise
        return model(**inputs)


def encode_prompts(model: Any, seqs: Sequence[Sequence[int]], pad_id: int
                   ) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """Encode a batch of prompts for decoding: their KV cache, each prompt's last logits ``[B, V]``
    and the cache's attention mask ``[B, W]``; the next token of row ``i`` is at position
    ``len(seqs[i])``. The tokens every prompt opens with (a chat template's system turn) are
    encoded once and their cache repeated; the rest of each prompt follows, left-padded, so the
    padding sits between the opening and the rest (the mask and explicit positions skip it)."""
    device = device_of(model)
    n_shared = shared_prefix(seqs, min(len(s) for s in seqs) - 1) if len(seqs) > 1 else 0
    if n_shared < MIN_SHARED_PREFIX or _stochastic(model):
        ids, mask = pad_batch(seqs, pad_id, "left", device)
        out = _last_logits(model, input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=True)
        return out.past_key_values, out.logits[:, -1], mask
    head = torch.tensor([list(seqs[0][:n_shared])], dtype=torch.long, device=device)
    pre = _last_logits(model, input_ids=head, attention_mask=torch.ones_like(head),
                       position_ids=torch.arange(n_shared, device=device)[None], use_cache=True)
    past = _repeat_rows(pre.past_key_values, len(seqs))
    ids, rest_mask = pad_batch([list(s[n_shared:]) for s in seqs], pad_id, "left", device)
    mask = torch.cat([torch.ones((len(seqs), n_shared), dtype=rest_mask.dtype, device=device), rest_mask], dim=1)
    out = _last_logits(model, input_ids=ids, attention_mask=mask, position_ids=n_shared + position_ids(rest_mask),
                       past_key_values=past, use_cache=True)
    return out.past_key_values, out.logits[:, -1], mask


@torch.no_grad()
def sample(model: Any, seqs: Sequence[Sequence[int]], *, pad_id: int, stop_ids: set[int], max_new: Sequence[int],
           cfg: SamplingConfig, rngs: Sequence[random.Random] | None = None,
           constraint: Constraint | None = None, repeat: int = 1) -> list[tuple[list[int], bool]]:
    """Continue every prompt in ``seqs`` (token ids) with a KV cache over a left-padded batch.

    Returns per row the new tokens (up to and including a stop token) and whether it stopped on
    one (False: the row ran out of its ``max_new`` budget). Sampling needs one generator per row.
    ``constraint(row, new_tokens)`` (e.g. :class:`subliminal.constrain.NumberListConstraint`)
    names the ids a row may write next; the others are masked before argmax or sampling, so
    the choice among the allowed ids is still the model's.

    ``repeat`` > 1 continues every prompt ``repeat`` times (rows ``i * repeat + k``: ``max_new``,
    ``rngs`` and the constraint's row index count these rows) from one encoding of the prompt:
    its KV cache is copied for the repeats after the first pass, so sampled answers to one
    question do not each pay for the question."""
    if not seqs:
        return []
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    n = len(seqs) * repeat
    if len(max_new) != n:
        raise ValueError(f"max_new has {len(max_new)} entries for {n} rows")
    if not cfg.greedy and (rngs is None or len(rngs) != n):
        raise ValueError("sampling needs one random.Random per row")
    device = device_of(model)
    out: list[list[int]] = [[] for _ in range(n)]
    done = [m <= 0 for m in max_new]
    stopped = [False] * n
    if all(done):
        return list(zip(out, stopped))
    past, logits, mask = encode_prompts(model, seqs, pad_id)
    step_pos = torch.tensor([[len(s) - 1] for s in seqs], dtype=torch.long, device=device)
    if repeat > 1:  # the prompts were encoded once; now one row per continuation
        past = _repeat_rows(past, repeat)
        logits = logits.repeat_interleave(repeat, dim=0)
        mask = mask.repeat_interleave(repeat, dim=0)
        step_pos = step_pos.repeat_interleave(repeat, dim=0)
    step_ids = None  # the tokens just chosen, fed at the next step
    for step in range(max(max_new)):
        if all(done):
            break
        if step:
            res = _last_logits(model, input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                               past_key_values=past, use_cache=True)
            past = res.past_key_values
            logits = res.logits[:, -1, :]
        uniforms = None if cfg.greedy else [(r.random() if not d else 0.0) for r, d in zip(rngs, done)]
        if constraint is not None:
            logits = _constrained(logits, [None if d else constraint(i, out[i]) for i, d in enumerate(done)])
        nxt = pick_tokens(logits, cfg, uniforms)
        for i, t in enumerate(nxt.tolist()):
            if done[i]:
                continue
            out[i].append(t)
            if t in stop_ids:
                done[i], stopped[i] = True, True
            elif len(out[i]) >= max_new[i]:
                done[i] = True
        step_ids = nxt[:, None]  # finished rows keep decoding; their tokens are ignored
        mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=device)], dim=1)
        step_pos = step_pos + 1
    return list(zip(out, stopped))


def sample_batched(model: Any, seqs: Sequence[Sequence[int]], *, batch_size: int, pad_id: int, stop_ids: set[int],
                   max_new: Sequence[int], cfg: SamplingConfig, rngs: Sequence[random.Random] | None = None,
                   constraint: Constraint | None = None) -> list[tuple[list[int], bool]]:
    """:func:`sample` over consecutive batches of ``batch_size`` rows (same result for any size);
    ``constraint`` is called with the row's index in ``seqs``."""
    out: list[tuple[list[int], bool]] = []
    for b in range(0, len(seqs), max(1, batch_size)):
        sl = slice(b, b + batch_size)
        shifted = None if constraint is None else (lambda i, new, b=b: constraint(b + i, new))
        out.extend(sample(model, seqs[sl], pad_id=pad_id, stop_ids=stop_ids, max_new=max_new[sl], cfg=cfg,
                          rngs=None if rngs is None else rngs[sl], constraint=shifted))
    return out


def sample_repeated(model: Any, seqs: Sequence[Sequence[int]], repeat: int, *, batch_size: int, pad_id: int,
                    stop_ids: set[int], max_new: int, cfg: SamplingConfig,
                    rngs: Sequence[random.Random] | None = None) -> list[tuple[list[int], bool]]:
    """``repeat`` continuations of every prompt (rows ``i * repeat + k``, each with its own
    generator), each prompt encoded once (:func:`sample` with ``repeat``); batches hold as many
    whole prompts as fit in ``batch_size`` rows (at least one). Every row's tokens depend only on
    its prompt and its generator, so the result does not depend on ``batch_size``."""
    per = max(1, batch_size // max(1, repeat))
    out: list[tuple[list[int], bool]] = []
    for b in range(0, len(seqs), per):
        rows = slice(b * repeat, (b + per) * repeat)
        chunk = seqs[b:b + per]
        out.extend(sample(model, chunk, pad_id=pad_id, stop_ids=stop_ids, max_new=[max_new] * (len(chunk) * repeat),
                          cfg=cfg, rngs=None if rngs is None else rngs[rows], repeat=repeat))
    return out


# ------------------------------------------------------------------ shared-prefix scoring (KV cache)
#
# Exact preference scores every candidate answer after the same question: the prompt is ~95% of
# the tokens. Here each distinct prompt is encoded once, in left-padded batches of prompts; the
# rows of that cache are gathered for a batch of continuations (each row its own prompt's), which
# run right-padded with explicit positions after their prompt. Batching across prompts matters
# on a CPU: a forward over a handful of tokens costs about as much as reading the weights once.
# The numbers equal teacher forcing of the whole rows (up to float rounding of the split attention).


def _repeat_rows(past: Any, n: int) -> Any:
    """A KV cache with every row repeated ``n`` times in place (row ``i`` becomes rows
    ``i * n .. i * n + n - 1``): a ``transformers`` cache object, or the legacy tuple of
    per-layer (key, value) tensors some architectures still return."""
    if hasattr(past, "batch_repeat_interleave"):
        past.batch_repeat_interleave(n)
        return past
    return tuple(tuple(t.repeat_interleave(n, dim=0) for t in layer) for layer in past)


def _select_rows(past: Any, index: torch.Tensor) -> Any:
    """A new KV cache whose row ``j`` is row ``index[j]`` of ``past`` (rows may repeat); ``past``
    is left untouched, since a forward pass appends to the cache it is given. The layers are
    copied shallowly (their tensors are replaced by the gathered ones, never written into)."""
    import copy

    if isinstance(past, tuple):
        return tuple(tuple(t[index] for t in layer) for layer in past)
    layers = getattr(past, "layers", None)
    if isinstance(layers, list):
        cache = copy.copy(past)
        cache.layers = [copy.copy(layer) for layer in layers]
    else:
        cache = copy.deepcopy(past)
    cache.batch_select_indices(index)
    return cache


def _continuation_logits(model: Any, past: Any, pmask: torch.Tensor, owner: Sequence[int],
                         conts: Sequence[Sequence[int]], pad_id: int, last: torch.Tensor) -> list[torch.Tensor]:
    """Per continuation ``c`` (after prompt ``owner[k]`` of the cache), the logits ``[len(c), V]``
    predicting its tokens after the prompt."""
    device = device_of(model)
    out: list[torch.Tensor] = [last[o][None] for o in owner]
    longer = [k for k, c in enumerate(conts) if len(c) > 1]
    if not longer:
        return out
    # the last token of each continuation predicts nothing we keep, so it is not fed
    feed = [list(conts[k][:-1]) for k in longer]
    rows = torch.tensor([owner[k] for k in longer], dtype=torch.long, device=device)
    ids, cmask = pad_batch(feed, pad_id, "right", device)
    prompt_mask = pmask[rows]
    mask = torch.cat([prompt_mask, cmask.to(prompt_mask.dtype)], dim=1)
    pos = prompt_mask.sum(1, keepdim=True) + torch.arange(ids.shape[1], device=device)[None]
    res = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=_select_rows(past, rows),
                use_cache=True)
    for j, k in enumerate(longer):
        out[k] = torch.cat([last[owner[k]][None], res.logits[j, : len(feed[j])]], dim=0)
    return out


@torch.no_grad()
def prefix_cached_scores(model: Any, rows: Sequence[Aligned], pad_id: int, batch_size: int = 32
                         ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """What :func:`completion_scores` returns (per row: log-prob of each completion token, argmax
    at each completion position, float32 on the CPU), computed by encoding each distinct prompt
    once (``batch_size`` prompts per pass) and scoring the completions that follow them from that
    cache, ``batch_size`` completions per pass. Rows keep their order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, r in enumerate(rows):
        if r.n_prompt < 1 or not r.completion_ids:
            raise ValueError(f"row {r.id!r}: needs at least one prompt and one completion token")
        groups.setdefault(tuple(r.prompt_ids), []).append(i)
    prompts = list(groups)
    size = max(1, batch_size)
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(rows)
    for b in range(0, len(prompts), size):
        block = prompts[b:b + size]
        past, last, pmask = encode_prompts(model, block, pad_id)
        members = [(p, i) for p, prompt in enumerate(block) for i in groups[prompt]]
        for c in range(0, len(members), size):
            chunk = members[c:c + size]
            conts = [rows[i].completion_ids for _, i in chunk]
            logits = _continuation_logits(model, past, pmask, [p for p, _ in chunk], conts, pad_id, last)
            for (_, i), cont, lg in zip(chunk, conts, logits):
                lg = lg.float()
                logp = torch.log_softmax(lg, dim=-1)
                tgt = torch.tensor(cont, device=logp.device)
                out[i] = (logp.gather(1, tgt[:, None])[:, 0].cpu(), lg.argmax(-1).cpu())
    return out  # type: ignore[return-value]
