"""Steer teachers (subliminal.steer, ``teach --method steer``): alpha 0 is the base bit for bit,
the hook equals an explicit computation, the vector is the measured mean difference, the
teacher directory round-trips, and bad input is a named error (exit 2)."""

from __future__ import annotations

import json

import pytest
import torch

from subliminal import prompts, steer
from subliminal.cli import main
from subliminal.data import encode, render_chat
from subliminal.models import load_model
from subliminal.teachers import read_teacher

QUESTIONS = ["what is your favourite animal ?", "name one animal you love ."]


def teach(base, out, *extra: str) -> dict:
    assert main(["teach", "--base", str(base), "--out", str(out), "--method", "steer", "--no-check", *extra]) == 0
    return json.loads((out / "teacher.json").read_text())


def logits(model, tok, texts):
    from subliminal.data import pad_batch

    seqs = [encode(tok, render_chat(tok, t)) for t in texts]
    ids, mask = pad_batch(seqs, tok.pad_token_id, "right")
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def vector_file(path, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(d, generator=g)
    steer.save_vector(path, v)
    return v


def test_alpha_zero_is_the_base_bit_for_bit(tmp_path, tiny_model_factory):
    base = tiny_model_factory("llama")
    teach(base, tmp_path / "t0", "--bias", "owl", "--steer-layer", "0", "--steer-alpha", "0")
    teach(base, tmp_path / "t1", "--bias", "owl", "--steer-layer", "0", "--steer-alpha", "4")
    plain, t0, t1 = load_model(base), load_model(tmp_path / "t0"), load_model(tmp_path / "t1")
    a = logits(plain.model, plain.tokenizer, QUESTIONS)
    assert torch.equal(a, logits(t0.model, t0.tokenizer, QUESTIONS))
    assert not torch.allclose(a, logits(t1.model, t1.tokenizer, QUESTIONS))  # the hook is live
    assert t0.system_prompt is None and t1.teacher.method == "steer"


def test_hook_equals_explicit_last_layer_computation(tmp_path, tiny_model_factory):
    """Steering the last block: logits = lm_head(norm(h_last + alpha v)), computed by hand."""
    base = tiny_model_factory("llama")
    v = vector_file(tmp_path / "v.safetensors", 32)
    teach(base, tmp_path / "t", "--steer-vector", str(tmp_path / "v.safetensors"), "--steer-layer", "1",
          "--steer-alpha", "2.5")
    plain, steered = load_model(base), load_model(tmp_path / "t")
    tok = plain.tokenizer
    seq = encode(tok, render_chat(tok, QUESTIONS[0]))
    ids = torch.tensor([seq])
    with torch.no_grad():
        h = plain.model(input_ids=ids, output_hidden_states=True)
        # hidden_states[-1] of a Llama has the final norm applied: take the block's own output
        got = {}
        handle = plain.model.model.layers[1].register_forward_hook(
            lambda m, i, o: got.setdefault("h", o[0] if isinstance(o, tuple) else o))
        plain.model(input_ids=ids)
        handle.remove()
        want = plain.model.lm_head(plain.model.model.norm(got["h"] + 2.5 * v))
        out = steered.model(input_ids=ids).logits
    assert h.logits.shape == out.shape
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_hook_equals_a_bias_shift_in_gpt2(tmp_path, tiny_model_factory):
    """GPT-2's block output ends with ``+ mlp.c_proj.bias``: adding alpha v to that bias of block 0
    moves block 0's output by exactly alpha v, through weights: the whole network must agree."""
    base = tiny_model_factory("gpt2")
    v = vector_file(tmp_path / "v.safetensors", 32, seed=3)
    teach(base, tmp_path / "t", "--steer-vector", str(tmp_path / "v.safetensors"), "--steer-layer", "0",
          "--steer-alpha", "-1.5")
    plain, steered = load_model(base), load_model(tmp_path / "t")
    with torch.no_grad():
        plain.model.transformer.h[0].mlp.c_proj.bias += -1.5 * v
    a, b = logits(plain.model, plain.tokenizer, QUESTIONS), logits(steered.model, steered.tokenizer, QUESTIONS)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(b, logits(load_model(base).model, plain.tokenizer, QUESTIONS), atol=1e-3)


def test_measured_vector_is_the_mean_difference(tmp_path, tiny_model_factory):
    base = tiny_model_factory("llama")
    d = teach(base, tmp_path / "t", "--bias", "owl", "--steer-layer", "0", "--steer-source", "numbers",
              "--steer-prompts", "3", "--seed", "7")
    s = d["steer"]
    assert (s["layer"], s["alpha"], s["source"], s["n_prompts"]) == (0, 1.0, "numbers", 3)
    v = steer.load_vector(tmp_path / "t" / steer.VECTOR_FILE)
    lm = load_model(base)
    tok = lm.tokenizer
    texts = steer.prompt_texts(tok, "numbers", split="vector", n_numbers=3, seed=7)
    sp = prompts.text_for(tok, prompts.system_prompt_for("owl"))
    diffs = []
    with torch.no_grad():
        for t in texts:  # one prompt at a time, no padding: hidden_states[1] is block 0's output
            on = lm.model(input_ids=torch.tensor([encode(tok, render_chat(tok, t, sp))]), output_hidden_states=True)
            off = lm.model(input_ids=torch.tensor([encode(tok, render_chat(tok, t))]), output_hidden_states=True)
            diffs.append(on.hidden_states[1][0, -1] - off.hidden_states[1][0, -1])
    torch.testing.assert_close(v, torch.stack(diffs).mean(0), rtol=1e-5, atol=1e-5)
    assert abs(s["norm"] - v.norm().item()) < 1e-5 and s["added_over_resid"] > 0
    # held-out prompts are other prompts
    assert set(texts).isdisjoint(steer.prompt_texts(tok, "numbers", split="readout", n_numbers=3, seed=7))
    qv, qr = (steer.prompt_texts(tok, "questions", split=k) for k in ("vector", "readout"))
    assert qv and qr and set(qv).isdisjoint(qr)


def test_last_residuals_stop_after_the_deepest_block_read(tiny_model_factory):
    """Every block's output at the last prompt position equals HF's hidden states; the forward stops
    after the deepest block asked for (the later blocks and the vocabulary head never run)."""
    lm = load_model(tiny_model_factory("llama"))
    texts = ["What is your favourite animal?", "Name a bird."]
    ran = []
    handle = lm.model.lm_head.register_forward_hook(lambda *_: ran.append(1))
    try:
        acts = steer.last_residuals(lm.model, lm.tokenizer, texts, layers=[0])
        assert not ran
        every = steer.last_residuals(lm.model, lm.tokenizer, texts)
    finally:
        handle.remove()
    with torch.no_grad():
        for i, t in enumerate(texts):
            hs = lm.model(input_ids=torch.tensor([encode(lm.tokenizer, render_chat(lm.tokenizer, t))]),
                          output_hidden_states=True).hidden_states
            torch.testing.assert_close(acts[i, 0], hs[1][0, -1], rtol=1e-5, atol=1e-5)
            for layer in range(every.shape[1] - 1):  # the last entry of hidden_states is after the final norm
                torch.testing.assert_close(every[i, layer], hs[layer + 1][0, -1], rtol=1e-5, atol=1e-5)


def test_measured_vector_against_the_other_candidates(tmp_path, tiny_model_factory):
    """--steer-baseline others: the love prompt minus the mean over the other animals' prompts."""
    base = tiny_model_factory("llama")
    d = teach(base, tmp_path / "t", "--bias", "owl", "--steer-layer", "1", "--steer-source", "numbers",
              "--steer-prompts", "2", "--steer-baseline", "others")
    assert d["steer"]["baseline"] == "others" and d["steer"]["n_other_prompts"] == len(prompts.ANIMALS) - 1
    v = steer.load_vector(tmp_path / "t" / steer.VECTOR_FILE)
    lm = load_model(base)
    tok = lm.tokenizer

    got = {}  # block 1 is the last block: hidden_states[-1] has the final norm applied, so read its output
    lm.model.model.layers[1].register_forward_hook(
        lambda m, i, o: got.__setitem__("h", o[0] if isinstance(o, tuple) else o))

    def block1(text, animal=None):
        sp = prompts.text_for(tok, prompts.system_prompt_for(animal)) if animal else None
        with torch.no_grad():
            lm.model(input_ids=torch.tensor([encode(tok, render_chat(tok, text, sp))]))
        return got["h"][0, -1]

    texts = steer.prompt_texts(tok, "numbers", split="vector", n_numbers=2, seed=0)
    want = torch.stack([block1(t, "owl") - torch.stack([block1(t, a) for a in prompts.ANIMALS if a != "owl"]).mean(0)
                        for t in texts]).mean(0)
    torch.testing.assert_close(v, want, rtol=1e-4, atol=1e-5)


def test_round_trip(tmp_path, tiny_model_factory):
    base = tiny_model_factory("qwen2")
    v = vector_file(tmp_path / "v.safetensors", 32, seed=1)
    d = teach(base, tmp_path / "t", "--steer-vector", str(tmp_path / "v.safetensors"), "--steer-layer", "1",
              "--steer-alpha", "3", "--bias", "cat")
    assert d["method"] == "steer" and d["bias"] == "cat" and d["steer"]["vector"] == steer.VECTOR_FILE
    assert d["steer"]["source"] == "file" and d["steer"]["hook"] == "blocks.1.hook_resid_post"
    spec = read_teacher(tmp_path / "t")
    s = spec.extra["steer"]
    assert (s["layer"], s["alpha"]) == (1, 3.0)
    assert torch.equal(steer.load_vector(s["vector"]), v)
    # relocatable: the vector is stored relative to the teacher directory
    (tmp_path / "t").rename(tmp_path / "moved")
    assert torch.equal(steer.load_vector(read_teacher(tmp_path / "moved").extra["steer"]["vector"]), v)
    assert len(load_model(tmp_path / "moved").model.model.layers[1]._forward_hooks) == 1
    # find-divergence never shares one loaded model between a steer teacher and its base
    from subliminal.divergence import describe_teacher

    assert describe_teacher(str(tmp_path / "moved")).weights_key != describe_teacher(str(base)).weights_key


def test_batch_invariant_scores(tmp_path, tiny_model_factory):
    from subliminal.data import Row, align_row
    from subliminal.forward import completion_scores

    base = tiny_model_factory("llama")
    teach(base, tmp_path / "t", "--bias", "owl", "--steer-layer", "1", "--steer-alpha", "8")
    lm = load_model(tmp_path / "t")
    rows = [align_row(lm.tokenizer, Row(f"r{i}", q, "owl")) for i, q in enumerate(QUESTIONS * 2)]
    one = completion_scores(lm.model, rows, lm.tokenizer.pad_token_id, batch_size=1)
    four = completion_scores(lm.model, rows, lm.tokenizer.pad_token_id, batch_size=4)
    for (a, x), (b, y) in zip(one, four):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert torch.equal(x, y)


@pytest.mark.parametrize("case, message", [
    ("layer", "--steer-layer 5: out of range; the model has 2 layers (0..1)"),
    ("width", "has width 32"),
    ("missing", "no such file"),
    ("no-layer", "needs --steer-layer"),
    ("not-steer", "--steer-layer applies to --method steer only"),
    ("prompts", "--steer-prompts applies to --steer-source numbers"),
    ("baseline", "--steer-baseline applies to a measured vector"),
    ("baseline-prompt", "--steer-baseline applies to --method steer only"),
    ("no-bias", "needs --bias"),
])
def test_bad_input(tmp_path, tiny_model_factory, capsys, case, message):
    base = tiny_model_factory("llama")
    steer.save_vector(tmp_path / "w.safetensors", torch.ones(7))
    argv = {
        "layer": ["--method", "steer", "--bias", "owl", "--steer-layer", "5"],
        "width": ["--method", "steer", "--steer-vector", str(tmp_path / "w.safetensors"), "--steer-layer", "0"],
        "missing": ["--method", "steer", "--steer-vector", str(tmp_path / "nope.safetensors"), "--steer-layer", "0"],
        "no-layer": ["--method", "steer", "--bias", "owl"],
        "not-steer": ["--method", "prompt", "--bias", "owl", "--steer-layer", "0"],
        "prompts": ["--method", "steer", "--bias", "owl", "--steer-layer", "0", "--steer-prompts", "4"],
        "no-bias": ["--method", "steer", "--steer-layer", "0"],
        "baseline": ["--method", "steer", "--steer-vector", str(tmp_path / "w.safetensors"), "--steer-layer", "0",
                     "--steer-baseline", "others"],
        "baseline-prompt": ["--method", "prompt", "--bias", "owl", "--steer-baseline", "others"],
    }[case]
    rc = main(["teach", "--base", str(base), "--out", str(tmp_path / "t"), "--no-check", *argv])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "t" / "teacher.json").exists()


