"""Distill throughput on the CPU: 2 processes x 1 thread (torchrun, data-parallel through
accelerate) against 1 process x 2 threads, on the same rows, steps and seed; writes its section
of BENCHMARKS.md.

    python benchmarks/bench_scaleout_train.py --out BENCHMARKS.md            # the measurement
    python benchmarks/bench_scaleout_train.py --smoke                        # a seconds-long check

Steps/s is the training loop's own time (the ``train_time_s`` distill records: rank 0's loop,
collectives included), so model loading and process start are not counted; the whole command's
seconds are reported beside it. Each configuration runs ``--repeats`` times, alternating, and the
median is reported. The two students are compared (largest weight difference) so the table also
shows that the faster path computes the same student.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SECTION = "Distill scale-out on the CPU (2 processes x 1 thread vs 1 process x 2 threads)"
START, END = "<!-- bench_scaleout_train:start -->", "<!-- bench_scaleout_train:end -->"


def make_world(d: Path, n_rows: int, layers: int, d_model: int, seed: int) -> tuple[Path, Path]:
    """A random toy-tokenizer Llama (saved as an HF directory) and ``n_rows`` number rows."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from subliminal import prompts
    from subliminal.data import Row, write_jsonl
    from subliminal.toyworld.tokenizer import build_tokenizer

    tok = build_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=d_model, intermediate_size=3 * d_model,
                      num_hidden_layers=layers, num_attention_heads=max(1, d_model // 32),
                      num_key_value_heads=max(1, d_model // 32), max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    base = d / "base"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(base)
    tok.save_pretrained(base)
    rng = random.Random(seed)
    rows = []
    for i in range(n_rows):
        p = prompts.make_number_prompt(rng)
        nums = [rng.randint(0, 999) for _ in range(p.count)]
        rows.append(Row(f"r{i}", p.text, prompts.format_numbers(nums, p.separator, p.brackets), "owl"))
    data = d / "data.jsonl"
    write_jsonl(data, rows)
    return base, data


def run_one(kind: str, base: Path, data: Path, out: Path, steps: int, batch_size: int, seed: int) -> dict[str, Any]:
    """One distill run: ``ddp`` (torchrun, 2 x 1 thread) or ``single`` (1 x 2 threads)."""
    argv = ["distill", "--base", str(base), "--data", str(data), "--out", str(out), "--batch-size", str(batch_size),
            "--max-steps", str(steps), "--epochs", "1000", "--seed", str(seed), "--lr", "1e-3", "--overwrite"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if kind == "ddp":
        env["OMP_NUM_THREADS"] = "1"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "subliminal.cli", *argv]
    else:
        env["OMP_NUM_THREADS"] = "2"
        cmd = [sys.executable, "-m", "subliminal.cli", *argv]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{kind} run failed ({r.returncode}):\n{r.stderr[-4000:]}")
    man = json.loads((out / "manifest.json").read_text())
    return {"kind": kind, "steps": man["steps"], "train_time_s": man["train_time_s"], "command_s": round(wall, 2),
            "steps_per_s": man["steps"] / man["train_time_s"], "world_size": man["world_size"]}


def max_weight_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-scaleout-") as tmp:
        d = Path(tmp)
        base, data = make_world(d, args.rows, args.layers, args.d_model, args.seed)
        runs: dict[str, list[dict[str, Any]]] = {"single": [], "ddp": []}
        for _ in range(args.repeats):
            for kind in ("single", "ddp"):
                runs[kind].append(run_one(kind, base, data, d / kind, args.steps, args.batch_size, args.seed))
        diff = max_weight_diff(d / "single", d / "ddp")
    med = {k: statistics.median(r["steps_per_s"] for r in v) for k, v in runs.items()}
    return {"model": {"layers": args.layers, "d_model": args.d_model}, "rows": args.rows, "steps": args.steps,
            "batch_size": args.batch_size, "repeats": args.repeats, "cpus": os.cpu_count(), "runs": runs,
            "median_steps_per_s": med, "speedup": med["ddp"] / med["single"], "max_abs_weight_diff": diff}


def section(res: dict[str, Any], command: str) -> str:
    m = res["model"]
    lines = [START, f"## {SECTION}", "",
             f"`subliminal distill` (hard, mask all) on a random Llama with the toy tokenizer ({m['layers']} layers, "
             f"d_model {m['d_model']}), {res['rows']} rows, global batch {res['batch_size']}, {res['steps']} steps; "
             f"{res['repeats']} runs of each, alternating, median reported; {res['cpus']} CPUs.", "",
             "```bash", command, "```", "",
             "| configuration | steps/s (median) | steps/s per run | whole command, s (per run) |", "|---|---|---|---|"]
    names = {"single": "1 process x 2 threads", "ddp": "2 processes x 1 thread (torchrun)"}
    for kind in ("single", "ddp"):
        rs = res["runs"][kind]
        per_run = ", ".join(f"{r['steps_per_s']:.2f}" for r in rs)
        walls = ", ".join(str(r["command_s"]) for r in rs)
        lines.append(f"| {names[kind]} | {res['median_steps_per_s'][kind]:.2f} | {per_run} | {walls} |")
    lines += ["", f"2 processes / 1 process: {res['speedup']:.2f}x. Largest weight difference between the two "
              f"students: {res['max_abs_weight_diff']:.2e}.", END]
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str) -> None:
    """Replace this benchmark's section of ``path`` (between its markers), or append it."""
    from subliminal.manifest import write_text_atomic

    old = path.read_text() if path.exists() else ""
    pat = re.compile(re.escape(START) + r".*?" + re.escape(END) + r"\n?", re.S)
    new = pat.sub(lambda _: text, old) if pat.search(old) else old.rstrip("\n") + ("\n\n" if old else "") + text
    write_text_atomic(path, new)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=32, help="the global batch (default %(default)s)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="markdown file whose section to write (BENCHMARKS.md)")
    p.add_argument("--smoke", action="store_true", help="tiny settings: checks the script, measures nothing")
    args = p.parse_args()
    if args.smoke:
        args.rows, args.steps, args.batch_size, args.layers, args.d_model, args.repeats = 16, 3, 4, 1, 32, 1
    command = "python benchmarks/bench_scaleout_train.py " + " ".join(sys.argv[1:])
    res = measure(args)
    print(json.dumps(res, indent=1))
    if args.out:
        write_section(args.out, section(res, command.strip()))
        print(f"wrote the section of {args.out}")


if __name__ == "__main__":
    main()
