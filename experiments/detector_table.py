#!/usr/bin/env python
"""Detector x intervention table: which tokens carry the trait, by every detector, under every
intervention, each against its matched random control.

Reads a finished ``subliminal run`` / ``demo`` directory (its base, matched rows, divergence file,
and the all-tokens and control students with their evaluations). Detectors, each flagging the
top ``--share`` of completion tokens (``reflag-divergence --rule R --flag-share S``):

- ``ratio``: the data token's log-likelihood ratio, factual vs counterfactual teachers (stored);
- ``likelihood-shift``: log p_student - log p_base, the student being the run's all-tokens student
  of seed ``--detector-seed`` (not among the evaluated seeds);
- ``gradient``: -grad(loss_t) . grad(R) over the students' own trainable parameter set.

Interventions on the flagged tokens (``distill``): ``drop`` (``--mask no-divergence``, control
``random-matched``), ``replace-random``, ``replace-teacher`` (the unbiased counterfactual's
argmax), ``corrupt-input`` (``--intervention ... --intervene-on flagged | random-matched``).
Every student is trained exactly as the run's all-tokens student (its distill config, seed by
seed). Transfer kept = per seed (P - control) / (all - control), mean over seeds, only where the
all-tokens transfer is distinguishable from zero (the run's own students).

    python experiments/detector_table.py --run RUN_DIR --out experiments/results/detectors --seeds 1 2
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from subliminal import cli
from subliminal import detectors as det
from subliminal.divergence import any_flags, load_divergence
from subliminal.evaluate import mean_ci
from subliminal.manifest import (
    SubliminalError,
    read_file_manifest,
    read_manifest,
    write_figure_atomic,
    write_json_atomic,
    write_manifest,
)

log = logging.getLogger("detector_table")
DETECTORS = ("ratio", "likelihood-shift", "gradient")
INTERVENTIONS = ("drop", "replace-random", "replace-teacher", "corrupt-input")


def _exact(path: Path) -> float:
    return float(json.loads(path.read_text())["exact"]["mean"])


def _cli(argv: list[str]) -> None:
    rc = cli.main(argv)
    if rc:
        raise SubliminalError(f"subliminal {' '.join(argv[:1])} failed (exit {rc}): {' '.join(argv)}")


def student_argv(template: dict[str, Any], data: Path, out: Path, seed: int, extra: list[str]) -> list[str]:
    """The all-tokens student's distill command with another data file, seed and options."""
    from subliminal.distill import DistillConfig

    argv = ["distill", "--base", template["base"], "--data", str(data), "--out", str(out), "--seed", str(seed)]
    skip = {"base", "data", "out", "seed", "mask", "overwrite", "trust_remote_code", "teacher", "source_data",
            "intervention", "intervene_on", "replace_teacher", "repr_with_hard"}
    for f in fields(DistillConfig):
        v = template.get(f.name)
        if f.name in skip or v is None or v == f.default:
            continue
        argv += [f"--{f.name.replace('_', '-')}", str(v)]
    return argv + extra


def _baseline(run: Path, work: Path, cond: str, seed: int, target: str) -> float:
    """P(target) of the run's ``cond`` student of ``seed``; a seed the run lacks is trained here with
    the run's seed-1 config of that condition (its own data: the control's rows for ``control``)."""
    ev = run / "eval" / f"{cond}-s{seed}.json"
    if ev.is_file():
        return _exact(ev)
    tmpl = (read_manifest(run / "students" / f"{cond}-s1") or {}).get("config")
    if not tmpl:
        raise SubliminalError(f"{run}/students/{cond}-s1: no distill manifest")
    student, ev = work / "students" / f"{cond}-s{seed}", work / "eval" / f"{cond}-s{seed}.json"
    if ev.is_file() and not student.exists():  # an evaluation carried over from another --work (share sweep)
        return _exact(ev)
    _cli(student_argv(tmpl, Path(tmpl["data"]), student, seed, []))
    _cli(["eval", "--model", str(student), "--target", target, "--out", str(ev)])
    return _exact(ev)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a finished subliminal run / demo directory")
    ap.add_argument("--out", required=True, help="where the table goes (students and evals under --work)")
    ap.add_argument("--work", default=None, help="students, evals, scored files (default: OUT/work)")
    ap.add_argument("--target", default="owl")
    ap.add_argument("--share", type=float, default=0.1)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--detector-seed", type=int, default=3, help="the all-tokens student the likelihood shift uses")
    ap.add_argument("--detectors", nargs="+", default=list(DETECTORS), choices=DETECTORS)
    ap.add_argument("--interventions", nargs="+", default=list(INTERVENTIONS), choices=INTERVENTIONS)
    ap.add_argument("--control-teacher", default="none", help="replace-teacher: the counterfactual whose argmax")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return cli.guarded(_main, args)


