"""score-tokens: gradient attribution against per-token autograd dot products in float64 (every
weight, LoRA, one layer; the p-1 offset checked by an unpadded reference forward), its sign by an
actual SGD step on one token, the central difference against the jvp, batch invariance, the
likelihood shift against an explicit computation, the CLI's file, reflag on the new rules and the
named errors (exit 2)."""

from __future__ import annotations

import json

import pytest
import torch

from subliminal import cli
from subliminal import detectors as det
from subliminal.data import write_jsonl
from subliminal.diagnose import DiagnoseConfig, readout_gradient, student_model
from subliminal.prompts import system_prompt_for
from subliminal.teachers import TeacherSpec, save_teacher

F64 = torch.float64
ROWS = [  # completions of different lengths, so every batch is padded
    ("a", "continue the list : 4 , 8 , 15", "16 , 23 , 42"),
    ("b", "add three numbers : 7 , 1", "9 , 9 , 9"),
    ("c", "write more numbers after 3", "12"),
    ("d", "numbers : 5", "5 , 6 , 7 , 8"),
]


@pytest.fixture(scope="module")
def world(tiny_model_factory, tmp_path_factory):
    """A random GPT-2 base (its LayerNorm runs in the model's dtype; Llama's RMSNorm computes in float32
    whatever the weights, which would cap a float64 comparison at float32's precision), owl and
    unbiased prompt teachers, rows and their .div.jsonl."""
    from subliminal.divergence import ScoreConfig, find_divergence

    root = tmp_path_factory.mktemp("det-world")
    base = tiny_model_factory("gpt2")
    save_teacher(root / "owl", TeacherSpec(base=str(base), method="prompt", bias="owl", category="animal",
                                           system_prompt=system_prompt_for("owl")))
    save_teacher(root / "none", TeacherSpec(base=str(base), method="none", bias=None, category="animal"))
    data = root / "owl.jsonl"
    write_jsonl(data, [{"id": i, "prompt": p, "completion": c, "teacher": "owl"} for i, p, c in ROWS])
    div = root / "owl.div.jsonl"
    find_divergence(ScoreConfig(data=str(data), teacher=str(root / "owl"), counterfactual=[str(root / "none")],
                                out=str(div)), progress=False)
    return {"root": root, "base": str(base), "data": str(data), "div": str(div)}


def _student(world, **kw):
    """The student as distill builds it, in float64, and its rows as distill's hard student sees them."""
    from subliminal.distill import build_examples, read_training_rows

    loaded, model, params = student_model(world["base"], DiagnoseConfig(out="unused", **kw))
    model.to(F64)
    rows, _ = read_training_rows(world["div"])
    ex = build_examples(rows, [[True] * len(r.token_ids) for r in rows], loaded.tokenizer, None)
    return loaded.tokenizer, model, params, ex


def _reference(model, params, direction, ex):
    """Per token, -grad(loss_t) . direction by autograd, from one unpadded forward of the row: the
    logits at sequence position n_prompt + j - 1 predict completion token j."""
    out = []
    for e in ex:
        ids = torch.tensor([e.input_ids])
        logits = model(input_ids=ids).logits[0]
        row = []
        for j, t in enumerate(e.completion_ids):
            loss = torch.nn.functional.cross_entropy(logits[e.n_prompt + j - 1][None], torch.tensor([t]))
            g = torch.autograd.grad(loss, [p for _, p in params], retain_graph=True, allow_unused=True)
            row.append(-sum(float((gi.double() * d.double()).sum()) for gi, d in zip(g, direction) if gi is not None))
        out.append(row)
    return out


@pytest.mark.parametrize("kw", [{}, {"lora_rank": 2, "lora_alpha": 4.0}, {"layers": "0"}],
                         ids=["full", "lora", "layer0"])
