"""The one teacher-forcing path and the one sampler: batch invariance on several architectures,
agreement with plain one-row forward passes and HF decoding, token choice, fallbacks."""

from __future__ import annotations

import random

import pytest
import torch

from subliminal import forward as fw
from subliminal.data import Aligned, encode, render_chat
from subliminal.manifest import SubliminalError
from subliminal.prompts import system_prompt_for

ARCHS = ["llama", "qwen2", "gpt2", "gpt_neox"]


def _model(factory, arch):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(factory(arch)).eval()


def _rows(n: int, seed: int, vocab: int = 300) -> list[Aligned]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p = [rng.randrange(5, vocab) for _ in range(rng.randrange(2, 14))]
        c = [rng.randrange(5, vocab) for _ in range(rng.randrange(1, 9))]
        out.append(Aligned(f"r{i}", p, c))
    return out


# ------------------------------------------------------------------------- teacher forcing


@pytest.mark.parametrize("arch", ARCHS)
def test_completion_logits_do_not_depend_on_the_batch(tiny_model_factory, arch):
    """A row scored alone, or padded among longer and shorter rows, gives the same logits, and both
    equal a plain unpadded forward pass of the row."""
    model = _model(tiny_model_factory, arch)
    rows = _rows(7, 1)
    assert len({len(r.input_ids) for r in rows}) > 2 and len({r.n_prompt for r in rows}) > 2
    with torch.no_grad():
        batched = fw.completion_logits(model, rows, pad_id=0)
        for r, lg in zip(rows, batched):
            alone = fw.completion_logits(model, [r], pad_id=0)[0]
            plain = model(torch.tensor([r.input_ids])).logits[0, r.n_prompt - 1: -1]
            assert lg.shape == (len(r.completion_ids), model.config.vocab_size)
            assert torch.allclose(lg, alone, atol=1e-5) and torch.allclose(lg, plain, atol=1e-5)
            assert torch.equal(lg.argmax(-1), plain.argmax(-1))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_scores_are_the_same_for_every_batch_size(tiny_model_factory, arch):
    model = _model(tiny_model_factory, arch)
    rows = _rows(9, 2)
    one = fw.completion_scores(model, rows, pad_id=0, batch_size=1)
    four = fw.completion_scores(model, rows, pad_id=0, batch_size=4)
    for (lp1, am1), (lp4, am4) in zip(one, four):
        assert torch.allclose(lp1, lp4, atol=1e-5) and torch.equal(am1, am4)
        assert lp1.dtype == torch.float32 and (lp1 <= 0).all()


def _opening_rows(seed: int, vocab: int = 300) -> tuple[list[list[int]], list[int]]:
    """Rows that open with the same 9 tokens (a system turn), then differ in length and content."""
    rng = random.Random(seed)
    head = [rng.randrange(5, vocab) for _ in range(9)]
    seqs = [head + [rng.randrange(5, vocab) for _ in range(rng.randrange(3, 15))] for _ in range(6)]
    return seqs, [rng.randrange(11, len(s) + 1) for s in seqs]


@pytest.mark.parametrize("arch", ARCHS)
def test_a_shared_opening_encoded_once_gives_the_logits_and_gradients_of_whole_rows(tiny_model_factory, arch,
                                                                                     monkeypatch):
    """Rows opening with the same tokens are encoded from one cache of that opening: the kept
    logits equal the whole-row pass (float32, 1e-5), and so does every parameter's gradient of a
    loss on them, the opening's share summed back over the rows."""
    model = _model(tiny_model_factory, arch).float()  # eval mode: gpt2's dropout would make both passes random
    seqs, first = _opening_rows(2)
    assert fw.shared_prefix(seqs, min(first) - 1) == 9

    def run(share: bool):
        monkeypatch.setattr(fw, "MIN_SHARED_PREFIX", 4 if share else 10**9)
        model.zero_grad()
        out = fw.forced(model, seqs, first, pad_id=0, share=True)
        rows = out.rows()
        loss = sum((r.float().log_softmax(-1)[:, 5] * torch.linspace(0.5, 1.5, len(r))[:, None]).sum() for r in rows)
        loss.backward()
        return [r.detach().clone() for r in rows], {n: q.grad.clone() for n, q in model.named_parameters()
                                                  if q.grad is not None}

    shared_rows, shared_grads = run(True)
    whole_rows, whole_grads = run(False)
    for a, b in zip(shared_rows, whole_rows):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
    assert shared_grads.keys() == whole_grads.keys() and shared_grads
    for n in whole_grads:
        assert torch.allclose(shared_grads[n], whole_grads[n], atol=1e-5, rtol=1e-4), n


