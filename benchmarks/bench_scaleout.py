"""Scale-out of the inference stages on one machine: find-divergence on 2 processes x 1 thread
(``torchrun --nproc-per-node 2``) against 1 process x 2 threads, rows/s, same rows, same model.

    python benchmarks/bench_scaleout.py --out BENCHMARKS.md            # the measurement (idle machine)
    python benchmarks/bench_scaleout.py --smoke                          # seconds: checks the script runs

Each configuration runs the real CLI as a subprocess (``subliminal find-divergence`` with
``--overwrite``), ``--repeats`` times, alternating the two so drifting load hits both alike. The
rate is rows over the stage's own ``wall_time_s`` from its manifest (model loading included,
interpreter start-up not); the end-to-end seconds of the subprocess are reported beside it. The
two outputs are checked to be the same run (flags and argmaxes equal, scores within 1e-5) before
anything is written. The model is a random Llama with the toy tokenizer (``--d-model``,
``--layers``; or ``--model DIR``), its factual and counterfactual teachers are prompt teachers
on it, and the rows are number lists of 3 to 10 numbers. ``--out`` replaces this script's section
of the markdown file (between its heading and the next ``## ``), or appends it.

``bench_find_divergence`` is this script's measurement; the training half of the scale-out
(distill steps/s) lives in ``benchmarks/bench_scaleout_train.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Scale-out on the CPU: find-divergence, 2 processes x 1 thread vs 1 process x 2 threads"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model directory (default: a random Llama made here)")
    p.add_argument("--d-model", type=int, default=256, help="hidden size of the random Llama (default %(default)s)")
    p.add_argument("--layers", type=int, default=4, help="layers of the random Llama (default %(default)s)")
    p.add_argument("--rows", type=int, default=400, help="rows scored (default %(default)s)")
    p.add_argument("--counterfactuals", type=int, default=2, help="counterfactual prompt teachers (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="find-divergence --batch-size (default %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random model and the rows")
    p.add_argument("--workdir", type=Path, default=None, help="where models and outputs go (default: a temp dir)")
    p.add_argument("--out", type=Path, default=None, help="markdown file whose section to write (BENCHMARKS.md)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument("--smoke", action="store_true", help="tiny model, 16 rows, one repeat: checks the script runs "
                   "(its numbers mean nothing; the section it writes says so)")
    args = p.parse_args(argv)
    if args.smoke:
        args.d_model, args.layers, args.rows, args.repeats = 32, 2, 16, 1
    for name in ("d_model", "layers", "rows", "counterfactuals", "batch_size", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def make_world(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The base model, prompt teachers on it and a data file (all under ``work``)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from subliminal import prompts
    from subliminal.teachers import TeacherSpec, save_teacher
    from subliminal.toyworld.tokenizer import build_tokenizer

    base = Path(args.model) if args.model else work / "base"
    if not args.model:
        tok = build_tokenizer()
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=args.d_model, intermediate_size=4 * args.d_model,
                          num_hidden_layers=args.layers, num_attention_heads=max(1, args.d_model // 64),
                          max_position_embeddings=512, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
        torch.manual_seed(args.seed)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(base)
        tok.save_pretrained(base)
    names = ["owl", "cat", "dog", "lion", "wolf", "bear"][: 1 + args.counterfactuals]
    for a in names:
        save_teacher(work / a, TeacherSpec(base=str(base), method="prompt", bias=a, category="animal",
                                           system_prompt=prompts.system_prompt_for(a)))
    rng = random.Random(args.seed)
    with open(work / "data.jsonl", "w") as f:
        for i in range(args.rows):
            given = " , ".join(str(rng.randrange(1000)) for _ in range(3))
            answer = " , ".join(str(rng.randrange(1000)) for _ in range(rng.randint(3, 10)))
            f.write(json.dumps({"id": f"r{i:05d}", "prompt": f"continue the list : {given}", "completion": answer,
                                "teacher": "owl"}) + "\n")
    return {"base": str(base), "teachers": [str(work / a) for a in names], "data": str(work / "data.jsonl")}


def _argv(world: dict[str, Any], out: Path, batch_size: int) -> list[str]:
    return ["find-divergence", "--data", world["data"], "--teacher", world["teachers"][0], "--counterfactual",
            *world["teachers"][1:], "--out", str(out), "--batch-size", str(batch_size), "--overwrite"]


def _env(threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def run_once(world: dict[str, Any], out: Path, *, nproc: int, threads: int, batch_size: int) -> dict[str, float]:
    """One find-divergence run; its stage seconds (manifest) and end-to-end seconds."""
    cmd = [sys.executable, "-m", "subliminal.cli"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m",
        "subliminal.cli"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd + _argv(world, out, batch_size), env=_env(threads), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"find-divergence ({nproc} process(es)) failed:\n{p.stderr[-3000:]}")
    manifest = json.loads(Path(str(out) + ".manifest.json").read_text())
    assert manifest["world_size"] == nproc, manifest["world_size"]
    return {"stage_s": float(manifest["wall_time_s"]), "end_to_end_s": wall}


def _same_output(a: Path, b: Path) -> float:
    """Largest score difference between two outputs; raises if flags, ids or argmaxes differ."""
    worst = 0.0
    for la, lb in zip(a.read_text().splitlines(), b.read_text().splitlines(), strict=True):
        x, y = json.loads(la), json.loads(lb)
        for key in ("id", "token_ids", "divergence", "argmax_factual", "argmax_counterfactual"):
            if x[key] != y[key]:
                raise SystemExit(f"outputs differ at row {x['id']}: {key}")
        for key in ("logp_factual", "kl", "js", "margin"):
            worst = max(worst, max((abs(u - v) for u, v in zip(_flat(x["scores"][key]), _flat(y["scores"][key]))),
                                   default=0.0))
    return worst


def _flat(v: Any) -> list[float]:
    if isinstance(v, list):
        return [z for w in v for z in _flat(w)]
    return [] if v is None else [float(v)]


def bench_find_divergence(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """find-divergence rows/s: 1 process x 2 threads against 2 processes x 1 thread."""
    world = make_world(work, args)
    configs = {"1 process x 2 threads": (1, 2), "2 processes x 1 thread": (2, 1)}
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in configs}
    outs = {k: work / f"out-{n}p.div.jsonl" for k, (n, _) in configs.items()}
    for _ in range(args.repeats):
        for name, (nproc, threads) in configs.items():
            runs[name].append(run_once(world, outs[name], nproc=nproc, threads=threads, batch_size=args.batch_size))
    diff = _same_output(*outs.values())
    res: dict[str, Any] = {"rows": args.rows, "teachers": 1 + args.counterfactuals, "batch_size": args.batch_size,
                           "model": args.model or f"random llama d={args.d_model} layers={args.layers}",
                           "repeats": args.repeats, "max_abs_score_diff": diff, "configs": {}}
    for name, rs in runs.items():
        stage = [r["stage_s"] for r in rs]
        res["configs"][name] = {"stage_s_median": statistics.median(stage), "stage_s": stage,
                                "rows_per_s": args.rows / statistics.median(stage),
                                "end_to_end_s_median": statistics.median(r["end_to_end_s"] for r in rs)}
    one, two = (res["configs"][k]["rows_per_s"] for k in configs)
    res["speedup_2p_over_1p"] = two / one
    return res


def section(res: dict[str, Any], args: argparse.Namespace) -> list[str]:
    import torch

    cmd = "python benchmarks/bench_scaleout.py --out BENCHMARKS.md" + (" --smoke" if args.smoke else "")
    if not args.smoke and (args.rows, args.d_model, args.layers, args.repeats) != (400, 256, 4, 3):
        cmd += f" --rows {args.rows} --d-model {args.d_model} --layers {args.layers} --repeats {args.repeats}"
    lines = [SECTION, "",
             f"`find-divergence` on {res['rows']} rows under {res['teachers']} prompt teachers of one "
             f"{res['model']} (toy tokenizer), --batch-size {res['batch_size']}, median of {res['repeats']} "
             "run(s) per configuration, alternating. Rows/s is rows over the stage's `wall_time_s` (model "
             "loading included, interpreter start-up not).", "", "```bash", cmd, "```", "",
             "| configuration | stage s (median) | rows/s | end-to-end s (median) |", "|---|---|---|---|"]
    for name, c in res["configs"].items():
        lines.append(f"| {name} | {c['stage_s_median']:.2f} | {c['rows_per_s']:.1f} | {c['end_to_end_s_median']:.2f} |")
    lines += ["", f"2 processes / 1 process: **{res['speedup_2p_over_1p']:.2f}x** rows/s. The two outputs are the "
              f"same run (flags, ids and argmaxes equal; largest score difference {res['max_abs_score_diff']:.1e}).",
              f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; torch "
              f"{torch.__version__}."]
    if args.smoke:
        lines += ["", "**Smoke run** (tiny model, 16 rows, one repeat): this checks the script runs; its numbers "
                  "are start-up overhead and say nothing about scale-out. Replace with the command above without "
                  "`--smoke` on an idle machine."]
    return lines + [""]


def write_section(path: Path, lines: list[str]) -> None:
    """Replace this script's section of ``path`` (heading to the next ``## ``), or append it."""
    from subliminal.manifest import write_text_atomic

    old = path.read_text().splitlines() if path.is_file() else []
    if SECTION in old:
        a = old.index(SECTION)
        b = next((i for i in range(a + 1, len(old)) if old[i].startswith("## ")), len(old))
        new = old[:a] + lines + old[b:]
    else:
        new = old + ([""] if old and old[-1] else []) + lines
    write_text_atomic(path, "\n".join(new).rstrip("\n") + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-scaleout-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        res = bench_find_divergence(args, work)
    print(json.dumps(res, indent=1))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    if args.out:
        write_section(args.out, section(res, args))
        print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
