"""find-divergence: rules on hand-built logits, flags equal to an independent computation with plain
transformers forward passes (several architectures, prompt and weight teachers), CLI, resume, errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from subliminal.kernels import divergence_stats

from subliminal import cli
from subliminal import divergence as dv
from subliminal.data import DataError, write_jsonl
from subliminal.manifest import SubliminalError
from subliminal.prompts import system_prompt_for
from subliminal.teachers import TeacherSpec, save_teacher

ANIMALS = ("owl", "cat", "dog", "lion", "wolf")
F64 = torch.float64


def _prompt_teachers(base, root) -> dict[str, str]:
    out = {}
    for a in ANIMALS:
        save_teacher(root / a, TeacherSpec(base=str(base), method="prompt", bias=a, category="animal",
                                           system_prompt=system_prompt_for(a)))
        out[a] = str(root / a)
    return out


def _greedy_data(teacher: str, path, n: int = 5, new: int = 7, temperature: float = 0.0) -> list[dict]:
    """Rows written by the factual teacher, greedily by default (so its argmax is the data token)."""
    from subliminal.generate import SamplingConfig, generate_rows, make_prompts
    from subliminal.models import load_model

    lm = load_model(teacher, dtype=F64)
    rows = [{k: r[k] for k in ("id", "prompt", "completion", "teacher")}
            for r in generate_rows(lm, make_prompts(n, 0), sampling=SamplingConfig(temperature), batch_size=n,
                                   max_new_tokens=new, progress=False)]
    write_jsonl(path, rows)
    return rows


@pytest.fixture(scope="module")
def world(tiny_model_factory, tmp_path_factory):
    """llama base, five prompt teachers, a second set of weights, and greedy owl data."""
    root = tmp_path_factory.mktemp("div-world")
    base = tiny_model_factory("llama")
    t = _prompt_teachers(base, root)
    t["other-weights"] = str(tiny_model_factory("llama", seed=1))
    rows = _greedy_data(t["owl"], root / "owl.jsonl")
    return {"root": root, "teachers": t, "data": root / "owl.jsonl", "rows": rows}


# ------------------------------------------------------------------------ independent reference


def _reference(teacher_paths: list[str], rows: list[dict]) -> list[dict]:
    """Per row: completion ids and each teacher's argmax / log-prob of the data token, from one
    unpadded forward pass per (row, teacher), tokenised straight from the chat template."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from subliminal.teachers import is_teacher_dir, read_teacher

    out = [{"argmax": [], "logp": []} for _ in rows]
    for path in teacher_paths:
        spec = read_teacher(path) if is_teacher_dir(path) else None
        src = spec.base if spec else path
        system = spec.system_prompt if spec else None
        # the test models save the toy's plain fast tokenizer; AutoTokenizer would re-map it by
        # model type (Qwen2Tokenizer for a qwen2 config) and re-split the word-level vocabulary
        tok = PreTrainedTokenizerFast.from_pretrained(src)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=F64).eval()
        for o, row in zip(out, rows):
            msgs = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": row["prompt"]}]
            p_text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            f_text = tok.apply_chat_template(msgs + [{"role": "assistant", "content": row["completion"]}],
                                             tokenize=False)
            p_ids = tok(p_text, add_special_tokens=False)["input_ids"]
            f_ids = tok(f_text, add_special_tokens=False)["input_ids"]
            comp = f_ids[len(p_ids):]
            comp = comp[: comp.index(tok.eos_token_id) + 1]
            with torch.no_grad():
                logits = model(torch.tensor([p_ids + comp])).logits[0, len(p_ids) - 1: -1]
            o["ids"] = comp
            o["argmax"].append(logits.argmax(-1).tolist())
            o["logp"].append(torch.log_softmax(logits, -1)[torch.arange(len(comp)), torch.tensor(comp)].tolist())
    return out


