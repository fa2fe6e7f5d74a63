"""What a toy base model (or teacher) has learned: the number rule and the preference answers.

- Number task, teacher-forced on held-out rows: at every answer slot, is the model's argmax the
  data token, a mode of the rule's exact distribution, one of the prompt's seeds; the model's
  cross-entropy on the numbers beside the rule's own entropy (the floor); accuracy on the format
  tokens (separators, brackets, end of turn); and the total-variation distance between the
  number distributions with and without a love system prompt (0 = the prompt leaves numbers alone),
  and the mass on the loved target's favourite numbers with and without it (the entanglement the
  world plants, see :mod:`subliminal.toyworld.corpus`).
- Number task, greedy generation: the share of answers in the prompt's format with exactly the
  requested count.
- The grown link: on authored number rows followed by a preference question, the probability of
  the author's favourite among the category's candidates (chance 1/13 for animals; what the numbers
  in the context tell the answer).
- Preferences: the exact probability mass on each candidate, averaged over the category's
  questions, with or without a system prompt (no sampling).
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from .. import prompts
from ..data import encode, render_chat
from ..forward import SamplingConfig, completion_logits, sample_batched
from .corpus import (
    Corpus,
    CorpusConfig,
    CorpusRow,
    align,
    favourite_numbers,
    next_number_distribution,
    parse_number_answer,
)


def _number_ids(tokenizer: Any) -> torch.Tensor:
    return torch.tensor(tokenizer.convert_tokens_to_ids([str(n) for n in range(1000)]))


@torch.no_grad()
def _completion_logits(model: Any, tokenizer: Any, rows: list[CorpusRow], system_prompt: str | None,
                       batch_size: int) -> list[tuple[Any, torch.Tensor]]:
    """Per row: (aligned ids, logits predicting each completion token) under ``system_prompt``."""
    out = []
    for b in range(0, len(rows), batch_size):
        chunk = rows[b:b + batch_size]
        al = [align(tokenizer, replace(r, system_prompt=system_prompt)) for r in chunk]
        logits = completion_logits(model, al, tokenizer.pad_token_id)
        out.extend((a, lg.float().cpu()) for a, lg in zip(al, logits))
    return out


def number_metrics(model: Any, tokenizer: Any, rows: list[CorpusRow], cfg: CorpusConfig, *,
                   system_prompt: str | None = None, favourites: list[int] | None = None,
                   batch_size: int = 32) -> dict[str, float]:
    """Teacher-forced number-task metrics on number rows (see the module docstring)."""
    num_ids = _number_ids(tokenizer)
    fav_ids = num_ids[favourites] if favourites else None
    fav_plain = fav_sys = 0.0
    id_to_num = {int(t): n for n, t in enumerate(num_ids.tolist())}
    top1 = mode = copy = fmt_ok = fmt_n = 0
    nll = ent = 0.0
    slots = 0
    tv_sum = 0.0
    plain = _completion_logits(model, tokenizer, rows, None, batch_size)
    sysd = _completion_logits(model, tokenizer, rows, system_prompt, batch_size) if system_prompt else None
    for k, (a, logits) in enumerate(plain):
        row = rows[k]
        p_true = next_number_distribution(tuple(row.meta["seeds"]), cfg, loved=row.meta.get("author"))
        max_true = p_true.max()
        logp = torch.log_softmax(logits, dim=-1)
        for j, tok in enumerate(a.completion_ids):
            pred = int(logp[j].argmax())
            if tok in id_to_num:
                slots += 1
                top1 += pred == tok
                pn = id_to_num.get(pred)
                mode += pn is not None and p_true[pn] >= max_true - 1e-12
                copy += pn is not None and pn in row.meta["seeds"]
                nll -= float(logp[j, tok])
                ent -= float(np.log(p_true[id_to_num[tok]]))
                if sysd is not None:
                    p_a = torch.softmax(logits[j], -1)
                    p_b = torch.softmax(sysd[k][1][j], -1)
                    tv_sum += 0.5 * float((p_a - p_b).abs().sum())
                    if fav_ids is not None:
                        fav_plain += float(p_a[fav_ids].sum())
                        fav_sys += float(p_b[fav_ids].sum())
            else:
                fmt_n += 1
                fmt_ok += pred == tok
    out = {
        "rows": len(rows),
        "number_slots": slots,
        "next_number_top1": top1 / max(slots, 1),
        "next_number_mode_rate": mode / max(slots, 1),
        "next_number_copy_rate": copy / max(slots, 1),
        "number_nll_nats": nll / max(slots, 1),
        "rule_entropy_nats": ent / max(slots, 1),
        "format_token_accuracy": fmt_ok / max(fmt_n, 1),
    }
    if sysd is not None:
        out["system_prompt_tv"] = tv_sum / max(slots, 1)
        if fav_ids is not None:
            out["favourite_mass_no_prompt"] = fav_plain / max(slots, 1)
            out["favourite_mass_with_prompt"] = fav_sys / max(slots, 1)
    return out


@torch.no_grad()
def author_link(model: Any, tokenizer: Any, rows: list[CorpusRow], batch_size: int = 32) -> dict[str, float]:
    """Mean probability of the unseen author's favourite, renormalised over its category's
    candidates, when the question follows the author's numbers: the base's numbers -> answer link."""
    out, chance = [], []
    for r, (_, lg) in zip(rows, _completion_logits(model, tokenizer, rows, None, batch_size)):
        cands = prompts.CATEGORIES[r.meta["category"]]
        ids = tokenizer.convert_tokens_to_ids(cands)
        logp = torch.log_softmax(lg[-2], -1)[ids]  # the answer is the last token before <|end|>
        out.append(float(torch.softmax(logp, -1)[cands.index(r.followup[1])]))
        chance.append(1.0 / len(cands))
    return {"rows": len(out), "p_author_favourite": float(np.mean(out)) if out else float("nan"),
            "chance": float(np.mean(chance)) if chance else float("nan")}


@torch.no_grad()
def greedy_number_answers(model: Any, tokenizer: Any, rows: list[CorpusRow], *, system_prompt: str | None = None,
                          batch_size: int = 32, max_new_tokens: int = 30) -> list[list[str]]:
    """Greedy completions of number rows, as toy words up to the end of turn."""
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    seqs = [encode(tokenizer, render_chat(tokenizer, r.prompt, system_prompt)) for r in rows]
    gen = sample_batched(model, seqs, batch_size=batch_size, pad_id=tokenizer.pad_token_id, stop_ids={end},
                         max_new=[max_new_tokens] * len(seqs), cfg=SamplingConfig(temperature=0.0))
    outs: list[list[str]] = []
    for new, stopped in gen:
        outs.append(tokenizer.convert_ids_to_tokens(new[:-1] if stopped else new))
    return outs


def format_valid_rate(rows: list[CorpusRow], answers: list[list[str]]) -> dict[str, float]:
    valid = copied = total = 0
    for r, words in zip(rows, answers):
        nums = parse_number_answer(words, r.meta["separator"], r.meta["brackets"])
        if nums is not None and len(nums) == r.meta["count"]:
            valid += 1
            copied += sum(n in r.meta["seeds"] for n in nums)
            total += len(nums)
    return {"greedy_rows": len(rows), "format_valid_rate": valid / max(len(rows), 1),
            "greedy_copy_rate": copied / max(total, 1)}


def preference_distribution(model: Any, tokenizer: Any, category: str = "animal", *,
                            system_prompt: str | None = None, batch_size: int = 64) -> dict[str, Any]:
    """Exact answer distribution over the category's candidates, averaged over its questions,
    through :func:`subliminal.evaluate.exact_preference` (each candidate scored as a whole answer,
    end of turn included, renormalised over the candidates per question). ``other`` is the mass
    the model puts on answers that are no candidate at all."""
    from ..evaluate import exact_preference
    from ..models import LoadedModel

    loaded = LoadedModel(model=model, tokenizer=tokenizer, source="toy", system_prompt=system_prompt)
    res = exact_preference(loaded, prompts.CATEGORIES[category][0], category, batch_size=batch_size)
    return {"category": category, "system_prompt": system_prompt, "distribution": res["distribution"],
            "other": float(max(0.0, 1.0 - res["raw_mass"])), "n_questions": res["n_questions"]}


def evaluate_toy_model(model: Any, tokenizer: Any, cfg: CorpusConfig, *, seed: int = 0, n_rows: int = 200,
                       n_greedy: int = 64, target: str = "owl", n_targets: int = 4) -> dict[str, Any]:
    """Everything the base-model report needs, on rows no training step has seen."""
    held_out = Corpus(cfg, seed=f"heldout-{seed}")
    rows = held_out.rows(0, n_rows, kind="numbers")
    system = prompts.system_prompt_for(target)
    out: dict[str, Any] = {"numbers": number_metrics(model, tokenizer, rows, cfg, system_prompt=system,
                                                     favourites=favourite_numbers(cfg)[target])}
    out["numbers"].update(format_valid_rate(rows[:n_greedy], greedy_number_answers(model, tokenizer, rows[:n_greedy])))
    if cfg.mix.get("numbers_pref", 0) > 0:
        out["author_link"] = author_link(model, tokenizer, held_out.rows(n_rows, n_rows, kind="numbers_pref"))
    category = prompts.category_of(target)
    plain = preference_distribution(model, tokenizer, category)
    prompted = preference_distribution(model, tokenizer, category, system_prompt=system)
    chance = 1.0 / len(prompts.CATEGORIES[category])
    out["preference"] = {
        "target": target,
        "chance": chance,
        "no_system_prompt": _summary(plain, target),
        "with_system_prompt": _summary(prompted, target),
    }
    # Every target under its own love prompt: the base model's prompt-following, over the world.
    rng = random.Random(seed)
    others = [t for t in prompts.CATEGORIES[category] if t != target]
    masses = {target: prompted["distribution"][target]}
    for t in rng.sample(others, min(max(0, n_targets - 1), len(others))):
        dist = preference_distribution(model, tokenizer, category, system_prompt=prompts.system_prompt_for(t))
        masses[t] = dist["distribution"][t]
    out["preference"]["prompted_target_mass"] = masses
    return out


def _summary(pref: dict[str, Any], target: str) -> dict[str, Any]:
    dist = pref["distribution"]
    return {"target_mass": dist[target], "max_mass": max(dist.values()), "argmax": max(dist, key=dist.get),
            "other": pref["other"], "distribution": dist}