def test_a_shared_opening_is_not_shared_under_dropout_or_for_hidden_states(tiny_model_factory, monkeypatch):
    """Dropout in training mode (modules, or attention dropout named only in the config) would
    give every row the same noise over the opening, and the hidden states would lack it: both
    take the whole-row pass; an eval-mode pass without hidden states shares it."""
    seqs, first = _opening_rows(3)

    def shared(*a, **k):
        raise AssertionError("shared")

    monkeypatch.setattr(fw, "_forced_after_prefix", shared)
    gpt2 = _model(tiny_model_factory, "gpt2").train()
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in gpt2.modules())
    fw.forced(gpt2, seqs, first, pad_id=0, share=True)
    llama = _model(tiny_model_factory, "llama").train()
    llama.config.attention_dropout = 0.1
    fw.forced(llama, seqs, first, pad_id=0, share=True)
    llama.eval()
    out = fw.forced(llama, seqs, first, pad_id=0, hidden=True, share=True)
    assert out.hidden is not None and out.hidden[0].shape[1] == max(len(s) for s in seqs)
    with pytest.raises(AssertionError, match="shared"):
        fw.forced(llama, seqs, first, pad_id=0)


def test_row_chunks_bound_the_logits_and_keep_every_row(tiny_model_factory):
    model = _model(tiny_model_factory, "llama")
    rows = _rows(6, 3)
    seqs, first = [r.input_ids for r in rows], [r.n_prompt for r in rows]
    vocab = model.config.vocab_size
    budget = 2 * 10 * vocab
    chunks = list(fw._row_chunks(seqs, first, vocab, budget))
    assert [i for sl in chunks for i in range(sl.start, sl.stop)] == list(range(6))
    for sl in chunks:
        span = max(len(s) for s in seqs[sl]) - 1 - (min(first[sl]) - 1)
        assert sl.stop - sl.start == 1 or (sl.stop - sl.start) * span * vocab <= budget
    with torch.no_grad():
        small = fw.forced_rows(model, seqs, first, 0, max_logit_elements=budget)
        whole = fw.forced_rows(model, seqs, first, 0, max_logit_elements=None)
    assert len(chunks) > 1 and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(small, whole))


def test_forced_gives_hidden_states_and_columns(tiny_model_factory):
    model = _model(tiny_model_factory, "qwen2")
    rows = _rows(3, 4)
    out = fw.forced(model, [r.input_ids for r in rows], [r.n_prompt for r in rows], 0, hidden=True)
    assert len(out.hidden) == model.config.num_hidden_layers + 1
    for i, r in enumerate(rows):
        assert out.row(i).shape[0] == len(r.completion_ids)
        assert out.column(r.n_prompt) == r.n_prompt - 1 - out.start
    with pytest.raises(ValueError):
        fw.forced(model, [[1, 2, 3]], [0], 0)


def test_models_without_logits_to_keep_are_sliced(tiny_model_factory):
    inner = _model(tiny_model_factory, "llama")

    class NoKeep(torch.nn.Module):  # a forward signature without logits_to_keep (like some remote code)
        def __init__(self):
            super().__init__()
            self.inner = inner
            self.config = inner.config

        def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False,
                    output_hidden_states=False):
            return inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    rows = _rows(4, 5)
    with torch.no_grad():
        a = fw.completion_logits(NoKeep(), rows, 0)
        b = fw.completion_logits(inner, rows, 0)
    assert all(x.shape == y.shape and torch.allclose(x, y, atol=1e-6) for x, y in zip(a, b))


# ---------------------------------------------------------------------------------- sampling


def test_pick_tokens_greedy_ties_to_lowest_id():
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0], [5.0, 5.0, 5.0, 5.0]])
    assert fw.pick_tokens(logits, fw.SamplingConfig(0.0), None).tolist() == [1, 0]


