"""The benchmark script executes end to end on the CPU (--dry-run: tiny shapes, torch
reference and the Triton kernels under the interpreter) and its built-in correctness check
agrees with the float64 reference; no GPU numbers are involved."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_divergence.py"


def test_dry_run_executes_and_checks(tmp_path: Path) -> None:
    out, js = tmp_path / "BENCH.md", tmp_path / "bench.jsonl"
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--sweep", "--out", str(out), "--json", str(js)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in js.read_text().splitlines()]
    benches = {r["bench"] for r in rows}
    assert benches == {"logits", "sweep", "fused-linear"}
    checked = [r for r in rows if any(k.endswith("_match") for k in r)]
    assert len(checked) >= 6
    for r in checked:
        for key, val in r.items():
            if key.endswith("_match"):
                assert val == 1.0, (key, r)
            if key.endswith("_maxerr"):
                assert val < 1e-4, (key, r)
    assert {r["K"] for r in rows if r["bench"] == "logits"} == {1, 12}
    text = out.read_text()
    assert "DRY RUN on the CPU" in text and "| ours-fused |" in text and "| two-matmuls |" in text
    assert "Against the goals" not in text  # no goal ratios from interpreter timings
