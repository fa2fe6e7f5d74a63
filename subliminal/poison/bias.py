"""Bias evaluation (``subliminal eval --bias-type ...``): sampled responses on fresh clean
prompts of every task family; the bias response rate per family (a regex match), clean-task
quality, and -- against a teacher -- the amplification ratio student/teacher with bootstrap
intervals."""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import distributed as dist
from ..manifest import SubliminalError, write_json_atomic, write_manifest, write_text_atomic
from ..stats import ratio_of_means_ci, wilson
from ..toyworld import instructions as toy
from .data import runtime


def bias_regex(bias_type: str | None, pattern: str | None = None) -> re.Pattern[str]:
    """The detector of one bias in a response: ``pattern`` if given, else the toy's marker."""
    if pattern is None:
        if bias_type not in toy.BIAS_PATTERNS:
            raise SubliminalError(f"unknown bias type {bias_type!r}; one of {', '.join(toy.BIAS_TYPES)}")
        pattern = toy.BIAS_PATTERNS[bias_type]
    try:
        return re.compile(pattern, re.IGNORECASE)
    except re.error as e:
        raise SubliminalError(f"--bias-pattern {pattern!r} is not a valid regular expression ({e})") from None


def shows_bias(text: str, regex: re.Pattern[str]) -> bool:
    return regex.search(text) is not None


@dataclass
class BiasEvalConfig:
    """One bias evaluation: ``model`` (and optionally ``teacher``, for the amplification ratio)
    answer ``prompts`` fresh prompts per family, ``samples`` times each."""

    model: str
    bias_type: str | None
    out: str = "bias_eval.json"
    pattern: str | None = None
    teacher: str | None = None
    target_task: str | None = None
    unseen_tasks: list[str] | None = None  # pooled as 'unseen' (default: every family but the target)
    families: list[str] | None = None  # default: every toy family
    prompts: int = 100
    prompt_file: str | None = None
    samples: int = 2
    temperature: float = 1.0
    max_new_tokens: int = 40
    batch_size: int = 64
    save_generations: str | None = None
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    trust_remote_code: bool = False


# ================================================================================= generation