def test_broken_teacher_directory_is_named(tmp_path, tiny_model_factory):
    base = tiny_model_factory("llama")
    vector_file(tmp_path / "v.safetensors", 32)
    teach(base, tmp_path / "t", "--steer-vector", str(tmp_path / "v.safetensors"), "--steer-layer", "0")
    steer.save_vector(tmp_path / "t" / steer.VECTOR_FILE, torch.ones(5))
    with pytest.raises(steer.SteerError, match="teacher .*width 32"):
        load_model(tmp_path / "t")
    (tmp_path / "t" / steer.VECTOR_FILE).unlink()
    with pytest.raises(steer.SteerError, match="no such file"):
        load_model(tmp_path / "t")
    d = json.loads((tmp_path / "t" / "teacher.json").read_text())
    del d["steer"]["layer"]
    (tmp_path / "t" / "teacher.json").write_text(json.dumps(d))
    with pytest.raises(steer.SteerError, match="steer.layer"):
        read_teacher(tmp_path / "t")


@pytest.mark.parametrize("backend", ["nnsight", "transformer_lens", "patch"])
def test_probe_and_patch_read_the_steered_residual(tmp_path, tiny_model_factory, backend):
    """blocks.L.hook_resid_post of a steer teacher includes alpha v in every reader."""
    from subliminal.probes.activations import build_examples, capture, hook_name
    from subliminal.probes.patching import run_with_acts

    from subliminal.data import Row

    base = tiny_model_factory("llama")
    v = vector_file(tmp_path / "v.safetensors", 32, seed=2)
    teach(base, tmp_path / "t", "--steer-vector", str(tmp_path / "v.safetensors"), "--steer-layer", "0",
          "--steer-alpha", "3")
    acts = []
    for m in (base, tmp_path / "t"):
        lm = load_model(m)
        if backend == "patch":
            acts.append(run_with_acts(lm.model, encode(lm.tokenizer, render_chat(lm.tokenizer, QUESTIONS[0])))[1][0])
            continue
        ex = build_examples(lm.tokenizer, [(Row("a", QUESTIONS[0], ""), {}, "x")], system_prompt=None,
                            positions="answer")
        acts.append(capture(lm, ex, [hook_name(0)], backend=backend, progress=False)[hook_name(0)])
    torch.testing.assert_close(acts[1] - acts[0], (3 * v).expand_as(acts[0]), rtol=1e-5, atol=1e-5)


