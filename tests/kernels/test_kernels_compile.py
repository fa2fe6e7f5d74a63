"""The kernels compile for an H100 (sm_90) through Triton's real compiler, not only run under
the interpreter (which is more permissive), and the compiled streaming kernel keeps the
properties its design relies on. Runs benchmarks/kernel_sass.py in a subprocess without
TRITON_INTERPRET."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernel_sass.py"


def test_kernels_compile_for_sm90(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, not from a cache
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    md = tmp_path / "sass.md"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(md)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert {r["kernel"] for r in rows} == {"_divergence_kernel", "_fused_linear_kernel"}
    fused_bf16 = [r for r in rows if r["kernel"] == "_fused_linear_kernel" and r["dtype"] == "bf16"]
    assert fused_bf16 and all(r["uses_mma"] for r in fused_bf16)  # tl.dot lowered to tensor-core instructions
    big = [r for r in rows if r["kernel"] == "_divergence_kernel" and r["V"] >= 32000]
    assert len(big) >= 4
    for r in big:
        first = r["loops"][0]  # the first pass over full tiles
        # per-lane state: no cross-thread reduction (shuffle) in the vocabulary loop, no spills
        assert first["shuffles"] == 0 and r["stack_bytes"] == 0, r
        assert r["instructions_per_logit"] < 30, r
    aligned_bf16 = [r for r in big if r["dtype"] == "bf16" and r["V"] % 8 == 0]
    assert aligned_bf16 and all(r["VEC"] == 8 for r in aligned_bf16)  # one 16-byte load per lane
    assert "| bf16 | 16384 | 151936 | 1 |" in md.read_text()
