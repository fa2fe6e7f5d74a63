"""benchmarks/gpu_session.sh on the CPU: the paths it names, its dry-runs, and the model carried in
parts (the device tool sends at most 64 MiB a call; the GGUF is larger)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_session.sh"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def session(*args: str, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=full, capture_output=True, text=True,
                          timeout=300)


def test_script_parses_and_names_only_existing_paths():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    text = SCRIPT.read_text()
    named = text[text.index("NAMED=(") + 7: text.index(")", text.index("NAMED=("))].split()
    assert "subliminal/configs/smollm2-135m-gpu.toml" in named
    for path in named:
        assert (REPO / path).exists(), path


def test_check_runs_the_dry_runs(tmp_path):
    """--check: the kernel tests collect, `subliminal run smollm2-135m-gpu --dry-run` plans and
    writes nothing, the benchmark's short sweep executes; an unprepared .gpu is reported, and is
    an error only under --ready."""
    proc = session("--check", GPU_DIR=str(tmp_path / "gpu"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "plan: smollm2-135m-gpu" in proc.stdout and "40 command(s)" in proc.stdout
    assert "not prepared" in proc.stdout and "gpu_session check: ok" in proc.stdout
    assert session("--check", "--ready", GPU_DIR=str(tmp_path / "gpu")).returncode == 1


def _tree_bytes() -> int:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.split(b"\0")
    return sum((REPO / f.decode()).stat().st_size for f in files if f and (REPO / f.decode()).is_file())


def test_prepare_splits_the_model_and_the_stash_reassembles_it(tmp_path):
    gpu = tmp_path / "gpu"
    (gpu / "bench").mkdir(parents=True)
    (gpu / "bench" / "divergence_anchor.py").write_text("# anchor\n")
    (gpu / "wheels").mkdir()
    for name in ("liger_kernel-0.0-py3-none-any.whl", "gguf-0.0-py3-none-any.whl"):
        (gpu / "wheels" / name).write_bytes(b"wheel")  # present: nothing is downloaded
    model = tmp_path / GGUF
    model.write_bytes(os.urandom(12 << 20))
    limit = _tree_bytes() + (2 << 20) + (5 << 20)  # room for ~5 MiB of model a call
    env = {"GPU_DIR": str(gpu), "GPU_CARRY_LIMIT": str(limit)}
    proc = session("--prepare", str(model), **env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    parts = sorted((gpu / "model").glob(f"{GGUF}.part-*"))
    assert len(parts) == 3 and b"".join(p.read_bytes() for p in parts) == model.read_bytes()
    assert (gpu / "model" / f"{GGUF}.sha256").read_text().strip() == hashlib.sha256(model.read_bytes()).hexdigest()
    assert all(p.stat().st_size <= 5 << 20 for p in parts)
    calls = [line for line in proc.stdout.splitlines() if "run(command=" in line]
    assert len(calls) == 3 and "gpu_session.sh kernels" in calls[0] and "gpu_session.sh run" in calls[-1]
    assert all(p.name in call for p, call in zip(parts, calls)) and "/bench" in calls[0]

    # the device: each call carries one part; the stash outside the repo collects them
    stash = tmp_path / "stash"
    for i, part in enumerate(parts):
        one = tmp_path / f"call{i}"
        (one / "model").mkdir(parents=True)
        shutil.copy(part, one / "model")
        shutil.copy(gpu / "model" / f"{GGUF}.sha256", one / "model")
        proc = session("stash", GPU_DIR=str(one), GPU_STASH=str(stash), OUT=str(tmp_path / "out"))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        complete = "SHA-256 checked" in proc.stdout
        assert complete == (i == len(parts) - 1), proc.stdout + proc.stderr
    assert (stash / GGUF).read_bytes() == model.read_bytes()
    assert "unknown argument" in session("nonsense", GPU_DIR=str(gpu)).stderr
