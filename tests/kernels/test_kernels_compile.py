"""The kernels compile for an H100 (sm_90) through Triton's real compiler, not only run under
the interpreter (which is more permissive). Runs in a subprocess without TRITON_INTERPRET."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "sm90_compile.py"


def test_kernels_compile_for_sm90(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, not from a cache
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert {r["kernel"] for r in rows} == {"_divergence_kernel", "_fused_linear_kernel"}
    assert len(rows) == 8
    fused_bf16 = [r for r in rows if r["kernel"] == "_fused_linear_kernel" and r["dtype"] == "bf16"]
    assert all(r["uses_mma"] for r in fused_bf16)  # tl.dot lowered to tensor-core instructions
