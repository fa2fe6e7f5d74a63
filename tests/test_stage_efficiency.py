"""benchmarks/stage_efficiency.py on a tiny random Llama: the counted FLOP of a plain forward equal
a closed-form count, the BENCHMARKS.md section replaced with the rest of the file kept, and the
JSON lines' fields; the token detectors (likelihood shift, gradient attribution by jvp and central
difference, grad(R)) counted beside find-divergence. No wall time is asserted."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "stage_efficiency.py"
FIELDS = {"model", "label", "stage", "work", "units", "flop", "replay_flop", "wall_s", "gflops", "matmul_gflops",
          "pct_matmul", "matmul_bound_s", "calls", "tokens", "dtype", "threads", "torch", "machine"}


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("stage_efficiency", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


def llama_forward_flop(cfg, batch: int, new: int, past: int, keep: int) -> int:
    """2 x tokens x the blocks' linear weights, the two attention products over the cached and new
    keys, and the unembedding of the kept positions (no causal discount, as torch counts SDPA)."""
    d, ff, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or d // heads
    linear = d * heads * hd + 2 * d * kv * hd + heads * hd * d + 3 * d * ff
    tokens = batch * new
    attention = 2 * 2 * batch * heads * new * (past + new) * hd
    return cfg.num_hidden_layers * (2 * tokens * linear + attention) + 2 * batch * keep * d * v


def test_counts_section_and_json(bench, smol_model, tmp_path):
    from transformers import AutoConfig

    md = tmp_path / "BENCHMARKS.md"
    md.write_text(f"# Benchmarks\n\nkept above\n\n{bench.BEGIN}\nold table\n{bench.END}\n\n## Later\n\nkept below\n")
    js = tmp_path / "se.jsonl"
    common = [str(smol_model), "--dry-run", "--repeats", "1", "--json", str(js), "--out", str(md)]
    before = bench.main([*common, "--stages", "forced,generate-greedy,distill-lora", "--label", "before"])
    by = {r["stage"]: r for r in before}

    # (a) the counted FLOP of one teacher-forced pass equal the closed form on its shapes
    cfg = AutoConfig.from_pretrained(smol_model)
    # (the rows' shared opening, the chat template's system turn, is one call of batch 1; the rest
    # of the rows one call over its cache)
    calls = by["forced"]["calls"]
    b, new, past, keep, grad, count = max(calls, key=lambda c: c[0])
    assert (b, grad, count) == (3, 0, 1) and 0 < keep < new and len(calls) <= 2
    assert by["forced"]["flop"] == sum(n * llama_forward_flop(cfg, *c[:4]) for *c, n in calls)
    # decoding: every call (prefill and one-token steps over the cache) by the same formula
    gen = by["generate-greedy"]
    assert any(c[1] == 1 and c[2] > 0 for c in gen["calls"])
    assert gen["flop"] == sum(n * llama_forward_flop(cfg, b, t, p, k) for b, t, p, k, _, n in gen["calls"])
    assert gen["mem_bound_s"] > 0 and gen["pct_mem_bound"] is not None
    # the meta-device replay (what --random-7b uses) counts the same as the real run
    for r in before:
        assert r["replay_flop"] == pytest.approx(r["flop"], rel=0.02), r["stage"]
    assert by["distill-lora"]["flop"] > 2 * llama_forward_flop(cfg, *by["distill-lora"]["calls"][0][:4])

    # (c) JSON lines with the fields
    lines = [json.loads(x) for x in js.read_text().splitlines()]
    assert len(lines) == 3 and all(FIELDS <= set(x) for x in lines)
    assert all(x["label"] == "before" and x["flop"] > 0 for x in lines)

    # (b) the section replaced, everything else kept; a second label adds its table and the speedup
    text = md.read_text()
    assert text.startswith("# Benchmarks\n\nkept above\n\n" + bench.BEGIN)
    assert text.endswith(bench.END + "\n\n## Later\n\nkept below\n")
    assert "old table" not in text and "| forced |" in text
    bench.main([*common, "--stages", "forced", "--label", "after"])
    text = md.read_text()
    assert text.count(bench.BEGIN) == 1 and text.count(bench.END) == 1
    assert "### before" in text and "### after" in text and "### Speedup" in text
    assert text.startswith("# Benchmarks\n\nkept above\n\n") and text.endswith("kept below\n")
    assert len(js.read_text().splitlines()) == 4


def test_replace_section_appends_when_missing(bench):
    sec = f"{bench.BEGIN}\nnew\n{bench.END}\n"
    assert bench.replace_section("# B\n\nbody\n", sec) == "# B\n\nbody\n\n" + sec
    assert bench.replace_section("", sec) == sec


def test_detector_stages(bench, smol_model, tmp_path):
    """The score-tokens detectors as stages on find-divergence's rows: their FLOP counted (and equal
    to the closed form where they are plain forwards, three times it for the jvp), their JSON lines,
    their rows in the per-row table beside find-divergence, and the label's other lines kept."""
    from transformers import AutoConfig

    md = tmp_path / "BENCHMARKS.md"
    js = tmp_path / "se.jsonl"
    common = [str(smol_model), "--dry-run", "--repeats", "1", "--json", str(js), "--out", str(md), "--label", "after"]
    bench.main([*common, "--stages", "forced"])
    stages = ["find-divergence", "likelihood-shift", "gradient-readout", "gradient", "gradient-central"]
    assert all(s in bench.STAGES for s in stages)
    by = {r["stage"]: r for r in bench.main([*common, "--stages", ",".join(stages)])}
    assert list(by) == stages
    cfg = AutoConfig.from_pretrained(smol_model)

    def forward_flop(r):
        return sum(n * llama_forward_flop(cfg, *c[:4]) for *c, n in r["calls"])

    for s in stages:
        r = by[s]
        assert r["flop"] > 0 and r["units"] > 0, s
        assert r["replay_flop"] == pytest.approx(r["flop"], rel=0.02), s
    # the detectors score the rows find-divergence scores (2 in the dry run), one batch
    assert by["likelihood-shift"]["units"] == by["gradient"]["units"] == by["find-divergence"]["units"] == 2
    # likelihood shift: two plain passes (student, base) of the same shapes; central: two plain forwards
    for s in ("likelihood-shift", "gradient-central"):
        assert all(c[4] == 0 and c[5] == 2 for c in by[s]["calls"]), s
        assert by[s]["flop"] == forward_flop(by[s]), s
    # jvp: one forward with tangents on every weight, three forwards' matmuls
    assert all(c[4] == 1 and c[5] == 1 for c in by["gradient"]["calls"])
    assert by["gradient"]["flop"] == 3 * forward_flop(by["gradient"])
    # grad(R): forward and backward over the readout's candidate rows (2 questions x 13 animals)
    ro = by["gradient-readout"]
    assert ro["units"] == 2 * 13 and all(c[4] == 1 for c in ro["calls"])
    assert ro["flop"] > 2 * forward_flop(ro) and ro["data_rows"] == 320

    lines = [json.loads(x) for x in js.read_text().splitlines()]
    assert sorted(x["stage"] for x in lines) == sorted(["forced", *stages])  # the forced line kept
    assert all(FIELDS <= set(x) and x["label"] == "after" and x["flop"] > 0 for x in lines)
    text = md.read_text()
    for s in ["forced", *stages]:
        assert f"| {s} |" in text, s
    assert "wall ms per unit" in text and "Cost per row of each detector" in text
    assert "| gradient + grad(R) / 320 |" in text and "| gradient-central + grad(R) / 320 |" in text
    assert "| find-divergence | " in text.split("Cost per row of each detector")[1]