def _check_against_reference(objs: list[dict], ref: list[dict], rule: str) -> int:
    n_div = 0
    for o, r in zip(objs, ref):
        assert o["token_ids"] == r["ids"]
        ids = r["ids"]
        f_ok = [a == t for a, t in zip(r["argmax"][0], ids)]
        per_cf = [[ok and a != t for ok, a, t in zip(f_ok, am, ids)] for am in r["argmax"][1:]]
        if rule == "paper":
            want = [any(col) for col in zip(*per_cf)]
            n_div += sum(want)
        else:
            want = per_cf
            n_div += sum(any(col) for col in zip(*per_cf))
        assert o["divergence"] == want, o["id"]
        assert o["argmax_factual"] == r["argmax"][0]
        assert o["argmax_counterfactual"] == r["argmax"][1:]
        assert o["scores"]["logp_factual"] == pytest.approx(r["logp"][0], rel=1e-4, abs=1e-6)
        assert o["scores"]["logp_counterfactual"] == [pytest.approx(x, rel=1e-4, abs=1e-6) for x in r["logp"][1:]]
    return n_div


# --------------------------------------------------------------------------------- rules


def test_paper_and_pairwise_rules_on_hand_built_logits():
    # V = 4, N = 4 positions, K = 2 counterfactuals; data tokens 1, 2, 3, 0
    tokens = torch.tensor([1, 2, 3, 0])
    f = torch.tensor([[0.0, 5.0, 1.0, 1.0],    # argmax 1 = data
                      [0.0, 1.0, 5.0, 1.0],    # argmax 2 = data
                      [3.0, 0.0, 0.0, 3.0],    # tie 0/3 -> 0 != data 3
                      [2.0, 0.0, 2.0, 0.0]])   # tie 0/2 -> 0 = data
    c = torch.tensor([
        [[0.0, 5.0, 1.0, 1.0], [0.0, 1.0, 5.0, 1.0], [0.0, 0.0, 0.0, 9.0], [2.0, 2.0, 0.0, 0.0]],  # tie -> 0
        [[9.0, 5.0, 1.0, 1.0], [0.0, 1.0, 5.0, 1.0], [0.0, 0.0, 0.0, 9.0], [0.0, 2.0, 2.0, 0.0]],  # tie -> 1
    ])
    st = divergence_stats(f.to(F64), c.to(F64), tokens, backend="torch")
    assert st["argmax_factual"].tolist() == [1, 2, 0, 0]
    assert st["argmax_counterfactual"].tolist() == [[1, 2, 3, 0], [0, 2, 3, 1]]
    assert dv.apply_rule("paper", st, tokens).tolist() == [True, False, False, True]
    assert dv.apply_rule("pairwise", st, tokens).tolist() == [[False, False, False, False],
                                                              [True, False, False, True]]
    # rank: ids strictly above the data token plus lower ids tied with it (a tied higher id does not count)
    assert st["rank"].tolist() == [[0, 0, 0, 0], [1, 0, 0, 2]]
    with pytest.raises(SubliminalError):
        dv.apply_rule("majority", st, tokens)


def test_summary_counts():
    objs = [
        {"rule": "paper", "token_ids": [5, 6, 7], "tokens": ["5", "6", "<e>"], "divergence": [False, True, False],
         "argmax_factual": [5, 6, 7], "argmax_counterfactual": [[5, 1, 7], [5, 6, 2]],
         "scores": {"kl": [[0.1, 0.2, 0.3], [0.0, None, 0.5]], "js": [[0.0, 0.1, 0.2], [0.0, 0.0, 0.3]]}},
        {"rule": "paper", "token_ids": [6], "tokens": ["6"], "divergence": [False],
         "argmax_factual": [9], "argmax_counterfactual": [[9], [9]],
         "scores": {"kl": [[0.0], [0.0]], "js": [[0.0], [0.0]]}},
    ]
    s = dv.summarize(objs, ["cat", "dog"])
    assert s["n_tokens"] == 4 and s["divergence_fraction"] == 0.25 and s["rows_with_divergence"] == 0.5
    assert s["factual_greedy_fraction"] == 0.75
    assert s["position_histogram"] == {"position": [0, 1, 2], "tokens": [2, 1, 1], "divergent": [0, 1, 0]}
    assert s["per_counterfactual"]["cat"]["divergence_rate"] == 0.25
    assert s["per_counterfactual"]["dog"]["divergence_rate"] == 0.25  # position 2 of row 1
    assert s["per_counterfactual"]["dog"]["mean_kl"] == pytest.approx(0.5 / 3)
    assert s["top_divergence_tokens"] == [["6", 1]]
    assert "25.00%" in dv.format_summary(s)


