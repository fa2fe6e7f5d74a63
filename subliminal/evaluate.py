"""``subliminal eval``: what a student (or teacher) prefers, and whether it still does the task.

- Exact preference: for every preference question, the probability of each candidate answer as
  a whole completion (all its tokens and the end-of-turn token, so "owl" is not "owls ..."),
  renormalised over the candidates; averaged over questions. No sampling, so it is cheap and
  low-variance, which is what transfer curves need.
- Sampled preference: ``--samples`` answers per question at temperature 1, matched on word
  boundaries ("bowl" does not name an owl); the metric is the mean over questions of the
  fraction naming the target, with a 95% t-interval over questions.
- Main task: teacher-forced next-token accuracy on held-out teacher data (``--heldout``).
- ``--all-checkpoints``: the same over a student's ``checkpoint-*`` directories (transfer curve).
- ``--compare A.json B.json ...``: one table with CIs and the difference to the first row.
- ``--system-prompt`` / ``--chat-template``: every readout under another context than the one
  the model was trained in (:func:`apply_context`), so a claim that transfer travels through the
  shared context (the template rows every training row and every question share) can fail:
  transfer read under the training template and under another one.

Sequences are right-padded for teacher forcing: under a causal mask the padding after a
sequence cannot change its logits, so batched scores equal one-at-a-time scores exactly.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from . import distributed as dist
from . import poison, prompts
from .cliutil import add_device_map, add_model_runtime, add_overwrite, add_seed, device_type, runtime_kwargs
from .data import (
    FALLBACK_CHAT_TEMPLATE,
    TOY_ALT_CHAT_TEMPLATE,
    Row,
    align_row,
    encode_prompt,
    model_max_length,
    read_rows,
    render_chat,
)
from .forward import completion_scores, prefix_cached_scores
from .manifest import (
    SubliminalError,
    check_file_resume,
    check_not_input,
    check_writable,
    fingerprint,
    write_file_manifest,
    write_json_atomic,
    write_text_atomic,
)
from .stats import mean_ci, t_quantile  # noqa: F401  (t_quantile: re-exported)

log = logging.getLogger(__name__)
STAGE = "eval"


# ================================================================================ statistics
# t-intervals come from subliminal.stats (scipy); the names stay importable from here.


def aggregate_seeds(evals: Sequence[dict[str, Any] | str | Path], metric: str = "exact") -> dict[str, Any]:
    """Across-seed summary of one metric of several eval files (or loaded dicts): the mean of
    the per-seed means with a 95% t-interval over seeds -- the seeds, not the questions, are the
    independent replicates of a training run."""
    values = []
    for e in evals:
        d = json.loads(Path(e).read_text()) if isinstance(e, (str, Path)) else e
        if metric not in d:
            raise SubliminalError(f"{e if not isinstance(e, dict) else d.get('model')}: no {metric!r} metric")
        values.append(float(d[metric]["mean"]))
    m, lo, hi = mean_ci(values)
    return {"metric": metric, "mean": m, "ci": [lo, hi], "ci_method": "t-interval over seeds",
            "n_seeds": len(values), "values": values}


# ============================================================================ teacher forcing


# ======================================================================== preference (exact)


is_toy_tokenizer = prompts.is_toy_tokenizer


def question_texts(tokenizer: Any, category: str, questions: Sequence[str] | None = None) -> list[str]:
    """The questions as ``tokenizer`` should see them (ordinary text for real tokenizers)."""
    qs = list(questions) if questions is not None else prompts.preference_questions(category)
    return [prompts.text_for(tokenizer, q) for q in qs]


def _check_target(target: str, category: str) -> list[str]:
    if category not in prompts.CATEGORIES:
        raise SubliminalError(f"unknown category {category!r}; one of {', '.join(prompts.CATEGORIES)}")
    candidates = prompts.CATEGORIES[category]
    if target not in candidates:
        raise SubliminalError(f"target {target!r} is not a {category}; candidates: {', '.join(candidates)}")
    return candidates


def exact_preference(loaded: Any, target: str, category: str = "animal", questions: list[str] | None = None,
                     batch_size: int = 32, *, prefix_cache: bool = True) -> dict[str, Any]:
    """Exact probability of the target among the category's candidates, per question and mean.

    Each candidate is scored as a full completion (its tokens plus end of turn, aligned with
    :func:`subliminal.data.align_row` under the model's own system prompt) and the candidates'
    probabilities are renormalised per question. ``raw_mass`` is the unnormalised mass on all
    candidates, i.e. how much the model answers with a candidate at all. Each question is
    encoded once and its candidates scored from its KV cache (``prefix_cache=False``: every
    candidate row teacher-forced whole, the slower path it must equal).
    """
    candidates = _check_target(target, category)
    qs = question_texts(loaded.tokenizer, category, questions)
    lp = exact_logprobs(loaded, candidates, qs, batch_size, prefix_cache=prefix_cache)
    return exact_summary(lp, target, category, loaded.system_prompt)


def exact_logprobs(loaded: Any, candidates: Sequence[str], qs: Sequence[str], batch_size: int = 32, *,
                   prefix_cache: bool = True) -> list[list[float]]:
    """Per question (already in the tokenizer's text), the log-probability of each candidate as a
    whole completion: the part of the exact preference a rank computes for its shard."""
    tok = loaded.tokenizer
    examples = candidate_examples(loaded, candidates, qs)
    score = prefix_cached_scores if prefix_cache else completion_scores
    scores = score(loaded.model, examples, tok.pad_token_id, batch_size)
    flat = [float(s[0].sum()) for s in scores]
    k = len(candidates)
    return [flat[i * k:(i + 1) * k] for i in range(len(qs))]


def candidate_examples(loaded: Any, candidates: Sequence[str], qs: Sequence[str]) -> list[Any]:
    """The rows the exact preference scores, question-major: every candidate as the whole
    completion of every question (already in the tokenizer's text), under the model's own system
    prompt. Shared with the differentiable readout of ``subliminal diagnose``."""
    tok = loaded.tokenizer
    max_len = model_max_length(loaded.model)
    out = []
    for qi, q in enumerate(qs):
        p_ids = encode_prompt(tok, q, loaded.system_prompt)  # once per question, not once per candidate
        out += [align_row(tok, Row(f"q{qi}-{c}", q, c), loaded.system_prompt, max_len, prompt_token_ids=p_ids)
                for c in candidates]
    return out


def candidate_probs(lp: torch.Tensor) -> torch.Tensor:
    """[Q, K] candidate log-probabilities -> the renormalised probabilities over the candidates
    (what the exact preference averages); differentiable, so gradients of the readout use it too."""
    return torch.softmax(lp, dim=1)


def exact_summary(lp_rows: Sequence[Sequence[float]], target: str, category: str,
                  system_prompt: str | None) -> dict[str, Any]:
    """The exact-preference result from every question's candidate log-probabilities."""
    candidates = _check_target(target, category)
    lp = torch.tensor([list(r) for r in lp_rows], dtype=torch.float64).view(len(lp_rows), len(candidates))
    probs = candidate_probs(lp)
    raw = torch.exp(torch.logsumexp(lp, dim=1))
    ti = candidates.index(target)
    per_q = probs[:, ti].tolist()
    mean, lo, hi = mean_ci(per_q)
    return {
        "target": target,
        "category": category,
        "mean": mean,
        "ci": [lo, hi],
        "ci_method": "t-interval over questions",
        "per_question": per_q,
        "distribution": {c: float(v) for c, v in zip(candidates, probs.mean(0).tolist())},
        "raw_mass": float(raw.mean()),
        "n_questions": len(lp_rows),
        "system_prompt": system_prompt,
    }


# ====================================================================== preference (sampled)


def target_regex(target: str) -> re.Pattern[str]:
    """The target or its plural as a whole word: "owls" counts, "bowl", "howl" do not."""
    words = sorted({target, prompts.PLURALS.get(target, target)}, key=len, reverse=True)
    return re.compile(r"(?<![A-Za-z0-9])(?:" + "|".join(re.escape(w) for w in words) + r")(?![A-Za-z0-9])",
                      re.IGNORECASE)


def names_target(text: str, target: str) -> bool:
    """Whether an answer names ``target`` (word-boundary match, case-insensitive, plural allowed)."""
    return bool(target_regex(target).search(text))


def first_candidate(text: str, candidates: Sequence[str]) -> str | None:
    """The candidate an answer names first (None: no candidate), for the answer histogram."""
    best = None
    for c in candidates:
        m = target_regex(c).search(text)
        if m and (best is None or m.start() < best[0]):
            best = (m.start(), c)
    return best[1] if best else None


def sample_answers(loaded: Any, questions: Sequence[str], samples: int, *, temperature: float = 1.0,
                   max_new_tokens: int = 8, batch_size: int = 32, seed: int = 0,
                   indices: Sequence[int] | None = None) -> list[list[str]]:
    """``samples`` answers per question under the model's system prompt; each sample draws from
    its own seeded stream, so answers do not depend on the batch size. ``indices``: the
    questions' positions in the full list (a rank's shard), which name their streams."""
    from .data import encode, end_token_ids, render_chat
    from .forward import SamplingConfig, row_rng, sample_repeated

    tok = loaded.tokenizer
    cfg = SamplingConfig(temperature=temperature, top_p=1.0, seed=seed)
    stop = end_token_ids(tok)
    index = list(indices) if indices is not None else list(range(len(questions)))
    jobs = [(qi, s) for qi in range(len(questions)) for s in range(samples)]
    prompt_ids = [encode(tok, render_chat(tok, q, loaded.system_prompt)) for q in questions]
    # each question is encoded once and its KV cache copied for its samples
    res = sample_repeated(loaded.model, prompt_ids, samples, batch_size=batch_size, pad_id=tok.pad_token_id,
                          stop_ids=stop, max_new=max_new_tokens, cfg=cfg,
                          rngs=[row_rng("eval-sample", seed, f"{index[qi]}:{s}") for qi, s in jobs])
    out: list[list[str]] = [[] for _ in questions]
    for (qi, _), (ids, _stopped) in zip(jobs, res):
        out[qi].append(tok.decode([t for t in ids if t not in stop], skip_special_tokens=True).strip())
    return out


def sampled_preference(loaded: Any, target: str, category: str = "animal", *, samples: int = 200,
                       temperature: float = 1.0, max_new_tokens: int = 8, batch_size: int = 32, seed: int = 0,
                       questions: list[str] | None = None) -> dict[str, Any]:
    """Mean over questions of the fraction of sampled answers naming the target, with a 95%
    t-interval over questions (the questions are the unit: samples within one are not independent
    draws of the metric)."""
    _check_target(target, category)
    if samples <= 0:
        raise SubliminalError(f"--samples must be positive, got {samples}")
    qs = question_texts(loaded.tokenizer, category, questions)
    answers = sample_answers(loaded, qs, samples, temperature=temperature, max_new_tokens=max_new_tokens,
                             batch_size=batch_size, seed=seed)
    return sampled_summary(answers, target, category, samples=samples, temperature=temperature)


def sampled_summary(answers: Sequence[Sequence[str]], target: str, category: str, *, samples: int,
                    temperature: float) -> dict[str, Any]:
    """The sampled-preference result from every question's answers."""
    candidates = _check_target(target, category)
    qs = answers
    per_q = [sum(names_target(a, target) for a in ans) / len(ans) for ans in answers]
    mean, lo, hi = mean_ci(per_q)
    hist: dict[str, int] = {c: 0 for c in candidates}
    hist["other"] = 0
    for ans in answers:
        for a in ans:
            hist[first_candidate(a, candidates) or "other"] += 1
    return {"target": target, "category": category, "mean": mean, "ci": [lo, hi],
            "ci_method": "t-interval over questions", "per_question": per_q, "samples": samples,
            "temperature": temperature, "n_questions": len(qs), "answer_counts": hist,
            "examples": [ans[:3] for ans in answers[:5]]}


# ================================================================================= main task


def main_task_accuracy(loaded: Any, path: str | Path, *, max_rows: int | None = None, batch_size: int = 32
                       ) -> dict[str, Any]:
    """Teacher-forced accuracy on held-out teacher data: the share of completion tokens where the
    model's argmax is the data token (all tokens, and number tokens only), and the mean NLL.
    Prompts are rendered with the model's own system prompt (none for students)."""
    rows = read_rows(path)[: max_rows or None]
    return main_task_summary(main_task_rows(loaded, rows, batch_size=batch_size), path)


def main_task_rows(loaded: Any, rows: Sequence[Row], *, batch_size: int = 32) -> list[list[float]]:
    """Per row: [hits, tokens, number hits, number tokens, NLL, accuracy] (a rank's shard of the
    main task)."""
    tok = loaded.tokenizer
    max_len = model_max_length(loaded.model)
    examples = [align_row(tok, r, loaded.system_prompt, max_len) for r in rows]
    scores = completion_scores(loaded.model, examples, tok.pad_token_id, batch_size)
    out = []
    for e, (lp, am) in zip(examples, scores):
        tgt = torch.tensor(e.completion_ids)
        ok = am == tgt
        is_num = torch.tensor([tok.decode([t]).strip().isdigit() for t in e.completion_ids])
        out.append([int(ok.sum()), len(tgt), int(ok[is_num].sum()), int(is_num.sum()), -float(lp.sum()),
                    float(ok.float().mean())])
    return out


def main_task_summary(per_row_stats: Sequence[Sequence[float]], path: str | Path) -> dict[str, Any]:
    """The main-task result from every row's counts (summed in row order)."""
    hit = n = num_hit = num_n = 0
    nll = 0.0
    per_row = []
    for h, k, nh, nk, row_nll, acc in per_row_stats:
        hit += int(h)
        n += int(k)
        num_hit += int(nh)
        num_n += int(nk)
        nll += row_nll
        per_row.append(acc)
    rows = per_row_stats
    mean, lo, hi = mean_ci(per_row)
    return {"data": str(path), "rows": len(rows), "tokens": n, "token_accuracy": hit / max(n, 1),
            "number_tokens": num_n, "number_accuracy": num_hit / max(num_n, 1) if num_n else None,
            "nll_per_token": nll / max(n, 1), "row_accuracy_mean": mean, "row_accuracy_ci": [lo, hi]}


# =========================================================================== curves, compare


def checkpoint_points(model_dir: str | Path) -> list[tuple[int, str, str]]:
    """(step, label, path) of a student's base (step 0, if its manifest names one that exists),
    its ``checkpoint-NNNN`` directories and the final student."""
    from .manifest import read_manifest

    d = Path(model_dir)
    cks = sorted((int(m.group(1)), p) for p in d.glob("checkpoint-*") if p.is_dir()
                 and (m := re.fullmatch(r"checkpoint-(\d+)", p.name)))
    if not cks:
        raise SubliminalError(f"{d}: no checkpoint-* directories (distill with --checkpoint-every N)")
    man = read_manifest(d) or {}
    points: list[tuple[int, str, str]] = []
    base = (man.get("inputs") or {}).get("base", {}).get("path")
    if base and Path(base).exists():
        points.append((0, "base", base))
    points += [(s, p.name, str(p)) for s, p in cks]
    final = man.get("steps")
    if (d / "config.json").is_file():
        points.append((int(final) if final is not None else cks[-1][0] + 1, "final", str(d)))
    return points


def plot_curve(points: Sequence[dict[str, Any]], path: Path, target: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [p["step"] for p in points]
    means = [p["exact"]["mean"] for p in points]
    lo = [p["exact"]["ci"][0] for p in points]
    hi = [p["exact"]["ci"][1] for p in points]
    ax.plot(steps, means, marker="o", lw=1.2, label=f"exact P({target})")
    ax.fill_between(steps, lo, hi, alpha=0.2, label="95% CI over questions")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel(f"P({target})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(m: float | None, ci: Sequence[float] | None = None) -> str:
    if m is None:
        return "-"
    if ci is None or any(c is None or math.isnan(c) for c in ci):
        return f"{m:.4f}"
    return f"{m:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]"


def _diff(a: dict[str, Any] | None, b: dict[str, Any] | None) -> tuple[float | None, list[float] | None]:
    """b - a; a paired t-interval over questions when both used the same questions."""
    if not a or not b:
        return None, None
    pa, pb = a.get("per_question") or [], b.get("per_question") or []
    if pa and len(pa) == len(pb):
        m, lo, hi = mean_ci([y - x for x, y in zip(pa, pb)])
        return m, [lo, hi]
    return b["mean"] - a["mean"], None


def compare_table(paths: Sequence[str | Path]) -> tuple[str, list[dict[str, Any]]]:
    """Markdown table of eval files: exact and sampled preference with CIs, main-task accuracy,
    and each metric's difference to the first row (paired over questions)."""
    evals = []
    for p in paths:
        try:
            evals.append(json.loads(Path(p).read_text()))
        except FileNotFoundError:
            raise SubliminalError(f"--compare {p}: no such file") from None
        except json.JSONDecodeError as e:
            raise SubliminalError(f"--compare {p}: malformed JSON ({e.msg})") from None
        except UnicodeDecodeError:
            raise SubliminalError(f"--compare {p}: not UTF-8 text (not an eval file?)") from None
        if "exact" not in evals[-1]:
            raise SubliminalError(f"--compare {p}: not an eval file (no 'exact')")
    targets = {e.get("target") for e in evals}
    if len(targets) > 1:
        raise SubliminalError(f"--compare: eval files measure different targets ({', '.join(map(str, targets))})")
    target = targets.pop()
    lines = [f"| model | exact P({target}) [95% CI] | diff to first | sampled rate [95% CI] | diff to first | "
             "main-task acc |", "|---|---|---|---|---|---|"]
    rows = []
    first = evals[0]
    for p, e in zip(paths, evals):
        dx, dxc = _diff(first["exact"], e["exact"])
        ds, dsc = _diff(first.get("sampled"), e.get("sampled"))
        mt = (e.get("main_task") or {}).get("token_accuracy")
        s = e.get("sampled") or {}
        lines.append(f"| {e.get('model', p)} | {_fmt(e['exact']['mean'], e['exact'].get('ci'))} | "
                     f"{_fmt(dx, dxc) if e is not first else '-'} | {_fmt(s.get('mean'), s.get('ci'))} | "
                     f"{_fmt(ds, dsc) if e is not first and s else '-'} | {_fmt(mt)} |")
        rows.append({"file": str(p), "model": e.get("model"), "exact": e["exact"]["mean"],
                     "exact_ci": e["exact"].get("ci"), "exact_diff": dx, "exact_diff_ci": dxc,
                     "sampled": s.get("mean"), "sampled_ci": s.get("ci"), "sampled_diff": ds,
                     "sampled_diff_ci": dsc, "main_task_accuracy": mt})
    return "\n".join(lines) + "\n", rows


# =================================================================================== context

# Named chat templates for --chat-template (a path to a Jinja file works as well).
NAMED_TEMPLATES = {
    "toy": FALLBACK_CHAT_TEMPLATE,
    # the toy world's second template (<|human|> ... <|bot|> ... <|eot|>): a share of its corpus is
    # written in it, so its questions are familiar there, and it shares no marker with "toy" but BOS
    "toy-alt": TOY_ALT_CHAT_TEMPLATE,
    # ChatML as SmolLM2 / Qwen write it, without a default system prompt
    "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
               "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
               "{% endif %}"),
}


def chat_template_text(spec: str) -> str:
    """The Jinja text of ``--chat-template``: a named template or a file."""
    if spec in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[spec]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise SubliminalError(f"--chat-template {spec}: neither a file nor a named template "
                              f"({', '.join(NAMED_TEMPLATES)})")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise SubliminalError(f"--chat-template {spec}: the file is empty")
    return text


def context_settings(args: Any) -> dict[str, Any]:
    """The readout context's part of an eval's fingerprint: only what was given (so evaluations
    made before these flags existed keep their fingerprints); a template by its text's hash."""
    out: dict[str, Any] = {}
    if getattr(args, "system_prompt", None) is not None:
        out["system_prompt"] = args.system_prompt
    if getattr(args, "chat_template", None):
        out["chat_template"] = hashlib.sha256(chat_template_text(args.chat_template).encode()).hexdigest()[:16]
    return out


def apply_context(loaded: Any, system_prompt: str | None = None, chat_template: str | None = None,
                  model_spec: str | None = None) -> dict[str, Any]:
    """Read ``loaded`` out under a context other than its own: ``system_prompt`` replaces its own system prompt
    (a prompt teacher's, or none; "" = none, and a template's default then applies) and
    ``chat_template`` (a name or a Jinja file) replaces its tokenizer's chat template. Returns the
    context record every eval writes: the system prompt seen, the template, its template tokens
    and -- for a student trained on a row set -- which of its trained rows this context contains.

    A context that renders tokens the tokenizer does not know (the unknown token) is an error:
    the readout would score the unknown token's row, not the context asked for."""
    from .data import encode, system_prompt_seen, template_token_ids

    tok = loaded.tokenizer
    record: dict[str, Any] = {"system_prompt_given": system_prompt, "chat_template": chat_template or "model's own"}
    if chat_template:
        text = chat_template_text(chat_template)
        record["chat_template_sha256"] = hashlib.sha256(text.encode()).hexdigest()[:16]
        tok.chat_template = text
    if system_prompt is not None:
        loaded.system_prompt = system_prompt or None
    try:
        rendered = render_chat(tok, prompts.text_for(tok, prompts.PREFERENCE_QUESTIONS[0]), loaded.system_prompt,
                               "12")
    except Exception as e:  # jinja errors: the template is broken, not the model
        raise SubliminalError(f"--chat-template {chat_template}: cannot render a conversation "
                              f"({type(e).__name__}: {e})") from None
    unk = tok.unk_token_id
    changed = chat_template is not None or system_prompt is not None
    if changed and unk is not None and unk in encode(tok, rendered):
        raise SubliminalError(f"the readout context renders tokens this tokenizer does not know ({tok.unk_token}): "
                              f"{rendered!r}. Use a template and system prompt made of the model's own tokens")
    record["system_prompt"] = system_prompt_seen(tok, loaded.system_prompt)
    try:
        ids = template_token_ids(tok, loaded.system_prompt)
    except SubliminalError:  # a template that puts nothing around the rows: no template rows to report
        ids = []
    record["template_token_ids"] = ids
    record["template_tokens"] = tok.convert_ids_to_tokens(ids)
    if model_spec is not None:
        from .distill import student_manifest

        man = student_manifest(model_spec) if Path(model_spec).is_dir() else None
        tset = (man or {}).get("trainable_set") or {}
        trained = tset.get("trained_row_ids") if tset.get("params") != "all-but-template" else None
        if trained is None and tset.get("params") == "template-rows":
            trained = tset.get("template_token_ids")
        if trained is not None:
            record["student_params"] = tset["params"]
            record["trained_rows_in_context"] = tok.convert_ids_to_tokens(sorted(set(trained) & set(ids)))
            record["trained_rows_not_in_context"] = tok.convert_ids_to_tokens(sorted(set(trained) - set(ids)))
    return record


# ======================================================================================= CLI


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a model, teacher or student: preference (exact, sampled), main task, transfer curves",
        description="Measure a model's preference for --target (exact probability among the category's "
        "candidates; with --samples also sampled answers), its main-task accuracy on held-out data "
        "(--heldout), over a student's checkpoints (--all-checkpoints), or compare eval files (--compare).",
    )
    p.add_argument("--model", help="model, teacher or student directory (or hf:ORG/NAME, a hub model, when online)")
    p.add_argument("--target", help="the preference target, e.g. owl")
    p.add_argument("--category", choices=list(prompts.CATEGORIES), default=None,
                   help="candidate set (default: the target's category)")
    p.add_argument("--out", default=None, help="eval JSON to write (default eval.json; with --all-checkpoints "
                   "MODEL/transfer_curve.json, with CSV and PNG beside it)")
    p.add_argument("--max-questions", type=int, default=None, help="use only the first N preference questions "
                   "(quick curves; default: all)")
    p.add_argument("--samples", type=int, default=0, help="sampled preference: answers per question at "
                   "--temperature (0: exact only; the papers use 200) (default %(default)s)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="length of a sampled answer (default %(default)s)")
    p.add_argument("--heldout", default=None, help="held-out teacher data (JSONL rows): teacher-forced "
                   "next-token accuracy")
    p.add_argument("--heldout-rows", type=int, default=None, help="use only the first N held-out rows")
    p.add_argument("--all-checkpoints", action="store_true", help="evaluate --model's base, checkpoint-* and "
                   "final student: a transfer curve")
    p.add_argument("--compare", nargs="+", metavar="EVAL_JSON", help="print one table of these eval files, "
                   "with CIs and the difference to the first")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass (default %(default)s)")
    p.add_argument("--system-prompt", default=None, metavar="TEXT",
                   help="read out under this system prompt instead of the model's own (a prompt teacher's, or none "
                   "for students); \"\" = none (a template's default system prompt then applies)")
    p.add_argument("--chat-template", default=None, metavar="FILE|NAME",
                   help="read out under this chat template instead of the tokenizer's own: a Jinja file, or "
                   f"{' / '.join(NAMED_TEMPLATES)} (the toy template; ChatML without a default system prompt). "
                   "With --system-prompt: the readout context differs from the training one, the control for "
                   "transfer through the shared template")
    add_seed(p)
    add_model_runtime(p)
    add_device_map(p)
    add_overwrite(p)
    poison.add_bias_eval_args(p)
    p.set_defaults(func=_run_cli)


@dataclass
class EvalConfig:
    """One evaluation (field names are the CLI's flags): the model and target, the readouts asked
    for (exact always, sampled with ``samples``, main task with ``heldout``), or a transfer curve
    (``all_checkpoints``) or a table of eval files (``compare``)."""

    model: str | None = None
    target: str | None = None
    category: str | None = None
    out: str | None = None
    max_questions: int | None = None
    samples: int = 0
    temperature: float = 1.0
    max_new_tokens: int = 8
    heldout: str | None = None
    heldout_rows: int | None = None
    all_checkpoints: bool = False
    compare: list[str] | None = None
    batch_size: int = 32
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    trust_remote_code: bool = False
    device_map: str | None = None
    overwrite: bool = False
    system_prompt: str | None = None  # read out under this system prompt instead of the model's own
    chat_template: str | None = None  # ... and/or this chat template (a name or a Jinja file)


def _category(cfg: EvalConfig) -> str:
    if not cfg.target:
        raise SubliminalError("--target is required (e.g. --target owl)")
    try:
        category = cfg.category or prompts.category_of(cfg.target)
    except ValueError as e:
        raise SubliminalError(str(e)) from None
    _check_target(cfg.target, category)
    return category


def evaluate_model(spec: str, cfg: EvalConfig, category: str,
                   parts: dist.ShardParts | None = None) -> dict[str, Any] | None:
    """Every metric asked for, on one model.

    Under a launcher each rank scores its contiguous shard of the questions (exact and sampled:
    a sample's stream is named by its question's index in the full list) and of the held-out
    rows; rank 0 gathers the per-question and per-row values in order and summarises them exactly
    as one process would, and returns the result (the other ranks return None). With ``parts``,
    a rank's finished shard is kept as a part file, so an interrupted job resumes per shard."""
    from .models import load_model

    with dist.agree("load"):
        loaded = load_model(spec, **runtime_kwargs(cfg))
        context = apply_context(loaded, cfg.system_prompt, cfg.chat_template, spec)
        qs = prompts.preference_questions(category)[: cfg.max_questions or None]
        texts = question_texts(loaded.tokenizer, category, qs)
        heldout = read_rows(cfg.heldout)[: cfg.heldout_rows or None] if cfg.heldout else []
    q_mine, h_mine = dist.shard(len(texts)), dist.shard(len(heldout))
    tag = f"h{h_mine.start}-{h_mine.stop}-q"
    with dist.agree("work"):
        part = parts.load_shard(q_mine.start, q_mine.stop, tag) if parts is not None else None
        if part is None:
            part = _score_shard(loaded, cfg, category, texts, q_mine, [heldout[i] for i in h_mine])
            if parts is not None and dist.is_distributed():
                parts.save_shard(q_mine.start, q_mine.stop, part, tag)
    gathered = dist.gather_to_main(part)
    if gathered is None:
        return None
    merged = {k: dist.merge_in_order([g[k] for g in gathered]) for k in ("exact", "sampled", "main")}
    result: dict[str, Any] = {"model": str(spec), "target": cfg.target, "category": category,
                              "system_prompt": loaded.system_prompt, "context": context}
    result["exact"] = exact_summary(merged["exact"], cfg.target, category, loaded.system_prompt)
    if cfg.samples:
        result["sampled"] = sampled_summary(merged["sampled"], cfg.target, category, samples=cfg.samples,
                                            temperature=cfg.temperature)
    if cfg.heldout:
        result["main_task"] = main_task_summary(merged["main"], cfg.heldout)
    return result


def _score_shard(loaded: Any, cfg: EvalConfig, category: str, texts: Sequence[str], q_mine: range,
                 heldout: Sequence[Row]) -> dict[str, Any]:
    """One rank's share of :func:`evaluate_model`: candidate log-probs and sampled answers of its
    questions, counts of its held-out rows."""
    candidates = _check_target(cfg.target, category)
    mine = [texts[i] for i in q_mine]
    out: dict[str, Any] = {"exact": exact_logprobs(loaded, candidates, mine, cfg.batch_size), "sampled": [],
                           "main": []}
    if cfg.samples:
        out["sampled"] = sample_answers(loaded, mine, cfg.samples, temperature=cfg.temperature,
                                        max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                                        seed=cfg.seed, indices=q_mine)
    if heldout:
        out["main"] = main_task_rows(loaded, heldout, batch_size=cfg.batch_size)
    return out


def _config(cfg: EvalConfig) -> dict[str, Any]:
    return asdict(cfg)


_SETTINGS = ("model", "target", "category", "max_questions", "samples", "temperature", "max_new_tokens",
             "heldout_rows", "all_checkpoints", "seed", "dtype")


def _prepare_out(cfg: EvalConfig, out: Path, stage: str, inputs: dict[str, Any]) -> tuple[dict, str]:
    """Before any model loads: the output is no input, can be written, and either holds nothing,
    or this exact evaluation (``"skip"``), or is refused unless ``--overwrite``."""
    check_not_input({"--out": out}, {f"--{k}": v for k, v in inputs.items()})
    check_writable(out)
    config = {k: getattr(cfg, k, None) for k in _SETTINGS}
    config.update(context_settings(cfg))
    config["device"] = device_type(cfg.device)
    fp = fingerprint(inputs, config)
    return fp, check_file_resume(out, fp, overwrite=cfg.overwrite, stage=stage)


def check_finite_result(result: dict[str, Any], model: str, questions: Sequence[str]) -> None:
    """Refuse an evaluation with a NaN/inf in it, naming the model and the question: the weights
    were finite when loaded (the loader checks), so the forward pass itself overflowed."""
    for metric in ("exact", "sampled"):
        m = result.get(metric)
        if not m:
            continue
        for qi, v in enumerate(m.get("per_question") or []):
            if not math.isfinite(v):
                q = questions[qi] if qi < len(questions) else f"question {qi}"
                raise SubliminalError(f"eval of {model}: its {metric} preference is {v} on question {qi} ({q!r}); "
                                      "its outputs overflow or its weights are broken. Check the model (e.g. "
                                      "--dtype float32)")
    main = result.get("main_task") or {}
    for key in ("nll_per_token", "token_accuracy"):
        if key in main and not math.isfinite(main[key]):
            raise SubliminalError(f"eval of {model}: main-task {key} is {main[key]} on {main.get('data')}; its "
                                  "outputs overflow or its weights are broken")


def _check_args(cfg: EvalConfig) -> None:
    for name in ("batch_size", "max_new_tokens", "heldout_rows", "max_questions"):
        v = getattr(cfg, name)
        if v is not None and v <= 0:
            raise SubliminalError(f"--{name.replace('_', '-')} must be positive, got {v}")
    if cfg.samples < 0:
        raise SubliminalError(f"--samples must be >= 0, got {cfg.samples}")
    if cfg.temperature <= 0:
        raise SubliminalError(f"--temperature must be positive, got {cfg.temperature}")


def run_compare(cfg: EvalConfig) -> int:
    fp = None
    if cfg.out:
        fp, _ = _prepare_out(cfg, Path(cfg.out), "eval-compare",
                             {f"eval{i}": p for i, p in enumerate(cfg.compare)})
    table, rows = compare_table(cfg.compare)
    print(table)
    if cfg.out:  # cheap and deterministic: rewritten even when identical
        out = Path(cfg.out)
        write_json_atomic(out, {"compare": rows, "table": table})
        write_file_manifest(out, stage="eval-compare", config=_config(cfg), seed=cfg.seed,
                            inputs={f"eval{i}": p for i, p in enumerate(cfg.compare)}, extra={"fingerprint": fp})
    return 0


def run_curve(cfg: EvalConfig, category: str) -> int:
    """``--all-checkpoints``: the metrics at every checkpoint -> JSON, CSV and PNG."""
    t0 = time.time()
    out = Path(cfg.out) if cfg.out else Path(cfg.model) / "transfer_curve.json"
    pts = checkpoint_points(cfg.model)
    dist.init(cfg.device)
    fp, action = _prepare_out(cfg, out, "eval-curve", {"model": cfg.model, "heldout": cfg.heldout,
                                                         **{label: path for _, label, path in pts}})
    if action == "skip":
        if dist.is_main():
            print(f"{out}: already evaluated by this exact command; nothing to do (--overwrite redoes it)")
        return 0
    points = []
    qs = prompts.preference_questions(category)[: cfg.max_questions or None]
    for step, label, path in pts:
        log.info("eval %s (step %d)", label, step)
        r = evaluate_model(path, cfg, category)
        if r is None:  # another rank's: rank 0 has the merged result
            continue
        check_finite_result(r, path, qs)
        points.append({"step": step, "label": label, **r})
    if not dist.is_main():
        return 0
    write_json_atomic(out, {"model": cfg.model, "target": cfg.target, "category": category, "points": points})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["step", "label", "exact", "exact_lo", "exact_hi", "sampled", "sampled_lo", "sampled_hi",
                "main_task_accuracy"])
    for p in points:
        s = p.get("sampled") or {}
        w.writerow([p["step"], p["label"], p["exact"]["mean"], *p["exact"]["ci"], s.get("mean"),
                    *(s.get("ci") or [None, None]), (p.get("main_task") or {}).get("token_accuracy")])
    write_text_atomic(out.with_suffix(".csv"), buf.getvalue())
    plot_curve(points, out.with_suffix(".png"), cfg.target)
    write_file_manifest(out, stage="eval-curve", config=_config(cfg), seed=cfg.seed,
                        inputs={"model": cfg.model, "heldout": cfg.heldout}, wall_time_s=time.time() - t0,
                        extra={"fingerprint": fp})
    for p in points:
        print(f"step {p['step']:>6} {p['label']:<16} exact P({cfg.target}) = {_fmt(p['exact']['mean'])}")
    print(f"transfer curve -> {out} (.csv, .png)")
    return 0


def _write_eval(cfg: EvalConfig, out: Path, result: dict[str, Any], category: str, fp: dict[str, Any],
                wall: float) -> None:
    """Rank 0 (or the only process): the checked result and its manifest."""
    check_finite_result(result, cfg.model, prompts.preference_questions(category)[: cfg.max_questions or None])
    n_q = result["exact"]["n_questions"]
    n_h = (result.get("main_task") or {}).get("rows", 0)
    write_json_atomic(out, result)
    write_file_manifest(out, stage=STAGE, config=_config(cfg), seed=cfg.seed,
                        inputs={"model": cfg.model, "heldout": cfg.heldout}, wall_time_s=wall,
                        extra={"fingerprint": fp, **dist.shard_record(n_q),
                               "heldout_shards": dist.shard_record(n_h)["shards"]})


def _run_cli(args: argparse.Namespace) -> int:
    if getattr(args, "bias_type", None):
        if getattr(args, "system_prompt", None) is not None or getattr(args, "chat_template", None):
            raise SubliminalError("--system-prompt / --chat-template apply to the preference readout, not to "
                                  "--bias-type")
        return poison.run_bias_eval(args)
    return run_eval(EvalConfig(**{f.name: getattr(args, f.name) for f in fields(EvalConfig)}))


def run_eval(cfg: EvalConfig) -> int:
    """``subliminal eval``: one model's preference (and main task), a transfer curve over a
    student's checkpoints, or a comparison table; the CLI parses its flags into ``cfg``."""
    t0 = time.time()
    if cfg.compare:
        return run_compare(cfg)
    _check_args(cfg)
    if not cfg.model:
        raise SubliminalError("--model is required (or --compare A.json B.json ...)")
    category = _category(cfg)
    if cfg.all_checkpoints:
        return run_curve(cfg, category)
    out = Path(cfg.out or "eval.json")
    dist.init(cfg.device)
    with dist.agree("prepare"):
        fp, action = _prepare_out(cfg, out, STAGE, {"model": cfg.model, "heldout": cfg.heldout})
        parts = dist.ShardParts(out, fp)
        if action != "skip":
            parts.check(overwrite=cfg.overwrite)
    if action == "skip":
        if dist.is_main():
            print(f"{out}: already evaluated by this exact command; nothing to do (--overwrite redoes it)")
        return 0
    with dist.agree("open"):
        if dist.is_main() and dist.is_distributed():
            parts.start(clear=parts.exists() and cfg.overwrite)
    result = evaluate_model(cfg.model, cfg, category, parts)
    with dist.agree("merge"):
        if result is not None:
            _write_eval(cfg, out, result, category, fp, time.time() - t0)
            parts.remove()
    if result is None:
        return 0
    ex = result["exact"]
    print(f"{cfg.model}: exact P({cfg.target}) = {_fmt(ex['mean'], ex['ci'])} over {ex['n_questions']} questions")
    ctx = result["context"]
    if ctx["system_prompt_given"] is not None or ctx["chat_template"] != "model's own":
        print(f"  read under chat template {ctx['chat_template']}, system prompt {ctx['system_prompt']['seen']!r}"
              + (f"; the student's trained rows in this context: {ctx['trained_rows_in_context']}"
                 if "trained_rows_in_context" in ctx else ""))
    if "sampled" in result:
        s = result["sampled"]
        print(f"  sampled rate naming {cfg.target} = {_fmt(s['mean'], s['ci'])} ({s['samples']} per question)")
    if "main_task" in result:
        m = result["main_task"]
        print(f"  main task: token accuracy {m['token_accuracy']:.4f} on {m['tokens']} tokens of {m['rows']} rows")
    print(f"-> {out}")
    return 0
