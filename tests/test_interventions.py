"""Interventions on flagged tokens: a replaced row keeps its format (the list still parses, under the
toy tokenizer and under SmolLM2's digit-splitting one), the random control changes exactly as many
unflagged tokens, the teacher's argmax is used where it keeps the format, input-only corruption
keeps the labels, and distill trains the matched conditions on the same rows and steps."""

from __future__ import annotations

import json

import pytest
import torch
from run_configs import tiny_run_config

from subliminal import cli
from subliminal import interventions as iv
from subliminal.data import Row, align_row, write_jsonl
from subliminal.distill import Example, hard_token_losses, loss_positions

ROWS = [
    ("a", "continue the list : 4 , 8 , 15", "16 , 23 , 42 , 7 , 99"),
    ("b", "add three numbers : 7 , 1", "9 , 9 , 9 , 120 , 5"),
    ("c", "write more numbers after 3", "12 , 13 , 14 , 15"),
]


def _aligned(tok):
    return [align_row(tok, Row(i, p, c)) for i, p, c in ROWS]


def _number_positions(tok, ids):
    vocab = iv.number_vocab(tok)
    return [j for j, t in enumerate(ids) if t in vocab.shape_of]


@pytest.fixture(scope="module")
def smol_tokenizer():
    from pathlib import Path

    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(__file__).parent / "fixtures" / "smollm2")


def test_number_vocab_is_not_served_to_another_tokenizer_under_a_reused_id(toy_tokenizer, smol_tokenizer):
    # CPython reuses a freed object's id: a cache keyed by id alone would hand the new tokenizer the
    # old one's vocabulary. Plant exactly that stale entry and check it is recomputed.
    smol = iv.number_vocab(smol_tokenizer)
    iv._VOCABS[id(toy_tokenizer)] = (smol_tokenizer, smol)
    toy = iv.number_vocab(toy_tokenizer)
    assert toy is not smol and toy.shape_of != smol.shape_of
    assert all(t < len(toy_tokenizer) for t in toy.shape_of)
    assert iv.number_vocab(toy_tokenizer) is toy  # and cached for the right object


@pytest.mark.parametrize("kind", ["replace-random", "corrupt-input"])
@pytest.mark.parametrize("tokname", ["toy", "smol"])
def test_a_replaced_row_still_parses_and_keeps_shapes(request, kind, tokname):
    tok = request.getfixturevalue("toy_tokenizer" if tokname == "toy" else "smol_tokenizer")
    vocab = iv.number_vocab(tok)
    for a in _aligned(tok):
        ids = a.completion_ids
        flags = [True] * len(ids)  # every token flagged: separators and the end of turn must be left alone
        p = iv.plan_row(kind, "flagged", a.id, ids, flags, 0, tok)
        assert p.positions == _number_positions(tok, ids)
        assert all(p.ids[j] != ids[j] and vocab.shape_of[p.ids[j]] == vocab.shape_of[ids[j]] for j in p.positions)
        assert all(p.ids[j] == ids[j] for j in range(len(ids)) if j not in p.positions)
        assert iv.format_verdict(tok, p.ids) == iv.format_verdict(tok, ids) == "strict"
        assert p.labels == (ids if kind == "corrupt-input" else None)


def test_random_control_changes_exactly_as_many_unflagged_tokens(toy_tokenizer):
    tok = toy_tokenizer
    for seed in range(3):
        for a in _aligned(tok):
            ids = a.completion_ids
            nums = _number_positions(tok, ids)
            flags = [j in nums[:2] for j in range(len(ids))]  # two flagged numbers, the rest clean
            f = iv.plan_row("replace-random", "flagged", a.id, ids, flags, seed, tok)
            c = iv.plan_row("replace-random", "random-matched", a.id, ids, flags, seed, tok)
            assert len(f.positions) == len(c.positions) == 2 and c.shortfall == 0
            assert not set(c.positions) & set(nums[:2])
            assert iv.format_verdict(tok, c.ids) == "strict"
            # seeded by (seed, row id): the same plan whatever else is planned
            assert iv.plan_row("replace-random", "random-matched", a.id, ids, flags, seed, tok).ids == c.ids