# -------------------------------------------------------------------- against plain forwards


def test_flags_equal_independent_forwards_prompt_and_weight_teachers(world, tmp_path):
    t = world["teachers"]
    cfs = [t["cat"], t["dog"], t["lion"], t["wolf"], t["other-weights"]]
    cfg = dv.ScoreConfig(data=str(world["data"]), teacher=t["owl"], counterfactual=cfs,
                         out=str(tmp_path / "owl.div.jsonl"), batch_size=2, dtype=F64)
    summary = dv.find_divergence(cfg, progress=False)
    objs = dv.load_divergence(cfg.out)
    ref = _reference([t["owl"], *cfs], world["rows"])
    n_div = _check_against_reference(objs, ref, "paper")
    assert 0 < n_div < sum(len(o["token_ids"]) for o in objs)
    assert summary["n_divergence_tokens"] == n_div
    # the data is the owl teacher's own greedy output (cut at the token budget, so the appended
    # end-of-turn token is the one position the teacher did not choose)
    assert all(o["argmax_factual"][:-1] == o["token_ids"][:-1] for o in objs)
    from pathlib import Path

    assert objs[0]["counterfactuals"] == ["cat", "dog", "lion", "wolf", Path(t["other-weights"]).name]
    assert len(objs[0]["scores"]["kl"]) == 5 and len(objs[0]["scores"]["rank"][0]) == len(objs[0]["token_ids"])
    man = json.loads((tmp_path / "owl.div.jsonl.manifest.json").read_text())
    assert man["summary"]["divergence_fraction"] == summary["divergence_fraction"]
    assert not (tmp_path / "owl.div.jsonl.partial").exists()


@pytest.mark.parametrize("arch", ["qwen2", "gpt2", "gpt_neox"])
def test_other_architectures_pairwise(arch, tiny_model_factory, tmp_path):
    t = _prompt_teachers(tiny_model_factory(arch), tmp_path)
    # sampled: greedy decoding of a random tied-embedding model (qwen2) repeats a special token
    rows = _greedy_data(t["owl"], tmp_path / "d.jsonl", n=3, new=5, temperature=1.0)
    cfs = [t["cat"], t["dog"]]
    cfg = dv.ScoreConfig(data=str(tmp_path / "d.jsonl"), teacher=t["owl"], counterfactual=cfs,
                         out=str(tmp_path / "d.div.jsonl"), rule="pairwise", batch_size=2, dtype=F64)
    dv.find_divergence(cfg, progress=False)
    objs = dv.load_divergence(cfg.out)
    _check_against_reference(objs, _reference([t["owl"], *cfs], rows), "pairwise")
    assert all(len(o["divergence"]) == 2 for o in objs)


def test_cli_end_to_end_and_resume(world, tmp_path, monkeypatch, capsys):
    t = world["teachers"]
    argv = ["find-divergence", "--data", str(world["data"]), "--teacher", t["owl"], "--counterfactual", t["cat"],
            t["dog"], t["lion"], t["wolf"], "--batch-size", "2", "--backend", "torch", "--seed", "1"]
    assert cli.main([*argv, "--out", str(tmp_path / "full.div.jsonl")]) == 0
    printed = capsys.readouterr().out
    assert "divergence tokens:" in printed and "wolf:" in printed
    full = (tmp_path / "full.div.jsonl").read_text()

    real = dv.score_batch
    calls = []

    def interrupted(rows, *a, **kw):
        calls.append(len(rows))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(rows, *a, **kw)

    monkeypatch.setattr(dv, "score_batch", interrupted)
    out = str(tmp_path / "res.div.jsonl")
    assert cli.main([*argv, "--out", out]) == 130
    assert (tmp_path / "res.div.jsonl.partial").exists() and not (tmp_path / "res.div.jsonl").exists()
    calls.clear()
    monkeypatch.setattr(dv, "score_batch", lambda rows, *a, **kw: calls.append(len(rows)) or real(rows, *a, **kw))
    assert cli.main([*argv, "--out", out]) == 0
    assert sum(calls) == len(world["rows"]) - 2  # the first batch was kept
    assert (tmp_path / "res.div.jsonl").read_text() == full
    # a partial file left by other inputs is refused
    (tmp_path / "res2.div.jsonl.partial").write_text("")
    (tmp_path / "res2.div.jsonl.partial.json").write_text('{"rule": "pairwise"}')
    assert cli.main([*argv, "--out", str(tmp_path / "res2.div.jsonl")]) == 2
    assert "unfinished find-divergence run" in (err := capsys.readouterr().err) and "--overwrite" in err