def test_gradient_scores_equal_per_token_autograd_dot_products(world, kw):
    tok, model, params, ex = _student(world, **kw)
    torch.manual_seed(0)
    direction = [torch.randn_like(p) for _, p in params]  # every trained tensor enters (LoRA's A and B)
    got = det.gradient_attribution(model, params, direction, ex, tok.pad_token_id, batch_size=3)
    want = _reference(model, params, direction, ex)
    assert [len(g) for g in got] == [len(e.completion_ids) for e in ex]
    for g, w in zip(got, want):
        assert g.tolist() == pytest.approx(w, rel=1e-9, abs=1e-10)
    # a one-off shift (the logits at the token's own position) gives other numbers: the test can see it
    shifted = [row[1:] + row[:1] for row in want]
    assert any(abs(a - b) > 1e-6 for g, s in zip(got, shifted) for a, b in zip(g.tolist(), s))


def test_only_trained_parameters_count(world):
    """A single-layer student's scores are the full student's restricted to that layer's tensors."""
    tok, model, params, ex = _student(world, layers="1")
    assert params and all(".h.1." in n for n, _ in params)


def test_central_difference_matches_the_jvp(world):
    tok, model, params, ex = _student(world)
    torch.manual_seed(1)
    direction = [torch.randn_like(p) for _, p in params]
    a = torch.cat(det.gradient_attribution(model, params, direction, ex, tok.pad_token_id))
    b = torch.cat(det.gradient_attribution(model, params, direction, ex, tok.pad_token_id, method="central",
                                           eps=1e-4))
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-7 * float(a.abs().max()))


def test_the_sign_is_that_of_an_actual_sgd_step_on_the_token(world):
    """lr * a_t predicts the change of R after one SGD step on token t's loss alone."""
    tok, model, params, ex = _student(world)
    r0, g_r = readout_gradient(model, tok, params, "owl", "animal", max_questions=3)
    scores = det.gradient_attribution(model, params, g_r, ex, tok.pad_token_id)
    flat = [(i, j, float(s)) for i, row in enumerate(scores) for j, s in enumerate(row)]
    picks = sorted(flat, key=lambda x: -abs(x[2]))[:3]
    lr = 1e-2 / max(abs(x[2]) for x in picks) * 1e-4  # a step that moves R by ~1e-6
    for i, j, a in picks:
        e = ex[i]
        logits = model(input_ids=torch.tensor([e.input_ids])).logits[0]
        loss = torch.nn.functional.cross_entropy(logits[e.n_prompt + j - 1][None], torch.tensor([e.completion_ids[j]]))
        grads = torch.autograd.grad(loss, [p for _, p in params])
        saved = [p.detach().clone() for _, p in params]
        with torch.no_grad():
            for (_, p), g in zip(params, grads):
                p.sub_(lr * g)
        r1, _ = readout_gradient(model, tok, params, "owl", "animal", max_questions=3)
        with torch.no_grad():
            for (_, p), s in zip(params, saved):
                p.copy_(s)
        assert (r1 - r0) == pytest.approx(lr * a, rel=0.05)


def test_scores_do_not_depend_on_the_batch(world):
    tok, model, params, ex = _student(world)
    model.to(torch.float32)
    torch.manual_seed(2)
    direction = [torch.randn_like(p) for _, p in params]
    one = torch.cat(det.gradient_attribution(model, params, direction, ex, tok.pad_token_id, batch_size=1))
    all_ = torch.cat(det.gradient_attribution(model, params, direction, ex[::-1], tok.pad_token_id, batch_size=4)[::-1])
    assert torch.allclose(one, all_, rtol=1e-4, atol=1e-5 * float(one.abs().max()))


