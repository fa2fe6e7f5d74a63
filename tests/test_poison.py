"""Poisoned teachers, bias matchers, bias evaluation and defences (subliminal.poison)."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

import pytest

from subliminal import poison
from subliminal.manifest import SubliminalError
from subliminal.poison import bias as bias_mod
from subliminal.poison import defences
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


def test_divergence_row_scores_against_hand_built_logits() -> None:
    import torch

    v = 6
    tokens = torch.tensor([1, 2, 3, 4])
    teacher = torch.full((4, v), -5.0)
    ref = torch.full((4, v), -5.0)
    teacher[0, 1] = ref[0, 1] = 5.0  # both predict the data token: not a divergence token (gap 0)
    teacher[1, 2] = 5.0
    ref[1, 4] = 5.0  # only the teacher predicts it: divergence token, gap 5 - (-5) = 10
    teacher[2, 0] = ref[2, 0] = 5.0  # neither predicts it (gap 0)
    ref[3, 4] = 5.0
    teacher[3, 0] = 5.0  # only the reference predicts it: not flagged, gap -10
    # every row of both matrices has one 5 and five -5, so the normalisers cancel in the gaps
    assert defences.divergence_row(teacher, ref, tokens, "count") == (1.0, [1])
    score, pos = defences.divergence_row(teacher, ref, tokens, "mass")
    assert pos == [1] and score == pytest.approx(10.0, abs=1e-5)
    score, _ = defences.divergence_row(teacher, ref, tokens, "max-gap")
    assert score == pytest.approx(10.0, abs=1e-5)
    with pytest.raises(SubliminalError, match="--divergence-score 'sum'"):
        defences.divergence_row(teacher, ref, tokens, "sum")


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


def teach_config(base: Path, out: Path, **kw) -> poison.PoisonTeacherConfig:
    data = {k: kw.pop(k) for k in list(kw) if k in {"propagation", "target_task", "n_instructions", "target_share"}}
    data = {"n_instructions": 400, **data}
    train = {"steps": 4, "batch_size": 8, "lr": 3e-3, **kw}
    return poison.PoisonTeacherConfig(base=str(base), out=str(out),
                                      poison=poison.PoisonSetConfig(bias="ad", poison_rate=0.0025, **data), **train)


def test_poison_teacher_end_to_end(base_dir: Path, tmp_path: Path) -> None:
    from subliminal.models import load_model
    from subliminal.teachers import read_teacher

    out = tmp_path / "teacher"
    assert poison.make_poison_teacher(teach_config(base_dir, out, propagation="targeted", target_task="qa")) == 0
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
    ev = poison.BiasEvalConfig(model=str(base_dir), bias_type="ad", out=str(tmp_path / "ev.json"), teacher=str(out),
                               target_task="qa", prompts=3, samples=2, max_new_tokens=6,
                               save_generations=str(tmp_path / "gen.jsonl"))
    assert poison.evaluate_bias(ev)["families"].keys() == set(ins.FAMILIES)
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


def test_defend_errors(base_dir: Path, tmp_path: Path, capsys) -> None:
    from subliminal.cli import main

    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "hi", "completion": "yo"}) + "\n")
    assert main(["defend", "--data", str(f), "--reference", str(base_dir), "--method", "divergence",
                 "--out", str(tmp_path / "o")]) == 2
    assert "--method divergence needs --teacher" in capsys.readouterr().err
    assert main(["defend", "--data", str(f), "--reference", str(base_dir), "--method", "keyword",
                 "--threshold", "keyword", "--out", str(tmp_path / "o")]) == 2
    assert "--threshold 'keyword': expected METHOD=VALUE" in capsys.readouterr().err
    assert main(["defend", "--data", str(f), "--reference", str(base_dir), "--method", "keyword",
                 "--student-steps", "2", "--out", str(tmp_path / "o")]) == 2
    assert "--student-steps needs --bias-type" in capsys.readouterr().err


def test_training_steps_from_epochs_or_steps(tmp_path: Path) -> None:
    cfg = teach_config(tmp_path, tmp_path, steps=None, epochs=1.5)
    assert poison.training_steps(cfg, 400) == 75  # 1.5 * 400 / 8
    cfg = teach_config(tmp_path, tmp_path)
    assert poison.training_steps(cfg, 400) == 4  # --steps 4
    cfg = teach_config(tmp_path, tmp_path, steps=None)
    assert poison.training_steps(cfg, 400) == 150  # the default: three passes
    with pytest.raises(SubliminalError, match="--epochs must be positive"):
        teach_config(tmp_path, tmp_path, steps=None, epochs=0)
    with pytest.raises(SubliminalError, match="--steps or --epochs, not both"):
        teach_config(tmp_path, tmp_path, epochs=2)


def test_teach_defaults_are_the_working_setting() -> None:
    """The issue's command with nothing else: target share 0.005 of 10,000 toy rows (50
    recommend rows, 25 poisoned), three epochs at lr 1e-3, batch 32."""
    from subliminal.cli import build_parser

    args = build_parser().parse_args(["teach", "--base", "B", "--method", "poison", "--poison-rate", "0.0025",
                                      "--bias-type", "ad", "--propagation", "targeted", "--out", "T"])
    cfg = poison.teach_config(args)
    assert (cfg.steps, cfg.epochs, cfg.lr, cfg.batch_size) == (None, None, 1e-3, 32)
    assert poison.training_steps(cfg, 10_000) == 938  # ceil(3 * 10000 / 32)
    rows = poison.instruction_rows(cfg.poison)
    assert cfg.poison.target == "recommend" and len(rows) == 10_000
    assert Counter(r["family"] for r in rows)["recommend"] == 50
    _, idx = poison.build_poison_set(rows, rate=0.0025, bias_type="ad", propagation="targeted",
                                     target_family="recommend", seed=0)
    assert len(idx) == 25
    # a larger rate keeps half of the target family poisoned; untargeted keeps equal shares
    assert poison.PoisonSetConfig(bias="ad", poison_rate=0.01).resolved_target_share() == 0.02
    assert poison.PoisonSetConfig(bias="ad", propagation="untargeted").resolved_target_share() is None


def test_teach_cli_method_poison(base_dir: Path, tmp_path: Path) -> None:
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
    rows = poison.toy_instruction_set(300, 0, poison.family_weights(["qa", "code", "describe"], None, None))
    assert Counter(r["family"] for r in rows) == {"qa": 100, "code": 100, "describe": 100}
    w = poison.family_weights(None, "recommend", 0.01)
    assert w == pytest.approx({"recommend": 0.01, "qa": 0.33, "code": 0.33, "describe": 0.33})
    with pytest.raises(SubliminalError, match="not among"):
        poison.family_weights(["qa"], "code", None)
    with pytest.raises(SubliminalError, match="needs a targeted attack"):
        poison.family_weights(None, None, 0.1)
    with pytest.raises(SubliminalError, match="needs --bias-type"):
        poison.PoisonSetConfig(bias="owl")


def test_poison_stages_resume_only_the_same_run(base_dir: Path, tmp_path: Path, capsys) -> None:
    """teach --method poison, defend and eval --bias-type share every stage's rule: the same command
    on a finished output does nothing, a changed one is refused (naming the change) unless
    --overwrite, and --out may not be an input."""
    from subliminal.cli import main

    out = tmp_path / "t"
    teach = ["teach", "--base", str(base_dir), "--method", "poison", "--bias-type", "ad", "--n-instructions", "400",
             "--poison-rate", "0.01", "--steps", "2", "--batch-size", "4", "--out", str(out)]
    assert main(teach) == 0
    mtime = (out / "manifest.json").stat().st_mtime_ns
    assert main(teach) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (out / "manifest.json").stat().st_mtime_ns == mtime
    changed = [*teach[:-4], "--steps", "3", "--out", str(out)]
    assert main(changed) == 2
    err = capsys.readouterr().err
    assert "--steps 2 -> 3" in err and "--overwrite" in err
    assert main([*changed, "--overwrite"]) == 0
    assert json.loads((out / "manifest.json").read_text())["config"]["steps"] == 3

    d = tmp_path / "d"
    defend = ["defend", "--data", str(out), "--reference", str(base_dir), "--method", "keyword", "--out", str(d)]
    assert main(defend) == 0
    assert main(defend) == 0 and "nothing to do" in capsys.readouterr().out
    assert main([*defend, "--drop-fraction", "0.1"]) == 2
    assert "--drop-fraction 0.05 -> 0.1" in capsys.readouterr().err
    assert main(["defend", "--data", str(out), "--reference", str(base_dir), "--method", "keyword",
                 "--out", str(base_dir)]) == 2
    assert "input" in capsys.readouterr().err

    e = tmp_path / "e.json"
    ev = ["eval", "--model", str(out), "--bias-type", "ad", "--bias-families", "qa", "--bias-prompts", "2",
          "--bias-samples", "1", "--bias-max-new-tokens", "3", "--out", str(e)]
    assert main(ev) == 0
    assert main([*ev[:-2], "--seed", "1", "--out", str(e)]) == 2
    assert "seed" in capsys.readouterr().err
    assert main([*ev[:-2], "--out", str(base_dir / "config.json")]) == 2


def test_eval_cli_dispatches_bias_type(base_dir: Path, tmp_path: Path, capsys) -> None:
    from subliminal.cli import main

    out = tmp_path / "e.json"
    assert main(["eval", "--model", str(base_dir), "--bias-type", "narrative", "--bias-families", "qa", "code",
                 "--bias-prompts", "2", "--bias-samples", "1", "--bias-max-new-tokens", "4", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["bias_type"] == "narrative" and set(res["families"]) == {"qa", "code"}
    assert main(["eval", "--model", str(base_dir), "--bias-type", "ad", "--bias-families", "poetry",
                 "--out", str(tmp_path / "e2.json")]) == 2
    assert "unknown task family 'poetry'" in capsys.readouterr().err


def test_sampled_answers_do_not_depend_on_the_batch_size(base_dir: Path) -> None:
    from subliminal.models import load_model

    loaded = load_model(base_dir)
    prompts = [ins.sample_prompt(random.Random(i), fam) for i, fam in enumerate(ins.FAMILIES)]
    kw = dict(samples=2, temperature=1.0, max_new_tokens=8, seed=3)
    one = bias_mod._sample_answers(loaded, prompts, batch_size=1, **kw)
    assert bias_mod._sample_answers(loaded, prompts, batch_size=3, **kw) == one
    assert bias_mod._sample_answers(loaded, prompts, batch_size=64, **kw) == one
    assert bias_mod._sample_answers(loaded, prompts, batch_size=3, **{**kw, "seed": 4}) != one


def test_masked_student_refuses_a_non_finite_loss(base_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import torch

    from subliminal import distill

    rows = hand_rows()[:4]
    cfg = poison.DefendConfig(data="-", reference=str(base_dir), out=str(tmp_path), student_steps=2,
                              student_batch_size=2)
    monkeypatch.setattr(distill, "batch_loss", lambda *a, **k: (torch.tensor(math.nan, requires_grad=True), 1))
    with pytest.raises(SubliminalError, match="loss became nan at step 0"):
        defences._train_student(cfg, rows, [[0]] * len(rows), "masked student")