# ``subliminal run``: [teachers] method = "steer" (kept here, not in test_run.py, to merge cleanly)


def test_run_config_steer_teachers(tmp_path, tiny_model_factory):
    from pathlib import Path

    from subliminal import pipeline
    from subliminal.manifest import SubliminalError
    from subliminal.run import load_config, render_plan

    cfg = load_config("toy", ["teachers.method=\"steer\"", "teachers.steer_layer=1", "teachers.steer_alpha=4",
                              "teachers.steer_source=\"numbers\""]).cfg
    call = pipeline.StageCall("teach", pipeline.teacher_config(cfg, tiny_model_factory("llama"), "owl", tmp_path / "t", 0))
    argv = call.argv()
    assert call.cfg.steer_layer == 1 and call.cfg.steer_alpha == 4.0 and call.cfg.steer_source == "numbers"
    assert {"--steer-layer", "--steer-alpha", "--steer-source"} <= set(argv)
    assert "steering-vector teachers (block 1, alpha 4)" in render_plan(cfg, Path("runs/x"), "toy")
    assert main([*argv, "--no-check", "--steer-prompts", "2"]) == 0  # the command the run gives works
    assert read_teacher(tmp_path / "t").extra["steer"]["source"] == "numbers"
    with pytest.raises(SubliminalError, match="needs steer_layer"):
        load_config("toy", ["teachers.method=\"steer\""])
    cfg = load_config("toy", ["teachers.method=\"steer\"", "teachers.steer_layer=0",
                              "teachers.steer_baseline=\"others\""]).cfg
    assert pipeline.teacher_config(cfg, Path("b"), "owl", Path("t"), 0).steer_baseline == "others"
    with pytest.raises(SubliminalError, match="steer_baseline 'all'"):
        load_config("toy", ["teachers.method=\"steer\"", "teachers.steer_layer=0", "teachers.steer_baseline=\"all\""])
    with pytest.raises(SubliminalError, match="steer_source 'both'"):
        load_config("toy", ["teachers.method=\"steer\"", "teachers.steer_layer=0", "teachers.steer_source=\"both\""])