def test_pick_tokens_inverse_cdf_and_top_p():
    probs = torch.tensor([[0.1, 0.6, 0.3]])
    logits = probs.log()
    cfg = fw.SamplingConfig(1.0, 1.0)
    # descending order: id1 (0.6), id2 (0.3), id0 (0.1); cumulative 0.6, 0.9, 1.0
    assert fw.pick_tokens(logits, cfg, [0.5]).tolist() == [1]
    assert fw.pick_tokens(logits, cfg, [0.7]).tolist() == [2]
    assert fw.pick_tokens(logits, cfg, [0.95]).tolist() == [0]
    nucleus = fw.SamplingConfig(1.0, 0.5)  # only id1 survives
    assert fw.pick_tokens(logits, nucleus, [0.99]).tolist() == [1]
    top2 = fw.SamplingConfig(1.0, 0.8)  # id1 + id2, renormalised: id2 when u*0.9 >= 0.6
    assert fw.pick_tokens(logits, top2, [0.7]).tolist() == [2]
    assert fw.pick_tokens(logits, top2, [0.99]).tolist() == [2]


def _sampling_cases(vocab: int, seed: int) -> list[torch.Tensor]:
    """Logit rows the candidate fast path must get right: peaked and flat rows, ties everywhere
    (integer logits), a number-list constraint (-inf outside a few ids), half precision."""
    g = torch.Generator().manual_seed(seed)
    peaked = torch.randn(6, vocab, generator=g) * 4
    flat = torch.randn(6, vocab, generator=g) * 0.05  # the top candidates hold little mass: full sort
    ties = torch.randint(0, 4, (6, vocab), generator=g).float()  # ties across the last candidate's value
    masked = torch.full((6, vocab), float("-inf"))
    allowed = min(11, vocab - 1)
    masked[:, :allowed] = torch.randn(6, allowed, generator=g)
    masked[0, :allowed] = 1.0  # equal allowed ids
    half = (torch.randn(6, vocab, generator=g) * 3).to(torch.bfloat16)
    return [peaked, flat, ties, masked, half]


@pytest.mark.parametrize("vocab", [7, 64, 65, 1000])
@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.0])
def test_pick_tokens_candidates_equal_the_full_sort(vocab, temperature):
    """The sampler's top-candidates path picks exactly the token of the full stable sort, for
    every uniform, on rows that take the fast path and rows that fall back alike."""
    cfg = fw.SamplingConfig(temperature, 1.0)
    uniforms = [0.0, 1e-7, 0.25, 0.5, 0.9, 0.999, 1 - 1e-9]
    fast_rows = 0
    for logits in _sampling_cases(vocab, seed=vocab):
        probs = torch.softmax(logits.float() / temperature, -1)
        # the total that scales the uniform is the sorted CDF's last entry, without the sort
        assert torch.equal(fw._mass(probs), probs.sort(dim=-1, descending=True, stable=True)[0].cumsum(-1)[:, -1])
        for u0 in uniforms:
            u = [u0] * len(logits)
            want = fw._pick_sorted(probs, torch.tensor(u), 1.0)
            assert fw.pick_tokens(logits, cfg, u).tolist() == want.tolist()
            picked, exact = fw._pick_candidates(probs, torch.tensor(u), fw.SAMPLE_CANDIDATES)
            assert picked[exact].tolist() == want[exact].tolist()
            fast_rows += int(exact.sum())
    assert fast_rows > 0


def test_pick_tokens_candidates_fall_back_when_the_uniform_leaves_them():
    """A flat row whose top candidates hold a fraction of the mass: a uniform beyond them is
    answered by the full sort (a token outside the candidates), one inside by the candidates."""
    logits = torch.zeros(1, 1000)
    logits[0, 500] = 1.0  # the single most likely id, then 999 equal ones in id order
    probs = torch.softmax(logits, -1)
    _, exact = fw._pick_candidates(probs, torch.tensor([0.9]), fw.SAMPLE_CANDIDATES)
    assert not exact.any()  # 999 equal values cross the last candidate: the set is not the sort's
    cfg = fw.SamplingConfig(1.0, 1.0)
    assert fw.pick_tokens(logits, cfg, [0.0]).tolist() == [500]
    assert fw.pick_tokens(logits, cfg, [0.9]).tolist() == fw._pick_sorted(probs, torch.tensor([0.9]), 1.0).tolist()
    assert fw.pick_tokens(logits, cfg, [0.9]).item() >= fw.SAMPLE_CANDIDATES  # deep in the tail, beyond them