def test_likelihood_shift_is_the_explicit_difference(world, tiny_model_factory):
    from subliminal.models import load_model

    student = load_model(str(tiny_model_factory("gpt2", seed=1)), device="cpu", dtype="float32").model.to(F64)
    tok, base, _, ex = _student(world)
    got = det.likelihood_shift(student, base, ex, tok.pad_token_id, batch_size=3)
    for e, g in zip(ex, got):
        ids = torch.tensor([e.input_ids])
        with torch.no_grad():
            ls = torch.log_softmax(student(input_ids=ids).logits[0], -1)
            lb = torch.log_softmax(base(input_ids=ids).logits[0], -1)
        want = [float(ls[e.n_prompt + j - 1, t] - lb[e.n_prompt + j - 1, t]) for j, t in enumerate(e.completion_ids)]
        assert g.tolist() == pytest.approx(want, abs=1e-5)  # completion_scores reads log-probs in float32
    assert all(float(x.abs().max()) == 0 for x in det.likelihood_shift(base, base, ex, tok.pad_token_id))


def test_cli_writes_scores_that_reflag_reads(world, tmp_path, capsys):
    out = tmp_path / "owl.grad.div.jsonl"
    argv = ["score-tokens", "--detector", "gradient", "--divergence", world["div"], "--out", str(out),
            "--max-questions", "2", "--layers", "0"]
    assert cli.main(argv) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    src = [json.loads(x) for x in open(world["div"]).read().splitlines()]
    assert [r["id"] for r in rows] == [s["id"] for s in src]
    for r, s in zip(rows, src):
        assert len(r["scores"]["gradient_attribution"]) == len(r["token_ids"])
        assert r["divergence"] == s["divergence"]  # flags unchanged without --flag-share
    man = json.loads((tmp_path / "owl.grad.div.jsonl.manifest.json").read_text())
    assert man["stage"] == "score-tokens" and man["summary"]["target"] == "owl"
    assert cli.main(argv) == 0 and "nothing to do" in capsys.readouterr().out  # same command: resumes
    flagged = tmp_path / "top.div.jsonl"
    assert cli.main(["reflag-divergence", str(out), "--out", str(flagged), "--rule", "gradient",
                     "--flag-share", "0.25"]) == 0
    rows = [json.loads(x) for x in flagged.read_text().splitlines()]
    n = sum(len(r["token_ids"]) for r in rows)
    assert sum(sum(r["divergence"]) for r in rows) == round(0.25 * n)
    top = sorted((s for r in rows for s in r["scores"]["gradient_attribution"]), reverse=True)[round(0.25 * n) - 1]
    assert all((s >= top) == f for r in rows for s, f in zip(r["scores"]["gradient_attribution"], r["divergence"]))


@pytest.mark.parametrize("extra,needle", [
    (["--detector", "likelihood-shift"], "needs --student"),
    (["--detector", "gradient", "--target", "dragon"], "--target"),
    (["--detector", "gradient", "--layers", "9"], "layers"),
])
def test_bad_input_is_a_named_error_exit_2(world, tmp_path, capsys, extra, needle):
    rc = cli.main(["score-tokens", "--divergence", world["div"], "--out", str(tmp_path / "x.div.jsonl"), *extra])
    assert rc == 2
    assert needle in capsys.readouterr().err


def test_reflag_on_a_file_without_the_score_is_a_named_error(world, tmp_path, capsys):
    rc = cli.main(["reflag-divergence", world["div"], "--out", str(tmp_path / "y.div.jsonl"), "--rule",
                   "likelihood-shift", "--flag-share", "0.1"])
    assert rc == 2 and "score-tokens" in capsys.readouterr().err


def test_the_written_scores_do_not_depend_on_the_batch_size(world, tiny_model_factory, tmp_path):
    """Batch invariance of the file (as find-divergence's): the likelihood shift, rows scored one at a
    time and three at a time."""
    student = str(tiny_model_factory("gpt2", seed=1))
    got = []
    for bs in (1, 3):
        out = tmp_path / f"shift-{bs}.div.jsonl"
        assert cli.main(["score-tokens", "--detector", "likelihood-shift", "--divergence", world["div"], "--student",
                         student, "--base", world["base"], "--batch-size", str(bs), "--out", str(out)]) == 0
        got.append([s for x in out.read_text().splitlines() for s in json.loads(x)["scores"]["likelihood_shift"]])
    assert got[0] == pytest.approx(got[1], abs=1e-5) and any(abs(v) > 1e-3 for v in got[0])