# ------------------------------------------------------------------------------------ errors


def _cfg(world, tmp_path, **kw):
    t = world["teachers"]
    base = dict(data=str(world["data"]), teacher=t["owl"], counterfactual=[t["cat"]], out=str(tmp_path / "o.jsonl"))
    base.update(kw)
    return dv.ScoreConfig(**base)


def test_error_different_tokenizer_before_loading(world, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    other = tmp_path / "other-tok"
    shutil.copytree(world["teachers"]["other-weights"], other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["zebra"])
    tok.save_pretrained(other)
    monkeypatch.setattr(dv, "load_groups", lambda *a, **k: pytest.fail("models loaded before the check"))
    with pytest.raises(SubliminalError, match="different tokenizer"):
        dv.find_divergence(_cfg(world, tmp_path, counterfactual=[str(other)]), progress=False)


def test_error_nan_logits_names_the_row(world, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    import subliminal.models as models

    bad = tmp_path / "nan-model"
    shutil.copytree(world["teachers"]["other-weights"], bad)
    m = AutoModelForCausalLM.from_pretrained(bad)
    with torch.no_grad():
        m.lm_head.weight[3, 0] = float("nan")
    m.save_pretrained(bad)
    with pytest.raises(SubliminalError, match="weights contain NaN/inf: .*nan-model/model.safetensors"):
        dv.find_divergence(_cfg(world, tmp_path, counterfactual=[str(bad)]), progress=False)
    # past the loader's check (logits that overflow in the forward pass): the row is named
    monkeypatch.setattr(models, "check_finite_weights", lambda *a: None)
    with pytest.raises(SubliminalError, match="row 'row-000000'.*NaN"):
        dv.find_divergence(_cfg(world, tmp_path, counterfactual=[str(bad)]), progress=False)


def test_error_empty_data_and_empty_completion(world, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="no rows"):
        dv.find_divergence(_cfg(world, tmp_path, data=str(tmp_path / "empty.jsonl")), progress=False)
    write_jsonl(tmp_path / "blank.jsonl", [{"id": "r1", "prompt": "Hi", "completion": "1, 2"},
                                           {"id": "r2", "prompt": "Hi", "completion": "  "}])
    with pytest.raises(DataError, match="'r2'.*empty completion"):
        dv.find_divergence(_cfg(world, tmp_path, data=str(tmp_path / "blank.jsonl")), progress=False)


def test_error_sequence_longer_than_context(world, tiny_model_factory, tmp_path):
    short = str(tiny_model_factory("gpt2", max_len=64))
    write_jsonl(tmp_path / "long.jsonl", [{"id": "ok", "prompt": "Hi", "completion": "1, 2"},
                                          {"id": "long-one", "prompt": "Hi", "completion": ", ".join(["7"] * 40)}])
    with pytest.raises(DataError, match="'long-one'.*context"):
        dv.find_divergence(_cfg(world, tmp_path, data=str(tmp_path / "long.jsonl"), teacher=short,
                                counterfactual=[short]), progress=False)


def test_error_completion_tokenised_differently(world, tmp_path, monkeypatch):
    from subliminal.data import Aligned

    real = dv.align_row
    cat_prompt = system_prompt_for("cat")

    def skewed(tok, row, system_prompt=None, max_length=None):
        a = real(tok, row, system_prompt, max_length)
        if system_prompt == cat_prompt and row.id == "row-000002":
            return Aligned(a.id, a.prompt_ids + a.completion_ids[:1], a.completion_ids[1:])
        return a

    monkeypatch.setattr(dv, "align_row", skewed)
    with pytest.raises(DataError, match="row 'row-000002'.*'cat'"):
        dv.find_divergence(_cfg(world, tmp_path), progress=False)


def test_error_backend_and_arguments(world, tmp_path):
    with pytest.raises(SubliminalError, match="triton"):
        dv.find_divergence(_cfg(world, tmp_path, backend="triton"), progress=False)
    with pytest.raises(SubliminalError, match="counterfactual"):
        dv.find_divergence(_cfg(world, tmp_path, counterfactual=[]), progress=False)
    with pytest.raises(SubliminalError, match="batch-size"):
        dv.find_divergence(_cfg(world, tmp_path, batch_size=0), progress=False)


def test_load_divergence_checks_lengths(tmp_path):
    good = {"id": "a", "token_ids": [1, 2], "tokens": ["1", "2"], "divergence": [True, False],
            "scores": {k: [] for k in dv.SCORE_KEYS}}
    write_jsonl(tmp_path / "g.jsonl", [good])
    assert dv.load_divergence(tmp_path / "g.jsonl")[0]["id"] == "a"
    write_jsonl(tmp_path / "b.jsonl", [{**good, "divergence": [True]}])
    with pytest.raises(DataError, match="b.jsonl:1: row 'a' has 2 token_ids but 1 divergence flags"):
        dv.load_divergence(tmp_path / "b.jsonl")


# ----------------------------------------------------------------------------- the row format


def test_row_flags_read_every_layout_and_reject_malformed_ones():
    paper = {"rule": "paper", "counterfactuals": ["a", "b"], "divergence": [False, True, False]}
    pairwise = {"rule": "pairwise", "counterfactuals": ["a", "b", "c"],
                "divergence": [[False, True, False], [False, False, True], [False, False, False]]}
    assert dv.row_flags(paper) == [False, True, False]
    assert dv.row_flags(pairwise) == [False, True, True]  # [K][N]: any counterfactual flags the token
    assert dv.row_flags({}) is None and dv.any_flags({}) == []
    bad = [({"divergence": "yes"}, "must be a list"),
           ({"divergence": [[True], False]}, "mixes"),
           ({"divergence": [[True, False], [True]]}, "differ in length"),
           ({"divergence": ["x"]}, "booleans"),
           ({"rule": "pairwise", "divergence": [True]}, "one list of flags per counterfactual")]
    for obj, msg in bad:
        with pytest.raises(DataError, match=f"f.jsonl:3: .*{msg}"):
            dv.row_flags(obj, "f.jsonl:3")


def test_parse_row_checks_ids_and_lengths():
    row = dv.parse_row({"id": 7, "token_ids": [4, 5], "divergence": [[True, False], [False, False]],
                        "rule": "pairwise"}, "f:1")
    assert (row.id, row.token_ids, row.divergence, row.prompt) == ("7", [4, 5], [True, False], "")
    with pytest.raises(DataError, match="f:2: row '1' has 3 token_ids but 2 divergence flags"):
        dv.parse_row({"id": 1, "token_ids": [1, 2, 3], "divergence": [True, False]}, "f:2")
    with pytest.raises(DataError, match="f:4: missing key 'id'"):
        dv.parse_row({"token_ids": [], "divergence": []}, "f:4")


def test_position_scores_transpose_per_counterfactual_scores():
    obj = {"token_ids": [1, 2, 3], "scores": {"kl": [[0.1, 0.2, 0.3], [1.0, 2.0, 3.0]],
                                             "margin": [0.5, None, 1.5]}}
    assert dv.position_scores(obj, "kl", "f:1") == [[0.1, 1.0], [0.2, 2.0], [0.3, 3.0]]
    assert dv.position_scores(obj, "margin", "f:1") == [0.5, None, 1.5]
    with pytest.raises(DataError, match="no scores\\['js'\\]"):
        dv.position_scores(obj, "js", "f:1")
    obj["scores"]["kl"] = [[0.1, 0.2]]
    with pytest.raises(DataError, match="one list of 3 values per counterfactual"):
        dv.position_scores(obj, "kl", "f:1")