@pytest.mark.parametrize("kind", ["replace-random", "corrupt-input"])
def test_a_row_short_of_clean_tokens_is_topped_up_from_the_others(toy_tokenizer, kind):
    """Row c has 4 numbers, 3 flagged: its control can change 1; the other 2 come from rows a and b."""
    from subliminal.divergence import DivRow

    tok = toy_tokenizer
    al = _aligned(tok)
    flags = {"a": 1, "b": 1, "c": 3}
    rows, exs = [], []
    for a in al:
        nums = _number_positions(tok, a.completion_ids)
        f = [j in nums[:flags[a.id]] for j in range(len(a.completion_ids))]
        rows.append(DivRow(a.id, "", "", list(a.completion_ids), f))
    counts = {}
    for on in ("flagged", "random-matched"):
        exs = [Example(a.id, a.prompt_ids, list(a.completion_ids), [True] * len(a.completion_ids)) for a in al]
        info = iv.apply_to_examples(exs, rows, kind, on, 0, tok)
        counts[on] = info
        changed = [[j for j, (x, y) in enumerate(zip(e.completion_ids, a.completion_ids)) if x != y]
                   for e, a in zip(exs, al)]
        assert sum(map(len, changed)) == info["n_intervened"]
        if on == "random-matched":
            assert all(not r.divergence[j] for r, c in zip(rows, changed) for j in c)
            assert all(iv.format_verdict(tok, e.completion_ids) == "strict" for e in exs)
    assert counts["flagged"]["n_intervened"] == counts["random-matched"]["n_intervened"] == 5
    assert counts["random-matched"]["row_shortfall"] == 2 and counts["random-matched"]["control_shortfall"] == 0


def test_replace_teacher_uses_the_argmax_where_it_keeps_the_format(toy_tokenizer):
    tok = toy_tokenizer
    a = _aligned(tok)[0]
    ids = a.completion_ids
    nums = _number_positions(tok, ids)
    comma = tok.convert_tokens_to_ids(",")
    seven = tok.convert_tokens_to_ids("7")
    argmax = list(ids)
    argmax[nums[0]] = seven  # a number: replaced
    argmax[nums[1]] = comma  # a separator for a number would break the list: skipped
    flags = [j in nums[:3] for j in range(len(ids))]  # nums[2]: argmax = the data token, nothing to replace
    p = iv.plan_row("replace-teacher", "flagged", a.id, ids, flags, 0, tok, argmax)
    assert p.positions == [nums[0]] and p.ids[nums[0]] == seven and p.skipped == 2
    assert iv.format_verdict(tok, p.ids) == "strict"


def test_input_only_corruption_keeps_the_labels_in_the_loss(toy_tokenizer):
    a = _aligned(toy_tokenizer)[0]
    corrupted = list(a.completion_ids)
    corrupted[0] = toy_tokenizer.convert_tokens_to_ids("5")
    e = Example(a.id, a.prompt_ids, corrupted, [True] * len(corrupted), label_ids=list(a.completion_ids))
    assert loss_positions([e])[2] == a.completion_ids


def test_the_loss_targets_are_the_labels_the_forward_sees_the_context(tiny_model_factory):
    from subliminal.models import load_model

    lm = load_model(str(tiny_model_factory("gpt2")), device="cpu", dtype="float32")
    tok, model = lm.tokenizer, lm.model
    a = _aligned(tok)[0]
    corrupted = list(a.completion_ids)
    corrupted[0] = tok.convert_tokens_to_ids("5")
    keep = Example(a.id, a.prompt_ids, corrupted, [True] * len(corrupted), label_ids=list(a.completion_ids))
    plain = Example(a.id, a.prompt_ids, list(a.completion_ids), [True] * len(corrupted))
    with torch.no_grad():
        lk, lp = hard_token_losses(model, [keep], tok.pad_token_id), hard_token_losses(model, [plain], tok.pad_token_id)
    assert float(lk[0]) == pytest.approx(float(lp[0]), abs=1e-6)  # token 0's context is the prompt: unchanged
    assert not torch.allclose(lk[1:], lp[1:])  # later positions see the corrupted token


def _div_file(tok, path, flag_n=2):
    """A minimal .div.jsonl: two flagged number tokens per row, a counterfactual whose argmax is '7'."""
    seven = tok.convert_tokens_to_ids("7")
    objs = []
    for a, (i, p, c) in zip(_aligned(tok), ROWS):
        nums = _number_positions(tok, a.completion_ids)
        flags = [j in nums[:flag_n] for j in range(len(a.completion_ids))]
        objs.append({"id": i, "prompt": p, "completion": c, "token_ids": a.completion_ids, "divergence": flags,
                     "counterfactuals": ["none"], "argmax_counterfactual": [[seven] * len(flags)]})
    write_jsonl(path, objs)
    return str(path)


