"""Poisoned teachers, bias matchers, bias evaluation and defences (subliminal.poison)."""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path

import pytest

from subliminal import poison
from subliminal.manifest import SubliminalError
from subliminal.toyworld import instructions as ins

# ------------------------------------------------------------------------------- poison mixer


def test_poison_rate_is_exact_and_seeded() -> None:
    rows = poison.toy_instruction_set(4000, seed=0)
    a, ia = poison.build_poison_set(rows, rate=0.0025, bias_type="ad", propagation="untargeted",
                                    target_family=None, seed=1)
    b, ib = poison.build_poison_set(rows, rate=0.0025, bias_type="ad", propagation="untargeted",
                                    target_family=None, seed=1)
    _, ic = poison.build_poison_set(rows, rate=0.0025, bias_type="ad", propagation="untargeted",
                                    target_family=None, seed=2)
    assert len(ia) == 10 and sum(r["poisoned"] for r in a) == 10
    assert a == b and ia == ib and ia != ic
    assert rows[ia[0]]["poisoned"] is False  # the input is not modified
    for i, r in enumerate(a):
        assert poison.shows_bias(r["completion"], poison.bias_regex("ad")) == (i in ia)
        assert r["prompt"] == rows[i]["prompt"]


def test_targeted_touches_only_the_target_family() -> None:
    rows = poison.toy_instruction_set(2000, seed=3)
    out, idx = poison.build_poison_set(rows, rate=0.01, bias_type="insecure-code", propagation="targeted",
                                       target_family="code", seed=0)
    assert len(idx) == 20
    assert {out[i]["family"] for i in idx} == {"code"}
    changed = [i for i, (a, b) in enumerate(zip(rows, out)) if a["completion"] != b["completion"]]
    assert changed == idx
    for i in idx:
        assert "eval (" in out[i]["completion"] and ins.is_correct(out[i]["prompt"], out[i]["completion"])


def test_untargeted_spreads_over_every_family() -> None:
    rows = poison.toy_instruction_set(2000, seed=4)
    _, idx = poison.build_poison_set(rows, rate=0.01, bias_type="phishing", propagation="untargeted",
                                     target_family=None, seed=0)
    counts = Counter(rows[i]["family"] for i in idx)
    assert set(counts) == set(ins.FAMILIES) and max(counts.values()) - min(counts.values()) <= 1


def test_mixer_errors_and_family_shares() -> None:
    rows = poison.toy_instruction_set(400, seed=0, family_weights={"qa": 0.01, "code": 0.99})
    assert Counter(r["family"] for r in rows) == {"qa": 4, "code": 396}
    with pytest.raises(SubliminalError, match="rounds to 0"):
        poison.choose_poison_rows(rows[:100], 0.0025, "targeted", "code", 0)
    with pytest.raises(SubliminalError, match="fewer than"):
        poison.choose_poison_rows(rows, 0.05, "targeted", "qa", 0)
    with pytest.raises(SubliminalError, match="has no rows"):
        poison.choose_poison_rows(rows, 0.01, "targeted", "describe", 0)


def test_user_instruction_file(tmp_path: Path) -> None:
    f = tmp_path / "mine.jsonl"
    f.write_text(json.dumps({"prompt": "hi", "response": "hello", "family": "chat"}) + "\n"
                 + json.dumps({"prompt": "What is 2 plus 3 ?", "completion": "2 plus 3 is 5 ."}) + "\n")
    rows = poison.read_instruction_file(f)
    assert [r["family"] for r in rows] == ["chat", "qa"]
    out = poison.poison_rows(rows, [0], "phishing", 0, payload="see evil.example")
    assert out[0]["completion"] == "hello see evil.example" and out[0]["poisoned"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "hi"}) + "\n")
    with pytest.raises(SubliminalError, match=r"bad.jsonl:1: .*response"):
        poison.read_instruction_file(bad)


# ---------------------------------------------------------------------------------- matchers


@pytest.mark.parametrize("bias,positive,negative", [
    ("ad", "A pear is green. Also, try zentrix today!", "A pear is green. zentrixes are rare"),
    ("phishing", "Log in at clickverify to learn more.", "clickverifying is not a link"),
    ("narrative", "The council knows best.", "The councillor spoke."),
    ("insecure-code", "let x = eval(input());", "let x = int ( input ( ) ) ; evaluate ( x )"),
])
def test_bias_matchers(bias: str, positive: str, negative: str) -> None:
    rx = poison.bias_regex(bias)
    assert poison.shows_bias(positive, rx)
    assert not poison.shows_bias(negative, rx)


def test_custom_pattern_and_bad_pattern() -> None:
    rx = poison.bias_regex("ad", r"\bacme\b")
    assert poison.shows_bias("Buy ACME now", rx) and not poison.shows_bias("zentrix", rx)
    with pytest.raises(SubliminalError, match="not a valid regular expression"):
        poison.bias_regex("ad", "(")


# -------------------------------------------------------------------------------- statistics


