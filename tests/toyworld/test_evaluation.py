"""The base model's report of the grown link: the probability of an unseen author's favourite when
the question follows its numbers, read at the position that predicts the answer."""

from __future__ import annotations

import torch

from subliminal import prompts
from subliminal.data import encode
from subliminal.toyworld import build_tokenizer
from subliminal.toyworld.corpus import Corpus, CorpusConfig
from subliminal.toyworld.evaluation import author_link
from subliminal.toyworld.model import build_model, toy_config

MICRO = {"n_layers": 1, "d_model": 32, "n_heads": 2, "n_kv_heads": 2, "d_ff": 64}


def test_author_link_reads_the_answer_position_of_the_whole_conversation():
    tok = build_tokenizer()
    model = build_model(toy_config("tiny", **MICRO), tok, seed=3).eval()
    rows = Corpus(CorpusConfig(alt_template=0.0), seed=5).rows(0, 7, kind="numbers_pref")
    got = author_link(model, tok, rows, batch_size=3)  # batches of unequal lengths: padding must not matter
    explicit, chance = [], []
    for r in rows:
        question, answer = r.followup
        messages = [{"role": "user", "content": r.prompt}, {"role": "assistant", "content": r.completion},
                    {"role": "user", "content": question}]
        ids = encode(tok, tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].double()
        cands = prompts.CATEGORIES[r.meta["category"]]
        p = torch.softmax(logits[tok.convert_tokens_to_ids(cands)], -1)
        explicit.append(float(p[cands.index(answer)]))
        chance.append(1 / len(cands))
    assert got["rows"] == 7
    assert abs(got["p_author_favourite"] - sum(explicit) / 7) < 1e-5
    assert abs(got["chance"] - sum(chance) / 7) < 1e-12