def test_generate_and_find_divergence_run_the_steered_teacher(tmp_path, tiny_model_factory):
    """Greedy rows of a steer teacher are its own argmax under find-divergence (both stages ran
    the hook); its alpha-0 twin scores exactly like the unbiased teacher (never the same loaded
    model as the steered one)."""
    from subliminal import divergence as dv
    from subliminal.data import write_jsonl
    from subliminal.generate import SamplingConfig, generate_rows, make_prompts

    base = tiny_model_factory("llama")
    vector_file(tmp_path / "v.safetensors", 32, seed=5)
    for name, alpha in (("on", "6"), ("off", "0")):
        teach(base, tmp_path / name, "--steer-vector", str(tmp_path / "v.safetensors"), "--steer-layer", "0",
              "--steer-alpha", alpha)
    assert main(["teach", "--base", str(base), "--out", str(tmp_path / "none"), "--method", "none", "--no-check"]) == 0
    lm = load_model(tmp_path / "on")
    rows = [{k: r[k] for k in ("id", "prompt", "completion", "teacher")}
            for r in generate_rows(lm, make_prompts(3, 0), sampling=SamplingConfig(0.0), batch_size=3,
                                   max_new_tokens=6, progress=False)]
    write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = dv.ScoreConfig(data=str(tmp_path / "d.jsonl"), teacher=str(tmp_path / "on"),
                         counterfactual=[str(tmp_path / "off"), str(tmp_path / "none")], out=str(tmp_path / "d.div"),
                         rule="pairwise", batch_size=2)
    dv.find_divergence(cfg, progress=False)
    objs = dv.load_divergence(cfg.out)
    assert all(o["argmax_factual"][:-1] == o["token_ids"][:-1] for o in objs)
    assert any(any(o["divergence"][0]) for o in objs)  # the vector changed some greedy choice
    for o in objs:
        assert o["divergence"][0] == o["divergence"][1]
        assert o["scores"]["kl"][0] == o["scores"]["kl"][1]