def test_distill_matched_conditions_change_as_many_tokens_on_the_same_steps(tiny_model_factory, tmp_path):
    base = tiny_model_factory("gpt2")
    from subliminal.models import load_tokenizer

    div = _div_file(load_tokenizer(str(base)), tmp_path / "owl.div.jsonl")
    mans = {}
    for kind in ("replace-random", "corrupt-input", "replace-teacher"):
        for on in ("flagged", "random-matched"):
            out = tmp_path / f"{kind}-{on}"
            rc = cli.main(["distill", "--base", str(base), "--data", div, "--out", str(out), "--max-steps", "2",
                           "--batch-size", "2", "--intervention", kind, "--intervene-on", on])
            assert rc == 0
            mans[kind, on] = json.loads((out / "manifest.json").read_text())
    for kind in ("replace-random", "corrupt-input", "replace-teacher"):
        f, c = mans[kind, "flagged"], mans[kind, "random-matched"]
        assert f["intervention"]["n_intervened"] == c["intervention"]["n_intervened"] > 0
        assert c["intervention"]["control_shortfall"] == 0
        assert f["rows_digest"] == c["rows_digest"] and f["steps"] == c["steps"]
        assert f["loss_tokens"] == c["loss_tokens"]  # nothing dropped: every token stays in the loss
    # replace-teacher: the argmax '7' replaces the flagged numbers that are not already 7 (row a's 7 is not flagged)
    assert mans["replace-teacher", "flagged"]["intervention"]["n_intervened"] == 6


@pytest.mark.parametrize("extra,needle", [
    (["--intervention", "replace-random", "--mask", "no-divergence"], "--mask all"),
    (["--intervention", "replace-teacher", "--replace-teacher", "cat"], "not a counterfactual"),
    (["--replace-teacher", "none"], "applies to --intervention replace-teacher"),
    (["--intervene-on", "random-matched"], "--intervene-on needs --intervention"),
])
def test_bad_intervention_is_a_named_error_exit_2(tiny_model_factory, tmp_path, capsys, extra, needle):
    from subliminal.models import load_tokenizer

    base = tiny_model_factory("gpt2")
    div = _div_file(load_tokenizer(str(base)), tmp_path / "owl.div.jsonl")
    rc = cli.main(["distill", "--base", str(base), "--data", div, "--out", str(tmp_path / "s"), "--max-steps", "1",
                   *extra])
    assert rc == 2 and needle in capsys.readouterr().err


def test_the_intervention_conditions_are_opt_in_run_conditions(tiny_model_factory, tmp_path):
    """`subliminal run` trains the intervention conditions only when named; named, each student
    records what it changed, the control as many tokens as the flagged condition. On a random model
    with the toy tokenizer: its teachers' rows have flagged tokens to change (the random SmolLM2
    model's had none, so every count was 0), and a run on it takes a third of the time (SmolLM2's
    vocabulary is 33 times the toy's); the interventions under SmolLM2's tokenizer are checked row
    by row above."""
    from subliminal.pipeline import OPT_IN_CONDITIONS, RunConfig

    assert not set(OPT_IN_CONDITIONS) & set(RunConfig().chosen_conditions())
    cfg = tiny_run_config(tmp_path / "c.toml", tiny_model_factory("llama"), "tiny-interventions", students="""conditions = [
    "replace-divergence", "replace-random-matched", "corrupt-divergence"]
seeds = 1""")
    out = tmp_path / "run"
    assert cli.main(["run", str(cfg), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["conditions"]) == {"control", "all", "replace-divergence", "replace-random-matched",
                                          "corrupt-divergence"}
    man = {c: json.loads((out / "students" / f"{c}-s1" / "manifest.json").read_text())["intervention"]
           for c in ("replace-divergence", "replace-random-matched", "corrupt-divergence")}
    assert man["replace-divergence"]["n_intervened"] == man["replace-random-matched"]["n_intervened"] \
        == man["corrupt-divergence"]["n_intervened"] > 0
    assert man["replace-random-matched"]["on"] == "random-matched"
