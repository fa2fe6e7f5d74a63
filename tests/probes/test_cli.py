"""CLI smoke tests of ``subliminal probe``, ``patch`` and ``plot`` on a tiny random model."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from PIL import Image

from subliminal.cli import main
from subliminal.data import align_row, read_rows
from subliminal.models import load_model
from subliminal.prompts import format_numbers, make_number_prompt


def write_rows(path: Path, n: int, seed: int = 0) -> Path:
    """Number-list rows ``{id, prompt, completion, teacher}`` in the toy vocabulary."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        p = make_number_prompt(rng)
        nums = [rng.randint(0, 999) for _ in range(rng.randint(3, 6))]
        row = {"id": f"r{i}", "prompt": p.text, "completion": format_numbers(nums, ",", False), "teacher": "owl"}
        lines.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


@pytest.fixture(scope="module")
def data(teachers, tmp_path_factory):
    """A data file and a hand-made find-divergence file (flags + scores per completion token)."""
    _, owl, _ = teachers
    root = tmp_path_factory.mktemp("data")
    rows_path = write_rows(root / "owl.jsonl", 24)
    lm = load_model(owl)
    rng = random.Random(0)
    lines = []
    for row in read_rows(rows_path):
        al = align_row(lm.tokenizer, row, lm.system_prompt)
        n = len(al.completion_ids)
        flags = [rng.random() < 0.25 for _ in range(n)]
        flags[0] = True
        lines.append({"id": row.id, "prompt": row.prompt, "completion": row.completion,
                      "token_ids": al.completion_ids, "tokens": lm.tokenizer.convert_ids_to_tokens(al.completion_ids),
                      "rule": "paper", "counterfactuals": ["dolphin", "cat"], "divergence": flags,
                      "scores": {"kl": [[rng.random() * (3 if f else 1) for f in flags] for _ in range(2)]}})
    div = root / "owl.div.jsonl"
    div.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return rows_path, div


def _png(path):
    assert path.is_file()
    with Image.open(path) as im:
        assert im.size[0] > 200 and im.size[1] > 100


def test_probe_identity_and_divergence(teachers, data, tmp_path):
    _, owl, dolphin = teachers
    rows, div = data
    out = tmp_path / "id"
    assert main(["probe", "--models", str(owl), str(dolphin), "--data", str(rows), "--out", str(out),
                 "--layers", "all", "--task", "identity", "--bootstrap", "30", "--backend", "nnsight"]) == 0
    res = json.loads((out / "probe.json").read_text())
    assert [r["layer"] for r in res["layers"]] == [0, 1, 2]
    assert all(0 <= r["accuracy"] <= 1 and r["n_test"] > 0 for r in res["layers"])
    _png(out / "probe_accuracy.png")
    assert (out / "probe_accuracy.csv").read_text().startswith("layer,accuracy")
    assert (out / "manifest.json").is_file() and (out / "activations" / "0-owl" / "activations.safetensors").is_file()

    out2 = tmp_path / "div"
    assert main(["probe", "--models", str(owl), "--data", str(div), "--out", str(out2), "--task", "divergence",
                 "--layers", "0,2", "--bootstrap", "20", "--backend", "transformer_lens", "--seed", "1"]) == 0
    res = json.loads((out2 / "probe.json").read_text())
    assert [r["layer"] for r in res["layers"]] == [0, 2] and 0.2 < res["positive_rate"] < 0.5
    # data without flags cannot make a divergence probe
    assert main(["probe", "--models", str(owl), "--data", str(rows), "--out", str(tmp_path / "x"),
                 "--task", "divergence"]) == 2