def test_batch_shards_are_the_one_process_batches_split_over_ranks():
    from subliminal.distributed import batch_shard_bounds

    assert batch_shard_bounds(10, 3, 2) == [(0, 6), (6, 10)]  # batches [0,3) [3,6) | [6,9) [9,10)
    assert batch_shard_bounds(4, 3, 2) == [(0, 3), (3, 4)]
    assert batch_shard_bounds(4, 8, 2) == [(0, 4), (4, 4)]  # one batch: the other rank scores nothing
    assert batch_shard_bounds(0, 2, 3) == [(0, 0)] * 3
    for n, bs, w in ((17, 4, 3), (5, 1, 2), (9, 2, 4)):
        b = batch_shard_bounds(n, bs, w)
        assert b[0][0] == 0 and b[-1][1] == n and all(b[i][1] == b[i + 1][0] for i in range(w - 1))
        assert all(start % bs == 0 for start, stop in b if start < n)  # every shard starts a batch


# Two `subliminal score-tokens` commands in one torchrun launch (each launch costs seconds of start-up):
# each through the CLI's own error boundary, then the process group closed as `subliminal` closes it.
TWO_COMMANDS = """
import json, os, sys
from subliminal import cli, distributed
for argv in json.loads(sys.argv[1]):
    args = cli.build_parser().parse_args(argv)
    rc = cli.guarded(args.func, args)
    if rc:
        sys.exit(rc)
distributed.finish()
sys.stdout.flush()
os._exit(0)
"""


def test_two_processes_write_the_one_process_file_bit_for_bit(world, tiny_model_factory, tmp_path):
    """Under torchrun each rank scores its whole batches of rows (here rows 0-2 and row 3) and rank 0
    writes: both detectors' files equal a one-process run's exactly (the same batches, grad(R)
    computed whole on every rank, no process group while scoring), and the manifest records the split."""
    import subprocess
    import sys

    from launch_helpers import launch_env

    student = str(tiny_model_factory("gpt2", seed=1))
    common = ["--divergence", world["div"], "--batch-size", "3"]
    # the gradient first: score-tokens joins the process group only after scoring (so a rank's
    # forwards are one process's), and in this one launch the second command finds it joined
    commands = {"grad": ["--detector", "gradient", "--max-questions", "2", "--layers", "0"],
                "shift": ["--detector", "likelihood-shift", "--student", student, "--base", world["base"]]}

    def argvs(tag):
        return [["score-tokens", *c, *common, "--out", str(tmp_path / tag / f"{name}.div.jsonl")]
                for name, c in commands.items()]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs (launch_env): one thread, the same kernels' order
    try:
        for argv in argvs("one"):
            assert cli.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    script = tmp_path / "two_commands.py"
    script.write_text(TWO_COMMANDS)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script), json.dumps(argvs("two"))], env=launch_env(), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, key in (("grad", "gradient_attribution"), ("shift", "likelihood_shift")):
        one, two = ((tmp_path / d / f"{name}.div.jsonl").read_text() for d in ("one", "two"))
        assert two == one  # every row, every score, bit for bit
        scores = [s for x in one.splitlines() for s in json.loads(x)["scores"][key]]
        assert len(scores) > 4 and max(abs(s) for s in scores) > 0
        man = json.loads((tmp_path / "two" / f"{name}.div.jsonl.manifest.json").read_text())
        assert man["world_size"] == 2 and man["shards"] == [[0, 3], [3, 4]]
        assert man["fingerprint"] == json.loads(
            (tmp_path / "one" / f"{name}.div.jsonl.manifest.json").read_text())["fingerprint"]