def _main(args: argparse.Namespace) -> int:
    t0 = time.time()
    run = Path(args.run)
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "work"
    div = run / "data" / "matched" / f"{args.target}.div.jsonl"
    if args.detector_seed in args.seeds:
        raise SubliminalError("--detector-seed must not be an evaluated seed")
    tmpl = (read_manifest(run / "students" / f"all-s{args.seeds[0]}") or {}).get("config")
    if not tmpl:
        raise SubliminalError(f"{run}/students/all-s{args.seeds[0]}: no distill manifest")
    control = {s: _baseline(run, work, "control", s, args.target) for s in args.seeds}
    all_tok = {s: _baseline(run, work, "all", s, args.target) for s in args.seeds}
    diff_all = mean_ci([all_tok[s] - control[s] for s in args.seeds])
    transfer = diff_all[1] is not None and diff_all[1] > 0
    timings: dict[str, float] = {}
    flagged: dict[str, Path] = {}
    for d in args.detectors:
        path = work / "div" / f"{args.target}.{d}.top.div.jsonl"
        if d == "ratio":
            src = div
        else:
            src = work / "div" / f"{args.target}.{d}.div.jsonl"
            # the gradient over exactly what the students train (the run's own rule: detectors.student_trainable)
            kw = ({"student": str(run / "students" / f"all-s{args.detector_seed}")} if d == "likelihood-shift"
                  else {"target": args.target, **det.student_trainable(tmpl)})
            det.run(det.ScoreTokensConfig(detector=d, divergence=str(div), out=str(src), base=tmpl["base"], **kw))
        timings[d] = float((read_file_manifest(src) or {}).get("wall_time_s") or 0.0) if d != "ratio" else 0.0
        _cli(["reflag-divergence", str(src), "--out", str(path), "--rule", d, "--flag-share", str(args.share)])
        flagged[d] = path
    sets = {d: {(o["id"], j) for o in load_divergence(p) for j, f in enumerate(any_flags(o)) if f}
            for d, p in flagged.items()}
    overlap = {f"{a}|{b}": len(sets[a] & sets[b]) / max(1, len(sets[a] | sets[b]))
               for a in sets for b in sets if a < b}
    log.info("flagged-set overlap (Jaccard): %s", overlap)
    rows: list[dict[str, Any]] = []
    for d, path in flagged.items():
        for iv in args.interventions:
            for on in ("flagged", "random"):
                vals = {}
                for s in args.seeds:
                    name = f"{d}-{iv}-{on}-s{s}"
                    student, ev = work / "students" / name, work / "eval" / f"{name}.json"
                    if iv == "drop":
                        extra = ["--mask", "no-divergence" if on == "flagged" else "random-matched"]
                    else:
                        extra = ["--intervention", iv, "--intervene-on", "flagged" if on == "flagged" else "random-matched"]
                        if iv == "replace-teacher":
                            extra += ["--replace-teacher", args.control_teacher]
                    _cli(student_argv(tmpl, path, student, s, extra))
                    _cli(["eval", "--model", str(student), "--target", args.target, "--out", str(ev)])
                    vals[s] = _exact(ev)
                man = read_manifest(work / "students" / f"{d}-{iv}-{on}-s{args.seeds[0]}") or {}
                changed = (man.get("intervention") or {}).get("n_intervened") if iv != "drop" else \
                    man.get("completion_tokens", 0) - man.get("loss_tokens", 0)
                shares = [(vals[s] - control[s]) / (all_tok[s] - control[s]) for s in args.seeds]
                diff = mean_ci([vals[s] - control[s] for s in args.seeds])
                kept = mean_ci(shares) if transfer else (None, None, None)
                rows.append({"detector": d, "intervention": iv, "tokens": on, "changed_tokens": changed,
                             "p_target": sum(vals.values()) / len(vals), "diff_to_control": diff[0],
                             "diff_lo": diff[1], "diff_hi": diff[2], "share_kept": kept[0], "kept_lo": kept[1],
                             "kept_hi": kept[2], "per_seed": vals})
                log.info("%-16s %-16s %-8s kept %s", d, iv, on, "n/a" if kept[0] is None else f"{kept[0]:.2f}")
    out.mkdir(parents=True, exist_ok=True)
    keys = [k for k in rows[0] if k != "per_seed"] if rows else []
    with open(out / "detector_table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows([{k: r[k] for k in keys} for r in rows])
    result = {"run": str(run), "target": args.target, "share": args.share, "seeds": args.seeds,
              "control": control, "all": all_tok, "all_minus_control": diff_all, "transfer_distinguishable": transfer,
              "detector_seconds": timings, "flagged_overlap_jaccard": overlap, "rows": rows}
    write_json_atomic(out / "detector_table.json", result)
    if transfer:
        _figure(rows, out / "detector_table.png")
    write_manifest(out, stage="detector_table", config=vars(args), seed=None, inputs={"divergence": div},
                   wall_time_s=time.time() - t0)
    return 0


def _figure(rows: list[dict[str, Any]], path: Path) -> None:
    """Transfer kept per detector and intervention: flagged tokens beside their random control."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dets = list(dict.fromkeys(r["detector"] for r in rows))
    ivs = list(dict.fromkeys(r["intervention"] for r in rows))
    fig, axes = plt.subplots(1, len(ivs), figsize=(3.2 * len(ivs), 3.4), sharey=True, squeeze=False)
    for ax, iv in zip(axes[0], ivs):
        for k, on in enumerate(("flagged", "random")):
            sel = [next(r for r in rows if r["detector"] == d and r["intervention"] == iv and r["tokens"] == on)
                   for d in dets]
            xs = [i + (k - 0.5) * 0.38 for i in range(len(dets))]
            ax.bar(xs, [r["share_kept"] for r in sel], width=0.36, label=f"{on} tokens",
                   yerr=[[r["share_kept"] - r["kept_lo"] for r in sel], [r["kept_hi"] - r["share_kept"] for r in sel]],
                   capsize=2, color="C3" if on == "flagged" else "C7")
        ax.axhline(1, color="grey", lw=0.8)
        ax.set_xticks(range(len(dets)), dets, rotation=20, fontsize=8)
        ax.set_title(iv, fontsize=9)
    axes[0][0].set_ylabel("share of the all-tokens transfer kept")
    axes[0][0].legend(fontsize=7)
    write_figure_atomic(fig, path)


if __name__ == "__main__":
    sys.exit(main())
