"""Floating-point work, wall time and achieved FLOP/s of every pipeline stage, beside the machine's
own dense matmul rate measured in the same run (issue 28).

    python benchmarks/stage_efficiency.py MODEL_DIR [--stages a,b,...] [--rows N] [--questions Q]
        [--label before|after] [--json benchmarks/stage_efficiency.jsonl] [--out BENCHMARKS.md]
        [--threads N] [--random-7b]

Each stage calls the library's own public function for it, at the SmolLM2 CPU config's per-call
sizes (``subliminal/configs/smollm2-135m-cpu.toml``): generate (plain and ``constrain="numbers"``,
greedy and sampled; batch 32, 56 new tokens), find-divergence (``divergence.score_batch``, 16 rows
under 4 teachers), the token detectors of ``score-tokens`` on the same 16 rows (issue 26; below),
a distill step (``train.train`` for one step of ``distill.batch_loss``, full and LoRA r=8, 16 rows),
exact eval (``evaluate.exact_preference``, 50 questions x 13 animals), sampled eval
(``evaluate.sampled_preference``, 10 answers per question), probe capture
(``probes.activations.capture``, 64 rows, 6 layers) and one plain teacher-forced pass
(``forward.forced``, the reference the test checks against a closed-form count).

The detectors (:mod:`subliminal.detectors`, the functions ``score-tokens`` calls) score the 16 rows
find-divergence scores, as distill's hard student sees them (``distill.build_examples``, every
completion token), in one batch of 16 (``--batch-size 16``, find-divergence's batch; the CLI's default
8 would run them as two batches of 8), so their cost per row compares directly with find-divergence's:

- ``likelihood-shift``: ``detectors.likelihood_shift``, two teacher-forced passes (student, base).
  The base model serves as both student and base: the cost does not depend on the weights, and the
  call recorder, hooked on one model, sees both passes.
- ``gradient``: ``detectors.gradient_attribution`` by its default method (``jvp``: one forward with
  tangents through the student's own forward, math attention) over every weight (the CLI's default
  ``--params all``; the student built by ``diagnose.student_model``, as ``score-tokens`` builds it),
  along grad(R). ``gradient-central``: the same with ``method="central"`` (two plain forwards).
- ``gradient-readout``: grad(R), ``diagnose.readout_gradient`` (the exact preference readout for
  owl over 50 questions x 13 animals, forward and backward, one question's 13 candidate rows per
  forward as at the CLI's default batch), as its own stage: ``score-tokens`` computes it once per
  run and reuses it for every batch, so it is a fixed cost per run, not per row. The table of costs
  per row against find-divergence adds it shared over the rows of one run (320, the SmolLM2 CPU
  config's ``[data] rows``). The ``gradient`` stages take their direction from one untimed
  ``readout_gradient`` call on one question (its values do not change the cost).

How it measures, per stage:

- FLOP: ``torch.utils.flop_counter.FlopCounterMode`` around one run (so the count comes from the
  shapes the stage actually executed; CPU flash attention is counted with torch's SDPA formula).
  Wall time: a separate run without the counter, after one warm-up run.
- The model calls the stage made (batch, new tokens, cached tokens, projected positions, grad)
  are recorded by a hook. Replayed on a meta-device copy of the same config (forward; forward and
  backward for the calls with grad of the training stages and grad(R); a forward-mode AD pass for
  the calls of the ``gradient`` jvp) they give the FLOP of each call (checked against the counted
  total: ``replay_flop``) and, with ``--random-7b``, the stage's FLOP on a random 7B-shaped Llama
  config built on the meta device (no memory, no timing).
- Matmul reference: ``torch.matmul`` at the stage's dtype, [n, d_model] x [d_model, d_ff] and
  [n, d_model] x [d_model, vocab], best of a few repeats, n the tokens of each call (power-of-two
  buckets). The stage's reference rate is its FLOP over the time those FLOP take at the measured
  rate of each call's shape.
- Decoding (calls with one new token over a KV cache) is bound by memory traffic at small batch:
  each step reads every weight and the cache. The bound is those bytes over the bandwidth of a
  large tensor copy measured in the same run, plus the other calls' FLOP at the matmul rate.

Writes one JSON line per stage (``--json``; lines of the same label, model and stage are
replaced) and the table section between ``<!-- stage-efficiency:begin -->`` and
``<!-- stage-efficiency:end -->`` of ``--out``; with ``before`` and ``after`` lines for the same
model it writes both and the speedup, and where a label has find-divergence and a detector, their
wall time and FLOP per row side by side. ``--dry-run`` shrinks every size (for tests).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

BEGIN = "<!-- stage-efficiency:begin -->"
END = "<!-- stage-efficiency:end -->"
STAGES = ("forced", "generate-greedy", "generate-sampled", "generate-constrained-greedy",
          "generate-constrained-sampled", "find-divergence", "likelihood-shift", "gradient-readout", "gradient",
          "gradient-central", "distill-full", "distill-lora", "eval-exact", "eval-sampled", "probe-capture")
# the per-row detectors, compared with find-divergence's cost per row
DETECTORS = ("likelihood-shift", "gradient", "gradient-central")
A = torch.ops.aten
# CPU flash attention is not in torch's FLOP registry: count it as the other SDPA kernels are
SDPA_CPU = {
    A._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v),
    A._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda g, q, k, v, *a, out_shape=None, **kw: sdpa_backward_flop_count(g, q, k, v),
}
# a Llama-2-7B-shaped config for --random-7b
SEVEN_B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False)


@dataclass
class Sizes:
    """Per-call sizes of the SmolLM2 CPU config (smollm2-135m-cpu.toml)."""

    gen_rows: int = 32
    gen_batch: int = 32
    max_new: int = 56
    div_rows: int = 16
    teachers: int = 4  # owl, dog, eagle and the unbiased teacher
    train_rows: int = 16
    lora_rank: int = 8
    questions: int = 50
    samples: int = 10
    eval_batch: int = 32
    probe_rows: int = 64
    probe_batch: int = 16
    probe_layers: tuple[int, ...] = (0, 6, 12, 18, 24, 29)
    forced_rows: int = 16
    data_rows: int = 320  # [data] rows: one score-tokens run shares its grad(R) over them
    readout_target: str = "owl"  # [teachers] target: the gradient detector's readout


def flop_counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping=SDPA_CPU)


# ------------------------------------------------------------------------------- call recording


@dataclass(frozen=True)
class Call:
    """One forward call of the model: batch, new tokens, cached tokens, projected positions, grad."""

    batch: int
    new: int
    past: int
    keep: int
    grad: bool

    @property
    def tokens(self) -> int:
        return self.batch * self.new

    @property
    def decode(self) -> bool:
        return self.new == 1 and self.past > 0


def _past_len(kwargs: dict[str, Any], new: int) -> int:
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    if cache is None:
        return 0
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return int(mask.shape[1]) - new
    try:
        return int(cache.get_seq_length())
    except Exception:
        return 0


@contextlib.contextmanager
def record_calls(model: Any):
    """The :class:`Call` list of every forward of ``model``'s top causal-LM module."""
    calls: list[Call] = []
    top = _causal_lm(model)

    def hook(mod: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        b, t = int(ids.shape[0]), int(ids.shape[1])
        keep = kwargs.get("logits_to_keep", 0)
        if isinstance(keep, torch.Tensor):
            k = int(keep.numel())
        else:
            k = t if not keep else min(int(keep), t)
        calls.append(Call(b, t, _past_len(kwargs, t), k, torch.is_grad_enabled()))

    h = top.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        h.remove()


def _causal_lm(model: Any) -> Any:
    """The transformers ``*ForCausalLM`` module inside a (possibly peft-wrapped) model."""
    for m in model.modules():
        if type(m).__name__.endswith("ForCausalLM"):
            return m
    return model


def summarize_calls(calls: Sequence[Call]) -> list[list[int]]:
    """[batch, new, past, keep, grad, count] per distinct call, in first-seen order."""
    counts = Counter(calls)
    seen: dict[Call, None] = dict.fromkeys(calls)
    return [[c.batch, c.new, c.past, c.keep, int(c.grad), counts[c]] for c in seen]


# ------------------------------------------------------------------------ meta-device replay


class Replayer:
    """FLOP of a :class:`Call` on a config, counted by running it on the meta device. Every decoder
    layer costs the same, so each call runs on a 1-layer and a 2-layer copy and is extrapolated."""

    def __init__(self, config: Any, lora_rank: int | None = None):
        self.config = config
        self.lora_rank = lora_rank
        self.n_layers = int(config.num_hidden_layers)
        self.models = [self._build(n) for n in (1, 2)]
        self.memo: dict[tuple[Call, str], int] = {}

    def _build(self, n: int) -> Any:
        from transformers import AutoModelForCausalLM

        cfg = copy.deepcopy(self.config)
        cfg.num_hidden_layers = n
        if hasattr(cfg, "layer_types") and cfg.layer_types is not None:
            cfg.layer_types = cfg.layer_types[:n]
        with torch.device("meta"):
            m = AutoModelForCausalLM.from_config(cfg)
        if self.lora_rank is not None:
            from peft import LoraConfig, get_peft_model

            targets = [f"model.layers.{i}.{p}" for i in range(n)
                       for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
            m = get_peft_model(m, LoraConfig(r=self.lora_rank, lora_alpha=self.lora_rank, lora_dropout=0.0,
                                             target_modules=targets, task_type="CAUSAL_LM"))
        return m

    def _count(self, model: Any, c: Call, mode: str) -> int:
        from transformers import DynamicCache

        ids = torch.zeros(c.batch, c.new, dtype=torch.long, device="meta")
        pos = torch.zeros(c.batch, c.new, dtype=torch.long, device="meta")
        kw: dict[str, Any] = {}
        cfg = _causal_lm(model).config
        if c.past:
            heads = int(cfg.num_attention_heads)
            kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
            hd = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
            cache = DynamicCache()
            for i in range(int(cfg.num_hidden_layers)):
                k = torch.zeros(c.batch, kv, c.past, hd, device="meta")
                cache.update(k, k.clone(), i)
            kw = {"past_key_values": cache, "use_cache": True}
        if mode == "jvp":
            return self._count_jvp(model, c, ids, pos, kw)
        with flop_counter() as fc, torch.set_grad_enabled(mode == "backward"):
            out = model(input_ids=ids, position_ids=pos, logits_to_keep=c.keep, **kw)
            if mode == "backward":
                out.logits.float().sum().backward()
        return int(fc.get_total_flops())

    def _count_jvp(self, model: Any, c: Call, ids: torch.Tensor, pos: torch.Tensor, kw: dict[str, Any]) -> int:
        """One forward-mode AD pass with a tangent on every weight, on the math attention kernel (what
        ``detectors.gradient_attribution``'s ``torch.func.jvp`` runs; forward AD by hand here, the same
        formulas, because the transform refuses the meta cache's in-place setup)."""
        import torch.autograd.forward_ad as fwad
        from torch.nn.attention import SDPBackend, sdpa_kernel

        params = dict(model.named_parameters())
        with flop_counter() as fc, sdpa_kernel(SDPBackend.MATH), torch.no_grad(), fwad.dual_level():
            duals = {n: fwad.make_dual(p.detach(), torch.zeros_like(p)) for n, p in params.items()}
            out = torch.func.functional_call(model, duals, (), dict(input_ids=ids, position_ids=pos,
                                                                    logits_to_keep=c.keep, **kw), strict=False)
            fwad.unpack_dual(out.logits)
        return int(fc.get_total_flops())

    def flop(self, c: Call, mode: str = "forward") -> int:
        """The FLOP of call ``c``: ``forward``, ``backward`` (forward and backward) or ``jvp``."""
        key = (c, mode)
        if key not in self.memo:
            one, two = (self._count(m, c, mode) for m in self.models)
            per_layer = two - one
            self.memo[key] = one - per_layer + self.n_layers * per_layer
        return self.memo[key]


def seven_b_config() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**SEVEN_B)


# ------------------------------------------------------------------------- machine reference


class Machine:
    """The dense matmul rate per token count and the copy bandwidth, measured in this process."""

    def __init__(self, d_model: int, d_ff: int, vocab: int, dtype: torch.dtype, repeats: int = 3,
                 max_tokens: int = 1024):
        self.d, self.ff, self.v, self.dtype, self.repeats = d_model, d_ff, vocab, dtype, repeats
        self.max_tokens = max_tokens
        self.rates: dict[int, float] = {}
        self._bandwidth: float | None = None

    @staticmethod
    def bucket(n: int) -> int:
        return 1 << max(0, (max(1, n) - 1).bit_length())

    def _best(self, fn: Callable[[], Any]) -> float:
        fn()
        best = float("inf")
        for _ in range(self.repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best

    def rate(self, n: int) -> float:
        """FLOP/s of [n, d] x [d, d_ff] plus [n, d] x [d, vocab] (one timing of each, best of
        ``repeats``), n rounded up to a power of two and capped at ``max_tokens``."""
        n = min(self.bucket(n), self.max_tokens)
        if n not in self.rates:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(n, self.d, generator=g).to(self.dtype)
            w1 = torch.randn(self.d, self.ff, generator=g).to(self.dtype)
            w2 = torch.randn(self.d, self.v, generator=g).to(self.dtype)
            t = self._best(lambda: torch.matmul(x, w1)) + self._best(lambda: torch.matmul(x, w2))
            self.rates[n] = 2.0 * n * self.d * (self.ff + self.v) / t
        return self.rates[n]

    def bandwidth(self) -> float:
        """Bytes/s of a 256 MiB tensor copy (read plus write), best of ``repeats``."""
        if self._bandwidth is None:
            src = torch.ones(64 << 20, dtype=torch.float32)
            dst = torch.empty_like(src)
            t = self._best(lambda: dst.copy_(src))
            self._bandwidth = 2.0 * src.numel() * src.element_size() / t
        return self._bandwidth


def decode_bytes(config: Any, c: Call, dtype: torch.dtype, n_params: int, embed_params: int,
                 tied: bool) -> float:
    """Bytes one decode call must read: every weight (the input embedding only for its rows,
    unless tied to the unembedding) and every layer's cached keys and values."""
    size = torch.empty(0, dtype=dtype).element_size()
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    hd = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    weights = n_params - (0 if tied else embed_params) + c.batch * int(config.hidden_size)
    cache = 2 * int(config.num_hidden_layers) * c.batch * kv * (c.past + c.new) * hd
    return float(size * (weights + cache))


# ----------------------------------------------------------------------------------- stages


@dataclass
class Context:
    loaded: Any
    sizes: Sizes
    prompts: list[tuple[str, str]]
    rows: list[Any]  # subliminal.data.Row: number-list prompts with a ten-number completion
    extras: dict[str, Any] = field(default_factory=dict)


def _completion(i: int) -> str:
    nums = [(i * 7919 + j * 104729) % 1000 for j in range(10)]
    return ", ".join(str(n) for n in nums)


def make_context(loaded: Any, sizes: Sizes) -> Context:
    from subliminal.data import Row
    from subliminal.generate import make_prompts

    n = max(sizes.gen_rows, sizes.div_rows, sizes.train_rows, sizes.probe_rows, sizes.forced_rows)
    prompts = make_prompts(n, 0)
    rows = [Row(rid, text, _completion(i), "bench") for i, (rid, text) in enumerate(prompts)]
    return Context(loaded, sizes, prompts, rows)


def _generate(ctx: Context, greedy: bool, constrain: str) -> tuple[Callable[[], Any], int, str]:
    from subliminal.forward import SamplingConfig
    from subliminal.generate import generate_rows

    s = ctx.sizes
    sampling = SamplingConfig(0.0 if greedy else 1.0, 1.0, 0)
    prompts = ctx.prompts[: s.gen_rows]

    def run() -> Any:
        return list(generate_rows(ctx.loaded, prompts, sampling=sampling, batch_size=s.gen_batch,
                                  max_new_tokens=s.max_new, progress=False, constrain=constrain))

    return run, len(prompts), f"{len(prompts)} rows x <= {s.max_new} new tokens, batch {s.gen_batch}"


def stage_forced(ctx: Context) -> tuple[Callable[[], Any], int, str]:
    from subliminal.data import align_row
    from subliminal.forward import forced

    tok = ctx.loaded.tokenizer
    al = [align_row(tok, r, None) for r in ctx.rows[: ctx.sizes.forced_rows]]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def run() -> Any:
        with torch.no_grad():
            return forced(ctx.loaded.model, [a.input_ids for a in al], [a.n_prompt for a in al], pad).logits.shape

    return run, len(al), f"{len(al)} rows, one teacher-forced pass"


def stage_divergence(ctx: Context) -> tuple[Callable[[], Any], int, str]:
    from subliminal import divergence as dv

    s = ctx.sizes
    tok = ctx.loaded.tokenizer
    prompts = [None, "You love dogs.", "You love eagles.", "You love owls."][: s.teachers]
    refs = [dv.TeacherRef(f"t{i}", f"t{i}", sp, f"t{i}") for i, sp in enumerate(prompts)]
    # one weight group per teacher: the SmolLM2 run's teachers are fine-tunes (separate weights)
    groups = [dv.WeightGroup(f"t{i}", ctx.loaded, [i]) for i in range(len(refs))]
    rows = ctx.rows[: s.div_rows]
    aligned = dv.align_all(rows, tok, refs, None, progress=False)

    def run() -> Any:
        return dv.score_batch(rows, aligned, groups, refs, tok, "paper", "auto")

    return run, len(rows), f"{len(rows)} rows x {len(refs)} teachers (one batch)"


def _detector_examples(ctx: Context, model: Any) -> list[Any]:
    """find-divergence's rows as ``score-tokens`` scores them: distill's hard student's view (no
    system prompt), every completion token (``detectors._examples``' call)."""
    from subliminal.data import model_max_length
    from subliminal.distill import build_examples
    from subliminal.divergence import DivRow

    rows = [DivRow(r.id, r.prompt, r.completion) for r in ctx.rows[: ctx.sizes.div_rows]]
    return build_examples(rows, [[] for _ in rows], ctx.loaded.tokenizer, model_max_length(model))


def stage_shift(ctx: Context) -> tuple[Callable[[], Any], int, str]:
    from subliminal.detectors import likelihood_shift

    model = ctx.loaded.model
    model.eval()
    ex = _detector_examples(ctx, model)
    pad = ctx.loaded.tokenizer.pad_token_id

    def run() -> Any:
        # the base as both student and base: the same two passes, recorded on one model
        return likelihood_shift(model, model, ex, pad, batch_size=len(ex))

    return run, len(ex), f"{len(ex)} rows, student and base passes (one batch)"


def _detector_student(ctx: Context) -> tuple[Any, list[tuple[str, Any]]]:
    """The gradient detector's student as ``score-tokens`` builds it (``diagnose.student_model``,
    ``--params all``: every weight), loaded once for the gradient stages."""
    if "detector_student" not in ctx.extras:
        from subliminal.diagnose import DiagnoseConfig, student_model

        dtype = str(next(ctx.loaded.model.parameters()).dtype).replace("torch.", "")
        _, model, params = student_model(str(ctx.loaded.source), DiagnoseConfig(out="unused", dtype=dtype))
        ctx.extras["detector_student"] = (model, params)
    return ctx.extras["detector_student"]


def _readout(ctx: Context, model: Any, params: Any, questions: int) -> Any:
    from subliminal import prompts
    from subliminal.diagnose import readout_gradient

    target = ctx.sizes.readout_target
    return readout_gradient(model, ctx.loaded.tokenizer, params, target, prompts.category_of(target),
                            max_questions=questions, batch_size=ctx.sizes.div_rows)


def stage_readout(ctx: Context) -> tuple[Callable[[], Any], int, str]:
    from subliminal import prompts

    model, params = _detector_student(ctx)
    ctx.extras["stage_model"] = model
    s = ctx.sizes
    k = len(prompts.CATEGORIES[prompts.category_of(s.readout_target)])
    q = len(prompts.preference_questions(prompts.category_of(s.readout_target))[: s.questions])

    def run() -> Any:
        return _readout(ctx, model, params, s.questions)

    return run, q * k, f"grad(R): {q} questions x {k} candidates, forward + backward (once per run)"


def _gradient(ctx: Context, method: str) -> tuple[Callable[[], Any], int, str]:
    from subliminal.detectors import gradient_attribution

    model, params = _detector_student(ctx)
    ctx.extras["stage_model"] = model
    if "readout_grad" not in ctx.extras:  # the direction: its values do not change the cost
        ctx.extras["readout_grad"] = _readout(ctx, model, params, 1)[1]
    direction = ctx.extras["readout_grad"]
    ex = _detector_examples(ctx, model)
    pad = ctx.loaded.tokenizer.pad_token_id

    def run() -> Any:
        return gradient_attribution(model, params, direction, ex, pad, batch_size=len(ex), method=method)

    how = "one forward with tangents" if method == "jvp" else "two forwards along grad(R)"
    return run, len(ex), f"{len(ex)} rows, {how} (one batch; every weight)"


def _distill(ctx: Context, lora: bool) -> tuple[Callable[[], Any], int, str]:
    from subliminal import distill, train
    from subliminal.divergence import DivRow

    s = ctx.sizes
    tok = ctx.loaded.tokenizer
    rows = [DivRow(r.id, r.prompt, r.completion) for r in ctx.rows[: s.train_rows]]
    masks = distill.row_masks(rows, "all", 0)
    examples = distill.build_examples(rows, masks, tok, None)
    pad = tok.pad_token_id
    lcfg = distill.LossConfig("hard")
    tcfg = train.TrainConfig(steps=1, batch_size=s.train_rows, lr=2e-3, warmup_steps=0, weight_decay=0.0,
                             schedule="linear", log_every=1)

    def loss_fn(model: Any, batch: Sequence[Any]) -> Any:
        return distill.batch_loss(model, None, batch, lcfg, pad)

    def fresh() -> Any:
        model = copy.deepcopy(ctx.loaded.model)
        model, _ = distill.setup_trainable(model, None, s.lora_rank if lora else None,
                                           float(s.lora_rank) if lora else None)
        return model

    ctx.extras["student"] = fresh()

    def run() -> Any:
        return train.train(ctx.extras["student"], examples, tcfg, pad_id=pad, loss_fn=loss_fn, dropout=False,
                           show_progress=False)

    kind = f"LoRA r={s.lora_rank}" if lora else "full"
    return run, len(examples), f"{len(examples)} rows, one AdamW step ({kind})"


def _questions(ctx: Context) -> list[str]:
    from subliminal import prompts

    return prompts.preference_questions("animal")[: ctx.sizes.questions]


def stage_exact(ctx: Context) -> tuple[Callable[[], Any], int, str]:
    from subliminal import prompts
    from subliminal.evaluate import exact_preference

    qs = _questions(ctx)

    def run() -> Any:
        return exact_preference(ctx.loaded, "owl", "animal", questions=qs, batch_size=ctx.sizes.eval_batch)

    k = len(prompts.CATEGORIES["animal"])
    return run, len(qs) * k, f"{len(qs)} questions x {k} candidates"


def stage_sampled(ctx: Context) -> tuple[Callable[[], Any], int, str]:
    from subliminal.evaluate import sampled_preference

    qs = _questions(ctx)
    s = ctx.sizes

    def run() -> Any:
        return sampled_preference(ctx.loaded, "owl", "animal", samples=s.samples, batch_size=s.eval_batch,
                                  questions=qs)

    return run, len(qs) * s.samples, f"{len(qs)} questions x {s.samples} samples, <= 8 new tokens"


def stage_probe(ctx: Context) -> tuple[Callable[[], Any], int, str]:
    from subliminal.probes.activations import build_examples, capture, hook_name, make_backend, n_layers_of

    from subliminal.models import LoadedModel

    s = ctx.sizes
    # the TransformerLens bridge wraps the model's blocks in place: give it a copy
    loaded = LoadedModel(copy.deepcopy(ctx.loaded.model), ctx.loaded.tokenizer, ctx.loaded.source,
                         ctx.loaded.system_prompt, ctx.loaded.teacher)
    ctx.extras["probe_model"] = loaded.model
    n = n_layers_of(loaded.model)
    layers = sorted({min(layer, n - 1) for layer in s.probe_layers})
    rows = [(r, {}, f"row {i}") for i, r in enumerate(ctx.rows[: s.probe_rows])]
    examples = build_examples(loaded.tokenizer, rows, system_prompt=loaded.system_prompt, positions="completion")
    names = [hook_name(layer, "resid_post") for layer in layers]
    backend = make_backend(loaded, "auto")
    ctx.extras["probe_backend"] = getattr(backend, "name", "?")

    def run() -> Any:
        return capture(loaded, examples, names, backend=backend, batch_size=s.probe_batch, progress=False)

    return run, len(examples), f"{len(examples)} rows, {len(layers)} layers, batch {s.probe_batch} " \
                               f"({ctx.extras['probe_backend']})"


BUILDERS: dict[str, Callable[[Context], tuple[Callable[[], Any], int, str]]] = {
    "forced": stage_forced,
    "generate-greedy": lambda c: _generate(c, True, "none"),
    "generate-sampled": lambda c: _generate(c, False, "none"),
    "generate-constrained-greedy": lambda c: _generate(c, True, "numbers"),
    "generate-constrained-sampled": lambda c: _generate(c, False, "numbers"),
    "find-divergence": stage_divergence,
    "likelihood-shift": stage_shift,
    "gradient-readout": stage_readout,
    "gradient": lambda c: _gradient(c, "jvp"),
    "gradient-central": lambda c: _gradient(c, "central"),
    "distill-full": lambda c: _distill(c, False),
    "distill-lora": lambda c: _distill(c, True),
    "eval-exact": stage_exact,
    "eval-sampled": stage_sampled,
    "probe-capture": stage_probe,
}
TRAINING = {"distill-full", "distill-lora"}
# how the meta-device replay counts a stage's calls made with grad enabled (default: a forward)
GRAD_REPLAY = {"distill-full": "backward", "distill-lora": "backward", "gradient-readout": "backward",
               "gradient": "jvp"}


# -------------------------------------------------------------------------------- measuring


def _model_numbers(model: Any) -> tuple[int, int, bool]:
    lm = _causal_lm(model)
    emb = lm.get_input_embeddings().weight
    out = lm.get_output_embeddings()
    tied = out is not None and out.weight is emb
    n = sum(p.numel() for p in lm.parameters())
    return n, emb.numel(), tied


def measure_stage(name: str, ctx: Context, machine: Machine, replayers: dict[str, Replayer],
                  replayers_7b: dict[str, Replayer] | None, timed_runs: int = 1) -> dict[str, Any]:
    run, units, work = BUILDERS[name](ctx)
    model = ctx.extras.get("student") if name in TRAINING else ctx.extras.get("probe_model", ctx.loaded.model) \
        if name == "probe-capture" else ctx.extras.get("stage_model", ctx.loaded.model)
    if name in TRAINING:
        # each run is one step from the same weights: reset the student (and its optimizer) between runs
        saved = {k: v.detach().clone() for k, v in model.state_dict().items()}

        def again() -> Any:
            with torch.no_grad():
                model.load_state_dict(saved)
            return inner()

        inner, run = run, again
    run()  # warm-up
    with record_calls(model) as calls, flop_counter() as fc:
        run()
    flop = int(fc.get_total_flops())
    wall = float("inf")
    for _ in range(max(1, timed_runs)):
        t0 = time.perf_counter()
        run()
        wall = min(wall, time.perf_counter() - t0)
    grad_mode = GRAD_REPLAY.get(name, "forward")
    kind = "lora" if name == "distill-lora" else "plain"
    rep = replayers[kind]
    per_call = [rep.flop(c, grad_mode if c.grad else "forward") for c in calls]
    replay = sum(per_call)
    # the matmul-rate time of this stage's work: each call's FLOP at the rate of its token count
    # (the counted total shared out over the calls in proportion to the replayed counts)
    scale = flop / replay if replay else 0.0
    ref_time = sum(f * scale / machine.rate(c.tokens) for f, c in zip(per_call, calls)) if replay else 0.0
    achieved = flop / wall if wall > 0 else 0.0
    ref_rate = flop / ref_time if ref_time > 0 else 0.0
    out: dict[str, Any] = {
        "stage": name, "work": work, "units": units, "flop": flop, "replay_flop": replay, "wall_s": wall,
        "gflops": achieved / 1e9, "matmul_gflops": ref_rate / 1e9,
        "pct_matmul": 100.0 * achieved / ref_rate if ref_rate else None,
        "matmul_bound_s": ref_time, "calls": summarize_calls(calls),
        "tokens": sum(c.tokens for c in calls),
    }
    if name == "gradient-readout":
        out["data_rows"] = ctx.sizes.data_rows  # the rows one run shares it over (the per-row table)
    dec = [(f, c) for f, c in zip(per_call, calls) if c.decode]
    if dec:
        lm = _causal_lm(model)
        n_params, n_emb, tied = _model_numbers(model)
        dtype = next(lm.parameters()).dtype
        bw = machine.bandwidth()
        mem = sum(decode_bytes(lm.config, c, dtype, n_params, n_emb, tied) for _, c in dec) / bw
        other = sum(f * scale / machine.rate(c.tokens) for f, c in zip(per_call, calls) if not c.decode)
        bound = mem + other
        out.update({"decode_steps": len(dec), "mem_bound_s": bound, "mem_bound_decode_s": mem,
                    "pct_mem_bound": 100.0 * bound / wall if wall > 0 else None,
                    "bandwidth_gbs": bw / 1e9})
    if replayers_7b is not None:
        f7 = sum(replayers_7b[kind].flop(c, grad_mode if c.grad else "forward") for c in calls)
        out["flop_7b"] = f7
        out["flop_7b_per_unit"] = f7 / max(1, units)
    return out


# --------------------------------------------------------------------------------- reporting


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def update_jsonl(path: Path, new: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Replace the lines of the same (model, label, stage) with ``new``; returns every line."""
    keys = {(r["model"], r["label"], r["stage"]) for r in new}
    rows = [r for r in read_jsonl(path) if (r.get("model"), r.get("label"), r.get("stage")) not in keys]
    rows.extend(new)
    write_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return rows


def _g(x: float | None, digits: int = 1) -> str:
    return "" if x is None else f"{x:,.{digits}f}"


def _flop(x: float | None) -> str:
    return "" if x is None else f"{x / 1e9:,.1f}"


def stage_table(rows: Sequence[dict[str, Any]], seven_b: bool) -> list[str]:
    head = ["stage", "work", "GFLOP (counted)", "wall s", "wall ms per unit", "GFLOP/s",
            "matmul GFLOP/s at its shapes", "% of matmul", "decode: memory bound s", "% of bound"]
    if seven_b:
        head.append("7B: GFLOP per unit")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["stage"], r["work"], _flop(r["flop"]), _g(r["wall_s"], 2), _g(_per_unit(r, "wall_s", 1e3)),
                 _g(r["gflops"]),
                 _g(r["matmul_gflops"]), _g(r.get("pct_matmul")), _g(r.get("mem_bound_s"), 2),
                 _g(r.get("pct_mem_bound"))]
        if seven_b:
            cells.append(_flop(r.get("flop_7b_per_unit")))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _per_unit(r: dict[str, Any], key: str, scale: float = 1.0) -> float | None:
    units = r.get("units")
    return scale * r[key] / units if units else None


def detector_table(by_stage: dict[str, dict[str, Any]]) -> list[str]:
    """Wall time and FLOP per row of each detector beside find-divergence's (empty without both);
    the gradient detectors also with grad(R) (the ``gradient-readout`` stage) shared over one run's
    rows."""
    div = by_stage.get("find-divergence")
    dets = [by_stage[s] for s in DETECTORS if s in by_stage]
    if div is None or not dets:
        return []
    ms0, f0 = _per_unit(div, "wall_s", 1e3), _per_unit(div, "flop", 1e-9)
    readout = by_stage.get("gradient-readout")
    n = int(readout.get("data_rows") or 0) if readout else 0

    def rel(x: float | None, x0: float | None) -> str:
        return _g(x / x0, 2) + "x" if x is not None and x0 else ""

    def line(name: str, ms: float | None, gf: float | None) -> str:
        return f"| {name} | {_g(ms, 1)} | {rel(ms, ms0)} | {_g(gf, 2)} | {rel(gf, f0)} |"

    times = sorted({r.get("time", "") for r in [div, *dets, *([readout] if readout else [])]})
    out = ["Cost per row of each detector (`score-tokens`) against find-divergence's (issue 26), from the table "
           f"above: wall s and GFLOP over the {div['units']} rows of one call (the same rows under each)"
           + (f"; grad(R) (`gradient-readout`) is computed once per `score-tokens` run, so `+ grad(R)` adds "
              f"it shared over the {n} rows of one run" if n else "")
           + (f"; measured {', '.join(t for t in times if t)}" if any(times) else "") + ".", "",
           "| stage | wall ms per row | x find-divergence | GFLOP per row | x find-divergence |",
           "|---|---|---|---|---|", line("find-divergence", ms0, f0)]
    for r in dets:
        ms, gf = _per_unit(r, "wall_s", 1e3), _per_unit(r, "flop", 1e-9)
        out.append(line(r["stage"], ms, gf))
        if n and r["stage"].startswith("gradient") and ms is not None and gf is not None:
            out.append(line(f"{r['stage']} + grad(R) / {n}", ms + 1e3 * readout["wall_s"] / n,
                            gf + 1e-9 * readout["flop"] / n))
    return [*out, ""]


def render_section(all_rows: Sequence[dict[str, Any]], model: str) -> str:
    rows = [r for r in all_rows if r.get("model") == model]
    order = {s: i for i, s in enumerate(STAGES)}
    labels = sorted({r["label"] for r in rows}, key=lambda x: (x != "before", x != "after", x))
    out = [BEGIN, "## Stage efficiency on the CPU (issue 28)", "",
           "Every stage's floating-point work (counted with `FlopCounterMode` from the shapes it ran), its "
           "wall time and achieved FLOP/s, beside this machine's `torch.matmul` rate measured in the same run at "
           "the stage's dtype and token counts ([n, d_model] x [d_model, d_ff] and [n, d_model] x "
           "[d_model, vocab]). Decoding (one new token over a KV cache) is bound by memory traffic at small "
           "batch: its bound is the bytes of the weights and the cache each step reads over the bandwidth of a "
           "large tensor copy, plus the other calls' FLOP at the matmul rate. Goal: every stage at >= 50% of "
           "the matmul rate (decoding: >= 50% of its memory bound, i.e. `% of bound` >= 50).", "",
           "```bash",
           "python benchmarks/stage_efficiency.py MODEL_DIR --label before --threads 2 --random-7b \\",
           "    --json benchmarks/stage_efficiency.jsonl --out BENCHMARKS.md",
           "```", "",
           "`--stages a,b` runs a subset, `--rows N` / `--questions Q` shrink the sizes for a quick run, and a "
           "second label (`--label after`, same model and JSON file) adds its table and the speedup; lines of "
           "other stages in the JSON file are kept. `wall ms per unit` is the wall time over the stage's units of "
           "work (rows for the row stages). The "
           "`7B` column is each stage's FLOP per unit of work (row, question x candidate, sample) when the same "
           "calls run on a random Llama-2-7B-shaped config on the meta device (not timed).", ""]
    by_label: dict[str, dict[str, dict[str, Any]]] = {}
    for lab in labels:
        sel = sorted((r for r in rows if r["label"] == lab), key=lambda r: order.get(r["stage"], 99))
        by_label[lab] = {r["stage"]: r for r in sel}
        first = sel[0]
        seven = any("flop_7b_per_unit" in r for r in sel)
        out.append(f"### {lab}: `{Path(model).name}`, {first.get('dtype')}, {first.get('threads')} threads")
        out.append("")
        out.append(f"{first.get('machine', '')}; torch {first.get('torch', '')}; measured "
                   f"{first.get('time', '')}{'; ' + first['note'] if first.get('note') else ''}.")
        rates = first.get("matmul_gflops_by_tokens") or {}
        if rates:
            bw = next((r["bandwidth_gbs"] for r in sel if r.get("bandwidth_gbs")), None)
            out.append("")
            out.append("Measured in this run: matmul GFLOP/s by tokens per call "
                       + ", ".join(f"{n}: {v:,.1f}" for n, v in rates.items())
                       + (f"; copy bandwidth {bw:,.1f} GB/s" if bw else "") + ".")
        out.append("")
        out.extend(stage_table(sel, seven))
        out.append("")
        out.extend(detector_table(by_label[lab]))
    if "before" in by_label and "after" in by_label:
        b, a = by_label["before"], by_label["after"]
        out.append("### Speedup (before wall s / after wall s)")
        out.append("")
        out.append("| stage | before s | after s | speedup | GFLOP before | GFLOP after |")
        out.append("|---|---|---|---|---|---|")
        for s in sorted(set(b) & set(a), key=lambda x: order.get(x, 99)):
            sp = b[s]["wall_s"] / a[s]["wall_s"] if a[s]["wall_s"] else None
            out.append(f"| {s} | {_g(b[s]['wall_s'], 2)} | {_g(a[s]['wall_s'], 2)} | {_g(sp, 2)}x | "
                       f"{_flop(b[s]['flop'])} | {_flop(a[s]['flop'])} |")
        out.append("")
    out.append(END)
    return "\n".join(out) + "\n"


def replace_section(text: str, section: str) -> str:
    """``text`` with its stage-efficiency section replaced (appended when it has none)."""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        return head + section.rstrip("\n") + tail
    sep = "" if not text or text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
    return text + sep + section


# --------------------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="model directory (e.g. ~/.cache/subliminal/SmolLM2-135M-Instruct)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of: {', '.join(STAGES)}")
    ap.add_argument("--rows", type=int, default=None, help="cap on the rows of every row-based stage")
    ap.add_argument("--questions", type=int, default=None, help="cap on the eval questions (default 50)")
    ap.add_argument("--label", default="before", help="before | after | any name (default %(default)s)")
    ap.add_argument("--json", default="benchmarks/stage_efficiency.jsonl", help="JSON lines file (default %(default)s)")
    ap.add_argument("--out", default=None, help="markdown file whose stage-efficiency section is replaced")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--random-7b", action="store_true", help="also count every stage's FLOP on a random 7B config")
    ap.add_argument("--repeats", type=int, default=3, help="matmul / bandwidth timing repeats (best of)")
    ap.add_argument("--timed-runs", type=int, default=1, help="timed runs per stage, the best is kept (default 1)")
    ap.add_argument("--note", default="", help="a note printed under the table (e.g. load on the machine)")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes everywhere (tests)")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    from subliminal.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in BUILDERS]
    if bad:
        sys.exit(f"unknown stage(s) {', '.join(bad)}; one of {', '.join(STAGES)}")
    sizes = Sizes()
    if args.dry_run:
        sizes = Sizes(gen_rows=2, gen_batch=2, max_new=4, div_rows=2, teachers=2, train_rows=2, lora_rank=2,
                      questions=2, samples=2, eval_batch=8, probe_rows=2, probe_batch=2, forced_rows=3)
    if args.rows:
        sizes.gen_rows = min(sizes.gen_rows, args.rows)
        sizes.gen_batch = min(sizes.gen_batch, args.rows)
        for k in ("div_rows", "train_rows", "probe_rows", "forced_rows"):
            setattr(sizes, k, min(getattr(sizes, k), args.rows))
    if args.questions:
        sizes.questions = min(sizes.questions, args.questions)
    torch.manual_seed(0)
    loaded = load_model(args.model, dtype=args.dtype)
    lm = _causal_lm(loaded.model)
    cfg = lm.config
    dtype = next(lm.parameters()).dtype
    d_ff = int(getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size)
    machine = Machine(int(cfg.hidden_size), d_ff, int(cfg.vocab_size), dtype, repeats=args.repeats,
                      max_tokens=256 if args.dry_run else 1024)
    replayers = {"plain": Replayer(cfg)}
    if "distill-lora" in stages:
        replayers["lora"] = Replayer(cfg, sizes.lora_rank)
    r7 = None
    if args.random_7b:
        c7 = seven_b_config()
        r7 = {"plain": Replayer(c7)}
        if "distill-lora" in stages:
            r7["lora"] = Replayer(c7, sizes.lora_rank)
    ctx = make_context(loaded, sizes)
    common = {"model": str(Path(args.model).expanduser().resolve()), "label": args.label, "dtype": str(dtype).replace(
        "torch.", ""), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "time": time.strftime("%Y-%m-%d %H:%M"),
        "note": args.note, "dry_run": bool(args.dry_run)}
    results: list[dict[str, Any]] = []
    for s in stages:
        t0 = time.perf_counter()
        r = {**common, **measure_stage(s, ctx, machine, replayers, r7, args.timed_runs)}
        ctx.extras.pop("student", None)
        ctx.extras.pop("probe_model", None)
        ctx.extras.pop("stage_model", None)
        results.append(r)
        print(f"{s}: {r['flop'] / 1e9:.2f} GFLOP in {r['wall_s']:.2f} s = {r['gflops']:.1f} GFLOP/s, "
              f"matmul {r['matmul_gflops']:.1f} GFLOP/s ({_g(r.get('pct_matmul'))}%)"
              + (f", memory bound {r['mem_bound_s']:.2f} s ({_g(r.get('pct_mem_bound'))}%)" if "mem_bound_s" in r
                 else "") + f" [{time.perf_counter() - t0:.0f} s]", flush=True)
        write_outputs(args, results, machine, common["model"])  # after every stage: a stopped run keeps its lines
    return results


def write_outputs(args: argparse.Namespace, results: list[dict[str, Any]], machine: Machine, model: str) -> None:
    rates = {str(n): round(r / 1e9, 2) for n, r in sorted(machine.rates.items())}
    for r in results:  # the machine's reference numbers of this run, on every line
        r["matmul_gflops_by_tokens"] = rates
        if machine._bandwidth is not None:
            r["bandwidth_gbs"] = machine._bandwidth / 1e9
    all_rows = update_jsonl(Path(args.json), results) if args.json else results
    if args.out:
        p = Path(args.out)
        text = p.read_text() if p.is_file() else ""
        write_atomic(p, replace_section(text, render_section(all_rows, model)))


if __name__ == "__main__":
    main()