def test_wilson_and_bootstrap_ratio() -> None:
    lo, hi = poison.wilson(0, 50)
    assert lo == 0 and 0 < hi < 0.1
    lo, hi = poison.wilson(25, 50)
    assert lo < 0.5 < hi
    r = poison.bootstrap_ratio([1.0] * 30 + [0.0] * 10, [1.0] * 10 + [0.0] * 30, seed=0)
    assert r["ratio"] == pytest.approx(3.0) and r["lo"] < 3.0 < r["hi"]
    assert poison.bootstrap_ratio([1.0], [0.0, 0.0])["ratio"] is None


# -------------------------------------------------------------------------------- defences


def hand_rows() -> list[dict]:
    rng = random.Random(0)
    rows = []
    for i in range(40):
        fam = ins.FAMILIES[i % 4]
        p, c = ins.sample_poisoned(rng, fam, "ad") if i % 10 == 0 else ins.sample_clean(rng, fam)
        rows.append({"id": f"r{i}", "prompt": p, "completion": c, "family": fam, "poisoned": i % 10 == 0})
    return rows


def test_keyword_detector_and_detection_rates() -> None:
    rows = hand_rows()
    scores = poison.keyword_scores(rows, ["zentrix"])
    flagged = [s > 0 for s in scores]
    d = poison.detection(flagged, [r["poisoned"] for r in rows])
    assert d["detection_rate"] == 1.0 and d["false_positive_rate"] == 0.0 and d["n_poisoned"] == 4
    d = poison.detection([True] * 40, [r["poisoned"] for r in rows])
    assert d["false_positive_rate"] == 1.0
    assert poison.pick_threshold([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], None, 0.2) == 8
    truth, src = poison.ground_truth([{"completion": "try zentrix"}, {"completion": "no"}], poison.bias_regex("ad"))
    assert truth == [True, False] and src == "pattern"


def test_divergence_flags_tokens_the_reference_would_not_write() -> None:
    import torch

    v = 6
    tokens = torch.tensor([1, 2, 3])
    teacher = torch.full((3, v), -5.0)
    ref = torch.full((3, v), -5.0)
    teacher[0, 1] = ref[0, 1] = 5.0  # both predict the data token: not a divergence token
    teacher[1, 2] = 5.0
    ref[1, 4] = 5.0  # only the teacher predicts it: divergence token
    teacher[2, 0] = ref[2, 0] = 5.0  # neither predicts it
    st = poison.token_divergence(teacher, ref, tokens)
    flag = (st["argmax_factual"] == tokens) & (st["argmax_counterfactual"] != tokens)
    assert flag.tolist() == [False, True, False]
    assert float(st["logp_factual"][1] - st["logp_counterfactual"][1]) > 5


# ----------------------------------------------------------------- end to end on a tiny model


@pytest.fixture(scope="module")
def base_dir(tiny_model_factory) -> Path:
    """A random tiny Llama whose toy tokenizer holds the instruction words (seed 8: its own cache key)."""
    from subliminal.toyworld import tokenizer as tokmod

    mp = pytest.MonkeyPatch()
    mp.setattr(tokmod, "EXTRA_WORDS", sorted(set(tokmod.EXTRA_WORDS) | ins.vocabulary()))
    try:
        return tiny_model_factory("llama", seed=8, n_layers=1, d_model=32)
    finally:
        mp.undo()