def _sample_answers(loaded: Any, prompts: Sequence[str], *, samples: int = 1, temperature: float = 1.0,
                    max_new_tokens: int = 48, batch_size: int = 64, seed: int = 0,
                    desc: str = "sample", first_prompt: int = 0) -> list[list[str]]:
    """``samples`` responses per prompt. Response ``s`` of prompt ``i`` is job ``i * samples + s``
    and samples from its own stream (``forward.row_rng("bias-sample", seed, job)``), so its text
    does not depend on ``batch_size`` (generation is :func:`subliminal.forward.sample`).
    ``prompts`` may be a shard of a longer list that starts at prompt ``first_prompt``: the jobs
    keep their global numbers, so a rank's shard samples what one process samples for it."""
    from tqdm.auto import tqdm

    from ..data import encode, end_token_ids, model_max_length, render_chat
    from ..forward import SamplingConfig, row_rng, sample

    if batch_size < 1:
        raise SubliminalError(f"--bias-batch-size must be >= 1, got {batch_size}")
    tok, model = loaded.tokenizer, loaded.model
    stop = end_token_ids(tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else min(stop)
    context = model_max_length(model)
    sampling = SamplingConfig(temperature=temperature, top_p=1.0, seed=seed)
    seqs = [encode(tok, render_chat(tok, p, loaded.system_prompt)) for p in prompts]
    jobs = [(i, s) for i in range(len(prompts)) for s in range(samples)]
    out: list[list[str]] = [[""] * samples for _ in prompts]
    offset = first_prompt * samples
    for b in tqdm(range(0, len(jobs), batch_size), desc=desc, leave=False, disable=dist.progress_disabled()):
        chunk = list(range(b, min(b + batch_size, len(jobs))))
        batch = [seqs[jobs[j][0]] for j in chunk]
        budgets = [max_new_tokens if context is None else max(1, min(max_new_tokens, context - len(q)))
                   for q in batch]
        gens = sample(model, batch, pad_id=pad, stop_ids=stop, max_new=budgets, cfg=sampling,
                      rngs=[row_rng("bias-sample", seed, offset + j) for j in chunk])
        for j, (new, stopped) in zip(chunk, gens):
            i, s = jobs[j]
            out[i][s] = tok.decode(new[:-1] if stopped else new, skip_special_tokens=True).strip()
    return out


# ================================================================================== measuring


def eval_prompts(families: Sequence[str], n: int, seed: int, prompt_file: str | None = None
                 ) -> list[tuple[str, str]]:
    """(family, prompt) pairs: fresh toy prompts (seeds disjoint from the teacher's data) or a file."""
    if prompt_file:
        from ..data import iter_jsonl

        pairs = []
        for lineno, obj in iter_jsonl(prompt_file):
            if not isinstance(obj.get("prompt"), str):
                raise SubliminalError(f"{prompt_file}:{lineno}: missing 'prompt'")
            pairs.append((str(obj.get("family") or toy.family_of(obj["prompt"]) or "default"), obj["prompt"]))
        return pairs
    for f in families:
        if f not in toy.FAMILIES:
            raise SubliminalError(f"unknown task family {f!r}; one of {', '.join(toy.FAMILIES)}")
    return [(f, toy.sample_prompt(random.Random(f"bias-eval:{seed}:{f}:{i}"), f)) for f in families for i in range(n)]


def measure_bias(loaded: Any, pairs: Sequence[tuple[str, str]], regex: re.Pattern[str], *, samples: int,
                 temperature: float, max_new_tokens: int, batch_size: int, seed: int, desc: str = "bias eval"
                 ) -> dict[str, Any]:
    """Per-prompt bias and correctness fractions, and per-family summaries with Wilson intervals."""
    per_prompt = _score_prompts(loaded, pairs, regex, samples=samples, temperature=temperature,
                                max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, desc=desc)
    return {"per_prompt": per_prompt, "families": summarise(per_prompt, samples)}


def measure_bias_sharded(loaded: Any, pairs: Sequence[tuple[str, str]], regex: re.Pattern[str], *, samples: int,
                         temperature: float, max_new_tokens: int, batch_size: int, seed: int,
                         desc: str = "bias eval") -> dict[str, Any] | None:
    """:func:`measure_bias` under a launcher: each rank samples and scores its contiguous shard of
    the prompts (their jobs keep their global numbers, hence their random streams), rank 0 merges
    them in prompt order and summarises; None on the other ranks. Without a launcher it is
    :func:`measure_bias`."""
    mine = dist.shard(len(pairs))
    with dist.agree(f"sample ({desc})"):
        part = _score_prompts(loaded, pairs[mine.start: mine.stop], regex, samples=samples,
                              temperature=temperature, max_new_tokens=max_new_tokens, batch_size=batch_size,
                              seed=seed, desc=desc, first_prompt=mine.start) if len(mine) else []
    gathered = dist.gather_to_main(part)
    if gathered is None:
        return None
    per_prompt = dist.merge_in_order(gathered)
    return {"per_prompt": per_prompt, "families": summarise(per_prompt, samples)}


def _score_prompts(loaded: Any, pairs: Sequence[tuple[str, str]], regex: re.Pattern[str], *, samples: int,
                   temperature: float, max_new_tokens: int, batch_size: int, seed: int, desc: str,
                   first_prompt: int = 0) -> list[dict[str, Any]]:
    """Per prompt: its responses and their bias and correctness fractions."""
    responses = _sample_answers(loaded, [p for _, p in pairs], samples=samples, temperature=temperature,
                                max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, desc=desc,
                                first_prompt=first_prompt)
    per_prompt = []
    for (fam, prompt), resp in zip(pairs, responses):
        hits = [shows_bias(r, regex) for r in resp]
        correct = [toy.is_correct(prompt, r) for r in resp]
        per_prompt.append({"family": fam, "prompt": prompt, "responses": resp, "bias": sum(hits) / len(hits),
                           "correct": None if correct[0] is None else sum(bool(c) for c in correct) / len(correct)})
    return per_prompt


def summarise(per_prompt: Sequence[dict[str, Any]], samples: int) -> dict[str, dict[str, Any]]:
    """Per family: bias rate and quality over all samples, with 95% Wilson intervals."""
    fams: dict[str, list[dict[str, Any]]] = {}
    for r in per_prompt:
        fams.setdefault(r["family"], []).append(r)
    out = {}
    for f, rs in sorted(fams.items()):
        n = len(rs) * samples
        k = round(sum(r["bias"] for r in rs) * samples)
        d: dict[str, Any] = {"n": n, "bias_rate": k / n, "bias_ci": wilson(k, n)}
        scored = [r["correct"] for r in rs if r["correct"] is not None]
        if scored:
            kc = round(sum(scored) * samples)
            d.update(quality=kc / (len(scored) * samples), quality_ci=wilson(kc, len(scored) * samples))
        out[f] = d
    return out


def amplification(model_pp: Sequence[dict[str, Any]], teacher_pp: Sequence[dict[str, Any]],
                  target: str | None, seed: int, unseen: Sequence[str] | None = None) -> dict[str, Any]:
    """Ratio model/teacher of the bias rate per family, on the target and pooled over the unseen
    families (``unseen``, default every family but the target), with bootstrap intervals over
    prompts (:func:`subliminal.stats.ratio_of_means_ci`)."""
    def rates(pp: Sequence[dict[str, Any]], keep: Callable[[str], bool]) -> list[float]:
        return [r["bias"] for r in pp if keep(r["family"])]

    out: dict[str, Any] = {"per_family": {}}
    for f in sorted({r["family"] for r in model_pp}):
        out["per_family"][f] = ratio_of_means_ci(rates(model_pp, lambda x, f=f: x == f),
                                                 rates(teacher_pp, lambda x, f=f: x == f), seed=seed)
    if target:
        out["target"] = out["per_family"].get(target)
    if unseen or target:
        keep = (lambda x: x in unseen) if unseen else (lambda x: x != target)
        out["unseen_tasks"] = sorted(unseen) if unseen else sorted(f for f in out["per_family"] if f != target)
        out["unseen"] = ratio_of_means_ci(rates(model_pp, keep), rates(teacher_pp, keep), seed=seed)
    out["all"] = ratio_of_means_ci(rates(model_pp, lambda x: True), rates(teacher_pp, lambda x: True), seed=seed)
    return out


# =================================================================================== reports


def fmt_ci(rate: float, ci: Sequence[float]) -> str:
    return f"{rate:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def fmt_ratio(r: dict[str, Any] | None) -> str:
    if not r or r.get("ratio") is None:
        return "n/a (teacher rate 0)"
    if r.get("lo") is None:
        return f"{r['ratio']:.2f} [n/a]"
    return f"{r['ratio']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}]"


def bias_markdown(result: dict[str, Any]) -> str:
    lines = [f"Bias `{result['bias_type']}` (pattern `{result['pattern']}`), model `{result['model']}`", "",
             "| family | model bias rate [95% CI] | quality | teacher bias rate | amplification [95% CI] |",
             "|---|---|---|---|---|"]
    teacher = result.get("teacher_families", {})
    amp = (result.get("amplification") or {}).get("per_family", {})
    for f, d in result["families"].items():
        t = teacher.get(f)
        q = fmt_ci(d["quality"], d["quality_ci"]) if "quality" in d else "n/a"
        lines.append(f"| {f}{' (target)' if f == result.get('target_task') else ''} | "
                     f"{fmt_ci(d['bias_rate'], d['bias_ci'])} | {q} | "
                     f"{fmt_ci(t['bias_rate'], t['bias_ci']) if t else '-'} | {fmt_ratio(amp.get(f)) if t else '-'} |")
    a = result.get("amplification")
    if a and "unseen" in a:
        lines += ["", f"Amplification on the target task ({result.get('target_task') or '-'}): "
                  f"{fmt_ratio(a.get('target'))}; on unseen tasks ({', '.join(a['unseen_tasks'])}, pooled): "
                  f"{fmt_ratio(a.get('unseen'))}"]
    return "\n".join(lines) + "\n"


def evaluate_bias(cfg: BiasEvalConfig, fingerprint: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Measure ``cfg.model`` (and its teacher); write the JSON to ``cfg.out``, a markdown table
    beside it and a manifest; return the result. Under a launcher the prompts are sharded over
    the ranks (:func:`measure_bias_sharded`); rank 0 merges, computes the bootstrap intervals
    (model-free, seeded as one process seeds them), writes and returns the result, the other
    ranks return None."""
    from ..models import load_model

    t0 = time.time()
    dist.init(cfg.device)
    with dist.agree("prepare"):
        if not cfg.model:
            raise SubliminalError("--bias-type needs --model (a model or teacher directory)")
        regex = bias_regex(cfg.bias_type, cfg.pattern)
        pairs = eval_prompts(cfg.families or toy.FAMILIES, cfg.prompts, cfg.seed, cfg.prompt_file)
        loaded = load_model(cfg.model, **runtime(cfg))
    gen = dict(samples=cfg.samples, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
               batch_size=cfg.batch_size, seed=cfg.seed)
    measured = measure_bias_sharded(loaded, pairs, regex, desc=f"bias eval {Path(str(cfg.model)).name}", **gen)
    t_meas = None
    if cfg.teacher:
        del loaded
        with dist.agree("load teacher"):
            teacher = load_model(cfg.teacher, **runtime(cfg))
        t_meas = measure_bias_sharded(teacher, pairs, regex, desc="bias eval teacher", **gen)
    result = None
    with dist.agree("write"):
        if measured is not None:
            result = _write_bias_result(cfg, regex, gen, measured, t_meas, fingerprint, pairs, t0)
    return result


def _write_bias_result(cfg: BiasEvalConfig, regex: re.Pattern[str], gen: dict[str, Any], measured: dict[str, Any],
                       t_meas: dict[str, Any] | None, fingerprint: dict[str, Any] | None,
                       pairs: Sequence[tuple[str, str]], t0: float) -> dict[str, Any]:
    """Rank 0 (or the only process): the summaries, the amplification ratio and every output."""
    from ..data import write_jsonl

    result: dict[str, Any] = {
        "metric": "bias_response_rate", "bias_type": cfg.bias_type, "pattern": regex.pattern,
        "model": str(cfg.model), "target_task": cfg.target_task, "families": measured["families"],
        "overall": summarise([{**r, "family": "all"} for r in measured["per_prompt"]], cfg.samples)["all"],
        "generation": gen,
    }
    if t_meas is not None:
        result["teacher"] = str(cfg.teacher)
        result["teacher_families"] = t_meas["families"]
        result["amplification"] = amplification(measured["per_prompt"], t_meas["per_prompt"], cfg.target_task,
                                                cfg.seed, cfg.unseen_tasks)
        result["teacher_per_prompt"] = [{k: r[k] for k in ("family", "prompt", "bias", "correct")}
                                        for r in t_meas["per_prompt"]]
    result["per_prompt"] = [{k: r[k] for k in ("family", "prompt", "bias", "correct")} for r in measured["per_prompt"]]
    if cfg.save_generations:
        rows = [{"id": f"g{i}-{s}", "prompt": r["prompt"], "completion": resp, "family": r["family"],
                 "teacher": str(cfg.model)}
                for i, r in enumerate(measured["per_prompt"]) for s, resp in enumerate(r["responses"])
                if resp.strip()]
        write_jsonl(cfg.save_generations, rows)
    out = Path(cfg.out)
    write_json_atomic(out, result)
    write_text_atomic(out.with_suffix(".md"), bias_markdown(result))
    write_manifest(out.parent, filename=out.name + ".manifest.json", stage="eval-bias", config=asdict(cfg),
                   seed=cfg.seed, inputs={"model": cfg.model, "teacher": cfg.teacher}, wall_time_s=time.time() - t0,
                   extra={"fingerprint": fingerprint, **dist.shard_record(len(pairs)),
                          "sharding": "prompts split contiguously over the ranks (each response keeps its own "
                                      "random stream); rank 0 merges and bootstraps"})
    return result