@pytest.mark.parametrize("t,p", [(-1.0, 1.0), (1.0, 0.0), (1.0, 1.5)])
def test_sampling_config_rejects_bad_values(t, p):
    with pytest.raises(SubliminalError, match="--t"):
        fw.SamplingConfig(t, p)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_greedy_equals_unbatched_hf_generate(tiny_model_factory, arch):
    """Left padding + KV cache + position ids: the batched loop matches one-at-a-time HF decoding."""
    from subliminal.generate import make_prompts
    from subliminal.models import load_model

    lm = load_model(tiny_model_factory(arch))
    prompts = make_prompts(3, 1)
    seqs = [encode(lm.tokenizer, render_chat(lm.tokenizer, p, system_prompt_for("owl") if i else None))
            for i, (_, p) in enumerate(prompts)]
    assert len({len(s) for s in seqs}) > 1  # the batch really is padded
    outs = fw.sample(lm.model, seqs, pad_id=lm.tokenizer.pad_token_id, stop_ids=set(), max_new=[6, 6, 4],
                     cfg=fw.SamplingConfig(0.0))
    for s, (new, stopped), m in zip(seqs, outs, [6, 6, 4]):
        ref = lm.model.generate(torch.tensor([s]), attention_mask=torch.ones(1, len(s), dtype=torch.long),
                                max_new_tokens=m, do_sample=False, eos_token_id=None,
                                pad_token_id=lm.tokenizer.pad_token_id)[0, len(s):].tolist()
        assert new == ref and not stopped


@pytest.mark.parametrize("arch", ARCHS)
def test_sampled_text_is_the_same_for_every_batch_size(tiny_model_factory, arch):
    model = _model(tiny_model_factory, arch)
    seqs = [r.prompt_ids for r in _rows(7, 6)]
    cfg = fw.SamplingConfig(1.0, 0.9, seed=3)

    def run(bs):
        return fw.sample_batched(model, seqs, batch_size=bs, pad_id=0, stop_ids={7}, max_new=[5] * 7, cfg=cfg,
                                 rngs=[fw.row_rng("test", 3, i) for i in range(7)])

    one, three, seven = run(1), run(3), run(7)
    assert one == three == seven
    other = fw.sample_batched(model, seqs, batch_size=7, pad_id=0, stop_ids={7}, max_new=[5] * 7, cfg=cfg,
                              rngs=[fw.row_rng("test", 4, i) for i in range(7)])
    assert other != one  # the seed matters


@pytest.mark.parametrize("arch", ARCHS)
def test_repeated_prompts_encoded_once_sample_what_each_copy_would(tiny_model_factory, arch):
    """``repeat``: each prompt encoded once and its cache copied gives every continuation the
    tokens it gets when the prompt is written out once per row, for any batch size, sampled and
    greedy (with a budget that leaves some rows unstopped)."""
    model = _model(tiny_model_factory, arch)
    seqs = [r.prompt_ids for r in _rows(5, 8)]
    reps = 3
    flat = [s for s in seqs for _ in range(reps)]
    for cfg in (fw.SamplingConfig(1.0, 0.9, seed=5), fw.SamplingConfig(0.0)):
        rngs = [fw.row_rng("rep", 5, i) for i in range(len(flat))]
        ref = fw.sample_batched(model, flat, batch_size=len(flat), pad_id=0, stop_ids={7}, max_new=[6] * len(flat),
                                cfg=cfg, rngs=rngs if not cfg.greedy else None)
        for bs in (1, 4, 15):
            rngs = [fw.row_rng("rep", 5, i) for i in range(len(flat))]
            got = fw.sample_repeated(model, seqs, reps, batch_size=bs, pad_id=0, stop_ids={7}, max_new=6, cfg=cfg,
                                     rngs=rngs if not cfg.greedy else None)
            assert got == ref, (cfg, bs)
    assert len({tuple(t) for t, _ in ref[:reps]}) == 1  # greedy copies agree; sampled ones were compared above
    with pytest.raises(ValueError, match="max_new"):
        fw.sample(model, seqs[:2], pad_id=0, stop_ids=set(), max_new=[2, 2], cfg=fw.SamplingConfig(0.0), repeat=2)


