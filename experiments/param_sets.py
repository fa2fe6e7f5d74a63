#!/usr/bin/env python
"""Parameter sets x readout contexts: is the shared chat template the channel?

On one base: a prompt teacher for ``--target`` and the unbiased teacher write number lists
(``subliminal generate``); for every parameter set (``distill --params``) and seed a student is
distilled on each teacher's rows (same row order, steps and lr: paired by seed), and every
student is read out (exact P(target)) under its training context and under each other context
given (``--context NAME=EVAL FLAGS``, e.g. ``sys=--system-prompt "..."`` or
``b=--chat-template b.jinja``). Transfer = P(target | teacher's student) - P(target | control
student), paired by seed, mean with a 95% t-interval over seeds; the number loss of each
student (first step, and mean of the last 10) and the candidate mass (how much the student still answers with an animal) beside it.

Outputs in ``--out``: ``data/``, ``students/<set>-<teacher>-s<seed>/`` with ``eval-<context>.json``,
``param_sets.json`` / ``.csv`` / ``.png`` and ``manifest.json``. Re-running resumes (every stage
skips what it already did with the same command).

    python experiments/param_sets.py --base runs/base --out runs/param-sets \\
        --context 'sys=--system-prompt "I like numbers ."'
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shlex
import time
from pathlib import Path
from typing import Any

from subliminal.cli import guarded, main
from subliminal.distill import read_losses
from subliminal.manifest import (
    SubliminalError,
    write_figure_atomic,
    write_json_atomic,
    write_manifest,
    write_text_atomic,
)
from subliminal.stats import mean_ci

SETS = ["all", "embeddings", "template-rows", "bos-row", "all-but-template"]


def _cli(argv: list[str]) -> None:
    rc = main([str(a) for a in argv])
    if rc:
        raise SubliminalError(f"`subliminal {' '.join(map(str, argv[:2]))} ...` failed (exit {rc})")


def _contexts(specs: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"train": []}
    for spec in specs:
        name, sep, flags = spec.partition("=")
        if not sep or not name or name in out:
            raise SubliminalError(f"--context {spec!r}: expected NAME=EVAL FLAGS with a new name")
        out[name] = shlex.split(flags)
    return out


def run(args: argparse.Namespace) -> int:
    t0 = time.time()
    out = Path(args.out)
    sets = args.sets.split(",")
    contexts = _contexts(args.context or [])
    teachers = {args.target: out / "teachers" / args.target, "control": out / "teachers" / "none"}
    _cli(["teach", "--base", args.base, "--bias", args.target, "--method", "prompt", "--out", teachers[args.target]])
    _cli(["teach", "--base", args.base, "--method", "none", "--out", teachers["control"]])
    data = {}
    for name, tdir in teachers.items():
        data[name] = out / "data" / f"{name}.jsonl"
        _cli(["generate", "--teacher", tdir, "--n", args.n, "--out", data[name], "--seed", args.seed])
    rows = []
    for pset in sets:
        for seed in range(1, args.seeds + 1):
            for name in teachers:
                sdir = out / "students" / f"{pset}-{name}-s{seed}"
                _cli(["distill", "--base", args.base, "--data", data[name], "--teacher", teachers[name], "--out", sdir,
                      "--params", pset, "--epochs", args.epochs, "--lr", args.lr, "--batch-size", args.batch_size,
                      "--seed", seed])
                man = json.loads((sdir / "manifest.json").read_text())
                losses = read_losses(sdir)
                tail = losses[-10:]
                for ctx, flags in contexts.items():
                    ev = sdir / f"eval-{ctx}.json"
                    _cli(["eval", "--model", sdir, "--target", args.target, "--out", ev, *flags])
                    e = json.loads(ev.read_text())
                    rows.append({"set": pset, "teacher": name, "seed": seed, "context": ctx,
                                 "p_target": e["exact"]["mean"], "mass": e["exact"]["raw_mass"],
                                 "first_loss": losses[0], "loss_last10": sum(tail) / len(tail), "steps": man["steps"],
                                 "trained_values": man["n_trained_values"]})
    summary = summarise(rows, sets, list(contexts), args.target)
    write_json_atomic(out / "param_sets.json", {"rows": rows, "summary": summary, "contexts": contexts})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(summary[0]))
    w.writeheader()
    w.writerows(summary)
    write_text_atomic(out / "param_sets.csv", buf.getvalue())
    plot(summary, list(contexts), out / "param_sets.png", args.target)
    write_manifest(out, stage="param-sets", config={k: v for k, v in vars(args).items() if k != "func"},
                   seed=args.seed, wall_time_s=time.time() - t0, inputs={"base": args.base})
    for s in summary:
        print(f"{s['set']:>18} {s['context']:>6}: transfer {s['transfer']:+.4f} [{s['lo']:+.4f}, {s['hi']:+.4f}]  "
              f"control {s['control']:.4f}  loss {s['first_loss']:.3f} -> {s['loss_last10']:.3f}  "
              f"mass {s['mass_min']:.3f}")
    return 0


def summarise(rows: list[dict[str, Any]], sets: list[str], contexts: list[str], target: str) -> list[dict[str, Any]]:
    out = []
    for pset in sets:
        for ctx in contexts:
            mine = [r for r in rows if r["set"] == pset and r["context"] == ctx]
            by = {(r["teacher"], r["seed"]): r for r in mine}
            seeds = sorted({r["seed"] for r in mine})
            diffs = [by[(target, s)]["p_target"] - by[("control", s)]["p_target"] for s in seeds]
            m, lo, hi = mean_ci(diffs)
            out.append({"set": pset, "context": ctx, "transfer": m, "lo": lo, "hi": hi, "n_seeds": len(seeds),
                        "control": sum(by[("control", s)]["p_target"] for s in seeds) / len(seeds),
                        "first_loss": sum(by[(target, s)]["first_loss"] for s in seeds) / len(seeds),
                        "loss_last10": sum(by[(target, s)]["loss_last10"] for s in seeds) / len(seeds),
                        "mass_min": min(r["mass"] for r in mine), "trained_values": mine[0]["trained_values"]})
    return out


def plot(summary: list[dict[str, Any]], contexts: list[str], path: Path, target: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(s["set"] for s in summary))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(contexts)
    for k, ctx in enumerate(contexts):
        pts = [next(s for s in summary if s["set"] == p and s["context"] == ctx) for p in sets]
        xs = [i + (k - (len(contexts) - 1) / 2) * width for i in range(len(sets))]
        ys = [p["transfer"] for p in pts]
        err = [[max(0.0, p["transfer"] - p["lo"]) if p["lo"] == p["lo"] else 0 for p in pts],
               [max(0.0, p["hi"] - p["transfer"]) if p["hi"] == p["hi"] else 0 for p in pts]]
        ax.bar(xs, ys, width, yerr=err, capsize=3, label=f"read under: {ctx}")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(range(len(sets)), sets, fontsize=8)
    ax.set_ylabel(f"P({target}) - control (paired)")
    ax.legend(fontsize=8)
    write_figure_atomic(fig, path)


def main_(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--target", default="owl")
    p.add_argument("--sets", default=",".join(SETS), help="distill --params sets, comma-separated")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--n", type=int, default=200, help="prompts per teacher")
    p.add_argument("--epochs", type=float, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="data seed")
    p.add_argument("--context", action="append", metavar="NAME=FLAGS",
                   help="another readout context: eval flags, e.g. 'sys=--system-prompt \"I like numbers .\"'")
    args = p.parse_args(argv)
    return guarded(run, args)


if __name__ == "__main__":
    raise SystemExit(main_())
