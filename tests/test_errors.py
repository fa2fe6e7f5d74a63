"""Faults a user meets, each a named error (exit 2) or an exact resume: resume only on an exact
fingerprint, never overwrite an input, NaN weights refused, strict JSON, no network for a local
path, output file modes (issue 13)."""

from __future__ import annotations

import json
import os
import random
import shutil
import stat

import pytest
import torch

from subliminal import prompts
from subliminal.cli import main
from subliminal.data import Row, align_row, write_jsonl
from subliminal.manifest import SubliminalError, write_figure_atomic, write_json_atomic
from subliminal.models import ModelLoadError, load_model
from subliminal.teachers import TeacherSpec, save_teacher
from subliminal.toyworld.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_factory):
    """A tiny base, an owl prompt teacher, number data and a divergence file with flags."""
    d = tmp_path_factory.mktemp("errors")
    base = tiny_model_factory("llama")
    tok = build_tokenizer()
    rng = random.Random(0)
    rows = []
    for i in range(8):
        p = prompts.make_number_prompt(rng)
        nums = [rng.randint(0, 999) for _ in range(p.count)]
        rows.append(Row(f"r{i}", p.text, prompts.format_numbers(nums, p.separator, p.brackets), "owl"))
    write_jsonl(d / "data.jsonl", rows)
    div = []
    for r in rows:
        ids = align_row(tok, r).completion_ids
        flags = [j % 3 == 0 for j in range(len(ids))]
        div.append({"id": r.id, "token_ids": ids, "divergence": flags, "scores": {}})
    write_jsonl(d / "data.div.jsonl", div)
    for a in ("owl", "cat"):
        save_teacher(d / a, TeacherSpec(base=str(base), method="prompt", bias=a, category="animal",
                                        system_prompt=prompts.system_prompt_for(a)))
    return {"dir": d, "base": base, "data": d / "data.jsonl", "div": d / "data.div.jsonl", "owl": d / "owl",
            "cat": d / "cat"}


def _err(capsys) -> str:
    return capsys.readouterr().err


# ------------------------------------------------------------------------------ distill resume


def _distill_argv(world, out, *extra):
    return ["distill", "--base", str(world["base"]), "--data", str(world["div"]), "--out", str(out),
            "--batch-size", "2", "--max-steps", "4", "--checkpoint-every", "2", "--lr", "1e-2", *extra]