@pytest.mark.parametrize("arch", ARCHS)
def test_prompts_with_a_shared_opening_decode_as_when_each_is_encoded_whole(tiny_model_factory, arch, monkeypatch):
    """The opening every prompt shares, encoded once with the padding after it, changes no token:
    greedy and sampled continuations equal those of whole left-padded prompts, and the scores
    from the prompts' cache still equal teacher forcing."""
    model = _model(tiny_model_factory, arch)
    seqs, _ = _opening_rows(4)

    def run(share: bool, cfg):
        monkeypatch.setattr(fw, "MIN_SHARED_PREFIX", 4 if share else 10**9)
        rs = None if cfg.greedy else [fw.row_rng("open", 1, i) for i in range(len(seqs))]
        return fw.sample(model, seqs, pad_id=0, stop_ids={7}, max_new=[6] * len(seqs), cfg=cfg, rngs=rs)

    for cfg in (fw.SamplingConfig(0.0), fw.SamplingConfig(1.0, 0.9, seed=1)):
        assert run(True, cfg) == run(False, cfg)
    rows = [Aligned(f"r{i}-{c}", s, [11 + c, 12 + i, 13]) for i, s in enumerate(seqs) for c in range(3)]
    monkeypatch.setattr(fw, "MIN_SHARED_PREFIX", 4)
    ref = fw.completion_scores(model, rows, pad_id=0)
    for (lp, am), (rlp, ram) in zip(fw.prefix_cached_scores(model, rows, pad_id=0, batch_size=8), ref):
        assert torch.allclose(lp, rlp, atol=1e-5, rtol=0) and torch.equal(am, ram)


def test_sampling_needs_one_generator_per_row(tiny_model_factory):
    model = _model(tiny_model_factory, "llama")
    with pytest.raises(ValueError, match="one random.Random per row"):
        fw.sample(model, [[2, 3], [4]], pad_id=0, stop_ids=set(), max_new=[2, 2], cfg=fw.SamplingConfig(1.0),
                  rngs=[random.Random(0)])


def test_step_falls_back_without_logits_to_keep(tiny_model_factory):
    inner = _model(tiny_model_factory, "llama")

    class NoKeep(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=True):
            return inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, use_cache=use_cache)

    seqs = [[2, 15, 16, 17], [2, 18, 19]]
    kw = dict(pad_id=0, stop_ids=set(), max_new=[4, 4], cfg=fw.SamplingConfig(0.0))
    assert fw.sample(NoKeep(), seqs, **kw) == fw.sample(inner, seqs, **kw)


# ------------------------------------------------------------------ shared-prefix scoring


def _shared_prefix_rows(seed: int, vocab: int = 300) -> list[Aligned]:
    """Three prompts, each followed by several completions of different lengths (one token too)."""
    rng = random.Random(seed)
    rows = []
    for q in range(3):
        p = [rng.randrange(5, vocab) for _ in range(rng.randrange(3, 20))]
        for c in range(6):
            rows.append(Aligned(f"q{q}-{c}", p, [rng.randrange(5, vocab) for _ in range(1 + (c * 3) % 5)]))
    rng.shuffle(rows)  # groups need not be contiguous
    return rows


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_cached_scores_equal_teacher_forcing(tiny_model_factory, arch):
    """Encoding each prompt once and scoring completions from its KV cache gives the scores of
    whole-row teacher forcing (within 1e-5) and the same argmax, for any batch size."""
    model = _model(tiny_model_factory, arch)
    rows = _shared_prefix_rows(1)
    ref = fw.completion_scores(model, rows, pad_id=0, batch_size=7)
    for bs in (1, 4, 32):
        got = fw.prefix_cached_scores(model, rows, pad_id=0, batch_size=bs)
        assert len(got) == len(ref)
        for (lp, am), (rlp, ram) in zip(got, ref):
            assert lp.shape == rlp.shape
            assert torch.allclose(lp, rlp, atol=1e-5, rtol=0)
            assert torch.equal(am, ram)


def test_prefix_cached_scores_leave_the_prompt_cache_intact(tiny_model_factory):
    """A group larger than the batch reuses the prompt's cache: later batches must not see the
    earlier batches' tokens (the cache is copied per batch)."""
    model = _model(tiny_model_factory, "llama")
    p = list(range(10, 20))
    rows = [Aligned(f"c{i}", p, [30 + i, 40 + i, 50 + i]) for i in range(5)]
    ref = fw.completion_scores(model, rows, pad_id=0)
    got = fw.prefix_cached_scores(model, rows, pad_id=0, batch_size=2)
    for (lp, _), (rlp, _) in zip(got, ref):
        assert torch.allclose(lp, rlp, atol=1e-5, rtol=0)
