"""benchmarks/stage_efficiency.py on a tiny random Llama: the counted FLOP of a plain forward equal
a closed-form count, the BENCHMARKS.md section replaced with the rest of the file kept, and the
JSON lines' fields. No wall time is asserted."""

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