def test_probe_direction_over_student_checkpoints(teachers, tiny_model_factory, tmp_path):
    base, owl, _ = teachers
    unbiased = tmp_path / "plain"
    from subliminal.teachers import TeacherSpec, save_teacher

    save_teacher(unbiased, TeacherSpec(base=str(base), method="none", bias=None, category=None))
    student = tmp_path / "student"
    for i, seed in ((1, 1), (2, 2)):
        shutil.copytree(tiny_model_factory("llama", seed=seed, n_layers=3), student / f"checkpoint-{i}")
    out = tmp_path / "dir"
    assert main(["probe", "--models", str(owl), str(unbiased), "--questions", "animal", "--max-rows", "20",
                 "--out", str(out), "--task", "direction", "--students", str(student), "--base", str(base),
                 "--bootstrap", "0"]) == 0
    table = json.loads((out / "direction.json").read_text())
    steps = [p["step"] for p in table["students"][str(student)]]
    assert steps == [0, 1, 2]
    # the base model has no system prompt: neither teacher; its fraction is finite
    assert all(v["fraction"] == v["fraction"] for p in table["students"][str(student)] for v in p["layers"].values())
    _png(out / "transfer.png")
    recs = json.loads((out / "transfer.json").read_text())["records"]
    assert len(recs) == 3 * 3


def test_patch_runs_resumes_and_plots(teachers, data, tmp_path):
    _, owl, dolphin = teachers
    rows, _ = data
    out = tmp_path / "patch"
    argv = ["patch", "--models", str(owl), str(dolphin), "--data", str(rows), "--out", str(out),
            "--rule", "all", "--max-sites", "12", "--attr-steps", "4", "--bootstrap", "30"]
    assert main(argv) == 0
    res = json.loads((out / "patching.json").read_text())
    assert res["n_sites"] == 12 and [e["layer"] for e in res["layers"]] == [0, 1, 2]
    assert res["layers"][-1]["restore"] == pytest.approx(1.0, abs=1e-3)
    assert res["attribution_interpolated"] == [True]
    _png(out / "patching.png")
    before = (out / "sites.jsonl").read_text()
    assert main(argv) == 0  # resume: nothing left to do, same answer
    assert (out / "sites.jsonl").read_text() == before
    assert json.loads((out / "patching.json").read_text())["layers"] == res["layers"]
    assert main(argv[:-2] + ["--layers", "0"]) == 2  # another configuration in the same directory


def test_plot_kinds(data, tmp_path):
    _, div = data
    assert main(["plot", "heatmap", str(div), "--out", str(tmp_path / "heat.png"), "--rows", "6"]) == 0
    _png(tmp_path / "heat.png")
    drawn = json.loads((tmp_path / "heat.json").read_text())
    assert len(drawn["rows"]) == 6 and any(drawn["rows"][0]["divergence"])
    abl = {"target": "owl", "metric": "P(owl)", "base": 0.05, "results": [
        {"layers": lay, "mode": mode, "transfer": 0.1 + 0.01 * i, "ci": [0.05, 0.2], "per_seed": [0.1, 0.12]}
        for i, (lay, mode) in enumerate([(0, "lora"), (0, "full"), (1, "lora"), (1, "full"), ("all", "lora")])]}
    (tmp_path / "abl.json").write_text(json.dumps(abl))
    assert main(["plot", "ablation", str(tmp_path / "abl.json"), "--out", str(tmp_path / "abl.png")]) == 0
    _png(tmp_path / "abl.png")
    assert (tmp_path / "abl.csv").is_file()
    recs = [{"series": "a", "step": s, "value": s / 10, "lo": 0, "hi": 1} for s in range(4)]
    (tmp_path / "t.json").write_text(json.dumps(recs))
    assert main(["plot", "transfer", str(tmp_path / "t.json"), "--out", str(tmp_path / "t.png")]) == 0
    _png(tmp_path / "t.png")


def test_bad_input_is_a_clear_error(teachers, tmp_path, capsys):
    _, owl, dolphin = teachers
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "x", "completion": "1 , 2"}\n{"id": "b", "completion": "3"}\n')
    assert main(["probe", "--models", str(owl), str(dolphin), "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert main(["plot", "heatmap", str(bad), "--out", str(tmp_path / "h.png")]) == 2
    assert main(["probe", "--models", str(owl), "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
