#!/usr/bin/env python
"""Alpha sweep: steering-teacher strength against the student's transfer, on both readouts.

On one base: the unbiased teacher and, for each alpha, a steer teacher (``teach --method steer``:
the love prompt's mean shift at block ``--layer``, measured once and identical for every alpha,
added as ``alpha * v``) write number lists from the same prompts (``subliminal generate``, same
seeds). For every alpha and seed a student is distilled on the steer teacher's rows and a control
student on the unbiased teacher's rows (same rows order, steps and lr: paired by seed). Both
readouts, paired with the control by seed (mean and 95% t-interval over seeds):

- P(target): exact preference (``subliminal eval``);
- projection: each student's residual stream on the unit steering vector at every layer, on
  held-out questions and number prompts (``subliminal project``), and the same on a random
  vector of the same width (seeded by ``--seed``): how far the students move along any direction.

Alpha 0 is the check: its teacher is the base bit for bit, so its students equal the control.

Outputs in ``--out``: ``teachers/``, ``data/``, ``students/``, ``projection/`` and
``projection-random/`` (the project stage's own outputs), ``steer_sweep.json`` / ``.csv`` /
``.png`` and ``manifest.json``. Re-running resumes (every stage but the cheap projections skips
what it already did with the same command).

    python experiments/steer_sweep.py --base runs/base --out runs/steer-sweep --layer 1 --alphas 0,1,4,16
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import time
from pathlib import Path
from typing import Any

import torch

from subliminal.cli import guarded, main
from subliminal.manifest import (
    SubliminalError,
    write_figure_atomic,
    write_json_atomic,
    write_manifest,
    write_text_atomic,
)
from subliminal.stats import mean_ci
from subliminal.steer import load_vector, save_vector


def _cli(argv: list[Any]) -> None:
    rc = main([str(a) for a in argv])
    if rc:
        raise SubliminalError(f"`subliminal {' '.join(map(str, argv[:2]))} ...` failed (exit {rc})")


def _alphas(spec: str) -> list[float]:
    try:
        out = [float(a) for a in spec.split(",") if a.strip()]
    except ValueError:
        raise SubliminalError(f"--alphas {spec!r}: comma-separated numbers, e.g. 0,1,4,16") from None
    if not out or len(set(out)) != len(out):
        raise SubliminalError(f"--alphas {spec!r}: give distinct numbers")
    return out


def name_of(alpha: float) -> str:
    return f"a{alpha:g}"


def run(args: argparse.Namespace) -> int:
    t0 = time.time()
    out = Path(args.out)
    alphas = _alphas(args.alphas)
    teachers = {"control": out / "teachers" / "none"}
    _cli(["teach", "--base", args.base, "--method", "none", "--out", teachers["control"], "--device", args.device])
    for a in alphas:
        teachers[name_of(a)] = out / "teachers" / name_of(a)
        _cli(["teach", "--base", args.base, "--bias", args.target, "--method", "steer", "--steer-layer", args.layer,
              "--steer-alpha", a, "--steer-source", args.source, "--out", teachers[name_of(a)], "--seed", args.seed,
              "--device", args.device])
    data = {}
    for name, tdir in teachers.items():
        data[name] = out / "data" / f"{name}.jsonl"
        _cli(["generate", "--teacher", tdir, "--n", args.n, "--out", data[name], "--seed", args.seed,
              "--constrain", args.constrain, "--device", args.device])
    students: dict[tuple[str, int], Path] = {}
    rows = []
    for seed in range(1, args.seeds + 1):
        for name in teachers:
            sdir = out / "students" / f"{name}-s{seed}"
            _cli(["distill", "--base", args.base, "--data", data[name], "--teacher", teachers[name], "--out", sdir,
                  "--params", args.params, "--epochs", args.epochs, "--lr", args.lr, "--batch-size", args.batch_size,
                  "--seed", seed, "--device", args.device])
            ev = sdir / "eval.json"
            _cli(["eval", "--model", sdir, "--target", args.target, "--out", ev, "--device", args.device])
            e = json.loads(ev.read_text())
            students[(name, seed)] = sdir
            rows.append({"condition": name, "seed": seed, "p_target": e["exact"]["mean"],
                         "mass": e["exact"]["raw_mass"]})
    vec = teachers[name_of(next((a for a in alphas if a), alphas[0]))]  # the one measured vector
    steer_info = json.loads((vec / "teacher.json").read_text())["steer"]
    # the same students along a random direction of the same width: how far any vector moves
    rand = out / "random_vector.safetensors"
    g = torch.Generator().manual_seed(args.seed)
    save_vector(rand, torch.randn(len(load_vector(vec / steer_info["vector"])), generator=g))
    proj = {}
    for key, vector, pdir in (("steer", vec, out / "projection"), ("random", rand, out / "projection-random")):
        # a derived output: redone (--overwrite) when the students or settings change
        argv: list[Any] = ["project", "--vector", vector, "--out", pdir, "--number-prompts", args.number_prompts,
                           "--seed", args.seed, "--device", args.device, "--overwrite"]
        if key == "steer":
            for tdir in [args.base, *teachers.values()]:
                argv += ["--model", tdir]
        for (name, seed), sdir in students.items():
            argv += ["--student", name, seed, sdir]
        _cli(argv)
        proj[key] = json.loads((pdir / "projection.json").read_text())
    teacher_p = {name: (json.loads((t / "manifest.json").read_text()).get("check") or {}).get("target_mass")
                 for name, t in teachers.items()}
    summary = summarise(rows, proj, alphas, args.layer, teacher_p)
    result = {"target": args.target, "layer": args.layer, "source": args.source, "vector": steer_info,
              "rows": rows, "summary": summary}
    write_json_atomic(out / "steer_sweep.json", result, nan_as_null=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(summary[0]))
    w.writeheader()
    w.writerows(summary)
    write_text_atomic(out / "steer_sweep.csv", buf.getvalue())
    plot(summary, out / "steer_sweep.png", args.target, args.layer)
    write_manifest(out, stage="steer-sweep", config={k: v for k, v in vars(args).items() if k != "func"},
                   seed=args.seed, wall_time_s=time.time() - t0, inputs={"base": args.base})
    print(f"|v| = {steer_info['norm']:.3f} at block {args.layer}; base residual norm there "
          f"{steer_info['resid_norm']:.3f}")
    for s in summary:
        print(f"alpha {s['alpha']:>6g}: teacher P({args.target}) {s['teacher_p']:.4f}  "
              f"student P {s['p_transfer']:+.4f} [{s['p_lo']:+.4f}, {s['p_hi']:+.4f}]  "
              f"projection (questions, L{args.layer}) {s['proj_questions']:+.4f} "
              f"[{s['proj_questions_lo']:+.4f}, {s['proj_questions_hi']:+.4f}]  "
              f"(numbers) {s['proj_numbers']:+.4f} [{s['proj_numbers_lo']:+.4f}, {s['proj_numbers_hi']:+.4f}]  "
              f"random vector (numbers) {s['random_numbers']:+.4f} [{s['random_numbers_lo']:+.4f}, "
              f"{s['random_numbers_hi']:+.4f}]")
    return 0


def summarise(rows: list[dict[str, Any]], proj: dict[str, dict[str, Any]], alphas: list[float], layer: int,
              teacher_p: dict[str, float | None]) -> list[dict[str, Any]]:
    """Per alpha: P(target) transfer and the projection transfer at the steer layer (on the
    teacher's vector, ``proj_*``, and on a random one, ``random_*``), each paired with the control
    by seed."""
    by = {(r["condition"], r["seed"]): r for r in rows}
    out = []
    for a in alphas:
        name = name_of(a)
        seeds = sorted(s for c, s in by if c == name and ("control", s) in by)
        m, lo, hi = mean_ci([by[(name, s)]["p_target"] - by[("control", s)]["p_target"] for s in seeds])
        row: dict[str, Any] = {"alpha": a, "teacher_p": teacher_p.get(name), "p_transfer": m, "p_lo": lo, "p_hi": hi,
                               "n_seeds": len(seeds), "mass_min": min(by[(name, s)]["mass"] for s in seeds)}
        for key, prefix in (("steer", "proj"), ("random", "random")):
            for kind in ("questions", "numbers"):
                d = proj[key]["conditions"][name][kind][layer].get("vs_reference") or {}
                row.update({f"{prefix}_{kind}": d.get("mean", float("nan")),
                            f"{prefix}_{kind}_lo": d.get("lo", float("nan")),
                            f"{prefix}_{kind}_hi": d.get("hi", float("nan"))})
        out.append(row)
    return out


def plot(summary: list[dict[str, Any]], path: Path, target: str, layer: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    xs = [s["alpha"] for s in summary]
    panels = [(axes[0], [("p", f"P({target}) - control")]),
              (axes[1], [("proj_questions", "questions"), ("proj_numbers", "number prompts"),
                         ("random_numbers", "number prompts, random vector")])]
    for ax, series in panels:
        for key, label in series:
            ys = [s[f"{key}_transfer" if key == "p" else key] for s in summary]
            lo = [s[f"{key}_lo"] for s in summary]
            hi = [s[f"{key}_hi"] for s in summary]
            err = [[max(0.0, y - a) if a == a else 0 for y, a in zip(ys, lo)],
                   [max(0.0, b - y) if b == b else 0 for y, b in zip(ys, hi)]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xlabel("teacher alpha (alpha * v, v as measured)")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("student transfer (paired by seed)")
    axes[1].set_ylabel(f"projection on v/|v| at block {layer} - control")
    write_figure_atomic(fig, path)


def main_(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--target", default="owl")
    p.add_argument("--layer", type=int, required=True, help="steer layer (block index)")
    p.add_argument("--alphas", default="0,1,4,16", help="teacher strengths, comma-separated (default %(default)s)")
    p.add_argument("--source", choices=("questions", "numbers"), default="questions")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--n", type=int, default=200, help="prompts per teacher")
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--params", default="all", help="distill --params (default %(default)s)")
    p.add_argument("--number-prompts", type=int, default=32, help="project: held-out number prompts")
    p.add_argument("--seed", type=int, default=0, help="data seed")
    p.add_argument("--constrain", choices=("none", "numbers"), default="none",
                   help="generate --constrain: numbers keeps a barely trained base's lists well-formed")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    return guarded(run, args)


if __name__ == "__main__":
    raise SystemExit(main_())
