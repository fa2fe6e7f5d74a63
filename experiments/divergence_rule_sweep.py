#!/usr/bin/env python
"""Divergence-rule sweep: how much of the transfer do a rule's flagged tokens carry, as the share
of tokens it flags grows?

Reads a finished ``subliminal demo`` run (its base, teachers, matched rows, divergence file and the
evaluations of its control, all-tokens and paper-rule students). For each share in ``--shares``
the demo's divergence file is re-flagged by the likelihood-ratio rule (``reflag-divergence
--rule ratio --flag-share S``, no model runs), and students are distilled exactly as the demo's
(same rows, steps, learning rate, seeds; ``subliminal.pipeline.distill_config``) with the flagged
tokens masked (``no-divergence``) and with only them in the loss (``only-divergence``; add
``random-matched`` with ``--masks``). The paper's argmax rule has no threshold: it stands at its
natural share, from the demo's own students; the demo's ratio-rule students (at the paper rule's
share) join the ratio curve.

Transfer kept = per seed ``(P(target) - control) / (all - control)``, paired by seed with the
demo's control and all-tokens students; mean and 95% t-interval over seeds.

Outputs in ``--out`` (default ``<demo>/rule_sweep``): ``div/``, ``students/``, ``eval/``,
``rule_sweep.csv`` / ``.json`` / ``.png`` and ``manifest.json``. Re-running resumes.

    python experiments/divergence_rule_sweep.py --demo runs/demo --seeds 1 2 3
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from subliminal.probes.plots import plot_rule_sweep

from subliminal import pipeline
from subliminal.cli import guarded
from subliminal.divergence import RuleSpec, reflag
from subliminal.evaluate import mean_ci
from subliminal.manifest import SubliminalError, atomic_path, read_manifest, write_json_atomic, write_manifest

log = logging.getLogger("divergence_rule_sweep")
SHARES = (0.01, 0.02, 0.05, 0.1, 0.2)
MASKS = ("no-divergence", "only-divergence")
CSV_FIELDS = ("rule", "share_target", "share_flagged", "flagged_tokens", "threshold", "mask", "seeds", "share_kept",
              "lo", "hi", "diff_to_control", "diff_lo", "diff_hi")


def load_demo(path: Path) -> tuple[pipeline.DemoConfig, Path, dict[str, Any]]:
    """The demo's config, base model and results, from its manifest and results.json."""
    man = read_manifest(path)
    if not man or man.get("stage") != "demo":
        raise SubliminalError(f"{path}: no demo manifest.json (run `subliminal demo --out {path}` first)")
    fields = {f.name for f in dataclasses.fields(pipeline.DemoConfig)}
    cfg = pipeline.DemoConfig(**{k: v for k, v in man["config"].items() if k in fields})
    base = Path(man["inputs"]["base"]["path"])
    results = json.loads((path / "results.json").read_text())
    return cfg, base, results


def read_evals(edir: Path, cond: str, seeds: list[int]) -> dict[int, float] | None:
    """``{seed: exact P(target)}`` of a condition's evaluations; None where any seed is missing."""
    paths = {s: edir / f"{cond}-s{s}.json" for s in seeds}
    if not all(p.is_file() for p in paths.values()):
        return None
    return {s: float(json.loads(p.read_text())["exact"]["mean"]) for s, p in paths.items()}


def kept(values: dict[int, float], control: dict[int, float], all_tokens: dict[int, float]) -> dict[str, Any]:
    """Share of the all-tokens transfer kept and the difference to the control, each with a 95% CI."""
    share = pipeline.share_kept(values, control, all_tokens)
    d = mean_ci([values[s] - control[s] for s in sorted(values)])
    out = {"seeds": len(values), "diff_to_control": d[0], "diff_lo": d[1], "diff_hi": d[2],
           "share_kept": None, "lo": None, "hi": None}
    if share is not None:
        out.update(share_kept=share[0], lo=share[1], hi=share[2])
    return out


def share_tag(share: float) -> str:
    return f"{100 * share:g}pct"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", default="runs/demo", help="a finished demo run directory (default %(default)s)")
    ap.add_argument("--out", default=None, help="output directory (default <demo>/rule_sweep)")
    ap.add_argument("--shares", type=float, nargs="+", default=list(SHARES),
                    help="shares of completion tokens the ratio rule flags (default %(default)s)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="student seeds, a subset of the demo's (default: all of the demo's)")
    ap.add_argument("--masks", nargs="+", default=list(MASKS), choices=("no-divergence", "only-divergence",
                                                                       "random-matched"),
                    help="masks to train per share (default %(default)s)")
    ap.add_argument("--reduce", choices=("max", "mean"), default=None,
                    help="the ratio rule's reduction over counterfactuals (default: the demo's)")
    ap.add_argument("--jobs", type=int, default=None, help="students trained at once (default: the demo's)")
    ap.add_argument("--dry-run", action="store_true", help="re-flag and list the students to train, train nothing")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return guarded(_main, args)  # the commands' own error boundary