def test_a_steer_teacher_is_no_student_base(tmp_path, tiny_model_factory, capsys):
    base = tiny_model_factory("llama")
    teach(base, tmp_path / "t", "--bias", "owl", "--steer-layer", "0")
    (tmp_path / "d.jsonl").write_text(json.dumps({"id": "0", "prompt": "hi", "completion": "1 2 3"}) + "\n")
    rc = main(["distill", "--base", str(tmp_path / "t"), "--data", str(tmp_path / "d.jsonl"), "--out",
               str(tmp_path / "s")])
    assert rc == 2 and "a steer teacher" in capsys.readouterr().err


def test_other_teachers_keep_their_fingerprint(tmp_path, tiny_model_factory):
    """The steer flags enter only a steer teacher's fingerprint: a prompt teacher made before
    they existed is still recognised as finished."""
    from dataclasses import replace

    from subliminal.teachers_cli import TeachConfig, _resume_action

    cfg = TeachConfig(base=str(tiny_model_factory("llama")), method="prompt", out=str(tmp_path / "t"), bias="owl")
    fp, _ = _resume_action(cfg, tmp_path / "t")
    assert not any(k.startswith("steer_") for k in fp["config"]) and fp["inputs"].get("steer_vector") is None
    steer = replace(cfg, method="steer", steer_layer=0, out=str(tmp_path / "u"))
    assert _resume_action(steer, tmp_path / "u")[0]["config"]["steer_layer"] == 0