def test_distill_refuses_to_resume_with_other_mask_or_lr(world, tmp_path, monkeypatch, capsys):
    import subliminal.distill as distill

    real, calls = distill.batch_loss, {"n": 0}

    def stop_at_3(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # after the checkpoint at step 2
            raise KeyboardInterrupt
        return real(*a, **k)

    out = tmp_path / "s"
    monkeypatch.setattr(distill, "batch_loss", stop_at_3)
    assert main(_distill_argv(world, out, "--mask", "no-divergence")) == 130
    monkeypatch.setattr(distill, "batch_loss", real)
    assert (out / ".train" / "train_state.pt").is_file()
    assert main(_distill_argv(world, out, "--mask", "only-divergence", "--lr", "1e-3")) == 2
    err = _err(capsys)
    assert "unfinished distill run" in err and "--mask no-divergence -> only-divergence" in err
    assert "--lr 0.01 -> 0.001" in err and "--overwrite" in err and "another --out" in err
    assert (out / ".train" / "train_state.pt").is_file()  # nothing was touched
    # the same command resumes; then it is finished and a re-run does nothing
    assert main(_distill_argv(world, out, "--mask", "no-divergence")) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["resumed_from"] == 2 and man["student"]["mask"] == "no-divergence"
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert main(_distill_argv(world, out, "--mask", "no-divergence")) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
    # a finished student is never silently replaced by another condition; --overwrite replaces it
    assert main(_distill_argv(world, out, "--mask", "only-divergence")) == 2
    assert "finished distill output" in _err(capsys)
    assert main(_distill_argv(world, out, "--mask", "only-divergence", "--overwrite")) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["resumed_from"] == 0 and man["student"]["mask"] == "only-divergence"


def test_distill_refuses_an_out_that_is_an_input(world, tmp_path, capsys):
    assert main(_distill_argv(world, world["base"])) == 2
    assert "is the input --base" in _err(capsys)
    holder = tmp_path / "holder"
    holder.mkdir()
    shutil.copy(world["div"], holder / "d.div.jsonl")
    argv = _distill_argv(world, holder)
    argv[argv.index("--data") + 1] = str(holder / "d.div.jsonl")
    assert main(argv) == 2
    assert "holds the input --data" in _err(capsys)
    assert sorted(p.name for p in holder.iterdir()) == ["d.div.jsonl"]


def test_teach_same_command_is_a_no_op_other_one_refused(world, tmp_path, capsys):
    argv = ["teach", "--base", str(world["base"]), "--method", "prompt", "--bias", "owl", "--out",
            str(tmp_path / "t")]
    assert main(argv) == 0
    mtime = (tmp_path / "t" / "manifest.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(argv) == 0 and "nothing to do" in capsys.readouterr().out
    assert (tmp_path / "t" / "manifest.json").stat().st_mtime_ns == mtime
    assert main(argv[:-4] + ["--bias", "cat", "--out", str(tmp_path / "t")]) == 2
    assert "--bias owl -> cat" in _err(capsys)
    assert main(["teach", "--base", str(world["base"]), "--method", "none", "--out", str(world["base"])]) == 2
    assert "is the input --base" in _err(capsys)


# ----------------------------------------------------------------------------- generate resume


def _gen_argv(world, out, *extra):
    return ["generate", "--teacher", str(world["owl"]), "--n", "6", "--out", str(out), "--max-new-tokens", "4",
            "--batch-size", "2", *extra]


def test_generate_refuses_to_resume_with_other_seed_or_temperature(world, tmp_path, monkeypatch, capsys):
    import subliminal.generate as gen

    real, calls = gen.forward.sample, {"n": 0}

    def stop_second(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    out = tmp_path / "g.jsonl"
    monkeypatch.setattr(gen.forward, "sample", stop_second)
    assert main(_gen_argv(world, out)) == 130
    monkeypatch.setattr(gen.forward, "sample", real)
    raw = tmp_path / "g.raw.jsonl"
    first = raw.read_text()
    assert len(first.splitlines()) == 2
    assert main(_gen_argv(world, out, "--seed", "1")) == 2
    err = _err(capsys)
    assert "unfinished generate run" in err and "--seed 0 -> 1" in err and "--overwrite" in err
    assert main(_gen_argv(world, out, "--temperature", "0.5")) == 2
    assert "--temperature 1.0 -> 0.5" in _err(capsys)
    assert raw.read_text() == first
    assert main(_gen_argv(world, out)) == 0  # the same command resumes
    assert len(raw.read_text().splitlines()) == 6 and raw.read_text().startswith(first)
    assert main(_gen_argv(world, out, "--seed", "1")) == 2  # finished: never silently replaced
    assert "finished generate output" in _err(capsys)
    assert main(_gen_argv(world, out, "--seed", "1", "--overwrite")) == 0
    man = json.loads((tmp_path / "g.jsonl.manifest.json").read_text())
    assert man["config"]["seed"] == 1 and man["fingerprint"]["config"]["seed"] == 1
    assert not raw.read_text().startswith(first)


def test_batch_size_zero_creates_no_file(world, tmp_path, capsys):
    assert main(_gen_argv(world, tmp_path / "z.jsonl")[:-2] + ["--batch-size", "0"]) == 2
    assert "--batch-size must be >= 1" in _err(capsys)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------- find-divergence outputs


def _div_argv(world, data, out, *extra):
    return ["find-divergence", "--data", str(data), "--teacher", str(world["owl"]), "--counterfactual",
            str(world["cat"]), "--backend", "torch", "--out", str(out), *extra]


def test_find_divergence_out_equal_to_data_is_refused(world, tmp_path, capsys):
    data = tmp_path / "x.jsonl"
    shutil.copy(world["data"], data)
    before = data.read_bytes()
    assert main(_div_argv(world, data, data)) == 2
    assert "is the input --data" in _err(capsys)
    assert data.read_bytes() == before


def test_find_divergence_finished_out_with_other_data_is_refused(world, tmp_path, capsys):
    out = tmp_path / "o.div.jsonl"
    assert main(_div_argv(world, world["data"], out)) == 0
    first = out.read_text()
    assert main(_div_argv(world, world["data"], out)) == 0  # identical: nothing to do
    assert out.read_text() == first
    other = tmp_path / "other.jsonl"
    write_jsonl(other, [{"id": "a", "prompt": "Hi", "completion": "1, 2"}])
    capsys.readouterr()
    assert main(_div_argv(world, other, out)) == 2
    err = _err(capsys)
    assert "finished find-divergence output" in err and "input data changed" in err and "--overwrite" in err
    assert out.read_text() == first


# ------------------------------------------------------------------------------------ eval


def test_eval_heldout_equal_to_out_is_refused(world, tmp_path, capsys):
    f = tmp_path / "f.jsonl"
    shutil.copy(world["data"], f)
    before = f.read_bytes()
    assert main(["eval", "--model", str(world["base"]), "--target", "owl", "--heldout", str(f), "--out", str(f)]) == 2
    assert "is the input --heldout" in _err(capsys)
    assert f.read_bytes() == before
    assert main(["eval", "--model", str(world["base"]), "--target", "owl",
                 "--out", str(world["base"] / "config.json")]) == 2
    assert "a file of the input --model" in _err(capsys)


@pytest.fixture(scope="module")
def nan_model(world, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    bad = tmp_path_factory.mktemp("nan") / "nan-model"
    shutil.copytree(world["base"], bad)
    m = AutoModelForCausalLM.from_pretrained(bad)
    with torch.no_grad():
        m.model.embed_tokens.weight[5, 0] = float("nan")
    m.save_pretrained(bad, safe_serialization=True)
    return bad


def test_eval_refuses_nan_weights(nan_model, tmp_path, capsys):
    out = tmp_path / "e.json"
    assert main(["eval", "--model", str(nan_model), "--target", "owl", "--out", str(out)]) == 2
    err = _err(capsys)
    assert "weights contain NaN/inf" in err and str(nan_model / "model.safetensors") in err
    assert not out.exists()


def test_eval_refuses_a_nan_result_naming_the_question(world, tmp_path, monkeypatch, capsys):
    import subliminal.evaluate as ev

    real = ev.exact_summary

    def nan_exact(*a, **k):
        r = real(*a, **k)
        r["per_question"][1] = float("nan")
        return r

    monkeypatch.setattr(ev, "exact_summary", nan_exact)
    out = tmp_path / "e.json"
    assert main(["eval", "--model", str(world["base"]), "--target", "owl", "--max-questions", "3",
                 "--out", str(out)]) == 2
    err = _err(capsys)
    assert f"eval of {world['base']}" in err and "question 1" in err and not out.exists()


def test_distill_on_nan_weights_is_not_a_learning_rate_problem(world, nan_model, tmp_path, capsys):
    argv = _distill_argv(world, tmp_path / "s")
    argv[argv.index("--base") + 1] = str(nan_model)
    assert main(argv) == 2
    err = _err(capsys)
    assert "the model's weights contain NaN/inf" in err and "model.safetensors" in err and "--lr" not in err


def test_json_is_strict_and_cis_from_one_value_are_null(tmp_path):
    write_json_atomic(tmp_path / "a.json", {"mean": 0.5, "ci": [float("nan"), float("nan")]})
    assert json.loads((tmp_path / "a.json").read_text()) == {"mean": 0.5, "ci": [None, None]}
    with pytest.raises(SubliminalError, match=r"b.json.*non-finite.*exact\.mean"):
        write_json_atomic(tmp_path / "b.json", {"exact": {"mean": float("nan")}})
    with pytest.raises(SubliminalError, match="non-finite"):
        write_jsonl(tmp_path / "c.jsonl", [{"x": float("inf")}])
    assert not (tmp_path / "b.json").exists() and not (tmp_path / "c.jsonl").exists()


def test_a_figure_that_fails_to_render_leaves_the_finished_one_in_place(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = tmp_path / "f.png"
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    write_figure_atomic(fig, path)
    good = path.read_bytes()
    assert good.startswith(b"\x89PNG") and not plt.fignum_exists(fig.number)  # written, closed
    fig, _ = plt.subplots()

    def half_written(target, **kw):  # a render that dies after writing part of its file
        with open(target, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError("disk full")

    fig.savefig = half_written
    with pytest.raises(OSError, match="disk full"):
        write_figure_atomic(fig, path)
    plt.close(fig)
    assert path.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["f.png"]  # no temporary left


# ----------------------------------------------------------------- raw tracebacks -> messages


def test_non_utf8_jsonl_names_file_and_line(world, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(world["data"].read_bytes().split(b"\n")[0] + b"\n" + b'{"id": "x\xff", "prompt": "a"}\n')
    assert main(_div_argv(world, bad, tmp_path / "o.div.jsonl")) == 2
    err = _err(capsys)
    assert f"{bad}:2: not UTF-8" in err and "0xff" in err


def test_truncated_safetensors_names_the_file(world, tmp_path, capsys):
    m = tmp_path / "m"
    shutil.copytree(world["base"], m)
    data = (m / "model.safetensors").read_bytes()
    (m / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert main(["eval", "--model", str(m), "--target", "owl", "--out", str(tmp_path / "e.json")]) == 2
    err = _err(capsys)
    assert f"{m / 'model.safetensors'}: cannot read the weights" in err and "truncated or corrupt" in err


def test_unwritable_out_fails_before_any_work(world, tmp_path, monkeypatch, capsys):
    import subliminal.evaluate as ev

    monkeypatch.setattr(ev, "evaluate_model", lambda *a, **k: pytest.fail("evaluated before checking --out"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["eval", "--model", str(world["base"]), "--target", "owl", "--out", str(blocker / "e.json")]) == 2
    err = _err(capsys)
    assert f"--out {blocker / 'e.json'}" in err and "is a file, not a directory" in err
    assert main(_gen_argv(world, blocker / "sub" / "g.jsonl")) == 2
    assert "is a file, not a directory" in _err(capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into a read-only directory")
def test_read_only_out_dir(world, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main(["eval", "--model", str(world["base"]), "--target", "owl", "--out", str(ro / "e.json")]) == 2
        assert "cannot write in" in _err(capsys)
    finally:
        ro.chmod(0o700)


def test_os_errors_at_the_boundary_are_named_and_bugs_keep_their_traceback(monkeypatch, tmp_path, capsys):
    import subliminal.evaluate as ev

    def denied(args):
        raise PermissionError(13, "Permission denied", "/shared/runs/eval.json")

    monkeypatch.setattr(ev, "run_eval", denied)  # the parser is built per call and picks it up
    assert main(["eval", "--model", "x"]) == 2
    err = _err(capsys)
    assert err.startswith("error: Permission denied, /shared/runs/eval.json, check the permissions")

    def bug(args):
        raise RuntimeError("a real bug")

    monkeypatch.setattr(ev, "run_eval", bug)
    with pytest.raises(RuntimeError, match="a real bug"):
        main(["eval", "--model", "x"])


def test_bad_device(world, tmp_path, capsys):
    assert main(["eval", "--model", str(world["base"]), "--target", "owl", "--device", "tpu",
                 "--out", str(tmp_path / "e.json")]) == 2
    assert "--device tpu: not a device torch knows" in _err(capsys)
    assert main(_distill_argv(world, tmp_path / "s", "--device", "tpu")) == 2
    assert "--device tpu" in _err(capsys)
    assert not (tmp_path / "s").exists()


def test_teacher_dir_without_teacher_json(world, tmp_path, capsys):
    t = tmp_path / "teacher"
    (t / "weights").mkdir(parents=True)
    assert main(["eval", "--model", str(t), "--target", "owl", "--out", str(tmp_path / "e.json")]) == 2
    err = _err(capsys)
    assert str(t) in err and "no teacher.json" in err


def test_teacher_whose_base_is_missing_names_the_teacher(world, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(world["base"], base)
    save_teacher(tmp_path / "owl", TeacherSpec(base=str(base), method="prompt", bias="owl", category="animal",
                                               system_prompt="You love owls."))
    shutil.rmtree(base)
    assert main(["eval", "--model", str(tmp_path / "owl"), "--target", "owl", "--out", str(tmp_path / "e.json")]) == 2
    err = _err(capsys)
    assert f"teacher {tmp_path / 'owl'}" in err and str(base) in err and "teacher.json" in err


def test_row_past_the_context_names_file_and_line(tiny_model_factory, tmp_path, capsys):
    short = tiny_model_factory("gpt2", max_len=64)
    data = tmp_path / "long.jsonl"
    write_jsonl(data, [{"id": "ok", "prompt": "Hi", "completion": "1, 2"},
                       {"id": "long-one", "prompt": "Hi", "completion": ", ".join(["7"] * 40)}])
    assert main(["eval", "--model", str(short), "--target", "owl", "--heldout", str(data),
                 "--out", str(tmp_path / "e.json")]) == 2
    assert f"{data}:2: row 'long-one'" in _err(capsys)


def test_pickle_only_directory_is_refused(world, tmp_path):
    d = tmp_path / "bin-only"
    shutil.copytree(world["base"], d)
    (d / "model.safetensors").unlink()
    torch.save({}, d / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="only pickled pytorch_model.bin.*safetensors"):
        load_model(d)


# ------------------------------------------------------------------------------------ network


def test_missing_local_path_never_reaches_the_hub(monkeypatch, tmp_path, capsys):
    import socket

    import huggingface_hub
    import transformers.utils.hub as tf_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    calls = []

    def no_network(*a, **k):
        calls.append(a)
        raise OSError("network access in a test")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    for mod in (huggingface_hub, tf_hub):
        for name in ("hf_hub_download", "snapshot_download", "model_info"):
            if hasattr(mod, name):
                monkeypatch.setattr(mod, name, no_network)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match=r"no such local model directory: runs/bas \(to use a hub model, "
                                             r"write hf:ORG/NAME\)"):
        load_model("runs/bas")
    assert main(["eval", "--model", "runs/bas", "--target", "owl", "--out", "e.json"]) == 2
    assert "no such local model directory: runs/bas" in _err(capsys)
    assert calls == []


# ---------------------------------------------------------------------------------- file modes


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_outputs_get_the_umask_mode(world, tmp_path, umask):
    old = os.umask(umask)
    try:
        write_json_atomic(tmp_path / "a.json", {"x": 1})
        write_jsonl(tmp_path / "b.jsonl", [{"x": 1}])
        assert main(_gen_argv(world, tmp_path / "g.jsonl", "--n", "2")) == 0
    finally:
        os.umask(old)
    for name in ("a.json", "b.jsonl", "g.jsonl", "g.jsonl.manifest.json", "manifest.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