def _main(args: argparse.Namespace) -> int:
    t0 = time.time()
    ddir = Path(args.demo)
    cfg, base, results = load_demo(ddir)
    out = Path(args.out) if args.out else ddir / "rule_sweep"
    reduce = args.reduce or cfg.ratio_reduce
    seeds = args.seeds or list(range(1, cfg.seeds + 1))
    if any(not 0 < s <= 1 for s in args.shares):
        raise SubliminalError(f"--shares must be in (0, 1], got {args.shares}")
    edir_demo = ddir / "eval"
    control, all_tokens = read_evals(edir_demo, "control", seeds), read_evals(edir_demo, "all", seeds)
    if control is None or all_tokens is None:
        raise SubliminalError(f"{edir_demo}: the demo has no control/all evaluations for seeds {seeds}")
    matched = ddir / "data" / "matched"
    div = matched / f"{cfg.target}.div.jsonl"
    files = {"none": matched / "none.jsonl", "div": div, "paraphrase": matched / f"{cfg.target}.paraphrase.jsonl",
             "mixing": matched / f"{cfg.target}.mixing.jsonl"}
    steps = int(results["steps"])
    n_layers = pipeline._n_layers(base)
    tdir = ddir / "teachers"

    # re-flag at every share (cheap: from the stored scores)
    flagged: dict[float, dict[str, Any]] = {}
    for share in args.shares:
        path = out / "div" / f"{cfg.target}.ratio-{share_tag(share)}.div.jsonl"
        if not path.exists():
            reflag(div, path, RuleSpec("ratio", flag_share=share, reduce=reduce))
        flagged[share] = {"path": path, **pipeline.rule_stats(path)}

    # students: the demo's plan with the re-flagged file as the data
    jobs, names = [], []
    for share, st in flagged.items():
        plan = pipeline.student_plan(cfg, n_layers, {**files, "div": st["path"]}, tdir)
        for mask in args.masks:
            for seed in seeds:
                name = f"ratio-{share_tag(share)}-{mask}"
                student, ev = out / "students" / f"{name}-s{seed}", out / "eval" / f"{name}-s{seed}.json"
                dcall = pipeline.StageCall("distill", pipeline.distill_config(cfg, base, student, plan[mask], seed))
                eargv = ["eval", "--model", str(student), "--target", cfg.target, "--out", str(ev),
                         "--device", cfg.device]
                jobs.append((f"{name}-s{seed}", [(f"distill-{name}-s{seed}", dcall, str(student)),
                                                 (f"eval-{name}-s{seed}", eargv, str(ev))]))
        names += [(share, m) for m in args.masks]
    if args.dry_run:
        for name, chain in jobs:
            log.info("%s: subliminal %s", name, chain[0][1])
        return 0
    pipeline.Runner(out).parallel(jobs, workers=args.jobs or cfg.jobs)

    rows: list[dict[str, Any]] = []
    paper = pipeline.rule_stats(div)
    for mask in args.masks:  # the paper rule at its natural share, from the demo's own students
        vals = read_evals(edir_demo, pipeline.RULE_CONDITIONS["paper"][mask], seeds)
        if vals is not None:
            rows.append({"rule": "paper", "share_target": None, "share_flagged": paper["flagged_share"],
                         "flagged_tokens": paper["flagged_tokens"], "threshold": None, "mask": mask,
                         **kept(vals, control, all_tokens)})
    demo_ratio = pipeline.rule_stats(div.with_name(f"{cfg.target}.ratio.div.jsonl")) \
        if div.with_name(f"{cfg.target}.ratio.div.jsonl").exists() and reduce == cfg.ratio_reduce else None
    for mask in args.masks:  # the demo's ratio students, at the paper rule's share
        vals = read_evals(edir_demo, pipeline.RULE_CONDITIONS["ratio"][mask], seeds) if demo_ratio else None
        if vals is not None:
            rows.append({"rule": "ratio", "share_target": paper["flagged_share"],
                         "share_flagged": demo_ratio["flagged_share"], "flagged_tokens": demo_ratio["flagged_tokens"],
                         "threshold": demo_ratio["rule"].get("min_ratio"), "mask": mask,
                         **kept(vals, control, all_tokens)})
    for share, mask in names:
        st = flagged[share]
        vals = read_evals(out / "eval", f"ratio-{share_tag(share)}-{mask}", seeds)
        rows.append({"rule": "ratio", "share_target": share, "share_flagged": st["flagged_share"],
                     "flagged_tokens": st["flagged_tokens"], "threshold": st["rule"].get("min_ratio"), "mask": mask,
                     **kept(vals, control, all_tokens)})
    for r in rows:
        log.info("%-6s %-16s flagged %6.2f%%  kept %s", r["rule"], r["mask"], 100 * r["share_flagged"],
                 "n/a" if r["share_kept"] is None else f"{r['share_kept']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}]")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "rule_sweep.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows([{k: r.get(k) for k in CSV_FIELDS} for r in rows])
    table = {"target": cfg.target, "demo": str(ddir), "reduce": reduce, "seeds": seeds, "steps": steps,
             "metric": "share of the all-tokens transfer kept, (P - control) / (all - control) per seed",
             "interval": "95% t-interval over seeds", "rows": rows}
    write_json_atomic(out / "rule_sweep.json", table)
    if any(r["share_kept"] is not None for r in rows):
        plot_rule_sweep([r for r in rows if r["share_kept"] is not None], out / "rule_sweep.png")
    write_manifest(out, stage="divergence_rule_sweep", config={**vars(args), "reduce": reduce, "seeds": seeds},
                   seed=None, inputs={"demo": ddir / "manifest.json", "divergence": div},
                   wall_time_s=time.time() - t0)
    print(out / "rule_sweep.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