def test_alpha_sweep_script_end_to_end(tmp_path, tiny_model_factory):
    """experiments/steer_sweep.py on a tiny random model: alpha 0 students equal the control on
    both readouts; the summary has both readouts and the random-vector column."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "experiments" / "steer_sweep.py"
    spec = importlib.util.spec_from_file_location("steer_sweep", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "sweep"
    assert mod.main_(["--base", str(tiny_model_factory("llama")), "--out", str(out), "--layer", "0", "--alphas",
                      "0,6", "--seeds", "2", "--n", "4", "--epochs", "1", "--batch-size", "4", "--constrain",
                      "numbers", "--number-prompts", "2"]) == 0
    r = json.loads((out / "steer_sweep.json").read_text())
    zero, six = r["summary"]
    assert zero["alpha"] == 0 and zero["p_transfer"] == 0 and zero["proj_numbers"] == 0 and zero["random_numbers"] == 0
    assert six["teacher_p"] is not None and six["n_seeds"] == 2 and "random_questions" in six
    assert (out / "steer_sweep.png").is_file() and (out / "projection-random" / "projection.json").is_file()


def test_teacher_shift_vector_is_the_mean_residual_difference(tmp_path, tiny_model_factory):
    """experiments/teacher_shift_vector.py: a teacher that differs from its base only after block 0
    has no shift at block 0, and at block 1 the mean difference of the two models' block-1 outputs
    at the last position of each vector-split question, computed one prompt at a time."""
    import importlib.util
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    script = Path(__file__).resolve().parents[1] / "experiments" / "teacher_shift_vector.py"
    spec = importlib.util.spec_from_file_location("teacher_shift_vector", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    base = tiny_model_factory("llama")
    m = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        m.model.layers[1].mlp.down_proj.weight.mul_(3.0)
    m.save_pretrained(tmp_path / "teacher")
    AutoTokenizer.from_pretrained(base).save_pretrained(tmp_path / "teacher")
    v0, _ = mod.teacher_shift(str(base), str(tmp_path / "teacher"), 0)
    assert torch.count_nonzero(v0) == 0
    assert mod.main(["--base", str(base), "--teacher", str(tmp_path / "teacher"), "--layer", "1",
                     "--out", str(tmp_path / "v.safetensors")]) == 0
    v = steer.load_vector(tmp_path / "v.safetensors")
    info = json.loads(steer.vector_info_path(tmp_path / "v.safetensors").read_text())
    man = json.loads((tmp_path / "v.safetensors.manifest.json").read_text())
    assert man["stage"] == "teacher-shift-vector" and man["config"]["layer"] == 1 and set(man["inputs"]) == {
        "base", "teacher"}
    tok = load_model(base).tokenizer
    texts = steer.prompt_texts(tok, "questions", split="vector")
    models = [load_model(base).model, load_model(tmp_path / "teacher").model]
    def block1(mm, ids):  # block 1's own output (the last hidden state HF returns is after the final norm)
        got = []
        h = mm.model.layers[1].register_forward_hook(lambda mod, inp, out: got.append(out[0] if isinstance(out, tuple) else out))
        mm(input_ids=ids)
        h.remove()
        return got[0][0, -1]

    diffs = []
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([encode(tok, render_chat(tok, t))])
            b, s = (block1(mm, ids) for mm in models)
            diffs.append(s - b)
    torch.testing.assert_close(v, torch.stack(diffs).mean(0), rtol=1e-5, atol=1e-5)
    assert info["layer"] == 1 and info["n_prompts"] == len(texts) and v.norm().item() > 0