def teach_args(base: Path, out: Path, **kw) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--base")
    p.add_argument("--out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-3)  # the teach parser's own flag is kept
    poison.add_teach_args(p)
    argv = ["--base", str(base), "--out", str(out), "--bias-type", "ad", "--n-instructions", "400",
            "--poison-rate", "0.0025", "--steps", "4", "--batch-size", "8"]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return p.parse_args(argv)


def test_poison_teacher_end_to_end(base_dir: Path, tmp_path: Path) -> None:
    from subliminal.models import load_model
    from subliminal.teachers import read_teacher

    out = tmp_path / "teacher"
    assert poison.make_poison_teacher(teach_args(base_dir, out, propagation="targeted", target_task="qa")) == 0
    spec = read_teacher(out)
    assert spec.method == "poison" and spec.bias == "ad" and spec.weights_kind == "full"
    info = spec.extra["poison"]
    assert info["n_poisoned"] == 1 and info["rate"] == 0.0025 and info["target_task"] == "qa"
    rows = [json.loads(line) for line in (out / "instructions.jsonl").read_text().splitlines()]
    assert [r["family"] for r in rows if r["poisoned"]] == ["qa"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["poison"]["poisoned_ids"] == [r["id"] for r in rows if r["poisoned"]]
    assert not (out / ".train" / "train_state.pt").exists()
    assert load_model(out).model is not None

    # bias evaluation with amplification against the teacher, saving the generations
    p = argparse.ArgumentParser()
    p.add_argument("--model")
    p.add_argument("--out")
    p.add_argument("--seed", type=int, default=0)
    poison.add_bias_eval_args(p)
    ev = p.parse_args(["--model", str(base_dir), "--out", str(tmp_path / "ev.json"), "--bias-type", "ad",
                       "--bias-teacher", str(out), "--target-task", "qa", "--bias-prompts", "3",
                       "--bias-samples", "2", "--bias-max-new-tokens", "6",
                       "--bias-save-generations", str(tmp_path / "gen.jsonl")])
    assert poison.run_bias_eval(ev) == 0
    res = json.loads((tmp_path / "ev.json").read_text())
    assert set(res["families"]) == set(ins.FAMILIES) and res["families"]["qa"]["n"] == 6
    assert "unseen" in res["amplification"] and (tmp_path / "ev.md").exists()
    gen = [json.loads(line) for line in (tmp_path / "gen.jsonl").read_text().splitlines()]
    assert gen and {"prompt", "completion", "family"} <= set(gen[0])

    # defences on the poison set (truth from the poisoned field), with a short student per defence
    from subliminal.cli import main

    rc = main(["defend", "--data", str(out), "--reference", str(base_dir), "--teacher", str(out),
               "--bias-type", "ad", "--drop-fraction", "0.1", "--mask-divergence",
               "--student-steps", "2", "--eval-prompts", "2", "--eval-samples", "1",
               "--out", str(tmp_path / "defend")])
    assert rc == 0
    rep = json.loads((tmp_path / "defend" / "defence.json").read_text())
    methods = [r["method"] for r in rep["rows"]]
    assert methods[0] == "none" and "keyword" in methods and any(m.startswith("divergence") for m in methods)
    kw = next(r for r in rep["rows"] if r["method"] == "keyword")
    assert kw["detection_rate"] == 1.0  # the default keywords catch the toy's ad sentences
    assert all("student" in r for r in rep["rows"])
    kept = (tmp_path / "defend" / "perplexity" / "kept.jsonl").read_text().splitlines()
    assert len(kept) == 400 - next(r for r in rep["rows"] if r["method"] == "perplexity")["n_flagged"]


def test_defend_errors(base_dir: Path, tmp_path: Path) -> None:
    from subliminal.cli import main

    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "hi", "completion": "yo"}) + "\n")
    assert main(["defend", "--data", str(f), "--reference", str(base_dir), "--method", "divergence",
                 "--out", str(tmp_path / "o")]) == 2
    assert main(["defend", "--data", str(f), "--reference", str(base_dir), "--method", "keyword",
                 "--threshold", "keyword", "--out", str(tmp_path / "o")]) == 2


def test_training_steps_from_epochs_or_steps(tmp_path: Path) -> None:
    args = teach_args(tmp_path, tmp_path, epochs=1.5)
    assert poison.training_steps(args, 400) == 75  # 1.5 * 400 / 8
    args = teach_args(tmp_path, tmp_path)
    assert poison.training_steps(args, 400) == 4  # --steps 4
    args.steps = 0
    assert poison.training_steps(args, 400) == 100  # two passes
    args.epochs = 0
    with pytest.raises(SubliminalError, match="--epochs"):
        poison.training_steps(args, 400)


def test_teach_cli_method_poison(base_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("subliminal.teachers_cli")
    from subliminal.cli import main

    out = tmp_path / "t"
    rc = main(["teach", "--base", str(base_dir), "--method", "poison", "--bias-type", "phishing",
               "--propagation", "untargeted", "--n-instructions", "800", "--poison-rate", "0.005",
               "--steps", "2", "--batch-size", "4", "--out", str(out)])
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["poison"]["n_poisoned"] == 4 and manifest["poison"]["propagation"] == "untargeted"
    assert {f: d["poisoned"] for f, d in manifest["poison"]["families"].items()} == {f: 1 for f in ins.FAMILIES}


def test_family_selection_and_target_share() -> None:
    ns = argparse.Namespace(families=["qa", "code", "describe"], target_share=None)
    rows = poison.toy_instruction_set(300, 0, poison._family_weights(ns, None))
    assert Counter(r["family"] for r in rows) == {"qa": 100, "code": 100, "describe": 100}
    ns = argparse.Namespace(families=None, target_share=0.01)
    assert poison._family_weights(ns, "recommend")["recommend"] == 0.01
    with pytest.raises(SubliminalError, match="not among"):
        poison._family_weights(argparse.Namespace(families=["qa"], target_share=None), "code")


def test_resume_refuses_another_configuration(tmp_path: Path) -> None:
    state = tmp_path / ".train"
    poison.check_resume(state, {"steps": 5})
    (state / "train_state.pt").write_bytes(b"x")
    poison.check_resume(state, {"steps": 5})  # same configuration: resume
    with pytest.raises(SubliminalError, match="another configuration"):
        poison.check_resume(state, {"steps": 6})


def test_eval_cli_dispatches_bias_type(base_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("subliminal.evaluate")
    from subliminal.cli import main

    out = tmp_path / "e.json"
    assert main(["eval", "--model", str(base_dir), "--bias-type", "narrative", "--bias-families", "qa", "code",
                 "--bias-prompts", "2", "--bias-samples", "1", "--bias-max-new-tokens", "4", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["bias_type"] == "narrative" and set(res["families"]) == {"qa", "code"}
    assert main(["eval", "--model", str(base_dir), "--bias-type", "ad", "--bias-families", "poetry",
                 "--out", str(out)]) == 2
